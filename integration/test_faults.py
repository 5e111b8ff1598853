"""Faults with real peers: an upstream DNS server that is silent or answers garbage, a host peer
that resets mid-stream, SIGTERM during a transfer, running out of file descriptors and getting
them back, QMP clients that never negotiate or flood commands without reading.

Each test checks the fault is contained: the guest gets a clean error (SERVFAIL, a reset), the
backend stays up and serves the next request (or, for SIGTERM, exits 0 with its state saved and
its ports free). Peers run on the host's loopback (the guest reaches 127.0.0.1 as the gateway
10.0.2.2); guests are namespace guests. QEMU killed mid-transfer is in test_isolation.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration import servers as srv
from integration.common import wait_until
from integration.fixtures import NsGuestFactory, StartBackend
from integration.nsguest import NsGuest
from integration.test_isolation import fd_count, guest_json, guest_peer, host_peer, limited_backend, procs

__all__ = ["procs"]  # a fixture, used by the descriptor test

PY = sys.executable
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
MB = 1 << 20

# The guest's side of a DNS test: one query over UDP to the DNS address; prints rcode and time.
DNS_TOOL = r"""
import json, socket, sys, time
import dpkt
name, qid = sys.argv[1], int(sys.argv[2])
q = dpkt.dns.DNS(id=qid, op=dpkt.dns.DNS_RD, qd=[dpkt.dns.DNS.Q(name=name, type=1)])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(15)
start = time.monotonic()
s.sendto(bytes(q), ("10.0.2.3", 53))
data, _ = s.recvfrom(65535)
r = dpkt.dns.DNS(data)
print(json.dumps({"rcode": r.rcode, "id_ok": r.id == qid, "seconds": time.monotonic() - start,
                  "a": [socket.inet_ntoa(rr.ip) for rr in r.an if rr.type == 1]}))
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeUpstream:
    """A UDP "DNS server" on 127.0.0.1 that stays silent or answers garbage; counts queries."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.queries = 0
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.running:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            if self.mode == "garbage":
                qid = data[:2]
                for reply in (
                    b"\xff" * 3,  # shorter than a header
                    qid + b"\x81\x80\x00\x05\x00\x07\x00\x00\x00\x00\xc0\x0c",  # counts that lie, a pointer loop
                    bytes(reversed(qid)) + b"\x81\x80" + b"\x00" * 8,  # the wrong id
                    os.urandom(300),
                ):
                    self.sock.sendto(reply, peer)

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def upstream() -> Iterator[list[FakeUpstream]]:
    made: list[FakeUpstream] = []
    yield made
    for u in made:
        u.close()


def dns_query(guest: NsGuest, tmp_path: Path, name: str, qid: int) -> dict[str, object]:
    tool = tmp_path / "dns_tool.py"
    tool.write_text(DNS_TOOL)
    result = guest.run([PY, str(tool), name, str(qid)], timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("mode", ["silent", "garbage"])
def test_upstream_dns_silent_or_garbage_gives_the_guest_servfail_and_the_backend_lives(
    mode: str, start_backend: StartBackend, ns_guest: NsGuestFactory, upstream: list[FakeUpstream], tmp_path: Path
) -> None:
    fake = FakeUpstream(mode)
    upstream.append(fake)
    backend = start_backend("--dns-mode", "forward", "--dns-upstream", f"127.0.0.1:{fake.port}")
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    for qid in (0x1111, 0x2222):
        r = dns_query(guest, tmp_path, "www.example.test", qid)
        print(f"upstream {mode}: rcode {r['rcode']} after {float(r['seconds']):.2f} s")  # type: ignore[arg-type]
        assert (r["rcode"], r["id_ok"], r["a"]) == (2, True, [])
        assert float(r["seconds"]) < 6.0  # type: ignore[arg-type]
    assert fake.queries >= 2  # it did reach the fake server
    builtin = dns_query(guest, tmp_path, "host.internal", 0x3333)  # the backend still answers
    assert (builtin["rcode"], builtin["a"]) == (0, [GATEWAY])
    assert backend.is_running


@pytest.fixture
def servers() -> Iterator[srv.Servers]:
    s = srv.Servers()
    yield s
    s.close()


def test_a_host_peer_resetting_mid_stream_resets_the_guest_and_the_next_connection_works(
    start_backend: StartBackend, ns_guest: NsGuestFactory, servers: srv.Servers
) -> None:
    backend = start_backend()
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    resetter = servers.start("reset", "127.0.0.1", 4 * MB)
    source = servers.start("source", "127.0.0.1", 2 * MB)

    def client(mode: str, port: int, *args: str) -> dict[str, object]:
        result = guest.run([PY, str(srv.SCRIPT), mode, GATEWAY, str(port), *args], timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        value = json.loads(result.stdout)
        assert isinstance(value, dict)
        return value

    for _ in range(2):
        cut = client("read-until-error", resetter.port, "--delay", "0.3")
        assert cut["error"] == "ECONNRESET", cut
        assert backend.is_running
        whole = client("recv", source.port)
        assert (whole["bytes"], whole["sha256"]) == (2 * MB, srv.pattern_sha256(2 * MB))


def test_sigterm_during_a_transfer_exits_0_saves_state_and_frees_the_forward_ports(
    start_backend: StartBackend, ns_guest: NsGuestFactory, servers: srv.Servers, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    fixed = free_port()
    backend = start_backend("--state", str(state), "--hostfwd", f"tcp:127.0.0.1:{fixed}-:7")
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    source = servers.start("source", "127.0.0.1", 2000 * MB)
    transfer = guest.popen(
        [PY, str(srv.SCRIPT), "recv", GATEWAY, str(source.port), "--delay", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # under load: the transfer is running (the backend is busy with it) when SIGTERM comes
        assert wait_until(lambda: rss_kib(backend.pid) > 0 and fd_count(backend.pid) > 0, 5)
        time.sleep(1.0)
        assert transfer.poll() is None, "the transfer ended before SIGTERM"
        started = time.monotonic()
        os.kill(backend.pid, signal.SIGTERM)
        assert wait_until(lambda: backend.returncode is not None, 5), "no exit within 5 s of SIGTERM"
        seconds = time.monotonic() - started
        print(f"SIGTERM during a transfer: exit {backend.returncode} after {seconds:.2f} s")
        assert backend.returncode == 0, backend.log_text()[-2000:]
    finally:
        transfer.kill()
        transfer.communicate(timeout=10)
    saved = json.loads(state.read_text())
    assert [f["host-port"] for f in saved["hostfwd"]] == [fixed], saved
    with socket.socket() as s:  # the forward's port is free again
        s.bind(("127.0.0.1", fixed))
    assert not backend.socket_path.exists()


def test_out_of_descriptors_then_freed_new_flows_work_again(
    tmp_path: Path, vpnnet_run_dir: Path, ns_guest: NsGuestFactory, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Under prlimit --nofile=256:256 a guest's flood of connects takes every descriptor (it
    gets RSTs for what does not fit); once the flood's connections are gone, the same guest's
    new flows (TCP and DNS over UDP) work and the descriptors are back."""
    backend = limited_backend(tmp_path, vpnnet_run_dir, 256)
    try:
        guest = ns_guest(backend=backend, ipv6=False)
        guest.dhcp()
        idle = fd_count(backend.pid)
        _hold, hold_port = host_peer(procs, "hold-server", "127.0.0.1", 0)
        _src, port = host_peer(procs, "source", "127.0.0.1", 0, 1000)
        flood = guest_peer(guest, "flood-connect", GATEWAY, hold_port, 600)
        done = json.loads(flood.wait("DONE ", 20).split(" ", 1)[1])
        during = fd_count(backend.pid)
        print(f"fds: idle {idle}, during the flood {during} (limit 256); flood {done}")
        assert done["refused"] > 100, done
        assert during <= 256
        flood.proc.kill()  # the guest's sockets close: FIN/RST to the backend, which frees its host sockets
        flood.proc.wait(5)
        assert wait_until(lambda: fd_count(backend.pid) < idle + 20, 15), fd_count(backend.pid)
        after = fd_count(backend.pid)
        result = guest_json(guest, "connects", GATEWAY, port, 20)
        assert result["ok"] == 20, result
        print(f"fds after the flood: {after}; 20 new connections ok")
        assert backend.is_running
    finally:
        backend.stop()


# ---- QMP clients that misbehave ----------------------------------------------------------------


def qmp_connect(path: Path, negotiate: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    if negotiate:
        f = s.makefile("rb")
        assert b"QMP" in f.readline()
        s.sendall(b'{"execute": "qmp_capabilities"}\r\n')
        assert b"return" in f.readline()
    return s


def qmp_ok(path: Path) -> dict[str, object]:
    """One well-behaved client's query-stats, with a deadline."""
    with qmp_connect(path) as s:
        f = s.makefile("rb")
        s.sendall(b'{"execute": "query-stats", "id": 1}\r\n')
        while True:
            reply = json.loads(f.readline())
            if "event" not in reply:
                assert isinstance(reply, dict)
                return reply


def test_qmp_clients_that_never_negotiate_or_flood_leave_other_clients_and_guests_served(
    start_backend: StartBackend, ns_guest: NsGuestFactory, vpnnet_run_dir: Path
) -> None:
    path = vpnnet_run_dir / f"faults-{os.getpid()}.qmp"
    backend = start_backend("--qmp", f"unix:{path}")
    guest = ns_guest(backend=backend, ipv6=False)
    rss_before = rss_kib(backend.pid)
    silent = [qmp_connect(path, negotiate=False) for _ in range(20)]  # connect, send nothing
    garbage = qmp_connect(path, negotiate=False)
    garbage.sendall(b"\x00\xff{{{ not json ]]]\r\n" * 1000 + os.urandom(200_000))
    flooder = qmp_connect(path)
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flood = b'{"execute": "query-stats"}\r\n' * 5000
    sent = 0
    flooder.settimeout(0.5)
    try:
        for _ in range(4):  # 20,000 commands, never reading a reply
            sent += flooder.send(flood)
    except (TimeoutError, OSError):
        pass  # the backend stopped reading (or dropped the client): that is the point
    try:
        reply = qmp_ok(path)
        assert "return" in reply, reply
        assert guest.dhcp()["router"] == GATEWAY  # the data plane too
        rss_during = rss_kib(backend.pid)
        print(f"QMP: 20 silent, 1 garbage, 1 flooding client ({sent} bytes of commands unread); "
              f"RSS {rss_before} -> {rss_during} kB")  # fmt: skip
        assert rss_during - rss_before < 64 * 1024
    finally:
        for s in [*silent, garbage, flooder]:
            s.close()
    assert wait_until(lambda: "return" in qmp_ok(path), 5)
    assert backend.is_running
    assert rss_kib(backend.pid) - rss_before < 64 * 1024


def test_a_dozen_connections_to_a_forward_without_a_lease_log_one_line(start_backend: StartBackend) -> None:
    """A booting VM's ssh retries: each connection is reset, the log says so once per 10 s."""
    port = free_port()
    backend = start_backend("--hostfwd", f"tcp:127.0.0.1:{port}-:22")
    backend.wait_for_log("forward added")
    resets = 0
    for _ in range(12):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.recv(1)
        except ConnectionResetError:
            resets += 1
    assert resets == 12
    assert wait_until(lambda: "no guest has a lease yet" in backend.log_text(), 5)
    time.sleep(0.3)
    assert backend.log_text().count("no guest has a lease yet") == 1
    assert backend.is_running

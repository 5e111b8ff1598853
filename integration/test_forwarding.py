"""Port forwarding with real guests: ``--hostfwd``, ``--state``, and QMP hostfwd-add/remove.

Most tests use namespace guests (integration/nsguest.py): the guest side is the real Linux TCP
stack behind QEMU's hub; the guest's servers are integration/fwd_peer.py, run with this machine's
python3 inside the guest namespace. The host side is this test process, on 127.0.0.1 (and ::1).
The QMP tests drive the backend's ``--qmp unix:`` socket with qemu.qmp's QMPClient. Two tests boot
the tiny VM (TCG) in its demo mode and fetch its web page through a forward.

Forward ports are read from the backend's log (``forward added: tcp:127.0.0.1:NNNN-:80``) or from
hostfwd-add's answer. "At once" means within RESET_LIMIT.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from integration.backend import Backend, BackendError
from integration.common import wait_until
from integration.fixtures import BOTH_TRANSPORTS, DEFAULT_MAC, NsGuestFactory, StartBackend, VmGuestFactory
from integration.nsguest import NsGuest

PY = sys.executable
PEER = Path(__file__).resolve().parent / "fwd_peer.py"
GATEWAY = "10.0.2.2"
MB = 1 << 20
BULK_BYTES = 200 * MB
T = TypeVar("T")
RESET_LIMIT = 1.0  # seconds within which a refused forwarded connection must be reset


# ---- helpers ---------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on 127.0.0.1 right now (for fixed-port forwards)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def added_port(backend: Backend, guest_side: str, protocol: str = "tcp", host_addr: str = "127.0.0.1") -> int:
    """The host port of the forward to ``guest_side`` (``:80``, ``10.0.2.16:80``) from the backend's log
    line ``forward added: tcp:127.0.0.1:NNNN-:80``. Exactly one such forward must exist."""
    pattern = rf"forward added: {protocol}:{re.escape(host_addr)}:(\d+)-{re.escape(guest_side)}$"
    backend.wait_for_log(pattern)
    ports = re.findall(pattern, backend.log_text(), re.MULTILINE)
    assert len(ports) == 1, f"expected one forward to {guest_side}, the log has {ports}"
    return int(ports[0])


_peers = iter(range(1, 1 << 30))


def serve(guest: NsGuest, tmp: Path, *specs: str, name: str = "guest") -> None:
    """Start fwd_peer.py in the guest namespace with ``specs`` (``echo:7``...); return once listening."""
    n = next(_peers)
    ready = tmp / f"peer{n}.ready"
    with open(tmp / f"peer{n}.log", "ab") as log:
        guest.popen([PY, str(PEER), str(ready), name, *specs], stdout=log, stderr=subprocess.STDOUT)
    log_path = tmp / f"peer{n}.log"
    assert wait_until(lambda: ready.exists() and "READY" in ready.read_text(), 10), log_path.read_text()


def hostfwd(*rules: str) -> list[str]:
    """``--hostfwd RULE`` for each rule."""
    return [arg for rule in rules for arg in ("--hostfwd", rule)]


def leased_guest(ns_guest: NsGuestFactory, backend: Backend, mtu: int = 1500) -> NsGuest:
    guest = ns_guest(backend=backend, mtu=mtu, ipv6=False)
    lease = guest.dhcp()
    assert lease["router"] == GATEWAY
    return guest


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(MB):
        chunks.append(data)
    return b"".join(chunks)


def echo_round_trip(port: int, payload: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def hello(port: int, timeout: float = 10.0) -> str:
    with connect(port, timeout) as sock:
        return recv_all(sock).decode()


def refusal(port: int) -> tuple[str, float]:
    """Connect to a forward whose guest side refuses, and wait for the end: ("reset" | "eof" |
    "timeout" | "refused", seconds from the start of connect to that end)."""
    start = time.monotonic()
    try:
        with connect(port, timeout=5.0) as sock:
            sock.settimeout(5.0)
            data = sock.recv(1)
            outcome = "eof" if not data else f"data {data!r}"
    except ConnectionResetError:
        outcome = "reset"
    except ConnectionRefusedError:
        outcome = "refused"
    except TimeoutError:
        outcome = "timeout"
    return outcome, time.monotonic() - start


def bind_ok(port: int, kind: int = socket.SOCK_STREAM, reuse: bool = False) -> bool:
    """True if this process can bind (and for TCP listen on) 127.0.0.1:port now."""
    with socket.socket(socket.AF_INET, kind) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            if kind == socket.SOCK_STREAM:
                s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        return True


def udp_exchange(sock: socket.socket, port: int, payload: bytes, tries: int = 5) -> bytes:
    """Send ``payload`` to the UDP forward until an answer comes (UDP may lose the first datagram
    while the guest's ARP entry for the gateway is being resolved)."""
    sock.settimeout(1.0)
    for _attempt in range(tries):
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            data, _peer = sock.recvfrom(65535)
            return data
        except TimeoutError:
            continue
    raise AssertionError(f"no UDP reply to {payload!r} on port {port}")


# ---- TCP forwards ----------------------------------------------------------------------


def test_tcp_forward_ephemeral_and_fixed_host_ports(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    fixed = free_port()
    backend = start_backend(*hostfwd("tcp:127.0.0.1:0-:7", f"tcp::{fixed}-:9", "tcp:[::1]:0-:7"))
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "echo:7", "hello:9", name="g1")
    ephemeral = added_port(backend, ":7")
    assert ephemeral != 0
    assert added_port(backend, ":9") == fixed
    assert echo_round_trip(ephemeral, b"hello through an ephemeral port\n") == b"hello through an ephemeral port\n"
    # the guest's server sees the client as the gateway, as with QEMU's slirp
    assert hello(fixed) == f"g1 {GATEWAY}\n"
    # an IPv6 host address
    v6 = added_port(backend, ":7", host_addr="[::1]")
    with socket.create_connection(("::1", v6), timeout=10) as sock:
        sock.sendall(b"over IPv6")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"over IPv6"
    # several connections in a row on the same forward
    for i in range(20):
        assert echo_round_trip(ephemeral, f"round {i}".encode()) == f"round {i}".encode()


def test_guest_reset_mid_connection_resets_the_host_client(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    backend = start_backend("--hostfwd", "tcp::0-:5003")
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "reset:5003")
    port = added_port(backend, ":5003")
    with connect(port) as sock:
        assert sock.makefile("rb").readline() == b"partial\n"
        sock.sendall(b"ok")
        start = time.monotonic()
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
        assert time.monotonic() - start < RESET_LIMIT


def test_half_close_through_a_forward(start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path) -> None:
    backend = start_backend("--hostfwd", "tcp::0-:5001")
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "sink:5001")
    port = added_port(backend, ":5001")
    payload = os.urandom(300_000)
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the guest server answers only after our EOF
        reply = recv_all(sock)
    assert reply == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_bulk_200mb_each_way_through_a_forward(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path, mtu: int
) -> None:
    backend = start_backend("--mtu", str(mtu), "--hostfwd", "tcp::0-:5001", "--hostfwd", "tcp::0-:5002")
    guest = leased_guest(ns_guest, backend, mtu=mtu)
    serve(guest, tmp_path, "sink:5001", "source:5002")
    link = guest.run(["ip", "link", "show", "dev", guest.ifname]).stdout
    assert f"mtu {mtu} " in link
    up_port, down_port = added_port(backend, ":5001"), added_port(backend, ":5002")

    # host -> guest
    start = time.monotonic()
    digest = hashlib.sha256()
    with connect(up_port, timeout=60) as sock:
        sent = 0
        while sent < BULK_BYTES:
            chunk = os.urandom(MB)
            digest.update(chunk)
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock)
    upload = time.monotonic() - start
    assert reply == f"{digest.hexdigest()} {BULK_BYTES}\n".encode()

    # guest -> host
    start = time.monotonic()
    digest = hashlib.sha256()
    received = 0
    tail = bytearray()
    with connect(down_port, timeout=60) as sock:
        sock.sendall(f"{BULK_BYTES}\n".encode())
        while data := sock.recv(MB):
            if received < BULK_BYTES:
                take = min(len(data), BULK_BYTES - received)
                digest.update(data[:take])
                received += take
                tail += data[take:]
            else:
                tail += data
    download = time.monotonic() - start
    assert received == BULK_BYTES
    assert tail.decode() == digest.hexdigest()
    print(
        f"MTU {mtu}: host->guest {BULK_BYTES * 8 / upload / 1e6:.0f} Mbit/s ({upload:.1f} s), "
        f"guest->host {BULK_BYTES * 8 / download / 1e6:.0f} Mbit/s ({download:.1f} s)"
    )


def test_200_concurrent_forwarded_connections(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    backend = start_backend("--hostfwd", "tcp::0-:7")
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "echo:7")
    port = added_port(backend, ":7")
    count = 200

    async def main() -> list[bytes]:
        conns = await asyncio.wait_for(
            asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(count))), 30
        )
        payloads = [f"connection {i} ".encode() * 1000 for i in range(count)]

        async def one(i: int) -> bytes:
            reader, writer = conns[i]
            # every connection is open at once; first a round trip on each, then the bulk and EOF
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.write(payloads[i])
            writer.write_eof()
            data = await reader.read()
            writer.close()
            return data

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 60)
        assert [len(r) for r in results] == [len(p) for p in payloads]
        return [r for r, p in zip(results, payloads, strict=True) if r != p]

    mismatched = asyncio.run(main())
    assert mismatched == []


def test_guest_refusing_resets_the_host_client_at_once(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    backend = start_backend("--hostfwd", "tcp::0-:5999", "--hostfwd", "tcp::0-:7")
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "echo:7")  # nothing on 5999: the guest's kernel answers RST
    port = added_port(backend, ":5999")
    for _ in range(3):
        outcome, seconds = refusal(port)
        assert (outcome, seconds < RESET_LIMIT) == ("reset", True), seconds
    # the backend is fine afterwards
    echo = added_port(backend, ":7")
    assert echo_round_trip(echo, b"still here") == b"still here"


def test_no_lease_refuses_then_forwards_follow_the_first_leased_guest(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    backend = start_backend("--hostfwd", "tcp::0-:9", "--hostfwd", "udp::0-:7777")
    port, udp_port = added_port(backend, ":9"), added_port(backend, ":7777", protocol="udp")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(0.5)
    # no guest at all
    outcome, seconds = refusal(port)
    assert (outcome, seconds < RESET_LIMIT) == ("reset", True)
    # a guest connected, serving, but without a lease
    guest = ns_guest(backend=backend, ipv6=False)
    serve(guest, tmp_path, "hello:9", "udpecho:7777", name="first")
    outcome, seconds = refusal(port)
    assert (outcome, seconds < RESET_LIMIT) == ("reset", True)
    assert "no guest has a lease yet" in backend.log_text()
    with udp, pytest.raises(TimeoutError):  # a datagram for nobody: dropped
        udp.sendto(b"anyone?", ("127.0.0.1", udp_port))
        udp.recvfrom(100)
    # after its DHCP the same forwards reach it
    guest.dhcp()
    assert hello(port) == f"first {GATEWAY}\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert udp_exchange(sock, udp_port, b"now").startswith(b"now|10.0.2.2:")
    # a second guest with a lease does not take the forward over
    second = leased_guest(ns_guest, backend)
    serve(second, tmp_path, "hello:9", name="second")
    assert [hello(port) for _ in range(3)] == [f"first {GATEWAY}\n"] * 3


def test_explicit_guest_address_with_two_guests(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    backend = start_backend(*hostfwd("tcp::0-10.0.2.16:80", "tcp::0-10.0.2.15:80", "tcp::0-10.0.2.20:80"))
    first = leased_guest(ns_guest, backend)
    second = leased_guest(ns_guest, backend)
    assert (first.last_lease or {})["ip"] == "10.0.2.15"
    assert (second.last_lease or {})["ip"] == "10.0.2.16"
    serve(first, tmp_path, "hello:80", name="first")
    serve(second, tmp_path, "hello:80", name="second")
    to_16, to_15 = added_port(backend, "10.0.2.16:80"), added_port(backend, "10.0.2.15:80")
    assert hello(to_16) == f"second {GATEWAY}\n"
    assert hello(to_15) == f"first {GATEWAY}\n"
    assert hello(to_16) == f"second {GATEWAY}\n"
    # nobody has 10.0.2.20: refused at once, like a forward while no guest has a lease
    outcome, seconds = refusal(added_port(backend, "10.0.2.20:80"))
    assert (outcome, seconds < RESET_LIMIT) == ("reset", True)


def test_forward_after_the_first_guest_disconnected(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    backend = start_backend("--hostfwd", "tcp::0-:9")
    port = added_port(backend, ":9")
    first = leased_guest(ns_guest, backend)
    second = leased_guest(ns_guest, backend)
    serve(first, tmp_path, "hello:9", name="first")
    serve(second, tmp_path, "hello:9", name="second")
    assert hello(port) == f"first {GATEWAY}\n"
    first.close()  # its QEMU is gone: the backend sees the stream socket close
    backend.wait_for_log(r"guest disconnected: port=1 ")
    # the forward now goes to the guest that is still there (not to the lease of the gone one)
    assert hello(port, timeout=3) == f"second {GATEWAY}\n"


# ---- UDP forwards ----------------------------------------------------------------------


def test_udp_forward_round_trip_two_host_clients(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    backend = start_backend("--hostfwd", "udp::0-:7777")
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "udpecho:7777")
    port = added_port(backend, ":7777", protocol="udp")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
    ):
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        reply_a = udp_exchange(a, port, b"from a")
        reply_b = udp_exchange(b, port, b"from b")
        data_a, _, peer_a = reply_a.partition(b"|")
        data_b, _, peer_b = reply_b.partition(b"|")
        assert (data_a, data_b) == (b"from a", b"from b")
        # both come from the gateway, on two different source ports (two flows)
        assert peer_a.startswith(b"10.0.2.2:") and peer_b.startswith(b"10.0.2.2:")
        assert peer_a != peer_b
        # more round trips, interleaved: each socket only ever gets its own replies
        for i in range(10):
            a.sendto(f"a{i}".encode(), ("127.0.0.1", port))
            b.sendto(f"b{i}".encode(), ("127.0.0.1", port))
            assert a.recvfrom(65535)[0] == f"a{i}|".encode() + peer_a
            assert b.recvfrom(65535)[0] == f"b{i}|".encode() + peer_b
        # a datagram larger than the MTU reaches the guest (in fragments)
        big = b"len?" + os.urandom(8000)
        assert udp_exchange(a, port, big) == b"8004|" + peer_a


@pytest.mark.parametrize("netdev", ["vpnnet", "libslirp"])
def test_udp_forward_reply_larger_than_the_mtu(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path, netdev: str
) -> None:
    """The guest's answer of 8000 bytes leaves it as IP fragments; libslirp reassembles them."""
    if netdev == "libslirp":
        port = free_port(socket.SOCK_DGRAM)
        guest = ns_guest(netdev=f"user,hostfwd=udp:127.0.0.1:{port}-:7777", ipv6=False)
        guest.dhcp()
    else:
        backend = start_backend("--hostfwd", "udp::0-:7777")
        guest = leased_guest(ns_guest, backend)
        port = added_port(backend, ":7777", protocol="udp")
    serve(guest, tmp_path, "udpecho:7777")
    big = os.urandom(8000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert udp_exchange(sock, port, b"small").startswith(b"small|")
        reply = udp_exchange(sock, port, big, tries=2)
    assert reply.rpartition(b"|")[0] == big


# ---- state file and shutdown -------------------------------------------------------------


def test_state_file_restores_forwards_after_a_restart(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    state = tmp_path / "forwards.json"
    fixed = free_port()
    first = start_backend("--state", str(state), *hostfwd("tcp::0-:7", f"tcp::{fixed}-:9", "udp::0-:7777"))
    echo_port, udp_port = added_port(first, ":7"), added_port(first, ":7777", protocol="udp")
    assert first.stop() == 0
    saved = json.loads(state.read_text())
    assert saved["version"] == 1
    keys = ("protocol", "host-addr", "host-port", "guest-addr", "guest-port")
    rules = {tuple(rule[k] for k in keys) for rule in saved["hostfwd"]}
    assert rules == {
        ("tcp", "127.0.0.1", echo_port, "", 7),
        ("tcp", "127.0.0.1", fixed, "", 9),
        ("udp", "127.0.0.1", udp_port, "", 7777),
    }

    second = start_backend("--state", str(state))
    assert added_port(second, ":7") == echo_port
    assert added_port(second, ":9") == fixed
    assert added_port(second, ":7777", protocol="udp") == udp_port
    guest = leased_guest(ns_guest, second)
    serve(guest, tmp_path, "echo:7", "hello:9", "udpecho:7777", name="restarted")
    assert echo_round_trip(echo_port, b"back again") == b"back again"
    assert hello(fixed) == f"restarted {GATEWAY}\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert udp_exchange(sock, udp_port, b"udp back").startswith(b"udp back|10.0.2.2:")
    assert second.stop() == 0
    assert json.loads(state.read_text()) == saved


def test_unreadable_state_file_is_reported_and_kept(start_backend: StartBackend, tmp_path: Path) -> None:
    state = tmp_path / "forwards.json"
    state.write_text('{"version": 1, "hostfwd": [{"protocol": "tcp"')
    try:
        backend = start_backend("--state", str(state), "--hostfwd", "tcp::0-:7")
    except BackendError as exc:  # usually: it exits before its socket could be seen
        log = str(exc)
        assert "exited with status 2 " in log
    else:
        assert wait_until(lambda: not backend.is_running(), 10)
        assert backend.returncode == 2
        log = backend.log_text()
    assert f"state file {state} is unreadable" in log
    assert "forward added" not in log
    assert state.read_text() == '{"version": 1, "hostfwd": [{"protocol": "tcp"'  # not overwritten


def test_state_file_and_the_same_ephemeral_hostfwd_at_each_start(start_backend: StartBackend, tmp_path: Path) -> None:
    """A service started with the same ``--state F --hostfwd tcp::0-:7`` at each boot keeps one forward."""
    state = tmp_path / "forwards.json"
    first = start_backend("--state", str(state), "--hostfwd", "tcp::0-:7")
    port = added_port(first, ":7")
    assert first.stop() == 0
    second = start_backend("--state", str(state), "--hostfwd", "tcp::0-:7")
    second.wait_for_log("serving net=")
    assert added_port(second, ":7") == port
    assert second.stop() == 0
    assert len(json.loads(state.read_text())["hostfwd"]) == 1


def test_stopping_the_backend_frees_every_port(
    start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    fixed = free_port()
    backend = start_backend(*hostfwd("tcp::0-:7", f"tcp::{fixed}-:9", "udp::0-:7777", "tcp::0-:5999"))
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "echo:7", "udpecho:7777")
    echo_port, refused = added_port(backend, ":7"), added_port(backend, ":5999")
    udp_port = added_port(backend, ":7777", protocol="udp")
    # in use while the backend runs, with a live connection on one of them
    live = connect(echo_port)
    live.sendall(b"x")
    assert live.recv(1) == b"x"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        udp_exchange(sock, udp_port, b"udp")
    for port in (echo_port, fixed, refused):
        assert not bind_ok(port, reuse=True)
    assert not bind_ok(udp_port, socket.SOCK_DGRAM)

    assert backend.stop() == 0
    # the live connection ended with the backend
    live.settimeout(5)
    try:
        assert live.recv(1) == b""
    except ConnectionResetError:
        pass
    live.close()
    # every port is free at once: unused listeners even without SO_REUSEADDR
    assert bind_ok(fixed) and bind_ok(refused)
    assert bind_ok(echo_port, reuse=True)
    assert bind_ok(udp_port, socket.SOCK_DGRAM)


# ---- QMP control -------------------------------------------------------------------------


class Qmp:
    """A qemu.qmp QMPClient on its own event loop thread, driven synchronously by the test."""

    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="qmp-client")
        self.thread.start()
        self.client: QMPClient = self.run(self._make())
        try:
            self.run(self.client.connect(str(path)))
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _make() -> QMPClient:
        return QMPClient("forwarding-test")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        return self.run(self.client.execute(command, arguments))

    def error(self, command: str, arguments: dict[str, object] | None = None) -> str:
        """Execute a command that must fail; return the error's description."""
        with pytest.raises(ExecuteError) as info:
            self.execute(command, arguments)
        return str(info.value)

    def event(self, name: str, timeout: float = 10.0, **data: object) -> dict[str, Any]:
        """The next event ``name`` whose data has the items ``data`` (other events are skipped)."""

        async def wait() -> dict[str, Any]:
            while True:
                message = await self.client.events.get()
                event: dict[str, Any] = dict(message)
                if event["event"] == name and all(event["data"].get(k) == v for k, v in data.items()):
                    return event

        return self.run(asyncio.wait_for(wait(), timeout), timeout + 5)

    def close(self) -> None:
        try:
            self.run(self.client.disconnect(), 5)
        except (EOFError, OSError):
            pass  # the backend is gone already
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


QmpFactory = Callable[[Backend], Qmp]


@pytest.fixture
def qmp() -> Iterator[QmpFactory]:
    """Factory: a connected QMP client of a backend made by :func:`start_with_qmp`; closed at teardown."""
    clients: list[Qmp] = []

    def make(backend: Backend) -> Qmp:
        backend.wait_for_log(r"QMP listening on unix:")
        client = Qmp(qmp_path(backend))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def qmp_path(backend_or_socket: Backend | Path) -> Path:
    """Where a backend's QMP socket goes: next to its stream socket."""
    socket_path = backend_or_socket.socket_path if isinstance(backend_or_socket, Backend) else backend_or_socket
    return socket_path.with_suffix(".qmp")


def start_with_qmp(start_backend: StartBackend, vpnnet_run_dir: Path, *args: str) -> Backend:
    """A backend with ``--qmp unix:`` :func:`qmp_path` and ``args``."""
    path = vpnnet_run_dir / f"q{next(_peers)}.sock"
    return start_backend("--qmp", f"unix:{qmp_path(path)}", *args, socket_path=path)


def test_qmp_hostfwd_add_reach_remove(
    start_backend: StartBackend, ns_guest: NsGuestFactory, qmp: QmpFactory, vpnnet_run_dir: Path, tmp_path: Path
) -> None:
    backend = start_with_qmp(start_backend, vpnnet_run_dir)
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "echo:7", "hello:9", "udpecho:7777", name="g1")
    client = qmp(backend)
    assert client.execute("query-hostfwd") == []

    # a rule in QEMU's syntax, ephemeral host port
    added = client.execute("hostfwd-add", {"rule": "tcp::0-:7"})
    echo_port = added["host-port"]
    assert added["rule"] == f"tcp:127.0.0.1:{echo_port}-:7"
    assert [added[k] for k in ("protocol", "host-addr", "guest-addr", "guest-port")] == ["tcp", "127.0.0.1", "", 7]
    assert client.event("HOSTFWD_ADDED")["data"]["host-port"] == echo_port
    assert echo_round_trip(echo_port, b"added over QMP") == b"added over QMP"

    # structured arguments, a fixed host port, an explicit guest address
    fixed = free_port()
    added = client.execute("hostfwd-add", {"host-port": fixed, "guest-addr": "10.0.2.15", "guest-port": 9})
    assert added["rule"] == f"tcp:127.0.0.1:{fixed}-10.0.2.15:9"
    assert hello(fixed) == f"g1 {GATEWAY}\n"
    udp = client.execute("hostfwd-add", {"protocol": "udp", "host-port": 0, "guest-port": 7777})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert udp_exchange(sock, udp["host-port"], b"udp over QMP").startswith(b"udp over QMP|10.0.2.2:")

    listed = {(f["protocol"], f["host-port"]): f for f in client.execute("query-hostfwd")}
    assert set(listed) == {("tcp", echo_port), ("tcp", fixed), ("udp", udp["host-port"])}
    assert listed[("tcp", echo_port)]["accepted"] == 1
    assert listed[("tcp", fixed)]["guest-addr"] == "10.0.2.15"

    # removed: refused and free at once
    for port in (echo_port, fixed):
        removed = client.execute("hostfwd-remove", {"host-port": port})
        assert removed["host-port"] == port
        assert client.event("HOSTFWD_REMOVED")["data"]["host-port"] == port
        outcome, seconds = refusal(port)
        assert (outcome, seconds < RESET_LIMIT) == ("refused", True)
        assert bind_ok(port, reuse=True)
    client.execute("hostfwd-remove", {"protocol": "udp", "host-port": udp["host-port"]})
    assert bind_ok(udp["host-port"], socket.SOCK_DGRAM)
    assert client.execute("query-hostfwd") == []
    assert "no tcp forward" in client.error("hostfwd-remove", {"host-port": echo_port})
    # a removed port can be forwarded again
    again = client.execute("hostfwd-add", {"rule": f"tcp::{echo_port}-:7"})
    assert again["host-port"] == echo_port
    assert echo_round_trip(echo_port, b"again") == b"again"


def test_qmp_remove_with_and_without_closing_connections(
    start_backend: StartBackend, ns_guest: NsGuestFactory, qmp: QmpFactory, vpnnet_run_dir: Path, tmp_path: Path
) -> None:
    backend = start_with_qmp(start_backend, vpnnet_run_dir)
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "echo:7")
    client = qmp(backend)
    keep = client.execute("hostfwd-add", {"rule": "tcp::0-:7"})["host-port"]
    cut = client.execute("hostfwd-add", {"rule": "tcp::0-:7"})["host-port"]
    kept = [connect(keep) for _ in range(3)]
    closed = [connect(cut) for _ in range(3)]
    try:
        for sock in kept + closed:
            sock.sendall(b"live")
            assert sock.recv(4) == b"live"
        connections = client.execute("query-hostfwd")
        assert sorted(f["connections"] for f in connections) == [3, 3]

        # without close-connections, live connections go on; new ones are refused
        client.execute("hostfwd-remove", {"host-port": keep})
        assert refusal(keep)[0] == "refused"
        for sock in kept:
            sock.sendall(b"still")
            assert sock.recv(5) == b"still"

        # with close-connections, they end at once
        client.execute("hostfwd-remove", {"host-port": cut, "close-connections": True})
        start = time.monotonic()
        for sock in closed:
            sock.settimeout(5)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - start < RESET_LIMIT
        assert bind_ok(cut, reuse=True)
        for sock in kept:
            sock.sendall(b"after")
            assert sock.recv(5) == b"after"
        assert wait_until(lambda: client.execute("query-stats")["tcp-connections"] == 3, 5, 0.1)

        # the same port forwarded again: closing its connections leaves those of the old forward alone
        assert client.execute("hostfwd-add", {"rule": f"tcp::{keep}-:7"})["host-port"] == keep
        newer = connect(keep)
        closed.append(newer)
        newer.sendall(b"new")
        assert newer.recv(3) == b"new"
        assert client.execute("query-hostfwd")[0]["connections"] == 1
        client.execute("hostfwd-remove", {"host-port": keep, "close-connections": True})
        newer.settimeout(5)
        try:
            assert newer.recv(1) == b""
        except ConnectionResetError:
            pass
        for sock in kept:
            sock.sendall(b"older")
            assert sock.recv(5) == b"older"
    finally:
        for sock in kept + closed:
            sock.close()


def test_qmp_guest_lease_event_and_query_leases(
    start_backend: StartBackend, ns_guest: NsGuestFactory, qmp: QmpFactory, vpnnet_run_dir: Path
) -> None:
    backend = start_with_qmp(start_backend, vpnnet_run_dir)
    client = qmp(backend)
    assert client.execute("query-leases") == []
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    event = client.event("GUEST_LEASE", mac=guest.mac)
    assert event["data"]["address"] == "10.0.2.15"
    second = ns_guest(backend=backend, ipv6=False)
    second.dhcp()
    assert client.event("GUEST_LEASE", mac=second.mac)["data"]["address"] == "10.0.2.16"
    leases = {lease["mac"]: lease["address"] for lease in client.execute("query-leases")}
    assert leases == {guest.mac: "10.0.2.15", second.mac: "10.0.2.16"}


def test_qmp_forwarded_connections_are_cleaned_up(
    start_backend: StartBackend, ns_guest: NsGuestFactory, qmp: QmpFactory, vpnnet_run_dir: Path, tmp_path: Path
) -> None:
    backend = start_with_qmp(start_backend, vpnnet_run_dir)
    guest = leased_guest(ns_guest, backend)
    serve(guest, tmp_path, "echo:7", "hello:9")
    client = qmp(backend)
    echo = client.execute("hostfwd-add", {"rule": "tcp::0-:7"})["host-port"]
    greet = client.execute("hostfwd-add", {"rule": "tcp::0-:9"})["host-port"]
    refused = client.execute("hostfwd-add", {"rule": "tcp::0-:5999"})["host-port"]
    for i in range(30):
        assert echo_round_trip(echo, b"x" * i) == b"x" * i  # the host client closes first
        assert hello(greet).startswith("guest ")  # the guest closes first
        connect(echo).close()  # connected and gone at once
        with connect(echo) as sock:  # the host client aborts
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert refusal(refused)[0] == "reset"

    def settled() -> bool:
        forwards = client.execute("query-hostfwd")
        return all(f["connections"] == 0 for f in forwards) and client.execute("query-stats")["tcp-connections"] == 0

    assert wait_until(settled, 10, 0.2), (client.execute("query-hostfwd"), client.execute("query-connections"))
    counts = {f["host-port"]: (f["accepted"], f["refused"]) for f in client.execute("query-hostfwd")}
    assert counts[echo] == (90, 0) and counts[greet] == (30, 0)
    assert counts[refused][0] + counts[refused][1] == 30


# (arguments, a word the error must name)
BAD_HOSTFWD_ADD: list[tuple[dict[str, object], str]] = [
    ({}, "host-port"),
    ({"rule": ""}, "rule"),
    ({"rule": "tcp::notaport-:80"}, "host port"),
    ({"rule": "sctp::0-:80"}, "protocol"),
    ({"rule": "tcp::0-:0"}, "guest port"),
    ({"rule": "tcp::65536-:80"}, "host port"),
    ({"rule": "tcp:999.1.1.1:0-:80"}, "host address"),
    ({"rule": "tcp:localhost:0-:80"}, "host address"),
    ({"rule": "tcp::0-[::1]:80"}, "guest address"),
    ({"rule": "tcp::0-10.0.2.2:80"}, "guest address"),  # the gateway is not a guest
    ({"rule": "tcp::0-10.0.2.255:80"}, "guest address"),
    ({"rule": "tcp::0-192.0.2.1:80"}, "guest address"),  # outside the guest network
    ({"rule": 7}, "rule"),
    ({"rule": "tcp::0-:80", "host-port": 5}, "exclusive"),
    ({"host-port": 0}, "guest-port"),
    ({"guest-port": 80}, "host-port"),
    ({"host-port": -1, "guest-port": 80}, "host-port"),
    ({"host-port": 70000, "guest-port": 80}, "host-port"),
    ({"host-port": "80", "guest-port": 80}, "host-port"),
    ({"host-port": 0, "guest-port": 80.5}, "guest-port"),
    ({"host-port": True, "guest-port": 80}, "host-port"),
    ({"host-port": 0, "guest-port": 80, "protocol": "icmp"}, "protocol"),
    ({"host-port": 0, "guest-port": 80, "host-addr": "not-an-ip"}, "host address"),
    ({"host-port": 0, "guest-port": 80, "host-addr": "192.0.2.1"}, "cannot listen"),  # not this machine's
    ({"host-port": 0, "guest-port": 80, "bogus": 1}, "bogus"),
]

BAD_HOSTFWD_REMOVE: list[tuple[dict[str, object], str]] = [
    ({}, "host-port"),
    ({"host-port": 0}, "host-port"),
    ({"host-port": 70000}, "host-port"),
    ({"host-port": "1"}, "host-port"),
    ({"host-port": 1, "protocol": "sctp"}, "protocol"),
    ({"host-port": 1, "host-addr": "nope"}, "host address"),
    ({"host-port": 1, "close-connections": "yes"}, "close-connections"),
    ({"host-port": 1, "bogus": True}, "bogus"),
    ({"host-port": 1}, "no tcp forward"),
]


def test_qmp_bad_input_gives_errors_and_the_client_stays_usable(
    start_backend: StartBackend, qmp: QmpFactory, vpnnet_run_dir: Path
) -> None:
    backend = start_with_qmp(start_backend, vpnnet_run_dir)
    client = qmp(backend)
    good = client.execute("hostfwd-add", {"rule": "tcp::0-:80"})["host-port"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        extra: list[tuple[dict[str, object], str]] = [
            ({"rule": f"tcp::{good}-:81"}, "exists already"),
            ({"rule": f"tcp::{busy}-:80"}, "in use"),  # another program listens there
        ]
        for arguments, word in BAD_HOSTFWD_ADD + extra:
            desc = client.error("hostfwd-add", arguments)
            assert word in desc and "internal error" not in desc, (arguments, desc)
            assert [f["host-port"] for f in client.execute("query-hostfwd")] == [good], arguments
    for arguments, word in BAD_HOSTFWD_REMOVE:
        desc = client.error("hostfwd-remove", arguments)
        assert word in desc and "internal error" not in desc, (arguments, desc)
    assert "not been found" in client.error("no-such-command")
    assert "unexpected" in client.error("query-hostfwd", {"extra": 1})
    # still usable: a good command works and the table is as before
    assert [f["host-port"] for f in client.execute("query-hostfwd")] == [good]
    assert client.execute("hostfwd-remove", {"host-port": good})["host-port"] == good
    assert backend.is_running()
    assert "Traceback" not in backend.log_text()


def raw_qmp(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send ``lines`` (after negotiation) on a raw QMP connection; the replies, one per line."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rb")
        assert "QMP" in json.loads(stream.readline())
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(stream.readline()) == {"return": {}}
        replies = []
        for line in lines:
            sock.sendall(line)
            replies.append(json.loads(stream.readline()))
        return replies


def test_qmp_malformed_messages_get_errors(start_backend: StartBackend, qmp: QmpFactory, vpnnet_run_dir: Path) -> None:
    backend = start_with_qmp(start_backend, vpnnet_run_dir)
    qmp(backend)  # waits until it listens
    replies = raw_qmp(
        qmp_path(backend),
        [
            b"{not json}\n",
            b"[1, 2]\n",
            b'{"execute": 5}\n',
            b'{"execute": "hostfwd-add", "arguments": []}\n',
            b'{"execute": "hostfwd-add", "arguments": {"rule": "bad"}, "id": "x1"}\n',
            b'{"exec": "query-hostfwd"}\n',
            b'{"execute": "query-hostfwd", "id": 42}\n',
        ],
    )
    assert all("error" in reply for reply in replies[:-1]), replies
    assert replies[4]["id"] == "x1"
    assert replies[-1] == {"return": [], "id": 42}
    assert backend.is_running()


def test_qmp_forwards_survive_a_restart_with_state(
    start_backend: StartBackend, ns_guest: NsGuestFactory, qmp: QmpFactory, vpnnet_run_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    first = start_with_qmp(start_backend, vpnnet_run_dir, "--state", str(state), "--hostfwd", "tcp::0-:9")
    client = qmp(first)
    tcp_port = client.execute("hostfwd-add", {"rule": "tcp::0-:7"})["host-port"]
    udp_port = client.execute("hostfwd-add", {"rule": "udp::0-:7777"})["host-port"]
    cmdline_port = added_port(first, ":9")
    gone = client.execute("hostfwd-add", {"rule": "tcp::0-:8"})["host-port"]
    client.execute("hostfwd-remove", {"host-port": gone})
    saved = json.loads(state.read_text())  # written at each change
    assert {(r["protocol"], r["host-port"]) for r in saved["hostfwd"]} == {
        ("tcp", cmdline_port),
        ("tcp", tcp_port),
        ("udp", udp_port),
    }
    assert first.stop() == 0

    second = start_with_qmp(start_backend, vpnnet_run_dir, "--state", str(state))
    client = qmp(second)
    listed = {(f["protocol"], f["host-port"], f["guest-port"]) for f in client.execute("query-hostfwd")}
    assert listed == {("tcp", cmdline_port, 9), ("tcp", tcp_port, 7), ("udp", udp_port, 7777)}
    guest = leased_guest(ns_guest, second)
    serve(guest, tmp_path, "echo:7", "hello:9", "udpecho:7777", name="back")
    assert echo_round_trip(tcp_port, b"restored") == b"restored"
    assert hello(cmdline_port) == f"back {GATEWAY}\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert udp_exchange(sock, udp_port, b"restored udp").startswith(b"restored udp|")
    assert refusal(gone)[0] == "refused"


# ---- end to end with the VM ------------------------------------------------------------------


def http_get(port: int, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode()


@BOTH_TRANSPORTS
def test_vm_web_page_through_a_forward(start_backend: StartBackend, vm_guest: VmGuestFactory) -> None:
    """The tiny VM in demo mode (busybox httpd on port 80) behind a forward given with --hostfwd."""
    backend = start_backend("--hostfwd", "tcp::0-:80", "--hostfwd", "tcp::0-:7")
    vm = vm_guest(backend=backend)  # no script: demo mode, serves until killed
    http, echo = added_port(backend, ":80"), added_port(backend, ":7")
    assert vm.lease(timeout=60)["ip"] == "10.0.2.15"
    vm.wait_for(r"^VPNNET-READY http=80 echo=7\n", 60)
    assert "hello from qemu-vpnnet guest" in http_get(http)
    assert echo_round_trip(echo, b"echo through the VM\n") == b"echo through the VM\n"


def test_vm_end_to_end_over_qmp(
    start_backend: StartBackend, vm_guest: VmGuestFactory, qmp: QmpFactory, vpnnet_run_dir: Path
) -> None:
    """The tiny VM in demo mode: its lease as a QMP event, its web page through a forward added
    over QMP, then the forward removed: refused, and the port free."""
    backend = start_with_qmp(start_backend, vpnnet_run_dir)
    client = qmp(backend)
    vm = vm_guest(backend=backend, mac=DEFAULT_MAC)  # no script: demo mode, serves until killed
    lease = client.event("GUEST_LEASE", timeout=60)["data"]
    assert (lease["mac"], lease["address"]) == (DEFAULT_MAC, "10.0.2.15")
    assert lease["hostname"] == "vpnnet-guest"
    port = client.execute("hostfwd-add", {"rule": "tcp::0-:80"})["host-port"]
    vm.wait_for(r"^VPNNET-READY http=80 echo=7\n", 60)
    assert "hello from qemu-vpnnet guest" in http_get(port)
    assert client.execute("query-hostfwd")[0]["accepted"] == 1
    client.execute("hostfwd-remove", {"host-port": port})
    outcome, seconds = refusal(port)
    assert (outcome, seconds < RESET_LIMIT) == ("refused", True)
    assert bind_ok(port, reuse=True)

"""Outbound TCP through the backend's splice engine, against real servers the tests start.

The guests: the tiny VM (a real virtio-net NIC; slow under TCG, so it only fetches files over
HTTP) and namespace guests (this machine's TCP stack behind QEMU's hub, at full speed), which run
this machine's python3 with integration/servers.py for their side. The servers run on the host's
loopback (the guest reaches 127.0.0.1 as the gateway 10.0.2.2) or -- the ``outside`` variants --
with the backend inside an NsHost "host" namespace, in the outside namespace at 198.18.0.2, a
destination that is not loopback. No traffic leaves the machine or the tests' namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration import servers as srv
from integration.backend import Backend
from integration.common import wait_until
from integration.fixtures import BOTH_TRANSPORTS, NsGuestFactory, NsHostFactory, StartBackend, VmGuestFactory
from integration.netns import Netns
from integration.nsguest import NsGuest
from integration.test_foundation import qmp_stats
from qemu_vpnnet.core import virtqueue

PY = sys.executable
GATEWAY = "10.0.2.2"
OUTSIDE = "198.18.0.2"
MB = 1 << 20
BIG = 200 * MB
#: How much the backend's resident memory may grow while a reader stalls a 200 MB transfer.
RSS_GROWTH_LIMIT_KIB = 100 * 1024
STALL_SECONDS = 4.0


@pytest.fixture
def servers() -> Iterator[srv.Servers]:
    s = srv.Servers()
    yield s
    s.close()


@dataclass
class Net:
    """A backend, a namespace guest with its lease, and where the test's servers live."""

    backend: Backend
    guest: NsGuest
    servers: srv.Servers
    server_ns: Netns | None  # None: the host (root namespace)
    bind: str  # the servers' address
    dest: str  # that address as the guest reaches it

    def serve(self, mode: str, *args: str | int) -> srv.Server:
        return self.servers.start(mode, self.bind, *args, ns=self.server_ns)

    def client_command(self, mode: str, port: int, *args: str) -> list[str]:
        return [PY, str(srv.SCRIPT), mode, self.dest, str(port), *args]

    def client(self, mode: str, port: int, *args: str, timeout: float = 60.0) -> dict[str, object]:
        """Run a servers.py client in the guest toward ``dest:port``; its JSON result."""
        result = self.guest.run(self.client_command(mode, port, *args), timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        value = json.loads(result.stdout)
        assert isinstance(value, dict)
        return value

    def run_in_server_ns(self, cmd: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        if self.server_ns is not None:
            return self.server_ns.run(cmd, timeout)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


MakeNet = Callable[..., Net]


@pytest.fixture
def loopback_net(start_backend: StartBackend, ns_guest: NsGuestFactory, servers: srv.Servers) -> MakeNet:
    """``make(mtu=1500)``: backend in the root namespace, servers on the host's 127.0.0.1."""

    def make(mtu: int = 1500) -> Net:
        backend = start_backend("--mtu", str(mtu))
        guest = ns_guest(backend=backend, mtu=mtu, ipv6=False)
        lease = guest.dhcp()
        assert lease["router"] == GATEWAY
        return Net(backend, guest, servers, None, "127.0.0.1", GATEWAY)

    return make


@pytest.fixture
def outside_net(
    ns_host: NsHostFactory, start_backend: StartBackend, ns_guest: NsGuestFactory, servers: srv.Servers
) -> MakeNet:
    """``make(mtu=1500)``: backend in an NsHost host namespace, servers in its outside namespace."""

    def make(mtu: int = 1500) -> Net:
        host = ns_host()
        backend = start_backend("--mtu", str(mtu), netns=host.host.name)
        guest = ns_guest(backend=backend, mtu=mtu, ipv6=False)
        guest.dhcp()
        return Net(backend, guest, servers, host.outside, OUTSIDE, OUTSIDE)

    return make


@pytest.fixture(params=["loopback", "outside"])
def any_net(request: pytest.FixtureRequest) -> MakeNet:
    """Both: the servers on the host's loopback, and outside (backend in a host namespace)."""
    make: MakeNet = request.getfixturevalue(f"{request.param}_net")
    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- the VM -----------------------------------------------------------------------------


VM_FETCH = """\
timeout 20 wget -q -O - http://10.0.2.2:{port}/hello.txt
echo "BLOB $(timeout 60 wget -q -O - http://10.0.2.2:{port}/blob.bin | sha256sum)"
timeout 20 wget -q -O /dev/null http://10.0.2.2:{port}/missing.txt
echo "MISSING rc=$?"
"""


@BOTH_TRANSPORTS
def test_vm_fetches_files_from_a_host_http_server(
    start_backend: StartBackend, vm_guest: VmGuestFactory, servers: srv.Servers, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello from the host's loopback\n")
    with open(www / "blob.bin", "wb") as f:
        for chunk in srv.pattern(2 * MB):
            f.write(chunk)
    http = servers.start("http", "127.0.0.1", "--dir", str(www))
    backend = start_backend()
    vm = vm_guest(VM_FETCH.format(port=http.port), backend=backend)
    assert vm.lease()["ip"] == "10.0.2.15"
    assert vm.wait_exit(90) == 0
    console = vm.console_text()
    assert "hello from the host's loopback\n" in console
    assert f"BLOB {srv.pattern_sha256(2 * MB)}  -\n" in console
    assert "MISSING rc=1\n" in console  # a 404 is an answer, not a hang
    print(f"VM boot, lease and fetches: {vm.elapsed:.1f} s")


VM_CHURN = """\
connloop 10.0.2.2 {port} 10 16
echo CHURN-DONE
sleep 60
"""


@BOTH_TRANSPORTS
def test_vm_connection_churn_never_wedges_the_guest(
    start_backend: StartBackend, vm_guest: VmGuestFactory, servers: srv.Servers
) -> None:
    """A new connection per request, 16 in flight for 10 s (the guest's vm-images/connloop.c):
    every one completes and the guest's network never stalls. (A kick lost while frames waited
    for RX buffers wedged a vhost-user guest this way, for good, about once a minute.)"""
    server = servers.start("banner", "127.0.0.1")  # a line, then the server's close
    backend = start_backend()
    vm = vm_guest(VM_CHURN.format(port=server.port), backend=backend, dhcp="once")
    vm.wait_for(r"^CHURN-DONE\n", 120)
    console = vm.console_text()
    m = re.search(r"^BENCH-CONN (\d+) (\d+) ([\d.]+)\n", console, re.MULTILINE)
    assert m, console[-2000:]  # (no connloop: the image was built without gcc)
    completed, failed, seconds = int(m.group(1)), int(m.group(2)), float(m.group(3))
    print(f"{completed} connections in {seconds:.1f} s, {failed} failed")
    assert failed == 0 and completed >= 1000, m.group(0)
    assert seconds < 13, m.group(0)  # the last ones finished at once, none waited for a kick


# ---- throughput and integrity -------------------------------------------------------------


VM_BOTH_WAYS = """\
start=$(date +%s)
timeout 150 wget -q -O /tmp/big.bin http://10.0.2.2:{http}/big.bin
echo "DOWN $(sha256sum < /tmp/big.bin) in $(($(date +%s) - start)) s"
httpd -p 8080 -h /tmp && echo UP-READY
sleep 300
"""


@pytest.mark.parametrize("vm_transport", ["vhost-user"], indirect=True)
def test_vm_200_mb_each_way_with_matching_sha256(
    start_backend: StartBackend, vm_guest: VmGuestFactory, servers: srv.Servers, tmp_path: Path
) -> None:
    """A real VM downloads 200 MB from a host web server and checks it; then the host fetches the
    same file back from the guest's web server through a forward and checks it: TCP both ways
    through the guest's own stack and NIC, byte for byte in order (the pattern differs in every
    block). On vhost-user, with its 64 KiB segments both ways; the stream socket's 200 MB runs
    are the namespace guests' (test_200_mb_each_way_with_matching_sha256), and a VM's fetch over
    it is test_vm_fetches_files_from_a_host_http_server (22 s more under TCG for little news)."""
    www = tmp_path / "www"
    www.mkdir()
    with open(www / "big.bin", "wb") as f:
        for chunk in srv.pattern(BIG):
            f.write(chunk)
    http = servers.start("http", "127.0.0.1", "--dir", str(www))
    port = free_port()
    qmp_path = tmp_path / "qmp.sock"
    backend = start_backend("--hostfwd", f"tcp:127.0.0.1:{port}-:8080", "--qmp", f"unix:{qmp_path}")
    vm = vm_guest(VM_BOTH_WAYS.format(http=http.port), backend=backend, dhcp="once", memory_mb=512)
    down = vm.wait_for(r"^DOWN (\S+)  - in (\d+) s\n", 200)
    assert down.group(1) == srv.pattern_sha256(BIG), vm.console_text()[-2000:]
    # the download went straight from the send buffers into the guest's RX buffers (when built
    # with core/_vring.c): at least one 64 KiB segment each
    counters = qmp_stats(qmp_path)["counters"]
    assert isinstance(counters, dict)
    if virtqueue.HAVE_RX_FILL:
        assert counters.get("tx-direct-segments", 0) >= BIG // (64 * 1024), counters
    vm.wait_for(r"^UP-READY\n", 20)
    started = time.monotonic()
    size, sha = srv.http_fetch_sha256("127.0.0.1", port, "/big.bin")
    up_seconds = time.monotonic() - started
    assert (size, sha) == (BIG, srv.pattern_sha256(BIG))
    print(f"200 MB down {down.group(2)} s, up {up_seconds:.1f} s")
    vm.kill()


def wait_listening(net: Net, port: int) -> None:
    def listening() -> bool:
        return bool(net.run_in_server_ns(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip())

    assert wait_until(listening, 10), f"nothing listens on port {port}"


def test_iperf3_both_directions(any_net: MakeNet) -> None:
    net = any_net()
    port = free_port() if net.server_ns is None else 5201
    net.servers.start_command(["iperf3", "-s", "-B", net.bind, "-p", str(port)], ns=net.server_ns)
    wait_listening(net, port)
    for reverse in (False, True):
        cmd = ["iperf3", "-c", net.dest, "-p", str(port), "-t", "3", "-J", *(["-R"] if reverse else [])]
        result = net.guest.run(cmd, timeout=30)
        report = json.loads(result.stdout)
        assert result.returncode == 0 and "error" not in report, result.stdout[-2000:] + result.stderr
        end = report["end"]
        received = end["sum_received"]["bytes"]
        gbps = end["sum_received"]["bits_per_second"] / 1e9
        direction = "host->guest" if reverse else "guest->host"
        print(f"iperf3 {direction} to {net.dest}: {gbps:.2f} Gbit/s ({received / MB:.0f} MiB)")
        assert received > 0 and gbps > 0


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_200_mb_each_way_with_matching_sha256(any_net: MakeNet, mtu: int) -> None:
    net = any_net(mtu)
    assert net.guest.run(["cat", f"/sys/class/net/{net.guest.ifname}/mtu"]).stdout.strip() == str(mtu)
    expected = srv.pattern_sha256(BIG)
    sink = net.serve("sink")
    up = net.client("send", sink.port, str(BIG), timeout=90)
    assert up["reply"] == {"bytes": BIG, "sha256": expected}
    source = net.serve("source", BIG)
    down = net.client("recv", source.port, timeout=90)
    assert (down["bytes"], down["sha256"]) == (BIG, expected)
    print(
        f"MTU {mtu} via {net.dest}: guest->host {BIG * 8 / float(up['seconds']) / 1e9:.2f} Gbit/s, "  # type: ignore[arg-type]
        f"host->guest {BIG * 8 / float(down['seconds']) / 1e9:.2f} Gbit/s"  # type: ignore[arg-type]
    )


def tcp_ext_counters(guest: NsGuest) -> dict[str, int]:
    """The guest namespace's TcpExt counters (its kernel's /proc/net/netstat)."""
    lines = [line.split() for line in guest.run(["cat", "/proc/net/netstat"], check=True).stdout.splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names[0] == "TcpExt:":
            return {name: int(value) for name, value in zip(names[1:], values[1:], strict=True)}
    raise AssertionError("no TcpExt counters in the guest namespace")


def test_segments_lost_on_the_guest_side_are_recovered_with_sack(loopback_net: MakeNet) -> None:
    """A TAP queue of 64 frames drops guest->host segments whenever QEMU falls behind. The
    guest's kernel must recover them through the SACK blocks in our ACKs (SACK recovery, never
    Reno recovery), and every byte must arrive intact. (A lost retransmission at the tail may
    still end in a timeout now and then: at this loss rate that is no fault of the receiver.)"""
    net = loopback_net()
    net.guest.run(["ip", "link", "set", net.guest.ifname, "txqueuelen", "64"], check=True)
    size = 50 * MB
    before = tcp_ext_counters(net.guest)
    sink = net.serve("sink")
    up = net.client("send", sink.port, str(size), timeout=90)
    assert up["reply"] == {"bytes": size, "sha256": srv.pattern_sha256(size)}
    after = tcp_ext_counters(net.guest)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    dropped = int(net.guest.run(["cat", f"/sys/class/net/{net.guest.ifname}/statistics/tx_dropped"]).stdout)
    print(f"TAP drops {dropped}; guest recoveries: SACK {delta['TCPSackRecovery']}, Reno {delta['TCPRenoRecovery']}")
    assert dropped > 0, "the short TAP queue dropped nothing: the test did not exercise recovery"
    assert delta["TCPSackRecovery"] > 0 and delta["TCPRenoRecovery"] == 0


def test_host_to_guest_data_lost_on_its_way_in_is_recovered_quickly(loopback_net: MakeNet) -> None:
    """1% of the TCP segments reaching the guest's kernel dropped (nftables in its namespace):
    our side resends the holes the guest's SACK blocks show, and resends lost retransmissions on
    its recovery timer, rather than waiting out 200 ms retransmission timeouts (which made this
    20 MB take about 20 s)."""
    net = loopback_net()
    rules = [
        ["nft", "add", "table", "inet", "lossy"],
        ["nft", "add chain inet lossy in { type filter hook input priority 0; }"],
        ["nft", "add rule inet lossy in meta l4proto tcp numgen random mod 100 < 1 counter drop"],
    ]
    for rule in rules:
        result = net.guest.run(rule)
        assert result.returncode == 0, result.stderr
    size = 20 * MB
    source = net.serve("source", size)
    down = net.client("recv", source.port, timeout=90)
    assert (down["bytes"], down["sha256"]) == (size, srv.pattern_sha256(size))
    listing = net.guest.run(["nft", "list", "table", "inet", "lossy"]).stdout
    match = re.search(r"packets (\d+)", listing)
    assert match, listing
    print(f"20 MB host->guest, {match.group(1)} segments dropped, in {float(down['seconds']):.2f} s")  # type: ignore[arg-type]
    assert int(match.group(1)) > 0
    assert float(down["seconds"]) < 8.0  # type: ignore[arg-type]


# ---- many connections ---------------------------------------------------------------------


def test_500_concurrent_connections(loopback_net: MakeNet) -> None:
    net = loopback_net()
    echo = net.serve("echo")
    fds_before = open_fds(net.backend.pid)
    result = net.client("many", echo.port, "500", timeout=90)
    assert result["errors"] == [] and result["ok"] == 500, result
    print(f"500 concurrent echo connections in {result['seconds']:.2f} s")
    # every host socket is closed again once the guest's connections are
    assert wait_until(lambda: open_fds(net.backend.pid) <= fds_before + 2, 15), (
        f"backend fds: {fds_before} before, {open_fds(net.backend.pid)} after"
    )


# ---- half-close, refusal, reset -----------------------------------------------------------


def test_guest_half_closes_and_still_gets_the_reply(any_net: MakeNet) -> None:
    net = any_net()
    server = net.serve("reply-after-eof")
    request = b"request " * 1000
    result = net.client("half-close", server.port, timeout=30)
    assert result["reply"] == f"got {len(request)} bytes sha256 {hashlib.sha256(request).hexdigest()}"


def test_server_half_closes_and_still_gets_the_guests_data(any_net: MakeNet) -> None:
    net = any_net()
    server = net.serve("close-first")
    size = 3 * MB
    result = net.client("after-peer-eof", server.port, str(size), timeout=30)
    assert result["greeting"] == "server-greeting\n"
    line = server.wait_line("RESULT ", 20)
    assert json.loads(line.removeprefix("RESULT ")) == {"bytes": size, "sha256": srv.pattern_sha256(size)}


def test_server_that_speaks_first(any_net: MakeNet) -> None:
    """A server that sends as soon as it accepts (SMTP, SSH, FTP banners): its data can reach the
    backend before the guest's handshake is complete, and must arrive whole."""
    net = any_net()
    server = net.serve("banner")
    result = net.client("greetings", server.port, "40", timeout=60)
    assert result["greetings"] == {"server-banner\n": 40}


def test_closed_port_is_refused_within_100_ms(any_net: MakeNet) -> None:
    net = any_net()
    port = free_port() if net.server_ns is None else 9
    times = []
    for _ in range(3):
        result = net.client("connect-time", port, timeout=20)
        assert result["result"] == "ECONNREFUSED", result
        times.append(float(result["ms"]))  # type: ignore[arg-type]
    print(f"connect() to a closed port at {net.dest}: refused after {', '.join(f'{t:.1f}' for t in times)} ms")
    assert max(times) < 100


def test_server_reset_mid_transfer_reaches_the_guest(any_net: MakeNet) -> None:
    net = any_net()
    server = net.serve("reset", 8 * MB)
    # The guest does not read for a moment: the server's data is still in flight when it resets.
    result = net.client("read-until-error", server.port, "--delay", "0.5", timeout=30)
    server.wait_line("RESET")
    assert result["error"] == "ECONNRESET", result
    assert float(result["seconds"]) < 10  # type: ignore[arg-type]
    assert int(result["bytes"]) <= 8 * MB  # type: ignore[call-overload]


# ---- slow readers -------------------------------------------------------------------------


def watch_rss(net: Net, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> tuple[int, dict[str, object]]:
    """Sample the backend's RSS until the guest's client ``proc`` ends; (max KiB, its result)."""
    peak = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        peak = max(peak, rss_kib(net.backend.pid))
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the guest's transfer did not end within {timeout} s")
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, out.decode() + err.decode()
    result = json.loads(out)
    assert isinstance(result, dict)
    return peak, result


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_host_reader_stalls_and_backend_memory_stays_bounded(loopback_net: MakeNet, mtu: int) -> None:
    net = loopback_net(mtu)
    sink = net.serve("sink", "--pause", str(STALL_SECONDS))
    before = rss_kib(net.backend.pid)
    proc = net.guest.popen(
        net.client_command("send", sink.port, str(BIG)), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak, result = watch_rss(net, proc)
    print(f"MTU {mtu}, host reader stalled {STALL_SECONDS} s: backend RSS {before} KiB, peak {peak} KiB")
    assert result["reply"] == {"bytes": BIG, "sha256": srv.pattern_sha256(BIG)}
    assert float(result["seconds"]) >= STALL_SECONDS  # type: ignore[arg-type]
    assert peak - before < RSS_GROWTH_LIMIT_KIB


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_guest_reader_stalls_and_backend_memory_stays_bounded(loopback_net: MakeNet, mtu: int) -> None:
    net = loopback_net(mtu)
    source = net.serve("source", BIG)
    before = rss_kib(net.backend.pid)
    proc = net.guest.popen(
        net.client_command("recv", source.port, "--delay", str(STALL_SECONDS)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak, result = watch_rss(net, proc)
    print(f"MTU {mtu}, guest reader stalled {STALL_SECONDS} s: backend RSS {before} KiB, peak {peak} KiB")
    assert (result["bytes"], result["sha256"]) == (BIG, srv.pattern_sha256(BIG))
    assert peak - before < RSS_GROWTH_LIMIT_KIB


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("busy_poll", ["200", "0"])
def test_request_reply_round_trips_then_an_idle_backend_sleeps(
    start_backend: StartBackend, ns_guest: NsGuestFactory, servers: srv.Servers, busy_poll: str
) -> None:
    """Small request/reply traffic (where --busy-poll keeps polling between a request and its
    reply) arrives intact, and once it stops the backend uses no CPU: polling never outlives the
    traffic."""
    backend = start_backend("--busy-poll", busy_poll)
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    net = Net(backend, guest, servers, None, "127.0.0.1", GATEWAY)
    server = net.serve("echo")
    result = net.client("ping-pong", server.port, "3000", timeout=60)
    assert result["rounds"] == 3000
    print(f"--busy-poll {busy_poll}: median round trip {result['median_us']} us")
    time.sleep(0.5)
    before = cpu_seconds(backend.pid)
    time.sleep(2.0)
    idle_cpu = cpu_seconds(backend.pid) - before
    assert idle_cpu < 0.1, f"the backend used {idle_cpu:.2f} s of CPU in 2 s without traffic"

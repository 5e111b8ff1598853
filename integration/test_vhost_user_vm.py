"""vhost-user with a real VM beyond the tests run on both transports: a backend restarted under a
running QEMU (``reconnect=``), and a guest whose NIC refuses the offloads.

The VM tests that run over the stream socket and vhost-user alike are marked ``@BOTH_TRANSPORTS``
(test_foundation, test_tcp_outbound, test_forwarding, test_ipv6, test_policy); hostile
front-ends are in test_vhost_user_hostile.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest

from integration import servers as srv
from integration.fixtures import StartBackend, VmGuestFactory
from integration.test_foundation import qmp_stats
from integration.vmguest import DEFAULT_MAC, default_accel, vhost_user_args

MB = 1 << 20
PING_LOOP = """\
i=0
while [ $i -lt 120 ]; do
    if ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; then echo "PING-OK $i"; else echo "PING-FAIL $i"; fi
    i=$((i + 1))
    sleep 0.3
done
"""


def nic_args(path: Path, *, reconnect: bool = False, device_extra: str = "") -> list[str]:
    args = vhost_user_args(path, 256, DEFAULT_MAC, default_accel())
    if reconnect:
        i = args.index("-chardev") + 1
        args[i] += ",reconnect=1"
    if device_extra:
        i = len(args) - 1
        args[i] += "," + device_extra
    return args


@pytest.fixture
def servers() -> Iterator[srv.Servers]:
    servers = srv.Servers()
    yield servers
    servers.close()


def pattern_server(servers: srv.Servers, tmp_path: Path, size: int) -> srv.Server:
    """An HTTP server on 127.0.0.1 whose /f.bin is size bytes of the test pattern."""
    www = tmp_path / "www"
    www.mkdir()
    with open(www / "f.bin", "wb") as f:
        for chunk in srv.pattern(size):
            f.write(chunk)
    return servers.start("http", "127.0.0.1", "--dir", str(www))


def wait_for_socket(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_backend_restart_under_a_running_vm(
    start_backend: StartBackend, vm_guest: VmGuestFactory, vpnnet_run_dir: Path
) -> None:
    """QEMU's chardev with reconnect=1: the backend goes away (the guest's pings fail) and a new
    one comes up on the same socket; QEMU connects again, sets the device up afresh (rings
    resumed where the guest's used ring stands) and the guest's pings answer again."""
    path = vpnnet_run_dir / "restart.vu"
    first = start_backend("--vhost-user", str(path))
    vm = vm_guest(PING_LOOP, dhcp="once", qemu_args=nic_args(path, reconnect=True))
    vm.wait_for(r"^PING-OK \d+\n", 60)
    first.stop()
    failed = vm.wait_for(r"^PING-FAIL \d+\n", 20)
    second = start_backend("--vhost-user", str(path))
    back = vm.wait_for(r"^PING-OK (\d+)\n", 30, pos=failed.end())
    second.wait_for_log(r"guest connected: port=\d+ vhost-user", 5)
    print(f"pings answered again at round {back.group(1)}, after the backend restart")
    vm.kill()


GUEST_FETCH = """\
wget -q -O /tmp/f http://10.0.2.2:{http}/f.bin && echo "DOWN $(sha256sum < /tmp/f)"
httpd -p 8080 -h /tmp && echo UP-READY
sleep 120
"""


def test_a_guest_that_refuses_the_offloads_still_works(
    start_backend: StartBackend, vm_guest: VmGuestFactory, servers: srv.Servers, vpnnet_run_dir: Path, tmp_path: Path
) -> None:
    """The NIC with csum=off,guest_csum=off (so no TSO either way): the offloads are negotiated
    away, plain 1500-byte frames with full checksums both ways, 20 MB each way intact."""
    size = 20 * MB
    http = pattern_server(servers, tmp_path, size)
    path = vpnnet_run_dir / "plain.vu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = start_backend("--vhost-user", str(path), "--hostfwd", f"tcp:127.0.0.1:{port}-:8080")
    wait_for_socket(path)
    vm = vm_guest(
        GUEST_FETCH.format(http=http.port),
        dhcp="once",
        qemu_args=nic_args(path, device_extra="csum=off,guest_csum=off"),
    )
    down = vm.wait_for(r"^DOWN (\S+)  -\n", 90)
    assert down.group(1) == srv.pattern_sha256(size)
    vm.wait_for(r"^UP-READY\n", 20)
    assert srv.http_fetch_sha256("127.0.0.1", port, "/f") == (size, srv.pattern_sha256(size))
    assert not re.search(r"drop-vhost|dropping this device", backend.log_text())
    vm.kill()


def test_a_capture_sees_every_segment_toward_a_vhost_user_guest(
    start_backend: StartBackend, vm_guest: VmGuestFactory, servers: srv.Servers, vpnnet_run_dir: Path, tmp_path: Path
) -> None:
    """TCP segments toward a vhost-user guest skip the switch's queues (written straight into its
    RX buffers) unless a capture watches: with --pcap every payload byte of a download is in the
    file (the 64 KiB GSO segments as they are), and none went the direct way."""
    size = 4 * MB
    http = pattern_server(servers, tmp_path, size)
    path = vpnnet_run_dir / "capture.vu"
    pcap = tmp_path / "down.pcap"
    qmp_path = vpnnet_run_dir / "capture-vu.qmp"
    backend = start_backend(
        "--vhost-user", str(path), "--pcap", str(pcap), "--qmp", f"unix:{qmp_path}", "--writable", str(tmp_path)
    )
    wait_for_socket(path)
    vm = vm_guest(GUEST_FETCH.format(http=http.port), dhcp="once", qemu_args=nic_args(path))
    down = vm.wait_for(r"^DOWN (\S+)  -\n", 90)
    assert down.group(1) == srv.pattern_sha256(size)
    counters = qmp_stats(qmp_path)["counters"]
    assert isinstance(counters, dict) and "tx-direct-segments" not in counters, counters
    vm.kill()
    assert backend.stop() == 0  # the capture is written out and closed
    payload = 0
    largest = 0
    with open(pcap, "rb") as f:
        for _, data in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(data)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP) and ip.data.sport == http.port:
                payload += len(ip.data.data)
                largest = max(largest, len(data))
    assert payload >= size, payload  # (the response's headers too)
    assert largest > 1514, largest  # the guest took TSO segments, and the file holds them whole

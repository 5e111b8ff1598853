"""Foundation of the backend, with real QEMU guests: DHCP leases and renewal, several guests on
one switched segment, every QEMU-side transport, robustness against malformed input on the QEMU
socket, start-up errors and a clean stop on SIGTERM.

VM guests (the tiny TCG VM, a real virtio-net NIC) cover what a real guest sees (its lease, its
eth0); namespace guests (QEMU's hub bridging a TAP) are the fast guests. Servers the tests need
come from integration/servers.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration import servers as srv
from integration.backend import Backend
from integration.common import REPO_ROOT, wait_until
from integration.fixtures import BOTH_TRANSPORTS, NsGuestFactory, NsHostFactory, StartBackend, VmGuestFactory
from integration.nsguest import NsGuest

PY = sys.executable
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
OUTSIDE = "198.18.0.2"
MB = 1 << 20


@pytest.fixture
def servers() -> Iterator[srv.Servers]:
    s = srv.Servers()
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def guest_mtu(guest: NsGuest) -> int:
    return int(guest.run(["cat", f"/sys/class/net/{guest.ifname}/mtu"], check=True).stdout)


def transfer(guest: NsGuest, dest: str, port: int, size: int) -> None:
    """Send ``size`` bytes from the guest to a sink server at ``dest:port``; check its digest."""
    result = guest.run([PY, str(srv.SCRIPT), "send", dest, str(port), str(size)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["reply"] == {"bytes": size, "sha256": srv.pattern_sha256(size)}


# ---- DHCP: the VM's lease --------------------------------------------------------------------

VM_SHOW = """\
ip -4 addr show eth0
ip link show eth0
ip route
cat /etc/resolv.conf
ping -c 2 -W 3 {gateway} && echo GATEWAY-PING-OK
ping -c 1 -W 3 -s {size} {gateway} && echo BIG-PING-OK
"""


@BOTH_TRANSPORTS
def test_vm_gets_the_default_lease(start_backend: StartBackend, vm_guest: VmGuestFactory) -> None:
    backend = start_backend()
    vm = vm_guest(VM_SHOW.format(gateway=GATEWAY, size=1400), backend=backend)
    lease = vm.lease()
    assert lease["event"] == "bound"
    assert (lease["ip"], lease["mask"], lease["router"], lease["dns"]) == ("10.0.2.15", "24", GATEWAY, DNS)
    assert lease["mtu"] == "1500"
    assert lease["lease"] == "86400"
    assert lease["serverid"] == GATEWAY
    assert vm.wait_exit(60) == 0
    console = vm.console_text()
    assert "inet 10.0.2.15/24" in console
    assert "mtu 1500 " in console
    assert f"default via {GATEWAY} dev eth0" in console
    assert f"nameserver {DNS}" in console
    assert "GATEWAY-PING-OK" in console and "BIG-PING-OK" in console
    backend.wait_for_log(r"lease: 52:54:00:12:34:56 -> 10\.0\.2\.15")


@BOTH_TRANSPORTS
def test_vm_lease_follows_net_and_mtu_options(start_backend: StartBackend, vm_guest: VmGuestFactory) -> None:
    backend = start_backend("--net", "10.9.8.0/24", "--mtu", "9000", "--lease-time", "3600")
    # A jumbo ping (8000 bytes of data) must come back in one frame: eth0 really is at 9000.
    vm = vm_guest(VM_SHOW.format(gateway="10.9.8.2", size=8000), backend=backend)
    lease = vm.lease()
    assert (lease["ip"], lease["mask"], lease["router"], lease["dns"]) == ("10.9.8.15", "24", "10.9.8.2", "10.9.8.3")
    assert lease["mtu"] == "9000"
    assert lease["lease"] == "3600"
    assert vm.wait_exit(60) == 0
    console = vm.console_text()
    assert "inet 10.9.8.15/24" in console
    assert "mtu 9000 " in console
    assert "default via 10.9.8.2 dev eth0" in console
    assert "nameserver 10.9.8.3" in console
    assert "GATEWAY-PING-OK" in console and "BIG-PING-OK" in console


def test_vm_renews_its_lease_and_keeps_its_address(start_backend: StartBackend, vm_guest: VmGuestFactory) -> None:
    backend = start_backend("--lease-time", "8")
    # udhcpc stays in the background (dhcp="bg"). busybox 1.35 takes any lease under 30 s as 30 s
    # and renews at half of it; SIGUSR1 makes it renew (the same unicast REQUEST) at once instead.
    vm = vm_guest("sleep 1; kill -USR1 $(pidof udhcpc); sleep 40\n", backend=backend)
    first = vm.lease()
    assert (first["event"], first["ip"], first["lease"]) == ("bound", "10.0.2.15", "8")
    vm.wait_for(r"^VPNNET-LEASE .*event=renew\n", 25)
    renewals = [lease for lease in vm.leases() if lease["event"] == "renew"]
    assert renewals and all(r["ip"] == "10.0.2.15" and r["lease"] == "8" for r in renewals)
    print(f"renewed {vm.elapsed:.1f} s after QEMU started")


# ---- several guests on one segment ---------------------------------------------------------


def test_two_namespace_guests_get_different_addresses_and_reach_each_other(
    start_backend: StartBackend, ns_guest: NsGuestFactory
) -> None:
    backend = start_backend()
    a = ns_guest(backend=backend, ipv6=False)
    b = ns_guest(backend=backend, ipv6=False)
    lease_a, lease_b = a.dhcp(), b.dhcp()
    assert lease_a["ip"] != lease_b["ip"]
    assert {lease_a["ip"], lease_b["ip"]} == {"10.0.2.15", "10.0.2.16"}
    for guest, peer in ((a, lease_b["ip"]), (b, lease_a["ip"])):
        for addr in (peer, GATEWAY):
            ping = guest.ping(addr, count=2)
            assert ping.returncode == 0, ping.stdout + ping.stderr
    # the second DHCP round gives each its own address again
    assert a.dhcp()["ip"] == lease_a["ip"] and b.dhcp()["ip"] == lease_b["ip"]


def test_stream_socket_toward_qemu_gets_a_large_send_buffer(
    start_backend: StartBackend, ns_guest: NsGuestFactory
) -> None:
    """The backend's connected stream socket holds 4 MiB toward QEMU (ss shows the kernel's
    doubled value): with the default ~208 KiB, host->guest writes end short and wait."""
    backend = start_backend()
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    out = subprocess.run(["ss", "-xmpn"], capture_output=True, text=True, check=True).stdout
    send_buffers = [
        int(m.group(1))
        for block in out.split("\nu_str")
        if f"pid={backend.pid}," in block
        for m in [re.search(r"skmem:\([^)]*\btb(\d+)", block)]
        if m
    ]
    assert send_buffers and max(send_buffers) >= 8 << 20, out


VM_PEER = """\
ping -c 2 -W 3 {peer} && echo PEER-PING-OK
ping -c 1 -W 3 10.0.2.2 && echo GATEWAY-PING-OK
echo "TO-PEER $(dd if=/dev/zero bs=64k count={blocks} 2>/dev/null | timeout 60 nc {peer} {port})"
dd if=/dev/zero of=/tmp/f bs=64k count={blocks} 2>/dev/null && httpd -p 8080 -h /tmp && echo HTTPD-READY
sleep 60
"""
PEER_BLOCKS = 96  # 6 MiB: about a hundred 64 KiB TSO segments (busybox nc copies slowly under TCG)
PEER_BYTES = PEER_BLOCKS * 65536


@BOTH_TRANSPORTS
def test_vm_and_namespace_guest_on_one_backend(
    start_backend: StartBackend, ns_guest: NsGuestFactory, vm_guest: VmGuestFactory, servers: srv.Servers
) -> None:
    """A VM and a namespace guest on one switch: ping each other, and 6 MiB of TCP each way
    between them. Over vhost-user the VM's NIC hands us 64 KiB TSO segments with partial
    checksums, which the switch must cut and complete for the namespace guest's stream link
    (its kernel drops a frame with a bad checksum), and the namespace guest's frames fill the
    VM's mergeable RX buffers."""
    backend = start_backend()
    ns = ns_guest(backend=backend, ipv6=False)
    ns_ip = ns.dhcp()["ip"]
    sink = servers.start("sink", ns_ip, ns=ns)
    vm = vm_guest(VM_PEER.format(peer=ns_ip, port=sink.port, blocks=PEER_BLOCKS), backend=backend)
    vm_ip = vm.lease()["ip"]
    assert vm_ip != ns_ip and vm_ip.startswith("10.0.2.")
    vm.wait_for(r"^GATEWAY-PING-OK\n", 30)
    ping = ns.ping(vm_ip, count=2)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "PEER-PING-OK" in vm.console_text()
    sent = vm.wait_for(r"^TO-PEER (.*)\n", 90)
    zeros = hashlib.sha256(bytes(PEER_BYTES)).hexdigest()
    assert json.loads(sent.group(1)) == {"bytes": PEER_BYTES, "sha256": zeros}
    vm.wait_for(r"^HTTPD-READY\n", 30)
    fetch = (
        "import hashlib, urllib.request, sys; "
        f"d = urllib.request.urlopen('http://{vm_ip}:8080/f', timeout=60).read(); "
        "print(len(d), hashlib.sha256(d).hexdigest())"
    )
    got = ns.run([PY, "-c", fetch], timeout=90)
    assert got.returncode == 0, got.stdout + got.stderr
    assert got.stdout.split() == [str(PEER_BYTES), zeros]
    vm.kill()  # the script only sleeps now


# ---- transports -------------------------------------------------------------------------------


def transport_guest(
    kind: str, start_backend: StartBackend, ns_guest: NsGuestFactory, run_dir: Path
) -> tuple[Backend, NsGuest]:
    """A backend and a namespace guest connected over transport ``kind``."""
    if kind == "socket":
        backend = start_backend()
        return backend, ns_guest(backend=backend, ipv6=False)
    if kind == "listen-tcp":
        port = free_port()
        backend = start_backend("--listen-tcp", f"127.0.0.1:{port}")
        backend.wait_for_log(r"serving net=")
        return backend, ns_guest(netdev=f"socket,connect=127.0.0.1:{port}", ipv6=False)
    if kind == "dgram":
        path = run_dir / f"dgram-{os.getpid()}-{time.monotonic_ns()}.sock"
        qemu_path = path.with_suffix(".qemu")
        backend = start_backend("--dgram", str(path))
        backend.wait_for_log(r"serving net=")
        netdev = f"dgram,local.type=unix,local.path={qemu_path},remote.type=unix,remote.path={path}"
        return backend, ns_guest(netdev=netdev, ipv6=False)
    if kind == "connect":
        path = run_dir / f"qemu-listens-{os.getpid()}-{time.monotonic_ns()}.sock"
        guest = ns_guest(netdev=f"stream,server=on,addr.type=unix,addr.path={path}", ipv6=False)
        assert wait_until(path.exists, 10), f"QEMU did not create {path}"
        backend = start_backend("--connect", str(path))
        backend.wait_for_log(r"guest connected: port=\d+ stream connect=", 10)
        return backend, guest
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["socket", "listen-tcp", "dgram", "connect"])
def test_namespace_guest_over_each_transport(
    kind: str,
    start_backend: StartBackend,
    ns_guest: NsGuestFactory,
    servers: srv.Servers,
    vpnnet_run_dir: Path,
) -> None:
    backend, guest = transport_guest(kind, start_backend, ns_guest, vpnnet_run_dir)
    lease = guest.dhcp()
    assert (lease["ip"], lease["router"], lease["dns"]) == ("10.0.2.15", GATEWAY, DNS)
    ping = guest.ping(GATEWAY, count=3)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    sink = servers.start("sink", "127.0.0.1")
    transfer(guest, GATEWAY, sink.port, 20 * MB)
    # SIGTERM: exit status 0, and the socket files the backend made are gone (not QEMU's)
    args = backend.args
    paths = [backend.socket_path, *(Path(args[i + 1]) for i, a in enumerate(args) if a == "--dgram")]
    assert all(p.exists() for p in paths)
    assert stop_with_sigterm(backend) == 0, backend.log_text()[-3000:]
    assert [p for p in paths if p.exists()] == []


# ---- malformed input on the QEMU socket ---------------------------------------------------

RAW_MAC = bytes.fromhex("525400eeee01")
BROADCAST = b"\xff" * 6


def framed(frame: bytes) -> bytes:
    return len(frame).to_bytes(4, "big") + frame


def eth(payload: bytes, ethertype: int = 0x0800, dst: bytes = BROADCAST) -> bytes:
    return dst + RAW_MAC + ethertype.to_bytes(2, "big") + payload


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    payload: bytes,
    proto: int,
    dst: str = GATEWAY,
    *,
    ihl: int = 5,
    version: int = 4,
    total: int | None = None,
    frag: int = 0,
    good_checksum: bool = True,
) -> bytes:
    length = ihl * 4 + len(payload) if total is None else total
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (version << 4) | ihl,
        0,
        length & 0xFFFF,
        0x1234,
        frag,
        64,
        proto,
        0,
        socket.inet_aton("10.0.2.99"),
        socket.inet_aton(dst),
    )
    header += b"\0" * max(0, ihl * 4 - 20)
    cks = checksum(header[:20]) if good_checksum else 0xBEEF
    return header[:10] + cks.to_bytes(2, "big") + header[12:] + payload


def garbage_frames(rng: random.Random) -> list[bytes]:
    """Truncated, inconsistent and random frames, each of which a backend must drop or answer.
    Every IPv4 destination is the gateway or the DNS address (the backend runs in a test namespace
    anyway)."""
    frames = [
        b"\x01",
        b"\0" * 5,
        BROADCAST + RAW_MAC,  # 12 bytes: no EtherType
        eth(b"", 0x0800),  # an Ethernet header and nothing else
        eth(b"", 0x0806),
        eth(b"", 0x86DD),
        eth(b"\x45\x00", 0x0800),  # a 2-byte IPv4 header
        eth(b"\x00\x01\x08\x00\x06", 0x0806),  # truncated ARP
        eth(b"\x00\x01\x08\x00\x10\x10\x00\x01" + b"\0" * 20, 0x0806),  # ARP with absurd address sizes
        eth(ipv4(b"", 6, version=6)),  # version 6 in an IPv4 EtherType
        eth(ipv4(b"", 6, ihl=3)),  # header shorter than 20 bytes
        eth(ipv4(b"", 6, ihl=15)),  # header longer than the frame
        eth(ipv4(b"\0" * 8, 17, total=1400)),  # total length beyond the frame
        eth(ipv4(b"\0" * 8, 17, total=10)),  # total length shorter than the header
        eth(ipv4(b"\0" * 8, 1, good_checksum=False)),  # bad header checksum
        eth(ipv4(b"\x08\x00", 1)),  # ICMP echo of 2 bytes
        eth(ipv4(b"\x08\x00\x00\x00", 1, dst=DNS)),  # ICMP echo without id/seq
        eth(ipv4(b"\x12\x34\x00", 6)),  # TCP header of 3 bytes
        eth(ipv4(struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0xF0, 0x02, 1024, 0, 0), 6)),  # data offset 60 > 20
        eth(ipv4(struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x10, 0x02, 1024, 0, 0), 6)),  # data offset 4 < 5
        eth(ipv4(struct.pack("!HHHH", 68, 67, 500, 0) + b"\x01", 17, dst="255.255.255.255")),  # UDP length lies
        eth(ipv4(struct.pack("!HHHH", 68, 67, 4, 0), 17)),  # UDP length shorter than its header
        eth(ipv4(b"\x00\x35", 17, dst=DNS)),  # 2 bytes of UDP header
        eth(ipv4(b"\0" * 40, 6, frag=0x2000)),  # first fragment (MF) of a TCP segment
        eth(ipv4(b"\0" * 40, 17, frag=0x0010)),  # a later fragment, alone
    ]
    # DHCP: too short, a wrong magic cookie, options running past the end, an endless pad run
    bootp = bytes([1, 1, 6, 0]) + b"\x12\x34\x56\x78" + b"\0" * 20 + RAW_MAC + b"\0" * 202
    cookie = b"\x63\x82\x53\x63"
    for dhcp in (
        bootp[:100],
        bootp + b"\xde\xad\xbe\xef" + b"\x35\x01\x01\xff",
        bootp + cookie + b"\x35\x01\x01\x37\xff\x01",
        bootp + cookie + b"\x35\x01",
        bootp + cookie + b"\x35\x00\x32\x03\x0a\x00",
        bootp + cookie + b"\0" * 300,
    ):
        udp = struct.pack("!HHHH", 68, 67, 8 + len(dhcp), 0) + dhcp
        frames.append(eth(ipv4(udp, 17, dst="255.255.255.255")))
    # DNS: a short header, 65535 questions, a label past the end, a compression pointer loop
    for dns in (
        b"\x12",
        b"\x12\x34\x01\x00\xff\xff\x00\x00\x00\x00\x00\x00",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x04test\x00",  # no type/class
    ):
        udp = struct.pack("!HHHH", 33333, 53, 8 + len(dns), 0) + dns
        frames.append(eth(ipv4(udp, 17, dst=DNS)))
    # random bytes: runts and full-size frames, IPv4 or another EtherType, to the gateway's segment
    for _ in range(300):
        size = rng.choice([rng.randrange(0, 60), rng.randrange(60, 1515)])
        ethertype = rng.choice([0x0800, 0x0806, 0x86DD, 0x8100, rng.randrange(0x0600, 0x10000)])
        payload = rng.randbytes(size)
        if ethertype == 0x0800 and size >= 20:  # keep the destination inside the virtual network
            payload = payload[:16] + socket.inet_aton(rng.choice([GATEWAY, DNS])) + payload[20:]
        frames.append(eth(payload, ethertype, dst=rng.choice([BROADCAST, rng.randbytes(6)])))
    return frames


def arp_request(target: str) -> bytes:
    arp = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        1,
        RAW_MAC,
        socket.inet_aton("10.0.2.99"),
        b"\0" * 6,
        socket.inet_aton(target),
    )
    return eth(arp, 0x0806)


def read_frames(conn: socket.socket, until: Callable[[bytes], bool], timeout: float = 5.0) -> bool:
    """Read length-prefixed frames until one satisfies ``until`` (True) or EOF/timeout (False)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = conn.recv(65536)
        except TimeoutError:
            return False
        if not data:
            return False
        buf += data
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
            length = int.from_bytes(buf[:4], "big")
            frame, buf = buf[4 : 4 + length], buf[4 + length :]
            if until(frame):
                return True
    return False


def is_arp_reply_from_gateway(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[28:32] == socket.inet_aton(GATEWAY)


def drain(conn: socket.socket) -> None:
    """Read and discard whatever is waiting on ``conn``."""
    conn.setblocking(False)
    try:
        while conn.recv(1 << 20):
            pass
    except BlockingIOError:
        pass
    finally:
        conn.settimeout(5)


def raw_connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(str(path))
    return conn


def closed_by_backend(conn: socket.socket, timeout: float = 5.0) -> bool:
    """True once the backend has closed ``conn`` (EOF or reset), reading and discarding frames."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not conn.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def qmp_stats(path: Path) -> dict[str, object]:
    """``query-stats`` over the backend's QMP socket (a minimal client)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        reader = conn.makefile("rb")
        assert "QMP" in json.loads(reader.readline())
        replies: list[dict[str, object]] = []
        for command in ("qmp_capabilities", "query-stats"):
            conn.sendall(json.dumps({"execute": command}).encode() + b"\n")
            while True:
                message = json.loads(reader.readline())
                if "event" not in message:
                    replies.append(message)
                    break
        value = replies[-1]["return"]
        assert isinstance(value, dict), replies
        return value


def test_malformed_input_does_not_disturb_other_guests(
    ns_host: NsHostFactory,
    start_backend: StartBackend,
    ns_guest: NsGuestFactory,
    servers: srv.Servers,
    vpnnet_run_dir: Path,
) -> None:
    host = ns_host()  # the backend runs in a test namespace: nothing garbage could become leaves it
    qmp = vpnnet_run_dir / f"qmp-{time.monotonic_ns()}.sock"
    backend = start_backend("--qmp", f"unix:{qmp}", netns=host.host.name)
    good = ns_guest(backend=backend, ipv6=False)
    good.dhcp()
    sink = servers.start("sink", OUTSIDE, ns=host.outside)
    pinger = good.popen(["busybox", "ping", "-c", "60", "-i", "0.1", "-W", "3", GATEWAY], stdout=subprocess.PIPE)
    mover = good.popen([PY, str(srv.SCRIPT), "send", OUTSIDE, str(sink.port), str(100 * MB)], stdout=subprocess.PIPE)
    time.sleep(0.3)  # the transfer is under way

    # (b) garbage frames with valid length prefixes: dropped, and the connection stays usable
    # (bursts until the transfer is over, so that they certainly overlap it)
    rng = random.Random(20261127)
    bursts = 0
    with raw_connect(backend.socket_path) as raw:
        while bursts < 3 or (mover.poll() is None and bursts < 100):
            raw.sendall(b"".join(framed(frame) for frame in garbage_frames(rng)))
            bursts += 1
            drain(raw)  # what the backend answers (DHCP offers, DNS errors...) is not read otherwise
            time.sleep(0.02)
        raw.sendall(framed(arp_request(GATEWAY)))
        assert read_frames(raw, is_arp_reply_from_gateway), "the garbage sender's connection stopped working"
    # (a) a bad length prefix: logged, and that connection (only) is dropped
    for prefix in (0xFFFFFFFF, 0):
        with raw_connect(backend.socket_path) as raw:
            raw.sendall(framed(arp_request(GATEWAY)))
            assert read_frames(raw, is_arp_reply_from_gateway)
            raw.sendall(prefix.to_bytes(4, "big") + b"\xab" * 64)
            assert closed_by_backend(raw), f"length prefix {prefix:#x}: connection not dropped"
        backend.wait_for_log(rf"bad frame length prefix {prefix}\b")
    # (c) a frame cut in the middle, then disconnect
    with raw_connect(backend.socket_path) as raw:
        raw.sendall(framed(arp_request(GATEWAY)) + (1000).to_bytes(4, "big") + b"\x00" * 300)
    # the backend still accepts guests
    with raw_connect(backend.socket_path) as raw:
        raw.sendall(framed(arp_request(GATEWAY)))
        assert read_frames(raw, is_arp_reply_from_gateway)

    out = pinger.communicate(timeout=30)[0].decode()
    assert pinger.returncode == 0 and "60 packets received, 0% packet loss" in out, out
    moved = mover.communicate(timeout=60)[0].decode()
    assert mover.returncode == 0, moved
    assert json.loads(moved)["reply"] == {"bytes": 100 * MB, "sha256": srv.pattern_sha256(100 * MB)}
    assert backend.is_running()
    print(f"{bursts} bursts of garbage")
    log = backend.log_text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
    assert len(re.findall(r"dropping this connection", log)) == 2
    # every raw connection came and went; the good guest's stayed
    assert wait_until(lambda: backend.log_text().count("guest disconnected") == 5, 5), backend.log_text()[-3000:]
    stats = qmp_stats(qmp)
    counters = stats["counters"]
    assert isinstance(counters, dict)
    print("counters:", json.dumps(counters, sort_keys=True))
    assert stats["guests"] == 1
    assert counters.get("internal-errors", 0) == 0
    assert counters.get("drop-malformed-stream") == 2
    for name in ("drop-runt-frame", "drop-short-ip", "drop-bad-ip-checksum", "drop-bad-ip-length", "drop-bad-dhcp"):
        assert counters.get(name, 0) > 0, name
    assert counters.get("rx-dropped", 0) >= 40


# ---- start-up errors -----------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """``python -m qemu_vpnnet ARGS`` to completion (a backend that starts fails the test by
    timing out)."""
    env = dict(os.environ)
    installed = os.environ.get("VPNNET_TEST_INSTALLED", "") not in ("", "0")
    if not installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [PY, "-m", "qemu_vpnnet", *args, "--dns-upstream", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd="/" if installed else REPO_ROOT,
        stdin=subprocess.DEVNULL,
    )


def assert_clear_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for word in words:
        assert word.lower() in output.lower(), output


def test_socket_in_use_by_a_live_backend(start_backend: StartBackend, ns_guest: NsGuestFactory) -> None:
    backend = start_backend()
    result = run_cli("--socket", str(backend.socket_path))
    assert_clear_failure(result, str(backend.socket_path), "in use")
    # the running backend keeps its socket and serves a new guest
    assert backend.is_running() and backend.socket_path.is_socket()
    guest = ns_guest(backend=backend, ipv6=False)
    assert guest.dhcp()["ip"] == "10.0.2.15"


def test_socket_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "vpnnet.sock"
    assert_clear_failure(run_cli("--socket", str(missing)), str(missing.parent), "does not exist")


@pytest.mark.parametrize(
    "net",
    [
        "10.0.2.0/33",
        "banana",
        "10.0.2.0/30",
        "10.0.2.0/",
    ],
)
def test_bad_net_is_a_clear_error(tmp_path: Path, net: str) -> None:
    result = run_cli("--socket", str(tmp_path / "x.sock"), "--net", net)
    assert_clear_failure(result)
    # the error names the option or the value given, so that the user knows what to fix
    output = result.stdout + result.stderr
    error = "\n".join(line for line in output.splitlines() if "error:" in line)
    assert "--net" in error or net in error.split() or repr(net) in error, output
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.parametrize("mtu", ["10", "70000", "nine"])
def test_bad_mtu_is_a_clear_error(tmp_path: Path, mtu: str) -> None:
    assert_clear_failure(run_cli("--socket", str(tmp_path / "x.sock"), "--mtu", mtu), "mtu", mtu)
    assert not (tmp_path / "x.sock").exists()


# ---- SIGTERM ---------------------------------------------------------------------------------


def stop_with_sigterm(backend: Backend, timeout: float = 10.0) -> int:
    assert backend.process is not None
    backend.process.send_signal(signal.SIGTERM)
    return backend.process.wait(timeout)


def test_sigterm_stops_cleanly_and_removes_the_socket(
    start_backend: StartBackend, ns_guest: NsGuestFactory, servers: srv.Servers
) -> None:
    backend = start_backend()
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    # a connection in the middle of a transfer when the signal comes
    source = servers.start("source", "127.0.0.1", 2000 * MB)
    reader = guest.popen(
        [PY, str(srv.SCRIPT), "read-until-error", GATEWAY, str(source.port), "--delay", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert wait_until(lambda: "guest connected" in backend.log_text(), 5)
    time.sleep(1.0)
    assert stop_with_sigterm(backend) == 0, backend.log_text()[-3000:]
    assert not backend.socket_path.exists()
    assert "stopping" in backend.log_text()
    assert "Traceback" not in backend.log_text()
    reader.kill()
    reader.wait()

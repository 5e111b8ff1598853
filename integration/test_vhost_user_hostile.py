"""Hostile vhost-user front-ends (issue 14): a test client speaking vhost-user itself
(integration/vhost_client.py) sends malformed messages, wrong descriptor counts, memory regions its
files cannot back and rings pointing outside the shared memory. The backend must drop that one
device with a log line ("...; dropping this device"), stay alive, release every descriptor it was
given, and keep serving the other guests: a well-behaved vhost-user client and, in the first test,
a namespace guest over the stream socket, both checked after every attack.

Each attack runs on its own connection. A test first proves the client itself right (ARP and DHCP
answered through the rings), so a drop means the backend refused the attack, not our set-up.
After each: the backend is alive, logged the drop for that port, let no exception escape, and its
descriptor count (/proc/PID/fd) is back at the baseline taken with only the healthy guests.

The last tests are descriptors that are not what they claim (a kick pipe at EOF, a full blocking
pipe as call descriptor), TX chains as large as guest memory, and a memfd shrunk under the
backend's mapping (refused: the file is not sealed).
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration import vhost_client as vc
from integration.backend import Backend
from integration.common import wait_until
from integration.fixtures import NsGuestFactory, StartBackend
from integration.nsguest import NsGuest
from integration.vhost_client import GuestMemory, VhostClientError, VhostUserClient

GATEWAY = "10.0.2.2"
HEALTHY_MAC = bytes.fromhex("52540076aa01")
ATTACK_MAC = bytes.fromhex("52540076aa02")
MAX_PAYLOAD = 4096  # core/vhost_user.py
F_SETPIPE_SZ = 1031


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Target:
    """A backend serving --vhost-user, its healthy guests, and the bookkeeping of the attacks."""

    backend: Backend
    path: Path
    healthy: VhostUserClient
    ns: NsGuest | None = None
    seen_ports: set[int] = field(default_factory=set)
    baseline_fds: int = 0

    def new_port(self, timeout: float = 5.0) -> int:
        """The port id the backend gave the connection just made (its "guest connected" line)."""
        pattern = re.compile(rf"guest connected: port=(\d+) vhost-user {re.escape(str(self.path))}$", re.MULTILINE)
        found: list[int] = []

        def fresh() -> bool:
            found[:] = [int(p) for p in pattern.findall(self.backend.log_text()) if int(p) not in self.seen_ports]
            return bool(found)

        assert wait_until(fresh, timeout), f"no new vhost-user connection logged:\n{self.backend.log_text()[-2000:]}"
        self.seen_ports.update(found)
        return max(found)

    def check_healthy(self, what: str) -> None:
        assert self.backend.is_running(), f"{what}: the backend died:\n{self.backend.log_text()[-3000:]}"
        assert self.healthy.arp_gateway(HEALTHY_MAC, 3.0) is not None, (
            f"{what}: the healthy vhost-user guest is cut off"
        )
        if self.ns is not None:
            ping = self.ns.ping(GATEWAY, count=1, timeout=2.0)
            assert ping.returncode == 0, f"{what}: the namespace guest is cut off: {ping.stdout}{ping.stderr}"

    def wait_fds(self, what: str, timeout: float = 3.0) -> None:
        pid = self.backend.pid
        ok = wait_until(lambda: fd_count(pid) <= self.baseline_fds, timeout)
        assert ok, f"{what}: the backend holds {fd_count(pid)} descriptors, {self.baseline_fds} before"

    @contextmanager
    def attack(self, what: str, *, dropped: bool = True) -> Iterator[VhostUserClient]:
        """A fresh connection for one attack; afterwards the backend must have dropped it (and logged so)
        or, with dropped=False, kept it; either way the healthy guests work and no descriptor leaked."""
        client = VhostUserClient(self.path, timeout=3.0)
        port = self.new_port()
        log_start = len(self.backend.log_text())
        try:
            yield client
            if dropped:
                assert client.wait_closed(5.0), f"{what}: the backend kept the connection"
                self.backend.wait_for_log(rf"\(port {port}\): .*; dropping this device$", 5.0)
            else:
                assert not client.wait_closed(0.3), f"{what}: the backend dropped a device it should keep"
        finally:
            client.close()
        self.check_healthy(what)
        self.wait_fds(what)
        new_log = self.backend.log_text()[log_start:]
        assert "Traceback" not in new_log, f"{what}: an exception escaped in the backend:\n{new_log[-3000:]}"


@pytest.fixture
def target(start_backend: StartBackend, vpnnet_run_dir: Path) -> Iterator[Target]:
    path = vpnnet_run_dir / f"hostile-{os.getpid()}-{time.monotonic_ns()}.vu"
    backend = start_backend("--vhost-user", str(path), "--no-ipv6")
    assert wait_until(path.is_socket, 10), f"no vhost-user socket {path}:\n{backend.log_text()}"
    healthy = VhostUserClient(path)
    try:
        healthy.set_up()
        t = Target(backend, path, healthy)
        t.seen_ports.add(t.new_port())
        assert healthy.arp_gateway(HEALTHY_MAC, 3.0) is not None, "the well-behaved client got no ARP answer"
        t.baseline_fds = fd_count(backend.pid)
        yield t
    finally:
        healthy.close()
    path.unlink(missing_ok=True)


def owned(c: VhostUserClient) -> None:
    """Negotiate up to SET_OWNER, without REPLY_ACK (so a refused request drops the device)."""
    c.negotiate(protocol_features=vc.PROTOCOL_F_CONFIGURE_MEM_SLOTS)


def running(c: VhostUserClient, mem: GuestMemory | None = None, num: int = 16) -> None:
    """Fully set up, rings started, as QEMU leaves it when the guest's driver is up."""
    c.set_up(mem, num=num)


# ---- the client itself --------------------------------------------------------------------------


def test_well_behaved_client_exchanges_frames(target: Target) -> None:
    """ARP for the gateway and a DHCP DISCOVER are answered through the client's rings, set up with
    ADD_MEM_REG (CONFIGURE_MEM_SLOTS) and with SET_MEM_TABLE; GET_VRING_BASE reports progress."""
    for mem_table in (False, True):
        with VhostUserClient(target.path) as c:
            target.new_port()
            c.set_up(mem_table=mem_table)
            assert c.protocol_features & vc.PROTOCOL_F_CONFIGURE_MEM_SLOTS
            mac = bytes.fromhex("52540076ab0" + str(int(mem_table)))
            assert c.arp_gateway(mac) is not None
            xid = 0x1000 + mem_table
            c.send_frame(vc.dhcp_discover(mac, xid))
            offers = [o for f in c.receive_frames(3.0, want=1) if (o := vc.parse_dhcp_offer(f, xid))]
            assert offers and offers[0][:3] == bytes([10, 0, 2]), offers
            base = c.request(vc.GET_VRING_BASE, vc.VRING_STATE.pack(vc.TX, 0))
            assert vc.VRING_STATE.unpack(base) == (vc.TX, 2)  # the ARP request and the DISCOVER
    target.wait_fds("well-behaved clients closed")


def test_regions_added_and_removed_while_the_rings_run(target: Target) -> None:
    """Memory hot-plug as QEMU does it with CONFIGURE_MEM_SLOTS: a region added (ADD_MEM_REG) and
    removed (REM_MEM_REG) while both rings run. The backend remaps and rebuilds its queues where
    they stood; frames keep flowing, and the removed region's descriptor is released."""
    with VhostUserClient(target.path) as c:
        target.new_port()
        c.set_up()
        mac = bytes.fromhex("52540076ab10")
        assert c.arp_gateway(mac) is not None
        fds_before = fd_count(target.backend.pid)
        extra = GuestMemory(1 << 20, gpa=1 << 32, uva=0x7E00_0000_0000, name="hot-added")
        try:
            c.command(vc.ADD_MEM_REG, vc.U64.pack(0) + extra.region(), [extra.fd])
            assert c.arp_gateway(mac) is not None, "no answer after a region was added"
            assert fd_count(target.backend.pid) > fds_before  # its fd (and the mmap's own duplicate)
            c.command(vc.REM_MEM_REG, vc.U64.pack(0) + extra.region())
            assert c.arp_gateway(mac) is not None, "no answer after a region was removed"
            assert wait_until(lambda: fd_count(target.backend.pid) == fds_before, 5)
        finally:
            extra.close()
        base = c.request(vc.GET_VRING_BASE, vc.VRING_STATE.pack(vc.TX, 0))
        assert vc.VRING_STATE.unpack(base) == (vc.TX, 3)  # three ARP requests, none lost or repeated
    target.wait_fds("hot-plug client closed")


# ---- the control channel -----------------------------------------------------------------------


def _bad_header(flags: int) -> Callable[[VhostUserClient], None]:
    return lambda c: c.send(vc.GET_FEATURES, flags=flags)


def _oversize(c: VhostUserClient) -> None:
    c.send(vc.SET_MEM_TABLE, bytes(64), size=MAX_PAYLOAD + 1)


def _short_payload(c: VhostUserClient) -> None:
    owned(c)
    c.send(vc.SET_FEATURES, b"\x00" * 4)


def _before_owner(request: int, payload: bytes, with_memfd: bool = False) -> Callable[[VhostUserClient], None]:
    def attack(c: VhostUserClient) -> None:
        c.get_u64(vc.GET_FEATURES)
        if with_memfd:
            mem = GuestMemory(1 << 16)
            try:
                c.send(request, payload + mem.region(), [mem.fd])
            finally:
                mem.close()
        else:
            c.send(request, payload)

    return attack


def _second_owner(c: VhostUserClient) -> None:
    owned(c)
    c.send(vc.SET_OWNER)


def _unoffered_protocol_features(c: VhostUserClient) -> None:
    c.get_u64(vc.GET_FEATURES)
    c.get_u64(vc.GET_PROTOCOL_FEATURES)
    c.send(vc.SET_PROTOCOL_FEATURES, vc.U64.pack(1 << 0))  # MQ: not offered


def _ring_state(index: int, num: int, request: int = vc.SET_VRING_NUM) -> Callable[[VhostUserClient], None]:
    def attack(c: VhostUserClient) -> None:
        owned(c)
        c.send(request, vc.VRING_STATE.pack(index, num))

    return attack


MESSAGE_ATTACKS: list[tuple[str, Callable[[VhostUserClient], None]]] = [
    ("garbage header", lambda c: c.send_raw(b"\xde\xad\xbe\xef" * 3)),
    ("version 0", _bad_header(0)),
    ("version 2", _bad_header(2)),
    ("REPLY flag from the front-end", _bad_header(vc.VERSION | vc.FLAG_REPLY)),
    ("unknown flag bit", _bad_header(vc.VERSION | 0x100)),
    ("payload above MAX_PAYLOAD", _oversize),
    ("size field of 0xffffffff", lambda c: c.send(vc.GET_FEATURES, size=0xFFFFFFFF)),
    ("SET_FEATURES with 4 bytes", _short_payload),
    ("SET_VRING_NUM before SET_OWNER", _before_owner(vc.SET_VRING_NUM, vc.VRING_STATE.pack(0, 64))),
    ("SET_FEATURES before SET_OWNER", _before_owner(vc.SET_FEATURES, vc.U64.pack(vc.VIRTIO_F_VERSION_1))),
    ("SET_MEM_TABLE before SET_OWNER", _before_owner(vc.SET_MEM_TABLE, vc.MEM_HEAD.pack(1, 0), with_memfd=True)),
    ("second SET_OWNER", _second_owner),
    ("protocol features not offered", _unoffered_protocol_features),
    ("ring index 2", _ring_state(2, 64)),
    ("ring size 3", _ring_state(0, 3)),
    ("ring size 65536", _ring_state(1, 65536)),
    ("ring base above 0xffff", _ring_state(0, 0x10000, vc.SET_VRING_BASE)),
    ("SET_VRING_ENABLE 2", _ring_state(0, 2, vc.SET_VRING_ENABLE)),
]


def test_malformed_messages_drop_only_that_device(target: Target, ns_guest: NsGuestFactory) -> None:
    target.ns = ns_guest(socket_path=target.backend.socket_path, ipv6=False)
    target.ns.dhcp()
    target.baseline_fds = fd_count(target.backend.pid)  # plus the namespace guest's stream socket
    for what, attack in MESSAGE_ATTACKS:
        with target.attack(what) as c:
            attack(c)


# ---- descriptor counts --------------------------------------------------------------------------


def _mem_table_short_of_fds(c: VhostUserClient) -> None:
    owned(c)
    a, b = GuestMemory(1 << 16), GuestMemory(1 << 16, gpa=1 << 20, uva=0x7F00_1000_0000)
    try:
        c.send(vc.SET_MEM_TABLE, vc.MEM_HEAD.pack(2, 0) + a.region() + b.region(), [a.fd])
    finally:
        a.close()
        b.close()


def _with_eventfds(count: int, request: int, value: int, *, owner: bool = True) -> Callable[[VhostUserClient], None]:
    def attack(c: VhostUserClient) -> None:
        if owner:
            owned(c)
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(count)]
        try:
            c.send(request, vc.U64.pack(value), fds)
        finally:
            for fd in fds:
                os.close(fd)

    return attack


def _fds_on_continuation(c: VhostUserClient) -> None:
    """Descriptors on bytes that only continue a message (no message starts in them)."""
    owned(c)
    message = vc.HEADER.pack(vc.SET_FEATURES, vc.VERSION, 8) + vc.U64.pack(vc.VIRTIO_F_VERSION_1)
    c.send_raw(message[:6])
    time.sleep(0.2)  # the backend reads the first part alone
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        c.send_raw(message[6:], [fd])
    finally:
        os.close(fd)


def _add_mem_reg_without_fd(c: VhostUserClient) -> None:
    owned(c)
    c.send(vc.ADD_MEM_REG, vc.U64.pack(0) + vc.REGION.pack(0, 1 << 16, 0x7F00_0000_0000, 0))


FD_ATTACKS: list[tuple[str, Callable[[VhostUserClient], None]]] = [
    ("SET_MEM_TABLE: 2 regions, 1 fd", _mem_table_short_of_fds),
    ("SET_VRING_KICK with 2 fds", _with_eventfds(2, vc.SET_VRING_KICK, vc.TX)),
    ("SET_VRING_CALL with NOFD and an fd", _with_eventfds(1, vc.SET_VRING_CALL, vc.RX | vc.VRING_NOFD)),
    ("SET_VRING_CALL without its fd", _with_eventfds(0, vc.SET_VRING_CALL, vc.RX)),
    ("GET_FEATURES with an fd", lambda c: _with_eventfds(1, vc.GET_FEATURES, 0, owner=False)(c)),
    ("SET_OWNER with 3 fds", _with_eventfds(3, vc.SET_OWNER, 0, owner=False)),
    ("ADD_MEM_REG without fd", _add_mem_reg_without_fd),
    ("9 fds on one message", _with_eventfds(9, vc.SET_VRING_KICK, vc.TX)),
    ("fds on a continuation", _fds_on_continuation),
]


def test_wrong_descriptor_counts_drop_only_that_device(target: Target) -> None:
    for what, attack in FD_ATTACKS:
        with target.attack(what) as c:
            attack(c)


# ---- memory regions -----------------------------------------------------------------------------


def _region_larger_than_file(c: VhostUserClient) -> None:
    """1 MiB announced over a 64 KiB memfd: mapping it whole would SIGBUS on the first touch past 64 KiB."""
    owned(c)
    mem = GuestMemory(1 << 20, file_size=1 << 16)
    try:
        c.send(vc.ADD_MEM_REG, vc.U64.pack(0) + mem.region(), [mem.fd])
    finally:
        mem.close()


def _offset_past_file(c: VhostUserClient) -> None:
    owned(c)
    mem = GuestMemory(1 << 16)
    try:
        c.send(vc.SET_MEM_TABLE, vc.MEM_HEAD.pack(1, 0) + mem.region(mmap_offset=1 << 16), [mem.fd])
    finally:
        mem.close()


def _pipe_as_memory(c: VhostUserClient) -> None:
    owned(c)
    r, w = os.pipe()
    try:
        c.send(vc.ADD_MEM_REG, vc.U64.pack(0) + vc.REGION.pack(0, 1 << 16, 0x7F00_0000_0000, 0), [r])
    finally:
        os.close(r)
        os.close(w)


def _read_only_memory(c: VhostUserClient) -> None:
    """A memfd opened read-only (its own open file description): a shared writable mapping is refused."""
    owned(c)
    mem = GuestMemory(1 << 16)
    ro = os.open(f"/proc/self/fd/{mem.fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        c.send(vc.ADD_MEM_REG, vc.U64.pack(0) + mem.region(), [ro])
    finally:
        os.close(ro)
        mem.close()


def _overlapping_regions(c: VhostUserClient) -> None:
    owned(c)
    a, b = GuestMemory(1 << 16), GuestMemory(1 << 16, gpa=1 << 15, uva=0x7F00_1000_0000)
    try:
        c.send(vc.SET_MEM_TABLE, vc.MEM_HEAD.pack(2, 0) + a.region() + b.region(), [a.fd, b.fd])
    finally:
        a.close()
        b.close()


REGION_UVA = 0x7F00_0000_0000  # GuestMemory's default user address
REGION_SIZE = 1 << 20  # and size


def _ring_addresses(**addr: int) -> Callable[[VhostUserClient], None]:
    """The TX ring stopped (GET_VRING_BASE) and set up again with these SET_VRING_ADDR addresses:
    accepted (only their alignment is checked then), refused when the ring starts on its kick."""

    def attack(c: VhostUserClient) -> None:
        c.set_up(num=16)
        c.request(vc.GET_VRING_BASE, vc.VRING_STATE.pack(vc.TX, 0))
        tx = c.rings[vc.TX]
        try:
            # a kick still pending on the eventfd from set_up may start the ring (and drop the
            # device) as soon as SET_VRING_KICK hands it over again, before the last acks
            c.start_ring(tx, tx.addr_payload(**addr))
            tx.do_kick()
        except VhostClientError:
            pass

    return attack


def _set_vring_addr(flags: int, desc: int) -> Callable[[VhostUserClient], None]:
    def attack(c: VhostUserClient) -> None:
        owned(c)
        c.send(vc.SET_VRING_ADDR, vc.VRING_ADDR.pack(vc.TX, flags, desc, 0, 0, 0))

    return attack


MEMORY_ATTACKS: list[tuple[str, Callable[[VhostUserClient], None]]] = [
    ("region larger than its memfd", _region_larger_than_file),
    ("mmap_offset past the file", _offset_past_file),
    ("a pipe as a memory region", _pipe_as_memory),
    ("a read-only memfd", _read_only_memory),
    ("overlapping regions", _overlapping_regions),
    ("descriptor table below the region", _ring_addresses(desc=0x1000)),
    ("used ring past the region", _ring_addresses(used=REGION_UVA + REGION_SIZE)),
    ("avail ring across the region's end", _ring_addresses(avail=REGION_UVA + REGION_SIZE - 4)),
    ("descriptor table wrapping 2**64", _ring_addresses(desc=0xFFFF_FFFF_FFFF_FFF0)),
    ("misaligned descriptor table", _set_vring_addr(0, 8)),
    ("logging asked for", _set_vring_addr(1, 0)),
]


def test_hostile_memory_drops_only_that_device(target: Target) -> None:
    for what, attack in MEMORY_ATTACKS:
        with target.attack(what) as c:
            attack(c)


# ---- rings --------------------------------------------------------------------------------------

OUTSIDE = 1 << 40  # a guest-physical address in no region


def _tx_chain(build: Callable[[vc.DriverRing, int], int]) -> Callable[[VhostUserClient], None]:
    """A running device whose guest then publishes the chain `build(ring, frame_addr)` returns the
    head of, and kicks TX."""

    def attack(c: VhostUserClient) -> None:
        running(c)
        tx = c.rings[vc.TX]
        frame = tx.mem.alloc(256)
        tx.mem.write(frame, bytes(vc.VNET_HDR_LEN) + vc.arp_request(ATTACK_MAC, vc.GATEWAY_IP))
        head = build(tx, frame)
        if head >= 0:
            tx.publish(head)
        tx.do_kick()

    return attack


def _desc_outside(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, OUTSIDE, 64)
    return 0


def _desc_across_end(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, tx.mem.gpa + tx.mem.size - 16, 64)
    return 0


def _desc_wraps(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, 0xFFFF_FFFF_FFFF_FFC0, 0x80)
    return 0


def _loop(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, frame, 16, vc.DESC_F_NEXT, 1)
    tx.set_desc(1, frame + 16, 16, vc.DESC_F_NEXT, 0)
    return 0


def _self_loop(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(3, frame, 8, vc.DESC_F_NEXT, 3)
    return 3


def _head_out_of_ring(tx: vc.DriverRing, frame: int) -> int:
    return tx.num  # index 16 of a 16-entry ring


def _next_out_of_ring(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, frame, 16, vc.DESC_F_NEXT, 0xFFFF)
    return 0


def _avail_far_ahead(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, frame, 54)
    tx.publish(0, count=1000)
    return -1


def _indirect_table(
    entries: list[tuple[int, int, int, int]], *, outer_flags: int = 0, length: int | None = None
) -> Callable[[vc.DriverRing, int], int]:
    def build(tx: vc.DriverRing, frame: int) -> int:
        table = tx.mem.alloc(16 * max(len(entries), 1), 16)
        for i, (addr, size, flags, nxt) in enumerate(entries):
            tx.mem.write(table + 16 * i, vc.DESC.pack(frame if addr < 0 else addr, size, flags, nxt))
        tx.set_desc(0, table, 16 * len(entries) if length is None else length, vc.DESC_F_INDIRECT | outer_flags, 1)
        return 0

    return build


def _indirect_after_head(tx: vc.DriverRing, frame: int) -> int:
    table = tx.mem.alloc(16, 16)
    tx.mem.write(table, vc.DESC.pack(frame, 54, 0, 0))
    tx.set_desc(0, frame, 12, vc.DESC_F_NEXT, 1)
    tx.set_desc(1, table, 16, vc.DESC_F_INDIRECT, 0)
    return 0


def _indirect_outside(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, OUTSIDE, 64, vc.DESC_F_INDIRECT)
    return 0


def _readable_after_writable(tx: vc.DriverRing, frame: int) -> int:
    tx.set_desc(0, frame, 16, vc.DESC_F_WRITE | vc.DESC_F_NEXT, 1)
    tx.set_desc(1, frame + 16, 38, 0)
    return 0


def _rx_buffers_outside(c: VhostUserClient) -> None:
    """A running device whose every RX buffer points outside the memory."""
    c.set_up(num=16, rx_buffers=0)
    rx = c.rings[vc.RX]
    for slot in range(rx.num):
        rx.set_desc(slot, OUTSIDE, 2048, vc.DESC_F_WRITE)
        rx.publish(slot)
    rx.do_kick()


def _rx_desc_outside(c: VhostUserClient) -> None:
    """RX buffers pointing outside the memory, and a frame for us so that the backend fills one."""
    _rx_buffers_outside(c)
    c.send_frame(vc.arp_request(ATTACK_MAC, vc.GATEWAY_IP))


def _rx_avail_far_ahead(c: VhostUserClient) -> None:
    c.set_up(num=16, rx_buffers=0)
    rx = c.rings[vc.RX]
    rx.set_avail_idx(0x8000)
    rx.do_kick()
    c.send_frame(vc.arp_request(ATTACK_MAC, vc.GATEWAY_IP))


RING_ATTACKS: list[tuple[str, Callable[[VhostUserClient], None]]] = [
    ("descriptor outside the memory", _tx_chain(_desc_outside)),
    ("descriptor across the region's end", _tx_chain(_desc_across_end)),
    ("descriptor wrapping 2**64", _tx_chain(_desc_wraps)),
    ("looping chain 0 -> 1 -> 0", _tx_chain(_loop)),
    ("descriptor chained to itself", _tx_chain(_self_loop)),
    ("head index out of the ring", _tx_chain(_head_out_of_ring)),
    ("next index out of the ring", _tx_chain(_next_out_of_ring)),
    ("avail.idx 1000 ahead", _tx_chain(_avail_far_ahead)),
    ("readable after writable", _tx_chain(_readable_after_writable)),
    ("indirect table outside the memory", _tx_chain(_indirect_outside)),
    ("indirect inside indirect", _tx_chain(_indirect_table([(OUTSIDE, 16, vc.DESC_F_INDIRECT, 0)]))),
    ("indirect with NEXT", _tx_chain(_indirect_table([(-1, 54, 0, 0)], outer_flags=vc.DESC_F_NEXT))),
    ("indirect table of 10 bytes", _tx_chain(_indirect_table([(-1, 54, 0, 0)], length=10))),
    ("indirect table of 0 bytes", _tx_chain(_indirect_table([(-1, 54, 0, 0)], length=0))),
    ("indirect after the head", _tx_chain(_indirect_after_head)),
    (
        "loop inside an indirect table",
        _tx_chain(_indirect_table([(-1, 16, vc.DESC_F_NEXT, 1), (-1, 16, vc.DESC_F_NEXT, 0)])),
    ),
    ("indirect next out of its table", _tx_chain(_indirect_table([(-1, 16, vc.DESC_F_NEXT, 7)]))),
]


def test_hostile_rings_drop_only_that_device(target: Target) -> None:
    for what, attack in RING_ATTACKS:
        with target.attack(what) as c:
            attack(c)


def _rx_desc_outside_healthy_sender(target: Target) -> Callable[[VhostUserClient], None]:
    """RX buffers outside the memory, filled with a broadcast that another (healthy) guest sends."""

    def attack(c: VhostUserClient) -> None:
        _rx_buffers_outside(c)
        time.sleep(0.1)
        target.healthy.send_frame(vc.arp_request(HEALTHY_MAC, bytes([10, 0, 2, 77])))  # broadcast, no answer

    return attack


def test_hostile_rx_rings_drop_only_that_device(target: Target) -> None:
    """A bad RX ring is found while the shell's flush hands frames to the ports: the device is dropped
    (and detached from the switch) in the middle of Shell.flush's loop over the switch's output; that
    must not break the flush (nor the sender's TX processing it was called from)."""
    for what, attack in [
        ("RX buffers outside the memory, our own ARP answered into them", _rx_desc_outside),
        ("RX avail.idx 0x8000 ahead", _rx_avail_far_ahead),
        ("RX buffers outside the memory, another guest's broadcast", _rx_desc_outside_healthy_sender(target)),
    ]:
        with target.attack(what) as c:
            attack(c)


def test_zero_length_descriptors_are_skipped_and_the_device_stays(target: Target) -> None:
    """core/virtqueue.py accepts zero-length descriptors, without translating their address (QEMU's
    refusing them wedged real guests): a chain of them comes back used, one in front of a real frame
    lets that frame through, and the device keeps working."""
    with target.attack("zero-length descriptors", dropped=False) as c:
        running(c)
        tx = c.rings[vc.TX]
        frame = tx.mem.alloc(256)
        arp = vc.arp_request(ATTACK_MAC, vc.GATEWAY_IP)
        tx.mem.write(frame, bytes(vc.VNET_HDR_LEN) + arp)
        tx.set_desc(0, OUTSIDE, 0, vc.DESC_F_NEXT, 1)  # nothing, at an address in no region
        tx.set_desc(1, 0, 0)
        tx.publish(0)
        tx.set_desc(2, OUTSIDE, 0, vc.DESC_F_NEXT, 3)
        tx.set_desc(3, frame, vc.VNET_HDR_LEN + len(arp), vc.DESC_F_NEXT, 4)
        tx.set_desc(4, 0xFFFF_FFFF_FFFF_FFFF, 0)
        tx.publish(2)
        tx.next_desc = 5
        tx.do_kick()
        assert c.wait_tx_used(2, 3.0), "the chain with zero-length descriptors did not come back"
        replies = [vc.parse_arp_reply(f, vc.GATEWAY_IP) for f in c.receive_frames(3.0)]
        assert any(replies), "the frame behind a zero-length descriptor got no answer"
        assert c.arp_gateway(ATTACK_MAC) is not None


# ---- descriptors in flight ----------------------------------------------------------------------


def test_connections_closed_mid_message_leak_no_descriptor(target: Target) -> None:
    """A front-end that sends part of a message with its descriptors and goes away: the backend
    closes them (MessageDecoder.take_fds), and its descriptor count returns to the baseline. Also
    with a device that holds memory and rings when its connection closes."""
    cases = {
        "SET_MEM_TABLE cut in its payload": (vc.SET_MEM_TABLE, vc.MEM_HEAD.pack(1, 0) + bytes(8), 40, 1),
        "ADD_MEM_REG cut in its payload": (vc.ADD_MEM_REG, bytes(20), 40, 1),
        "SET_VRING_KICK header only": (vc.SET_VRING_KICK, b"", 8, 1),
        "SET_MEM_TABLE, 8 fds, cut": (vc.SET_MEM_TABLE, vc.MEM_HEAD.pack(8, 0), 8 + 8 * 32, 8),
    }
    for what, (request, payload, size, nfds) in cases.items():
        client = VhostUserClient(target.path)
        port = target.new_port()
        owned(client)
        mems = [GuestMemory(1 << 16) for _ in range(nfds)]
        client.send(request, payload, [m.fd for m in mems], size=size)
        for m in mems:
            m.close()
        assert not client.wait_closed(0.3), f"{what}: dropped before the message was complete"
        client.close()
        target.backend.wait_for_log(rf"guest disconnected: port={port} .*QEMU closed the vhost-user socket", 5.0)
        target.check_healthy(what)
        target.wait_fds(what)
    for _ in range(3):  # a running device, its memory mapped and rings watched, simply goes away
        with VhostUserClient(target.path) as c:
            target.new_port()
            running(c)
            assert c.arp_gateway(ATTACK_MAC) is not None
    target.check_healthy("running devices closed")
    target.wait_fds("running devices closed")


# ---- descriptors that are not what they claim ---------------------------------------------------


def backend_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_kick_descriptor_at_end_of_file_does_not_spin_the_backend(target: Target) -> None:
    """A kick "eventfd" that is a pipe whose writer is gone is readable forever and reads b"":
    the backend must refuse it (or drop the device on EOF), not call _kicked in a busy loop."""
    with target.attack("kick descriptor at EOF") as c:
        running(c)
        r, w = os.pipe()
        os.close(w)
        try:
            c.send(vc.SET_VRING_KICK, vc.U64.pack(vc.TX), [r])
        finally:
            os.close(r)
        time.sleep(0.2)
        before = backend_cpu_seconds(target.backend.pid)
        time.sleep(1.0)
        used = backend_cpu_seconds(target.backend.pid) - before
        assert used < 0.5, f"the backend burnt {used:.2f} s of CPU in 1 s on a kick descriptor at EOF"


def _full_blocking_pipe() -> tuple[int, int]:
    """A pipe whose write end is blocking and already full (filled through a second, non-blocking
    open file description of it, so the descriptor we pass keeps blocking)."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    filler = os.open(f"/proc/self/fd/{w}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            os.write(filler, bytes(512))
    except BlockingIOError:
        pass
    finally:
        os.close(filler)
    assert os.get_blocking(w)
    return r, w


def test_blocking_call_descriptor_does_not_stall_the_backend(target: Target) -> None:
    """A call "eventfd" that is a full, blocking pipe: signalling it must never block the event loop
    (every other guest would stop), so the backend must refuse it or write it without blocking."""
    r, w = _full_blocking_pipe()
    try:
        c = VhostUserClient(target.path)
        target.new_port()
        try:
            running(c)
            try:
                c.command(vc.SET_VRING_CALL, vc.U64.pack(vc.RX), [w])
                c.send_frame(vc.arp_request(ATTACK_MAC, vc.GATEWAY_IP))  # its answer on RX: a call
            except VhostClientError:
                target.backend.wait_for_log(r"is not an eventfd.*dropping this device", 5)  # refused
            time.sleep(0.3)
            assert target.healthy.arp_gateway(HEALTHY_MAC, 3.0) is not None, (
                "the healthy guest got no answer while a front-end's call descriptor blocks the backend"
            )
        finally:
            c.close()
    finally:
        os.close(w)
        os.close(r)  # unblocks a backend stuck in write() (EPIPE), so that teardown can stop it
    target.check_healthy("blocking call descriptor")
    target.wait_fds("blocking call descriptor")


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_huge_tx_chains_do_not_balloon_the_backend(target: Target) -> None:
    """A TX chain can be as large as the guest's RAM (used.len is a u32): 16 chains of 32 MiB each,
    all over the same guest memory, are 512 MiB of "frames" no virtio-net device sends (a frame is at
    most the MTU, or 64 KiB with TSO). The backend must refuse them before copying them out of guest
    memory; a guest with 256 such chains of its whole RAM would otherwise run the host out of memory."""
    before = vm_hwm_kib(target.backend.pid)
    mem = GuestMemory(40 << 20)
    c = VhostUserClient(target.path)
    target.new_port()
    try:
        running(c, mem, num=16)
        tx = c.rings[vc.TX]
        big = mem.alloc(32 << 20)
        mem.write(big, bytes(vc.VNET_HDR_LEN) + vc.arp_request(ATTACK_MAC, vc.GATEWAY_IP))
        for slot in range(16):
            tx.set_desc(slot, big, 32 << 20)
            tx.publish(slot)
        tx.do_kick()
        wait_until(lambda: c.wait_closed(0.05) or tx.used_idx() == 16, 10.0)  # refused or consumed
    finally:
        c.close()
        mem.close()
    target.check_healthy("huge TX chains")
    target.wait_fds("huge TX chains")
    grown_mib = (vm_hwm_kib(target.backend.pid) - before) // 1024
    # 40 MiB of shared guest memory may be mapped and touched; copies of the chains may not
    assert grown_mib < 40 + 64, f"the backend's peak RSS grew by {grown_mib} MiB for 16 TX chains of 32 MiB"


def test_unsealed_memory_file_is_refused(target: Target) -> None:
    """A front-end that can shrink its memory file under the backend's mapping would kill the
    backend (SIGBUS at the next touch): an unsealed memfd is refused at ADD_MEM_REG. Had it been
    mapped, shrinking it and kicking both rings would bring the backend down."""
    mem = GuestMemory(1 << 20, seal=False)
    try:
        with target.attack("unsealed memfd") as c:
            try:
                running(c, mem)
                mem.map.close()
                os.ftruncate(mem.fd, 0)
                c.rings[vc.TX].do_kick()
                c.rings[vc.RX].do_kick()
            except VhostClientError:
                pass  # refused
        target.backend.wait_for_log(r"not sealed against shrinking", 5)
    finally:
        os.close(mem.fd)


def test_region_larger_than_its_file_is_refused_before_the_mapping(target: Target) -> None:
    """The same shrunken file, but before ADD_MEM_REG: refused by the size check, the backend lives."""
    with target.attack("sealed memfd smaller than its region") as c:
        _region_larger_than_file(c)
    assert "needs" in target.backend.log_text()  # "memory region ... needs N bytes of a M-byte file"

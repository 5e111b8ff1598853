"""A small vhost-user front-end (the part QEMU plays) for tests: well-behaved or hostile on request.

It speaks docs/interop/vhost-user.rst to a back-end's Unix socket: each message is one sendmsg
(12-byte header: request u32, flags u32, size u32; then the payload) with its descriptors as
SCM_RIGHTS on it, as QEMU sends them. Nothing here trusts the back-end; nothing here checks
what a test sends either, so a test can send any bytes and any descriptors it likes.

Pieces:

- `GuestMemory`: the guest's RAM as a memfd (sealed against shrinking by default, as QEMU's
  memory-backend-memfd does), mmap'd here, at a guest-physical base and a "QEMU virtual" base
  of our choosing; a bump allocator hands out buffers in it.
- `DriverRing`: the driver's side of one split virtqueue laid out in that memory (descriptor
  table, avail ring, used ring) with its kick and call eventfds: `add_chain` writes descriptors
  and publishes a head in the avail ring, `take_used` reads what the device returned.
- `VhostUserClient`: the socket; `send`/`request`/`send_raw` for single messages, `set_up` for the
  whole sequence QEMU 7.2 sends for a virtio-net device, then `send_frame` (virtio-net header +
  Ethernet frame on the TX ring), `post_rx_buffers` and `receive_frames` (what the back-end wrote
  on the RX ring), and `wait_closed` (the back-end dropped us).

Frame builders for the exchanges a test needs (ARP request, DHCP DISCOVER) are at the end.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

# requests (front-end to back-end)
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
NET_SET_MTU = 20
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_NOFD = 0x100

VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32

PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_NET_MTU = 1 << 4
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 1 << 15

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

RX = 0
TX = 1
VNET_HDR_LEN = 12  # VERSION_1 / MRG_RXBUF: the header with num_buffers
HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
MEM_HEAD = struct.Struct("<II")
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

#: The features a well-behaved client takes of those offered (no offloads: the header stays zero).
WANTED_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | VHOST_USER_F_PROTOCOL_FEATURES
WANTED_PROTOCOL_FEATURES = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIGURE_MEM_SLOTS

GATEWAY_IP = bytes([10, 0, 2, 2])
BROADCAST_MAC = b"\xff" * 6


class VhostClientError(Exception):
    """The back-end answered something unexpected, or not in time."""


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class GuestMemory:
    """The guest's RAM: a memfd of `size` bytes at guest-physical `gpa` and front-end address `uva`.

    `file_size` (default `size`) lets a test make the file smaller than the region it announces;
    `seal=False` leaves the file shrinkable (the back-end logs that)."""

    def __init__(
        self,
        size: int = 1 << 20,
        *,
        gpa: int = 0,
        uva: int = 0x7F00_0000_0000,
        file_size: int | None = None,
        seal: bool = True,
        name: str = "vhost-client-guest",
    ) -> None:
        self.size = size
        self.gpa = gpa
        self.uva = uva
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size if file_size is None else file_size)
        if seal:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, min(size, size if file_size is None else file_size))
        self._next = 0x1000  # leave the first page alone: guest address 0 is a classic bug magnet

    def alloc(self, length: int, alignment: int = 16) -> int:
        """Guest-physical address of `length` fresh bytes aligned to `alignment`."""
        start = _align(self._next, alignment)
        if start + length > len(self.map):
            raise VhostClientError(f"guest memory exhausted: {length} bytes at {start:#x}")
        self._next = start + length
        return self.gpa + start

    def to_uva(self, gpa: int) -> int:
        return self.uva + (gpa - self.gpa)

    def write(self, gpa: int, data: bytes) -> None:
        offset = gpa - self.gpa
        self.map[offset : offset + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        offset = gpa - self.gpa
        return bytes(self.map[offset : offset + length])

    def region(self, mmap_offset: int = 0, size: int | None = None) -> bytes:
        """This memory as a 32-byte vhost-user region description."""
        return REGION.pack(self.gpa, self.size if size is None else size, self.uva, mmap_offset)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass
class DriverRing:
    """The driver's side of one split virtqueue of `num` entries in `mem` (index RX 0 or TX 1)."""

    mem: GuestMemory
    index: int
    num: int = 64
    buffer_size: int = 2048
    desc: int = 0
    avail: int = 0
    used: int = 0
    avail_idx: int = 0
    last_used: int = 0
    kick: int = -1
    call: int = -1
    buffers: list[int] = field(default_factory=list)  # one buffer per descriptor slot
    next_desc: int = 0

    def __post_init__(self) -> None:
        self.desc = self.mem.alloc(16 * self.num, 16)
        self.avail = self.mem.alloc(6 + 2 * self.num, 2)
        self.used = self.mem.alloc(6 + 8 * self.num, 4)
        self.buffers = [self.mem.alloc(self.buffer_size, 16) for _ in range(self.num)]
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # addresses as SET_VRING_ADDR gives them (front-end virtual)
    def addr_payload(self, *, desc: int | None = None, used: int | None = None, avail: int | None = None) -> bytes:
        to_uva = self.mem.to_uva
        return VRING_ADDR.pack(
            self.index,
            0,
            to_uva(self.desc) if desc is None else desc,
            to_uva(self.used) if used is None else used,
            to_uva(self.avail) if avail is None else avail,
            0,
        )

    def set_desc(self, slot: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * slot, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int, count: int = 1) -> None:
        """Put `head` in the avail ring and move avail.idx by `count` (more than 1: a lie)."""
        slot = self.avail_idx % self.num
        self.mem.write(self.avail + 4 + 2 * slot, U16.pack(head))
        self.avail_idx = (self.avail_idx + count) & 0xFFFF
        self.mem.write(self.avail + 2, U16.pack(self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write(self.avail + 2, U16.pack(self.avail_idx))

    def add_buffer(self, data: bytes = b"", *, writable: bool = False, length: int | None = None) -> int:
        """One-descriptor chain over the slot's own buffer (filled with data); its head."""
        slot = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.num
        addr = self.buffers[slot]
        if data:
            if len(data) > self.buffer_size:
                raise VhostClientError(f"{len(data)} bytes do not fit a {self.buffer_size}-byte buffer")
            self.mem.write(addr, data)
        size = len(data) if length is None else length
        self.set_desc(slot, addr, size, DESC_F_WRITE if writable else 0)
        self.publish(slot)
        return slot

    def used_idx(self) -> int:
        value: int = U16.unpack(self.mem.read(self.used + 2, 2))[0]
        return value

    def take_used(self) -> list[tuple[int, int]]:
        """The (head, length) elements the device has returned since the last call."""
        out: list[tuple[int, int]] = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.num
            head, length = USED_ELEM.unpack(self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def do_kick(self) -> None:
        os.eventfd_write(self.kick, 1)

    def close(self) -> None:
        for fd in (self.kick, self.call):
            if fd >= 0:
                os.close(fd)
        self.kick = self.call = -1


class VhostUserClient:
    """One vhost-user connection to `path`, as QEMU's front-end would hold it."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(self.path)
        self.features = 0
        self.protocol_features = 0
        self.mem: GuestMemory | None = None
        self.rings: list[DriverRing] = []
        self._mine: list[GuestMemory | DriverRing] = []

    # ---- messages ------------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes as they are, with `fds` as SCM_RIGHTS on them (one sendmsg)."""
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise VhostClientError(f"back-end closed the connection: {exc}") from exc

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        flags: int = VERSION,
        size: int | None = None,
    ) -> None:
        """One message; `size` overrides the header's size field (a lie, if it differs)."""
        header = HEADER.pack(request, flags, len(payload) if size is None else size)
        self.send_raw(header + payload, fds)

    def read_reply(self, request: int) -> bytes:
        """The payload of the back-end's reply to `request`."""
        header = self._recv_exact(HEADER.size)
        got, flags, size = HEADER.unpack(header)
        if got != request or flags & 0x3 != VERSION or not flags & FLAG_REPLY:
            raise VhostClientError(f"reply {got} flags {flags:#x} to request {request}")
        return self._recv_exact(size)

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """A request that has a reply of its own (GET_*): send, then read its payload."""
        self.send(request, payload, fds)
        return self.read_reply(request)

    def command(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request without reply of its own; with REPLY_ACK negotiated it asks for the ack and checks it."""
        ack = bool(self.protocol_features & PROTOCOL_F_REPLY_ACK)
        self.send(request, payload, fds, flags=VERSION | (FLAG_NEED_REPLY if ack else 0))
        if ack:
            value = U64.unpack(self.read_reply(request))[0]
            if value != 0:
                raise VhostClientError(f"request {request} refused: ack {value}")

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError as exc:  # it closed with our requests unread
                raise VhostClientError(f"back-end reset the connection ({len(data)} of {n} bytes read)") from exc
            if not chunk:
                raise VhostClientError(f"back-end closed the connection ({len(data)} of {n} bytes read)")
            data += chunk
        return data

    def get_u64(self, request: int) -> int:
        value: int = U64.unpack(self.request(request))[0]
        return value

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Whether the back-end closes the connection within `timeout` (replies read meanwhile are skipped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return False
            try:
                if not self.sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True

    # ---- set-up as QEMU 7.2 does it ---------------------------------------------------------
    def negotiate(
        self, features: int = WANTED_FEATURES, protocol_features: int = WANTED_PROTOCOL_FEATURES
    ) -> tuple[int, int]:
        """vhost_user_backend_init and vhost_dev_init: features, protocol features, slots, owner."""
        offered = self.get_u64(GET_FEATURES)
        protocol = 0
        if offered & VHOST_USER_F_PROTOCOL_FEATURES:
            protocol = self.get_u64(GET_PROTOCOL_FEATURES) & protocol_features
            self.send(SET_PROTOCOL_FEATURES, U64.pack(protocol))
            self.protocol_features = protocol
            if protocol & PROTOCOL_F_CONFIGURE_MEM_SLOTS:
                slots = self.get_u64(GET_MAX_MEM_SLOTS)
                if slots < 1:
                    raise VhostClientError(f"GET_MAX_MEM_SLOTS: {slots}")
        self.command(SET_OWNER)
        self.get_u64(GET_FEATURES)  # QEMU asks again after SET_OWNER
        self.features = offered & features
        return offered, protocol

    def set_up(
        self,
        mem: GuestMemory | None = None,
        *,
        num: int = 64,
        features: int = WANTED_FEATURES,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
        mem_table: bool = False,
        rx_buffers: int | None = None,
    ) -> None:
        """The whole sequence, rings started and enabled, RX buffers posted (`rx_buffers`, default
        all of the ring). `mem_table`: SET_MEM_TABLE even if CONFIGURE_MEM_SLOTS was negotiated."""
        self.negotiate(features, protocol_features)
        if mem is None:
            mem = GuestMemory()
            self._mine.append(mem)
        self.mem = mem
        self.rings = [DriverRing(mem, RX, num), DriverRing(mem, TX, num)]
        self._mine.extend(self.rings)
        for ring in self.rings:  # vhost_virtqueue_init: the call descriptor, then the error one
            self.command(SET_VRING_CALL, U64.pack(ring.index), [ring.call])
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self.command(SET_VRING_ERR, U64.pack(ring.index), [err])
            finally:
                os.close(err)
        self.command(SET_FEATURES, U64.pack(self.features))
        self.send_memory(mem, mem_table=mem_table)
        for ring in self.rings:
            self.start_ring(ring)
        self.enable_rings()
        rx = self.rings[RX]
        for _ in range(rx.num if rx_buffers is None else rx_buffers):
            rx.add_buffer(writable=True, length=rx.buffer_size)
        rx.do_kick()
        self.rings[TX].do_kick()

    def send_memory(self, mem: GuestMemory, *, mem_table: bool = False) -> None:
        if self.protocol_features & PROTOCOL_F_CONFIGURE_MEM_SLOTS and not mem_table:
            self.command(ADD_MEM_REG, U64.pack(0) + mem.region(), [mem.fd])
        else:
            self.command(SET_MEM_TABLE, MEM_HEAD.pack(1, 0) + mem.region(), [mem.fd])

    def start_ring(self, ring: DriverRing, addr: bytes | None = None) -> None:
        self.command(SET_VRING_NUM, VRING_STATE.pack(ring.index, ring.num))
        self.command(SET_VRING_BASE, VRING_STATE.pack(ring.index, 0))
        self.command(SET_VRING_ADDR, ring.addr_payload() if addr is None else addr)
        self.command(SET_VRING_KICK, U64.pack(ring.index), [ring.kick])
        self.command(SET_VRING_CALL, U64.pack(ring.index), [ring.call])

    def enable_rings(self) -> None:
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            for ring in self.rings:
                self.command(SET_VRING_ENABLE, VRING_STATE.pack(ring.index, 1))

    # ---- frames ---------------------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> int:
        """Put a 12-byte zero virtio-net header plus `frame` on the TX ring and kick; the chain's head."""
        tx = self.rings[TX]
        head = tx.add_buffer(bytes(VNET_HDR_LEN) + frame)
        tx.do_kick()
        return head

    def post_rx_buffers(self, count: int) -> None:
        rx = self.rings[RX]
        for _ in range(count):
            rx.add_buffer(writable=True, length=rx.buffer_size)
        rx.do_kick()

    def receive_frames(self, timeout: float = 2.0, *, want: int = 1, repost: bool = True) -> list[bytes]:
        """Frames (without virtio-net header) the back-end wrote to the RX ring, waiting up to `timeout`
        for at least `want`; the buffers used are posted again unless `repost` is False."""
        rx = self.rings[RX]
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        pending: list[bytes] = []
        need = 0
        while True:
            for head, length in rx.take_used():
                data = rx.mem.read(rx.buffers[head], length)
                if not pending:
                    need = U16.unpack_from(data, 10)[0] if len(data) >= VNET_HDR_LEN else 1
                    data = data[VNET_HDR_LEN:]
                pending.append(data)
                if len(pending) >= max(need, 1):
                    frames.append(b"".join(pending))
                    pending = []
                if repost:
                    rx.add_buffer(writable=True, length=rx.buffer_size)
            if repost:
                rx.do_kick()
            left = deadline - time.monotonic()
            if len(frames) >= want or left <= 0:
                return frames
            select.select([rx.call], [], [], min(left, 0.05))
            try:
                os.eventfd_read(rx.call)
            except BlockingIOError:
                pass

    def wait_tx_used(self, head: int, timeout: float = 2.0) -> bool:
        tx = self.rings[TX]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(h == head for h, _ in tx.take_used()):
                return True
            time.sleep(0.005)
        return False

    def arp_gateway(self, mac: bytes, timeout: float = 2.0) -> bytes | None:
        """ARP for 10.0.2.2; the gateway's MAC from the reply, or None."""
        self.send_frame(arp_request(mac, GATEWAY_IP))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for frame in self.receive_frames(left):
                reply = parse_arp_reply(frame, GATEWAY_IP)
                if reply is not None:
                    return reply

    # ---- the end -------------------------------------------------------------------------------
    def close(self) -> None:
        self.sock.close()
        for item in reversed(self._mine):
            item.close()
        self._mine.clear()

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---- frames -------------------------------------------------------------------------------------


def _eth(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def arp_request(mac: bytes, target_ip: bytes, sender_ip: bytes = bytes(4)) -> bytes:
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + sender_ip + bytes(6) + target_ip
    return _eth(BROADCAST_MAC, mac, 0x0806) + arp


def parse_arp_reply(frame: bytes, sender_ip: bytes) -> bytes | None:
    """The sender MAC of an ARP reply from `sender_ip`, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    op = struct.unpack_from("!H", frame, 20)[0]
    if op != 2 or frame[28:32] != sender_ip:
        return None
    return frame[22:28]


def _ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def dhcp_discover(mac: bytes, xid: int = 0x5EED1234) -> bytes:
    """A DHCP DISCOVER from `mac`, broadcast, as a whole Ethernet frame."""
    bootp = struct.pack("!BBBBIHH4s4s4s4s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4), bytes(4), bytes(4))
    bootp += mac + bytes(10) + bytes(64) + bytes(128) + b"\x63\x82\x53\x63"
    bootp += bytes([53, 1, 1, 55, 3, 1, 3, 6, 255])
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
    return _eth(BROADCAST_MAC, mac, 0x0800) + ip + udp


def parse_dhcp_offer(frame: bytes, xid: int = 0x5EED1234) -> bytes | None:
    """yiaddr of a DHCP OFFER for transaction `xid`, else None."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = 14 + ihl
    if struct.unpack_from("!H", frame, udp + 2)[0] != 68:
        return None
    bootp = udp + 8
    if frame[bootp] != 2 or struct.unpack_from("!I", frame, bootp + 4)[0] != xid:
        return None
    options = frame[bootp + 240 :]
    i = 0
    while i + 1 < len(options) and options[i] != 255:
        if options[i] == 0:
            i += 1
            continue
        if options[i] == 53 and options[i + 2] == 2:
            return frame[bootp + 16 : bootp + 20]
        i += 2 + options[i + 1]
    return None

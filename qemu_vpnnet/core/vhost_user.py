"""The vhost-user control channel, back-end side: messages from the front-end (QEMU) and the answers.

Sans-IO. The shell reads the Unix socket with recvmsg and hands each chunk to
`MessageDecoder.feed(data, fds)` together with the SCM_RIGHTS descriptors that came with it (plain
ints); it gets back complete `Message`s. `VhostUserBackend.handle(message)` updates the device
state and returns the `Reply` to write (or None); after every message the shell performs
`take_effects()` in order (map or unmap a memory region, close a descriptor, watch a kick
descriptor, start or stop or enable or disable a ring) and then writes the reply, so that an
acknowledged SET_MEM_TABLE is mapped before QEMU hears it went well. Ring processing itself is
core/virtqueue.py's; this module never touches guest memory.

Wire format (docs/interop/vhost-user.rst, little-endian as on every host QEMU runs this on):
request u32, flags u32 (version 1 in bits 0-1, REPLY 0x4, NEED_REPLY 0x8), size u32, then size
bytes of payload. A header with another version, the REPLY bit, an unknown flag bit or a size
above MAX_PAYLOAD is refused as soon as its 12 bytes are there, before any payload is buffered; so
the decoder never holds more than one partial message (12 + MAX_PAYLOAD bytes).

Descriptors: QEMU sends each message with one sendmsg, its descriptors on the first byte, and
Linux's recvmsg stops right after the data that carried descriptors. So the descriptors of one
chunk belong to the last message that starts inside that chunk; descriptors with no such message
(a chunk that only continues a message, or no data at all) are an error, and so are more than
MAX_FDS for one message. Ownership is never lost: every descriptor fed comes back exactly once,
either in a returned Message's fds or in a raised VhostUserError's fds (`MessageDecoder.take_fds()`
gives back those of a message still incomplete when the connection ends). `handle()` either
takes the message's descriptors (it holds them until an effect says "close-fd", or until
`shutdown()`) or raises with all of them in the error's fds, the state left as it was.

Errors. VhostUserError (a ValueError) means: close the error's fds, call `shutdown()` and perform
its effects, drop this one device (close the socket); the back-end and its other guests go on.
Raised for a malformed message (payload size not what the request needs, wrong descriptor count,
bad flags) and for one that breaks the protocol: a ring index other than 0 (RX) and 1 (TX); a
ring size that is not a power of two in 1..MAX_RING_SIZE; a base above 0xffff; ring addresses
not aligned as the split ring needs (16/2/4) or with flags other than none (VHOST_VRING_F_LOG
included: we offer no logging); ring configuration (num, base, addresses) of a started ring;
SET_FEATURES or SET_PROTOCOL_FEATURES with bits we did not offer, or SET_FEATURES while a ring
runs; a memory table of more than MAX_REGIONS regions, a region of size 0, one whose guest,
user or mmap-offset range passes 2**64, or two whose guest or user ranges overlap (also for
ADD_MEM_REG against the regions held, at most MAX_MEM_SLOTS); a second SET_OWNER; and any
request but the negotiation ones (GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
GET_MAX_MEM_SLOTS, SET_OWNER, RESET_OWNER) before SET_OWNER — QEMU sends those first, then
SET_OWNER, like the kernel's vhost which refuses everything else from a non-owner.
A request we do not implement (unknown numbers, SET_LOG_BASE/SET_LOG_FD since we offer no
VHOST_F_LOG_ALL, GET/SET_CONFIG since we offer no CONFIG, requests whose protocol feature was
not negotiated), an invalid MTU, and REM_MEM_REG of a region we do not hold are refused: when
REPLY_ACK was negotiated and the message asks for a reply, the answer is a nonzero ack (its
descriptors are closed through effects) and the device stays; otherwise VhostUserError.
With REPLY_ACK negotiated, NEED_REPLY on a request with no reply of its own gets an ack of 0;
without it the flag is ignored. RESET_OWNER (deprecated) disables both rings, as the spec advises.
SET_VRING_ENABLE is taken whenever we offered VHOST_USER_F_PROTOCOL_FEATURES.

Features offered by default (DEFAULT_FEATURES): VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF,
VIRTIO_RING_F_EVENT_IDX, VIRTIO_NET_F_MTU (QEMU passes it on only with host_mtu= set) and
VHOST_USER_F_PROTOCOL_FEATURES; OFFLOAD_FEATURES (checksum and TSO both ways) and
VIRTIO_RING_F_INDIRECT_DESC can be added through the constructor once the data path does them.
Not VIRTIO_F_NOTIFY_ON_EMPTY: a legacy-interface bit, meaningless with VERSION_1. Protocol features
offered: REPLY_ACK, NET_MTU (VHOST_USER_NET_SET_MTU, 68..65535) and CONFIGURE_MEM_SLOTS (then QEMU
7.2 sends GET_MAX_MEM_SLOTS and ADD_MEM_REG/REM_MEM_REG instead of SET_MEM_TABLE). Not MQ (one
queue pair; GET_QUEUE_NUM is still answered with 1), not CONFIG (QEMU's virtio-net keeps its
config space itself and masks CONFIG off for net devices).

Rings (the spec's "Ring states"): each starts stopped. It starts on its first kick — the shell
calls `kicked(index)` when the kick descriptor got readable, which starts it if num and addresses
are set and says whether to process it — or at once when SET_VRING_KICK asks for polling (no
descriptor). It stops on GET_VRING_BASE, whose reply carries the ring's `base`: the caller keeps
that field at the ring's last_avail_idx as it consumes (`set_last_avail_idx`), so the answer is
where it stopped; the kick descriptor is closed then (QEMU sends a new one before restarting).
If VHOST_USER_F_PROTOCOL_FEATURES was not negotiated a ring starts enabled; if it was, it starts
disabled and SET_VRING_ENABLE 1 enables it. Started but disabled: process TX and discard it,
give nothing to RX. A replaced kick, call or err descriptor is closed; a replaced memory table is
unmapped and its descriptors closed before the new one is mapped.
"""

import struct
from typing import Final, final

# requests, front-end to back-end
GET_FEATURES: Final = 1
SET_FEATURES: Final = 2
SET_OWNER: Final = 3
RESET_OWNER: Final = 4
SET_MEM_TABLE: Final = 5
SET_LOG_BASE: Final = 6
SET_LOG_FD: Final = 7
SET_VRING_NUM: Final = 8
SET_VRING_ADDR: Final = 9
SET_VRING_BASE: Final = 10
GET_VRING_BASE: Final = 11
SET_VRING_KICK: Final = 12
SET_VRING_CALL: Final = 13
SET_VRING_ERR: Final = 14
GET_PROTOCOL_FEATURES: Final = 15
SET_PROTOCOL_FEATURES: Final = 16
GET_QUEUE_NUM: Final = 17
SET_VRING_ENABLE: Final = 18
NET_SET_MTU: Final = 20
GET_CONFIG: Final = 24
SET_CONFIG: Final = 25
GET_MAX_MEM_SLOTS: Final = 36
ADD_MEM_REG: Final = 37
REM_MEM_REG: Final = 38

# header flags
VERSION: Final = 0x1
VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8

# virtio and vhost feature bits
VIRTIO_NET_F_CSUM: Final = 1 << 0
VIRTIO_NET_F_GUEST_CSUM: Final = 1 << 1
VIRTIO_NET_F_MTU: Final = 1 << 3
VIRTIO_NET_F_GUEST_TSO4: Final = 1 << 7
VIRTIO_NET_F_GUEST_TSO6: Final = 1 << 8
VIRTIO_NET_F_HOST_TSO4: Final = 1 << 11
VIRTIO_NET_F_HOST_TSO6: Final = 1 << 12
VIRTIO_NET_F_MRG_RXBUF: Final = 1 << 15
VHOST_F_LOG_ALL: Final = 1 << 26
VIRTIO_RING_F_INDIRECT_DESC: Final = 1 << 28
VIRTIO_RING_F_EVENT_IDX: Final = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES: Final = 1 << 30
VIRTIO_F_VERSION_1: Final = 1 << 32

OFFLOAD_FEATURES: Final = (
    VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
)
DEFAULT_FEATURES: Final = (
    VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_NET_F_MTU
    | VHOST_USER_F_PROTOCOL_FEATURES
)
SUPPORTED_FEATURES: Final = DEFAULT_FEATURES | OFFLOAD_FEATURES | VIRTIO_RING_F_INDIRECT_DESC

# protocol feature bits
PROTOCOL_F_MQ: Final = 1 << 0
PROTOCOL_F_REPLY_ACK: Final = 1 << 3
PROTOCOL_F_NET_MTU: Final = 1 << 4
PROTOCOL_F_CONFIG: Final = 1 << 9
PROTOCOL_F_CONFIGURE_MEM_SLOTS: Final = 1 << 15
PROTOCOL_FEATURES: Final = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_NET_MTU | PROTOCOL_F_CONFIGURE_MEM_SLOTS

HEADER_SIZE: Final = 12
MAX_PAYLOAD: Final = 4096  # the largest we take, SET_MEM_TABLE, is 8 + 8 * 32
MAX_FDS: Final = 8  # QEMU's VHOST_MEMORY_BASELINE_NREGIONS: the most one message carries
MAX_REGIONS: Final = 8  # regions in one SET_MEM_TABLE
MAX_MEM_SLOTS: Final = 32  # regions held at once with CONFIGURE_MEM_SLOTS (our GET_MAX_MEM_SLOTS)
NUM_RINGS: Final = 2
RX: Final = 0  # the device writes to the guest
TX: Final = 1  # the guest sends to the device
MAX_RING_SIZE: Final = 32768
MIN_MTU: Final = 68
MAX_MTU: Final = 65535

VRING_FD_INDEX_MASK: Final = 0xFF
VRING_NOFD: Final = 0x100
VRING_F_LOG: Final = 0x1

# effects the shell performs, in order, after each handled message
EFFECT_MMAP: Final = "mmap"  # region: map region.fd
EFFECT_UNMAP: Final = "unmap"  # region: unmap it (its fd is closed by a following close-fd)
EFFECT_CLOSE_FD: Final = "close-fd"  # fd: close it
EFFECT_WATCH_KICK: Final = "watch-kick"  # ring, fd: call kicked(ring) when fd gets readable (replaces the
# ring's watch; fd -1: no watch, the ring polls)
EFFECT_START: Final = "start"  # ring: process it from now on
EFFECT_STOP: Final = "stop"  # ring: stop processing it and stop watching its kick fd
EFFECT_ENABLE: Final = "enable"  # ring: it may now carry packets
EFFECT_DISABLE: Final = "disable"  # ring: started rings are still processed, without side effects

_U64_END: Final = 1 << 64
_HEADER: Final = struct.Struct("<III")
_U64: Final = struct.Struct("<Q")
_STATE: Final = struct.Struct("<II")
_ADDR: Final = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
_REGION: Final = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
_MEM_HEAD: Final = struct.Struct("<II")  # nregions, padding

# requests allowed before SET_OWNER (QEMU's vhost_user_backend_init sends them before it)
_BEFORE_OWNER: Final = frozenset(
    {
        GET_FEATURES,
        GET_PROTOCOL_FEATURES,
        SET_PROTOCOL_FEATURES,
        GET_QUEUE_NUM,
        GET_MAX_MEM_SLOTS,
        SET_OWNER,
        RESET_OWNER,
    }
)

REQUEST_NAMES: Final = {
    GET_FEATURES: "GET_FEATURES",
    SET_FEATURES: "SET_FEATURES",
    SET_OWNER: "SET_OWNER",
    RESET_OWNER: "RESET_OWNER",
    SET_MEM_TABLE: "SET_MEM_TABLE",
    SET_LOG_BASE: "SET_LOG_BASE",
    SET_LOG_FD: "SET_LOG_FD",
    SET_VRING_NUM: "SET_VRING_NUM",
    SET_VRING_ADDR: "SET_VRING_ADDR",
    SET_VRING_BASE: "SET_VRING_BASE",
    GET_VRING_BASE: "GET_VRING_BASE",
    SET_VRING_KICK: "SET_VRING_KICK",
    SET_VRING_CALL: "SET_VRING_CALL",
    SET_VRING_ERR: "SET_VRING_ERR",
    GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES",
    SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES",
    GET_QUEUE_NUM: "GET_QUEUE_NUM",
    SET_VRING_ENABLE: "SET_VRING_ENABLE",
    NET_SET_MTU: "NET_SET_MTU",
    GET_CONFIG: "GET_CONFIG",
    SET_CONFIG: "SET_CONFIG",
    GET_MAX_MEM_SLOTS: "GET_MAX_MEM_SLOTS",
    ADD_MEM_REG: "ADD_MEM_REG",
    REM_MEM_REG: "REM_MEM_REG",
}


def request_name(request: int) -> str:
    return REQUEST_NAMES.get(request, f"request {request}")


class VhostUserError(ValueError):
    """The front-end sent something we cannot accept: close `fds`, shut the device down, drop it."""

    def __init__(self, message: str, fds: list[int] | None = None) -> None:
        super().__init__(message)
        self.fds: list[int] = [] if fds is None else fds


class _Refused(Exception):
    """A well-formed request we do not carry out: a nonzero ack when one can be sent."""


def parse_header(data: bytes | bytearray) -> tuple[int, int, int]:
    """(request, flags, size) of the 12-byte header at the start of data; VhostUserError if unusable."""
    if len(data) < HEADER_SIZE:
        raise VhostUserError(f"vhost-user header truncated: {len(data)} of {HEADER_SIZE} bytes")
    request, flags, size = _HEADER.unpack_from(data, 0)
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(f"vhost-user {request_name(request)}: version {flags & VERSION_MASK}, not 1")
    if flags & ~(VERSION_MASK | FLAG_NEED_REPLY):
        raise VhostUserError(f"vhost-user {request_name(request)}: unexpected flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise VhostUserError(f"vhost-user {request_name(request)}: payload of {size} bytes, at most {MAX_PAYLOAD}")
    return int(request), int(flags), int(size)


@final
class Message:
    """One request from the front-end and the descriptors that came with it."""

    __slots__ = ("fds", "flags", "payload", "request")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def __repr__(self) -> str:
        return (
            f"Message({request_name(self.request)}, flags={self.flags:#x}, {len(self.payload)} bytes, fds={self.fds})"
        )


@final
class MessageDecoder:
    """Stream bytes and SCM_RIGHTS descriptors in, complete Messages out (see the module docstring)."""

    def __init__(self) -> None:
        self._buf = bytearray()  # at most one partial message, starting at offset 0
        self._fds: list[int] = []  # descriptors of that partial message
        self._failed = False

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Message]:
        """The messages completed by data; VhostUserError (holding every descriptor not handed out) on a
        framing error, after which the decoder refuses all input."""
        new_fds = [] if fds is None else list(fds)
        if self._failed:
            raise VhostUserError("vhost-user stream already failed", new_fds)
        chunk_start = len(self._buf)
        self._buf += data
        starts: list[int] = []
        parsed: list[Message] = []
        pos = 0
        end = len(self._buf)
        try:
            while end - pos >= HEADER_SIZE:
                request, flags, size = parse_header(self._buf[pos : pos + HEADER_SIZE])
                if end - pos - HEADER_SIZE < size:
                    break
                payload = bytes(self._buf[pos + HEADER_SIZE : pos + HEADER_SIZE + size])
                starts.append(pos)
                parsed.append(Message(request, flags, payload, []))
                pos += HEADER_SIZE + size
            # the owner of new_fds: the last message starting in this chunk (-1: the trailing partial one)
            owner = -2
            if pos < end and pos >= chunk_start:
                owner = -1
            else:
                for i in range(len(parsed) - 1, -1, -1):
                    if starts[i] >= chunk_start:
                        owner = i
                        break
            if new_fds and owner == -2:
                raise VhostUserError(f"vhost-user: {len(new_fds)} descriptors with no message starting in their data")
            if len(new_fds) > MAX_FDS:
                raise VhostUserError(f"vhost-user: {len(new_fds)} descriptors with one message, at most {MAX_FDS}")
        except VhostUserError as e:
            self._failed = True
            e.fds = self._fds + new_fds
            self._fds = []
            self._buf = bytearray()
            raise
        if parsed and starts[0] < chunk_start:
            parsed[0].fds = self._fds  # the partial message of earlier chunks is complete now
            self._fds = []
        if new_fds:
            if owner == -1:
                self._fds = new_fds
            else:
                parsed[owner].fds = new_fds
        del self._buf[:pos]
        return parsed

    def take_fds(self) -> list[int]:
        """Descriptors of a message still incomplete (the connection ended): the caller closes them."""
        fds = self._fds
        self._fds = []
        self._buf = bytearray()
        return fds

    @property
    def buffered(self) -> int:
        return len(self._buf)


@final
class Reply:
    """An answer to the front-end: same request number, flags version|REPLY."""

    __slots__ = ("payload", "request")

    def __init__(self, request: int, payload: bytes) -> None:
        self.request = request
        self.payload = payload

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.request, VERSION | FLAG_REPLY, len(self.payload)) + self.payload

    def __repr__(self) -> str:
        return f"Reply({request_name(self.request)}, {self.payload.hex()})"


@final
class Region:
    """One region of guest memory: guest-physical [guest_phys_addr, +size) is the front-end's user
    addresses [userspace_addr, +size) and bytes [mmap_offset, +size) of fd."""

    __slots__ = ("fd", "guest_phys_addr", "mmap_offset", "size", "userspace_addr")

    def __init__(self, guest_phys_addr: int, size: int, userspace_addr: int, mmap_offset: int, fd: int) -> None:
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.userspace_addr = userspace_addr
        self.mmap_offset = mmap_offset
        self.fd = fd

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.guest_phys_addr, self.size, self.userspace_addr, self.mmap_offset, self.fd)

    def __repr__(self) -> str:
        return (
            f"Region(gpa={self.guest_phys_addr:#x}, size={self.size:#x}, uva={self.userspace_addr:#x}, "
            f"offset={self.mmap_offset:#x}, fd={self.fd})"
        )


@final
class Effect:
    """Something the shell does for the back-end: kind is one of the EFFECT_ names; ring, fd and region
    are set where the kind needs them (-1 / None otherwise)."""

    __slots__ = ("fd", "kind", "region", "ring")

    def __init__(self, kind: str, ring: int = -1, fd: int = -1, region: Region | None = None) -> None:
        self.kind = kind
        self.ring = ring
        self.fd = fd
        self.region = region

    def __repr__(self) -> str:
        return f"Effect({self.kind}, ring={self.ring}, fd={self.fd}, region={self.region})"


@final
class Vring:
    """What the front-end told us about one ring (-1: no descriptor; 0 addresses until SET_VRING_ADDR)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0  # 0 until SET_VRING_NUM
        self.addr_set = False
        self.addr_flags = 0
        self.desc_addr = 0  # front-end user addresses
        self.used_addr = 0
        self.avail_addr = 0
        self.log_addr = 0
        self.base = 0  # last_avail_idx: set by SET_VRING_BASE, kept current by the caller
        self.kick_fd = -1
        self.kick_polling = False  # SET_VRING_KICK without a descriptor: poll the ring
        self.call_fd = -1  # -1: no call (SET_VRING_CALL without descriptor, or none yet)
        self.err_fd = -1
        self.enabled = False
        self.started = False

    @property
    def configured(self) -> bool:
        return self.num > 0 and self.addr_set

    def __repr__(self) -> str:
        return (
            f"Vring({self.index}, num={self.num}, base={self.base}, kick={self.kick_fd}, call={self.call_fd}, "
            f"err={self.err_fd}, enabled={self.enabled}, started={self.started})"
        )


def _u64(message: Message) -> int:
    _check_size(message, 8)
    value: int = _U64.unpack(message.payload)[0]
    return value


def _check_size(message: Message, size: int) -> None:
    if len(message.payload) != size:
        raise VhostUserError(
            f"vhost-user {request_name(message.request)}: payload of {len(message.payload)} bytes, needs {size}"
        )


def _check_fds(message: Message, count: int) -> None:
    if len(message.fds) != count:
        raise VhostUserError(
            f"vhost-user {request_name(message.request)}: {len(message.fds)} descriptors, needs {count}"
        )


def _ring_index(message: Message, index: int) -> int:
    if index >= NUM_RINGS:
        raise VhostUserError(f"vhost-user {request_name(message.request)}: ring {index}, we have {NUM_RINGS}")
    return index


def _parse_region(message: Message, data: bytes, offset: int, fd: int) -> Region:
    gpa, size, uva, mmap_offset = _REGION.unpack_from(data, offset)
    region = Region(int(gpa), int(size), int(uva), int(mmap_offset), fd)
    name = request_name(message.request)
    if region.size == 0:
        raise VhostUserError(f"vhost-user {name}: {region!r} is empty")
    if gpa + size > _U64_END or uva + size > _U64_END or mmap_offset + size > _U64_END:
        raise VhostUserError(f"vhost-user {name}: {region!r} runs past 2**64")
    return region


def _overlap(a: Region, b: Region) -> bool:
    guest = a.guest_phys_addr < b.guest_phys_addr + b.size and b.guest_phys_addr < a.guest_phys_addr + a.size
    user = a.userspace_addr < b.userspace_addr + b.size and b.userspace_addr < a.userspace_addr + a.size
    return guest or user


@final
class VhostUserBackend:
    """The back-end's side of one vhost-user connection (one virtio-net device, rings RX and TX)."""

    def __init__(self, features: int = DEFAULT_FEATURES, protocol_features: int = PROTOCOL_FEATURES) -> None:
        if features & ~SUPPORTED_FEATURES:
            raise ValueError(f"vhost-user: cannot offer features {features & ~SUPPORTED_FEATURES:#x}")
        if protocol_features & ~PROTOCOL_FEATURES:
            raise ValueError(f"vhost-user: cannot offer protocol features {protocol_features & ~PROTOCOL_FEATURES:#x}")
        self.offered_features = features
        self.offered_protocol_features = protocol_features if features & VHOST_USER_F_PROTOCOL_FEATURES else 0
        self.features = 0  # negotiated by SET_FEATURES
        self.features_set = False
        self.protocol_features = 0  # negotiated by SET_PROTOCOL_FEATURES
        self.owner = False
        self.mtu = 0  # from NET_SET_MTU; 0 when QEMU sent none
        self.regions: list[Region] = []
        self.rings: list[Vring] = [Vring(i) for i in range(NUM_RINGS)]
        self.effects: list[Effect] = []

    # the state the caller reads

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & PROTOCOL_F_REPLY_ACK)

    @property
    def protocol_features_negotiated(self) -> bool:
        return bool(self.features & VHOST_USER_F_PROTOCOL_FEATURES)

    def take_effects(self) -> list[Effect]:
        effects = self.effects
        self.effects = []
        return effects

    def held_fds(self) -> list[int]:
        """Every descriptor the back-end holds now (region, kick, call, err)."""
        fds = [r.fd for r in self.regions]
        for ring in self.rings:
            fds.extend(fd for fd in (ring.kick_fd, ring.call_fd, ring.err_fd) if fd >= 0)
        return fds

    def set_last_avail_idx(self, index: int, value: int) -> None:
        """The ring code's progress: what GET_VRING_BASE will answer for this ring."""
        self.rings[index].base = value & 0xFFFF

    def kicked(self, index: int) -> bool:
        """The ring's kick descriptor got readable: start it if it is ready; whether to process it now."""
        ring = self.rings[index]
        if not ring.started and ring.kick_fd >= 0 and ring.configured:
            self._start(ring)
        return ring.started

    def shutdown(self) -> list[Effect]:
        """The device goes away (connection closed or dropped): stop, unmap and close everything."""
        for ring in self.rings:
            if ring.started:
                self._stop(ring)
            for fd in (ring.kick_fd, ring.call_fd, ring.err_fd):
                if fd >= 0:
                    self._close(fd)
            ring.kick_fd = ring.call_fd = ring.err_fd = -1
            ring.enabled = False
        self._unmap_all()
        return self.take_effects()

    # handling one message

    def handle(self, message: Message) -> Reply | None:
        """Carry out one request; the reply to send, if any. VhostUserError: drop the device (the error's
        fds are this message's descriptors, not taken)."""
        try:
            reply = self._dispatch(message)
        except VhostUserError as e:
            e.fds = list(message.fds)
            raise
        except _Refused as refused:
            if not (message.need_reply and self.reply_ack):
                raise VhostUserError(str(refused), list(message.fds)) from None
            for fd in message.fds:
                self._close(fd)
            return Reply(message.request, _U64.pack(1))
        if reply is None and message.need_reply and self.reply_ack:
            return Reply(message.request, _U64.pack(0))
        return reply

    def _dispatch(self, m: Message) -> Reply | None:
        request = m.request
        name = request_name(request)
        if request == SET_OWNER and self.owner:
            raise VhostUserError("vhost-user SET_OWNER: the device already has an owner")
        if request not in REQUEST_NAMES or request in (SET_LOG_BASE, SET_LOG_FD, GET_CONFIG, SET_CONFIG):
            raise _Refused(f"vhost-user {name}: not supported")
        if request in (GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES) and not self.offered_protocol_features:
            raise _Refused(f"vhost-user {name}: protocol features were not offered")
        if request in (GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG) and not (
            self.protocol_features & PROTOCOL_F_CONFIGURE_MEM_SLOTS
        ):
            raise _Refused(f"vhost-user {name}: CONFIGURE_MEM_SLOTS was not negotiated")
        if request == NET_SET_MTU and not self.protocol_features & PROTOCOL_F_NET_MTU:
            raise _Refused(f"vhost-user {name}: NET_MTU was not negotiated")
        if request == SET_VRING_ENABLE and not self.offered_features & VHOST_USER_F_PROTOCOL_FEATURES:
            raise _Refused(f"vhost-user {name}: protocol features were not offered")
        if not self.owner and request not in _BEFORE_OWNER:
            raise VhostUserError(f"vhost-user {name} before SET_OWNER")
        if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            self._vring_fd(m)
            return None
        if request == SET_MEM_TABLE:
            self._set_mem_table(m)
            return None
        if request == ADD_MEM_REG or request == REM_MEM_REG:
            self._mem_reg(m)
            return None
        _check_fds(m, 0)
        if request == GET_FEATURES:
            _check_size(m, 0)
            return Reply(request, _U64.pack(self.offered_features))
        if request == GET_PROTOCOL_FEATURES:
            _check_size(m, 0)
            return Reply(request, _U64.pack(self.offered_protocol_features))
        if request == GET_QUEUE_NUM:
            _check_size(m, 0)
            return Reply(request, _U64.pack(1))
        if request == GET_MAX_MEM_SLOTS:
            _check_size(m, 0)
            return Reply(request, _U64.pack(MAX_MEM_SLOTS))
        if request == SET_OWNER:
            _check_size(m, 0)
            self.owner = True
            return None
        if request == RESET_OWNER:
            _check_size(m, 0)
            for ring in self.rings:  # the spec's advice for this deprecated request: disable all rings
                self._enable(ring, False)
            return None
        if request == SET_FEATURES:
            self._set_features(m)
            return None
        if request == SET_PROTOCOL_FEATURES:
            value = _u64(m)
            if value & ~self.offered_protocol_features:
                raise VhostUserError(f"vhost-user {name}: {value:#x} has bits we did not offer")
            self.protocol_features = value
            return None
        if request == NET_SET_MTU:
            value = _u64(m)
            if not MIN_MTU <= value <= MAX_MTU:
                raise _Refused(f"vhost-user {name}: MTU {value} not in {MIN_MTU}..{MAX_MTU}")
            self.mtu = value
            return None
        if request == SET_VRING_ADDR:
            self._set_vring_addr(m)
            return None
        _check_size(m, _STATE.size)
        raw_index, num = _STATE.unpack(m.payload)
        ring = self.rings[_ring_index(m, raw_index)]
        if request == GET_VRING_BASE:
            if ring.started:
                self._stop(ring)
            if ring.kick_fd >= 0:
                self._close(ring.kick_fd)
                ring.kick_fd = -1
            ring.kick_polling = False
            return Reply(request, _STATE.pack(ring.index, ring.base))
        if request == SET_VRING_ENABLE:
            if num > 1:
                raise VhostUserError(f"vhost-user {name}: ring {ring.index} state {num}, not 0 or 1")
            self._enable(ring, num == 1)
            return None
        if ring.started:
            raise VhostUserError(f"vhost-user {name}: ring {ring.index} is running")
        if request == SET_VRING_NUM:
            if num == 0 or num > MAX_RING_SIZE or num & (num - 1):
                raise VhostUserError(f"vhost-user {name}: ring {ring.index} size {num}: not a power of 2 up to 32768")
            ring.num = num
            return None
        # SET_VRING_BASE
        if num > 0xFFFF:
            raise VhostUserError(f"vhost-user {name}: ring {ring.index} base {num} above 0xffff")
        ring.base = num
        return None

    def _set_features(self, m: Message) -> None:
        value = _u64(m)
        if value & ~self.offered_features:
            raise VhostUserError(f"vhost-user SET_FEATURES: {value:#x} has bits we did not offer")
        if any(ring.started for ring in self.rings):
            raise VhostUserError("vhost-user SET_FEATURES while a ring is running")
        self.features = value
        self.features_set = True

    def _set_vring_addr(self, m: Message) -> None:
        _check_size(m, _ADDR.size)
        raw_index, flags, desc, used, avail, log = _ADDR.unpack(m.payload)
        ring = self.rings[_ring_index(m, raw_index)]
        if flags & VRING_F_LOG:
            raise VhostUserError(f"vhost-user SET_VRING_ADDR: ring {ring.index} asks for logging, not offered")
        if flags:
            raise VhostUserError(f"vhost-user SET_VRING_ADDR: ring {ring.index} flags {flags:#x}")
        if desc % 16 or avail % 2 or used % 4:
            raise VhostUserError(
                f"vhost-user SET_VRING_ADDR: {ring.index} misaligned: desc {desc:#x} avail {avail:#x} used {used:#x}"
            )
        if ring.started:
            raise VhostUserError(f"vhost-user SET_VRING_ADDR: ring {ring.index} is running")
        ring.addr_flags = flags
        ring.desc_addr = desc
        ring.used_addr = used
        ring.avail_addr = avail
        ring.log_addr = log
        ring.addr_set = True

    def _vring_fd(self, m: Message) -> None:
        name = request_name(m.request)
        value = _u64(m)
        if value & ~(VRING_FD_INDEX_MASK | VRING_NOFD):
            raise VhostUserError(f"vhost-user {name}: unknown bits in {value:#x}")
        ring = self.rings[_ring_index(m, value & VRING_FD_INDEX_MASK)]
        nofd = bool(value & VRING_NOFD)
        _check_fds(m, 0 if nofd else 1)
        if m.request == SET_VRING_KICK and nofd and not ring.configured:
            raise VhostUserError(f"vhost-user {name}: polling ring {ring.index} before its size and addresses")
        fd = -1 if nofd else m.fds[0]
        if m.request == SET_VRING_KICK:
            old = ring.kick_fd
            ring.kick_fd = fd
            ring.kick_polling = nofd
            if fd >= 0:
                self.effects.append(Effect(EFFECT_WATCH_KICK, ring=ring.index, fd=fd))
            elif ring.started:
                self.effects.append(Effect(EFFECT_WATCH_KICK, ring=ring.index, fd=-1))  # stop watching the old one
        elif m.request == SET_VRING_CALL:
            old = ring.call_fd
            ring.call_fd = fd
        else:
            old = ring.err_fd
            ring.err_fd = fd
        if old >= 0:
            self._close(old)
        if m.request == SET_VRING_KICK and nofd and not ring.started:
            self._start(ring)

    def _set_mem_table(self, m: Message) -> None:
        if len(m.payload) < _MEM_HEAD.size:
            raise VhostUserError(f"vhost-user SET_MEM_TABLE: payload of {len(m.payload)} bytes")
        count = int(_MEM_HEAD.unpack_from(m.payload, 0)[0])
        if count > MAX_REGIONS:
            raise VhostUserError(f"vhost-user SET_MEM_TABLE: {count} regions, at most {MAX_REGIONS}")
        _check_size(m, _MEM_HEAD.size + count * _REGION.size)
        _check_fds(m, count)
        regions: list[Region] = []
        for i in range(count):
            region = _parse_region(m, m.payload, _MEM_HEAD.size + i * _REGION.size, m.fds[i])
            for other in regions:
                if _overlap(region, other):
                    raise VhostUserError(f"vhost-user SET_MEM_TABLE: {region!r} overlaps {other!r}")
            regions.append(region)
        self._unmap_all()
        self.regions = regions
        for region in regions:
            self.effects.append(Effect(EFFECT_MMAP, region=region))

    def _mem_reg(self, m: Message) -> None:
        name = request_name(m.request)
        _check_size(m, 8 + _REGION.size)
        if m.request == ADD_MEM_REG:
            _check_fds(m, 1)
            region = _parse_region(m, m.payload, 8, m.fds[0])
            for other in self.regions:
                if _overlap(region, other):
                    raise VhostUserError(f"vhost-user {name}: {region!r} overlaps {other!r}")
            if len(self.regions) >= MAX_MEM_SLOTS:
                raise VhostUserError(f"vhost-user {name}: already {len(self.regions)} regions, at most {MAX_MEM_SLOTS}")
            self.regions.append(region)
            self.effects.append(Effect(EFFECT_MMAP, region=region))
            return
        if len(m.fds) > 1:  # the spec lets a REM_MEM_REG carry one (to be closed unused)
            _check_fds(m, 1)
        gpa, size, uva, _ = _REGION.unpack_from(m.payload, 8)
        found = -1
        for i, region in enumerate(self.regions):
            if region.guest_phys_addr == gpa and region.size == size and region.userspace_addr == uva:
                found = i
        if found < 0:
            raise _Refused(f"vhost-user {name}: no region gpa {gpa:#x} size {size:#x} uva {uva:#x}")
        held = self.regions.pop(found)
        self.effects.append(Effect(EFFECT_UNMAP, region=held))
        self._close(held.fd)
        for fd in m.fds:
            self._close(fd)

    # state changes with their effects

    def _close(self, fd: int) -> None:
        self.effects.append(Effect(EFFECT_CLOSE_FD, fd=fd))

    def _unmap_all(self) -> None:
        for region in self.regions:
            self.effects.append(Effect(EFFECT_UNMAP, region=region))
            self._close(region.fd)
        self.regions = []

    def _start(self, ring: Vring) -> None:
        ring.started = True
        self.effects.append(Effect(EFFECT_START, ring=ring.index))
        if not self.protocol_features_negotiated:
            self._enable(ring, True)  # without protocol features a ring starts enabled

    def _stop(self, ring: Vring) -> None:
        ring.started = False
        self.effects.append(Effect(EFFECT_STOP, ring=ring.index))

    def _enable(self, ring: Vring, enabled: bool) -> None:
        if ring.enabled != enabled:
            ring.enabled = enabled
            self.effects.append(Effect(EFFECT_ENABLE if enabled else EFFECT_DISABLE, ring=ring.index))

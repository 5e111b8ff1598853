"""Split virtqueues (virtio 1.x, section 2.7) over guest memory shared by vhost-user, sans-IO.

A vhost-user back-end reads the guest's descriptor chains and writes its used ring directly in
the guest's RAM, which QEMU shares as a handful of regions (SET_MEM_TABLE: one fd per region,
mmap'd here). Everything in that memory is written by the guest's driver and is untrusted: a
bad ring must make this code raise RingError, never read or write outside the shared regions,
never loop, and never leave a half-written used ring. The caller then drops that one device
(with a log line) and keeps serving the others; this module does no I/O and no logging.

Memory. A MemoryTable holds up to MAX_REGIONS (509, libvhost-user's VHOST_USER_MAX_RAM_SLOTS,
the slots Linux's vhost offers; QEMU's front-end itself allows up to 512) MemoryRegions, each
(guest_phys_addr, size, userspace_addr, mmap_offset) over a writable buffer: in production the
mmap of the region's fd, mapped from file offset 0 with at least mmap_offset + size bytes, so
the region's first byte is buffer[mmap_offset]; in tests a bytearray. Regions are at least one
byte, end at or below 2**64 in both address spaces, and must not overlap in guest-physical nor
in QEMU's user (virtual) address space; a table that breaks any of this is refused. Addresses
are translated to (region index, offset into that region's buffer):
`translate_gpa` for descriptor addresses (guest physical), `translate_uva` for the ring
addresses vhost-user's SET_VRING_ADDR gives (QEMU's virtual addresses). A range must have a
length of at least one byte (a zero-length range points at nothing, so it is refused rather
than given an arbitrary region) and lie entirely inside one region; the sum addr + length is
checked against 2**64 explicitly, as the u64 arithmetic of a C back-end would wrap. A buffer
of a descriptor chain may span regions that are adjacent in guest-physical space (QEMU splits
RAM at the PCI hole and at DIMM boundaries, and a driver's buffer is only physically
contiguous): it is then split into one piece per region. The rings themselves and indirect
tables must lie inside one region each, as they are read in place.

Queues. SplitQueue(memory, num, desc_uva, avail_uva, used_uva) checks that num is a power of
two from 1 to 32768, that the descriptor table (16 * num bytes, 16-aligned), the available
ring (6 + 2 * num bytes, 2-aligned) and the used ring (6 + 8 * num bytes, 4-aligned) each lie
in one region. Ring indices are free-running u16 (slot = idx % num). The queue keeps its own
copy of the used index (read from the ring once, when the queue is built, as libvhost-user
does) and of last_avail_idx, so a guest scribbling on used.idx cannot steer it.

`pop()` returns the next Chain, or None when the guest has made nothing new available. It
checks, raising RingError otherwise: avail.idx is at most num ahead of last_avail_idx (a
guest cannot have more chains outstanding than the ring holds); the head and every `next`
index are below the table's size; a chain has at most num descriptors (at most the table's
entries inside an indirect table), which also ends any loop; an INDIRECT descriptor is the
chain's head and only descriptor (the spec forbids INDIRECT with NEXT; a later one in a direct
chain is refused too), has a nonzero length that is a multiple of 16 and at most 32768 entries,
lies in one region, and holds no INDIRECT descriptor itself; every buffer translates; no
device-readable descriptor follows a device-writable one (2.7.4.2); the chain's readable plus
writable bytes total at most MAX_CHAIN_BYTES (2**32 - 1, as used.len is a u32). Zero-length
descriptors are accepted and skipped without translating their address (QEMU refuses them,
which has wedged guests such as Linux's virtio-net sending an RSS command without a key), but
they still count toward the chain length and the readable-before-writable order. The WRITE
flag of an indirect descriptor itself is ignored, as the spec says. Each descriptor is read
from guest memory exactly once, so a guest rewriting its table meanwhile cannot make a checked
value differ from the used one.

A Chain has no object per descriptor: its readable and writable pieces are flat lists of ints,
three per piece (region index, offset in the region's buffer, length in bytes), plus its head
index and its readable and writable byte counts. `read(chain)` gathers the readable bytes;
`write(chain, data, offset)` scatters into the writable pieces, never past them, and returns
the bytes written. The guest may change its buffers after pop(); that only garbles its own data.

`write_frame` is pop() and write() for one RX frame in C (core/_vring.c), when it is built: the
common case only (direct, device-writable descriptors, each inside one region). For anything
else it declines, having changed nothing, and the caller does the same with pop() and write(),
which accept a superset with the same results and raise the RingErrors.

`push(head, length)` (and `push_batch`) writes used elements, then the used index; nothing is
written when an argument is bad. `needs_notify(old_used_idx)` says whether to signal the call
eventfd after pushes since old_used_idx: with VIRTIO_RING_F_EVENT_IDX, vring_need_event over
the guest's used_event; without it, unless the guest set VIRTQ_AVAIL_F_NO_INTERRUPT.
`set_avail_event` and `set_no_notify` are the same hints the other way (kicks from the guest).

After a RingError from pop() or available() the queue is broken: every later pop, push and
available raises RingError, so nothing more reaches the guest's used ring; last_avail_idx can
still be read. A queue holds views of the table's buffers: after SET_MEM_TABLE replaces the
memory, release the old table and build the queues again (their ring addresses re-translated).

Memory ordering and atomicity. The guest's CPUs run concurrently with us. Every 16-bit field
the other side may read or write meanwhile (avail.idx, avail.flags, used_event, used.idx,
used.flags, avail_event) is accessed as one aligned 16-bit load or store: an item of a
memoryview cast to "H" over the ring (a single memcpy of an unsigned short in CPython's
memoryview; byte-swapped on a big-endian host). Never struct's pack_into there: it zeroes the
target first and "<H" then stores byte by byte, and a guest reading used.idx in between saw an
index 256 behind, took stale used elements ("id N is not a head!" in Linux) and stopped the
queue. Elements, descriptors and ring entries are published by an index and are stable while
it says so, so struct may read and write them. Each load or store here is a separate call that
the C compiler cannot merge or reorder across, and on x86 (TSO) the CPU keeps stores in order
and loads in order, so avail.idx is read before the ring entries and a used element is written
before the used index (other CPUs get a fence there). A store followed by a load (used.idx,
then the guest's used_event or flags, in needs_notify; avail_event, then avail.idx, in the
callers of set_avail_event) can be reordered even on x86, and then a kick or an interrupt is
lost: `fence()` (a full barrier from the C fast path; nothing without it) sits between them.
"""

import mmap
import platform
import struct
import sys
from typing import Final, final

try:  # the full memory barrier of the C fast path (core/_fastpath.c); optional
    from qemu_vpnnet.core._fastpath import fence as c_fence

    HAVE_FENCE: Final = True
except ImportError:
    HAVE_FENCE = False  # type: ignore[misc]


try:  # one frame into the RX ring without a Python object per descriptor (core/_vring.c); optional
    from qemu_vpnnet.core._vring import rx_fill as c_rx_fill
    from qemu_vpnnet.core._vring import rx_segments as c_rx_segments

    HAVE_RX_FILL: Final = True
except ImportError:
    HAVE_RX_FILL = False  # type: ignore[misc]


def fence() -> None:
    """A full memory barrier; none without the C fast path (a lost kick or interrupt then waits
    for the next one)."""
    if HAVE_FENCE:
        c_fence()


MAX_QUEUE_SIZE: Final = 32768  # virtio's limit on num
MAX_REGIONS: Final = 509  # libvhost-user's VHOST_USER_MAX_RAM_SLOTS
MAX_CHAIN_BYTES: Final = 0xFFFFFFFF  # used.len is a u32
MAX_INDIRECT: Final = 32768  # entries in one indirect table (Linux sizes it by the request)
_U64_END: Final = 1 << 64

DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4
AVAIL_F_NO_INTERRUPT: Final = 1
USED_F_NO_NOTIFY: Final = 1

DESC_SIZE: Final = 16

_DESC: Final = struct.Struct("<QIHH")  # addr, len, flags, next
_LITTLE_ENDIAN: Final = sys.byteorder == "little"
_TSO: Final = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")  # loads and stores stay in order
_USED_ELEM: Final = struct.Struct("<II")  # id, len
_REGION_ROW: Final = struct.Struct("=4Q")  # a row of MemoryTable.c_table, in the C code's byte order

Buffer = bytearray | memoryview | mmap.mmap


def load16(words: memoryview, index: int) -> int:
    """The little-endian u16 words[index] of a memoryview cast to "H", read with one 16-bit load."""
    value: int = words[index]
    return value if _LITTLE_ENDIAN else ((value & 0xFF) << 8) | (value >> 8)


def store16(words: memoryview, index: int, value: int) -> None:
    """Write value as the little-endian u16 words[index] with one 16-bit store."""
    words[index] = value if _LITTLE_ENDIAN else ((value & 0xFF) << 8) | (value >> 8)


class RingError(ValueError):
    """The guest's rings, or the memory table describing them, are malformed: drop the device."""


@final
class MemoryRegion:
    """One shared region: guest-physical [gpa, gpa+size) is buffer[mmap_offset : mmap_offset+size]."""

    def __init__(self, guest_phys_addr: int, size: int, userspace_addr: int, mmap_offset: int, buffer: Buffer) -> None:
        if not (0 <= guest_phys_addr < _U64_END and 0 <= userspace_addr < _U64_END and 0 <= mmap_offset < _U64_END):
            raise RingError("memory region: address out of the u64 range")
        if size < 1 or guest_phys_addr + size > _U64_END or userspace_addr + size > _U64_END:
            raise RingError(f"memory region: bad size {size:#x} at gpa {guest_phys_addr:#x} uva {userspace_addr:#x}")
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise RingError("memory region: buffer is read-only")
        if mmap_offset + size > len(view):
            raise RingError(f"memory region: mmap_offset {mmap_offset:#x} + size {size:#x} exceeds the mapping")
        self.gpa = guest_phys_addr
        self.size = size
        self.uva = userspace_addr
        self.mmap_offset = mmap_offset
        self.view = view


@final
class MemoryTable:
    """The guest's shared memory: at most MAX_REGIONS regions, overlapping in neither address space."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        if len(regions) > MAX_REGIONS:
            raise RingError(f"memory table: {len(regions)} regions, at most {MAX_REGIONS}")
        self.regions = list(regions)
        order = sorted(range(len(regions)), key=lambda i: regions[i].gpa)
        for k in range(1, len(order)):
            a = order[k - 1]
            b = order[k]
            if regions[a].gpa + regions[a].size > regions[b].gpa:
                raise RingError(f"memory table: regions {a} and {b} overlap in guest-physical space")
        by_uva = sorted(range(len(regions)), key=lambda i: regions[i].uva)
        for k in range(1, len(by_uva)):
            a = by_uva[k - 1]
            b = by_uva[k]
            if regions[a].uva + regions[a].size > regions[b].uva:
                raise RingError(f"memory table: regions {a} and {b} overlap in user address space")
        self._gpa_order = order  # region indices by guest-physical address
        self._gpa_starts = [regions[i].gpa for i in order]
        # the same for core/_vring.c: (gpa, size, mmap_offset, index) u64s by gpa, and the buffers
        self.c_table = b"".join(
            _REGION_ROW.pack(regions[i].gpa, regions[i].size, regions[i].mmap_offset, i) for i in order
        )
        self.c_views = [region.view for region in regions]
        self._words: list[memoryview] = []  # the queues' 16-bit views (released with the table)

    def words(self, index: int, offset: int, length: int) -> memoryview:
        """Region index's bytes [offset, offset+length) (length even) as a memoryview of u16."""
        view = self.regions[index].view[offset : offset + length].cast("H")
        self._words.append(view)
        return view

    def release(self) -> None:
        """Drop the views, so that the mmaps can be closed; the table and its queues are unusable after."""
        for words in self._words:
            words.release()
        self._words.clear()
        for region in self.regions:
            region.view.release()

    def _find_gpa(self, addr: int) -> int:
        """Index of the region holding guest-physical byte addr; RingError when none does."""
        starts = self._gpa_starts
        lo = 0
        hi = len(starts)
        while lo < hi:
            mid = (lo + hi) >> 1
            if starts[mid] <= addr:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            raise RingError(f"guest address {addr:#x} is in no memory region")
        index = self._gpa_order[lo - 1]
        region = self.regions[index]
        if addr >= region.gpa + region.size:
            raise RingError(f"guest address {addr:#x} is in no memory region")
        return index

    def translate_gpa(self, addr: int, length: int) -> tuple[int, int]:
        """(region index, offset in its buffer) of guest-physical [addr, addr+length), inside one region."""
        if addr < 0 or length < 1 or addr + length > _U64_END:
            raise RingError(f"guest range {addr:#x}+{length:#x} is empty or past 2**64")
        index = self._find_gpa(addr)
        region = self.regions[index]
        if addr + length > region.gpa + region.size:
            raise RingError(f"guest range {addr:#x}+{length:#x} crosses the end of memory region {index}")
        return index, region.mmap_offset + (addr - region.gpa)

    def translate_uva(self, addr: int, length: int) -> tuple[int, int]:
        """(region index, offset in its buffer) of QEMU-virtual [addr, addr+length), inside one region."""
        if addr < 0 or length < 1 or addr + length > _U64_END:
            raise RingError(f"user range {addr:#x}+{length:#x} is empty or past 2**64")
        for index, region in enumerate(self.regions):
            if region.uva <= addr < region.uva + region.size:
                if addr + length > region.uva + region.size:
                    raise RingError(f"user range {addr:#x}+{length:#x} crosses the end of memory region {index}")
                return index, region.mmap_offset + (addr - region.uva)
        raise RingError(f"user address {addr:#x} is in no memory region")

    def append_pieces(self, addr: int, length: int, out: list[int]) -> None:
        """Append guest-physical [addr, addr+length) to out as (region, offset, length) triples, one per region."""
        if addr < 0 or length < 1 or addr + length > _U64_END:
            raise RingError(f"guest buffer {addr:#x}+{length:#x} is empty or past 2**64")
        while length > 0:  # each turn moves into the next region: at most len(regions) turns
            index = self._find_gpa(addr)
            region = self.regions[index]
            take = min(length, region.gpa + region.size - addr)
            out.append(index)
            out.append(region.mmap_offset + (addr - region.gpa))
            out.append(take)
            addr += take
            length -= take


@final
class Chain:
    """One descriptor chain: pieces are flat [region, offset, length, ...] lists, readable then writable."""

    def __init__(
        self, head: int, readable: list[int], writable: list[int], readable_bytes: int, writable_bytes: int
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_bytes = readable_bytes
        self.writable_bytes = writable_bytes


@final
class SplitQueue:
    """A split virtqueue whose three areas lie in `memory`, at QEMU-virtual addresses."""

    def __init__(
        self,
        memory: MemoryTable,
        num: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        event_idx: bool = False,
        last_avail_idx: int = 0,
    ) -> None:
        if num < 1 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} is not a power of two from 1 to {MAX_QUEUE_SIZE}")
        if desc_uva % 16 or avail_uva % 2 or used_uva % 4:
            raise RingError(f"misaligned rings: desc {desc_uva:#x} avail {avail_uva:#x} used {used_uva:#x}")
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise RingError(f"last_avail_idx {last_avail_idx} is not a u16")
        self.memory = memory
        self.num = num
        self.event_idx = event_idx
        region, self._desc_off = memory.translate_uva(desc_uva, DESC_SIZE * num)
        self._desc_view = memory.regions[region].view
        region, avail_off = memory.translate_uva(avail_uva, 6 + 2 * num)
        self._avail_view = memory.regions[region].view
        self._avail_off = avail_off
        # flags, idx, ring[num], used_event as u16 items (see "atomicity" in the module docstring)
        self._avail_words = memory.words(region, avail_off, 6 + 2 * num)
        region, self._used_off = memory.translate_uva(used_uva, 6 + 8 * num)
        self._used_view = memory.regions[region].view  # the used elements, written with struct
        self._used_words = memory.words(region, self._used_off, 6 + 8 * num)  # flags, idx, ..., avail_event
        self._last_avail = last_avail_idx
        self._used_idx = load16(self._used_words, 1)
        self._in_flight = bytearray(num)  # 1 for each head popped and not yet pushed
        self.broken = False
        self.fast_rx = HAVE_RX_FILL  # write_frame may use core/_vring.c (tests compare it with the Python)

    @property
    def last_avail_idx(self) -> int:
        """The next available-ring index to pop (GET_VRING_BASE reports it)."""
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise RingError(f"last_avail_idx {value} is not a u16")
        self._last_avail = value

    @property
    def used_idx(self) -> int:
        """Our used index: the value last written to used.idx."""
        return self._used_idx

    def _avail_idx(self) -> int:
        return load16(self._avail_words, 1)

    def available(self) -> int:
        """How many chains the guest has made available that pop() has not returned yet."""
        if self.broken:
            raise RingError("queue is broken")
        pending = (self._avail_idx() - self._last_avail) & 0xFFFF
        if pending > self.num:
            self.broken = True
            raise RingError(f"avail.idx is {pending} ahead of last_avail_idx {self._last_avail}; ring size {self.num}")
        return pending

    def pop(self) -> Chain | None:
        """The next available chain, or None; RingError (and the queue broken) when the ring is malformed."""
        if self.broken:
            raise RingError("queue is broken")
        try:
            return self._pop()
        except RingError:
            self.broken = True
            raise

    def _pop(self) -> Chain | None:
        num = self.num
        avail_idx = self._avail_idx()
        pending = (avail_idx - self._last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > num:
            last = self._last_avail
            raise RingError(f"avail.idx {avail_idx} is {pending} ahead of last_avail_idx {last}; ring size {num}")
        if not _TSO:
            fence()  # smp_rmb: the ring entry is read after avail.idx
        slot = self._last_avail & (num - 1)
        head = load16(self._avail_words, 2 + slot)
        if head >= num:
            raise RingError(f"head index {head} out of a ring of {num}")
        if self._in_flight[head]:
            raise RingError(f"head {head} made available again while we still hold it")
        chain = self._walk(head)
        self._in_flight[head] = 1
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        return chain

    def write_frame(
        self,
        header: bytes,
        num_buffers_at: int,
        frame: bytes,
        patch_at: int,
        patch: int,
        mrg: bool,
        limit: int,
        used: list[int],
    ) -> int:
        """RX in one step where the C fast path can: pop the chains header + frame need (just one
        without mrg, at most limit), write them (header bytes [num_buffers_at:+2] set to the number
        of chains, unless it is negative; the frame's big-endian u16 at patch_at, unless that is
        negative, replaced by patch) and append their (head, length) pairs to used for
        push_batch. The number of chains taken; 0 when it declined (nothing changed): the caller
        then does it with pop() and write(), which raise RingError where the ring is bad."""
        if not self.fast_rx or self.broken:
            return 0
        taken: int = c_rx_fill(
            self.memory.c_views,
            self.memory.c_table,
            self._desc_view,
            self._desc_off,
            self._avail_view,
            self._avail_off,
            self.num,
            self._last_avail,
            self._in_flight,
            header,
            num_buffers_at,
            frame,
            patch_at,
            patch,
            mrg,
            limit,
            used,
        )
        self._last_avail = (self._last_avail + taken) & 0xFFFF
        return taken

    def write_segments(
        self,
        hdr_len: int,
        mrg: bool,
        used: list[int],
        header: bytes,
        buf: bytearray,
        off: int,
        end: int,
        psh_end: int,
        segment: int,
        mss: int,
        seq: int,
        ack: int,
        window: int,
        ident: int,
        ip_base: int,
        mtu: int,
    ) -> int:
        """A connection's TCP segments of buf[off:end] straight into RX chains, in C (core/_vring.c
        rx_segments: each its virtio-net header, the headers made from the template header, its
        payload); their (head, length) pairs appended to used for push_batch. The number of
        segments written, from the first on; 0 without the C fast path or where it declined
        (the caller sends the rest as frames, through write_frame or pop() and write())."""
        if not self.fast_rx or self.broken:
            return 0
        before = len(used)
        count: int = c_rx_segments(
            self.memory.c_views,
            self.memory.c_table,
            self._desc_view,
            self._desc_off,
            self._avail_view,
            self._avail_off,
            self.num,
            self._last_avail,
            self._in_flight,
            hdr_len,
            mrg,
            used,
            header,
            buf,
            off,
            end,
            psh_end,
            segment,
            mss,
            seq,
            ack,
            window,
            ident,
            ip_base,
            mtu,
        )
        self._last_avail = (self._last_avail + (len(used) - before) // 2) & 0xFFFF
        return count

    def give_back(self, chains: list[Chain]) -> None:
        """Un-pop the last len(chains) chains popped, unused (RX: a frame that did not fit): the
        next pops return them again. They must be the latest popped, none of them pushed."""
        for chain in chains:
            if not self._in_flight[chain.head]:
                raise ValueError(f"chain {chain.head} is not held")
        for chain in chains:
            self._in_flight[chain.head] = 0
        self._last_avail = (self._last_avail - len(chains)) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        memory = self.memory
        view = self._desc_view
        base = self._desc_off
        entries = self.num
        readable: list[int] = []
        writable: list[int] = []
        readable_bytes = 0
        writable_bytes = 0
        index = head
        count = 0
        indirect = False
        seen_write = False
        while True:
            count += 1
            if count > entries:
                raise RingError(f"descriptor chain from head {head} is longer than {entries} (a loop?)")
            fields = _DESC.unpack_from(view, base + DESC_SIZE * index)
            addr: int = fields[0]
            length: int = fields[1]
            flags: int = fields[2]
            nxt: int = fields[3]
            if flags & DESC_F_INDIRECT:
                if indirect:
                    raise RingError(f"indirect descriptor inside the indirect table of head {head}")
                if count != 1:
                    raise RingError(f"indirect descriptor after the head of chain {head}")
                if flags & DESC_F_NEXT:
                    raise RingError(f"indirect descriptor {head} also has NEXT")
                if length == 0 or length % DESC_SIZE or length > MAX_INDIRECT * DESC_SIZE:
                    raise RingError(f"indirect table of {length} bytes at head {head}")
                region, base = memory.translate_gpa(addr, length)
                view = memory.regions[region].view
                entries = length // DESC_SIZE
                index = 0
                count = 0
                indirect = True
                continue
            if flags & DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise RingError(f"readable descriptor after a writable one in chain {head}")
            if length:
                if readable_bytes + writable_bytes + length > MAX_CHAIN_BYTES:
                    raise RingError(f"chain {head} holds more than {MAX_CHAIN_BYTES} bytes")
                if flags & DESC_F_WRITE:
                    memory.append_pieces(addr, length, writable)
                    writable_bytes += length
                else:
                    memory.append_pieces(addr, length, readable)
                    readable_bytes += length
            if not flags & DESC_F_NEXT:
                break
            if nxt >= entries:
                raise RingError(f"next index {nxt} out of a table of {entries} in chain {head}")
            index = nxt
        return Chain(head, readable, writable, readable_bytes, writable_bytes)

    def read(self, chain: Chain) -> bytes:
        """The chain's readable bytes, gathered."""
        regions = self.memory.regions
        pieces = chain.readable
        parts: list[memoryview] = []
        for i in range(0, len(pieces), 3):
            offset = pieces[i + 1]
            parts.append(regions[pieces[i]].view[offset : offset + pieces[i + 2]])
        return b"".join(parts)

    def write(self, chain: Chain, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter data into the chain's writable space from byte `offset` on; the number of bytes written."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        src = memoryview(data).cast("B")
        total = min(len(src), chain.writable_bytes - offset)
        if total <= 0:
            return 0
        regions = self.memory.regions
        pieces = chain.writable
        skip = offset
        done = 0
        i = 0
        while done < total:
            start = pieces[i + 1]
            size = pieces[i + 2]
            if skip >= size:
                skip -= size
            else:
                n = min(size - skip, total - done)
                start += skip
                regions[pieces[i]].view[start : start + n] = src[done : done + n]
                skip = 0
                done += n
            i += 3
        return total

    def _check_used(self, head: int, length: int) -> None:
        if not 0 <= head < self.num:
            raise ValueError(f"used head {head} out of a ring of {self.num}")
        if not self._in_flight[head]:
            raise ValueError(f"used head {head} is not held (never popped, or pushed already)")
        if not 0 <= length <= MAX_CHAIN_BYTES:
            raise ValueError(f"used length {length} is not a u32")

    def push(self, head: int, length: int) -> None:
        """Return chain `head` to the guest with `length` bytes written into it."""
        if self.broken:
            raise RingError("queue is broken")
        self._check_used(head, length)
        self._in_flight[head] = 0
        slot = self._used_idx & (self.num - 1)
        _USED_ELEM.pack_into(self._used_view, self._used_off + 4 + 8 * slot, head, length)
        if not _TSO:
            fence()  # smp_wmb: the guest sees the element before the index
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        store16(self._used_words, 1, self._used_idx)

    def push_batch(self, used: list[int]) -> None:
        """push() for flat [head, length, head, length, ...], with one used-index store at the end."""
        if self.broken:
            raise RingError("queue is broken")
        if len(used) % 2 or len(used) // 2 > self.num:
            raise ValueError(f"{len(used)} values are not at most {self.num} (head, length) pairs")
        for i in range(0, len(used), 2):
            self._check_used(used[i], used[i + 1])
            self._in_flight[used[i]] = 0  # (a head twice in one batch fails the check the second time)
        idx = self._used_idx
        for i in range(0, len(used), 2):
            slot = idx & (self.num - 1)
            _USED_ELEM.pack_into(self._used_view, self._used_off + 4 + 8 * slot, used[i], used[i + 1])
            idx = (idx + 1) & 0xFFFF
        if not _TSO:
            fence()  # smp_wmb, as in push()
        self._used_idx = idx
        store16(self._used_words, 1, idx)

    def needs_notify(self, old_used_idx: int) -> bool:
        """Whether the guest wants an interrupt for the chains pushed since used index old_used_idx."""
        new = self._used_idx
        if (new - old_used_idx) & 0xFFFF == 0:
            return False
        fence()  # used.idx visible before the guest's hint is read (smp_mb)
        if self.event_idx:
            event = load16(self._avail_words, 2 + self.num)
            return ((new - event - 1) & 0xFFFF) < ((new - old_used_idx) & 0xFFFF)  # vring_need_event
        flags = load16(self._avail_words, 0)
        return not flags & AVAIL_F_NO_INTERRUPT

    def set_avail_event(self, idx: int | None = None) -> None:
        """EVENT_IDX: ask for a kick once the guest makes avail.idx pass idx (default last_avail_idx).

        Re-check available() afterwards: the guest may have added chains just before it saw this."""
        value = self._last_avail if idx is None else idx
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"avail_event {value} is not a u16")
        store16(self._used_words, 2 + 4 * self.num, value)
        fence()  # visible before the caller re-reads avail.idx

    def arm_kick(self) -> bool:
        """EVENT_IDX: ask for a kick at the guest's next available chain (past those there now,
        too few or none), then look again: True when chains came meanwhile, which the caller
        must take itself (the guest may have added them before it saw the request: no kick)."""
        seen = self.available()
        self.set_avail_event((self._last_avail + seen) & 0xFFFF)
        return self.available() != seen

    def set_no_notify(self, no_notify: bool) -> None:
        """Without EVENT_IDX: VIRTQ_USED_F_NO_NOTIFY asks the guest not to kick (a hint only)."""
        store16(self._used_words, 0, USED_F_NO_NOTIFY if no_notify else 0)

"""Unit tests of the split virtqueue over shared guest memory: normal chains, wrap-around, notification
hints, and hostile rings (each must raise RingError and leave the used ring untouched).

The rings are laid out here with struct, following virtio 1.x section 2.7, not with the module's code.
"""

import ctypes
import mmap
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_vpnnet.core.virtqueue import (
    MAX_REGIONS,
    Chain,
    MemoryRegion,
    MemoryTable,
    RingError,
    SplitQueue,
)

NEXT = 1
WRITE = 2
INDIRECT = 4

# three regions: 0 and 1 adjacent in guest-physical space, 2 after a gap
UVA0 = 0x7F00_0000_0000
UVA1 = 0x7F10_0000_0000
UVA2 = 0x7F20_0000_0000
LAYOUT = [  # gpa, size, uva, mmap_offset
    (0x0, 0x10000, UVA0, 0),
    (0x10000, 0x10000, UVA1, 0x1000),
    (0x100000, 0x1000, UVA2, 0),
]
DESC = 0x0  # gpa of the descriptor table, in region 0 (16 * 256 bytes at most)
AVAIL = 0x1000
USED = 0x2000
TABLE = 0x8000  # an indirect table


class Guest:
    """The driver's side: guest memory as bytearrays, and the rings in it."""

    def __init__(self, num: int = 8, event_idx: bool = False) -> None:
        self.num = num
        self.event_idx = event_idx
        self.bufs = [bytearray(size + offset) for _, size, _, offset in LAYOUT]
        self.memory = MemoryTable(
            [MemoryRegion(g, s, u, o, b) for (g, s, u, o), b in zip(LAYOUT, self.bufs, strict=True)]
        )
        self.avail = 0

    def locate(self, gpa: int, n: int) -> tuple[bytearray, int]:
        for (g, s, _, o), buf in zip(LAYOUT, self.bufs, strict=True):
            if g <= gpa and gpa + n <= g + s:
                return buf, o + gpa - g
        raise AssertionError(f"test bug: {gpa:#x}+{n} not in one region")

    def poke(self, gpa: int, data: bytes) -> None:
        buf, off = self.locate(gpa, len(data))
        buf[off : off + len(data)] = data

    def peek(self, gpa: int, n: int) -> bytes:
        buf, off = self.locate(gpa, n)
        return bytes(buf[off : off + n])

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
        self.poke(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def set_avail_idx(self, idx: int) -> None:
        self.avail = idx & 0xFFFF
        self.poke(AVAIL + 2, struct.pack("<H", self.avail))

    def offer(self, *heads: int) -> None:
        for head in heads:
            self.poke(AVAIL + 4 + 2 * (self.avail % self.num), struct.pack("<H", head))
            self.avail = (self.avail + 1) & 0xFFFF
        self.poke(AVAIL + 2, struct.pack("<H", self.avail))

    def used_idx(self) -> int:
        value: int = struct.unpack("<H", self.peek(USED + 2, 2))[0]
        return value

    def used_elem(self, slot: int) -> tuple[int, int]:
        head, length = struct.unpack("<II", self.peek(USED + 4 + 8 * slot, 8))
        return head, length

    def used_ring(self) -> bytes:
        return self.peek(USED, 6 + 8 * self.num)

    def lay_out(
        self,
        ring: list[tuple[int, int, int, int]],
        indirect: list[tuple[int, int, int, int]],
        heads: list[int],
        start: int,
    ) -> None:
        """Descriptors (addr, length, flags, next) in the table and at TABLE, heads offered from start."""
        for i, (addr, length, flags, nxt) in enumerate(ring[: self.num]):
            self.desc(i, addr, length, flags, nxt)
        for i, (addr, length, flags, nxt) in enumerate(indirect):
            self.desc(i, addr, length, flags, nxt, table=TABLE)
        self.set_avail_idx(start)
        self.offer(*heads[: self.num])
        if len(heads) > self.num:
            self.set_avail_idx(start + len(heads))  # sometimes more than the ring holds

    def queue(self, last_avail_idx: int = 0) -> SplitQueue:
        return SplitQueue(self.memory, self.num, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED, self.event_idx, last_avail_idx)

    def held(self, q: SplitQueue, *heads: int) -> None:
        """Offer one-descriptor chains at these heads and let q pop them (so it may push them)."""
        if q.last_avail_idx != self.avail:
            self.set_avail_idx(q.last_avail_idx)
        for head in heads:
            self.desc(head, 0x4000, 4)
        self.offer(*heads)
        for head in heads:
            chain = q.pop()
            assert chain is not None and chain.head == head


def pieces(flat: list[int]) -> list[tuple[int, int, int]]:
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def hostile(guest: Guest, q: SplitQueue) -> None:
    """pop() raises RingError, writes nothing to the used ring, and the queue stays broken."""
    before = guest.used_ring()
    last = q.last_avail_idx
    with pytest.raises(RingError):
        q.pop()
    assert guest.used_ring() == before
    assert q.last_avail_idx == last
    assert q.broken
    with pytest.raises(RingError):
        q.pop()
    with pytest.raises(RingError):
        q.push(0, 0)
    assert guest.used_ring() == before


# --- normal operation


def test_normal_chain_read_write_push() -> None:
    g = Guest()
    header = bytes(range(10))
    data = bytes(range(100, 200))
    g.poke(0x4000, header)
    g.poke(0x5000, data)
    g.desc(0, 0x4000, len(header), NEXT, 3)
    g.desc(3, 0x5000, len(data), NEXT, 5)
    g.desc(5, 0x6000, 64, WRITE | NEXT, 1)
    g.desc(1, 0x7000, 200, WRITE)
    g.offer(0)
    q = g.queue()
    assert q.available() == 1
    chain = q.pop()
    assert isinstance(chain, Chain)
    assert chain.head == 0
    assert chain.readable_bytes == 110 and chain.writable_bytes == 264
    assert pieces(chain.readable) == [(0, 0x4000, 10), (0, 0x5000, 100)]
    assert pieces(chain.writable) == [(0, 0x6000, 64), (0, 0x7000, 200)]
    assert q.read(chain) == header + data
    g.poke(0x7000 + 200, b"\xee" * 16)  # guard bytes just past the last buffer
    assert q.write(chain, b"\x11" * 300) == 264
    assert g.peek(0x6000, 64) == b"\x11" * 64
    assert g.peek(0x7000, 200) == b"\x11" * 200
    assert g.peek(0x7000 + 200, 16) == b"\xee" * 16
    assert g.peek(0x6000 + 64, 1) == b"\x00"
    assert q.pop() is None
    assert q.last_avail_idx == 1
    q.push(chain.head, 264)
    assert g.used_idx() == 1 and q.used_idx == 1
    assert g.used_elem(0) == (0, 264)


def test_write_from_offset_and_short_data() -> None:
    g = Guest()
    g.desc(0, 0x6000, 4, WRITE | NEXT, 1)
    g.desc(1, 0x6100, 8, WRITE)
    g.offer(0)
    q = g.queue()
    chain = q.pop()
    assert chain is not None and chain.readable == [] and chain.readable_bytes == 0
    assert q.write(chain, b"ab") == 2
    assert q.write(chain, b"CDEFGHIJKLMN", offset=2) == 10
    assert g.peek(0x6000, 4) == b"abCD" and g.peek(0x6100, 8) == b"EFGHIJKL"
    assert q.write(chain, b"z", offset=12) == 0
    assert q.write(chain, memoryview(b"xy"), offset=5) == 2
    assert g.peek(0x6100, 8) == b"ExyHIJKL"
    assert q.read(chain) == b""


def test_buffer_spanning_adjacent_regions_is_split() -> None:
    g = Guest()
    data = bytes(range(32))
    g.poke(0xFFF0, data[:16])
    g.poke(0x10000, data[16:])
    g.desc(0, 0xFFF0, 32)
    g.offer(0)
    q = g.queue()
    chain = q.pop()
    assert chain is not None
    assert pieces(chain.readable) == [(0, 0xFFF0, 16), (1, 0x1000, 16)]  # region 1 starts at its mmap_offset
    assert q.read(chain) == data


def test_zero_length_descriptors_are_skipped() -> None:
    g = Guest()
    g.desc(0, 0xDEAD_BEEF_0000, 0, NEXT, 1)  # nowhere, but empty
    g.desc(1, 0x4000, 4, NEXT, 2)
    g.desc(2, 0xFFFF_FFFF_FFFF_FFFF, 0, WRITE)
    g.poke(0x4000, b"abcd")
    g.offer(0)
    q = g.queue()
    chain = q.pop()
    assert chain is not None
    assert pieces(chain.readable) == [(0, 0x4000, 4)] and chain.writable == []
    assert q.read(chain) == b"abcd"


def test_indirect_chain() -> None:
    g = Guest()
    g.poke(0x4000, b"hdr!")
    g.poke(0x4100, b"payload")
    g.desc(0, 0x4000, 4, NEXT, 2, table=TABLE)
    g.desc(2, 0x4100, 7, NEXT, 1, table=TABLE)
    g.desc(1, 0x6000, 50, WRITE, table=TABLE)
    g.desc(4, TABLE, 16 * 3, INDIRECT | WRITE)  # WRITE on the indirect descriptor itself is ignored
    g.offer(4)
    q = g.queue()
    chain = q.pop()
    assert chain is not None and chain.head == 4
    assert q.read(chain) == b"hdr!payload"
    assert pieces(chain.writable) == [(0, 0x6000, 50)]


def test_indirect_table_larger_than_ring() -> None:
    g = Guest(num=4)
    for i in range(16):
        g.desc(i, 0x4000 + i, 1, NEXT if i < 15 else 0, i + 1, table=TABLE)
    g.desc(0, TABLE, 16 * 16, INDIRECT)
    g.offer(0)
    chain = g.queue().pop()
    assert chain is not None and chain.readable_bytes == 16 and len(chain.readable) == 48


def test_index_wraparound_num_256() -> None:
    g = Guest(num=256)
    start = 65534
    g.poke(USED + 2, struct.pack("<H", start))  # the queue takes used.idx from the ring
    g.set_avail_idx(start)
    q = g.queue(last_avail_idx=start)
    assert q.pop() is None and q.used_idx == start
    for i in range(5):
        g.desc(i, 0x6000 + 0x100 * i, 0x100, WRITE)
    g.offer(0, 1, 2, 3, 4)  # avail ring slots 254, 255, 0, 1, 2; avail.idx 65534 -> 3
    assert g.avail == 3
    assert q.available() == 5
    heads = []
    for _ in range(5):
        chain = q.pop()
        assert chain is not None
        heads.append(chain.head)
        q.push(chain.head, 10 + chain.head)
    assert heads == [0, 1, 2, 3, 4]
    assert q.pop() is None
    assert q.last_avail_idx == 3
    assert g.used_idx() == 3 and q.used_idx == 3
    assert [g.used_elem(s) for s in (254, 255, 0, 1, 2)] == [(0, 10), (1, 11), (2, 12), (3, 13), (4, 14)]


def test_push_batch_writes_elements_then_one_index() -> None:
    g = Guest()
    q = g.queue()
    g.held(q, 3, 5, 0, 1)
    q.push_batch([3, 30, 5, 50])
    assert g.used_idx() == 2
    assert g.used_elem(0) == (3, 30) and g.used_elem(1) == (5, 50)
    before = g.used_ring()
    for bad in ([1], [8, 0], [0, 1 << 32], [0, -1], [0, 0] * 9, [3, 0], [2, 0], [0, 0, 0, 0], [1, 0, 5, 0]):
        with pytest.raises(ValueError):
            q.push_batch(bad)
    assert g.used_ring() == before
    with pytest.raises(ValueError):
        q.push(8, 0)
    assert g.used_ring() == before


def test_index_stores_are_never_seen_half_done() -> None:
    """Another process reading avail_event while the queue rewrites it must see the old or the
    new value, never one byte of each: struct's "<H" stores byte by byte, and a guest that read
    used.idx half-written took stale used elements (Linux: "id N is not a head!"). Here a child
    reads the field with single 16-bit loads for half a second while this process flips it
    between 0x00FF and 0x0100 (both bytes change); with "<H" it saw thousands of torn values."""
    shared = mmap.mmap(-1, 0x10000)  # MAP_SHARED | MAP_ANONYMOUS: the child sees our stores
    memory = MemoryTable([MemoryRegion(0, 0x10000, UVA0, 0, shared)])
    num = 256
    q = SplitQueue(memory, num, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED)
    field = USED + 4 + 8 * num
    old, new = 0x00FF, 0x0100
    q.set_avail_event(old)
    results_r, results_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reader: counts torn values until the parent's flipping is over
        code = 1
        try:
            cell = ctypes.c_uint16.from_buffer(shared, field)
            torn = reads = 0
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                for _ in range(1000):
                    value = cell.value
                    if value != old and value != new:
                        torn += 1
                reads += 1000
            os.write(results_w, f"{torn} {reads}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(results_w)
    flips = 0
    end = time.monotonic() + 0.55
    while time.monotonic() < end:
        for _ in range(1000):
            q.set_avail_event(new)
            q.set_avail_event(old)
        flips += 2000
    assert os.waitpid(pid, 0)[1] == 0
    torn, reads = map(int, os.read(results_r, 100).split())
    os.close(results_r)
    assert reads > 100_000 and flips > 100_000, "too few reads or stores to tell"
    assert torn == 0, f"{torn} of {reads} reads saw a half-written index"
    assert struct.unpack_from("<H", shared, field)[0] == old


def test_needs_notify_without_event_idx() -> None:
    g = Guest()
    q = g.queue()
    old = q.used_idx
    assert not q.needs_notify(old)  # nothing pushed
    g.held(q, 0)
    q.push(0, 0)
    assert q.needs_notify(old)
    g.poke(AVAIL, struct.pack("<H", 1))  # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.needs_notify(old)


def test_needs_notify_event_idx_across_wrap() -> None:
    g = Guest(num=256, event_idx=True)
    used_event = AVAIL + 4 + 2 * 256
    g.poke(USED + 2, struct.pack("<H", 65534))
    q = g.queue(last_avail_idx=65534)
    g.poke(AVAIL, struct.pack("<H", 1))  # NO_INTERRUPT is ignored with EVENT_IDX
    g.poke(used_event, struct.pack("<H", 65535))  # interrupt once the element at index 65535 is used
    g.held(q, 0, 1)
    q.push(0, 0)  # used.idx 65535
    assert not q.needs_notify(65534)
    q.push(1, 0)  # used.idx 0: element 65535 is used
    assert q.needs_notify(65535)
    assert q.needs_notify(65534)  # a batch of two crossing the event
    g.poke(used_event, struct.pack("<H", 10))  # far behind: already signalled for it
    assert not q.needs_notify(65534)
    g.poke(used_event, struct.pack("<H", 65534))
    assert q.needs_notify(65534)
    assert not q.needs_notify(65535)


def test_avail_event_and_no_notify_hints() -> None:
    g = Guest(num=16, event_idx=True)
    q = g.queue(last_avail_idx=7)
    q.set_avail_event()
    assert g.peek(USED + 4 + 8 * 16, 2) == struct.pack("<H", 7)
    q.set_avail_event(65535)
    assert g.peek(USED + 4 + 8 * 16, 2) == struct.pack("<H", 65535)
    with pytest.raises(ValueError):
        q.set_avail_event(65536)
    q.set_no_notify(True)
    assert g.peek(USED, 2) == struct.pack("<H", 1)
    q.set_no_notify(False)
    assert g.peek(USED, 2) == struct.pack("<H", 0)


def test_last_avail_idx_get_set() -> None:
    g = Guest()
    q = g.queue()
    q.last_avail_idx = 65535
    assert q.last_avail_idx == 65535
    g.desc(0, 0x4000, 1)
    g.set_avail_idx(65535)
    g.offer(0)
    chain = q.pop()
    assert chain is not None and q.last_avail_idx == 0
    with pytest.raises(RingError):
        q.last_avail_idx = 65536
    with pytest.raises(RingError):
        g.queue(last_avail_idx=-1)


def test_translate() -> None:
    m = Guest().memory
    assert m.translate_gpa(0x10000, 0x10000) == (1, 0x1000)
    assert m.translate_gpa(0x100FFF, 1) == (2, 0xFFF)
    assert m.translate_uva(UVA1 + 5, 3) == (1, 0x1005)
    for addr, length in [(0x0, 0), (0xFFF0, 0x20), (0x20000, 1), (0x100FFF, 2), (-1, 1), ((1 << 64) - 1, 2)]:
        with pytest.raises(RingError):
            m.translate_gpa(addr, length)
    for addr, length in [(UVA0, 0), (UVA0 + 0xFFFF, 2), (UVA0 - 1, 1), ((1 << 64) - 1, 2)]:
        with pytest.raises(RingError):
            m.translate_uva(addr, length)


# --- hostile rings


def test_descriptor_outside_any_region() -> None:
    g = Guest()
    g.desc(0, 0x50000, 16)  # in the gap between regions 1 and 2
    g.offer(0)
    hostile(g, g.queue())


def test_descriptor_crossing_region_end() -> None:
    g = Guest()
    g.desc(0, 0x100F00, 0x200)  # region 2 ends at 0x101000, nothing after it
    g.offer(0)
    hostile(g, g.queue())


def test_descriptor_crossing_last_adjacent_region_end() -> None:
    g = Guest()
    g.desc(0, 0x1FFF0, 0x20, WRITE)  # region 1 ends at 0x20000
    g.offer(0)
    hostile(g, g.queue())


def test_descriptor_overflowing_u64() -> None:
    g = Guest()
    g.desc(0, (1 << 64) - 16, 32)
    g.offer(0)
    hostile(g, g.queue())


def test_head_index_out_of_ring() -> None:
    g = Guest()
    g.offer(8)
    hostile(g, g.queue())


def test_next_index_out_of_ring() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, NEXT, 8)
    g.offer(0)
    hostile(g, g.queue())


def test_next_loop() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, NEXT, 1)
    g.desc(1, 0x4000, 4, NEXT, 0)
    g.offer(0)
    hostile(g, g.queue())


def test_self_loop_of_zero_length_descriptors() -> None:
    g = Guest()
    g.desc(0, 0, 0, NEXT, 0)
    g.offer(0)
    hostile(g, g.queue())


def test_chain_longer_than_ring() -> None:
    g = Guest(num=4)
    for i in range(4):
        g.desc(i, 0x4000 + 16 * i, 16, NEXT, (i + 1) % 4)  # 0 -> 1 -> 2 -> 3 -> 0 -> ...: 5 descriptors and on
    g.offer(0)
    hostile(g, g.queue())


def test_loop_inside_indirect_table() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, NEXT, 1, table=TABLE)
    g.desc(1, 0x4000, 4, NEXT, 0, table=TABLE)
    g.desc(0, TABLE, 32, INDIRECT)
    g.offer(0)
    hostile(g, g.queue())


def test_next_out_of_indirect_table() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, NEXT, 2, table=TABLE)  # the table has 2 entries
    g.desc(0, TABLE, 32, INDIRECT)
    g.offer(0)
    hostile(g, g.queue())


def test_indirect_with_next() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, table=TABLE)
    g.desc(0, TABLE, 16, INDIRECT | NEXT, 1)
    g.desc(1, 0x4000, 4)
    g.offer(0)
    hostile(g, g.queue())


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_bad_length(length: int) -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, table=TABLE)
    g.desc(0, TABLE, length, INDIRECT)
    g.offer(0)
    hostile(g, g.queue())


def test_indirect_inside_indirect() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, table=TABLE + 0x100)
    g.desc(0, TABLE + 0x100, 16, INDIRECT, table=TABLE)
    g.desc(0, TABLE, 16, INDIRECT)
    g.offer(0)
    hostile(g, g.queue())


def test_indirect_after_head() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, table=TABLE)
    g.desc(0, 0x4000, 4, NEXT, 1)
    g.desc(1, TABLE, 16, INDIRECT)
    g.offer(0)
    hostile(g, g.queue())


@pytest.mark.parametrize("addr", [0x50000, 0x100FF0, (1 << 64) - 16, 0xFFF0])
def test_indirect_table_outside_memory(addr: int) -> None:
    """Outside, crossing region 2's end, past 2**64, and split over regions 0 and 1 (tables must be whole)."""
    g = Guest()
    g.desc(0, addr, 32, INDIRECT)
    g.offer(0)
    hostile(g, g.queue())


def test_readable_after_writable() -> None:
    g = Guest()
    g.desc(0, 0x4000, 4, NEXT, 1)
    g.desc(1, 0x6000, 4, WRITE | NEXT, 2)
    g.desc(2, 0x4100, 4)
    g.offer(0)
    hostile(g, g.queue())


def test_empty_readable_after_writable() -> None:
    g = Guest()
    g.desc(0, 0x6000, 4, WRITE | NEXT, 1)
    g.desc(1, 0, 0)
    g.offer(0)
    hostile(g, g.queue())


def test_readable_after_writable_in_indirect_table() -> None:
    g = Guest()
    g.desc(0, 0x6000, 4, WRITE | NEXT, 1, table=TABLE)
    g.desc(1, 0x4000, 4, table=TABLE)
    g.desc(0, TABLE, 32, INDIRECT)
    g.offer(0)
    hostile(g, g.queue())


@pytest.mark.parametrize("ahead", [9, 0x8000, 0xFFFF])
def test_avail_idx_far_ahead(ahead: int) -> None:
    g = Guest()  # num 8: 9 is num + 1
    g.desc(0, 0x4000, 4)
    g.set_avail_idx(ahead)
    q = g.queue()
    with pytest.raises(RingError):
        q.available()
    assert q.broken
    g2 = Guest()
    g2.desc(0, 0x4000, 4)
    g2.set_avail_idx(ahead)
    hostile(g2, g2.queue())


def test_avail_idx_exactly_num_ahead_is_fine() -> None:
    g = Guest()
    for i in range(8):
        g.desc(i, 0x4000, 4)
    g.offer(*range(8))
    q = g.queue()
    assert q.available() == 8
    for _ in range(8):
        assert q.pop() is not None
    assert q.pop() is None


def test_chain_over_4_gib() -> None:
    size = 1 << 31
    try:
        big = mmap.mmap(-1, size)
    except OSError:
        pytest.skip("no 2 GiB anonymous mapping here")
    try:
        g = Guest()
        regions = [MemoryRegion(gp, s, u, o, b) for (gp, s, u, o), b in zip(LAYOUT, g.bufs, strict=True)]
        regions.append(MemoryRegion(1 << 40, size, 0x7E00_0000_0000, 0, big))
        g.memory = MemoryTable(regions)
        g.desc(0, 1 << 40, size, NEXT, 1)  # 2 GiB readable
        g.desc(1, 1 << 40, size, WRITE)  # and 2 GiB writable: 2**32 bytes in all
        g.offer(0)
        q = g.queue()
        hostile(g, q)
        g.memory.release()
    finally:
        big.close()


# --- bad memory tables and queue geometry


def test_overlapping_regions_are_refused() -> None:
    a = bytearray(0x2000)
    b = bytearray(0x2000)
    with pytest.raises(RingError):
        MemoryTable([MemoryRegion(0x0, 0x2000, UVA0, 0, a), MemoryRegion(0x1FFF, 0x2000, UVA1, 0, b)])
    with pytest.raises(RingError):
        MemoryTable([MemoryRegion(0x0, 0x2000, UVA0, 0, a), MemoryRegion(0x0, 0x2000, UVA1, 0, b)])
    with pytest.raises(RingError):  # overlapping in QEMU's address space
        MemoryTable([MemoryRegion(0x0, 0x2000, UVA0, 0, a), MemoryRegion(0x4000, 0x2000, UVA0 + 0x1000, 0, b)])
    MemoryTable([MemoryRegion(0x0, 0x2000, UVA0, 0, a), MemoryRegion(0x2000, 0x2000, UVA0 + 0x2000, 0, b)])


def test_bad_regions_are_refused() -> None:
    buf = bytearray(0x1000)
    for gpa, size, uva, offset, data in [
        (0, 0, UVA0, 0, buf),  # empty
        (0, 0x1001, UVA0, 0, buf),  # larger than its mapping
        (0, 0x800, UVA0, 0x801, buf),  # mmap_offset pushes it past the mapping
        ((1 << 64) - 0x800, 0x1000, UVA0, 0, buf),  # past 2**64 in guest space
        (0, 0x1000, (1 << 64) - 0x800, 0, buf),  # and in user space
        (-1, 0x10, UVA0, 0, buf),
        (0, 0x10, UVA0, 0, memoryview(bytes(0x1000))),  # read-only
    ]:
        with pytest.raises(RingError):
            MemoryRegion(gpa, size, uva, offset, data)


def test_too_many_regions() -> None:
    buf = bytearray(MAX_REGIONS + 1)
    regions = [MemoryRegion(i, 1, UVA0 + i, i, buf) for i in range(MAX_REGIONS + 1)]
    with pytest.raises(RingError):
        MemoryTable(regions)
    assert MemoryTable(regions[:MAX_REGIONS]).translate_gpa(MAX_REGIONS - 1, 1) == (MAX_REGIONS - 1, MAX_REGIONS - 1)


@pytest.mark.parametrize("num", [0, 3, 6, 65536, 1 << 16, -8])
def test_bad_queue_size(num: int) -> None:
    g = Guest()
    with pytest.raises(RingError):
        SplitQueue(g.memory, num, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED)


def test_largest_queue_size() -> None:
    big = bytearray(0x100000)
    m = MemoryTable([MemoryRegion(0, len(big), UVA0, 0, big)])
    q = SplitQueue(m, 32768, UVA0, UVA0 + 0x80000, UVA0 + 0x90000)
    assert q.pop() is None


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [(DESC + 8, AVAIL, USED), (DESC, AVAIL + 1, USED), (DESC, AVAIL, USED + 2), (DESC + 1, AVAIL + 3, USED + 1)],
)
def test_misaligned_rings(desc: int, avail: int, used: int) -> None:
    g = Guest()
    with pytest.raises(RingError):
        SplitQueue(g.memory, 8, UVA0 + desc, UVA0 + avail, UVA0 + used)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (UVA0 + 0x10000 - 16 * 4, UVA0 + AVAIL, UVA0 + USED),  # table crossing region 0's end
        (UVA0 + DESC, UVA2 + 0x1000 - 6 - 2 * 4, UVA0 + USED),  # avail ring short of its used_event
        (UVA0 + DESC, UVA0 + AVAIL, UVA2 + 0x1000 - 4 - 8 * 8),  # used ring short of its avail_event
        (0x1000, UVA0 + AVAIL, UVA0 + USED),  # a guest-physical address, not a user one
    ],
)
def test_rings_outside_memory(desc: int, avail: int, used: int) -> None:
    g = Guest()
    with pytest.raises(RingError):
        SplitQueue(g.memory, 8, desc, avail, used)


# --- random rings


def check_chain(g: Guest, q: SplitQueue, chain: Chain) -> None:
    for flat, total in ((chain.readable, chain.readable_bytes), (chain.writable, chain.writable_bytes)):
        assert len(flat) % 3 == 0
        assert sum(flat[2::3]) == total
        for region, offset, length in pieces(flat):
            _, size, _, mmap_offset = LAYOUT[region]
            assert length >= 1 and mmap_offset <= offset and offset + length <= mmap_offset + size
    assert len(q.read(chain)) == chain.readable_bytes
    assert q.write(chain, b"\x5a" * (chain.writable_bytes + 1)) == chain.writable_bytes


def drain(g: Guest, q: SplitQueue) -> None:
    """pop() until None or RingError: at most num chains, each well-formed, and only RingError raised;
    a pop that raises leaves the used ring as it was (check_chain's own writes may land there: a
    hostile chain can point at the used ring)."""
    for _ in range(g.num + 1):
        before = g.used_ring()
        try:
            chain = q.pop()
        except RingError:
            assert g.used_ring() == before
            return
        if chain is None:
            return
        check_chain(g, q, chain)
    raise AssertionError("more chains than the ring holds")


NUMS = st.sampled_from([1, 2, 4, 8, 16])


@settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(num=NUMS, table=st.binary(min_size=256, max_size=256), avail=st.binary(min_size=36, max_size=36))
def test_random_bytes_as_rings(num: int, table: bytes, avail: bytes) -> None:
    g = Guest(num=num)
    g.poke(DESC, table[: 16 * num])
    g.poke(AVAIL, avail[: 4 + 2 * num])
    g.poke(TABLE, table)
    drain(g, g.queue())


ADDRS = st.one_of(
    st.integers(0, 0x20100),
    st.sampled_from([TABLE, 0xFFF0, 0x1FFF0, 0x100000, 0x100FF0, 0x50000, (1 << 64) - 16]),
    st.integers(0, (1 << 64) - 1),
)
LENGTHS = st.one_of(st.integers(0, 0x300), st.sampled_from([16, 32, 48, 0x10000, 0xFFFFFFFF]))
DESCS = st.tuples(ADDRS, LENGTHS, st.integers(0, 7), st.integers(0, 17))


@settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=NUMS,
    ring=st.lists(DESCS, min_size=16, max_size=16),
    indirect=st.lists(DESCS, min_size=16, max_size=16),
    heads=st.lists(st.integers(0, 17), min_size=0, max_size=17),
    start=st.integers(0, 0xFFFF),
)
def test_random_descriptor_chains(
    num: int,
    ring: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
    start: int,
) -> None:
    g = Guest(num=num)
    g.lay_out(ring, indirect, heads, start)
    drain(g, g.queue(last_avail_idx=start))


def test_guest_scribbling_on_used_idx_is_ignored() -> None:
    g = Guest()
    q = g.queue()
    g.held(q, 1, 2)
    q.push(1, 5)
    g.poke(USED + 2, struct.pack("<H", 0x7777))  # the guest writes our index
    q.push(2, 6)
    assert g.used_idx() == 2 and g.used_elem(1) == (2, 6)


def test_region_indices_follow_the_table_order() -> None:
    a = bytearray(0x1000)
    b = bytearray(0x1000)
    m = MemoryTable([MemoryRegion(0x9000, 0x1000, UVA1, 0, a), MemoryRegion(0x1000, 0x1000, UVA0, 0, b)])
    assert m.translate_gpa(0x1010, 4) == (1, 0x10)
    assert m.translate_gpa(0x9010, 4) == (0, 0x10)
    assert m.translate_uva(UVA1 + 0x20, 4) == (0, 0x20)
    for addr in (0x0, 0x2000, 0x8FFF, 0xA000):
        with pytest.raises(RingError):
            m.translate_gpa(addr, 1)


def test_a_head_offered_again_while_held_is_refused() -> None:
    """A driver that makes a head available twice before getting it back would have us return it
    twice (its own used ring garbled): refused at the second pop."""
    g = Guest()
    g.desc(2, 0x4000, 4)
    g.offer(2, 2)
    q = g.queue()
    assert q.pop() is not None
    hostile(g, q)


def test_push_only_what_was_popped_and_give_back() -> None:
    """push refuses a head not held (never popped, or pushed already): our own bug, caught before
    the guest's used ring is touched. give_back un-pops the latest chains (RX: a frame that did
    not fit) so that the next pops return them."""
    g = Guest()
    q = g.queue()
    before = g.used_ring()
    with pytest.raises(ValueError):
        q.push(4, 0)
    g.held(q, 4)
    q.push(4, 1)
    with pytest.raises(ValueError):
        q.push(4, 1)
    with pytest.raises(ValueError):
        q.push_batch([4, 0])
    assert g.used_idx() == 1 and g.used_ring() != before
    for i in (5, 6):
        g.desc(i, 0x4000, 4)
    g.offer(5, 6)
    a, b = q.pop(), q.pop()
    assert a is not None and b is not None
    q.give_back([a, b])
    with pytest.raises(ValueError):
        q.give_back([a])  # not held any more
    again = q.pop()
    assert again is not None and again.head == 5
    q.push(5, 0)

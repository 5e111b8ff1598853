"""Direct RX (core/_vring.c rx_segments, NetDevice.direct_segments): a connection's TCP segments
written straight from its send buffer into a vhost-user guest's RX buffers, against the path it
short-cuts (tcp_segments' frames, then NetDevice.fill_rx in plain Python).

Twin guests get the same segments, one through each path: guest memory, the used ring and the
indexes must come out the same, on normal rings and hostile ones (where the direct path stops
at the first segment the Python would refuse or treat otherwise, and the rest goes as frames).
Needs the package built with its C extensions; skipped on the plain sources.
"""

import socket
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_vpnnet.core import vhost_user as vu
from qemu_vpnnet.core import virtio_net as vnet
from qemu_vpnnet.core import virtqueue
from qemu_vpnnet.core.actions import Counters
from qemu_vpnnet.core.tcp_wire import address_sums, header_template, tcp_segments
from qemu_vpnnet.core.vhost_net import NetDevice
from qemu_vpnnet.core.virtqueue import RingError, SplitQueue
from tests.test_rx_fill import BUFS, DESCS, GATEWAY, mergeable_ring, twins
from tests.test_virtqueue import AVAIL, DESC, USED, UVA0, Guest

pytestmark = pytest.mark.skipif(not virtqueue.HAVE_RX_FILL, reason="built without core/_vring.c")

MSS = 1448
GUEST_MAC = bytes.fromhex("525400123456")
TSO = (
    vu.VIRTIO_F_VERSION_1
    | vu.VIRTIO_NET_F_GUEST_CSUM
    | vu.VIRTIO_NET_F_GUEST_TSO4
    | vu.VIRTIO_NET_F_GUEST_TSO6
    | vu.VIRTIO_NET_F_MRG_RXBUF
)


def device(features: int) -> NetDevice:
    dev = NetDevice(GATEWAY, 1500, Counters(), lambda frame, v6, start: MSS)
    dev.negotiate(features)
    return dev


class Segments:
    """What send_data hands either path: a connection's header template, its send buffer and
    the numbers of one burst."""

    def __init__(self, v6: bool, size: int, segment: int, seed: int = 1) -> None:
        if v6:
            remote, guest = socket.inet_pton(socket.AF_INET6, "fec0::2"), socket.inet_pton(socket.AF_INET6, "fec0::15")
        else:
            remote, guest = socket.inet_aton("10.0.2.2"), socket.inet_aton("10.0.2.15")
        self.header = header_template(GUEST_MAC, GATEWAY, remote, guest, 80, 40000 + seed)
        self.ip_base, self.tcp_base = address_sums(remote, guest, 80, 40000 + seed)
        self.buf = bytearray(7) + bytearray((seed * 31 + i * 7) & 0xFF for i in range(size)) + bytearray(5)
        self.off, self.end = 7, 7 + size
        self.segment = segment
        self.seq, self.ack, self.window, self.ident = 0xFFFFF000 + seed, 0x12345678, 0xFFFF, 0xFFF0

    def frames(self, first: int = 0, checksum: bool = False) -> list[bytes]:
        """The frames of segments first.. as the engine makes them for a guest taking partial
        checksums (tcp_segments with checksum off), or with their checksums."""
        start = self.off + first * self.segment
        frames: list[bytes] = []
        if start >= self.end:
            return frames
        tcp_segments(
            frames,
            self.header,
            self.buf,
            start,
            self.end,
            self.end,
            self.segment,
            (self.seq + first * self.segment) & 0xFFFFFFFF,
            self.ack,
            self.window,
            self.ident + 1 + first,
            self.ip_base,
            self.tcp_base,
            checksum,
        )
        return frames

    def direct(self, dev: NetDevice) -> int:
        return dev.direct_segments(
            self.header,
            self.buf,
            self.off,
            self.end,
            self.end,
            self.segment,
            MSS,
            self.seq,
            self.ack,
            self.window,
            self.ident + 1,
            self.ip_base,
        )


def outcome(g: Guest, q: SplitQueue, result: object) -> tuple[object, ...]:
    """What a path said and changed. Where the Python raised (the device is dropped then) the
    direct path has published the segments it wrote and the other has not: memory must agree."""
    if isinstance(result, str):  # the used ring aside: the direct path's segments are published
        bufs = [bytearray(b) for b in g.bufs]
        bufs[0][USED : USED + 6 + 8 * q.num] = bytes(6 + 8 * q.num)
        return (result, [bytes(b) for b in bufs])
    return (result, [bytes(b) for b in g.bufs], q.last_avail_idx, q.used_idx, g.used_ring())


def through_frames(g: Guest, q: SplitQueue, features: int, segs: Segments) -> tuple[object, ...]:
    """The path direct RX short-cuts, in plain Python."""
    q.fast_rx = False
    dev = device(features)
    pending = deque(segs.frames())
    try:
        result: object = (dev.fill_rx(q, pending)[0], len(pending))
    except (RingError, ValueError) as exc:
        result = repr(exc)
    return outcome(g, q, result)


def through_direct(g: Guest, q: SplitQueue, features: int, segs: Segments) -> tuple[object, ...]:
    """Direct RX as send_data uses it: the segments it writes, then the rest as frames."""
    dev = device(features)
    dev.rx_queue = q
    count = segs.direct(dev)
    dev.rx_queue = None
    pending = deque(segs.frames(count))
    direct_bytes = min(count * segs.segment, segs.end - segs.off)
    direct_frames = count * len(segs.header) + direct_bytes
    q.fast_rx = False  # the rest as the other twin takes it
    try:
        taken, _ = dev.fill_rx(q, pending)
        result: object = (taken + direct_frames, len(pending))
    except (RingError, ValueError) as exc:
        result = repr(exc)
    return outcome(g, q, result)


def compare(build: Callable[[Guest], None], num: int, features: int, segs: Segments) -> tuple[object, ...]:
    fast, slow = twins(build, num)
    got = through_direct(fast, fast.queue(), features, segs)
    want = through_frames(slow, slow.queue(), features, segs)
    assert got == want
    return got


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize(
    ("size", "segment"),
    [
        (64 * 1024, (0xFFFF - 60) // MSS * MSS),  # TSO: 64 KiB segments cut at whole MSS
        (3 * MSS + 100, MSS),  # MTU-sized segments: no GSO
        (1, MSS),
        (200_000, (0xFFFF - 60) // MSS * MSS),  # more than the ring holds: the rest waits as frames
    ],
)
@pytest.mark.parametrize(("buffer", "num"), [(0x1000, 16), (0x600, 32), (0x6000, 2)])  # all in guest memory
def test_same_bytes_as_the_frame_path(v6: bool, size: int, segment: int, buffer: int, num: int) -> None:
    got = compare(mergeable_ring(num, buffer), num, TSO, Segments(v6, size, segment))
    assert not isinstance(got[0], str), got[0]  # good rings: no RingError on either path


def test_direct_segments_arrive_as_the_guest_must_see_them() -> None:
    """Each segment: NEEDS_CSUM at the TCP header, GSO with the MSS when larger than the MTU,
    num_buffers counted; completing the checksum as a forwarding guest would gives the right one."""
    g = Guest(num=16)
    mergeable_ring(16, 0x1800)(g)  # (all inside the test's guest memory)
    q = g.queue()
    dev = device(TSO)
    dev.rx_queue = q
    segs = Segments(False, 2 * 20 * MSS + 10, 20 * MSS)
    assert segs.direct(dev) == 3
    frames = segs.frames(checksum=True)
    slot = 0
    for frame in frames:
        head, length = g.used_elem(slot)
        got = g.peek(BUFS + 0x1800 * head, min(length, 0x1800))
        flags, gso, hdr_len, gso_size, csum_start, csum_offset = vnet.parse_header(got, 12)
        buffers = int.from_bytes(got[10:12], "little")
        data = b"".join(
            g.peek(BUFS + 0x1800 * g.used_elem(s)[0], g.used_elem(s)[1]) for s in range(slot, slot + buffers)
        )[12:]
        slot += buffers
        assert (flags, csum_start, csum_offset) == (vnet.F_NEEDS_CSUM, 34, 16)
        if len(frame) > 1514:
            assert (gso, hdr_len, gso_size) == (vnet.GSO_TCPV4, 54, MSS)
        else:
            assert (gso, hdr_len, gso_size) == (vnet.GSO_NONE, 0, 0)
        whole = bytearray(data)
        vnet.complete_checksum(whole, csum_start, csum_offset)
        assert whole == frame
    assert slot == q.used_idx
    assert dev.take_direct_mark() == 0 and dev.take_direct_mark() == -1


def test_nothing_overtakes_a_waiting_frame() -> None:
    """Frames waiting for RX buffers, a ring that does not run, a guest without partial
    checksums: the direct path writes nothing and changes nothing."""
    g = Guest(num=8)
    mergeable_ring(8, 0x1000)(g)
    q = g.queue()
    segs = Segments(False, 10_000, MSS)
    dev = device(TSO)
    assert segs.direct(dev) == 0  # no ring
    dev.rx_queue = q
    dev.rx_pending.append(b"x" * 60)
    assert segs.direct(dev) == 0
    dev.rx_pending.clear()
    plain = device(vu.VIRTIO_F_VERSION_1 | vu.VIRTIO_NET_F_MRG_RXBUF)
    plain.rx_queue = q
    assert segs.direct(plain) == 0
    assert q.last_avail_idx == 0 and q.used_idx == 0 and dev.take_direct_mark() == -1


def test_a_ring_with_few_buffers_takes_what_fits() -> None:
    """Room for two of five segments: two go straight in, the rest as frames, in order."""
    got = compare(mergeable_ring(2, 0x1000), 2, TSO, Segments(True, 5 * 1000, 1000))
    assert got[2] == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 4, 8, 16]),
    ring=st.lists(DESCS, min_size=16, max_size=16),
    indirect=st.lists(DESCS, min_size=4, max_size=4),
    heads=st.one_of(st.permutations(list(range(16))), st.lists(st.integers(0, 17), max_size=18)),
    start=st.integers(0, 0xFFFF),
    size=st.integers(1, 0x3000),
    segment=st.sampled_from([MSS, 0x800, 0x2000, 536]),
    v6=st.booleans(),
    mrg=st.booleans(),
)
def test_same_result_as_the_frame_path_on_hostile_rings(
    num: int,
    ring: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
    start: int,
    size: int,
    segment: int,
    v6: bool,
    mrg: bool,
) -> None:
    """Descriptors outside guest memory, looping or overlapping chains, readable buffers, heads
    out of range or twice, an avail index far ahead: the direct path writes only what the
    Python would have written the same way, and the Python meets the rest."""
    features = TSO if mrg else TSO & ~vu.VIRTIO_NET_F_MRG_RXBUF
    segs = Segments(v6, size, segment)
    fast, slow = twins(lambda g: g.lay_out(ring, indirect, heads, start), num)
    results = []
    for g, path in ((fast, through_direct), (slow, through_frames)):
        q = SplitQueue(g.memory, num, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED, False, start)
        results.append(path(g, q, features, segs))
    assert results[0] == results[1]


def test_bad_arguments_raise() -> None:
    """The C checks what the caller passes (a bug of ours, not the guest's): ValueError."""
    g = Guest(num=4)
    mergeable_ring(4, 0x1000)(g)
    q = g.queue()
    segs = Segments(False, 100, MSS)
    with pytest.raises(ValueError):
        q.write_segments(12, True, [], segs.header, segs.buf, 0, len(segs.buf) + 1, 0, MSS, MSS, 0, 0, 0, 0, 0, 1500)
    with pytest.raises(ValueError):
        q.write_segments(11, True, [], segs.header, segs.buf, 0, 10, 10, MSS, MSS, 0, 0, 0, 0, 0, 1500)
    with pytest.raises(TypeError):
        q.write_segments(12, True, [], b"short", segs.buf, 0, 10, 10, MSS, MSS, 0, 0, 0, 0, 0, 1500)
    assert q.last_avail_idx == 0

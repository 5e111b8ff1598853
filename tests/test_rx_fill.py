"""core/_vring.c, the RX fast path (SplitQueue.write_frame), against the Python it stands in for.

NetDevice.fill_rx runs twice on identical guests, once with the C fast path and once without
(SplitQueue.fast_rx off): guest memory, the used ring, what was taken and what was raised must be
the same, for normal rings and for hostile ones (the fast path declines those and the Python
raises). Needs the package built with its C extensions; skipped on the plain sources.
"""

import socket
import struct
from collections import deque
from collections.abc import Callable

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_vpnnet.core import vhost_user as vu
from qemu_vpnnet.core import virtio_net as vnet
from qemu_vpnnet.core import virtqueue
from qemu_vpnnet.core.actions import Counters
from qemu_vpnnet.core.vhost_net import NetDevice
from qemu_vpnnet.core.virtqueue import RingError, SplitQueue
from tests.test_virtqueue import AVAIL, DESC, NEXT, TABLE, USED, UVA0, WRITE, Guest

pytestmark = pytest.mark.skipif(not virtqueue.HAVE_RX_FILL, reason="built without core/_vring.c")

GATEWAY = bytes.fromhex("525500000202")
MODERN = vu.VIRTIO_F_VERSION_1 | vu.VIRTIO_NET_F_GUEST_CSUM | vu.VIRTIO_NET_F_GUEST_TSO4
BUFS = 0x4000  # guest buffers from here on, in regions 0 and 1 (adjacent at 0x10000)


def device(features: int) -> NetDevice:
    dev = NetDevice(GATEWAY, 1500, Counters(), lambda frame, v6, start: 1448)
    dev.negotiate(features)
    return dev


def frame_of(n: int, seed: int) -> bytes:
    """An n-byte frame from the gateway (its bytes differ from frame to frame)."""
    body = bytes((seed * 7 + i) & 0xFF for i in range(max(0, n - 14)))
    return bytes(6) + GATEWAY + b"\x08\x06" + body


def tcp_to_guest(n: int, seed: int, v6: bool = False, pad: int = 0) -> bytes:
    """A TCP segment with n payload bytes from the gateway, its checksums right (dpkt), and pad
    bytes of Ethernet padding after the IP packet."""
    data = bytes((seed * 13 + i) & 0xFF for i in range(n))
    seg = dpkt.tcp.TCP(sport=80, dport=40000 + seed, seq=seed, ack=7, flags=dpkt.tcp.TH_ACK, win=65535, data=data)
    if v6:
        src, dst = socket.inet_pton(socket.AF_INET6, "fec0::2"), socket.inet_pton(socket.AF_INET6, "fec0::15")
        packet: dpkt.Packet = dpkt.ip6.IP6(src=src, dst=dst, nxt=6, hlim=64, plen=20 + n, data=seg)
        etype = dpkt.ethernet.ETH_TYPE_IP6
    else:
        packet = dpkt.ip.IP(src=socket.inet_aton("10.0.2.2"), dst=socket.inet_aton("10.0.2.15"), p=6, ttl=64, data=seg)
        packet.len = 40 + n
        etype = dpkt.ethernet.ETH_TYPE_IP
    frame = bytes(dpkt.ethernet.Ethernet(dst=bytes(6), src=GATEWAY, type=etype, data=packet))
    return frame + bytes(pad)


def run(guest: Guest, queue: SplitQueue, features: int, frames: list[bytes]) -> tuple[object, ...]:
    """fill_rx over frames; everything it changed or said."""
    dev = device(features)
    pending = deque(frames)
    try:
        outcome: object = dev.fill_rx(queue, pending)
    except (RingError, ValueError) as exc:
        outcome = repr(exc)
    return (
        outcome,
        len(pending),
        [bytes(b) for b in guest.bufs],
        queue.last_avail_idx,
        queue.used_idx,
        dev.counters.snapshot(),
    )


def twins(build: Callable[[Guest], None], num: int, event_idx: bool = False) -> tuple[Guest, Guest]:
    fast = Guest(num=num, event_idx=event_idx)
    slow = Guest(num=num, event_idx=event_idx)
    build(fast)
    build(slow)
    return fast, slow


def compare(
    build: Callable[[Guest], None], num: int, features: int, frames: list[bytes], start: int = 0
) -> tuple[object, ...]:
    fast, slow = twins(build, num)
    q_fast = fast.queue(last_avail_idx=start)
    q_slow = slow.queue(last_avail_idx=start)
    q_slow.fast_rx = False
    got = run(fast, q_fast, features, frames)
    want = run(slow, q_slow, features, frames)
    assert got == want
    return got


def mergeable_ring(num: int, size: int) -> Callable[[Guest], None]:
    def build(g: Guest) -> None:
        for i in range(num):
            g.desc(i, BUFS + i * size, size, WRITE)
        g.offer(*range(num))

    return build


def test_fast_path_takes_a_64k_frame_into_mergeable_buffers() -> None:
    """The normal case is the C's: a 64 KiB TSO frame across 16 4-KiB buffers (as Linux offers
    them), the header's num_buffers set, the bytes where the Python puts them."""
    g = Guest(num=16)
    mergeable_ring(16, 0x1000)(g)
    q = g.queue()
    used: list[int] = []
    frame = frame_of(0x1000 * 16 - 12, 1)
    header = bytes(range(1, 11)) + b"\xff\xff"
    assert q.write_frame(header, 10, frame, 50, 0xABCD, True, 16, used) == 16
    assert q.last_avail_idx == 16
    assert used == [x for i in range(16) for x in (i, 0x1000)]
    data = b"".join(g.peek(BUFS + i * 0x1000, 0x1000) for i in range(16))
    assert data == bytes(range(1, 11)) + struct.pack("<H", 16) + frame[:50] + b"\xab\xcd" + frame[52:]
    q.push_batch(used)  # the heads were marked held
    assert g.used_idx() == 16


def test_fast_path_declines_without_changing_anything() -> None:
    """Too few buffers: 0, and no memory, head or index changed; off, it always declines."""
    g = Guest(num=4)
    mergeable_ring(4, 0x100)(g)
    q = g.queue()
    before = [bytes(b) for b in g.bufs]
    used: list[int] = []
    assert q.write_frame(bytes(12), 10, frame_of(0x400, 2), -1, 0, True, 4, used) == 0
    assert used == [] and q.last_avail_idx == 0 and [bytes(b) for b in g.bufs] == before
    q.fast_rx = False
    assert q.write_frame(bytes(12), 10, frame_of(0x80, 2), -1, 0, True, 4, used) == 0
    q.fast_rx = True
    assert q.write_frame(bytes(12), 10, frame_of(0x80, 2), -1, 0, True, 4, used) == 1
    assert used == [0, 12 + 0x80]


@pytest.mark.parametrize("features", [MODERN | vu.VIRTIO_NET_F_MRG_RXBUF, MODERN, 0, vu.VIRTIO_NET_F_MRG_RXBUF])
@pytest.mark.parametrize("size", [0x40, 0x600, 0x1000])
def test_same_result_as_python_on_normal_rings(features: int, size: int) -> None:
    frames = [frame_of(n, k) for k, n in enumerate([60, 1514, 0x1000, 0x3000, 42])]
    frames += [tcp_to_guest(0, 1, pad=6), tcp_to_guest(1460, 2), tcp_to_guest(0x2000, 3, v6=True)]
    compare(mergeable_ring(8, size), 8, features, frames)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("frame", "ip_end"),
    [
        (tcp_to_guest(1000, 1), None),
        (tcp_to_guest(0x3000, 2), None),  # larger than the MTU: GSO_TCPV4 as well
        (tcp_to_guest(1000, 3, v6=True), None),
        (tcp_to_guest(0x3000, 4, v6=True), None),
        (tcp_to_guest(0, 5, pad=6), 14 + 40),  # a padded ACK: the TCP length is the IP header's
    ],
)
def test_tcp_toward_the_guest_goes_as_a_partial_checksum(frame: bytes, ip_end: int | None, fast: bool) -> None:
    """GUEST_CSUM: our TCP frames are NEEDS_CSUM with the pseudo-header sum in the field, whatever
    it held (the engine leaves it 0 for such a guest); completing the checksum as a forwarding
    guest would gives back the frame with its right checksum."""
    g = Guest(num=16)
    mergeable_ring(16, 0x1000)(g)
    q = g.queue()
    q.fast_rx = fast
    start = 34 if frame[12:14] == b"\x08\x00" else 54
    zeroed = frame[: start + 16] + b"\0\0" + frame[start + 18 :]
    dev = device(MODERN | vu.VIRTIO_NET_F_GUEST_TSO6 | vu.VIRTIO_NET_F_MRG_RXBUF)
    assert dev.fill_rx(q, deque([zeroed])) == (len(frame), True)
    chains = (q.used_idx - 0) & 0xFFFF
    got = b"".join(g.peek(BUFS + 0x1000 * i, g.used_elem(i)[1]) for i in range(chains))
    flags, gso, hdr_len, gso_size, csum_start, csum_offset = vnet.parse_header(got, 12)
    assert flags == vnet.F_NEEDS_CSUM and (csum_start, csum_offset) == (start, 16)
    if len(frame) > 1514:
        assert gso == (vnet.GSO_TCPV6 if start == 54 else vnet.GSO_TCPV4) and (hdr_len, gso_size) == (start + 20, 1448)
    else:
        assert gso == vnet.GSO_NONE
    delivered = bytearray(got[12:])
    assert bytes(delivered) != frame  # the field holds the partial sum, not the checksum
    end = ip_end if ip_end is not None else len(delivered)
    whole = delivered[:end]
    vnet.complete_checksum(whole, csum_start, csum_offset)
    assert bytes(whole) == frame[:end]


def test_other_frames_keep_their_checksums() -> None:
    """UDP and ARP from the gateway: DATA_VALID, untouched; a guest without GUEST_CSUM: unmarked."""
    udp = bytearray(tcp_to_guest(100, 6))
    udp[23] = 17  # the IPv4 protocol: UDP (its bytes are not looked at)
    for features, frame, flags in [
        (MODERN, bytes(udp), vnet.F_DATA_VALID),
        (MODERN, frame_of(100, 1), vnet.F_DATA_VALID),
        (vu.VIRTIO_F_VERSION_1, tcp_to_guest(100, 7), 0),
    ]:
        header, patch_at, _ = device(features).rx_offload(frame, 1)
        assert patch_at == -1 and vnet.parse_header(header, 12)[0] == flags


def test_legacy_guest_gets_a_10_byte_header() -> None:
    """Neither VERSION_1 nor MRG_RXBUF: the header is 10 bytes (no num_buffers), on both paths."""
    frame = frame_of(100, 3)
    for fast in (True, False):
        g = Guest(num=2)
        mergeable_ring(2, 0x200)(g)
        q = g.queue()
        q.fast_rx = fast
        dev = device(0)
        assert dev.fill_rx(q, deque([frame])) == (100, True)
        assert g.used_elem(0) == (0, 110)
        assert g.peek(BUFS + 10, 100) == frame


def test_buffer_across_adjacent_regions_and_indirect_go_to_python() -> None:
    """The C declines what it does not do (the Python splits or follows it): same result."""

    def build(g: Guest) -> None:
        g.desc(0, 0x10000 - 0x20, 0x200, WRITE)  # regions 0 and 1 are adjacent there
        g.desc(1, TABLE, 16, 4)  # an indirect table of one descriptor
        g.desc(0, BUFS, 0x200, WRITE, table=TABLE)
        g.desc(2, BUFS + 0x400, 0x10, WRITE | NEXT, 3)
        g.desc(3, BUFS + 0x800, 0x400, WRITE)
        g.offer(0, 1, 2)

    got = compare(
        build, 4, MODERN | vu.VIRTIO_NET_F_MRG_RXBUF, [frame_of(0x100, 4), frame_of(0x100, 5), frame_of(0x300, 6)]
    )
    assert got[0] == (0x500, True)


def _readable_first(g: Guest) -> None:
    g.desc(0, BUFS, 0x100, NEXT, 1)  # device-readable, then writable: the Python writes the second only
    g.desc(1, BUFS + 0x200, 0x200, WRITE)
    g.offer(0)


def _next_past_table(g: Guest) -> None:
    g.desc(0, BUFS, 0x100, WRITE | NEXT, 4)  # next == num: outside the table
    g.desc(4, BUFS + 0x200, 0x200, WRITE)  # (the bytes after the table look like a good descriptor)
    g.offer(0)


def _zero_length_loop(g: Guest) -> None:
    g.desc(0, BUFS, 0, WRITE | NEXT, 0)
    g.offer(0)


def _head_held_twice(g: Guest) -> None:
    g.desc(0, BUFS, 0x40, WRITE)
    g.offer(0, 0)  # the same head twice for one frame


def _past_region_end(g: Guest) -> None:
    g.desc(0, 0x100FF0, 0x20, WRITE)  # region 2 ends at 0x101000
    g.offer(0)


@pytest.mark.parametrize(
    "build", [_readable_first, _next_past_table, _zero_length_loop, _head_held_twice, _past_region_end]
)
def test_chains_the_c_must_refuse(build: Callable[[Guest], None]) -> None:
    """Each is the Python's to take or to refuse: the C declines, so both paths agree."""
    g = Guest(num=4)
    build(g)
    assert g.queue().write_frame(bytes(12), 10, frame_of(0x80, 7), -1, 0, True, 4, []) == 0
    compare(build, 4, MODERN | vu.VIRTIO_NET_F_MRG_RXBUF, [frame_of(0x80, 7)])


ADDRS = st.one_of(
    st.integers(BUFS, 0x20100),
    st.sampled_from([BUFS, 0xFFF0, 0x1FFF0, 0x100000, 0x100FF0, 0x50000, DESC, AVAIL, USED, (1 << 64) - 16]),
    st.integers(0, (1 << 64) - 1),
)
LENGTHS = st.one_of(st.integers(0, 0x800), st.sampled_from([16, 0x1000, 0xFFFFFFFF]))
FLAGS = st.one_of(st.just(WRITE), st.just(WRITE | NEXT), st.integers(0, 7))
# half of them a plausible RX buffer, so that the C takes some frames and declines others
GOOD = st.tuples(
    st.integers(BUFS, 0xC000),
    st.integers(0x40, 0x800),
    st.sampled_from([WRITE, WRITE, WRITE | NEXT]),
    st.integers(0, 16),
)
DESCS = st.one_of(GOOD, GOOD, st.tuples(ADDRS, LENGTHS, FLAGS, st.integers(0, 17)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 4, 8, 16]),
    ring=st.lists(DESCS, min_size=16, max_size=16),
    indirect=st.lists(DESCS, min_size=4, max_size=4),
    heads=st.one_of(st.permutations(list(range(16))), st.lists(st.integers(0, 17), max_size=18)),
    dense=st.booleans(),
    held=st.lists(st.integers(0, 15), max_size=3),
    start=st.integers(0, 0xFFFF),
    sizes=st.lists(st.one_of(st.integers(14, 0x300), st.integers(14, 0x2000)), min_size=1, max_size=4),
    features=st.sampled_from(
        [
            MODERN | vu.VIRTIO_NET_F_MRG_RXBUF,
            MODERN,
            0,
            vu.VIRTIO_NET_F_MRG_RXBUF,
            MODERN | vu.VIRTIO_NET_F_MRG_RXBUF | vu.VIRTIO_RING_F_EVENT_IDX,  # (the kick it asks for, too)
        ]
    ),
)
def test_same_result_as_python_on_hostile_rings(
    num: int,
    ring: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
    held: list[int],
    start: int,
    sizes: list[int],
    features: int,
    dense: bool,
) -> None:
    if dense:  # heads the ring can hold, each once
        heads = list(dict.fromkeys(h for h in heads if h < num))
    held_heads = sorted({h for h in held if h < num})

    fast, slow = twins(lambda g: g.lay_out(ring, indirect, heads, start), num)
    queues = []
    for g in (fast, slow):
        # heads the device holds already: popped from an earlier offer, at a lower index
        event_idx = bool(features & vu.VIRTIO_RING_F_EVENT_IDX)
        q = SplitQueue(
            g.memory, num, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED, event_idx, (start - len(held_heads)) & 0xFFFF
        )
        for head in held_heads:
            q._in_flight[head] = 1
        q.last_avail_idx = start
        queues.append(q)
    queues[1].fast_rx = False
    frames = [tcp_to_guest(n, k, v6=bool(k & 2)) if k & 1 else frame_of(n, k) for k, n in enumerate(sizes)]
    assert run(fast, queues[0], features, frames) == run(slow, queues[1], features, frames)

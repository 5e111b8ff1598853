"""NetDevice.fill_rx waiting for RX buffers with EVENT_IDX: the kick it asks the guest for, and
buffers the guest adds while it asks (a lost kick there stalls the guest's RX for good). Runs on
the plain sources and on the installed package alike (the C fill declines nothing here that
matters: the frames wait for buffers either way)."""

import struct
from collections import deque

import pytest

from qemu_vpnnet.core import vhost_user as vu
from qemu_vpnnet.core.actions import Counters
from qemu_vpnnet.core.vhost_net import NetDevice
from qemu_vpnnet.core.virtqueue import SplitQueue
from tests.test_virtqueue import AVAIL, DESC, USED, UVA0, WRITE, Guest

GATEWAY = bytes.fromhex("525500000202")
BUFS = 0x4000
EVENT_IDX_MRG = (
    vu.VIRTIO_F_VERSION_1 | vu.VIRTIO_NET_F_GUEST_CSUM | vu.VIRTIO_NET_F_MRG_RXBUF | vu.VIRTIO_RING_F_EVENT_IDX
)


def device(features: int) -> NetDevice:
    dev = NetDevice(GATEWAY, 1500, Counters(), lambda frame, v6, start: 1460)
    dev.negotiate(features)
    return dev


def frame_of(n: int, seed: int) -> bytes:
    """n bytes that are no IP frame (no offload touches them)."""
    return bytes(12) + b"\x88\xb5" + bytes((seed + i) & 0xFF for i in range(n - 14))


def avail_event(g: Guest) -> int:
    value: int = struct.unpack("<H", g.peek(USED + 4 + 8 * g.num, 2))[0]
    return value


def guest_kicks(event: int, new: int, old: int) -> bool:
    """The driver's side of EVENT_IDX: whether moving avail.idx from old to new kicks."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def test_a_frame_waiting_for_more_buffers_gets_a_kick_at_the_next_one() -> None:
    """Two page buffers there, a frame that needs three: nothing is taken, and the kick asked for
    is at the guest's next buffer, not at the two it offered already (those would never kick)."""
    g = Guest(num=8, event_idx=True)
    for i in range(8):
        g.desc(i, BUFS + i * 0x1000, 0x1000, WRITE)
    g.offer(0, 1)
    q = g.queue()
    dev = device(EVENT_IDX_MRG)
    pending = deque([frame_of(0x2800, 3)])
    assert dev.fill_rx(q, pending) == (0, False)
    assert len(pending) == 1 and q.last_avail_idx == 0 and q.used_idx == 0
    assert avail_event(g) == 2
    g.offer(2)
    assert guest_kicks(avail_event(g), 3, 2)
    assert dev.fill_rx(q, pending)[0] == 0x2800 and not pending


def test_an_empty_ring_asks_for_a_kick_at_the_first_buffer() -> None:
    g = Guest(num=8, event_idx=True)
    g.desc(0, BUFS, 0x1000, WRITE)
    q = g.queue()
    dev = device(EVENT_IDX_MRG)
    pending = deque([frame_of(100, 1)])
    assert dev.fill_rx(q, pending) == (0, False)
    assert avail_event(g) == 0
    g.offer(0)
    assert guest_kicks(avail_event(g), 1, 0)


def test_buffers_added_while_the_kick_is_asked_for_are_filled() -> None:
    """The guest adds buffers just before it can see the new avail_event (so it does not kick):
    fill_rx looks at the ring again after asking and fills them, instead of waiting for a kick
    that never comes (a stalled guest under connection churn, before this check)."""
    g = Guest(num=8, event_idx=True)
    for i in range(8):
        g.desc(i, BUFS + i * 0x1000, 0x1000, WRITE)

    try:

        class Racing(SplitQueue):
            raced = False

            def set_avail_event(self, idx: int | None = None) -> None:
                if not self.raced:
                    self.raced = True
                    old = g.avail
                    g.offer(0, 1)  # the guest's refill, with the old avail_event in view: no kick
                    assert not guest_kicks(avail_event(g), g.avail, old)
                super().set_avail_event(idx)

        # the guest's earlier buffers all used; avail_event still where it was asked for long ago
        g.set_avail_idx(2)
        q = Racing(g.memory, g.num, UVA0 + DESC, UVA0 + AVAIL, UVA0 + USED, True, 2)
    except TypeError:  # (raised when the class is instantiated)
        pytest.skip("SplitQueue is compiled (no interpreted subclass): the plain run has this test")
    q.fast_rx = False
    dev = device(EVENT_IDX_MRG)
    pending = deque([frame_of(0x1800, 5)])
    assert dev.fill_rx(q, pending)[0] == 0x1800
    assert (len(pending), q.last_avail_idx, q.used_idx) == (0, 4, 2)

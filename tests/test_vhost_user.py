"""The vhost-user message layer: QEMU 7.2's sequence for a virtio-net device, and a hostile front-end.

Messages are built here with struct, independently of the module under test."""

import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_vpnnet.core import vhost_user as vu
from qemu_vpnnet.core.vhost_user import Message, MessageDecoder, VhostUserBackend, VhostUserError, parse_header

NEED_REPLY = 0x8
GUEST_FEATURES = (1 << 32) | (1 << 15) | (1 << 29)  # VERSION_1, MRG_RXBUF, EVENT_IDX as a Linux guest acks them
PROTOCOL_BIT = 1 << 30
QEMU_PROTOCOL = (1 << 3) | (1 << 4) | (1 << 15)  # what QEMU 7.2 keeps of ours: REPLY_ACK, NET_MTU, MEM_SLOTS
MIB = 1 << 20


def wire(request: int, payload: bytes = b"", flags: int = 1) -> bytes:
    return struct.pack("<III", request, flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def addr(index: int, desc: int, used: int, avail: int, flags: int = 0) -> bytes:
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, 0)


def region(gpa: int, size: int, uva: int, offset: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, offset)


def mem_table(*regions: bytes) -> bytes:
    return struct.pack("<II", len(regions), 0) + b"".join(regions)


def reply_u64(reply: vu.Reply | None, request: int) -> int:
    assert reply is not None
    data = reply.to_bytes()
    req, flags, size = struct.unpack_from("<III", data)
    assert (req, flags, size) == (request, 0x5, 8)
    value: int = struct.unpack_from("<Q", data, 12)[0]
    return value


def kinds(effects: list[vu.Effect]) -> list[tuple[str, int]]:
    """Effects as (kind, ring) or (kind, fd), the way the tests spell them."""
    out = []
    for e in effects:
        if e.kind in (vu.EFFECT_CLOSE_FD, vu.EFFECT_WATCH_KICK) and e.ring < 0:
            out.append((e.kind, e.fd))
        elif e.kind == vu.EFFECT_WATCH_KICK:
            out.append((e.kind, e.ring * 1000 + e.fd))
        elif e.region is not None:
            out.append((e.kind, e.region.fd))
        else:
            out.append((e.kind, e.ring))
    return out


class Peer:
    """A front-end talking to one back-end through the decoder, one sendmsg per message."""

    def __init__(self, backend: VhostUserBackend | None = None) -> None:
        self.backend = backend or VhostUserBackend()
        self.decoder = MessageDecoder()

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 1) -> vu.Reply | None:
        messages = self.decoder.feed(wire(request, payload, flags), fds or [])
        assert len(messages) == 1
        assert messages[0].fds == (fds or [])
        return self.backend.handle(messages[0])

    def owned(self) -> "Peer":
        assert self.send(vu.SET_OWNER) is None
        return self


def negotiate(peer: Peer, protocol: int = QEMU_PROTOCOL) -> None:
    """QEMU 7.2's vhost_user_backend_init, then vhost_dev_init's SET_OWNER and GET_FEATURES."""
    features = reply_u64(peer.send(vu.GET_FEATURES), vu.GET_FEATURES)
    assert features == vu.DEFAULT_FEATURES
    offered = reply_u64(peer.send(vu.GET_PROTOCOL_FEATURES), vu.GET_PROTOCOL_FEATURES)
    assert offered == vu.PROTOCOL_FEATURES
    assert peer.send(vu.SET_PROTOCOL_FEATURES, u64(offered & protocol)) is None
    if protocol & vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS:
        assert reply_u64(peer.send(vu.GET_MAX_MEM_SLOTS), vu.GET_MAX_MEM_SLOTS) == vu.MAX_MEM_SLOTS
    assert peer.send(vu.SET_OWNER) is None
    assert reply_u64(peer.send(vu.GET_FEATURES), vu.GET_FEATURES) == vu.DEFAULT_FEATURES


def configure_ring(peer: Peer, index: int, kick: int, call: int, base: int = 0) -> None:
    """vhost_virtqueue_start: NUM, BASE, ADDR, KICK, then the guest notifier's CALL."""
    desc = 0x7F0000100000 + index * 0x10000
    assert peer.send(vu.SET_VRING_NUM, state(index, 256)) is None
    assert peer.send(vu.SET_VRING_BASE, state(index, base)) is None
    assert peer.send(vu.SET_VRING_ADDR, addr(index, desc, desc + 0x2000, desc + 0x1000)) is None
    assert peer.send(vu.SET_VRING_KICK, u64(index), [kick]) is None
    assert peer.send(vu.SET_VRING_CALL, u64(index), [call]) is None


def test_qemu_72_virtio_net_start_and_stop_with_mem_slots() -> None:
    peer = Peer()
    negotiate(peer)
    b = peer.backend
    assert b.owner and b.protocol_features == QEMU_PROTOCOL and b.reply_ack
    # vhost_virtqueue_init: the masked notifier as call fd, and the error notifier, per ring
    for index, (call, err) in enumerate([(10, 11), (12, 13)]):
        assert peer.send(vu.SET_VRING_CALL, u64(index), [call]) is None
        assert peer.send(vu.SET_VRING_ERR, u64(index), [err]) is None
    assert b.take_effects() == []
    # vhost_dev_start: features (with the protocol-features bit QEMU adds), memory, rings, enable
    assert peer.send(vu.SET_FEATURES, u64(GUEST_FEATURES | PROTOCOL_BIT)) is None
    assert b.features == GUEST_FEATURES | PROTOCOL_BIT and b.protocol_features_negotiated
    ack = peer.send(vu.ADD_MEM_REG, u64(0) + region(0, 0xC0000000, 0x7F0000000000), [20], flags=1 | NEED_REPLY)
    assert reply_u64(ack, vu.ADD_MEM_REG) == 0
    ack = peer.send(
        vu.ADD_MEM_REG, u64(0) + region(0x100000000, 0x40000000, 0x7F00C0000000, 0xC0000000), [21], 1 | NEED_REPLY
    )
    assert reply_u64(ack, vu.ADD_MEM_REG) == 0
    assert [r.as_tuple() for r in b.regions] == [
        (0, 0xC0000000, 0x7F0000000000, 0, 20),
        (0x100000000, 0x40000000, 0x7F00C0000000, 0xC0000000, 21),
    ]
    assert kinds(b.take_effects()) == [("mmap", 20), ("mmap", 21)]
    configure_ring(peer, 0, kick=30, call=31)
    configure_ring(peer, 1, kick=32, call=33, base=7)
    assert kinds(b.take_effects()) == [
        ("watch-kick", 30),
        ("close-fd", 10),
        ("watch-kick", 1032),
        ("close-fd", 12),
    ]
    rx, tx = b.rings
    assert (rx.num, rx.desc_addr, rx.avail_addr, rx.used_addr) == (256, 0x7F0000100000, 0x7F0000101000, 0x7F0000102000)
    assert (tx.kick_fd, tx.call_fd, tx.err_fd, tx.base) == (32, 33, 13, 7)
    assert not rx.started and not rx.enabled
    for index in (0, 1):
        assert peer.send(vu.SET_VRING_ENABLE, state(index, 1)) is None
    assert kinds(b.take_effects()) == [("enable", 0), ("enable", 1)]
    # the spec: a ring starts on its first kick; enabled already, since protocol features were negotiated
    assert b.kicked(1) and tx.started and not rx.started
    assert b.kicked(1)
    assert kinds(b.take_effects()) == [("start", 1)]
    b.set_last_avail_idx(1, 0x1234)
    # vhost_dev_stop: disable, then GET_VRING_BASE per ring
    for index in (0, 1):
        assert peer.send(vu.SET_VRING_ENABLE, state(index, 0)) is None
    reply = peer.send(vu.GET_VRING_BASE, state(1, 0))
    assert reply is not None and reply.to_bytes() == wire(vu.GET_VRING_BASE, state(1, 0x1234), flags=0x5)
    reply = peer.send(vu.GET_VRING_BASE, state(0, 0))
    assert reply is not None and reply.to_bytes() == wire(vu.GET_VRING_BASE, state(0, 0), flags=0x5)
    assert kinds(b.take_effects()) == [
        ("disable", 0),
        ("disable", 1),
        ("stop", 1),
        ("close-fd", 32),
        ("close-fd", 30),
    ]
    assert not tx.started and tx.kick_fd == -1 and tx.call_fd == 33
    assert not b.kicked(1)  # no kick descriptor any more: stays stopped
    # the device goes away: everything held is released
    assert sorted(b.held_fds()) == [11, 13, 20, 21, 31, 33]
    closed = [e.fd for e in b.shutdown() if e.kind == "close-fd"]
    assert sorted(closed) == [11, 13, 20, 21, 31, 33]
    assert b.held_fds() == []


def test_qemu_72_set_mem_table_without_mem_slots_and_without_protocol_features() -> None:
    peer = Peer()
    negotiate(peer, protocol=1 << 3)
    b = peer.backend
    assert peer.send(vu.SET_FEATURES, u64(GUEST_FEATURES)) is None  # an older QEMU: no bit 30
    table = mem_table(region(0, 0xA0000, 0x7F0000000000), region(0x100000, 0x3FF00000, 0x7F0000100000, 0x100000))
    assert reply_u64(peer.send(vu.SET_MEM_TABLE, table, [40, 41], flags=1 | NEED_REPLY), vu.SET_MEM_TABLE) == 0
    assert kinds(b.take_effects()) == [("mmap", 40), ("mmap", 41)]
    configure_ring(peer, 0, kick=50, call=51)
    b.take_effects()
    assert b.kicked(0)
    # without VHOST_USER_F_PROTOCOL_FEATURES negotiated the ring starts enabled
    assert kinds(b.take_effects()) == [("start", 0), ("enable", 0)]
    # a new table (memory hot-plug) unmaps and closes the old regions first
    assert peer.send(vu.SET_MEM_TABLE, mem_table(region(0, 0x40000000, 0x7F1000000000)), [42]) is None
    assert kinds(b.take_effects()) == [("unmap", 40), ("close-fd", 40), ("unmap", 41), ("close-fd", 41), ("mmap", 42)]
    assert [r.fd for r in b.regions] == [42]


def test_reply_ack_on_requests_without_a_reply_of_their_own() -> None:
    peer = Peer()
    negotiate(peer)
    assert reply_u64(peer.send(vu.SET_FEATURES, u64(GUEST_FEATURES), flags=1 | NEED_REPLY), vu.SET_FEATURES) == 0
    assert reply_u64(peer.send(vu.SET_VRING_NUM, state(0, 8), flags=1 | NEED_REPLY), vu.SET_VRING_NUM) == 0
    assert peer.send(vu.SET_VRING_NUM, state(0, 16)) is None  # no NEED_REPLY: no ack
    # requests with a reply of their own keep it
    assert reply_u64(peer.send(vu.GET_FEATURES, flags=1 | NEED_REPLY), vu.GET_FEATURES) == vu.DEFAULT_FEATURES
    # MTU: valid, then a refusal by nonzero ack (the spec's words for NET_SET_MTU)
    assert reply_u64(peer.send(vu.NET_SET_MTU, u64(1500), flags=1 | NEED_REPLY), vu.NET_SET_MTU) == 0
    assert peer.backend.mtu == 1500
    assert reply_u64(peer.send(vu.NET_SET_MTU, u64(20), flags=1 | NEED_REPLY), vu.NET_SET_MTU) != 0
    assert peer.backend.mtu == 1500


def test_need_reply_without_reply_ack_negotiated_gets_no_ack() -> None:
    peer = Peer()
    negotiate(peer, protocol=0)
    assert peer.send(vu.SET_FEATURES, u64(GUEST_FEATURES), flags=1 | NEED_REPLY) is None


def test_unknown_request_nonzero_ack_with_reply_ack_and_fds_closed() -> None:
    peer = Peer()
    negotiate(peer)
    assert reply_u64(peer.send(99, b"xyz", [7], flags=1 | NEED_REPLY), 99) != 0
    assert kinds(peer.backend.take_effects()) == [("close-fd", 7)]
    assert reply_u64(peer.send(vu.SET_LOG_BASE, u64(0) + u64(0), [8], flags=1 | NEED_REPLY), vu.SET_LOG_BASE) != 0
    assert kinds(peer.backend.take_effects()) == [("close-fd", 8)]
    # REM_MEM_REG of a region we do not hold: refused the same way
    reply = peer.send(vu.REM_MEM_REG, u64(0) + region(0, 4096, 0x1000), flags=1 | NEED_REPLY)
    assert reply_u64(reply, vu.REM_MEM_REG) != 0


def test_rem_mem_reg_unmaps_and_closes_a_passed_fd() -> None:
    peer = Peer()
    negotiate(peer)
    peer.send(vu.ADD_MEM_REG, u64(0) + region(0, 0x100000, 0x7F0000000000), [20])
    peer.send(vu.ADD_MEM_REG, u64(0) + region(0x100000, 0x100000, 0x7F0000100000), [21])
    peer.backend.take_effects()
    assert peer.send(vu.REM_MEM_REG, u64(0) + region(0, 0x100000, 0x7F0000000000, 0x999), [22]) is None
    assert kinds(peer.backend.take_effects()) == [("unmap", 20), ("close-fd", 20), ("close-fd", 22)]
    assert [r.fd for r in peer.backend.regions] == [21]


def test_replaced_kick_call_err_fds_are_closed_and_polling(ready: Peer) -> None:
    peer = ready
    b = peer.backend
    configure_ring(peer, 1, kick=30, call=31)
    peer.send(vu.SET_VRING_ERR, u64(1), [32])
    peer.send(vu.SET_VRING_ERR, u64(1), [33])
    peer.send(vu.SET_VRING_CALL, u64(1 | 0x100))  # no fd: the front-end polls
    b.take_effects()
    assert (b.rings[1].call_fd, b.rings[1].err_fd) == (-1, 33)
    peer.send(vu.SET_VRING_KICK, u64(1 | 0x100))  # polling: the ring starts at once
    assert kinds(b.take_effects()) == [("close-fd", 30), ("start", 1)]
    assert b.rings[1].started and b.rings[1].kick_polling


def test_message_split_byte_by_byte() -> None:
    decoder = MessageDecoder()
    data = wire(vu.SET_VRING_KICK, u64(1)) + wire(vu.GET_FEATURES)
    got: list[Message] = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1], [9] if i == 0 else [])
        assert decoder.buffered <= vu.HEADER_SIZE + 8
    assert [(m.request, m.flags, m.payload, m.fds) for m in got] == [
        (vu.SET_VRING_KICK, 1, u64(1), [9]),
        (vu.GET_FEATURES, 1, b"", []),
    ]
    assert decoder.buffered == 0 and decoder.take_fds() == []


def test_several_messages_in_one_chunk_fds_go_to_the_last_one_starting_there() -> None:
    decoder = MessageDecoder()
    first = wire(vu.SET_VRING_KICK, u64(0))
    second = wire(vu.SET_VRING_CALL, u64(0))
    assert decoder.feed(first[:5], [3]) == []
    # the tail of the first, all of the second and the second's fd (Linux stops after that skb)
    got = decoder.feed(first[5:] + second, [4])
    assert [(m.request, m.fds) for m in got] == [(vu.SET_VRING_KICK, [3]), (vu.SET_VRING_CALL, [4])]


def test_parse_header() -> None:
    assert parse_header(wire(5, b"x" * 40, 9)) == (5, 9, 40)
    for bad in (b"\x01\x00", *(struct.pack("<III", 1, f, s) for f, s in ((2, 0), (5, 0), (0x11, 0), (1, 4097)))):
        with pytest.raises(VhostUserError):
            parse_header(bad)


# hostile input: each drops the device with VhostUserError, and no descriptor is lost


def test_size_too_large_refused_before_the_payload() -> None:
    decoder = MessageDecoder()
    with pytest.raises(VhostUserError, match="at most 4096") as info:
        decoder.feed(struct.pack("<III", vu.SET_MEM_TABLE, 1, 1 << 31), [5, 6])
    assert info.value.fds == [5, 6]
    with pytest.raises(VhostUserError) as info:
        decoder.feed(wire(vu.GET_FEATURES), [7])  # a failed stream stays failed
    assert info.value.fds == [7]


def test_decoder_fd_errors_hand_every_fd_back() -> None:
    decoder = MessageDecoder()
    assert decoder.feed(wire(vu.SET_VRING_KICK, u64(0))[:4], [1]) == []
    with pytest.raises(VhostUserError, match="no message starting") as info:
        decoder.feed(b"\x01\x00", [2])  # a continuation chunk carrying fds
    assert info.value.fds == [1, 2]
    decoder = MessageDecoder()
    with pytest.raises(VhostUserError, match="at most 8") as info:
        decoder.feed(wire(vu.SET_MEM_TABLE, mem_table()), list(range(9)))
    assert info.value.fds == list(range(9))
    decoder = MessageDecoder()
    with pytest.raises(VhostUserError):
        decoder.feed(b"", [4])
    decoder = MessageDecoder()
    decoder.feed(wire(vu.SET_VRING_KICK, u64(0))[:13], [5])
    assert decoder.take_fds() == [5]  # the connection ended mid-message


def hostile(peer: Peer, request: int, payload: bytes = b"", fds: list[int] | None = None, match: str = "") -> None:
    before = (sorted(peer.backend.held_fds()), [repr(r) for r in peer.backend.rings], len(peer.backend.regions))
    with pytest.raises(VhostUserError, match=match) as info:
        peer.send(request, payload, fds)
    assert info.value.fds == (fds or [])
    assert peer.backend.take_effects() == []
    after = (sorted(peer.backend.held_fds()), [repr(r) for r in peer.backend.rings], len(peer.backend.regions))
    assert after == before


@pytest.fixture
def ready() -> Peer:
    peer = Peer()
    negotiate(peer)
    peer.send(vu.SET_FEATURES, u64(GUEST_FEATURES | PROTOCOL_BIT))
    peer.backend.take_effects()
    return peer


def test_truncated_and_oversized_payloads(ready: Peer) -> None:
    hostile(ready, vu.SET_FEATURES, b"\x00" * 4, match="needs 8")
    hostile(ready, vu.SET_VRING_NUM, b"\x00" * 7, match="needs 8")
    hostile(ready, vu.SET_VRING_ADDR, addr(0, 0, 0, 0)[:39], match="needs 40")
    hostile(ready, vu.GET_FEATURES, b"\x00" * 8, match="needs 0")
    hostile(ready, vu.SET_MEM_TABLE, b"\x01\x00", match="payload of 2")
    hostile(ready, vu.SET_MEM_TABLE, mem_table(region(0, 4096, 0x1000))[:-1], [5], match="needs 40")
    hostile(ready, vu.ADD_MEM_REG, region(0, 4096, 0x1000), [5], match="needs 40")


def test_wrong_fd_counts(ready: Peer) -> None:
    hostile(ready, vu.SET_VRING_KICK, u64(0), [5, 6], match="2 descriptors, needs 1")
    hostile(ready, vu.SET_VRING_CALL, u64(0), match="0 descriptors, needs 1")
    hostile(ready, vu.SET_VRING_ERR, u64(0x100), [5], match="needs 0")
    hostile(ready, vu.SET_VRING_NUM, state(0, 8), [5], match="needs 0")
    two = mem_table(region(0, 4096, 0x1000), region(4096, 4096, 0x2000))
    hostile(ready, vu.SET_MEM_TABLE, two, [5], match="needs 2")
    hostile(ready, vu.ADD_MEM_REG, u64(0) + region(0, 4096, 0x1000), match="needs 1")
    hostile(ready, vu.REM_MEM_REG, u64(0) + region(0, 4096, 0x1000), [5, 6], match="needs 1")


def test_ring_index_and_size(ready: Peer) -> None:
    hostile(ready, vu.SET_VRING_NUM, state(5, 256), match="ring 5")
    hostile(ready, vu.SET_VRING_KICK, u64(5), [9], match="ring 5")
    hostile(ready, vu.GET_VRING_BASE, state(2, 0), match="ring 2")
    hostile(ready, vu.SET_VRING_ADDR, addr(5, 0x1000, 0x3000, 0x2000), match="ring 5")
    hostile(ready, vu.SET_VRING_CALL, u64(0x200), [9], match="unknown bits")
    for num in (0, 3, 65536, 1 << 31):
        hostile(ready, vu.SET_VRING_NUM, state(0, num), match="power of 2")
    hostile(ready, vu.SET_VRING_BASE, state(0, 0x10000), match="above 0xffff")
    hostile(ready, vu.SET_VRING_ENABLE, state(0, 2), match="not 0 or 1")


def test_ring_addresses(ready: Peer) -> None:
    hostile(ready, vu.SET_VRING_ADDR, addr(0, 0x1000, 0x3000, 0x2000, flags=1), match="logging")
    hostile(ready, vu.SET_VRING_ADDR, addr(0, 0x1000, 0x3000, 0x2000, flags=2), match="flags")
    hostile(ready, vu.SET_VRING_ADDR, addr(0, 0x1008, 0x3000, 0x2000), match="misaligned")
    hostile(ready, vu.SET_VRING_ADDR, addr(0, 0x1000, 0x3002, 0x2000), match="misaligned")


def test_a_running_ring_cannot_be_reconfigured(ready: Peer) -> None:
    configure_ring(ready, 0, kick=30, call=31)
    assert ready.backend.kicked(0)
    ready.backend.take_effects()
    hostile(ready, vu.SET_VRING_NUM, state(0, 128), match="running")
    hostile(ready, vu.SET_VRING_BASE, state(0, 3), match="running")
    hostile(ready, vu.SET_VRING_ADDR, addr(0, 0x1000, 0x3000, 0x2000), match="running")
    hostile(ready, vu.SET_FEATURES, u64(GUEST_FEATURES), match="running")


def test_memory_tables(ready: Peer) -> None:
    a = region(0, 0x100000, 0x7F0000000000)
    guest_overlap = region(0xFF000, 0x1000, 0x7F1000000000)
    user_overlap = region(0x200000, 0x1000, 0x7F00000FF000)
    hostile(ready, vu.SET_MEM_TABLE, mem_table(a, guest_overlap), [5, 6], match="overlaps")
    hostile(ready, vu.SET_MEM_TABLE, mem_table(a, user_overlap), [5, 6], match="overlaps")
    hostile(ready, vu.SET_MEM_TABLE, mem_table(region(0, 0, 0x1000)), [5], match="empty")
    hostile(ready, vu.SET_MEM_TABLE, mem_table(region(0, 0x2000, (1 << 64) - 0x1000)), [5], match="2\\*\\*64")
    hostile(ready, vu.SET_MEM_TABLE, mem_table(region((1 << 64) - 1, 2, 0)), [5], match="2\\*\\*64")
    hostile(ready, vu.SET_MEM_TABLE, mem_table(region(0, 2, 0, (1 << 64) - 1)), [5], match="2\\*\\*64")
    nine = [region(i << 20, 1 << 20, 0x7F0000000000 + (i << 20)) for i in range(9)]
    hostile(ready, vu.SET_MEM_TABLE, mem_table(*nine), list(range(8)), match="9 regions")
    # ADD_MEM_REG against what is held
    assert ready.send(vu.ADD_MEM_REG, u64(0) + a, [20]) is None
    ready.backend.take_effects()
    hostile(ready, vu.ADD_MEM_REG, u64(0) + guest_overlap, [21], match="overlaps")
    hostile(ready, vu.ADD_MEM_REG, u64(0) + region(0x200000, 0, 0x7F2000000000), [21], match="empty")


def test_too_many_mem_slots(ready: Peer) -> None:
    for i in range(vu.MAX_MEM_SLOTS):
        ready.send(vu.ADD_MEM_REG, u64(0) + region(i << 20, 1 << 20, 0x7F0000000000 + (i << 20)), [100 + i])
    ready.backend.take_effects()
    i = vu.MAX_MEM_SLOTS
    hostile(ready, vu.ADD_MEM_REG, u64(0) + region(i << 20, 1 << 20, 0x7F0000000000 + (i << 20)), [5], match="at most")


def test_features_and_owner() -> None:
    peer = Peer()
    hostile(peer, vu.SET_FEATURES, u64(GUEST_FEATURES), match="before SET_OWNER")
    hostile(peer, vu.SET_VRING_KICK, u64(0), [5], match="before SET_OWNER")
    hostile(peer, vu.SET_MEM_TABLE, mem_table(region(0, 4096, 0x1000)), [5], match="before SET_OWNER")
    hostile(peer, vu.SET_PROTOCOL_FEATURES, u64(1 << 0), match="did not offer")  # MQ
    peer.owned()
    hostile(peer, vu.SET_OWNER, match="already")
    hostile(peer, vu.SET_FEATURES, u64(GUEST_FEATURES | vu.VHOST_F_LOG_ALL), match="did not offer")
    hostile(peer, vu.SET_FEATURES, u64(vu.VIRTIO_NET_F_CSUM), match="did not offer")  # offloads are off by default


def test_refusals_without_reply_ack_drop_the_device(ready: Peer) -> None:
    hostile(ready, 99, b"", [5], match="not supported")
    hostile(ready, vu.SET_LOG_BASE, u64(0) + u64(0), [5], match="not supported")
    hostile(ready, vu.SET_LOG_FD, b"", [5], match="not supported")
    hostile(ready, vu.GET_CONFIG, struct.pack("<III", 0, 12, 0) + bytes(12), match="not supported")
    peer = Peer()
    negotiate(peer, protocol=0)
    hostile(peer, vu.GET_MAX_MEM_SLOTS, match="CONFIGURE_MEM_SLOTS")
    hostile(peer, vu.ADD_MEM_REG, u64(0) + region(0, 4096, 0x1000), [5], match="CONFIGURE_MEM_SLOTS")
    hostile(peer, vu.NET_SET_MTU, u64(1500), match="NET_MTU")
    hostile(peer, vu.NET_SET_MTU, u64(1500), match="NET_MTU")


def test_offloads_can_be_offered() -> None:
    peer = Peer(VhostUserBackend(features=vu.DEFAULT_FEATURES | vu.OFFLOAD_FEATURES))
    negotiate_features = reply_u64(peer.send(vu.GET_FEATURES), vu.GET_FEATURES)
    assert negotiate_features & 0x1983 == 0x1983
    peer.owned()
    assert peer.send(vu.SET_FEATURES, u64(GUEST_FEATURES | vu.VIRTIO_NET_F_HOST_TSO4)) is None
    with pytest.raises(ValueError):
        VhostUserBackend(features=vu.VHOST_F_LOG_ALL)


def test_get_queue_num_answers_one_pair() -> None:
    assert reply_u64(Peer().send(vu.GET_QUEUE_NUM), vu.GET_QUEUE_NUM) == 1


# random input: only VhostUserError, and every descriptor comes back exactly once

_REQUESTS = st.sampled_from([*vu.REQUEST_NAMES, 0, 19, 21, 99, 0xFFFFFFFF])


@st.composite
def _chunk(draw: st.DrawFn) -> tuple[bytes, int]:
    if draw(st.booleans()):
        request = draw(_REQUESTS)
        flags = draw(st.sampled_from([1, 1 | NEED_REPLY, 0, 5, 0xFF]))
        payload = draw(st.binary(max_size=80))
        size = draw(st.sampled_from([len(payload), len(payload), 1 << 20]))
        data = struct.pack("<III", request, flags, size) + payload
    else:
        data = draw(st.binary(max_size=60))
    return data, draw(st.integers(min_value=0, max_value=10))


@settings(max_examples=400, deadline=None)
@given(st.lists(_chunk(), max_size=12), st.booleans())
def test_random_streams_lose_no_descriptor(chunks: list[tuple[bytes, int]], ack: bool) -> None:
    decoder = MessageDecoder()
    backend = VhostUserBackend()
    if ack:  # a negotiated, owned device, so the random messages reach deeper
        for m in decoder.feed(wire(vu.SET_PROTOCOL_FEATURES, u64(vu.PROTOCOL_FEATURES)) + wire(vu.SET_OWNER)):
            backend.handle(m)
    fed: list[int] = []
    out: list[int] = []
    next_fd = 100
    dropped = False
    for data, count in chunks:
        fds = list(range(next_fd, next_fd + count))
        next_fd += count
        fed += fds
        try:
            messages = decoder.feed(data, fds)
        except VhostUserError as e:
            out += e.fds
            continue
        for m in messages:
            if dropped:
                out += m.fds
                continue
            try:
                reply = backend.handle(m)
            except VhostUserError as e:
                out += e.fds
                dropped = True
                continue
            if reply is not None:
                assert reply.to_bytes()[4:8] == b"\x05\x00\x00\x00"
            # handle() took the message's fds: they come back by close-fd effects, or at shutdown
            for e in backend.take_effects():
                if e.kind == vu.EFFECT_CLOSE_FD:
                    out.append(e.fd)
    out += decoder.take_fds()
    out += [e.fd for e in backend.shutdown() if e.kind == vu.EFFECT_CLOSE_FD]
    assert Counter(out) == Counter(fed)

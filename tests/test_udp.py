"""Unit tests of the UDP NAT: flows, ops, replies from anywhere, ICMP errors, timeouts, caps."""

import dpkt

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from tests.guestframes import GUEST2_MAC, GUEST_MAC, GW_MAC, ip, ip_frame, ipv4, l4_checksum_ok, parse

GUEST = "10.0.2.15"
REMOTE = "198.18.0.9"


def make_stack(**kwargs: object) -> Stack:
    stack = Stack(NetConfig(**kwargs))  # type: ignore[arg-type]
    stack.attach_port(1)
    return stack


def udp_frame(
    dst: str,
    dport: int,
    data: bytes,
    src: str = GUEST,
    sport: int = 5000,
    mac: bytes = GUEST_MAC,
    dst_mac: bytes = GW_MAC,
) -> bytes:
    seg = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    seg.ulen = 8 + len(data)
    return ip_frame(mac, dst_mac, ipv4(src, dst, dpkt.ip.IP_PROTO_UDP, seg))


def take_frames(stack: Stack) -> list[bytes]:
    frames = stack.switch.out[1]
    stack.switch.out[1] = []
    return frames


def take_ops(stack: Stack) -> list[A.HostOp]:
    ops = list(stack.out.ops)
    stack.out.ops.clear()
    return ops


def test_first_datagram_opens_a_flow_then_sends() -> None:
    stack = make_stack()
    stack.frame_received(1, udp_frame(REMOTE, 7, b"hello"), 0.0)
    ops = take_ops(stack)
    assert [op.kind for op in ops] == [A.OP_UDP_OPEN, A.OP_UDP_SEND]
    assert ops[0].flow == ops[1].flow
    assert (ops[1].addr, ops[1].port, ops[1].data) == (REMOTE, 7, b"hello")
    stack.frame_received(1, udp_frame("198.18.0.10", 9, b"again"), 1.0)
    ops2 = take_ops(stack)
    assert [(op.kind, op.flow, op.addr, op.port) for op in ops2] == [(A.OP_UDP_SEND, ops[0].flow, "198.18.0.10", 9)]
    # another guest port is another flow
    stack.frame_received(1, udp_frame(REMOTE, 7, b"x", sport=5001), 1.0)
    ops3 = take_ops(stack)
    assert [op.kind for op in ops3] == [A.OP_UDP_OPEN, A.OP_UDP_SEND]
    assert ops3[0].flow != ops[0].flow
    assert stack.counters.get("udp-flows-opened") == 2


def test_gateway_address_is_host_loopback_unless_disabled() -> None:
    stack = make_stack()
    stack.frame_received(1, udp_frame("10.0.2.2", 53535, b"q"), 0.0)
    assert take_ops(stack)[1].addr == "127.0.0.1"
    off = make_stack(host_loopback=False)
    off.frame_received(1, udp_frame("10.0.2.2", 53535, b"q"), 0.0)
    assert take_ops(off) == []
    assert off.counters.get("drop-udp-no-route") == 1


def test_broadcast_multicast_and_virtual_addresses_are_dropped() -> None:
    stack = make_stack()
    cases = [
        ("255.255.255.255", "drop-udp-broadcast"),
        ("10.0.2.255", "drop-udp-broadcast"),
        ("224.0.0.251", "drop-udp-broadcast"),
        ("127.0.0.1", "drop-udp-broadcast"),
        ("10.0.2.50", "drop-udp-no-route"),
        ("10.0.2.3", "drop-udp-no-route"),  # the DNS address, not port 53
    ]
    for dst, counter in cases:
        before = stack.counters.get(counter)
        stack.frame_received(1, udp_frame(dst, 5353, b"x", dst_mac=b"\xff" * 6), 0.0)
        assert stack.counters.get(counter) == before + 1, dst
    stack.frame_received(1, udp_frame(REMOTE, 0, b"x"), 0.0)
    assert stack.counters.get("drop-udp-port-zero") == 1
    stack.frame_received(1, udp_frame(REMOTE, 7, b"x", src="192.168.1.1"), 0.0)
    assert stack.counters.get("drop-udp-bad-source") == 1
    assert take_ops(stack) == []


def test_replies_from_any_remote_reach_the_guest_as_from_that_remote() -> None:
    stack = make_stack()
    stack.frame_received(1, udp_frame(REMOTE, 7, b"hello"), 0.0)
    flow = take_ops(stack)[0].flow
    stack.udp.host_datagram(flow, b"reply", REMOTE, 7, 0.5)
    stack.udp.host_datagram(flow, b"other", "203.0.113.5", 4444, 0.6)  # NAT traversal
    frames = take_frames(stack)
    assert len(frames) == 2
    for frame, (src, sport, data) in zip(frames, [(REMOTE, 7, b"reply"), ("203.0.113.5", 4444, b"other")], strict=True):
        assert l4_checksum_ok(frame)
        eth = parse(frame)
        assert eth.dst == GUEST_MAC and eth.src == GW_MAC
        pkt = eth.data
        assert (pkt.src, pkt.dst) == (ip(src), ip(GUEST))
        assert (pkt.data.sport, pkt.data.dport, pkt.data.data) == (sport, 5000, data)
    f = stack.udp.flows(1.0)[0]
    assert f["bytes-out"] == 5 and f["bytes-in"] == 10 and f["guest-port"] == 5000
    assert f["remote-address"] == REMOTE and f["age"] == 1.0 and f["protocol"] == "udp"


def test_reply_from_loopback_appears_from_the_gateway() -> None:
    stack = make_stack()
    stack.frame_received(1, udp_frame(REMOTE, 7, b"hello"), 0.0)
    flow = take_ops(stack)[0].flow
    stack.udp.host_datagram(flow, b"lo", "127.0.0.1", 9999, 0.1)
    stack.udp.host_datagram(flow, b"x", "127.0.0.2", 9999, 0.1)  # other loopback: dropped
    stack.udp.host_datagram(flow, b"x", "10.0.2.77", 9999, 0.1)  # inside the virtual net: dropped
    frames = take_frames(stack)
    assert len(frames) == 1
    pkt = parse(frames[0]).data
    assert pkt.src == ip("10.0.2.2") and pkt.data.sport == 9999
    assert stack.counters.get("udp-reply-bad-source") == 2
    stack.udp.host_datagram(999, b"x", REMOTE, 7, 0.2)
    assert stack.counters.get("udp-late-datagram") == 1


def test_large_reply_is_fragmented_to_the_guest_mtu() -> None:
    stack = make_stack(mtu=1500)
    stack.frame_received(1, udp_frame(REMOTE, 7, b"q"), 0.0)
    flow = take_ops(stack)[0].flow
    data = bytes(range(256)) * 16  # 4096 bytes
    stack.udp.host_datagram(flow, data, REMOTE, 7, 0.1)
    frames = take_frames(stack)
    assert len(frames) == 3
    payload = b""
    for i, frame in enumerate(frames):
        total_len = int.from_bytes(frame[16:18], "big")
        frag = int.from_bytes(frame[20:22], "big")
        assert total_len == len(frame) - 14 <= 1500
        assert frag & 0x1FFF == len(payload) // 8
        assert bool(frag & 0x2000) == (i < 2) and not frag & 0x4000  # MF on all but the last, DF clear
        assert dpkt.in_cksum(frame[14:34]) == 0
        payload += frame[34:]
    udp = dpkt.udp.UDP(payload)
    assert udp.data == data and udp.ulen == 8 + len(data) and udp.sport == 7 and udp.dport == 5000


def test_port_unreachable_quotes_the_guest_datagram() -> None:
    stack = make_stack()
    stack.frame_received(1, udp_frame(REMOTE, 9, b"knock knock"), 0.0)
    flow = take_ops(stack)[0].flow
    stack.udp.host_error(flow, REMOTE, 9, 3, 3, 0, 0.1)
    stack.udp.host_refused(flow, 0.2)  # no details: the last destination
    frames = take_frames(stack)
    assert len(frames) == 2
    for frame in frames:
        pkt = parse(frame).data
        assert pkt.p == dpkt.ip.IP_PROTO_ICMP and pkt.src == ip(REMOTE) and pkt.dst == ip(GUEST)
        icmp = pkt.data
        assert (icmp.type, icmp.code) == (3, 3)
        assert dpkt.in_cksum(bytes(frame[34:])) == 0
        quoted = bytes(icmp.data)[4:]
        inner = dpkt.ip.IP(quoted[:20] + b"\x00" * 8 + b"\x00" * 11)
        assert (inner.src, inner.dst, inner.p, inner.len) == (ip(GUEST), ip(REMOTE), 17, 20 + 8 + 11)
        sport, dport = int.from_bytes(quoted[20:22], "big"), int.from_bytes(quoted[22:24], "big")
        ulen = int.from_bytes(quoted[24:26], "big")
        assert (sport, dport, ulen) == (5000, 9, 8 + 11)
    # an error about another destination of the same flow quotes that destination
    stack.udp.host_error(flow, "198.18.0.77", 53, 3, 1, 0, 0.3)
    pkt = parse(take_frames(stack)[0]).data
    assert pkt.src == ip("198.18.0.77") and pkt.data.code == 1
    # fragmentation needed carries the next-hop MTU
    stack.udp.host_error(flow, REMOTE, 9, 3, 4, 1400, 0.4)
    icmp = parse(take_frames(stack)[0]).data.data
    assert bytes(icmp.data)[2:4] == (1400).to_bytes(2, "big")


def test_idle_flows_close_and_replies_keep_them_open() -> None:
    stack = make_stack(udp_idle_timeout=30.0)
    stack.frame_received(1, udp_frame(REMOTE, 7, b"a"), 0.0)
    flow = take_ops(stack)[0].flow
    assert stack.next_deadline() == 30.0
    stack.udp.host_datagram(flow, b"r", REMOTE, 7, 20.0)
    assert stack.next_deadline() == 50.0
    stack.timer(49.9)
    assert take_ops(stack) == []
    stack.timer(50.0)
    ops = take_ops(stack)
    assert [(op.kind, op.flow) for op in ops] == [(A.OP_UDP_CLOSE, flow)]
    assert stack.udp.flows(50.0) == [] and stack.next_deadline() == float("inf")
    assert stack.counters.get("udp-flows-expired") == 1


def test_flow_cap_evicts_the_least_recently_used() -> None:
    stack = make_stack(max_udp_flows=2)
    stack.frame_received(1, udp_frame(REMOTE, 7, b"a", sport=1001), 0.0)
    stack.frame_received(1, udp_frame(REMOTE, 7, b"b", sport=1002), 1.0)
    first, second = (op.flow for op in take_ops(stack) if op.kind == A.OP_UDP_OPEN)
    stack.udp.host_datagram(first, b"r", REMOTE, 7, 2.0)  # first is now the most recent
    stack.frame_received(1, udp_frame(REMOTE, 7, b"c", sport=1003), 3.0)
    ops = take_ops(stack)
    assert (ops[0].kind, ops[0].flow) == (A.OP_UDP_CLOSE, second)
    assert [op.kind for op in ops[1:]] == [A.OP_UDP_OPEN, A.OP_UDP_SEND]
    assert len(stack.udp.flows(3.0)) == 2 and stack.counters.get("udp-flows-evicted") == 1


def test_guest_mac_follows_the_latest_datagram_and_failed_open_forgets() -> None:
    stack = make_stack()
    stack.attach_port(2)
    stack.frame_received(2, udp_frame(REMOTE, 7, b"a", mac=GUEST2_MAC), 0.0)
    flow = take_ops(stack)[0].flow
    stack.udp.host_datagram(flow, b"r", REMOTE, 7, 0.1)
    assert len(stack.switch.out[2]) == 1 and parse(stack.switch.out[2][0]).dst == GUEST2_MAC
    stack.udp.host_failed(flow, 0.2)
    assert stack.udp.flows(0.2) == [] and stack.counters.get("udp-open-failed") == 1
    stack.frame_received(2, udp_frame(REMOTE, 7, b"a", mac=GUEST2_MAC), 0.3)
    assert [op.kind for op in take_ops(stack)] == [A.OP_UDP_OPEN, A.OP_UDP_SEND]

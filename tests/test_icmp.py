"""Unit tests of the ICMP echo proxy (ping sockets) and of send_icmp_error."""

import dpkt

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core import icmp as I
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from tests.guestframes import GUEST_MAC, GW_MAC, ip, ip_frame, ipv4, parse

GUEST = "10.0.2.15"
REMOTE = "198.18.0.9"


def make_stack(**kwargs: object) -> Stack:
    stack = Stack(NetConfig(**kwargs))  # type: ignore[arg-type]
    stack.attach_port(1)
    return stack


def echo_frame(dst: str, ident: int = 0x4242, seq: int = 1, data: bytes = b"ping-data", icmp_type: int = 8) -> bytes:
    msg = dpkt.icmp.ICMP(type=icmp_type, code=0, data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=data))
    return ip_frame(GUEST_MAC, GW_MAC, ipv4(GUEST, dst, dpkt.ip.IP_PROTO_ICMP, msg))


def kernel_reply(ident: int, seq: int, data: bytes) -> bytes:
    """An echo reply as a ping socket reads it: ICMP header (socket's id) and data."""
    return bytes(dpkt.icmp.ICMP(type=0, code=0, data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=data)))


def take_frames(stack: Stack) -> list[bytes]:
    frames = stack.switch.out[1]
    stack.switch.out[1] = []
    return frames


def take_ops(stack: Stack) -> list[A.HostOp]:
    ops = list(stack.out.ops)
    stack.out.ops.clear()
    return ops


def test_echo_request_goes_to_a_ping_socket_and_reply_gets_the_guest_id_back() -> None:
    stack = make_stack()
    stack.frame_received(1, echo_frame(REMOTE, ident=0x4242, seq=7), 0.0)
    ops = take_ops(stack)
    assert [(op.kind, op.addr) for op in ops] == [(A.OP_PING_SEND, REMOTE)]
    sent = dpkt.icmp.ICMP(ops[0].data)
    assert (sent.type, sent.data.id, sent.data.seq, sent.data.data) == (8, 0x4242, 7, b"ping-data")
    stack.icmp.host_reply(ops[0].flow, kernel_reply(0xBF8D, 7, b"ping-data"), REMOTE, 0.01)
    frames = take_frames(stack)
    assert len(frames) == 1
    pkt = parse(frames[0]).data
    assert (pkt.src, pkt.dst, pkt.p) == (ip(REMOTE), ip(GUEST), 1)
    assert dpkt.in_cksum(bytes(frames[0][34:])) == 0
    reply = pkt.data
    assert (reply.type, reply.data.id, reply.data.seq, reply.data.data) == (0, 0x4242, 7, b"ping-data")
    # the same identifier to another destination shares the flow
    stack.frame_received(1, echo_frame("198.18.0.10", ident=0x4242, seq=8), 0.5)
    ops2 = take_ops(stack)
    assert ops2[0].flow == ops[0].flow and ops2[0].addr == "198.18.0.10"
    f = stack.icmp.flows(1.0)[0]
    assert (f["protocol"], f["echo-id"], f["requests"], f["replies"]) == ("icmp", 0x4242, 2, 1)


def test_gateway_echo_is_answered_by_the_stack_itself() -> None:
    stack = make_stack()
    stack.frame_received(1, echo_frame("10.0.2.2"), 0.0)
    assert take_ops(stack) == []
    assert parse(take_frames(stack)[0]).data.data.type == 0


def test_bad_echo_requests_are_dropped_and_counted() -> None:
    stack = make_stack()
    bad = bytearray(echo_frame(REMOTE))
    bad[-1] ^= 0xFF
    stack.frame_received(1, bytes(bad), 0.0)
    stack.frame_received(1, echo_frame(REMOTE, icmp_type=0), 0.0)
    stack.frame_received(1, echo_frame("10.0.2.77"), 0.0)
    stack.frame_received(1, echo_frame("224.0.0.1"), 0.0)
    assert take_ops(stack) == []
    assert stack.counters.get("drop-bad-icmp-checksum") == 1
    assert stack.counters.get("drop-icmp-type") == 1
    assert stack.counters.get("drop-icmp-no-route") == 2
    stack.icmp.host_reply(12345, kernel_reply(1, 1, b""), REMOTE, 0.0)
    assert stack.counters.get("icmp-late-reply") == 1


def test_unavailable_ping_sockets_drop_requests_for_a_while() -> None:
    stack = make_stack()
    stack.frame_received(1, echo_frame(REMOTE), 0.0)
    assert len(take_ops(stack)) == 1
    stack.icmp.unavailable(0.1)
    assert stack.icmp.flows(0.1) == []
    stack.frame_received(1, echo_frame(REMOTE, seq=2), 1.0)
    assert take_ops(stack) == [] and stack.counters.get("drop-icmp-ping-unavailable") == 1
    stack.frame_received(1, echo_frame(REMOTE, seq=3), 0.1 + I.PING_RETRY)
    assert [op.kind for op in take_ops(stack)] == [A.OP_PING_SEND]


def test_ping_flows_expire_and_are_capped() -> None:
    stack = make_stack(udp_idle_timeout=10.0)
    stack.frame_received(1, echo_frame(REMOTE, ident=1), 0.0)
    flow = take_ops(stack)[0].flow
    assert stack.next_deadline() == 10.0
    stack.timer(10.0)
    assert [(op.kind, op.flow) for op in take_ops(stack)] == [(A.OP_PING_CLOSE, flow)]
    for ident in range(I.MAX_PING_FLOWS + 1):
        stack.frame_received(1, echo_frame(REMOTE, ident=ident), 20.0)
    ops = take_ops(stack)
    assert [op.kind for op in ops].count(A.OP_PING_CLOSE) == 1
    assert len(stack.icmp.flows(20.0)) == I.MAX_PING_FLOWS


def test_host_unreachable_for_a_ping_is_passed_on_with_the_guest_id() -> None:
    stack = make_stack()
    stack.frame_received(1, echo_frame(REMOTE, ident=0x4242, seq=9), 0.0)
    flow = take_ops(stack)[0].flow
    original = kernel_reply(0xBF8D, 9, b"ping-data")
    original = b"\x08" + original[1:]
    stack.icmp.host_error(flow, REMOTE, 3, 1, 0, original, 0.1)
    pkt = parse(take_frames(stack)[0]).data
    icmp = pkt.data
    assert (pkt.src, icmp.type, icmp.code) == (ip(REMOTE), 3, 1)
    quoted = bytes(icmp.data)[4:]
    assert quoted[12:16] == ip(GUEST) and quoted[16:20] == ip(REMOTE) and quoted[9] == 1
    assert quoted[20] == 8 and quoted[24:26] == b"\x42\x42" and quoted[26:28] == b"\x00\x09"


def test_send_icmp_error_builds_a_valid_message() -> None:
    stack = make_stack()
    quoted = bytes(range(28))
    stack.out.send_icmp_error(GUEST_MAC, ip(GUEST), ip(REMOTE), 3, 4, quoted, 1280)
    stack.out.send_icmp_error(GUEST_MAC, ip(GUEST), ip(REMOTE), 3, 1, b"q" * 1000)
    first, second = take_frames(stack)
    pkt = parse(first).data
    assert (pkt.src, pkt.dst, pkt.p) == (ip(REMOTE), ip(GUEST), 1)
    body = bytes(first[34:])
    assert dpkt.in_cksum(body) == 0
    assert body[0:2] == b"\x03\x04" and body[4:8] == b"\x00\x00\x05\x00" and body[8:] == quoted
    assert len(second) == 14 + 20 + 8 + 548  # at most 576 bytes of IP
    assert stack.counters.get("icmp-errors-sent") == 2


def test_big_echo_reply_is_fragmented() -> None:
    stack = make_stack(mtu=576)
    data = b"z" * 2000
    stack.frame_received(1, echo_frame(REMOTE, data=data), 0.0)
    flow = take_ops(stack)[0].flow
    stack.icmp.host_reply(flow, kernel_reply(7, 1, data), REMOTE, 0.1)
    frames = take_frames(stack)
    assert len(frames) == 4 and all(len(f) - 14 <= 576 for f in frames)
    message = b"".join(f[34:] for f in frames)
    assert dpkt.in_cksum(message) == 0 and message[4:6] == b"\x42\x42" and message[8:] == data

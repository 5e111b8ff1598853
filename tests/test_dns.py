"""Unit tests of the DNS server in forward mode: built-in names, forwarding, truncation, SERVFAIL, bad input."""

import random

import dpkt
import pytest

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core import dns as D
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from tests.guestframes import GUEST_MAC, GW_MAC, ip, ip_frame, ipv4, l4_checksum_ok, parse

GUEST = "10.0.2.15"
DNS_IP = "10.0.2.3"


def make_stack(mode: str = D.MODE_FORWARD, **kwargs: object) -> Stack:
    """A stack with one port; DNS in forward mode unless mode says otherwise (tests/test_dns_host.py)."""
    stack = Stack(NetConfig(**kwargs))  # type: ignore[arg-type]
    stack.dns.set_mode(mode)
    stack.attach_port(1)
    return stack


def query(name: str, qtype: int = dpkt.dns.DNS_A, qid: int = 0x1234, edns: int = 0) -> bytes:
    msg = dpkt.dns.DNS(id=qid, op=dpkt.dns.DNS_RD, qd=[dpkt.dns.DNS.Q(name=name, type=qtype, cls=dpkt.dns.DNS_IN)])
    if edns:
        msg.ar = [dpkt.dns.DNS.RR(name="", type=41, cls=edns, ttl=0, rdata=b"")]
    return bytes(msg)


def dns_frame(payload: bytes, sport: int = 40000, dst: str = DNS_IP) -> bytes:
    seg = dpkt.udp.UDP(sport=sport, dport=53, data=payload)
    seg.ulen = 8 + len(payload)
    return ip_frame(GUEST_MAC, GW_MAC, ipv4(GUEST, dst, dpkt.ip.IP_PROTO_UDP, seg))


def take_answers(stack: Stack, sport: int = 40000) -> list[bytes]:
    """The DNS messages sent to the guest (checked: from DNS_IP:53 to the guest's port)."""
    frames = stack.switch.out[1]
    stack.switch.out[1] = []
    answers = []
    for frame in frames:
        assert l4_checksum_ok(frame)
        pkt = parse(frame).data
        assert (pkt.src, pkt.dst, pkt.data.sport, pkt.data.dport) == (ip(DNS_IP), ip(GUEST), 53, sport)
        answers.append(bytes(pkt.data.data))
    return answers


def take_ops(stack: Stack) -> list[A.HostOp]:
    ops = list(stack.out.ops)
    stack.out.ops.clear()
    return ops


def upstream_answer(q: bytes, address: str = "192.0.2.1", count: int = 1, upstream_id: int = 0x9999) -> bytes:
    msg = dpkt.dns.DNS(q)
    msg.id = upstream_id
    msg.op = 0x8000 | dpkt.dns.DNS_RD | dpkt.dns.DNS_RA  # QR, RD, RA
    msg.ar = []
    msg.an = [
        dpkt.dns.DNS.RR(name=msg.qd[0].name, type=dpkt.dns.DNS_A, cls=1, ttl=60, ip=ip(address)) for _ in range(count)
    ]
    return bytes(msg)


@pytest.mark.parametrize("name", ["host.internal", "HOST.Internal", "gw.example.test"])
def test_builtin_names_resolve_to_the_gateway(name: str) -> None:
    stack = make_stack(host_names=["GW.example.test."])
    stack.frame_received(1, dns_frame(query(name)), 0.0)
    (answer,) = take_answers(stack)
    assert take_ops(stack) == []
    msg = dpkt.dns.DNS(answer)
    assert msg.id == 0x1234 and msg.qr == dpkt.dns.DNS_R and msg.rcode == dpkt.dns.DNS_RCODE_NOERR
    assert msg.qd[0].name.lower() == name.lower().rstrip(".")
    assert [(rr.type, rr.ip) for rr in msg.an] == [(dpkt.dns.DNS_A, ip("10.0.2.2"))]


def test_builtin_names_have_no_other_records() -> None:
    stack = make_stack()
    stack.frame_received(1, dns_frame(query("host.internal", dpkt.dns.DNS_MX)), 0.0)
    (answer,) = take_answers(stack)
    msg = dpkt.dns.DNS(answer)
    assert msg.rcode == dpkt.dns.DNS_RCODE_NOERR and msg.an == [] and len(msg.qd) == 1
    assert take_ops(stack) == []


def test_builtin_names_have_an_ipv6_address_unless_ipv6_is_off() -> None:
    stack = make_stack()
    stack.frame_received(1, dns_frame(query("host.internal", dpkt.dns.DNS_AAAA)), 0.0)
    (answer,) = take_answers(stack)
    assert [rr.ip6 for rr in dpkt.dns.DNS(answer).an] == [bytes.fromhex("fec0" + "00" * 13 + "02")]
    stack = make_stack(ipv6=False)
    stack.frame_received(1, dns_frame(query("host.internal", dpkt.dns.DNS_AAAA)), 0.0)
    (answer,) = take_answers(stack)
    msg = dpkt.dns.DNS(answer)
    assert msg.rcode == dpkt.dns.DNS_RCODE_NOERR and msg.an == []
    assert take_ops(stack) == []


def test_other_names_are_forwarded_and_answered_with_the_guest_id() -> None:
    stack = make_stack()
    q = query("example.test", dpkt.dns.DNS_AAAA, qid=0xBEEF)
    stack.frame_received(1, dns_frame(q), 0.0)
    (op,) = take_ops(stack)
    assert op.kind == A.OP_DNS_QUERY and op.data == q
    assert stack.next_deadline() == D.QUERY_TIMEOUT
    answer = upstream_answer(q)
    stack.dns.answer(op.flow, answer, 0.05)
    (got,) = take_answers(stack)
    assert got[:2] == b"\xbe\xef" and got[2:] == answer[2:]
    assert stack.next_deadline() == float("inf")
    stack.dns.answer(op.flow, answer, 0.06)  # a second answer is ignored
    assert take_answers(stack) == [] and stack.counters.get("dns-late-answer") == 1


def test_long_answers_are_truncated_to_512_or_the_edns_size() -> None:
    stack = make_stack()
    plain = query("big.test", qid=1)
    stack.frame_received(1, dns_frame(plain), 0.0)
    edns = query("big.test", qid=2, edns=1232)
    stack.frame_received(1, dns_frame(edns, sport=40001), 0.0)
    op1, op2 = take_ops(stack)
    big = upstream_answer(plain, count=40)  # 40 A records: about 650 bytes
    assert 512 < len(big) < 1232
    stack.dns.answer(op1.flow, big, 0.1)
    (cut,) = take_answers(stack)
    msg = dpkt.dns.DNS(cut)
    assert msg.id == 1 and msg.op & dpkt.dns.DNS_TC and msg.an == [] and msg.qd[0].name == "big.test"
    assert len(cut) == 12 + len(plain) - 12
    stack.dns.answer(op2.flow, big, 0.1)
    (whole,) = take_answers(stack, sport=40001)
    assert whole[2:] == big[2:]
    assert stack.counters.get("dns-truncated") == 1


def test_failure_and_timeout_answer_servfail() -> None:
    stack = make_stack()
    stack.frame_received(1, dns_frame(query("a.test", qid=5)), 0.0)
    stack.frame_received(1, dns_frame(query("b.test", qid=6)), 1.0)
    op1, op2 = take_ops(stack)
    stack.dns.failed(op1.flow, 0.2)
    (fail,) = take_answers(stack)
    msg = dpkt.dns.DNS(fail)
    assert (msg.id, msg.rcode, msg.qd[0].name) == (5, dpkt.dns.DNS_RCODE_SERVFAIL, "a.test")
    assert stack.next_deadline() == 1.0 + D.QUERY_TIMEOUT
    stack.timer(1.0 + D.QUERY_TIMEOUT - 0.01)
    assert take_answers(stack) == []
    stack.timer(1.0 + D.QUERY_TIMEOUT)
    (late,) = take_answers(stack)
    assert dpkt.dns.DNS(late).rcode == dpkt.dns.DNS_RCODE_SERVFAIL
    assert stack.counters.get("dns-timeouts") == 1
    stack.dns.answer(op2.flow, upstream_answer(query("b.test")), 7.0)
    assert take_answers(stack) == []


def test_retransmissions_are_not_forwarded_twice_and_pending_is_capped() -> None:
    stack = make_stack()
    q = query("a.test", qid=5)
    stack.frame_received(1, dns_frame(q), 0.0)
    stack.frame_received(1, dns_frame(q), 0.5)
    assert len(take_ops(stack)) == 1 and stack.counters.get("drop-dns-retransmit") == 1
    for i in range(D.MAX_PENDING):
        stack.frame_received(1, dns_frame(query("a.test", qid=i + 100)), 1.0)
    assert len(take_ops(stack)) == D.MAX_PENDING - 1
    (full,) = take_answers(stack)
    assert dpkt.dns.DNS(full).rcode == dpkt.dns.DNS_RCODE_SERVFAIL
    assert stack.counters.get("dns-pending-full") == 1


def test_malformed_queries() -> None:
    stack = make_stack()
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    stack.frame_received(1, dns_frame(b"\x12\x34\x01"), 0.0)  # no header: dropped
    assert take_answers(stack) == [] and stack.counters.get("drop-dns-short") == 1
    cases = [
        header,  # a question is announced, none follows
        header + b"\x07example",  # name cut short
        header + b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer in the question
        b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00" + query("a.test")[12:] * 2,  # two questions
    ]
    for payload in cases:
        stack.frame_received(1, dns_frame(payload), 0.0)
        (answer,) = take_answers(stack)
        assert answer[:2] == b"\x12\x34" and answer[2] & 0x80 and answer[3] & 0x0F == 1, payload
    response = bytearray(query("a.test"))
    response[2] |= 0x80
    stack.frame_received(1, dns_frame(bytes(response)), 0.0)
    assert take_answers(stack) == [] and stack.counters.get("drop-dns-not-query") == 1
    notify = bytearray(query("a.test"))
    notify[2] |= 4 << 3  # opcode NOTIFY
    stack.frame_received(1, dns_frame(bytes(notify)), 0.0)
    (answer,) = take_answers(stack)
    assert answer[3] & 0x0F == 4
    assert take_ops(stack) == []


def test_random_garbage_never_raises() -> None:
    stack = make_stack()
    rng = random.Random(7)
    base = query("fuzz.example.test", edns=4096)
    for _ in range(2000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))]
        stack.frame_received(1, dns_frame(bytes(data)), 0.0)
        for op in take_ops(stack):
            stack.dns.answer(op.flow, bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))), 0.0)
        take_answers(stack)
    assert stack.counters.get("internal-errors") == 0


def test_an_upstream_answer_to_another_question_or_garbage_is_servfail() -> None:
    stack = make_stack()
    q = query("a.test", qid=9)
    for qid, answer in (
        (9, upstream_answer(query("other.test"))),  # the id matches, the question does not
        (10, q[:4] + b"\x00\x05\x00\x07\x00\x00\x00\x00\xc0\x0c"),  # counts that lie, a pointer loop
        (11, q[:2] + b"\x81\x80" + b"\x00" * 8),  # no question, no error: not an answer
    ):
        stack.frame_received(1, dns_frame(query("a.test", qid=qid)), 0.0)
        (op,) = take_ops(stack)
        stack.dns.answer(op.flow, answer, 0.1)
        (got,) = take_answers(stack)
        msg = dpkt.dns.DNS(got)
        assert (msg.id, msg.rcode, msg.qd[0].name) == (qid, dpkt.dns.DNS_RCODE_SERVFAIL, "a.test")
    assert stack.counters.get("dns-bad-answer") == 3
    # the same question in other letter case is an answer; so is an error without a question
    stack.frame_received(1, dns_frame(query("a.test", qid=12)), 0.0)
    (op,) = take_ops(stack)
    stack.dns.answer(op.flow, upstream_answer(query("A.TEST")), 0.2)
    assert dpkt.dns.DNS(take_answers(stack)[0]).rcode == dpkt.dns.DNS_RCODE_NOERR
    stack.frame_received(1, dns_frame(query("a.test", qid=13)), 0.0)
    (op,) = take_ops(stack)
    stack.dns.answer(op.flow, q[:2] + b"\x81\x85" + b"\x00" * 8, 0.2)  # REFUSED, no question
    assert dpkt.dns.DNS(take_answers(stack)[0]).rcode == dpkt.dns.DNS_RCODE_REFUSED

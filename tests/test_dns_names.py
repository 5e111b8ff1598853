"""The address -> name map the DNS server fills for the proxy's no_proxy (core/dns_names.py)."""

import dpkt

from qemu_vpnnet.core import dns as D
from qemu_vpnnet.core.dns_names import MAX_NAMES, AnswerNames
from tests.guestframes import ip
from tests.test_dns import dns_frame, make_stack, query, take_ops, upstream_answer


def test_nothing_is_kept_while_disabled() -> None:
    names = AnswerNames()
    names.remember("a.test", [ip("192.0.2.1")])
    assert names.name_of(ip("192.0.2.1")) == ""


def test_the_latest_name_of_an_address_wins_and_the_map_is_bounded() -> None:
    names = AnswerNames()
    names.enabled = True
    names.remember("a.test", [ip("192.0.2.1")])
    names.remember("b.test", [ip("192.0.2.1")])
    assert names.name_of(ip("192.0.2.1")) == "b.test"
    for i in range(MAX_NAMES + 10):
        names.remember(f"n{i}.test", [i.to_bytes(4, "big")])
    assert len(names.names) == MAX_NAMES
    assert names.name_of((MAX_NAMES + 9).to_bytes(4, "big")) == f"n{MAX_NAMES + 9}.test"
    assert names.name_of((0).to_bytes(4, "big")) == ""


def test_host_resolver_zone_and_forwarded_answers_fill_the_map() -> None:
    stack = make_stack(D.MODE_HOST)
    dns = stack.dns
    dns.names.enabled = True
    stack.frame_received(1, dns_frame(query("www.corp.test")), 0.0)
    (op,) = take_ops(stack)
    dns.resolved(op.flow, D.RESOLVED_OK, [ip("198.18.0.7")], 0.1)
    assert dns.names.name_of(ip("198.18.0.7")) == "www.corp.test"
    dns.zones.add("qmp", "zoned.test", ip("198.18.0.8"))
    stack.frame_received(1, dns_frame(query("zoned.test"), sport=40001), 0.2)
    assert dns.names.name_of(ip("198.18.0.8")) == "zoned.test"
    dns.set_mode(D.MODE_FORWARD)
    q = query("fwd.test", dpkt.dns.DNS_A, qid=7)
    stack.frame_received(1, dns_frame(q, sport=40002), 0.3)
    (op,) = take_ops(stack)
    dns.answer(op.flow, upstream_answer(q, "198.18.0.9"), 0.4)
    assert dns.names.name_of(ip("198.18.0.9")) == "fwd.test"

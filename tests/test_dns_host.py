"""Unit tests of the DNS server's decisions: host mode, zones, PTR of virtual addresses, split
upstreams and the source address of answers (sans-IO: answers are checked as bytes)."""

import random
import socket
from pathlib import Path

import dpkt
import pytest

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core import dns as D
from qemu_vpnnet.core import dns_zone as Z
from qemu_vpnnet.core.stack import Stack
from tests.guestframes import GUEST_MAC, GW_MAC, ip, ip_frame, ipv4, l4_checksum_ok, parse
from tests.test_dns import DNS_IP, GUEST, dns_frame, make_stack, query, take_ops

V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7")


def answers_from(stack: Stack, src: str = DNS_IP, sport: int = 40000) -> list[dpkt.dns.DNS]:
    """The DNS answers sent to the guest, checked to come from src port 53."""
    frames = stack.switch.out[1]
    stack.switch.out[1] = []
    result = []
    for frame in frames:
        assert l4_checksum_ok(frame)
        pkt = parse(frame).data
        assert (pkt.src, pkt.dst, pkt.data.sport, pkt.data.dport) == (ip(src), ip(GUEST), 53, sport)
        result.append(dpkt.dns.DNS(bytes(pkt.data.data)))
    return result


def addresses(msg: dpkt.dns.DNS) -> list[tuple[int, bytes, int]]:
    return [(rr.type, rr.ip if rr.type == dpkt.dns.DNS_A else rr.ip6, rr.ttl) for rr in msg.an]


def ask(stack: Stack, name: str, qtype: int = dpkt.dns.DNS_A, qid: int = 0x4242, **kw: object) -> dpkt.dns.DNS:
    """Send one query; return the one answer it got at once (no ops expected)."""
    stack.frame_received(1, dns_frame(query(name, qtype, qid=qid)), 0.0)
    assert take_ops(stack) == []
    (msg,) = answers_from(stack)
    assert msg.id == qid and msg.qr == dpkt.dns.DNS_R
    return msg


# ---- host mode ------------------------------------------------------------------------------


def test_host_mode_sends_a_and_aaaa_to_the_host_resolver_and_builds_the_answer() -> None:
    stack = make_stack(D.MODE_HOST)
    stack.frame_received(1, dns_frame(query("Intranet.Corp.Test", dpkt.dns.DNS_A, qid=7)), 0.0)
    stack.frame_received(1, dns_frame(query("intranet.corp.test", dpkt.dns.DNS_AAAA, qid=8), sport=40001), 0.0)
    op_a, op_aaaa = take_ops(stack)
    assert (op_a.kind, op_a.addr, op_a.port) == (A.OP_DNS_RESOLVE, "intranet.corp.test", dpkt.dns.DNS_A)
    assert (op_aaaa.kind, op_aaaa.port) == (A.OP_DNS_RESOLVE, dpkt.dns.DNS_AAAA)
    assert A.OP_NAMES[A.OP_DNS_RESOLVE] == "dns-resolve"
    # duplicates dropped, order kept, the other family ignored
    found = [ip("198.18.0.2"), ip("198.18.0.9"), ip("198.18.0.2"), V6]
    stack.dns.resolved(op_a.flow, D.RESOLVED_OK, found, 0.1)
    (msg,) = answers_from(stack)
    assert msg.id == 7 and msg.rcode == dpkt.dns.DNS_RCODE_NOERR and msg.qd[0].name == "Intranet.Corp.Test"
    assert addresses(msg) == [(1, ip("198.18.0.2"), D.HOST_TTL), (1, ip("198.18.0.9"), D.HOST_TTL)]
    stack.dns.resolved(op_aaaa.flow, D.RESOLVED_OK, found, 0.1)
    (msg6,) = answers_from(stack, sport=40001)
    assert addresses(msg6) == [(28, V6, D.HOST_TTL)]
    assert stack.next_deadline() == float("inf")
    stack.dns.resolved(op_a.flow, D.RESOLVED_OK, found, 0.2)  # late: ignored
    assert answers_from(stack) == [] and stack.counters.get("dns-late-answer") == 1


@pytest.mark.parametrize(
    ("status", "rcode"),
    [
        (D.RESOLVED_NXDOMAIN, dpkt.dns.DNS_RCODE_NXDOMAIN),
        (D.RESOLVED_NODATA, dpkt.dns.DNS_RCODE_NOERR),
        (D.RESOLVED_SERVFAIL, dpkt.dns.DNS_RCODE_SERVFAIL),
    ],
)
def test_host_mode_nxdomain_nodata_and_servfail(status: int, rcode: int) -> None:
    stack = make_stack(D.MODE_HOST)
    stack.frame_received(1, dns_frame(query("v4only.test", dpkt.dns.DNS_AAAA, qid=9)), 0.0)
    (op,) = take_ops(stack)
    stack.dns.resolved(op.flow, status, [], 0.1)
    (msg,) = answers_from(stack)
    assert (msg.id, msg.rcode, msg.an, msg.qd[0].name) == (9, rcode, [], "v4only.test")


def test_host_mode_ok_without_addresses_of_the_family_is_nodata() -> None:
    stack = make_stack(D.MODE_HOST)
    stack.frame_received(1, dns_frame(query("v4only.test", dpkt.dns.DNS_AAAA)), 0.0)
    (op,) = take_ops(stack)
    stack.dns.resolved(op.flow, D.RESOLVED_OK, [ip("192.0.2.1")], 0.1)
    (msg,) = answers_from(stack)
    assert (msg.rcode, msg.an) == (dpkt.dns.DNS_RCODE_NOERR, [])


def test_host_mode_times_out_with_servfail() -> None:
    stack = make_stack(D.MODE_HOST)
    stack.frame_received(1, dns_frame(query("slow.test")), 0.0)
    (op,) = take_ops(stack)
    assert stack.next_deadline() == D.QUERY_TIMEOUT
    stack.timer(D.QUERY_TIMEOUT)
    (msg,) = answers_from(stack)
    assert msg.rcode == dpkt.dns.DNS_RCODE_SERVFAIL
    stack.dns.resolved(op.flow, D.RESOLVED_OK, [ip("192.0.2.1")], 6.0)
    assert answers_from(stack) == []


def test_host_mode_answer_too_long_for_the_guest_is_truncated() -> None:
    stack = make_stack(D.MODE_HOST)
    stack.frame_received(1, dns_frame(query("many.test")), 0.0)
    (op,) = take_ops(stack)
    stack.dns.resolved(op.flow, D.RESOLVED_OK, [bytes((192, 0, 2, i)) for i in range(40)], 0.1)
    (msg,) = answers_from(stack)
    assert msg.op & dpkt.dns.DNS_TC and msg.an == []


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("mail.test", dpkt.dns.DNS_MX),
        ("txt.test", dpkt.dns.DNS_TXT),
        ("any.test", dpkt.dns.DNS_ANY),
        ("7.2.0.192.in-addr.arpa", dpkt.dns.DNS_PTR),  # PTR of a non-virtual address
        ("1.2.3.4", dpkt.dns.DNS_A),  # looks like an address: getaddrinfo would echo it
        ("bad name.test", dpkt.dns.DNS_A),  # not a host name
    ],
)
def test_host_mode_forwards_what_the_resolver_library_cannot_answer(name: str, qtype: int) -> None:
    stack = make_stack(D.MODE_HOST)
    q = query(name, qtype)
    stack.frame_received(1, dns_frame(q), 0.0)
    (op,) = take_ops(stack)
    assert (op.kind, op.addr, op.data) == (A.OP_DNS_QUERY, "", q)


def test_forward_mode_forwards_a_queries() -> None:
    stack = make_stack(D.MODE_FORWARD)
    stack.frame_received(1, dns_frame(query("intranet.corp.test")), 0.0)
    (op,) = take_ops(stack)
    assert op.kind == A.OP_DNS_QUERY
    with pytest.raises(ValueError, match="expected host or forward"):
        stack.dns.set_mode("hosts")


# ---- built-in names, PTR, zones ---------------------------------------------------------------


def test_builtin_names_and_ptr_of_the_virtual_addresses() -> None:
    stack = make_stack(D.MODE_HOST)
    assert addresses(ask(stack, "gateway.internal")) == [(1, ip("10.0.2.2"), D.BUILTIN_TTL)]
    assert addresses(ask(stack, "host.internal")) == [(1, ip("10.0.2.2"), D.BUILTIN_TTL)]
    assert addresses(ask(stack, "DNS.Internal")) == [(1, ip("10.0.2.3"), D.BUILTIN_TTL)]
    for reverse, target in (("2.2.0.10.in-addr.arpa", "gateway.internal"), ("3.2.0.10.IN-ADDR.ARPA", "dns.internal")):
        msg = ask(stack, reverse, dpkt.dns.DNS_PTR)
        assert msg.rcode == 0 and [(rr.type, rr.ptrname) for rr in msg.an] == [(dpkt.dns.DNS_PTR, target)]


def test_zones_exact_wildcard_case_and_families() -> None:
    stack = make_stack(D.MODE_HOST)
    zones = stack.dns.zones
    zones.set_source(
        Z.SOURCE_COMMAND_LINE,
        [
            Z.parse_zone_entry("App.Test=192.0.2.10"),
            Z.parse_zone_entry("app.test=2001:db8::7"),
            Z.parse_zone_entry("app.test=192.0.2.11"),
            Z.parse_zone_entry("*.corp.test=192.0.2.20"),
            Z.parse_zone_entry("*.eu.corp.test=192.0.2.30"),
            Z.parse_zone_entry("exact.eu.corp.test=192.0.2.40"),
        ],
    )
    a = ask(stack, "APP.test")
    assert [x[1] for x in addresses(a)] == [ip("192.0.2.10"), ip("192.0.2.11")]
    assert [x[1] for x in addresses(ask(stack, "app.test", dpkt.dns.DNS_AAAA))] == [V6]
    assert len(ask(stack, "app.test", dpkt.dns.DNS_ANY).an) == 3
    mx = ask(stack, "app.test", dpkt.dns.DNS_MX)
    assert (mx.rcode, mx.an) == (0, [])  # a zone name: no data for other types
    assert [x[1] for x in addresses(ask(stack, "a.b.corp.test"))] == [ip("192.0.2.20")]
    assert [x[1] for x in addresses(ask(stack, "x.eu.corp.test"))] == [ip("192.0.2.30")]
    assert [x[1] for x in addresses(ask(stack, "exact.eu.corp.test"))] == [ip("192.0.2.40")]
    nodata = ask(stack, "x.corp.test", dpkt.dns.DNS_AAAA)
    assert (nodata.rcode, nodata.an) == (0, [])
    stack.frame_received(1, dns_frame(query("corp.test")), 0.0)  # the wildcard's own domain: not in the zone
    (op,) = take_ops(stack)
    assert op.kind == A.OP_DNS_RESOLVE


def test_zone_sources_merge_and_replace_on_their_own() -> None:
    zones = Z.DnsZones()
    zones.set_source("a.zone", [("x.test", ip("192.0.2.1"))])
    zones.set_source(Z.SOURCE_COMMAND_LINE, [("x.test", ip("192.0.2.2")), ("y.test", ip("192.0.2.3"))])
    assert zones.lookup("x.test") == [ip("192.0.2.1"), ip("192.0.2.2")]
    zones.set_source("a.zone", [])
    assert zones.lookup("x.test") == [ip("192.0.2.2")]
    assert zones.add(Z.SOURCE_QMP, "z.test", ip("192.0.2.4")) is True
    assert zones.add(Z.SOURCE_QMP, "z.test", ip("192.0.2.4")) is False
    assert zones.remove(Z.SOURCE_QMP, "z.test", ip("192.0.2.5")) == []
    assert zones.remove(Z.SOURCE_QMP, "z.test", None) == [ip("192.0.2.4")]
    assert zones.lookup("z.test") is None
    assert zones.entries() == [
        (Z.SOURCE_COMMAND_LINE, "x.test", [ip("192.0.2.2")]),
        (Z.SOURCE_COMMAND_LINE, "y.test", [ip("192.0.2.3")]),
    ]


def test_zone_sizes_are_bounded() -> None:
    zones = Z.DnsZones()
    for i in range(Z.MAX_NAMES):
        zones.add(Z.SOURCE_QMP, f"n{i}.test", ip("192.0.2.1"))
    with pytest.raises(Z.ZoneError, match="full"):
        zones.add(Z.SOURCE_QMP, "one-more.test", ip("192.0.2.1"))
    with pytest.raises(Z.ZoneError, match="addresses"):
        zones.set_source("f", [("x.test", bytes((192, 0, 2, i))) for i in range(Z.MAX_ADDRESSES + 1)])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("noequals", "expected NAME=ADDR"),
        ("x.test=999.1.1.1", "bad address"),
        ("bad name=192.0.2.1", "bad DNS name"),
        ("a..b=192.0.2.1", "bad DNS name"),
        ("*=192.0.2.1", "bad DNS name"),
        ("x.*.test=192.0.2.1", "bad DNS name"),
    ],
)
def test_bad_zone_entries(text: str, error: str) -> None:
    with pytest.raises(Z.ZoneError, match=error):
        Z.parse_zone_entry(text)


def test_zone_file_syntax() -> None:
    text = "# names of the lab\nlab.test 192.0.2.1 2001:db8::1  # two\n\n*.lab.test 192.0.2.2\n"
    assert Z.parse_zone_text(text) == [
        ("lab.test", ip("192.0.2.1")),
        ("lab.test", socket.inet_pton(socket.AF_INET6, "2001:db8::1")),
        ("*.lab.test", ip("192.0.2.2")),
    ]
    with pytest.raises(Z.ZoneError, match=r"line 3: .*bad address"):
        Z.parse_zone_text("a.test 192.0.2.1\n\nb.test nope\n")
    with pytest.raises(Z.ZoneError, match="line 1: expected NAME ADDR"):
        Z.parse_zone_text("lonely.test\n")


# ---- split upstreams ------------------------------------------------------------------------


def test_split_upstreams_take_the_domain_and_below_longest_first_in_every_mode() -> None:
    for mode in D.MODES:
        stack = make_stack(mode)
        stack.dns.set_split({"corp.example": ("10.1.1.1", 53), "eu.corp.example.": ("10.1.1.2", 5353)})
        cases = [
            ("corp.example", dpkt.dns.DNS_A, ("10.1.1.1", 53)),
            ("WWW.Corp.Example", dpkt.dns.DNS_A, ("10.1.1.1", 53)),
            ("x.eu.corp.example", dpkt.dns.DNS_AAAA, ("10.1.1.2", 5353)),
            ("eu.corp.example", dpkt.dns.DNS_MX, ("10.1.1.2", 5353)),
            ("notcorp.example", dpkt.dns.DNS_MX, ("", 0)),
        ]
        for i, (name, qtype, server) in enumerate(cases):
            q = query(name, qtype, qid=i)
            stack.frame_received(1, dns_frame(q), 0.0)
            (op,) = take_ops(stack)
            assert (op.kind, (op.addr, op.port), op.data) == (A.OP_DNS_QUERY, server, q), (mode, name)
        # the zones still come first
        stack.dns.zones.add(Z.SOURCE_QMP, "pinned.corp.example", ip("192.0.2.9"))
        assert [x[1] for x in addresses(ask(stack, "pinned.corp.example"))] == [ip("192.0.2.9")]


def test_host_answer_for_dns_over_tcp() -> None:
    stack = make_stack(D.MODE_HOST)
    q = query("intranet.corp.test", dpkt.dns.DNS_A, qid=0x77)
    route = stack.dns.route(q)
    assert (route.kind, route.name, route.qtype) == (D.ROUTE_HOST, "intranet.corp.test", dpkt.dns.DNS_A)
    msg = dpkt.dns.DNS(stack.dns.host_answer(q, D.RESOLVED_OK, [ip("198.18.0.2")] * 2))
    assert (msg.id, msg.rcode, addresses(msg)) == (0x77, 0, [(1, ip("198.18.0.2"), D.HOST_TTL)])
    nx = dpkt.dns.DNS(stack.dns.host_answer(q, D.RESOLVED_NXDOMAIN, []))
    assert nx.rcode == dpkt.dns.DNS_RCODE_NXDOMAIN


# ---- the answer's source address ------------------------------------------------------------


def udp_to(dst: str, payload: bytes, sport: int = 40000) -> bytes:
    seg = dpkt.udp.UDP(sport=sport, dport=53, data=payload)
    seg.ulen = 8 + len(payload)
    return ip_frame(GUEST_MAC, GW_MAC, ipv4(GUEST, dst, dpkt.ip.IP_PROTO_UDP, seg))


def test_answers_come_from_the_address_the_query_was_sent_to() -> None:
    """A policy route may hand a guest's query to 8.8.8.8:53 to from_guest: the answer must come
    from 8.8.8.8, for local answers and for those that wait for the shell alike."""
    stack = make_stack(D.MODE_HOST)
    other = ip("192.0.2.53")
    stack.dns.from_guest(GUEST_MAC, ip(GUEST), other, 40000, query("host.internal"), 0.0)
    (local,) = answers_from(stack, src="192.0.2.53")
    assert local.an[0].ip == ip("10.0.2.2")
    stack.dns.from_guest(GUEST_MAC, ip(GUEST), other, 40000, query("far.test", qid=2), 0.0)
    stack.dns.from_guest(GUEST_MAC, ip(GUEST), other, 40000, query("far.test", dpkt.dns.DNS_MX, qid=3), 0.0)
    op_host, op_fwd = take_ops(stack)
    stack.dns.resolved(op_host.flow, D.RESOLVED_NXDOMAIN, [], 0.1)
    stack.dns.failed(op_fwd.flow, 0.1)
    assert [m.id for m in answers_from(stack, src="192.0.2.53")] == [2, 3]
    # and the usual path through the stack still answers from the DNS address
    stack.frame_received(1, udp_to(DNS_IP, query("gateway.internal")), 0.0)
    assert len(answers_from(stack, src=DNS_IP)) == 1


# ---- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dns-zone", "nameonly"], "--dns-zone 'nameonly': expected NAME=ADDR"),
        (["--dns-zone", "a.test=300.1.1.1"], "bad address '300.1.1.1'"),
        (["--dns-zone-file", "/nonexistent/zones"], "--dns-zone-file /nonexistent/zones: No such file"),
        (["--dns-upstream", "corp..test=10.1.1.1"], "bad DNS name 'corp..test'"),
        (["--dns-upstream", "corp.test=10.1.1"], "--dns-upstream 'corp.test=10.1.1'"),
        (["--dns-mode", "hosts"], "invalid choice: 'hosts'"),
    ],
)
def test_bad_dns_options_exit_naming_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from qemu_vpnnet.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--socket", "/tmp/x.sock", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_zone_file_line_exits_with_its_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qemu_vpnnet.cli import build_parser

    path = tmp_path / "zones"
    path.write_text("ok.test 192.0.2.1\nbad.test\n")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--socket", "/tmp/x.sock", "--dns-zone-file", str(path)])
    assert "line 2: expected NAME ADDR" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "mode"),
    [
        ([], "host"),
        (["--dns-upstream", "10.1.1.1"], "forward"),
        (["--dns-upstream", "corp.test=10.1.1.1"], "host"),
        (["--dns-upstream", "10.1.1.1", "--dns-mode", "host"], "host"),
        (["--dns-mode", "forward"], "forward"),
    ],
)
def test_dns_mode_default(argv: list[str], mode: str) -> None:
    from qemu_vpnnet.cli import build_parser
    from qemu_vpnnet.io.dns_host import dns_mode_of

    assert dns_mode_of(build_parser().parse_args(["--socket", "/tmp/x.sock", *argv])) == mode


def test_add_and_remove_keep_the_merged_view_of_a_full_rebuild() -> None:
    """add/remove update only the name they touch; the result must equal a rebuild from scratch."""
    rng = random.Random(14)
    zones = Z.DnsZones()
    names = ["a.test", "b.test", "*.w.test", "*.v.test"]
    for _ in range(2000):
        source = rng.choice([Z.SOURCE_QMP, Z.SOURCE_COMMAND_LINE, "file"])
        name = rng.choice(names)
        addr = bytes((192, 0, 2, rng.randrange(4)))
        if rng.random() < 0.6:
            zones.add(source, name, addr)
        else:
            zones.remove(source, name, addr if rng.random() < 0.7 else None)
        merged, wildcards = zones.merged, zones.has_wildcards
        zones.rebuild()
        assert (merged, wildcards) == (zones.merged, zones.has_wildcards)

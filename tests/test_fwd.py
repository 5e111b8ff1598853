"""The route decision (core/fwd.py) as a table, the rule syntax (policy.py), and what each engine
does with a route: RST or ICMP administratively prohibited, forwards, gateway services."""

import dpkt
import pytest

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core import fwd as F
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.policy import (
    PolicySyntaxError,
    guestfwd_rule,
    parse_guestfwd,
    parse_policy_file,
    parse_rule,
    shorthand_rule,
)
from tests.guestframes import GUEST_MAC, GW_MAC, eth, ip, ip_frame, ipv4, parse, tcp_frame

SYN = dpkt.tcp.TH_SYN


def table(*rules: str, restrict: bool = False, **config: object) -> F.RouteTable:
    t = F.RouteTable(NetConfig(**config))  # type: ignore[arg-type]
    t.set_rules("cli", [parse_rule(text, f"r{i}") for i, text in enumerate(rules, 1)])
    t.restrict = restrict
    return t


def decide(t: F.RouteTable, proto: str, dst: str, port: int = 0) -> str:
    number = {"tcp": F.PROTO_TCP, "udp": F.PROTO_UDP, "icmp": F.PROTO_ICMP}[proto]
    route = t.route_from_guest(number, ip(dst), port)
    return f"{route.describe()} [{route.rule}]" if route.rule else route.describe()


# ---- the decision, as a table ------------------------------------------------------------

DEFAULT_CASES = [
    ("tcp", "198.51.100.7", 443, "direct"),
    ("udp", "198.51.100.7", 123, "direct"),
    ("icmp", "198.51.100.7", 0, "direct"),
    ("tcp", "10.0.2.2", 22, "direct"),  # the gateway is the host's loopback
    ("tcp", "10.0.2.3", 53, "local dns [dns]"),
    ("tcp", "10.0.2.3", 80, "refuse [virtual]"),
    ("tcp", "10.0.2.77", 80, "refuse [virtual]"),  # a virtual address with no service
    ("tcp", "127.0.0.1", 22, "refuse [virtual]"),
    ("tcp", "0.0.0.0", 22, "refuse [virtual]"),
    ("udp", "224.0.0.251", 5353, "refuse [virtual]"),
    ("tcp", "169.254.169.254", 80, "refuse [metadata]"),
    ("udp", "169.254.169.254", 53, "refuse [metadata]"),
    ("tcp", "169.254.169.253", 80, "direct"),
]


@pytest.mark.parametrize(("proto", "dst", "port", "expected"), DEFAULT_CASES)
def test_default_routes(proto: str, dst: str, port: int, expected: str) -> None:
    assert decide(table(), proto, dst, port) == expected


RULE_CASES = [
    # (rules, proto, dst, port, expected)
    (["deny 10.20.0.0/16"], "tcp", "10.20.3.4", 22, "refuse [r1]"),
    (["deny 10.20.0.0/16"], "tcp", "10.21.3.4", 22, "direct"),
    (["deny tcp 198.51.100.0/24:22"], "tcp", "198.51.100.9", 22, "refuse [r1]"),
    (["deny tcp 198.51.100.0/24:22"], "tcp", "198.51.100.9", 23, "direct"),
    (["deny tcp 198.51.100.0/24:22"], "udp", "198.51.100.9", 22, "direct"),
    (["deny udp *:5000-5010"], "udp", "203.0.113.1", 5010, "refuse [r1]"),
    (["deny udp *:5000-5010"], "udp", "203.0.113.1", 5011, "direct"),
    (["deny udp *:5000-5010"], "icmp", "203.0.113.1", 0, "direct"),  # a port rule never matches ICMP
    (["deny icmp *"], "icmp", "203.0.113.1", 0, "refuse [r1]"),
    # first match wins
    (["allow tcp 10.0.0.0/8:443", "deny 10.0.0.0/8"], "tcp", "10.9.9.9", 443, "direct [r1]"),
    (["allow tcp 10.0.0.0/8:443", "deny 10.0.0.0/8"], "tcp", "10.9.9.9", 80, "refuse [r2]"),
    # the gateway address is matched as the host's 127.0.0.1 too, and the other way round
    (["deny tcp 127.0.0.1:22"], "tcp", "10.0.2.2", 22, "refuse [r1]"),
    (["deny tcp 127.0.0.0/8"], "tcp", "10.0.2.2", 8080, "refuse [r1]"),
    (["deny tcp 10.0.2.2"], "tcp", "10.0.2.2", 8080, "refuse [r1]"),
    # forward and local
    (["forward tcp 192.0.2.0/24:80 tcp:127.0.0.1:8080"], "tcp", "192.0.2.1", 80, "forward tcp:127.0.0.1:8080 [r1]"),
    (["forward tcp *:2375 unix:/run/docker.sock"], "tcp", "192.0.2.1", 2375, "forward unix:/run/docker.sock [r1]"),
    (["forward udp *:514 udp:127.0.0.1:5514"], "udp", "192.0.2.1", 514, "forward udp:127.0.0.1:5514 [r1]"),
    (["local udp *:53 dns"], "udp", "8.8.8.8", 53, "local dns [r1]"),
    # refuse replies
    (["refuse tcp * reply=icmp"], "tcp", "192.0.2.1", 80, "refuse icmp [r1]"),
    (["refuse udp * reply=drop"], "udp", "192.0.2.1", 80, "refuse drop [r1]"),
    # the metadata rule comes first: an allow does not open it
    (["allow *"], "tcp", "169.254.169.254", 80, "refuse [metadata]"),
    # rules cannot open what is virtual
    (["allow *"], "tcp", "127.0.0.1", 80, "refuse [virtual]"),
    (["allow *"], "tcp", "10.0.2.77", 80, "refuse [virtual]"),
]


@pytest.mark.parametrize(("rules", "proto", "dst", "port", "expected"), RULE_CASES)
def test_rules_first_match_wins(rules: list[str], proto: str, dst: str, port: int, expected: str) -> None:
    assert decide(table(*rules), proto, dst, port) == expected


def test_restrict_refuses_everything_but_services_dns_and_allowed() -> None:
    t = table("allow tcp 192.0.2.0/24:443", restrict=True)
    t.add_guestfwd(guestfwd_rule(parse_guestfwd("tcp:10.0.2.100:1234-tcp:127.0.0.1:5000")), ip("10.0.2.100"), 1234)
    t.add_guestfwd(guestfwd_rule(parse_guestfwd("tcp:10.0.2.2:2375-unix:/run/d.sock")), ip("10.0.2.2"), 2375)
    assert decide(t, "tcp", "198.51.100.1", 80) == "refuse [restrict]"
    assert decide(t, "tcp", "10.0.2.2", 22) == "refuse [restrict]"  # the host too
    assert decide(t, "icmp", "198.51.100.1") == "refuse [restrict]"
    assert decide(t, "tcp", "10.0.2.3", 53) == "local dns [dns]"
    assert decide(t, "tcp", "192.0.2.5", 443) == "direct [r1]"
    assert decide(t, "tcp", "10.0.2.100", 1234).startswith("forward tcp:127.0.0.1:5000")
    assert decide(t, "tcp", "10.0.2.2", 2375).startswith("forward unix:/run/d.sock")
    assert decide(t, "tcp", "10.0.2.100", 1235) == "refuse [virtual]"
    assert decide(t, "udp", "10.0.2.100", 1234) == "refuse [virtual]"  # services are per protocol


def test_host_loopback_off_makes_the_gateway_virtual_but_keeps_its_services() -> None:
    t = table(host_loopback=False)
    t.add_guestfwd(guestfwd_rule(parse_guestfwd("tcp:10.0.2.2:80-tcp:127.0.0.1:8080")), ip("10.0.2.2"), 80)
    assert decide(t, "tcp", "10.0.2.2", 22) == "refuse [virtual]"
    assert decide(t, "tcp", "10.0.2.2", 80).startswith("forward")


def test_proxy_ports_take_only_what_would_go_direct() -> None:
    t = table("deny tcp 192.0.2.0/24", "forward tcp 198.51.100.80:80 tcp:127.0.0.1:8080")
    assert decide(t, "tcp", "203.0.113.1", 80) == "direct"  # no upstream proxy: nothing intercepted
    t.proxy_http_ports = {80, 8080}
    t.proxy_https_ports = {443}
    assert decide(t, "tcp", "203.0.113.1", 80) == "proxy http [proxy-http]"
    assert decide(t, "tcp", "203.0.113.1", 8080) == "proxy http [proxy-http]"
    assert decide(t, "tcp", "203.0.113.1", 443) == "proxy https [proxy-https]"
    assert decide(t, "tcp", "203.0.113.1", 22) == "direct"
    assert decide(t, "udp", "203.0.113.1", 443) == "direct"  # QUIC is not proxied
    assert decide(t, "tcp", "192.0.2.1", 80) == "refuse [r1]"  # refused stays refused
    assert decide(t, "tcp", "198.51.100.80", 80).startswith("forward")
    assert decide(t, "tcp", "10.0.2.2", 80) == "direct"  # the host's own web server
    t.restrict = True
    assert decide(t, "tcp", "203.0.113.1", 80) == "refuse [restrict]"


def test_allow_metadata_lifts_the_builtin_rule() -> None:
    t = table()
    t.set_allow_metadata(True)
    assert decide(t, "tcp", "169.254.169.254", 80) == "direct"


def test_counts_per_kind_and_refusing_rule() -> None:
    t = table("deny 192.0.2.0/24 id=lab")
    for _ in range(3):
        decide(t, "tcp", "192.0.2.1", 80)
    decide(t, "tcp", "198.51.100.1", 80)
    decide(t, "tcp", "169.254.169.254", 80)
    assert t.counters() == {
        "route-direct": 1,
        "route-refuse": 4,
        "refused-by-rule-lab": 3,
        "refused-by-rule-metadata": 1,
    }
    assert t.rule_by_id("lab") is not None and t.rule_by_id("lab").hits == 3  # type: ignore[union-attr]


def test_guestfwd_addresses_must_be_free_and_unique() -> None:
    t = table()
    rule = guestfwd_rule(parse_guestfwd("tcp:10.0.2.100:1234-tcp:127.0.0.1:5000"))
    t.add_guestfwd(rule, ip("10.0.2.100"), 1234)
    with pytest.raises(ValueError, match="exists already"):
        t.add_guestfwd(guestfwd_rule(parse_guestfwd("tcp:10.0.2.100:1234-cmd:cat")), ip("10.0.2.100"), 1234)
    for bad in ("10.0.2.3", "10.0.2.0", "10.0.2.255", "192.0.2.1"):
        with pytest.raises(ValueError, match="not a free address"):
            t.add_guestfwd(guestfwd_rule(parse_guestfwd(f"tcp:{bad}:1-cmd:cat")), ip(bad), 1)
    assert t.is_service_address(ip("10.0.2.100"))
    assert t.remove_guestfwd(F.PROTO_TCP, ip("10.0.2.100"), 1234) is rule
    assert not t.is_service_address(ip("10.0.2.100"))


# ---- syntax --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "deny tcp 10.0.0.0/8:22 id=r1",
        "direct udp 192.0.2.0/24:5000-5010 id=r1",
        "refuse any 198.51.100.7 reply=drop id=r1",
        "forward tcp *:80 tcp:127.0.0.1:8080 id=r1",
        "forward tcp 192.0.2.1:23 'cmd:nc -U /run/x.sock' id=r1",
        "local udp *:53 dns id=r1",
        "refuse tcp [2001:db8::/32]:443 id=r1",
    ],
)
def test_rule_text_round_trips(text: str) -> None:
    rule = parse_rule(text, "x")
    again = parse_rule(rule.text, "y")
    assert again.text == rule.text
    assert (again.proto, again.net, again.prefix, again.port_lo, again.port_hi) == (
        rule.proto,
        rule.net,
        rule.prefix,
        rule.port_lo,
        rule.port_hi,
    )
    assert again.route.describe() == rule.route.describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty rule"),
        ("block 10.0.0.0/8", "unknown action"),
        ("deny tcp", "missing destination"),
        ("deny tcp 10.0.0.300/8", "bad destination"),
        ("deny tcp 10.0.0.0/8:0", "bad port range"),
        ("deny tcp 10.0.0.0/8:90-80", "bad port range"),
        ("deny tcp 10.0.0.0/8:http", "bad port"),
        ("deny icmp 10.0.0.0/8:22", "icmp rule takes no port"),
        ("deny tcp 10.0.0.0/8 tcp:1.2.3.4:5", "only forward and local rules take a target"),
        ("forward tcp *:80", "forward needs a target"),
        ("forward any *:80 tcp:127.0.0.1:1", "protocol tcp or udp"),
        ("forward udp *:80 tcp:127.0.0.1:1", "only be forwarded to udp"),
        ("forward tcp *:80 udp:127.0.0.1:1", "cannot be forwarded to udp"),
        ("forward tcp *:80 ftp:x", "unknown target type"),
        ("forward tcp *:80 tcp:127.0.0.1:99999", "bad port"),
        ("forward tcp *:80 unix:/" + "x" * 200, "too long"),
        ("local tcp *:80 web", "unknown local service"),
        ("deny tcp * reply=maybe", "bad reply"),
        ("deny udp * reply=rst", "reply=rst is for TCP"),
        ("allow tcp * reply=rst", "only for refuse"),
        ("deny tcp * id=bad/id", "bad rule id"),
        ("deny tcp * extra words", "unexpected"),
        ("deny tcp 'unterminated", "No closing quotation"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PolicySyntaxError, match=message):
        parse_rule(text, "x")


def test_shorthands() -> None:
    assert shorthand_rule("deny", "10.0.0.0/8:22", "deny1").text == "refuse any 10.0.0.0/8:22 id=deny1"
    assert shorthand_rule("allow", "192.0.2.7", "allow1").text == "direct any 192.0.2.7/32 id=allow1"


def test_policy_file_names_the_bad_line() -> None:
    rules = parse_policy_file("# corp policy\n\ndeny tcp 10.0.0.0/8:22\nallow * id=rest  # the rest\n")
    assert [r.id for r in rules] == ["line3", "rest"]
    with pytest.raises(PolicySyntaxError, match="line 3: unknown action"):
        parse_policy_file("deny 10.0.0.0/8\n\nblock 1.2.3.4\n")
    with pytest.raises(PolicySyntaxError, match="line 2: rule id 'a' is used twice"):
        parse_policy_file("deny 10.0.0.0/8 id=a\ndeny 10.1.0.0/16 id=a\n")


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("tcp:10.0.2.100:1234-tcp:127.0.0.1:5000", "tcp:127.0.0.1:5000"),
        ("guestfwd=tcp:10.0.2.100:1234-127.0.0.1:5000", "tcp:127.0.0.1:5000"),
        ("tcp:10.0.2.100:1234-unix:/run/app.sock", "unix:/run/app.sock"),
        ("tcp:10.0.2.100:1234-cmd:nc -U /run/app.sock", "cmd:nc -U /run/app.sock"),
        ("udp:10.0.2.100:514-udp:127.0.0.1:5514", "udp:127.0.0.1:5514"),
        ("udp:10.0.2.100:514-127.0.0.1:5514", "udp:127.0.0.1:5514"),
    ],
)
def test_guestfwd_syntax(text: str, target: str) -> None:
    spec = parse_guestfwd(text)
    assert guestfwd_rule(spec).route.target_text() == target


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.2.100:1234-cmd:cat", "protocol must be tcp or udp"),
        ("tcp:10.0.2.100:1234", "missing '-TARGET'"),
        ("tcp:10.0.2.300:1234-cmd:cat", "bad guest-side address"),
        ("tcp:10.0.2.100:0-cmd:cat", "bad guest-side port"),
        ("udp:10.0.2.100:53-unix:/x", "only be forwarded to udp"),
        ("tcp:10.0.2.100:53-cmd:", "bad target"),
    ],
)
def test_bad_guestfwd(text: str, message: str) -> None:
    with pytest.raises(PolicySyntaxError, match=message):
        parse_guestfwd(text)


# ---- the engines carry routes out ----------------------------------------------------------


def stack_with(*rules: str, guestfwds: tuple[str, ...] = (), **config: object) -> Stack:
    stack = Stack(NetConfig(**config))  # type: ignore[arg-type]
    stack.attach_port(1)
    stack.fwd.set_rules("cli", [parse_rule(text, f"r{i}") for i, text in enumerate(rules, 1)])
    for text in guestfwds:
        spec = parse_guestfwd(text)
        stack.fwd.add_guestfwd(guestfwd_rule(spec), ip(spec.addr), spec.port)
    return stack


def taken(stack: Stack) -> tuple[list[dpkt.ethernet.Ethernet], list[A.HostOp]]:
    frames = [parse(f) for f in stack.switch.out.get(1, [])]
    stack.switch.out[1] = []
    ops = list(stack.out.ops)
    stack.out.ops.clear()
    return frames, ops


def udp_frame(dst: str, dport: int, data: bytes, sport: int = 5000) -> bytes:
    seg = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    seg.ulen = 8 + len(data)
    return ip_frame(GUEST_MAC, GW_MAC, ipv4("10.0.2.15", dst, dpkt.ip.IP_PROTO_UDP, seg))


def icmp_echo(dst: str, src: str = "10.0.2.15") -> bytes:
    echo = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=7, seq=1, data=b"ping"))
    return ip_frame(GUEST_MAC, GW_MAC, ipv4(src, dst, dpkt.ip.IP_PROTO_ICMP, echo))


def test_refused_syn_gets_rst_and_no_connect() -> None:
    stack = stack_with("deny tcp 192.0.2.0/24")
    stack.frame_received(1, tcp_frame("10.0.2.15", "192.0.2.1", 40000, 80, 1000, 0, SYN), 0.0)
    frames, ops = taken(stack)
    assert ops == []
    assert len(frames) == 1
    seg = frames[0].data.data
    assert seg.flags & dpkt.tcp.TH_RST and seg.ack == 1001 and frames[0].data.src == ip("192.0.2.1")
    assert stack.counters.get("tcp-refused-policy") == 1


def test_refused_syn_with_icmp_reply() -> None:
    stack = stack_with("deny tcp 192.0.2.0/24 reply=icmp")
    stack.frame_received(1, tcp_frame("10.0.2.15", "192.0.2.1", 40000, 80, 1000, 0, SYN), 0.0)
    frames, ops = taken(stack)
    assert ops == [] and len(frames) == 1
    icmp = frames[0].data.data
    assert (icmp.type, icmp.code) == (3, 13)
    quoted = dpkt.ip.IP(bytes(icmp.data.data))
    assert quoted.dst == ip("192.0.2.1")


def test_refused_udp_gets_icmp_admin_prohibited_and_opens_no_socket() -> None:
    stack = stack_with("deny udp 192.0.2.0/24:53")
    stack.frame_received(1, udp_frame("192.0.2.1", 53, b"q"), 0.0)
    frames, ops = taken(stack)
    assert ops == []
    icmp = frames[0].data.data
    assert (icmp.type, icmp.code) == (3, 13)
    assert frames[0].data.src == ip("192.0.2.1")
    assert stack.counters.get("udp-refused-policy") == 1
    # a flow already open to one destination is refused another one, and keeps the first
    stack.frame_received(1, udp_frame("198.51.100.1", 53, b"ok"), 1.0)
    _frames, ops = taken(stack)
    assert [op.kind for op in ops] == [A.OP_UDP_OPEN, A.OP_UDP_SEND]
    stack.frame_received(1, udp_frame("192.0.2.1", 53, b"q"), 2.0)
    frames, ops = taken(stack)
    assert ops == [] and (frames[0].data.data.type, frames[0].data.data.code) == (3, 13)


def test_refused_ping_gets_icmp_admin_prohibited() -> None:
    stack = stack_with("deny icmp 192.0.2.0/24")
    stack.frame_received(1, icmp_echo("192.0.2.1"), 0.0)
    frames, ops = taken(stack)
    assert ops == [] and (frames[0].data.data.type, frames[0].data.data.code) == (3, 13)
    stack.frame_received(1, icmp_echo("198.51.100.1"), 0.0)
    _frames, ops = taken(stack)
    assert [op.kind for op in ops] == [A.OP_PING_SEND]


def test_existing_connections_keep_their_route_when_rules_change() -> None:
    stack = stack_with()
    stack.frame_received(1, tcp_frame("10.0.2.15", "192.0.2.1", 40000, 80, 1000, 0, SYN), 0.0)
    _frames, ops = taken(stack)
    flow = ops[0].flow
    stack.fwd.set_rules("cli", [parse_rule("deny tcp 192.0.2.0/24", "late")])
    stack.tcp.host_connected(flow, 0.1)
    frames, _ops = taken(stack)
    assert frames[0].data.data.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK
    assert stack.tcp.flows[flow].route.kind == F.DIRECT
    conn = stack.tcp.connections(0.2)[0]
    assert (conn["route"], conn["rule"]) == ("direct", "")
    # a new connection to the same place is refused
    stack.frame_received(1, tcp_frame("10.0.2.15", "192.0.2.1", 40001, 80, 1000, 0, SYN), 0.3)
    frames, ops = taken(stack)
    assert ops == [] and frames[0].data.data.flags & dpkt.tcp.TH_RST


def test_tcp_forward_rule_connects_to_the_target_and_keeps_the_guest_view() -> None:
    stack = stack_with("forward tcp 192.0.2.0/24:80 tcp:127.0.0.1:8080")
    stack.frame_received(1, tcp_frame("10.0.2.15", "192.0.2.9", 40000, 80, 1000, 0, SYN), 0.0)
    _frames, ops = taken(stack)
    assert (ops[0].kind, ops[0].addr, ops[0].port) == (A.OP_TCP_CONNECT, "127.0.0.1", 8080)
    assert ops[0].route is not None and ops[0].route.rule == "r1"
    stack.tcp.host_connected(ops[0].flow, 0.1)
    frames, _ops = taken(stack)
    assert frames[0].data.src == ip("192.0.2.9") and frames[0].data.data.sport == 80
    assert stack.tcp.connections(0.2)[0]["route"] == "forward tcp:127.0.0.1:8080"


def test_gateway_service_unix_and_cmd_targets_reach_the_shell_with_their_route() -> None:
    stack = stack_with(guestfwds=("tcp:10.0.2.100:1234-unix:/run/app.sock", "tcp:10.0.2.2:23-cmd:cat"))
    stack.frame_received(1, tcp_frame("10.0.2.15", "10.0.2.100", 40000, 1234, 1000, 0, SYN), 0.0)
    stack.frame_received(1, tcp_frame("10.0.2.15", "10.0.2.2", 40001, 23, 1000, 0, SYN), 0.0)
    _frames, ops = taken(stack)
    routes = [(op.route.target, op.route.path) for op in ops if op.route is not None]
    assert routes == [(F.TARGET_UNIX, "/run/app.sock"), (F.TARGET_CMD, "cat")]


def test_udp_gateway_service_forwards_and_maps_replies_back() -> None:
    stack = stack_with(guestfwds=("udp:10.0.2.100:514-udp:127.0.0.1:5514",))
    stack.frame_received(1, udp_frame("10.0.2.100", 514, b"log line"), 0.0)
    _frames, ops = taken(stack)
    assert [(op.kind, op.addr, op.port) for op in ops] == [
        (A.OP_UDP_OPEN, "", 0),
        (A.OP_UDP_SEND, "127.0.0.1", 5514),
    ]
    stack.udp.host_datagram(ops[0].flow, b"ack", "127.0.0.1", 5514, 0.1)
    frames, _ops = taken(stack)
    assert frames[0].data.src == ip("10.0.2.100") and frames[0].data.data.sport == 514
    # the same host port reached through the gateway address is another destination
    stack.frame_received(1, udp_frame("10.0.2.2", 5514, b"direct"), 0.2)
    _frames, ops = taken(stack)
    assert [(op.addr, op.port) for op in ops] == [("127.0.0.1", 5514)]


def test_udp_replies_from_unknown_remotes_obey_the_policy() -> None:
    stack = stack_with("deny udp 192.0.2.0/24")
    stack.frame_received(1, udp_frame("198.51.100.1", 3478, b"stun"), 0.0)
    _frames, ops = taken(stack)
    flow = ops[0].flow
    stack.udp.host_datagram(flow, b"from a peer", "203.0.113.5", 4000, 0.1)  # NAT traversal: let in
    frames, _ops = taken(stack)
    assert frames[0].data.src == ip("203.0.113.5")
    stack.udp.host_datagram(flow, b"from a refused net", "192.0.2.1", 4000, 0.2)
    frames, _ops = taken(stack)
    assert frames == [] and stack.counters.get("udp-reply-refused-policy") == 1


def test_local_dns_route_answers_from_the_address_asked() -> None:
    stack = stack_with("local udp *:53 dns", host_names=["corp-host"])
    query = bytes(dpkt.dns.DNS(id=9, qd=[dpkt.dns.DNS.Q(name="corp-host", type=1, cls=1)]))
    stack.frame_received(1, udp_frame("192.0.2.53", 53, query), 0.0)
    frames, ops = taken(stack)
    assert ops == []
    assert frames[0].data.src == ip("192.0.2.53") and frames[0].data.data.sport == 53
    answer = dpkt.dns.DNS(bytes(frames[0].data.data.data))
    assert answer.id == 9 and answer.an[0].ip == ip("10.0.2.2")


def test_gateway_service_address_answers_arp_and_ping_and_is_never_leased() -> None:
    stack = stack_with(guestfwds=("tcp:10.0.2.15:80-tcp:127.0.0.1:8080",), dhcp_start="10.0.2.15")
    arp = dpkt.arp.ARP(op=1, sha=GUEST_MAC, spa=ip("10.0.2.16"), tha=b"\x00" * 6, tpa=ip("10.0.2.15"))
    stack.frame_received(1, eth(b"\xff" * 6, GUEST_MAC, dpkt.ethernet.ETH_TYPE_ARP, bytes(arp)), 0.0)
    frames, _ops = taken(stack)
    assert frames[0].data.op == 2 and frames[0].data.sha == GW_MAC
    stack.frame_received(1, icmp_echo("10.0.2.15", src="10.0.2.16"), 0.0)  # not from the service's address
    frames, _ops = taken(stack)
    assert frames[0].data.data.type == 0
    offer = stack.dhcp._candidate(bytes.fromhex("525400000001"), 0.0)
    assert offer == ip("10.0.2.16")

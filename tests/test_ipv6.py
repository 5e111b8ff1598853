"""Unit tests of IPv6 in the sans-IO core: the Stack with IPv6 frames a guest would send.

Frames are built here byte by byte (with an independent checksum), parsed back with dpkt; the
Stack runs without sockets, its host operations read from `ops`.
"""

import errno
import socket
import struct

import dpkt

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.fwd import PROTO_TCP, REFUSE, Route, Rule
from qemu_vpnnet.core.stack import Stack
from tests.guestframes import GUEST2_MAC, GUEST_MAC, GW_MAC

ETH_IPV6 = 0x86DD
ALL_ROUTERS_MAC = bytes.fromhex("333300000002")


def a6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


GUEST = a6("fec0::5054:ff:fe12:3456")
GUEST_LL = a6("fe80::5054:ff:fe12:3456")
GATEWAY = a6("fec0::2")
DNS = a6("fec0::3")
ROUTER_LL = a6("fe80::2")
FAR = a6("2001:db8:1::1")


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def l4_sum(src: bytes, dst: bytes, nh: int, l4: bytes) -> int:
    return csum(src + dst + struct.pack("!IxxxB", len(l4), nh) + l4)


def with_sum(src: bytes, dst: bytes, nh: int, l4: bytes, at: int) -> bytes:
    value = l4_sum(src, dst, nh, l4[:at] + b"\0\0" + l4[at + 2 :])
    return l4[:at] + struct.pack("!H", value) + l4[at + 2 :]


def frame6(
    src: bytes, dst: bytes, nh: int, payload: bytes, mac: bytes = GUEST_MAC, dst_mac: bytes = GW_MAC, hop: int = 64
) -> bytes:
    return (
        dst_mac
        + mac
        + struct.pack("!H", ETH_IPV6)
        + struct.pack("!IHBB", 0x60000000, len(payload), nh, hop)
        + src
        + dst
        + payload
    )


def icmp6(src: bytes, dst: bytes, kind: int, body: bytes, code: int = 0) -> bytes:
    return with_sum(src, dst, 58, bytes((kind, code, 0, 0)) + body, 2)


def udp6(src: bytes, dst: bytes, sport: int, dport: int, data: bytes) -> bytes:
    return with_sum(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data, 6)


def tcp6(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b"", opts: bytes = b""
) -> bytes:
    hlen = 20 + len(opts)
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (hlen // 4) << 4, flags, 65535, 0, 0) + opts + data
    return with_sum(src, dst, 6, seg, 16)


def make_stack(**kwargs: object) -> Stack:
    stack = Stack(NetConfig(**kwargs))  # type: ignore[arg-type]
    stack.dns.set_mode("forward")
    stack.attach_port(1)
    stack.attach_port(2)
    return stack


def take_frames(stack: Stack, port: int = 1) -> list[bytes]:
    frames = list(stack.switch.out[port])
    stack.switch.out[port].clear()
    return frames


def take_ops(stack: Stack) -> list[A.HostOp]:
    ops = list(stack.out.ops)
    stack.out.ops.clear()
    return ops


def parsed(frame: bytes) -> dpkt.ip6.IP6:
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.type == ETH_IPV6
    pkt = eth.data
    assert isinstance(pkt, dpkt.ip6.IP6)
    return pkt


def valid_l4(frame: bytes) -> bool:
    nh = frame[20]
    return l4_sum(frame[22:38], frame[38:54], nh, frame[54:]) == 0


def drops(stack: Stack) -> dict[str, int]:
    return {k: v for k, v in stack.counters.snapshot().items() if k.startswith("drop-")}


# ---- neighbour discovery and local services -----------------------------------------------------


def test_router_solicitation_gets_an_advertisement_with_the_prefix() -> None:
    stack = make_stack(mtu=9000)
    rs = icmp6(GUEST_LL, a6("ff02::2"), 133, bytes(4) + b"\x01\x01" + GUEST_MAC)
    stack.frame_received(1, frame6(GUEST_LL, a6("ff02::2"), 58, rs, dst_mac=ALL_ROUTERS_MAC, hop=255), 0.0)
    (ra,) = take_frames(stack)
    pkt = parsed(ra)
    assert (pkt.src, pkt.dst, pkt.hlim, ra[54]) == (ROUTER_LL, GUEST_LL, 255, 134) and valid_l4(ra)
    assert bytes.fromhex("fec0000000000000") in ra and struct.pack("!I", 9000) in ra
    assert stack.counters.get("ndp-ra-sent") == 1


def test_neighbour_solicitation_for_the_gateway_and_echo_to_it() -> None:
    stack = make_stack()
    ns = icmp6(GUEST, a6("ff02::1:ff00:2"), 135, bytes(4) + GATEWAY + b"\x01\x01" + GUEST_MAC)
    stack.frame_received(
        1, frame6(GUEST, a6("ff02::1:ff00:2"), 58, ns, dst_mac=bytes.fromhex("3333ff000002"), hop=255), 0.0
    )
    (na,) = take_frames(stack)
    assert na[54] == 136 and na[62:78] == GATEWAY and GW_MAC in na[78:] and valid_l4(na)
    echo = icmp6(GUEST, GATEWAY, 128, b"\x12\x34\x00\x01hello")
    stack.frame_received(1, frame6(GUEST, GATEWAY, 58, echo), 0.0)
    (reply,) = take_frames(stack)
    pkt = parsed(reply)
    assert (pkt.src, pkt.dst, reply[54]) == (GATEWAY, GUEST, 129) and reply.endswith(b"\x12\x34\x00\x01hello")
    assert valid_l4(reply) and take_ops(stack) == []


def test_dns_on_the_ipv6_address_and_dhcpv6_information_request() -> None:
    stack = make_stack()
    query = bytes(dpkt.dns.DNS(id=7, qd=[dpkt.dns.DNS.Q(name="example.test", type=dpkt.dns.DNS_AAAA)]))
    stack.frame_received(1, frame6(GUEST, DNS, 17, udp6(GUEST, DNS, 4444, 53, query)), 0.0)
    (op,) = take_ops(stack)
    assert op.kind == A.OP_DNS_QUERY
    duid = b"\x00\x03\x00\x01" + GUEST_MAC
    info = b"\x0b\x00\x00\x01" + struct.pack("!HH", 1, len(duid)) + duid
    agents = a6("ff02::1:2")
    stack.frame_received(
        1,
        frame6(GUEST_LL, agents, 17, udp6(GUEST_LL, agents, 546, 547, info), dst_mac=bytes.fromhex("333300010002")),
        0.0,
    )
    (reply,) = take_frames(stack)
    pkt = parsed(reply)
    assert (pkt.src, pkt.dst, reply[54:58]) == (ROUTER_LL, GUEST_LL, b"\x02\x23\x02\x22") and valid_l4(reply)
    assert reply[62] == 7 and DNS in reply  # a Reply carrying the DNS server


# ---- the engines over IPv6 -------------------------------------------------------------------------


def test_tcp_connect_to_an_outside_address_then_data_both_ways() -> None:
    stack = make_stack(mtu=1500)
    mss = b"\x02\x04\x05\xb4"
    stack.frame_received(1, frame6(GUEST, FAR, 6, tcp6(GUEST, FAR, 40000, 80, 1000, 0, 0x02, opts=mss)), 0.0)
    (op,) = take_ops(stack)
    assert (op.kind, op.addr, op.port) == (A.OP_TCP_CONNECT, "2001:db8:1::1", 80)
    stack.tcp.host_connected(op.flow, 0.0)
    (synack,) = take_frames(stack)
    pkt = parsed(synack)
    tcp = pkt.data
    assert isinstance(tcp, dpkt.tcp.TCP) and tcp.flags == 0x12 and tcp.ack == 1001 and valid_l4(synack)
    assert dict(dpkt.tcp.parse_opts(tcp.opts))[dpkt.tcp.TCP_OPT_MSS] == struct.pack("!H", 1440)  # 1500 - 60
    iss = tcp.seq
    stack.frame_received(1, frame6(GUEST, FAR, 6, tcp6(GUEST, FAR, 40000, 80, 1001, iss + 1, 0x18, b"GET /")), 0.0)
    stack.flush(0.0)
    sends = [o for o in take_ops(stack) if o.kind == A.OP_TCP_SEND]
    assert [o.data for o in sends] == [b"GET /"]
    stack.tcp.host_data(op.flow, bytes(5000), 0.0)
    frames = [f for f in take_frames(stack) if len(f) > 74]
    assert [len(f) - 74 for f in frames] == [1440, 1440, 1440, 680] and all(valid_l4(f) for f in frames)
    assert stack.tcp.connections(0.0)[0]["guest"] == "[fec0::5054:ff:fe12:3456]:40000"


def test_tcp_to_the_gateway_goes_to_the_hosts_ipv6_loopback() -> None:
    stack = make_stack()
    stack.frame_received(1, frame6(GUEST, GATEWAY, 6, tcp6(GUEST, GATEWAY, 40000, 22, 1, 0, 0x02)), 0.0)
    (op,) = take_ops(stack)
    assert (op.addr, op.port) == ("::1", 22)


def test_unreachable_network_is_an_icmpv6_error_quoting_the_syn() -> None:
    stack = make_stack()
    stack.frame_received(1, frame6(GUEST, FAR, 6, tcp6(GUEST, FAR, 40001, 443, 5, 0, 0x02)), 0.0)
    (op,) = take_ops(stack)
    stack.tcp.host_refused(op.flow, errno.ENETUNREACH, 0.0)
    (error,) = take_frames(stack)
    pkt = parsed(error)
    assert (pkt.src, pkt.dst, error[54], error[55]) == (FAR, GUEST, 1, 0) and valid_l4(error)
    assert error[62 + 8 : 62 + 24] == GUEST  # the quoted IPv6 header's source


def test_refused_port_is_a_reset_and_policy_takes_ipv6_networks() -> None:
    stack = make_stack()
    stack.fwd.set_rules("cli", [Rule("no-db8", Route(REFUSE, "no-db8"), PROTO_TCP, 6, int.from_bytes(FAR, "big"), 48)])
    stack.frame_received(1, frame6(GUEST, FAR, 6, tcp6(GUEST, FAR, 40002, 80, 9, 0, 0x02)), 0.0)
    (rst,) = take_frames(stack)
    tcp = parsed(rst).data
    assert isinstance(tcp, dpkt.tcp.TCP) and tcp.flags & dpkt.tcp.TH_RST and tcp.ack == 10 and valid_l4(rst)
    assert take_ops(stack) == [] and stack.counters.get("tcp-refused-policy") == 1
    other = a6("2001:db9::1")
    stack.frame_received(1, frame6(GUEST, other, 6, tcp6(GUEST, other, 40003, 80, 9, 0, 0x02)), 0.0)
    assert [o.kind for o in take_ops(stack)] == [A.OP_TCP_CONNECT]


def test_udp_flow_over_ipv6_and_its_replies() -> None:
    stack = make_stack()
    stack.frame_received(1, frame6(GUEST, FAR, 17, udp6(GUEST, FAR, 5000, 7, b"ping")), 0.0)
    opened, sent = take_ops(stack)
    assert (opened.kind, opened.addr) == (A.OP_UDP_OPEN, "::")
    assert (sent.kind, sent.addr, sent.port, sent.data) == (A.OP_UDP_SEND, "2001:db8:1::1", 7, b"ping")
    stack.udp.host_datagram(opened.flow, b"pong", "2001:db8:1::1", 7, 0.0)
    (reply,) = take_frames(stack)
    pkt = parsed(reply)
    assert (pkt.src, pkt.dst) == (FAR, GUEST) and reply.endswith(b"pong") and valid_l4(reply)
    stack.udp.host_datagram(opened.flow, b"x", "127.0.0.1", 7, 0.0)  # the other family: not this flow's
    assert take_frames(stack) == [] and stack.counters.get("udp-reply-bad-source") == 1


def test_echo_to_the_outside_goes_through_an_ipv6_ping_socket() -> None:
    stack = make_stack()
    echo = icmp6(GUEST, FAR, 128, b"\x00\x07\x00\x01data")
    stack.frame_received(1, frame6(GUEST, FAR, 58, echo), 0.0)
    (op,) = take_ops(stack)
    assert (op.kind, op.addr, op.data[0]) == (A.OP_PING_SEND, "2001:db8:1::1", 128)
    stack.icmp.host_reply(op.flow, b"\x81\x00\x00\x00\x99\x99\x00\x01data", "2001:db8:1::1", 0.0)
    (reply,) = take_frames(stack)
    assert reply[54] == 129 and reply[58:60] == b"\x00\x07" and valid_l4(reply)  # the guest's identifier back


def test_fragmented_udp_is_reassembled() -> None:
    stack = make_stack()
    data = bytes(range(256)) * 12
    whole = udp6(GUEST, FAR, 5001, 9, data)
    first, rest = whole[:1232], whole[1232:]
    stack.frame_received(1, frame6(GUEST, FAR, 44, b"\x11\x00\x00\x01\x00\x00\x00\x2a" + first), 0.0)
    assert take_ops(stack) == []
    stack.frame_received(
        1, frame6(GUEST, FAR, 44, b"\x11\x00" + struct.pack("!H", 1232) + b"\x00\x00\x00\x2a" + rest), 0.0
    )
    ops = take_ops(stack)
    assert [o.kind for o in ops] == [A.OP_UDP_OPEN, A.OP_UDP_SEND] and ops[1].data == data
    assert stack.counters.get("rx-ip-reassembled") == 1


# ---- malformed input: counted, dropped, nothing else happens -------------------------------------


def assert_dropped(stack: Stack, frame: bytes, reason: str) -> None:
    before = stack.counters.get("drop-" + reason)
    stack.frame_received(1, frame, 0.0)
    assert stack.counters.get("drop-" + reason) == before + 1, drops(stack)
    assert take_ops(stack) == [] and take_frames(stack) == []


def test_bad_payload_length_is_dropped() -> None:
    stack = make_stack()
    good = frame6(GUEST, FAR, 17, udp6(GUEST, FAR, 5000, 7, b"x"))
    assert_dropped(stack, good[:18] + b"\x05\x00" + good[20:], "bad-ipv6-length")
    assert_dropped(stack, good[:18] + b"\x00\x00" + good[20:], "bad-ipv6-length")
    assert_dropped(stack, good[:14] + b"\x40" + good[15:], "bad-ipv6-version")


def test_hop_by_hop_jumbogram_is_dropped() -> None:
    stack = make_stack()
    jumbo = b"\x11\x00\xc2\x04" + struct.pack("!I", 70000)
    assert_dropped(
        stack, frame6(GUEST, FAR, 0, jumbo)[:18] + b"\x00\x00" + frame6(GUEST, FAR, 0, jumbo)[20:], "ipv6-jumbogram"
    )
    assert_dropped(stack, frame6(GUEST, FAR, 0, jumbo + udp6(GUEST, FAR, 1, 2, b"")), "ipv6-jumbogram")


def test_endless_extension_header_chains_are_dropped() -> None:
    stack = make_stack()
    chain = b"".join(b"\x3c\x00" + bytes(6) for _ in range(40)) + udp6(GUEST, FAR, 5000, 7, b"x")
    assert_dropped(stack, frame6(GUEST, FAR, 60, chain), "ipv6-extension-chain")
    runaway = b"\x3c\xff" + bytes(6)  # says 2048 bytes, has 8
    assert_dropped(stack, frame6(GUEST, FAR, 60, runaway), "bad-ipv6-extension")
    late_hbh = b"\x00\x00" + bytes(6) + b"\x11\x00" + bytes(6)
    assert_dropped(stack, frame6(GUEST, FAR, 60, late_hbh), "bad-ipv6-extension")
    source_route = b"\x11\x02\x00\x01" + bytes(4) + FAR
    assert_dropped(stack, frame6(GUEST, FAR, 43, source_route), "ipv6-routing-header")


def test_tiny_short_and_overlapping_fragments_are_dropped() -> None:
    stack = make_stack()
    whole = udp6(GUEST, FAR, 5001, 9, bytes(3000))
    assert_dropped(
        stack, frame6(GUEST, FAR, 44, b"\x11\x00\x00\x01\x00\x00\x00\x01" + whole[:16]), "ipv6-tiny-fragment"
    )
    assert_dropped(
        stack,
        frame6(GUEST, FAR, 44, b"\x3c\x00\x00\x01\x00\x00\x00\x02" + b"\x11\x99" + bytes(1230)),
        "ipv6-first-fragment-short",
    )
    stack.frame_received(1, frame6(GUEST, FAR, 44, b"\x11\x00\x00\x01\x00\x00\x00\x03" + whole[:1232]), 0.0)
    overlap = b"\x11\x00" + struct.pack("!H", 1224) + b"\x00\x00\x00\x03" + whole[1224:]
    stack.frame_received(1, frame6(GUEST, FAR, 44, overlap), 0.0)
    assert stack.counters.get("drop-ip-fragment-overlap") == 1 and take_ops(stack) == []
    tcp = frame6(GUEST, FAR, 44, b"\x06\x00\x00\x01\x00\x00\x00\x04" + bytes(1232))
    assert_dropped(stack, tcp, "ip-fragment-tcp")


def test_zero_udp_checksum_and_bad_sources_are_dropped() -> None:
    stack = make_stack()
    udp = udp6(GUEST, FAR, 5000, 7, b"x")
    assert_dropped(stack, frame6(GUEST, FAR, 17, udp[:6] + b"\0\0" + udp[8:]), "udp6-zero-checksum")
    elsewhere = a6("2001:db8:99::5")
    assert_dropped(stack, frame6(elsewhere, FAR, 17, udp6(elsewhere, FAR, 5000, 7, b"x")), "ipv6-bad-source")
    assert_dropped(stack, frame6(GUEST_LL, FAR, 6, tcp6(GUEST_LL, FAR, 1, 2, 0, 0, 2)), "ipv6-bad-source")
    bad_sum = icmp6(GUEST, GATEWAY, 128, b"\0\1\0\1")
    assert_dropped(stack, frame6(GUEST, GATEWAY, 58, bad_sum[:2] + b"\0\0" + bad_sum[4:]), "bad-icmpv6-checksum")


# ---- one guest cannot hurt another ------------------------------------------------------------------


def test_a_guest_cannot_send_from_another_guests_address() -> None:
    stack = make_stack()
    stack.frame_received(1, frame6(GUEST, FAR, 17, udp6(GUEST, FAR, 5000, 7, b"x")), 0.0)
    take_ops(stack)
    forged = frame6(GUEST, FAR, 17, udp6(GUEST, FAR, 5001, 7, b"y"), mac=GUEST2_MAC)
    assert_dropped(stack, forged, "ipv6-spoof-address")
    stack.switch.learn(GUEST2_MAC, 2)
    assert_dropped(
        stack, frame6(GATEWAY, FAR, 17, udp6(GATEWAY, FAR, 1, 7, b"z"), mac=GUEST2_MAC), "ipv6-spoof-gateway"
    )
    stack.detach_port(1)  # the first guest left: its address is free
    take_ops(stack)  # the first guest's flow closed
    stack.frame_received(2, forged, 1.0)
    assert [o.kind for o in take_ops(stack)] == [A.OP_UDP_OPEN, A.OP_UDP_SEND]


def test_router_and_neighbour_lies_from_guests_reach_nobody() -> None:
    stack = make_stack()
    stack.switch.learn(GUEST_MAC, 1)
    other_ll = a6("fe80::1")
    all_nodes = a6("ff02::1")
    na = icmp6(other_ll, all_nodes, 136, b"\x20\0\0\0" + GATEWAY + b"\x02\x01" + GUEST2_MAC)
    assert_dropped(
        stack,
        frame6(other_ll, all_nodes, 58, na, mac=GUEST2_MAC, dst_mac=bytes.fromhex("333300000001"), hop=255),
        "ndp-spoof-target",
    )
    assert take_frames(stack, 1) == []  # not flooded to the other guest either
    liar = icmp6(other_ll, all_nodes, 136, b"\x20\0\0\0" + other_ll + b"\x02\x01" + GUEST_MAC)
    assert_dropped(
        stack,
        frame6(other_ll, all_nodes, 58, liar, mac=GUEST2_MAC, dst_mac=bytes.fromhex("333300000001"), hop=255),
        "ndp-spoof-lladdr",
    )
    ra = icmp6(other_ll, all_nodes, 134, bytes(12))
    assert_dropped(
        stack,
        frame6(other_ll, all_nodes, 58, ra, mac=GUEST2_MAC, dst_mac=GUEST_MAC, hop=255),
        "ndp-guest-router-advertisement",
    )
    server = udp6(other_ll, GUEST_LL, 547, 546, b"\x07\0\0\1")
    assert_dropped(
        stack, frame6(other_ll, GUEST_LL, 17, server, mac=GUEST2_MAC, dst_mac=GUEST_MAC), "dhcpv6-spoof-server"
    )
    assert take_frames(stack, 1) == []


def test_no_ipv6_only_switches_ipv6_frames() -> None:
    stack = make_stack(ipv6=False)
    rs = icmp6(GUEST_LL, a6("ff02::2"), 133, bytes(4))
    stack.frame_received(1, frame6(GUEST_LL, a6("ff02::2"), 58, rs, dst_mac=ALL_ROUTERS_MAC, hop=255), 0.0)
    assert take_frames(stack, 1) == [] and len(take_frames(stack, 2)) == 1  # flooded to the other guest only
    assert stack.counters.get("rx-ipv6-ignored") == 1 and stack.next_deadline() == float("inf")


def test_udp_forward_to_a_guests_ipv6_address_and_its_reply() -> None:
    stack = make_stack()
    stack.switch.learn(GUEST_MAC, 1)
    flow = stack.udp_forwards.open(GUEST_MAC, GUEST, 53, 0.0)
    assert stack.udp_forwards.to_guest(flow, b"question", 0.0)
    (frame,) = take_frames(stack)
    pkt = parsed(frame)
    assert (pkt.src, pkt.dst) == (GATEWAY, GUEST) and frame.endswith(b"question") and valid_l4(frame)
    port = struct.unpack("!H", frame[54:56])[0]
    stack.frame_received(1, frame6(GUEST, GATEWAY, 17, udp6(GUEST, GATEWAY, 53, port, b"answer")), 0.0)
    (op,) = take_ops(stack)
    assert (op.kind, op.flow, op.data) == (A.OP_UDP_FWD_REPLY, flow, b"answer")

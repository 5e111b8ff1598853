"""One guest cannot hurt another: spoofed ARP and IP, per-guest limits, the host-socket budget,
and the cleanup when a guest's QEMU goes away (core/guard.py, Stack)."""

import errno

import dpkt
import pytest

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core import tcp as T
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.core.tcp import CONNECT_TIMEOUT
from qemu_vpnnet.policy import guestfwd_rule, parse_guestfwd
from tests.guestframes import (
    BCAST,
    GUEST2_MAC,
    GUEST_MAC,
    GW_MAC,
    dhcp_frame,
    eth,
    ip,
    ip_frame,
    ipv4,
    parse,
    tcp_frame,
)

SYN = dpkt.tcp.TH_SYN
ACK = dpkt.tcp.TH_ACK
RST = dpkt.tcp.TH_RST
GUEST3_MAC = bytes.fromhex("525400777777")


def make_stack(**config: object) -> Stack:
    stack = Stack(NetConfig(**config))  # type: ignore[arg-type]
    for port in (1, 2, 3):
        stack.attach_port(port)
    return stack


def take(stack: Stack, port: int) -> list[bytes]:
    frames = stack.switch.out[port]
    stack.switch.out[port] = []
    return frames


def take_ops(stack: Stack) -> list[A.HostOp]:
    ops = list(stack.out.ops)
    stack.out.ops.clear()
    return ops


def lease(stack: Stack, mac: bytes, port: int, now: float = 0.0) -> str:
    stack.frame_received(port, dhcp_frame(mac, dpkt.dhcp.DHCPDISCOVER), now)
    offer = dpkt.dhcp.DHCP(parse(take(stack, port)[-1]).data.data.data)
    addr = ".".join(str(b) for b in offer.yiaddr.to_bytes(4, "big"))
    stack.frame_received(port, dhcp_frame(mac, dpkt.dhcp.DHCPREQUEST, requested=addr, server_id="10.0.2.2"), now)
    ack = dpkt.dhcp.DHCP(parse(take(stack, port)[-1]).data.data.data)
    assert dict(ack.opts)[53] == bytes((dpkt.dhcp.DHCPACK,))
    return addr


def arp(op: int, sender_mac: bytes, spa: str, tpa: str, eth_src: bytes | None = None, dst: bytes = BCAST) -> bytes:
    packet = dpkt.arp.ARP(op=op, sha=sender_mac, spa=ip(spa), tha=b"\x00" * 6 if op == 1 else dst, tpa=ip(tpa))
    return eth(dst, eth_src or sender_mac, dpkt.ethernet.ETH_TYPE_ARP, bytes(packet))


def udp_to(mac: bytes, src: str, dst: str, sport: int, dport: int, dst_mac: bytes = GW_MAC) -> bytes:
    seg = dpkt.udp.UDP(sport=sport, dport=dport, data=b"x")
    seg.ulen = 9
    return ip_frame(mac, dst_mac, ipv4(src, dst, dpkt.ip.IP_PROTO_UDP, seg))


def icmp_echo(mac: bytes, src: str, dst: str, dst_mac: bytes = GW_MAC, ident: int = 7) -> bytes:
    echo = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=ident, seq=1, data=b"ping"))
    return ip_frame(mac, dst_mac, ipv4(src, dst, dpkt.ip.IP_PROTO_ICMP, echo))


def two_guests() -> tuple[Stack, str, str]:
    """Guest A (GUEST_MAC) on port 1 and guest B (GUEST2_MAC) on port 2, both with leases;
    guest C (GUEST3_MAC) on port 3 hears what is switched."""
    stack = make_stack()
    a = lease(stack, GUEST_MAC, 1)
    b = lease(stack, GUEST2_MAC, 2)
    stack.frame_received(3, arp(1, GUEST3_MAC, "10.0.2.99", "10.0.2.2"), 0.0)  # C is learned on port 3
    for port in (1, 2, 3):
        take(stack, port)
    take_ops(stack)
    return stack, a, b


# ---- ARP ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claimed", "reason"),
    [("10.0.2.2", "gateway"), ("10.0.2.3", "dns"), ("10.0.2.15", "lease")],
)
@pytest.mark.parametrize("op", [1, 2])
def test_arp_claiming_an_address_of_someone_else_is_dropped_not_switched_not_learned(
    claimed: str, reason: str, op: int
) -> None:
    stack, a, b = two_guests()
    assert a == "10.0.2.15" and b == "10.0.2.16"
    # gratuitous: sender and target address the same, to everyone
    stack.frame_received(2, arp(op, GUEST2_MAC, claimed, claimed), 1.0)
    assert take(stack, 1) == [] and take(stack, 3) == [] and take(stack, 2) == []
    assert stack.counters.get(f"drop-arp-spoof-{reason}") == 1
    assert stack.out.mac_of(ip(claimed)) != GUEST2_MAC
    # and the switch did not learn B on a port it sent a forged claim from
    stack.frame_received(3, arp(2, GUEST2_MAC, claimed, "10.0.2.99", eth_src=GUEST3_MAC), 1.0)
    assert stack.counters.get(f"drop-arp-spoof-{reason}") == 2  # C naming B's MAC as the owner


def test_arp_for_a_guests_own_address_and_probes_pass() -> None:
    stack, a, b = two_guests()
    stack.frame_received(2, arp(2, GUEST2_MAC, b, b), 1.0)  # B announces its own lease
    assert len(take(stack, 1)) == 1 and len(take(stack, 3)) == 1
    stack.frame_received(2, arp(1, GUEST2_MAC, "0.0.0.0", a), 1.0)  # an RFC 5227 probe
    assert len(take(stack, 1)) == 1
    stack.frame_received(2, arp(1, GUEST2_MAC, "10.0.2.50", "10.0.2.2"), 1.0)  # an address nobody holds
    replies = [parse(f) for f in take(stack, 2)]
    assert replies and replies[0].data.sha == GW_MAC
    assert not any(k.startswith("drop-arp-spoof") for k in stack.counters.snapshot())


def test_arp_claiming_a_gateway_service_address_is_dropped() -> None:
    stack, _a, _b = two_guests()
    spec = parse_guestfwd("tcp:10.0.2.100:1234-tcp:127.0.0.1:5000")
    stack.fwd.add_guestfwd(guestfwd_rule(spec), ip("10.0.2.100"), 1234)
    stack.frame_received(2, arp(2, GUEST2_MAC, "10.0.2.100", "10.0.2.100"), 1.0)
    assert take(stack, 1) == [] and stack.counters.get("drop-arp-spoof-service") == 1
    stack.fwd.remove_guestfwd(6, ip("10.0.2.100"), 1234)
    stack.frame_received(2, arp(2, GUEST2_MAC, "10.0.2.100", "10.0.2.100"), 1.0)
    assert len(take(stack, 1)) == 1  # no service there any more: anyone's to take


def test_an_expired_lease_is_no_longer_protected() -> None:
    stack = make_stack(lease_time=60)
    a = lease(stack, GUEST_MAC, 1)
    stack.frame_received(2, arp(2, GUEST2_MAC, a, a), 30.0)
    assert take(stack, 1) == [] and stack.counters.get("drop-arp-spoof-lease") == 1
    stack.frame_received(2, arp(2, GUEST2_MAC, a, a), 61.0)
    assert len(take(stack, 1)) == 1


def test_dhcp_for_another_guests_mac_is_dropped() -> None:
    stack, a, _b = two_guests()
    frame = dhcp_frame(GUEST_MAC, dpkt.dhcp.DHCPDECLINE, requested=a)
    stack.frame_received(2, frame[:6] + GUEST2_MAC + frame[12:], 1.0)  # B declining A's address for it
    assert stack.counters.get("drop-dhcp-spoof-chaddr") == 1
    frame = dhcp_frame(GUEST_MAC, dpkt.dhcp.DHCPRELEASE, ciaddr=a)
    stack.frame_received(2, frame[:6] + GUEST2_MAC + frame[12:], 1.0)  # B releasing it, from its address
    assert stack.counters.get("drop-ip-spoof-lease") == 1
    assert stack.dhcp.bound_mac(ip(a), 1.0) == GUEST_MAC


# ---- IPv4 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "reason"), [("10.0.2.2", "gateway"), ("10.0.2.3", "dns"), ("10.0.2.15", "lease")])
def test_ip_from_an_address_of_someone_else_is_dropped_to_the_gateway_and_between_guests(src: str, reason: str) -> None:
    stack, _a, _b = two_guests()
    # to the gateway: no NAT flow, no host socket
    stack.frame_received(2, udp_to(GUEST2_MAC, src, "192.0.2.1", 5000, 53), 1.0)
    assert take_ops(stack) == [] and stack.counters.get(f"drop-ip-spoof-{reason}") == 1
    # switched to another guest (C at 10.0.2.99, known MAC): not delivered
    stack.frame_received(2, icmp_echo(GUEST2_MAC, src, "10.0.2.99", dst_mac=GUEST3_MAC), 1.0)
    assert take(stack, 3) == [] and stack.counters.get(f"drop-ip-spoof-{reason}") == 2
    # broadcast too
    stack.frame_received(2, udp_to(GUEST2_MAC, src, "10.0.2.255", 5000, 9, dst_mac=BCAST), 1.0)
    assert take(stack, 1) == [] and take(stack, 3) == []
    assert stack.counters.get(f"drop-ip-spoof-{reason}") == 3
    assert stack.out.mac_of(ip(src)) != GUEST2_MAC


def test_ip_from_its_own_or_a_free_address_passes() -> None:
    stack, a, b = two_guests()
    stack.frame_received(2, icmp_echo(GUEST2_MAC, b, "10.0.2.99", dst_mac=GUEST3_MAC), 1.0)
    stack.frame_received(2, icmp_echo(GUEST2_MAC, "10.0.2.77", "10.0.2.99", dst_mac=GUEST3_MAC), 1.0)
    stack.frame_received(1, udp_to(GUEST_MAC, a, "192.0.2.1", 5000, 53), 1.0)
    assert len(take(stack, 3)) == 2
    assert [op.kind for op in take_ops(stack)] == [A.OP_UDP_OPEN, A.OP_UDP_SEND]
    assert stack.counters.get("rx-dropped") == 0


# ---- per-guest limits -----------------------------------------------------------------------


def syn(stack: Stack, port: int, mac: bytes, src: str, sport: int, now: float = 0.0, dst: str = "192.0.2.1") -> None:
    stack.frame_received(port, tcp_frame(src, dst, sport, 80, 1000, 0, SYN, mac=mac), now)


def rsts(frames: list[bytes]) -> int:
    return sum(1 for f in frames if parse(f).data.data.flags & RST)


def test_pending_connects_per_guest_are_capped_with_rst_and_others_still_connect() -> None:
    stack, a, b = two_guests()
    stack.config.guest_max_pending = 3
    for sport in range(40000, 40005):
        syn(stack, 1, GUEST_MAC, a, sport)
    connects = [op for op in take_ops(stack) if op.kind == A.OP_TCP_CONNECT]
    assert len(connects) == 3
    assert rsts(take(stack, 1)) == 2 and stack.counters.get("tcp-refused-guest-pending") == 2
    syn(stack, 2, GUEST2_MAC, b, 40000)
    assert [op.kind for op in take_ops(stack)] == [A.OP_TCP_CONNECT]
    # one of A's connects completes: room for one more
    stack.tcp.host_connected(connects[0].flow, 0.1)
    syn(stack, 1, GUEST_MAC, a, 40010, 0.2)
    assert [op.kind for op in take_ops(stack)] == [A.OP_TCP_CONNECT]
    assert next(e for e in stack.out.events if e[0] == "GUEST_LIMIT")[1]["reason"] == "tcp-refused-guest-pending"


def test_connections_per_guest_are_capped() -> None:
    stack, a, _b = two_guests()
    stack.config.guest_max_tcp = 2
    for sport in (40000, 40001, 40002):
        syn(stack, 1, GUEST_MAC, a, sport)
    assert len([op for op in take_ops(stack) if op.kind == A.OP_TCP_CONNECT]) == 2
    assert stack.counters.get("tcp-refused-guest-connections") == 1


def close_from_the_host(stack: Stack, mac: bytes, src: str, sport: int, flow: int, now: float) -> None:
    """The host side of an established connection closes first (an HTTP server's Connection:
    close); the guest acknowledges our FIN and sends its own: the flow ends in TIME_WAIT."""
    stack.tcp.host_eof(flow, now)
    stack.flush(now)
    (fin,) = [parse(f).data.data for f in take(stack, 1)]
    assert fin.flags & dpkt.tcp.TH_FIN
    finack = dpkt.tcp.TH_FIN | ACK
    stack.frame_received(1, tcp_frame(src, "192.0.2.1", sport, 80, 1001, fin.seq + 1, finack, mac=mac), now)
    stack.flush(now)
    take(stack, 1)


def test_a_flow_in_time_wait_holds_no_host_socket_and_counts_for_no_limit() -> None:
    stack, a, _b = two_guests()
    stack.config.guest_max_tcp = 2
    stack.guard.set_budget(2)
    flows = []
    for sport in (40000, 40001):
        syn(stack, 1, GUEST_MAC, a, sport)
        (op,) = take_ops(stack)
        stack.tcp.host_connected(op.flow, 0.0)
        stack.flush(0.0)
        (synack,) = [parse(f).data.data for f in take(stack, 1)]
        stack.frame_received(1, tcp_frame(a, "192.0.2.1", sport, 80, 1001, synack.seq + 1, ACK), 0.0)
        flows.append(op.flow)
    assert stack.guard.sockets == 2
    for sport, flow in zip((40000, 40001), flows, strict=True):
        close_from_the_host(stack, GUEST_MAC, a, sport, flow, 0.1)
        assert stack.tcp.flows[flow].state == T.TIME_WAIT
    assert [op.kind for op in take_ops(stack)] == [A.OP_TCP_SHUTDOWN, A.OP_TCP_CLOSE] * 2
    # both host sockets are closed: the guest may open two more at once, within both limits
    assert stack.guard.sockets == 0
    for sport in (40002, 40003):
        syn(stack, 1, GUEST_MAC, a, sport, 0.2)
    assert [op.kind for op in take_ops(stack)] == [A.OP_TCP_CONNECT, A.OP_TCP_CONNECT]
    assert stack.counters.get("tcp-refused-guest-connections") == 0
    assert stack.counters.get("tcp-refused-no-fds") == 0 and stack.counters.get("fd-reclaimed") == 0
    assert stack.guard.sockets == 2
    # TIME_WAIT ends: the flows go, and the count of the two live ones stays
    stack.timer(5.0)
    assert all(flow not in stack.tcp.flows for flow in flows)
    assert stack.guard.sockets == 2 and len(stack.guard.usage(GUEST_MAC, 5.0).tcp) == 2


def test_new_flows_per_second_per_guest() -> None:
    stack, a, b = two_guests()
    stack.config.guest_new_flows = 10  # bursts of 20
    for sport in range(40000, 40025):
        syn(stack, 1, GUEST_MAC, a, sport, 0.0)
    assert stack.counters.get("tcp-refused-guest-rate") == 5
    syn(stack, 2, GUEST2_MAC, b, 40000, 0.0)  # B has its own bucket
    assert stack.counters.get("tcp-refused-guest-rate") == 5
    syn(stack, 1, GUEST_MAC, a, 40100, 0.5)  # half a second later: five tokens back
    assert stack.counters.get("tcp-refused-guest-rate") == 5
    for sport in range(41000, 41020):  # four tokens left; a UDP flow costs DATAGRAM_FLOW_TOKENS
        stack.frame_received(1, udp_to(GUEST_MAC, a, "192.0.2.1", sport, 53), 0.5)
    assert stack.counters.get("udp-refused-guest-rate") == 19
    for sport in range(42000, 42004):  # 1.6 s later: sixteen tokens, four UDP flows
        stack.frame_received(1, udp_to(GUEST_MAC, a, "192.0.2.1", sport, 53), 2.1)
    assert stack.counters.get("udp-refused-guest-rate") == 19
    stack.frame_received(1, udp_to(GUEST_MAC, a, "192.0.2.1", 42004, 53), 2.1)
    assert stack.counters.get("udp-refused-guest-rate") == 20


def test_udp_flows_per_guest_evict_that_guests_oldest() -> None:
    stack, a, b = two_guests()
    stack.udp.table.per_guest = 3
    stack.frame_received(2, udp_to(GUEST2_MAC, b, "192.0.2.1", 6000, 53), 0.0)
    for sport in range(5000, 5005):
        stack.frame_received(1, udp_to(GUEST_MAC, a, "192.0.2.1", sport, 53), 0.1 * (sport - 4999))
    ops = take_ops(stack)
    opened = [op.flow for op in ops if op.kind == A.OP_UDP_OPEN]
    closed = [op.flow for op in ops if op.kind == A.OP_UDP_CLOSE]
    assert closed == opened[1:3]  # A's two oldest; B's flow (opened[0]) stays
    assert stack.counters.get("udp-flows-evicted-guest-limit") == 2
    assert len(stack.udp.table.by_guest[GUEST_MAC]) == 3 and len(stack.udp.table.by_guest[GUEST2_MAC]) == 1


def test_half_open_connects_end_with_rst_and_abort_within_the_timeout() -> None:
    stack, a, _b = two_guests()
    syn(stack, 1, GUEST_MAC, a, 40000)
    flow = take_ops(stack)[0].flow
    assert CONNECT_TIMEOUT <= 127.0  # a Linux host's SYN budget (tcp_syn_retries 6)
    stack.timer(CONNECT_TIMEOUT + 0.01)
    ops = take_ops(stack)
    assert [(op.kind, op.flow) for op in ops] == [(A.OP_TCP_ABORT, flow)]
    assert rsts(take(stack, 1)) == 1
    assert stack.guard.sockets == 0 and stack.guard.guests[GUEST_MAC].pending == 0


# ---- the host-socket budget -----------------------------------------------------------------


def test_over_the_budget_a_guest_within_its_share_takes_a_socket_from_the_heaviest() -> None:
    stack, a, b = two_guests()
    stack.guard.set_budget(10)
    for sport in range(40000, 40020):
        syn(stack, 1, GUEST_MAC, a, sport)
    ops = take_ops(stack)
    assert len([op for op in ops if op.kind == A.OP_TCP_CONNECT]) == 10
    assert stack.counters.get("tcp-refused-no-fds") == 10  # A is the heaviest: its own are refused
    syn(stack, 2, GUEST2_MAC, b, 40000)
    ops = take_ops(stack)
    # B's connect goes ahead; A's oldest pending connect is reset to make room
    assert [op.kind for op in ops] == [A.OP_TCP_ABORT, A.OP_TCP_CONNECT]
    assert stack.counters.get("tcp-reclaimed") == 1 and stack.counters.get("fd-reclaimed") == 1
    assert stack.guard.sockets == 10
    assert len(stack.guard.guests[GUEST_MAC].tcp) == 9 and len(stack.guard.guests[GUEST2_MAC].tcp) == 1
    # UDP likewise
    stack.frame_received(2, udp_to(GUEST2_MAC, b, "192.0.2.1", 6000, 53), 0.0)
    assert [op.kind for op in take_ops(stack)] == [A.OP_TCP_ABORT, A.OP_UDP_OPEN, A.OP_UDP_SEND]


def test_emfile_from_the_kernel_frees_a_socket_of_the_heaviest_and_retries() -> None:
    stack, a, b = two_guests()
    for sport in range(40000, 40030):
        syn(stack, 1, GUEST_MAC, a, sport)
    first = take_ops(stack)[0].flow
    syn(stack, 2, GUEST2_MAC, b, 40000)
    mine = take_ops(stack)[0]
    stack.tcp.host_refused(mine.flow, errno.EMFILE, 0.1)
    ops = take_ops(stack)
    assert [(op.kind, op.flow) for op in ops] == [(A.OP_TCP_ABORT, first), (A.OP_TCP_CONNECT, mine.flow)]
    assert ops[1].addr == mine.addr and ops[1].port == mine.port
    # the heaviest itself gets no retry: its connect is refused
    stack.tcp.host_refused(first + 1, errno.EMFILE, 0.2)
    assert take_ops(stack) == [] and stack.counters.get("tcp-connect-failed") == 1
    assert stack.counters.get("tcp-connect-no-fds") == 2
    # the budget now holds at what the flows held: A's next connect is refused by it, not by the kernel
    assert stack.guard.sockets == 29 and stack.guard.fd_budget == 29
    syn(stack, 1, GUEST_MAC, a, 40100, 1.0)
    assert rsts(take(stack, 1)) >= 1 and stack.counters.get("tcp-refused-no-fds") == 1
    syn(stack, 1, GUEST_MAC, a, 40101, 40.0)  # BUDGET_HOLD later the configured budget is back
    assert [op.kind for op in take_ops(stack)][-1] == A.OP_TCP_CONNECT


# ---- a guest that goes away -----------------------------------------------------------------


def test_port_close_resets_the_flows_of_its_guests_toward_the_host() -> None:
    stack, a, b = two_guests()
    for sport in range(40000, 40005):
        syn(stack, 1, GUEST_MAC, a, sport)
    syn(stack, 2, GUEST2_MAC, b, 40000)
    stack.frame_received(1, udp_to(GUEST_MAC, a, "192.0.2.1", 5000, 53), 0.0)
    stack.frame_received(1, icmp_echo(GUEST_MAC, a, "192.0.2.1"), 0.0)
    forwarded = stack.tcp.connect_guest(GUEST_MAC, ip(a), 22, ip("10.0.2.2"), 49152, 0.0)
    fwd_udp = stack.udp_forwards.open(GUEST_MAC, ip(a), 53, 0.0)
    ops = take_ops(stack)
    tcp_a = [op.flow for op in ops if op.kind == A.OP_TCP_CONNECT][:5]
    udp_a = [op.flow for op in ops if op.kind == A.OP_UDP_OPEN]
    ping_a = [op.flow for op in ops if op.kind == A.OP_PING_SEND]
    for flow in tcp_a[:3]:
        stack.tcp.host_connected(flow, 0.1)
    for port in (1, 2):
        take(stack, port)
    take_ops(stack)
    closed = stack.detach_port(1)
    assert closed == {"tcp": 6, "udp": 1, "icmp": 1, "udp-forward": 1}
    ops = take_ops(stack)
    aborted = sorted(op.flow for op in ops if op.kind == A.OP_TCP_ABORT)
    assert aborted == sorted([*tcp_a, forwarded])
    assert [op.flow for op in ops if op.kind == A.OP_UDP_CLOSE] == udp_a
    assert [op.flow for op in ops if op.kind == A.OP_PING_CLOSE] == ping_a
    assert [op.flow for op in ops if op.kind == A.OP_UDP_FWD_CLOSE] == [fwd_udp]
    assert take(stack, 2) == []  # nothing toward the guest that stayed
    assert len(stack.tcp.flows) == 1  # B's
    assert stack.counters.get("guest-gone-tcp-closed") == 6 and stack.counters.get("guest-gone-udp-closed") == 1
    assert stack.guard.sockets == 1
    # the guest comes back on another port: it keeps its lease and connects again
    stack.attach_port(4)
    syn(stack, 4, GUEST_MAC, a, 41000)
    assert [op.kind for op in take_ops(stack)] == [A.OP_TCP_CONNECT]


def test_a_guest_that_moved_to_another_port_keeps_its_flows() -> None:
    stack, a, _b = two_guests()
    syn(stack, 1, GUEST_MAC, a, 40000)
    stack.attach_port(4)
    stack.frame_received(4, udp_to(GUEST_MAC, a, "192.0.2.1", 5000, 53), 0.0)  # now seen on port 4
    take_ops(stack)
    assert stack.detach_port(1) == {"tcp": 0, "udp": 0, "icmp": 0, "udp-forward": 0}
    assert take_ops(stack) == []

"""UDP NAT: each guest flow (guest address, guest port) gets one host UDP socket.

The first datagram of a flow opens the socket (OP_UDP_OPEN); every datagram is sent from it
(OP_UDP_SEND) to the host-side address of its destination (the gateway address is the host's
127.0.0.1 unless host loopback is off). The socket is connected to nothing, so replies from any
remote come back (NAT traversal) and reach the guest as from that remote; one from 127.0.0.1
appears as from the gateway address.

Each destination a flow sends to is routed once, at its first datagram (core/fwd.py): direct,
forwarded to a gateway service's host address, answered by a local service (DNS), or refused
with ICMP administratively prohibited (or silently). The flow keeps that decision for the
destination (at most MAX_DESTINATIONS per flow; the oldest is forgotten first), and maps the
host side's replies back to it. A datagram from a remote the flow never sent to is let in only
if the policy would send to it directly.

Flows close after `config.udp_idle_timeout` seconds without traffic either way (OP_UDP_CLOSE);
at most `config.max_udp_flows` are kept and the least recently used one is evicted first.

ICMP errors the host gets for a flow's datagrams (port unreachable when nobody listens, host
unreachable, ...) are passed to the guest, quoting the headers of its last datagram there.
"""

from collections.abc import Callable
from typing import Final, cast, final

from qemu_vpnnet.core.actions import OP_UDP_CLOSE, OP_UDP_OPEN, OP_UDP_SEND, HostOp
from qemu_vpnnet.core.config import ip_str
from qemu_vpnnet.core.flow_table import IdleFlow, IdleFlows, flow_key
from qemu_vpnnet.core.fwd import DIRECT, FORWARD, LOCAL, PROTO_UDP, REFUSE, REPLY_DROP, Route
from qemu_vpnnet.core.guard import DATAGRAM_FLOW_TOKENS
from qemu_vpnnet.core.icmp import ICMP_DEST_UNREACH, UNREACH_ADMIN, UNREACH_FRAG_NEEDED
from qemu_vpnnet.core.output import Output
from qemu_vpnnet.core.packets import IPPROTO_UDP, is_unicast_outside, udp_quote, udp_segment

UNREACH_PORT: Final = 3
MAX_DESTINATIONS: Final = 256  # routed destinations remembered per flow

# a local service's handler for one datagram: (src_mac, src, dst, sport, payload, now)
LocalHandler = Callable[[bytes, bytes, bytes, int, bytes, float], None]


def send_udp_to_guest(out: Output, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, data: bytes) -> None:
    """A UDP datagram to a guest, fragmented when it is larger than the guest's MTU."""
    out.send_ip_fragmented(dst_mac, src, dst, IPPROTO_UDP, udp_segment(src, dst, sport, dport, data))


@final
class UdpDestination:
    """One destination of a flow, as the guest sees it, where it goes on the host, and its route."""

    __slots__ = ("dport", "dst", "host_addr", "host_port", "route")

    def __init__(self, dst: bytes, dport: int, host_addr: str, host_port: int, route: Route) -> None:
        self.dst = dst
        self.dport = dport
        self.host_addr = host_addr
        self.host_port = host_port
        self.route = route


@final
class UdpFlow(IdleFlow):
    """One guest (address, port) and its host socket."""

    def __init__(self, flow_id: int, key: int, guest_mac: bytes, guest_ip: bytes, guest_port: int, now: float) -> None:
        super().__init__(flow_id, key, now, guest_mac)
        self.guest_mac = guest_mac
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.last_dst = b""  # guest-visible destination of the last datagram from the guest
        self.last_addr = ""  # its host-side address
        self.last_port = 0
        self.last_len = 0  # its payload length (for ICMP error quotes)
        self.bytes_out = 0  # guest -> host
        self.bytes_in = 0  # host -> guest
        self.packets_out = 0
        self.packets_in = 0
        self.destinations: dict[int, UdpDestination] = {}  # flow_key(dst, dport) -> destination
        self.by_host: dict[tuple[str, int], UdpDestination] = {}  # (host addr, port) -> destination
        self.last_route: Route | None = None

    def remember(self, key: int, dest: UdpDestination) -> None:
        destinations = self.destinations
        if len(destinations) >= MAX_DESTINATIONS:
            oldest_key = next(iter(destinations))
            oldest = destinations.pop(oldest_key)
            if self.by_host.get((oldest.host_addr, oldest.host_port)) is oldest:
                del self.by_host[(oldest.host_addr, oldest.host_port)]
        destinations[key] = dest
        self.by_host[(dest.host_addr, dest.host_port)] = dest


@final
class UdpNat:
    def __init__(self, out: Output) -> None:
        self.out = out
        # keyed by flow_key(address, port)
        self.table = IdleFlows(out, OP_UDP_CLOSE, "udp", out.config.max_udp_flows, out.config.guest_max_udp)
        self.local_services: dict[str, LocalHandler] = {}  # LOCAL routes by service name (Stack sets "dns")

    # ---- guest side --------------------------------------------------------------------
    def from_guest(
        self, src_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, now: float
    ) -> None:
        """A datagram from a guest to anything but the DHCP and DNS services.

        IPv6 (16-byte addresses): the Stack checked that src is in the guests' prefix."""
        out = self.out
        cfg = out.config
        if len(src) == 16:
            if sport == 0:
                out.drop("udp-bad-source")
                return
            if not is_unicast_outside(dst):
                out.drop("udp-broadcast")
                return
        else:
            if not cfg.contains(src) or src == cfg.net_addr or src == cfg.broadcast or sport == 0:
                out.drop("udp-bad-source")
                return
            if dst == cfg.broadcast or not is_unicast_outside(dst):
                out.drop("udp-broadcast")
                return
        if dport == 0:
            out.drop("udp-port-zero")
            return
        key = flow_key(src, sport)
        known = self.table.by_key.get(key)
        dest_key = flow_key(dst, dport)
        if known is not None:
            flow = cast(UdpFlow, known)
            dest = flow.destinations.get(dest_key)
            if dest is None:
                dest = self.new_destination(src_mac, src, dst, sport, dport, payload, now)
                if dest is None:
                    return
                flow.remember(dest_key, dest)
            self.table.touch(flow, now)
        else:
            dest = self.new_destination(src_mac, src, dst, sport, dport, payload, now)
            if dest is None or not self.guest_may_open(src_mac, now):
                return
            flow = UdpFlow(self.table.new_id(), key, src_mac, src, sport, now)
            flow.remember(dest_key, dest)
            self.table.insert(flow)
            out.op(HostOp(OP_UDP_OPEN, flow.id, "::" if len(src) == 16 else ""))
        flow.guest_mac = src_mac
        flow.last_dst = dst
        flow.last_addr = dest.host_addr
        flow.last_port = dport
        flow.last_len = len(payload)
        flow.last_route = dest.route
        flow.bytes_out += len(payload)
        flow.packets_out += 1
        out.op(HostOp(OP_UDP_SEND, flow.id, addr=dest.host_addr, port=dest.host_port, data=payload))

    def guest_may_open(self, mac: bytes, now: float) -> bool:
        """Per-guest limits for a new flow (core/guard.py): its new-flow rate, and a host socket
        within the budget (taken from a guest that holds more, or its own oldest flow). Its own
        flow limit is kept by the table (its oldest flow is evicted)."""
        guard = self.out.guard
        usage = guard.usage(mac, now)
        if not guard.allow_new_flow(usage, now, DATAGRAM_FLOW_TOKENS):
            guard.refuse("udp-refused-guest-rate", mac, now)
            return False
        if not guard.need_socket(usage, now) and not self.table.evict_oldest_of(mac):
            guard.refuse("udp-refused-no-fds", mac, now)
            return False
        return True

    def new_destination(
        self, src_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, now: float
    ) -> UdpDestination | None:
        """Route a destination new to its flow; None when the datagram was refused or answered here."""
        out = self.out
        route = out.fwd.route_from_guest(PROTO_UDP, dst, dport)
        kind = route.kind
        if kind == DIRECT:
            return UdpDestination(dst, dport, out.config.host_side_address(dst), dport, route)
        if kind == FORWARD:
            return UdpDestination(dst, dport, route.addr, route.port, route)
        if kind == LOCAL:
            handler = self.local_services.get(route.path)
            if handler is None:
                out.drop("udp-no-service")
            else:
                handler(src_mac, src, dst, sport, payload, now)
            return None
        if kind == REFUSE:
            if route.rule == "virtual":
                out.drop("udp-no-route")
                return None
            out.counters.add("udp-refused-policy")
            if route.reply != REPLY_DROP:
                quote = udp_quote(src, dst, sport, dport, len(payload))
                out.send_icmp_error(src_mac, src, dst, ICMP_DEST_UNREACH, UNREACH_ADMIN, quote)
        return None

    def flow_by_id(self, flow_id: int) -> UdpFlow | None:
        flow = self.table.by_id.get(flow_id)
        return None if flow is None else cast(UdpFlow, flow)

    # ---- host side ---------------------------------------------------------------------
    def host_datagram(self, flow_id: int, data: bytes, addr: str, port: int, now: float) -> None:
        """A datagram the flow's host socket received from addr:port."""
        out = self.out
        flow = self.flow_by_id(flow_id)
        if flow is None:
            out.counters.add("udp-late-datagram")
            return
        dest = flow.by_host.get((addr, port))
        if dest is not None:
            src = dest.dst
            port = dest.dport
        else:  # a remote the flow never sent to (NAT traversal): only what the policy lets through
            src = out.fwd.guest_visible_source(addr)
            if len(src) != len(flow.guest_ip):  # b"" (not a source from outside), or the other family
                out.counters.add("udp-reply-bad-source")
                return
            if out.fwd.decide(PROTO_UDP, src, port).kind != DIRECT:
                out.counters.add("udp-reply-refused-policy")
                return
        self.table.touch(flow, now)
        flow.bytes_in += len(data)
        flow.packets_in += 1
        send_udp_to_guest(out, flow.guest_mac, src, flow.guest_ip, port, flow.guest_port, data)

    def host_error(self, flow_id: int, addr: str, port: int, icmp_type: int, code: int, info: int, now: float) -> None:
        """The host got an ICMP error about a datagram the flow sent to addr:port.

        addr "" means the shell does not know where the datagram went: the flow's last
        destination is assumed. Port unreachable is type 3 code 3; info is the next-hop MTU
        for "fragmentation needed".
        """
        flow = self.flow_by_id(flow_id)
        if flow is None or not flow.last_dst:
            return
        dest = flow.by_host.get((addr, port)) if addr else None
        if not addr or (dest is not None and dest.dst == flow.last_dst and dest.dport == flow.last_port):
            dst = flow.last_dst
            port = flow.last_port
            length = flow.last_len
        elif dest is not None:
            dst = dest.dst
            port = dest.dport
            length = 0
        else:
            dst = self.out.fwd.guest_visible_source(addr)
            length = 0
            if len(dst) != len(flow.guest_ip):
                return
        self.out.counters.add("udp-icmp-errors")
        quote = udp_quote(flow.guest_ip, dst, flow.guest_port, port, length)
        mtu = info if icmp_type == ICMP_DEST_UNREACH and code == UNREACH_FRAG_NEEDED else 0
        self.out.send_icmp_error(flow.guest_mac, flow.guest_ip, dst, icmp_type, code, quote, mtu)

    def host_refused(self, flow_id: int, now: float) -> None:
        """ECONNREFUSED on the flow's socket without details: port unreachable from its last peer."""
        self.host_error(flow_id, "", 0, ICMP_DEST_UNREACH, UNREACH_PORT, 0, now)

    def host_failed(self, flow_id: int, now: float) -> None:
        """The shell could not open the flow's socket: forget the flow (nothing to close)."""
        flow = self.flow_by_id(flow_id)
        if flow is not None:
            self.table.forget(flow)
            self.out.counters.add("udp-open-failed")

    # ---- flows -------------------------------------------------------------------------
    def timer(self, now: float) -> None:
        self.table.expire(now)

    def next_deadline(self) -> float:
        return self.table.next_deadline()

    def flows(self, now: float) -> list[dict[str, object]]:
        """The open UDP flows, for query-connections."""
        result: list[dict[str, object]] = []
        for known in self.table.by_key.values():
            flow = cast(UdpFlow, known)
            result.append(
                {
                    "protocol": "udp",
                    "guest-address": ip_str(flow.guest_ip),
                    "guest-port": flow.guest_port,
                    "remote-address": ip_str(flow.last_dst),
                    "remote-port": flow.last_port,
                    "host-address": flow.last_addr,
                    "route": flow.last_route.describe() if flow.last_route is not None else "direct",
                    "rule": flow.last_route.rule if flow.last_route is not None else "",
                    "bytes-out": flow.bytes_out,
                    "bytes-in": flow.bytes_in,
                    "packets-out": flow.packets_out,
                    "packets-in": flow.packets_in,
                    "age": now - flow.created,
                    "idle": now - flow.last_active,
                }
            )
        return result

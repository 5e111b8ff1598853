"""ICMP: guest echo requests to the outside through unprivileged ping sockets, and ICMP errors.

Each (guest address, echo identifier) pair is one flow with one host ping socket
(`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`). The kernel rewrites the identifier of what a
ping socket sends to the socket's own number, so replies get the guest's identifier back (and a
new checksum) before they go to the guest. Flows close after `config.udp_idle_timeout` seconds
idle; at most MAX_PING_FLOWS are kept, the least recently used is evicted first.

Echo requests to the gateway and DNS addresses never get here: the Stack answers them.

When the host refuses ping sockets (net.ipv4.ping_group_range), the shell calls unavailable():
echo requests to the outside are then dropped (counted) for PING_RETRY seconds, after which
the next request tries again.

IPv6 works the same way: an ICMPv6 echo request (type 128) of an IPv6 guest goes out through an
IPv6 ping socket (`socket(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6)`; the shell opens it for a
flow whose host address is IPv6), its reply (type 129) comes back with the checksum over the
IPv6 pseudo-header redone. The flows of both families share one table; their keys differ.
"""

from typing import Final, cast, final

from qemu_vpnnet.core.actions import OP_PING_CLOSE, OP_PING_SEND, HostOp
from qemu_vpnnet.core.checksum import checksum, finish, pseudo_header_sum, sum16
from qemu_vpnnet.core.config import ip_str
from qemu_vpnnet.core.flow_table import IdleFlow, IdleFlows, flow_key
from qemu_vpnnet.core.fwd import DIRECT, PROTO_ICMP, REFUSE, REPLY_DROP
from qemu_vpnnet.core.output import Output
from qemu_vpnnet.core.packets import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    icmp_message,
    icmpv6_message,
    ip_quote,
)

MAX_PING_FLOWS: Final = 1024
PING_RETRY: Final = 60.0  # seconds without trying ping sockets after the host refused them

ICMP_ECHO_REPLY: Final = 0
ICMP_DEST_UNREACH: Final = 3
ICMP_ECHO_REQUEST: Final = 8
ICMP_TIME_EXCEEDED: Final = 11
ICMP_PARAMETER_PROBLEM: Final = 12
UNREACH_FRAG_NEEDED: Final = 4
UNREACH_ADMIN: Final = 13  # communication administratively prohibited (RFC 1812)
ICMP6_ECHO_REQUEST: Final = 128
ICMP6_ECHO_REPLY: Final = 129


def icmp6_valid(src: bytes, dst: bytes, message: bytes) -> bool:
    """Whether an ICMPv6 message's checksum (over the IPv6 pseudo-header) is right."""
    return finish(sum16(message, pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(message)))) == 0


@final
class PingFlow(IdleFlow):
    """One guest's echo identifier, mapped to one host ping socket."""

    def __init__(self, flow_id: int, key: int, guest_mac: bytes, guest_ip: bytes, ident: int, now: float) -> None:
        super().__init__(flow_id, key, now, guest_mac)
        self.guest_mac = guest_mac
        self.guest_ip = guest_ip
        self.ident = ident
        self.last_dst = b""  # guest-visible destination of the last request
        self.last_addr = ""  # its host-side address
        self.requests = 0
        self.replies = 0


@final
class IcmpProxy:
    def __init__(self, out: Output) -> None:
        self.out = out
        # keyed by flow_key(address, echo identifier)
        self.table = IdleFlows(out, OP_PING_CLOSE, "icmp", MAX_PING_FLOWS, out.config.guest_max_udp)
        self.unavailable_until = -1.0

    # ---- guest side --------------------------------------------------------------------
    def from_guest(self, src_mac: bytes, src: bytes, dst: bytes, message: bytes, now: float) -> None:
        """An ICMP message from a guest to an address that is not virtual."""
        out = self.out
        cfg = out.config
        if len(src) == 16:  # the Stack checked type 128 and the checksum, and that src is in the prefix
            v6 = True
        else:
            v6 = False
            if message[0] != ICMP_ECHO_REQUEST:
                out.drop("icmp-type")
                return
            if checksum(message) != 0:
                out.drop("bad-icmp-checksum")
                return
            if not cfg.contains(src) or src == cfg.net_addr or src == cfg.broadcast:
                out.drop("icmp-bad-source")
                return
        ident = (message[4] << 8) | message[5]
        key = flow_key(src, ident)
        known = self.table.by_key.get(key)
        if known is None or cast(PingFlow, known).last_dst != dst:  # a new flow or destination: route it
            route = out.fwd.route_from_guest(PROTO_ICMP, dst, 0)
            if route.kind != DIRECT:
                if route.rule == "virtual" or route.kind != REFUSE:
                    out.drop("icmp-no-route")
                    return
                out.counters.add("icmp-refused-policy")
                if route.reply != REPLY_DROP:
                    quote = ip_quote(src, dst, IPPROTO_ICMPV6 if v6 else IPPROTO_ICMP, len(message)) + message[:8]
                    out.send_icmp_error(src_mac, src, dst, ICMP_DEST_UNREACH, UNREACH_ADMIN, quote)
                return
        addr = cfg.host_side_address(dst)
        if now < self.unavailable_until:
            out.drop("icmp-ping-unavailable")
            return
        if known is None:
            guard = out.guard
            usage = guard.usage(src_mac, now)
            if not guard.need_socket(usage, now) and not self.table.evict_oldest_of(src_mac):
                guard.refuse("icmp-refused-no-fds", src_mac, now)
                return
            flow = PingFlow(self.table.new_id(), key, src_mac, src, ident, now)
            self.table.insert(flow)
        else:
            flow = cast(PingFlow, known)
            self.table.touch(flow, now)
        flow.guest_mac = src_mac
        flow.last_dst = dst
        flow.last_addr = addr
        flow.requests += 1
        out.op(HostOp(OP_PING_SEND, flow.id, addr=addr, data=message))

    # ---- host side ---------------------------------------------------------------------
    def host_reply(self, flow_id: int, data: bytes, addr: str, now: float) -> None:
        """An echo reply (ICMP header and data, as a ping socket reads it) from addr."""
        flow = self.flow_by_id(flow_id)
        out = self.out
        if flow is None:
            out.counters.add("icmp-late-reply")
            return
        v6 = len(flow.guest_ip) == 16
        if len(data) < 8 or data[0] != (ICMP6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY):
            out.counters.add("icmp-reply-ignored")
            return
        src = flow.last_dst if addr == flow.last_addr else out.fwd.guest_visible_source(addr)
        if not src or len(src) != len(flow.guest_ip):
            out.counters.add("icmp-reply-ignored")
            return
        self.table.touch(flow, now)
        flow.replies += 1
        ident = flow.ident
        rest = bytes(((ident >> 8) & 0xFF, ident & 0xFF)) + data[6:]
        if v6:
            message = icmpv6_message(src, flow.guest_ip, ICMP6_ECHO_REPLY, data[1], rest)
            out.send_ip_fragmented(flow.guest_mac, src, flow.guest_ip, IPPROTO_ICMPV6, message)
        else:
            message = icmp_message(ICMP_ECHO_REPLY, data[1], rest)
            out.send_ip_fragmented(flow.guest_mac, src, flow.guest_ip, IPPROTO_ICMP, message)

    def host_error(
        self, flow_id: int, addr: str, icmp_type: int, code: int, info: int, original: bytes, now: float
    ) -> None:
        """The host got an ICMP error about an echo request this flow sent to addr.

        original is the echo request as the ping socket sent it (the error queue's payload).
        The guest gets the same error, quoting its own request.
        """
        flow = self.flow_by_id(flow_id)
        if flow is None:
            return
        dst = flow.last_dst if addr == flow.last_addr else self.out.fwd.guest_visible_source(addr)
        if not dst or len(dst) != len(flow.guest_ip):
            return
        v6 = len(dst) == 16
        if len(original) < 8:
            original = bytes((ICMP6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST, 0, 0, 0, 0, 0, 0, 0))
        ident = flow.ident
        echo = original[:4] + bytes(((ident >> 8) & 0xFF, ident & 0xFF)) + original[6:8]
        quoted = ip_quote(flow.guest_ip, dst, IPPROTO_ICMPV6 if v6 else IPPROTO_ICMP, len(original)) + echo
        mtu = info if icmp_type == ICMP_DEST_UNREACH and code == UNREACH_FRAG_NEEDED else 0
        self.out.send_icmp_error(flow.guest_mac, flow.guest_ip, dst, icmp_type, code, quoted, mtu)

    def host_failed(self, flow_id: int, now: float) -> None:
        """The shell could not open a ping socket for the flow (out of descriptors, ...)."""
        flow = self.flow_by_id(flow_id)
        if flow is not None:
            self.table.forget(flow)
            self.out.counters.add("icmp-open-failed")

    def unavailable(self, now: float) -> None:
        """The host refuses ping sockets: drop echo requests to the outside for PING_RETRY s."""
        self.unavailable_until = now + PING_RETRY
        for flow in list(self.table.by_key.values()):
            self.table.forget(flow)

    # ---- flows -------------------------------------------------------------------------
    def flow_by_id(self, flow_id: int) -> PingFlow | None:
        flow = self.table.by_id.get(flow_id)
        return None if flow is None else cast(PingFlow, flow)

    def timer(self, now: float) -> None:
        self.table.expire(now)

    def next_deadline(self) -> float:
        return self.table.next_deadline()

    def flows(self, now: float) -> list[dict[str, object]]:
        """The open ping flows, for query-connections."""
        result: list[dict[str, object]] = []
        for known in self.table.by_key.values():
            flow = cast(PingFlow, known)
            result.append(
                {
                    "protocol": "icmp",
                    "guest-address": ip_str(flow.guest_ip),
                    "echo-id": flow.ident,
                    "remote-address": ip_str(flow.last_dst) if flow.last_dst else "",
                    "host-address": flow.last_addr,
                    "route": "direct",  # only direct echoes make a flow (refused ones are answered at once)
                    "requests": flow.requests,
                    "replies": flow.replies,
                    "age": now - flow.created,
                    "idle": now - flow.last_active,
                }
            )
        return result

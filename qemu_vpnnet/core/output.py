"""What every protocol module writes to: frames toward guests, host ops, events, counters."""

from typing import Final, final

from qemu_vpnnet.core.actions import Counters, HostOp
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.fwd import RouteTable
from qemu_vpnnet.core.guard import Guard
from qemu_vpnnet.core.packets import (
    IP6_HLEN,
    IP_HLEN,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    build_ipv4_frame,
    build_ipv6_frame,
    icmp_message,
    icmpv6_message,
    ipv4_fragments,
    ipv6_fragments,
    udp_segment,
)
from qemu_vpnnet.core.switch import Switch

MAX_GUEST_HOSTS: Final = 4096
MAX_QUOTE: Final = 548  # 576 - IP header - ICMP header (RFC 1812 4.3.2.3)
MAX_QUOTE6: Final = 1232  # 1280 - IPv6 header - ICMPv6 header (RFC 4443 2.4 (c))
MIN_MTU6: Final = 1280  # IPv6's minimum link MTU (RFC 8200 5)


def icmp4_as_icmp6(icmp_type: int, code: int) -> tuple[int, int]:
    """The ICMPv6 (type, code) of an ICMPv4 error (RFC 4443 against RFC 792); (-1, 0) when
    there is none (the engines and the shell speak ICMPv4 numbers for both families)."""
    if icmp_type == 3:  # destination unreachable
        if code == 4:
            return 2, 0  # fragmentation needed: packet too big
        if code == 3:
            return 1, 4  # port unreachable
        if code == 13 or code == 9 or code == 10:
            return 1, 1  # administratively prohibited
        if code == 0 or code == 6:
            return 1, 0  # no route to destination
        return 1, 3  # address unreachable
    if icmp_type == 11:
        return 3, code & 1  # time exceeded: hop limit, or reassembly
    if icmp_type == 12:
        return 4, 0  # parameter problem: erroneous header field
    return -1, 0


@final
class Output:
    """Shared sinks of the core. The shell drains `switch.out`, `ops` and `events` in place."""

    def __init__(self, config: NetConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.switch = Switch(config.gateway_mac, self.counters)
        self.ops: list[HostOp] = []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.guard = Guard(config, self.counters, self.events)  # address owners, per-guest limits
        self.fwd = RouteTable(config, self.guard.owners)  # the route of every new guest flow (core/fwd.py)
        self.guest_macs: dict[bytes, bytes] = {}  # guest IPv4 or IPv6 address -> MAC, learned from traffic
        self.ip_ident = 0
        self.ip6_ident = 0  # fragment identification of IPv6 packets we fragment

    def next_ident(self) -> int:
        self.ip_ident = (self.ip_ident + 1) & 0xFFFF
        return self.ip_ident

    def send_frame(self, dst_mac: bytes, frame: bytes) -> None:
        counters = self.counters
        counters.tx_frames += 1
        counters.tx_bytes += len(frame)
        self.switch.send(dst_mac, frame)

    def send_ip(self, dst_mac: bytes, src: bytes, dst: bytes, proto: int, l4: bytes) -> None:
        """An IP packet from a virtual or remote address (src) to a guest (dst at dst_mac):
        IPv4 for 4-byte addresses, IPv6 (hop limit 64) for 16-byte ones."""
        if len(dst) == 16:
            frame = build_ipv6_frame(dst_mac, self.config.gateway_mac, src, dst, proto, l4)
        else:
            frame = build_ipv4_frame(dst_mac, self.config.gateway_mac, src, dst, proto, l4, self.next_ident())
        self.send_frame(dst_mac, frame)

    def send_ip6(self, dst_mac: bytes, src: bytes, dst: bytes, next_header: int, l4: bytes, hop_limit: int) -> None:
        """An IPv6 packet with a given hop limit (255 for Neighbor Discovery, RFC 4861)."""
        frame = build_ipv6_frame(dst_mac, self.config.gateway_mac, src, dst, next_header, l4, hop_limit)
        self.send_frame(dst_mac, frame)

    def send_udp(self, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> None:
        self.send_ip(dst_mac, src, dst, IPPROTO_UDP, udp_segment(src, dst, sport, dport, payload))

    def send_ip_fragmented(self, dst_mac: bytes, src: bytes, dst: bytes, proto: int, l4: bytes) -> None:
        """Send an IP packet to a guest, as fragments when it does not fit the guest's MTU
        (IPv6 fragments when dst is 16 bytes)."""
        mtu = self.config.mtu
        if len(dst) == 16:
            if IP6_HLEN + len(l4) <= mtu:
                self.send_ip(dst_mac, src, dst, proto, l4)
                return
            self.counters.add("tx-fragmented")
            self.ip6_ident = (self.ip6_ident + 1) & 0xFFFFFFFF
            gateway = self.config.gateway_mac
            for frame in ipv6_fragments(dst_mac, gateway, src, dst, proto, l4, self.ip6_ident, max(mtu, MIN_MTU6)):
                self.send_frame(dst_mac, frame)
            return
        if IP_HLEN + len(l4) <= mtu:
            self.send_ip(dst_mac, src, dst, proto, l4)
            return
        self.counters.add("tx-fragmented")
        for frame in ipv4_fragments(dst_mac, self.config.gateway_mac, src, dst, proto, l4, self.next_ident(), mtu):
            self.send_frame(dst_mac, frame)

    def send_icmp_error(
        self,
        guest_mac: bytes,
        guest_ip: bytes,
        src: bytes,
        icmp_type: int,
        code: int,
        quoted: bytes,
        mtu: int = 0,
    ) -> None:
        """Send an ICMP error (destination unreachable, time exceeded, ...) from src to a guest.

        icmp_type and code are ICMPv4's; toward an IPv6 guest (16-byte guest_ip) the ICMPv6
        equivalent is sent (icmp4_as_icmp6). quoted is the start of the guest's offending
        packet: its IP header and at least 8 bytes after it (more is kept, up to 548 bytes for
        IPv4 and 1232 for IPv6). mtu is the next-hop MTU for "fragmentation needed" (type 3
        code 4: ICMPv6 packet too big), else 0.
        """
        if len(guest_ip) == 16:
            type6, code6 = icmp4_as_icmp6(icmp_type, code)
            if type6 < 0:
                return
            rest = (mtu if type6 == 2 else 0).to_bytes(4, "big") + quoted[:MAX_QUOTE6]
            self.counters.add("icmp-errors-sent")
            self.send_ip(guest_mac, src, guest_ip, IPPROTO_ICMPV6, icmpv6_message(src, guest_ip, type6, code6, rest))
            return
        rest = bytes((0, 0, (mtu >> 8) & 0xFF, mtu & 0xFF)) + quoted[:MAX_QUOTE]
        self.counters.add("icmp-errors-sent")
        self.send_ip(guest_mac, src, guest_ip, IPPROTO_ICMP, icmp_message(icmp_type, code, rest))

    def op(self, op: HostOp) -> None:
        self.ops.append(op)

    def event(self, name: str, data: dict[str, object]) -> None:
        self.events.append((name, data))

    def drop(self, reason: str) -> None:
        self.counters.add("rx-dropped")
        self.counters.add("drop-" + reason)

    def mac_of(self, guest_ip: bytes) -> bytes | None:
        return self.guest_macs.get(guest_ip)

    def remember_guest(self, addr: bytes, mac: bytes) -> None:
        if self.guest_macs.get(addr) != mac:
            if len(self.guest_macs) >= MAX_GUEST_HOSTS and addr not in self.guest_macs:
                del self.guest_macs[next(iter(self.guest_macs))]
            self.guest_macs[addr] = mac

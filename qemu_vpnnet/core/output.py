"""What every protocol module writes to: frames toward guests, host ops, events, counters."""

from typing import Final, final

from qemu_vpnnet.core.actions import Counters, HostOp
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.fwd import RouteTable
from qemu_vpnnet.core.guard import Guard
from qemu_vpnnet.core.packets import IPPROTO_UDP, build_ipv4_frame, build_ipv6_frame, udp_segment
from qemu_vpnnet.core.switch import Switch

MAX_GUEST_HOSTS: Final = 4096


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

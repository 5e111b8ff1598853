"""The virtual network's settings, with QEMU `-netdev user` defaults."""

import ipaddress
import socket
from typing import Final, final

DEFAULT_NET: Final = "10.0.2.0/24"
DEFAULT_PREFIX6: Final = "fec0::/64"  # QEMU's -netdev user ipv6-prefix
DEFAULT_MTU: Final = 1500
MIN_MTU: Final = 576
MAX_MTU: Final = 65520
GATEWAY_MAC: Final = b"\x52\x55\x0a\x00\x02\x02"
# per-guest limits (core/guard.py): a quarter of the global caps for connections and UDP flows;
# 1024 connects pending at once (a browser or a build keeps tens; the bench's 10,000 idle
# connections are opened 256 at a time); 20,000 new flows per second (bursts of 40,000) are well
# above the ~8,000 connections/s (wrk, Connection: close) and the 10,000 idle connections in
# 0.9 s one guest reaches here: a load test in a guest must not meet RSTs of ours
GUEST_MAX_TCP: Final = 16384
GUEST_MAX_PENDING: Final = 1024
GUEST_MAX_UDP: Final = 1024
GUEST_NEW_FLOWS: Final = 20000


ROUTER_LL: Final = b"\xfe\x80" + bytes(13) + b"\x02"  # fe80::2, the gateway's link-local address (as libslirp's)
IP6_LOOPBACK: Final = bytes(15) + b"\x01"


def ip_bytes(text: str) -> bytes:
    """4 bytes of a dotted IPv4 address; ValueError when malformed."""
    return socket.inet_aton(str(ipaddress.IPv4Address(text)))


def ip_str(addr: bytes) -> str:
    """Dotted IPv4 or compressed IPv6 text of a 4- or 16-byte address."""
    if len(addr) == 16:
        return socket.inet_ntop(socket.AF_INET6, addr)
    return socket.inet_ntoa(addr)


def ip6_bytes(text: str) -> bytes:
    """16 bytes of an IPv6 address (brackets allowed); ValueError when malformed."""
    return ipaddress.IPv6Address(text.strip("[]")).packed


def any_ip_bytes(text: str) -> bytes:
    """4 or 16 bytes of an IPv4 or IPv6 address (brackets allowed); ValueError when malformed."""
    return ipaddress.ip_address(text.strip("[]")).packed


def ip_int(addr: bytes) -> int:
    return int.from_bytes(addr, "big")


def int_ip(value: int) -> bytes:
    return (value & 0xFFFFFFFF).to_bytes(4, "big")


@final
class NetConfig:
    """Addresses of the virtual network; all checked for consistency at construction."""

    def __init__(
        self,
        net: str = DEFAULT_NET,
        host: str | None = None,
        dns: str | None = None,
        dhcp_start: str | None = None,
        mtu: int = DEFAULT_MTU,
        lease_time: int = 86400,
        domain: str = "",
        search: list[str] | None = None,
        static_leases: dict[bytes, bytes] | None = None,
        host_loopback: bool = True,
        host_names: list[str] | None = None,
        udp_idle_timeout: float = 60.0,
        max_udp_flows: int = 4096,
        max_tcp_flows: int = 65536,
        guest_max_tcp: int = GUEST_MAX_TCP,
        guest_max_pending: int = GUEST_MAX_PENDING,
        guest_max_udp: int = GUEST_MAX_UDP,
        guest_new_flows: int = GUEST_NEW_FLOWS,
        ipv6: bool = True,
        prefix6: str = DEFAULT_PREFIX6,
        host6: str | None = None,
        dns6: str | None = None,
        dhcpv6: bool = False,
    ) -> None:
        try:
            network = ipaddress.IPv4Network(net, strict=False)
        except ValueError as exc:
            raise ValueError(f"--net {net!r} is not an IPv4 network (ADDRESS/PREFIX): {exc}") from exc
        if network.prefixlen > 29:
            raise ValueError(f"network {net} is too small: at most /29")
        self.network: ipaddress.IPv4Network = network
        self.net_addr: bytes = network.network_address.packed
        self.prefix: int = network.prefixlen
        self.netmask: bytes = network.netmask.packed
        self.broadcast: bytes = network.broadcast_address.packed
        self.net_int: int = int(network.network_address)
        self.mask_int: int = int(network.netmask)
        base = int(network.network_address)
        self.host_ip: bytes = self._inside(host, base + 2, "host")
        self.dns_ip: bytes = self._inside(dns, base + 3, "dns")
        self.dhcp_start: bytes = self._inside(
            dhcp_start, base + 15 if network.prefixlen <= 27 else base + 4, "dhcp-start"
        )
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} is out of range {MIN_MTU}..{MAX_MTU}")
        self.mtu: int = mtu
        if lease_time < 2:
            raise ValueError(f"--lease-time {lease_time}: at least 2 seconds")
        self.lease_time: int = lease_time
        self.domain: str = domain
        self.search: list[str] = list(search) if search else []
        self.static_leases: dict[bytes, bytes] = dict(static_leases) if static_leases else {}
        for mac, addr in self.static_leases.items():
            if not self.contains(addr) or addr in (self.host_ip, self.dns_ip, self.net_addr, self.broadcast):
                raise ValueError(f"static lease {ip_str(addr)} for {mac.hex(':')} is not a usable address of {net}")
        self.host_loopback: bool = host_loopback
        self.host_names: list[str] = ["host.internal"] + [n.lower().rstrip(".") for n in (host_names or [])]
        self.gateway_mac: bytes = GATEWAY_MAC
        self.udp_idle_timeout: float = udp_idle_timeout
        self.max_udp_flows: int = max_udp_flows
        self.max_tcp_flows: int = max_tcp_flows
        # per guest (MAC) limits, core/guard.py; 0 means no limit
        for name, value in (
            ("guest-max-tcp", guest_max_tcp),
            ("guest-max-pending", guest_max_pending),
            ("guest-max-udp", guest_max_udp),
            ("guest-new-flows", guest_new_flows),
        ):
            if value < 0:
                raise ValueError(f"--{name} {value}: at least 0 (0: no limit)")
        self.guest_max_tcp: int = guest_max_tcp if guest_max_tcp else 1 << 40
        self.guest_max_pending: int = guest_max_pending if guest_max_pending else 1 << 40
        self.guest_max_udp: int = guest_max_udp if guest_max_udp else 1 << 40
        self.guest_new_flows: int = guest_new_flows  # new flows per second; 0: no limit

        self.ipv6: bool = ipv6
        self.dhcpv6: bool = dhcpv6
        try:
            network6 = ipaddress.IPv6Network(prefix6, strict=False)
        except ValueError as exc:
            raise ValueError(f"--ipv6-prefix {prefix6!r} is not an IPv6 network (ADDRESS/PREFIX): {exc}") from exc
        if network6.prefixlen != 64:
            raise ValueError(f"--ipv6-prefix {prefix6}: must be a /64 (SLAAC needs 64 bits for the interface)")
        if network6.is_multicast or network6.is_link_local or network6.is_loopback:
            raise ValueError(f"--ipv6-prefix {prefix6}: not a unicast prefix a guest can use")
        self.network6: ipaddress.IPv6Network = network6
        self.prefix6: bytes = network6.network_address.packed[:8]  # the upper 64 bits
        self.prefix6_len: int = 64
        self.host_ip6: bytes = self._inside6(host6, 2, "host6")
        self.dns_ip6: bytes = self._inside6(dns6, 3, "dns6")
        self.router_ll: bytes = ROUTER_LL

    def _inside6(self, text: str | None, default: int, what: str) -> bytes:
        if text is None:
            return self.prefix6 + default.to_bytes(8, "big")
        try:
            addr = ip6_bytes(text)
        except ValueError as exc:
            raise ValueError(f"--{what} {text!r} is not an IPv6 address") from exc
        if addr[:8] != self.prefix6 or addr[8:] == bytes(8):
            raise ValueError(f"--{what} {text} is not a host address of {self.network6}")
        return addr

    def contains6(self, addr: bytes) -> bool:
        """Whether a 16-byte address is inside the guests' IPv6 prefix."""
        return addr[:8] == self.prefix6

    def host_side_address(self, dst: bytes) -> str:
        """Where a guest packet to dst goes on the host: the gateway address means loopback.

        Returns "" when dst is a virtual address that has no host-side counterpart.
        """
        if len(dst) == 16:
            if dst == self.host_ip6:
                return "::1" if self.host_loopback else ""
            if dst[:8] == self.prefix6:
                return ""
            return socket.inet_ntop(socket.AF_INET6, dst)
        if dst == self.host_ip:
            return "127.0.0.1" if self.host_loopback else ""
        if self.contains(dst):
            return ""
        return ip_str(dst)

    def _inside(self, text: str | None, default: int, what: str) -> bytes:
        addr = int_ip(default) if text is None else ip_bytes(text)
        if not self.contains(addr) or addr in (self.net_addr, self.broadcast):
            raise ValueError(f"--{what} {ip_str(addr)} is not a host address of {self.network}")
        return addr

    def host_ip_str(self) -> str:
        return ip_str(self.host_ip)

    def dns_ip_str(self) -> str:
        return ip_str(self.dns_ip)

    def dhcp_start_str(self) -> str:
        return ip_str(self.dhcp_start)

    def contains(self, addr: bytes) -> bool:
        value = (addr[0] << 24) | (addr[1] << 16) | (addr[2] << 8) | addr[3]
        return (value & self.mask_int) == self.net_int

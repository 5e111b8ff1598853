"""The virtual network's settings, with QEMU `-netdev user` defaults."""

import ipaddress
import socket
from typing import Final, final

DEFAULT_NET: Final = "10.0.2.0/24"
DEFAULT_MTU: Final = 1500
MIN_MTU: Final = 576
MAX_MTU: Final = 65520
GATEWAY_MAC: Final = b"\x52\x55\x0a\x00\x02\x02"
# per-guest limits (core/guard.py): a quarter of the global caps for connections and UDP flows;
# 1024 connects pending at once (a browser or a build keeps tens; the bench's 10,000 idle
# connections are opened 256 at a time); 5,000 new flows per second (bursts of 10,000) are above
# the ~3,500 connections/s (wrk) and the 10,000 idle connections in 0.85 s one guest reaches here
GUEST_MAX_TCP: Final = 16384
GUEST_MAX_PENDING: Final = 1024
GUEST_MAX_UDP: Final = 1024
GUEST_NEW_FLOWS: Final = 5000


def ip_bytes(text: str) -> bytes:
    """4 bytes of a dotted IPv4 address; ValueError when malformed."""
    return socket.inet_aton(str(ipaddress.IPv4Address(text)))


def ip_str(addr: bytes) -> str:
    return socket.inet_ntoa(addr)


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

    def host_side_address(self, dst: bytes) -> str:
        """Where a guest packet to dst goes on the host: the gateway address means loopback.

        Returns "" when dst is a virtual address that has no host-side counterpart.
        """
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

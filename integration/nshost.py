"""A "host" namespace with a veth to an "outside" namespace.

::

    namespace "host" (vpnt-PID-hN)              namespace "outside" (vpnt-PID-oN)
    veth vpntPIDhN 198.18.0.1/24  <-------->  veth vpntPIDoN 198.18.0.2/24
         2001:2::1/64                                2001:2::2/64
    default routes via the outside              extra "internet" addresses on lo

Run the backend in the host namespace (``start_backend(..., netns=h.host.name)``)
and the test's servers (HTTP, DNS, iperf3...) in the outside namespace: all of
the backend's outbound traffic stays between namespaces the test made, and a
test can play "the host's VPN" (routes, resolv.conf, proxies). Addresses come
from the benchmarking ranges 198.18.0.0/15 and 2001:2::/48 (RFC 2544, 5180).
"""

from __future__ import annotations

import ipaddress
from types import TracebackType

from pyroute2 import IPRoute

from .common import unique_names
from .netns import Netns

IFA_F_NODAD = 0x02


class NsHost:
    """Two namespaces joined by a veth pair; see the module docstring.

    ``host``/``outside`` are :class:`~integration.netns.Netns` objects (``run``,
    ``popen``, ``iproute``...). The host namespace's resolv.conf starts as
    ``resolv_conf`` (default: the outside address as name server, where a test
    may run a DNS server) and is changed with :meth:`set_resolv_conf`; with
    ``hosts`` its /etc/hosts is that text (:meth:`set_hosts` changes it).
    """

    def __init__(
        self,
        *,
        host_addr: str = "198.18.0.1/24",
        outside_addr: str = "198.18.0.2/24",
        host_addr6: str | None = "2001:2::1/64",
        outside_addr6: str | None = "2001:2::2/64",
        default_route: bool = True,
        resolv_conf: str | None = None,
        hosts: str | None = None,
        mtu: int = 1500,
    ) -> None:
        host_name, self.host_ifname = unique_names("h")
        outside_name, self.outside_ifname = unique_names("o")
        self.host_iface = ipaddress.ip_interface(host_addr)
        self.outside_iface = ipaddress.ip_interface(outside_addr)
        self.host_iface6 = ipaddress.ip_interface(host_addr6) if host_addr6 else None
        self.outside_iface6 = ipaddress.ip_interface(outside_addr6) if outside_addr6 else None
        if resolv_conf is None:
            resolv_conf = f"nameserver {self.outside_iface.ip}\n"
        self.host = Netns(host_name, resolv_conf=resolv_conf, hosts=hosts)
        self.outside = Netns(outside_name, resolv_conf="")
        self.default_route = default_route
        self.mtu = mtu
        self.closed = False

    @property
    def host_ip(self) -> str:
        return str(self.host_iface.ip)

    @property
    def outside_ip(self) -> str:
        return str(self.outside_iface.ip)

    @property
    def host_ip6(self) -> str | None:
        return str(self.host_iface6.ip) if self.host_iface6 else None

    @property
    def outside_ip6(self) -> str | None:
        return str(self.outside_iface6.ip) if self.outside_iface6 else None

    def start(self) -> NsHost:
        try:
            self.host.create()
            self.outside.create()
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_ifname, kind="veth", peer={"ifname": self.outside_ifname})
                for ifname, ns in ((self.host_ifname, self.host), (self.outside_ifname, self.outside)):
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.link("set", index=idx, mtu=self.mtu)
                    ipr.link("set", index=idx, net_ns_fd=ns.name)
            self._configure(self.host, self.host_ifname, self.host_iface, self.host_iface6)
            self._configure(self.outside, self.outside_ifname, self.outside_iface, self.outside_iface6)
            if self.default_route:
                with self.host.iproute() as ipr:
                    ipr.route("add", dst="0.0.0.0/0", gateway=self.outside_ip)
                    if self.outside_ip6:
                        ipr.route("add", dst="::/0", gateway=self.outside_ip6, family=10)
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _configure(
        ns: Netns,
        ifname: str,
        iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
        iface6: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None,
    ) -> None:
        with ns.iproute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if iface6 is not None:
                # No duplicate address detection: usable at once.
                ipr.addr(
                    "add", index=idx, address=str(iface6.ip), prefixlen=iface6.network.prefixlen, flags=IFA_F_NODAD
                )
            ipr.link("set", index=idx, state="up")

    def add_outside_address(self, cidr: str) -> str:
        """Add an address (e.g. ``198.19.1.1/32``) to the outside namespace's lo:
        a server bound there is reachable from the host namespace through the
        default route, like a host on the internet. Returns the bare address."""
        iface = ipaddress.ip_interface(cidr)
        with self.outside.iproute() as ipr:
            idx = ipr.link_lookup(ifname="lo")[0]
            kwargs: dict[str, int] = {}
            if iface.version == 6:
                kwargs["flags"] = IFA_F_NODAD
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kwargs)
        return str(iface.ip)

    def set_resolv_conf(self, text: str) -> None:
        """Rewrite the host namespace's resolv.conf (what the backend reads)."""
        self.host.set_resolv_conf(text)

    def set_hosts(self, text: str) -> None:
        """Rewrite the host namespace's /etc/hosts (given at creation)."""
        self.host.set_hosts(text)

    def close(self) -> None:
        """Delete both namespaces (the veth pair goes with them). Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.host.close()
        self.outside.close()
        with IPRoute() as ipr:  # a veth never moved (failed start)
            for ifname in (self.host_ifname, self.outside_ifname):
                for idx in ipr.link_lookup(ifname=ifname):
                    ipr.link("del", index=idx)

    def __enter__(self) -> NsHost:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NsHost host={self.host.name} outside={self.outside.name}>"

"""Wires the host-side socket handlers (TCP, UDP, ping, DNS upstream) into a Shell."""

import argparse

from qemu_vpnnet.io.dns_host import configure_dns
from qemu_vpnnet.io.dns_upstream import install_dns_upstream
from qemu_vpnnet.io.host_ping import install_host_ping
from qemu_vpnnet.io.host_tcp import HostTcp
from qemu_vpnnet.io.host_udp import install_host_udp
from qemu_vpnnet.io.shell import Shell


def install_host_side(shell: Shell, args: argparse.Namespace) -> None:
    """Register every host-side op performer on shell; args are the parsed CLI options."""
    shell.dns_upstreams = install_dns_upstream(shell, list(args.dns_upstream))
    configure_dns(shell, shell.dns_upstreams, args)
    shell.host_tcp = HostTcp(shell)
    shell.host_udp = install_host_udp(shell)
    shell.host_ping = install_host_ping(shell)

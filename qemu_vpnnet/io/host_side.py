"""Wires the host-side socket handlers (TCP, UDP, ping, DNS upstream) into a Shell."""

import argparse

from qemu_vpnnet.io.host_tcp import HostTcp
from qemu_vpnnet.io.shell import Shell


def install_host_side(shell: Shell, args: argparse.Namespace) -> None:
    """Register every host-side op performer on shell; args are the parsed CLI options."""
    shell.host_tcp = HostTcp(shell)

"""The fast guest: a network namespace whose TAP device QEMU bridges to a netdev.

::

    namespace vpnt-PID-gN            root namespace
    +-------------------+   fd    +-----------------------------------------+
    | TAP vpntPIDgN     | <-----> | qemu-system-x86_64 -M none              |
    | (real Linux stack)|         |  -netdev tap,id=t0  -- hub 0 --  s0:    |
    +-------------------+         |  -netdev stream (backend socket) / user |
                                  +-----------------------------------------+

QEMU opens the TAP by name in the root namespace, then the TAP moves into the
guest namespace: QEMU keeps its file descriptor across the move. QEMU itself
does the stream framing, exactly as for a VM. With ``netdev="user"`` the same
namespace talks to QEMU's libslirp instead (the baseline).

Two behaviours of this hub path (not of a VM's NIC), see TESTBED.md: frames
shorter than 60 bytes arrive padded to 60, and under heavy load a short write
of QEMU to the socket can splice or reorder frames.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyroute2 import IPRoute

from .common import (
    UDHCPC_SCRIPT,
    HarnessError,
    parse_leases,
    read_text,
    stop_process,
    tail,
    unique_mac,
    unique_names,
    with_pdeathsig,
)
from .native import whole_writes_library
from .netns import Netns
from .vmguest import check_listener, netdev_with_id, stream_netdev


class NsGuestError(HarnessError):
    """The namespace guest could not be set up, or DHCP failed."""


def tap_attached(pid: int, ifname: str) -> bool:
    """True once process ``pid`` holds a tun/tap fd attached to ``ifname``
    (``iff:`` in /proc/PID/fdinfo, shown for tun file descriptors)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return False
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        if f"iff:\t{ifname}\n" in info:
            return True
    return False


class NsGuest(Netns):
    """A namespace guest on ``socket_path`` (a backend's stream socket) or on
    any QEMU ``netdev`` spec (``"user"`` for libslirp).

    With ``whole_writes`` (the default, for backend sockets) QEMU runs with the
    LD_PRELOAD shim of integration/native/whole_writes.c, so its writes to the
    stream socket are never short. ``mtu`` is set on the TAP (the guest's interface, :attr:`ifname`) before
    DHCP, ``mac`` is its address (unique by default). ``ipv6=False`` disables
    IPv6 on it. The QEMU hub process logs to ``log_path``; ``qemu_env`` adds
    environment variables to it (e.g. an LD_PRELOAD shim for load tests).
    """

    def __init__(
        self,
        *,
        socket_path: Path | str | None = None,
        netdev: str | None = None,
        mtu: int = 1500,
        mac: str | None = None,
        ipv6: bool = True,
        log_path: Path | str,
        qemu_args: Sequence[str] = (),
        qemu_env: Mapping[str, str] | None = None,
        qemu: str = "qemu-system-x86_64",
        attach_timeout: float = 10.0,
        whole_writes: bool = True,
    ) -> None:
        if (socket_path is None) == (netdev is None):
            raise ValueError("give exactly one of socket_path and netdev")
        name, ifname = unique_names("g")
        super().__init__(name)
        self.ifname = ifname
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.netdev = netdev
        self.mtu = mtu
        self.mac = mac or unique_mac()
        self.ipv6 = ipv6
        self.log_path = Path(log_path)
        self.qemu_args = list(qemu_args)
        self.qemu_env = dict(qemu_env or {})
        if whole_writes and socket_path is not None and "LD_PRELOAD" not in self.qemu_env:
            # QEMU 7.2's hub corrupts the stream on a short write under load (TESTBED.md)
            self.qemu_env["LD_PRELOAD"] = whole_writes_library()
        self.qemu = qemu
        self.attach_timeout = attach_timeout
        self.qemu_process: subprocess.Popen[bytes] | None = None
        self._tap_moved = False
        self.last_lease: dict[str, str] | None = None

    def qemu_command(self) -> list[str]:
        if self.socket_path is not None:
            spec = stream_netdev(self.socket_path)
        else:
            assert self.netdev is not None
            spec = self.netdev
        return [
            self.qemu,
            "-M",
            "none",
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-netdev",
            f"tap,id=t0,ifname={self.ifname},script=no,downscript=no",
            "-netdev",
            netdev_with_id(spec, "s0"),
            "-netdev",
            "hubport,id=h0,hubid=0,netdev=t0",
            "-netdev",
            "hubport,id=h1,hubid=0,netdev=s0",
            *self.qemu_args,
        ]

    def start(self) -> NsGuest:
        """Create namespace and TAP, start QEMU, move the TAP in, bring it up."""
        if self.socket_path is not None:
            check_listener(self.socket_path)
        try:
            self.create()
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.ifname, kind="tuntap", mode="tap")
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("set", index=idx, mtu=self.mtu, address=self.mac)
            self._start_qemu()
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("set", index=idx, net_ns_fd=self.name)
            self._tap_moved = True
            if not self.ipv6:
                self.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{self.ifname}.disable_ipv6=1"], check=True)
            with self.iproute() as ipr:
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("set", index=idx, state="up")
        except BaseException:
            self.close()
            raise
        return self

    def _start_qemu(self) -> None:
        cmd = self.qemu_command()
        env = dict(os.environ)
        env.update(self.qemu_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.qemu_process = subprocess.Popen(
                with_pdeathsig(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + self.attach_timeout
        while not tap_attached(self.qemu_process.pid, self.ifname):
            if self.qemu_process.poll() is not None:
                raise NsGuestError(
                    f"QEMU exited with status {self.qemu_process.returncode}:\n{tail(self.qemu_log_text())}"
                )
            if time.monotonic() > deadline:
                raise NsGuestError(
                    f"QEMU did not open TAP {self.ifname} within {self.attach_timeout} s:\n{tail(self.qemu_log_text())}"
                )
            time.sleep(0.01)

    def qemu_log_text(self) -> str:
        return read_text(self.log_path)

    def qemu_running(self) -> bool:
        return self.qemu_process is not None and self.qemu_process.poll() is None

    def dhcp(
        self,
        timeout: float = 30.0,
        *,
        tries: int = 5,
        retry_seconds: int = 2,
        extra_args: Sequence[str] = (),
    ) -> dict[str, str]:
        """Run busybox udhcpc once (``-q``) with vm-images/udhcpc.script, which
        applies address, routes, MTU and the namespace's resolv.conf.

        Returns the lease: ip, mask, router, dns, mtu, lease, domain, search,
        subnet, broadcast, serverid, hostname, staticroutes, iface, event (all
        strings, lists comma-separated, absent values empty).
        """
        cmd = [
            "busybox",
            "udhcpc",
            "-i",
            self.ifname,
            "-s",
            str(UDHCPC_SCRIPT),
            "-f",
            "-q",
            "-n",
            "-t",
            str(tries),
            "-T",
            str(retry_seconds),
            "-O",
            "mtu",
            "-O",
            "search",
            "-O",
            "staticroutes",
            *extra_args,
        ]
        env = {
            "VPNNET_RESOLV_CONF": str(self.resolv_conf_path),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        try:
            result = self.run(cmd, timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise NsGuestError(f"udhcpc did not finish within {timeout} s: {e.output!r}") from None
        output = result.stdout + result.stderr
        leases = parse_leases(output)
        if result.returncode != 0 or not leases:
            raise NsGuestError(
                f"DHCP failed on {self.ifname} (udhcpc status {result.returncode}):\n"
                f"{tail(output)}\n--- QEMU hub log ---\n{tail(self.qemu_log_text(), 20)}"
            )
        self.last_lease = leases[-1]
        return self.last_lease

    def ipv6_addresses(self) -> list[dict[str, object]]:
        """The IPv6 addresses of the guest's interface: ``ip -j -6 addr``'s ``addr_info`` entries
        (``local``, ``prefixlen``, ``scope``, ``tentative``, ``dynamic``...)."""
        out = self.run(["ip", "-j", "-6", "addr", "show", "dev", self.ifname], check=True).stdout
        links = json.loads(out or "[]")
        return [a for link in links for a in link.get("addr_info", [])]

    def wait_slaac(self, prefix: str = "fec0::/64", timeout: float = 10.0) -> str:
        """Wait until the guest's kernel has an address in ``prefix`` that it configured itself
        from a router advertisement (SLAAC: ``accept_ra`` and ``autoconf`` are on in a new
        namespace) and whose duplicate address detection is over; return it."""
        network = ipaddress.ip_network(prefix)
        deadline = time.monotonic() + timeout
        while True:
            addrs = self.ipv6_addresses()
            for a in addrs:
                if ipaddress.ip_address(str(a["local"])) in network and not a.get("tentative"):
                    return str(a["local"])
            if time.monotonic() > deadline:
                raise NsGuestError(
                    f"no address in {prefix} on {self.ifname} within {timeout} s (SLAAC): {addrs}\n"
                    f"--- QEMU hub log ---\n{tail(self.qemu_log_text(), 20)}"
                )
            time.sleep(0.1)

    def close(self) -> None:
        """Kill QEMU and the processes started inside, delete TAP and namespace."""
        if self.closed:
            return
        if self.qemu_process is not None:
            stop_process(self.qemu_process, 3.0)
        super().close()
        if not self._tap_moved:
            with IPRoute() as ipr:
                for idx in ipr.link_lookup(ifname=self.ifname):
                    ipr.link("del", index=idx)

    def __repr__(self) -> str:
        return f"<NsGuest {self.name} {self.ifname} mac={self.mac} mtu={self.mtu}>"

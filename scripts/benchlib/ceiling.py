"""The harness's own ceiling: the same guest namespace and QEMU hub, with no backend at all.

QEMU bridges the guest's TAP through its hub to a second TAP whose far end is another network
namespace holding the gateway address and the servers. Whatever a backend reaches on the
harness, it cannot pass what this carries: the guest's kernel, the TAP, QEMU's hub and a kernel at
the other end, with nothing in between.

    guest namespace            QEMU (hub 0)                 far namespace
    TAP  10.0.2.15  <->  tap t0 -- hubport -- tap s0  <->  TAP  10.0.2.2 (iperf3, sockperf)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from integration.common import unique_names  # noqa: E402
from integration.netns import Netns  # noqa: E402
from integration.nsguest import NsGuest  # noqa: E402

GUEST_ADDRESS = "10.0.2.15"
FAR_ADDRESS = "10.0.2.2"
PREFIX = 24


class HarnessCeiling:
    """A guest namespace and a far namespace joined by QEMU's hub, servers in the far one."""

    def __init__(self, mtu: int, log_path: Path, iperf_port: int, sockperf_port: int) -> None:
        self.mtu = mtu
        self.log_path = log_path
        self.iperf_port = iperf_port
        self.sockperf_port = sockperf_port
        name, self.far_ifname = unique_names("f")
        self.far = Netns(name)
        self.guest: NsGuest | None = None
        self._far_moved = False

    def start(self) -> None:
        try:
            self.far.create()
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.far_ifname, kind="tuntap", mode="tap")
                idx = ipr.link_lookup(ifname=self.far_ifname)[0]
                ipr.link("set", index=idx, mtu=self.mtu)
            self.guest = NsGuest(
                netdev=f"tap,ifname={self.far_ifname},script=no,downscript=no",
                mtu=self.mtu,
                ipv6=False,
                log_path=self.log_path,
            )
            self.guest.start()  # QEMU has both TAPs open now
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.far_ifname)[0]
                ipr.link("set", index=idx, net_ns_fd=self.far.name)
            self._far_moved = True
            for ns, ifname, address in (
                (self.far, self.far_ifname, FAR_ADDRESS),
                (self.guest, self.guest.ifname, GUEST_ADDRESS),
            ):
                with ns.iproute() as ipr:
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.addr("add", index=idx, address=address, prefixlen=PREFIX)
                    ipr.link("set", index=idx, state="up")
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            self.far.popen(["iperf3", "-s", "-p", str(self.iperf_port)], **quiet)  # type: ignore[arg-type]
            self.far.popen(
                ["sockperf", "server", "--tcp", "-i", FAR_ADDRESS, "-p", str(self.sockperf_port)],
                **quiet,  # type: ignore[arg-type]
            )
            self._wait_for_servers()
        except BaseException:
            self.stop()
            raise

    def _wait_for_servers(self) -> None:
        assert self.guest is not None
        probe = f"import socket; socket.create_connection(('{FAR_ADDRESS}', {self.iperf_port}), 1).close()"
        for _ in range(100):
            if self.guest.run([sys.executable, "-c", probe], timeout=5).returncode == 0:
                time.sleep(0.3)  # sockperf too
                return
            time.sleep(0.1)
        raise RuntimeError("the far namespace's iperf3 server did not start")

    def pids(self) -> list[int]:
        if self.guest is not None and self.guest.qemu_process is not None:
            return [self.guest.qemu_process.pid]
        return []

    def stop(self) -> None:
        if self.guest is not None:
            self.guest.close()
        self.far.close()  # its TAP goes with it
        if not self._far_moved:
            with IPRoute() as ipr:
                for idx in ipr.link_lookup(ifname=self.far_ifname):
                    ipr.link("del", index=idx)

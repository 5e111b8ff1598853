"""A download through the upstream HTTP proxy against the same download direct, in one run.

The world of integration/test_proxy.py without its firewall: an NsHost "host" namespace (the
backend, and tinyproxy on 127.0.0.1:8888) with a veth to an "outside" namespace whose origin
server (integration/proxy_servers.py) serves http://www.test/big (198.19.1.1). A namespace
guest downloads SIZE bytes with curl, several rounds of each path, alternating:

- vpnnet direct: no upstream set, guest TCP to port 80 leaves as a direct connection;
- vpnnet transparent: --http-proxy, the guest knows nothing of the proxy;
- vpnnet explicit: the guest's http_proxy is the backend's explicit proxy (10.0.2.2:3128),
  which goes through the same upstream;
- libslirp direct, and libslirp with the guest's http_proxy set to tinyproxy (10.0.2.2:8888 is
  the host namespace's loopback for libslirp): QEMU -netdev user, run inside the host namespace.

Every path downloads the same bytes from the same server; the table shows the median MB/s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from integration.backend import Backend  # noqa: E402
from integration.common import wait_until  # noqa: E402
from integration.nsguest import NsGuest, tap_attached  # noqa: E402
from integration.nshost import NsHost  # noqa: E402

PEERS = REPO / "integration" / "proxy_servers.py"
WWW = "198.19.1.1"
MB = 1 << 20


class HostNsGuest(NsGuest):
    """A namespace guest whose QEMU (libslirp) runs inside the host namespace: its TAP is made
    there and moved from there into the guest's namespace."""

    def __init__(self, host_ns: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.host_ns = host_ns

    def start(self) -> NsGuest:
        from pyroute2 import IPRoute

        try:
            self.create()
            with IPRoute(netns=self.host_ns) as ipr:
                ipr.link("add", ifname=self.ifname, kind="tuntap", mode="tap")
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("set", index=idx, mtu=self.mtu, address=self.mac)
            cmd = ["ip", "netns", "exec", self.host_ns, *self.qemu_command()]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as log:
                self.qemu_process = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            assert self.qemu_process is not None
            pid = self.qemu_process.pid
            if not wait_until(lambda: tap_attached(pid, self.ifname), 10):
                raise RuntimeError(f"QEMU did not open {self.ifname}: {self.qemu_log_text()}")
            with IPRoute(netns=self.host_ns) as ipr:
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("set", index=idx, net_ns_fd=self.name)
            self._tap_moved = True
            with self.iproute() as ipr:
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("set", index=idx, state="up")
        except BaseException:
            self.close()
            raise
        return self


def download(guest: NsGuest, size: int, proxy: str = "") -> float:
    """Seconds for one download of size bytes with curl (checked for its length)."""
    env = {"http_proxy": proxy, "no_proxy": ""}
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", "--resolve", f"www.test:80:{WWW}"]
    cmd.append(f"http://www.test/big?size={size}")
    result = guest.run(cmd, 300, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"curl failed ({result.returncode}): {result.stderr}")
    got, seconds = result.stdout.split()
    if int(got) != size:
        raise RuntimeError(f"curl got {got} bytes, not {size}")
    return float(seconds)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=200, help="MB per download (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="downloads per path (default 3)")
    parser.add_argument("--mtu", type=int, default=65520, help="guest MTU (default 65520)")
    parser.add_argument("--no-slirp", action="store_true", help="leave out the libslirp rows")
    opts = parser.parse_args(argv)
    size = opts.size * MB
    tmp = Path(tempfile.mkdtemp(prefix="vpnt-bench-proxy-", dir="/tmp"))
    tmp.chmod(0o777)
    host = NsHost(hosts=f"127.0.0.1 localhost\n{WWW} www.test\n", resolv_conf="nameserver 198.18.0.2\n").start()
    started: list[Backend] = []
    guests: list[NsGuest] = []
    results: dict[str, list[float]] = {}
    try:
        host.add_outside_address(f"{WWW}/32")
        origin_log = tmp / "origin.log"
        with open(origin_log, "wb") as out:
            host.outside.popen([sys.executable, "-u", str(PEERS), "origin", WWW, "80"], stdout=out)
        conf = tmp / "tinyproxy.conf"
        conf.write_text(
            "User tinyproxy\nGroup tinyproxy\nPort 8888\nListen 0.0.0.0\nTimeout 600\nLogLevel Warning\n"
            f'LogFile "{tmp}/tinyproxy.log"\nMaxClients 100\nAllow 127.0.0.1\nAllow 10.0.2.0/24\n'
        )
        host.host.popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(lambda: "READY" in origin_log.read_text(), 10):
            raise RuntimeError(origin_log.read_text())
        time.sleep(0.5)

        paths: list[tuple[str, NsGuest, str]] = []
        for name, extra in (("direct", ()), ("proxy", ("--http-proxy", "http://127.0.0.1:8888"))):
            backend = Backend(
                "--mtu", str(opts.mtu), "--log-level", "warning", *extra,
                socket_path=tmp / f"{name}.sock", log_path=tmp / f"{name}.log", netns=host.host.name,
            )  # fmt: skip
            started.append(backend.start())
            guest = NsGuest(socket_path=backend.socket_path, mtu=opts.mtu, ipv6=False, log_path=tmp / f"g-{name}.log")
            guests.append(guest.start())
            guest.dhcp()
            if name == "direct":
                paths.append(("qemu-vpnnet direct", guest, ""))
            else:
                paths.append(("qemu-vpnnet transparent proxy (tinyproxy)", guest, ""))
                paths.append(("qemu-vpnnet explicit proxy -> tinyproxy", guest, "http://10.0.2.2:3128"))
        if not opts.no_slirp:
            slirp = HostNsGuest(host.host.name, netdev="user", mtu=opts.mtu, ipv6=False, log_path=tmp / "g-slirp.log")
            guests.append(slirp.start())
            slirp.dhcp()
            paths.append(("libslirp direct", slirp, ""))
            paths.append(("libslirp, guest http_proxy=tinyproxy", slirp, "http://10.0.2.2:8888"))
        for _name, guest, proxy in paths:  # warm up each path once
            download(guest, 8 * MB, proxy)
        for _round in range(opts.rounds):
            for name, guest, proxy in paths:
                results.setdefault(name, []).append(download(guest, size, proxy))
    finally:
        for guest in guests:
            guest.close()
        for backend in started:
            backend.stop()
        host.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    direct = statistics.median(results["qemu-vpnnet direct"])
    print(
        f"\n{opts.size} MB download with curl, guest MTU {opts.mtu}, median of {opts.rounds} (one run, same server)\n"
    )
    print(f"{'path':45} {'MB/s':>8} {'Gbit/s':>7} {'seconds':>8} {'vs vpnnet direct':>17}")
    for name, times in results.items():
        seconds = statistics.median(times)
        rate = opts.size / seconds
        print(f"{name:45} {rate:8.0f} {rate * 8 * MB / 1e9:7.2f} {seconds:8.2f} {direct / seconds:16.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

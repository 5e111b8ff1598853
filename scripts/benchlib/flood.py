"""The bench's --flood rows: one guest's 20 MB download alone, and while a second guest on the
same backend floods it (hping3 SYN flood toward a host listener that never accepts, and a UDP
flood toward a host socket that is never read). docs/isolation.rst states the bound: at most 3x.

For libslirp the flooding guest is a second QEMU with its own slirp, so its row shows what the
machine's CPU sharing alone costs (nothing is shared but the CPUs); for qemu-vpnnet both guests
are ports of one backend.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from integration.nsguest import NsGuest

REPO = Path(__file__).resolve().parent.parent.parent
PEERS = str(REPO / "integration" / "isolation_peers.py")
GATEWAY = "10.0.2.2"
SIZE = 20 << 20
DOWNLOADS = 3


class FloodPeers:
    """The host side: a 20 MB source, a listener that never accepts, a UDP socket never read."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.source = self.start("source", "127.0.0.1", 0, SIZE)
        self.no_accept = self.start("no-accept", "127.0.0.1", 0)
        self.udp_no_read = self.start("udp-no-read", "127.0.0.1", 0)

    def start(self, *args: str | int) -> int:
        proc = subprocess.Popen(
            [sys.executable, PEERS, *(str(a) for a in args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"flood peer {args[0]} did not start: {line!r}")
        return int(line.split()[1])

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def download(guest: NsGuest, port: int) -> float:
    result = guest.run([sys.executable, PEERS, "download", GATEWAY, str(port)], timeout=120)
    value = json.loads(result.stdout)
    if value["bytes"] != SIZE:
        raise RuntimeError(f"download got {value['bytes']} bytes")
    return float(value["seconds"])


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


def flood_figures(guest: NsGuest, flooder: NsGuest, peers: FloodPeers, backend_pid: int | None) -> dict[str, float]:
    """Median download times alone and under each flood, and the slowdowns."""
    if not shutil.which("hping3"):
        print("  --flood: hping3 is missing (scripts/install-deps installs it)", file=sys.stderr)
        return {}
    alone = statistics.median(download(guest, peers.source) for _ in range(DOWNLOADS))
    figures = {"download 20 MB alone s": alone}
    floods = (
        ("SYN", ["-S", "-p", str(peers.no_accept)]),
        ("UDP", ["--udp", "-p", str(peers.udp_no_read)]),
    )
    for name, args in floods:
        flood = flooder.popen(
            ["timeout", "120", "hping3", "--flood", "-q", *args, GATEWAY],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        before_fds = fd_count(backend_pid) if backend_pid is not None else -1
        before_rss = rss_mb(backend_pid) if backend_pid is not None else -1.0
        try:
            time.sleep(1.0)
            during = statistics.median(download(guest, peers.source) for _ in range(DOWNLOADS))
            fds = fd_count(backend_pid) if backend_pid is not None else -1
            rss = rss_mb(backend_pid) if backend_pid is not None else -1.0
        finally:
            flood.terminate()  # timeout passes SIGTERM on to hping3
            try:
                flood.wait(10)
            except subprocess.TimeoutExpired:
                flood.kill()
                flood.wait()
        figures[f"download 20 MB, other guest {name} flood s"] = during
        figures[f"download 20 MB, other guest {name} flood / alone"] = during / alone
        time.sleep(1.0)
        if fds >= 0 and backend_pid is not None:
            figures[f"backend fds before {name} flood"] = float(before_fds)
            figures[f"backend fds during {name} flood"] = float(fds)
            figures[f"backend fds 1 s after {name} flood"] = float(fd_count(backend_pid))
            figures[f"backend RSS MB before {name} flood"] = before_rss
            figures[f"backend RSS MB during {name} flood"] = rss
            figures[f"backend RSS MB 1 s after {name} flood"] = rss_mb(backend_pid)
    return figures

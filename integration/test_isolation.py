"""One guest cannot hurt another, with real kernels: two namespace guests on one backend.

- A guest's gratuitous ARP claiming the gateway's address reaches no other guest: their
  neighbour tables keep the gateway's MAC and their traffic to the host keeps working.
- A guest whose QEMU is killed leaves no host sockets behind: its connections are reset
  toward their host peers within a few seconds.
- One guest's SYN flood (hping3) toward a host listener that does not accept leaves a second
  guest's download within a bound of its time without the flood.
- With the backend under a low open-file limit (256), one guest's connect flood does not keep a
  second guest, within its own limits, from connecting.

Traffic goes only to the host's loopback (the guests' gateway 10.0.2.2) and the test namespaces.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.backend import Backend
from integration.common import stop_process, wait_until, with_pdeathsig
from integration.fixtures import NsGuestFactory, StartBackend
from integration.netns import Netns
from integration.nsguest import NsGuest

PY = sys.executable
REPO_ROOT = Path(__file__).resolve().parent.parent
SERIAL = itertools.count(1)
PEERS = str(Path(__file__).resolve().parent / "isolation_peers.py")
GATEWAY = "10.0.2.2"
GATEWAY_MAC = "52:55:0a:00:02:02"
DOWNLOAD = 20 << 20


class Lines:
    """A process whose stdout lines a thread collects."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode(errors="replace").strip())
                self.cond.notify_all()

    def last(self, prefix: str) -> str | None:
        with self.cond:
            for line in reversed(self.lines):
                if line.startswith(prefix):
                    return line
        return None

    def wait(self, prefix: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {prefix!r} line (status {self.proc.poll()}): {self.lines[-5:]!r}")
                self.cond.wait(left)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Host-side processes of a test, stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_process(proc, 3.0)
        if proc.stdout is not None:
            proc.stdout.close()


def host_peer(procs: list[subprocess.Popen[bytes]], *args: str | int) -> tuple[Lines, int]:
    """Start an isolation_peers.py server on the host's loopback; (its lines, its port)."""
    proc = subprocess.Popen(
        with_pdeathsig([PY, PEERS, *(str(a) for a in args)]), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    procs.append(proc)
    lines = Lines(proc)
    return lines, int(lines.wait("READY ").split()[1])


def guest_peer(guest: Netns, *args: str | int) -> Lines:
    return Lines(guest.popen([PY, PEERS, *(str(a) for a in args)], stdout=subprocess.PIPE))


def guest_json(guest: Netns, *args: str | int, timeout: float = 60.0) -> dict[str, object]:
    result = guest.run([PY, PEERS, *(str(a) for a in args)], timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def gateway_neighbour(guest: NsGuest) -> str:
    out = guest.run(["ip", "-j", "neigh", "show", GATEWAY, "dev", guest.ifname], check=True).stdout
    entries = json.loads(out or "[]")
    return str(entries[0].get("lladdr", "")) if entries else ""


def qmp_path(backend: Backend) -> Path:
    return backend.socket_path.with_suffix(".qmp")


def stats(backend: Backend) -> dict[str, int]:
    """The backend's counters (``qemu-vpnnet ctl --json stats`` over its QMP socket)."""
    env = dict(os.environ)
    if os.environ.get("VPNNET_TEST_INSTALLED", "") in ("", "0"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [PY, "-m", "qemu_vpnnet", "ctl", "--qmp", f"unix:{qmp_path(backend)}", "--json", "stats"],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    counters = {str(k): int(v) for k, v in value["counters"].items()}
    counters["host-sockets"] = int(value["host-sockets"])
    return counters


def two_guests(start_backend: StartBackend, ns_guest: NsGuestFactory, *args: str) -> tuple[Backend, NsGuest, NsGuest]:
    n = next(SERIAL)
    path = Path(tempfile.gettempdir()) / f"vpnt-iso-{os.getpid()}-{n}.sock"
    backend = start_backend("--qmp", f"unix:{path.with_suffix('.qmp')}", *args, socket_path=path)
    a = ns_guest(backend=backend, ipv6=False)
    b = ns_guest(backend=backend, ipv6=False)
    a.dhcp()
    b.dhcp()
    return backend, a, b


# ---- spoofing ---------------------------------------------------------------------------------


def test_a_guests_gratuitous_arp_for_the_gateway_does_not_reach_the_other_guest(
    start_backend: StartBackend, ns_guest: NsGuestFactory, procs: list[subprocess.Popen[bytes]]
) -> None:
    backend, a, b = two_guests(start_backend, ns_guest)
    _src, port = host_peer(procs, "source", "127.0.0.1", 0, 1000)
    assert guest_json(a, "connects", GATEWAY, port, 1)["ok"] == 1
    assert gateway_neighbour(a) == GATEWAY_MAC
    time.sleep(1.2)  # past the neighbour entry's locktime (1 s): a forged claim would now replace it
    b.run([PY, PEERS, "arp-spoof", b.ifname, GATEWAY, "20"], timeout=20, check=True)
    assert gateway_neighbour(a) == GATEWAY_MAC
    result = guest_json(a, "connects", GATEWAY, port, 3)
    assert result["ok"] == 3, result
    counters = stats(backend)
    assert counters.get("drop-arp-spoof-gateway", 0) >= 40, counters  # 20 requests and 20 replies


# ---- a guest that goes away ---------------------------------------------------------------------


def test_killing_a_guests_qemu_resets_its_connections_toward_the_host(
    start_backend: StartBackend, ns_guest: NsGuestFactory, procs: list[subprocess.Popen[bytes]]
) -> None:
    backend, a, b = two_guests(start_backend, ns_guest)
    server, port = host_peer(procs, "hold-server", "127.0.0.1", 0)
    before = fd_count(backend.pid)
    holder = guest_peer(a, "hold", GATEWAY, port, 100)
    holder.wait("HELD 100", 30)
    assert wait_until(lambda: server.last("HELD 100") is not None, 10)
    assert fd_count(backend.pid) >= before + 100
    other = guest_peer(b, "hold", GATEWAY, port, 5)  # another guest's connections stay
    other.wait("HELD 5", 30)
    assert a.qemu_process is not None
    a.qemu_process.kill()
    killed = time.monotonic()
    assert wait_until(lambda: fd_count(backend.pid) <= before + 5 + 2, 5.0), fd_count(backend.pid) - before
    assert wait_until(lambda: server.last("RESETS 100") is not None, 5.0), server.last("RESETS")
    took = time.monotonic() - killed
    backend.wait_for_log(r"guest disconnected: .*its flows closed: 100 tcp", timeout=2)
    assert server.last("RESETS 101") is None  # B's five are untouched
    print(f"100 host sockets closed {took:.2f} s after QEMU was killed")


# ---- floods -------------------------------------------------------------------------------------


def timed_download(guest: NsGuest, port: int) -> float:
    result = guest_json(guest, "download", GATEWAY, port)
    assert result["bytes"] == DOWNLOAD
    seconds = result["seconds"]
    assert isinstance(seconds, float)
    return seconds


@pytest.mark.skipif(shutil.which("hping3") is None, reason="needs hping3 (scripts/install-deps)")
def test_a_syn_flood_from_one_guest_leaves_the_other_its_share(
    start_backend: StartBackend, ns_guest: NsGuestFactory, procs: list[subprocess.Popen[bytes]]
) -> None:
    backend, a, b = two_guests(start_backend, ns_guest)
    _na, dead_port = host_peer(procs, "no-accept", "127.0.0.1", 0)
    _src, port = host_peer(procs, "source", "127.0.0.1", 0, DOWNLOAD)
    alone = min(timed_download(b, port) for _ in range(2))
    flood = a.popen(
        ["timeout", "25", "hping3", "-S", "--flood", "-q", "-p", str(dead_port), GATEWAY],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.0)
        during = [timed_download(b, port) for _ in range(2)]
        fds = fd_count(backend.pid)
    finally:
        stop_process(flood, 3.0)
    worst = max(during)
    print(f"20 MB download: alone {alone:.3f} s, during the SYN flood {during} s; backend fds {fds}")
    assert worst <= 6 * alone + 1.0, (alone, during)
    assert fds < 1024 + 200  # the flooding guest's pending connects are capped
    backend.wait_for_log(r"tcp-refused-guest-pending", timeout=2)


def limited_backend(tmp_path: Path, vpnnet_run_dir: Path, nofile: int) -> Backend:
    """A backend started under prlimit --nofile=N:N (soft and hard)."""
    wrapper = tmp_path / "python-limited"
    wrapper.write_text(f'#!/bin/sh\nexec prlimit --nofile={nofile}:{nofile} {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    backend = Backend(
        "--dns-mode",
        "forward",
        "--dns-upstream",
        "127.0.0.1:9",
        socket_path=vpnnet_run_dir / f"limited-{os.getpid()}.sock",
        log_path=tmp_path / "limited-backend.log",
        python=str(wrapper),
    )
    return backend.start()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_out_of_descriptors_a_guest_within_its_limits_still_connects(
    tmp_path: Path,
    vpnnet_run_dir: Path,
    ns_guest: NsGuestFactory,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    backend = limited_backend(tmp_path, vpnnet_run_dir, 256)
    try:
        assert f"{256}" in Path(f"/proc/{backend.pid}/limits").read_text().split("Max open files")[1].split("\n")[0]
        a = ns_guest(backend=backend, ipv6=False)
        b = ns_guest(backend=backend, ipv6=False)
        a.dhcp()
        b.dhcp()
        _na, dead_port = host_peer(procs, "no-accept", "127.0.0.1", 0)
        _src, port = host_peer(procs, "source", "127.0.0.1", 0, 1000)
        flood = guest_peer(a, "flood-connect", GATEWAY, dead_port, 600)
        done = json.loads(flood.wait("DONE ", 20).split(" ", 1)[1])
        assert done["refused"] > 300, done  # A got RST at once for what did not fit
        assert fd_count(backend.pid) <= 256
        result = guest_json(b, "connects", GATEWAY, port, 10)
        assert result["ok"] == 10, result
        log = backend.log_text()
        assert "tcp-refused-no-fds" in log and "fd-reclaimed" in log, log[-3000:]
        assert backend.is_running
    finally:
        backend.stop()

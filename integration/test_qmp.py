"""The QMP control plane of the real backend process (``--qmp unix:PATH``), driven by
``qemu-vpnnet ctl`` and by qemu.qmp's own ``qmp-shell``, as a user would.

The first tests need neither root nor QEMU; the last one puts a namespace guest behind the
backend to see leases, events and a forwarded connection through the control plane.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.backend import Backend, BackendError
from integration.common import REPO_ROOT, wait_until, with_pdeathsig
from integration.fixtures import NsGuestFactory, StartBackend

PY = sys.executable
PEER = Path(__file__).resolve().parent / "fwd_peer.py"
_serial = iter(range(1, 1 << 30))


def python_env() -> dict[str, str]:
    """The environment of a ctl / qmp-shell subprocess: the source tree first, like the backend's."""
    env = dict(os.environ)
    if os.environ.get("VPNNET_TEST_INSTALLED", "") in ("", "0"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("QEMU_VPNNET_QMP", None)
    return env


class Qmp:
    """A backend's QMP socket, and the two clients under test."""

    def __init__(self, backend: Backend, path: Path) -> None:
        self.backend = backend
        self.path = path
        self.spec = f"unix:{path}"

    def ctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [PY, "-m", "qemu_vpnnet", "ctl", "--qmp", self.spec, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=python_env(),
            cwd=REPO_ROOT,
        )
        if check:
            assert result.returncode == 0, f"ctl {' '.join(args)}: {result.returncode}\n{result.stderr}"
        return result

    def ctl_json(self, *args: str) -> object:
        return json.loads(self.ctl("--json", *args).stdout)

    def watch(self, *args: str) -> subprocess.Popen[str]:
        """``ctl watch ARGS`` in the background, returned once it is connected (and sees events)."""
        watcher = subprocess.Popen(
            with_pdeathsig([PY, "-m", "qemu_vpnnet", "ctl", "--qmp", self.spec, "watch", *args]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(),
            cwd=REPO_ROOT,
        )
        assert watcher.stderr is not None
        first = watcher.stderr.readline()
        assert first.startswith("qemu-vpnnet ctl: watching events on"), first + watcher.stderr.read()
        return watcher

    def shell(self, commands: str, *options: str) -> str:
        """Feed commands to ``python -m qemu.qmp.qmp_shell [options] PATH``; its stdout."""
        result = subprocess.run(
            [PY, "-m", "qemu.qmp.qmp_shell", *options, str(self.path)],
            input=commands,
            capture_output=True,
            text=True,
            timeout=30,
            env=python_env(),
            cwd=REPO_ROOT,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def qmp_backend(start_backend: StartBackend, vpnnet_run_dir: Path) -> Iterator[Qmp]:
    path = vpnnet_run_dir / f"qmp{os.getpid()}-{next(_serial)}.sock"
    backend = start_backend("--qmp", f"unix:{path}")
    assert wait_until(path.is_socket, 10), backend.log_text()
    yield Qmp(backend, path)


def shell_replies(output: str) -> list[dict[str, object]]:
    """The JSON replies in qmp-shell's output (one per line after the "(QEMU) " prompt)."""
    replies = []
    for line in output.splitlines():
        text = line.removeprefix("(QEMU) ")
        if text.startswith("{"):
            replies.append(json.loads(text))
    return replies


def bound(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_socket_is_private(qmp_backend: Qmp) -> None:
    mode = os.stat(qmp_backend.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_query_version(qmp_backend: Qmp) -> None:
    assert qmp_backend.ctl("version").stdout == "qemu-vpnnet 0.1.0\n"
    out = qmp_backend.shell("query-version\n")
    assert "Connected to QEMU 0.1.0" in out
    assert shell_replies(out) == [
        {"return": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "qemu-vpnnet 0.1.0"}}
    ]


def test_garbage_collector_is_tuned_and_watched(
    qmp_backend: Qmp, start_backend: StartBackend, vpnnet_run_dir: Path
) -> None:
    """The backend freezes start-up's objects after a first full collection, which query-stats
    counts with its pause; --gc-defaults keeps Python's settings (io/gc_tuning.py)."""
    tuned = qmp_backend.ctl_json("stats")
    assert isinstance(tuned, dict)
    collector = tuned["gc"]
    assert collector["thresholds"] == [50_000, 10, 10]
    assert collector["frozen-objects"] > 5_000
    assert collector["collections"][2] >= 1 and collector["longest-pause-ms"][2] > 0
    assert "garbage collector: collections [" in qmp_backend.ctl("stats").stdout
    path = vpnnet_run_dir / f"qmp{os.getpid()}-{next(_serial)}.sock"
    plain = start_backend("--qmp", f"unix:{path}", "--gc-defaults")
    assert wait_until(path.is_socket, 10), plain.log_text()
    collector = Qmp(plain, path).ctl_json("stats")["gc"]  # type: ignore[index]
    assert collector["thresholds"] == [700, 10, 10] and collector["frozen-objects"] == 0


def test_hostfwd_add_list_remove_with_ctl_and_qmp_shell(qmp_backend: Qmp) -> None:
    watcher = qmp_backend.watch(
        "--count", "2", "--timeout", "30", "--event", "HOSTFWD_ADDED", "--event", "HOSTFWD_REMOVED"
    )
    try:
        # ctl adds, qmp-shell lists and removes.
        added = qmp_backend.ctl("hostfwd", "add", "tcp::0-:22").stdout
        match = re.fullmatch(r"added tcp:127\.0\.0\.1:(\d+)-:22\n", added)
        assert match, added
        port = int(match.group(1))
        assert bound(port)
        listed = qmp_backend.ctl_json("hostfwd", "list")
        assert isinstance(listed, list) and [f["host-port"] for f in listed] == [port]
        assert f"127.0.0.1:{port}" in qmp_backend.ctl("hostfwd", "list").stdout
        replies = shell_replies(qmp_backend.shell(f"query-hostfwd\nhostfwd-remove host-port={port}\nquery-hostfwd\n"))
        assert replies[0] == {"return": listed}
        assert replies[1]["return"]["rule"] == f"tcp:127.0.0.1:{port}-:22"  # type: ignore[index]
        assert replies[2] == {"return": []}
        assert not bound(port)
        assert qmp_backend.ctl("hostfwd", "list").stdout == "no forwards\n"
        out, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        events = [json.loads(line) for line in out.splitlines()]
        assert [e["event"] for e in events] == ["HOSTFWD_ADDED", "HOSTFWD_REMOVED"]
        assert all(e["data"]["host-port"] == port for e in events)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    # qmp-shell adds, ctl removes; failures are errors with clear messages.
    replies = shell_replies(qmp_backend.shell("hostfwd-add protocol=udp host-port=0 guest-port=53\n"))
    udp_port = replies[0]["return"]["host-port"]  # type: ignore[index]
    failed = qmp_backend.ctl("hostfwd", "remove", f"tcp::{udp_port}", check=False)
    assert failed.returncode == 1
    assert failed.stderr == f"qemu-vpnnet ctl: hostfwd-remove: no tcp forward from 127.0.0.1:{udp_port}\n"
    assert qmp_backend.ctl("hostfwd", "remove", f"udp::{udp_port}").stdout.startswith("removed udp:")
    hmp = qmp_backend.shell("hostfwd_add vnet tcp::0-:80\ninfo usernet\n", "-H")
    assert "TCP[HOST_FORWARD]" in hmp


def test_quit_and_errors(qmp_backend: Qmp, start_backend: StartBackend, vpnnet_run_dir: Path) -> None:
    assert qmp_backend.ctl("exec", "frobnicate", check=False).returncode == 1
    assert qmp_backend.ctl("quit").stdout == "backend stopping\n"
    process = qmp_backend.backend.process
    assert process is not None
    assert process.wait(10) == 0
    assert not qmp_backend.path.exists()
    failed = qmp_backend.ctl("stats", check=False)
    assert failed.returncode == 3 and "cannot connect" in failed.stderr
    # A --qmp that cannot be used stops the backend at start-up with a clear message.
    with pytest.raises(BackendError, match=r"--qmp tcp:nowhere:1: 'nowhere' is not an IP address"):
        start_backend("--qmp", "tcp:nowhere:1", socket_path=vpnnet_run_dir / f"bad{os.getpid()}.sock")


def test_guest_lease_events_and_a_forwarded_connection(
    qmp_backend: Qmp, ns_guest: NsGuestFactory, tmp_path: Path
) -> None:
    watcher = qmp_backend.watch(
        "--count", "2", "--timeout", "60", "--event", "GUEST_CONNECTED", "--event", "GUEST_LEASE"
    )
    try:
        guest = ns_guest(backend=qmp_backend.backend, ipv6=False)
        lease = guest.dhcp()
        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 0, err
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    events = {e["event"]: e["data"] for e in map(json.loads, out.splitlines())}
    assert events["GUEST_LEASE"]["address"] == lease["ip"]
    assert "port" in events["GUEST_CONNECTED"]
    leases = qmp_backend.ctl_json("leases")
    assert isinstance(leases, list) and [x["address"] for x in leases] == [lease["ip"]]
    assert lease["ip"] in qmp_backend.ctl("leases").stdout
    stats = qmp_backend.ctl_json("stats")
    assert isinstance(stats, dict) and stats["guests"] == 1

    ready = tmp_path / "peer.ready"
    with open(tmp_path / "peer.log", "ab") as log:
        guest.popen([PY, str(PEER), str(ready), "guest", "echo:7"], stdout=log, stderr=subprocess.STDOUT)
    assert wait_until(lambda: ready.exists() and "READY" in ready.read_text(), 10)
    added = qmp_backend.ctl_json("hostfwd", "add", "tcp::0-:7")
    assert isinstance(added, list)
    port = added[0]["host-port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"ping through a QMP forward\n")
        assert sock.recv(100) == b"ping through a QMP forward\n"
        conns = qmp_backend.ctl_json("connections")
        assert isinstance(conns, list)
        forwarded = [c for c in conns if c.get("direction") == "forwarded"]
        assert len(forwarded) == 1 and forwarded[0]["state"] == "ESTABLISHED"
        assert "ESTABLISHED" in qmp_backend.ctl("connections").stdout
        assert "TCP[ESTABLISHED]" in qmp_backend.ctl("hmp", "info", "usernet").stdout
        qmp_backend.ctl("hostfwd", "remove", f"tcp::{port}", "--close-connections")
        sock.settimeout(10)
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass  # the forward's connection was reset, as asked
    assert not bound(port)

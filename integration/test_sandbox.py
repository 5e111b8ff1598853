"""Least privilege of the real backend (docs/security.rst): started as root with ``--user nobody``
it runs as nobody, with no-new-privileges and a seccomp filter (``/proc/PID/status``), and a
namespace guest still gets its lease, pings the gateway, fetches a page from the host, reaches a
``cmd:`` gateway service (a child under the same sandbox) and a forward; QMP still works, a port
below 1024 fails with the documented error and Landlock keeps capture files to the writable
directories. The suite's outbound, forward, DNS and QMP tests run once more under
``VPNNET_TEST_SANDBOX=1`` (scripts/test); these check the sandbox itself.

Servers run in this test process on the host's 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from integration.backend import Backend
from integration.fixtures import NsGuestFactory, StartBackend
from integration.test_capture import GATEWAY, tcpdump, traffic, web  # noqa: F401  (web: a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop it)")

SERVICE = "10.0.2.100"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A sticky, world-writable folder (like /tmp) for what the backend keeps after the drop."""
    path = Path(tempfile.mkdtemp(prefix="vpnt-sbx-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def qmp(path: Path, command: str, arguments: dict[str, object] | None = None) -> object:
    async def call() -> object:
        client = QMPClient("sandbox-test")
        await asyncio.wait_for(client.connect(str(path)), 10)
        try:
            return await client.execute(command, arguments)
        except ExecuteError as exc:
            return {"error": str(exc)}
        finally:
            await client.disconnect()

    return asyncio.run(call())


def wait_sandboxed(backend: Backend) -> dict[str, str]:
    backend.wait_for_log(r"serving net=")
    return status(backend.pid)


def test_dropped_to_nobody_every_feature_still_works(
    start_backend: StartBackend,
    ns_guest: NsGuestFactory,
    web: int,  # noqa: F811
    shared_dir: Path,
) -> None:
    qmp_path = shared_dir / "qmp.sock"
    state = shared_dir / "state.json"
    backend = start_backend(
        "--user",
        "nobody",
        "--qmp",
        f"unix:{qmp_path}",
        "--state",
        str(state),
        "--guestfwd",
        f"tcp:{SERVICE}:7-cmd:cat",
        socket_path=shared_dir / "net.sock",
    )
    st = wait_sandboxed(backend)
    assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4
    assert st["Groups"].strip() == "" and int(st["CapEff"], 16) == 0
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    log = backend.log_text()
    assert "sandbox: user nobody (uid 65534" in log and "sandbox: seccomp (" in log
    assert "sandbox: landlock ABI" in log and str(shared_dir) in log

    guest = ns_guest(backend=backend, ipv6=False)
    lease = guest.dhcp()
    assert lease["ip"] == "10.0.2.15"
    traffic(guest, web)  # ping the gateway, a page from the host
    echo = guest.run(
        [
            "python3",
            "-c",
            f"import socket; s = socket.create_connection(('{SERVICE}', 7), 5); s.sendall(b'through cat');"
            "s.shutdown(socket.SHUT_WR); print(s.makefile().read())",
        ],
        timeout=20,
    )
    assert echo.returncode == 0 and echo.stdout.strip() == "through cat", echo.stdout + echo.stderr

    # QMP: a port below 1024 fails with the reason; a free port works and is saved as nobody
    low = qmp(qmp_path, "hostfwd-add", {"rule": "tcp::80-:80"})
    assert low == {
        "error": "cannot listen on tcp 127.0.0.1:80: Permission denied (the backend dropped root and runs as "
        "nobody: ports below 1024 need --hostfwd at start)"
    }
    fwd = qmp(qmp_path, "hostfwd-add", {"rule": "tcp::0-:7"})
    assert isinstance(fwd, dict) and fwd["host-port"] > 1024
    assert any(f["host-port"] == fwd["host-port"] for f in json.loads(state.read_text())["hostfwd"])
    assert state.stat().st_uid == 65534

    # Landlock: captures only where the sandbox leaves writing
    denied = qmp(qmp_path, "capture-start", {"file": "/var/tmp/vpnnet-sandbox-test.pcap"})
    assert denied == {"error": "cannot open /var/tmp/vpnnet-sandbox-test.pcap: Permission denied"}
    assert not os.path.exists("/var/tmp/vpnnet-sandbox-test.pcap")
    pcap = shared_dir / "in-sandbox.pcap"
    assert isinstance(qmp(qmp_path, "capture-start", {"file": str(pcap), "filter": "icmp"}), dict)
    traffic(guest, web)
    qmp(qmp_path, "capture-stop")
    assert len(tcpdump(pcap)) == 4

    assert backend.stop() == 0
    assert not qmp_path.exists() and not (shared_dir / "net.sock").exists()  # removed by nobody


def test_sandbox_is_on_by_default_and_off_with_no_sandbox(start_backend: StartBackend) -> None:
    default = start_backend()
    st = wait_sandboxed(default)
    assert (st["NoNewPrivs"], st["Seccomp"], st["Uid"].split()[0]) == ("1", "2", "0")
    off = start_backend("--no-sandbox")
    st = wait_sandboxed(off)
    assert (st["NoNewPrivs"], st["Seccomp"]) == ("0", "0")
    assert "sandbox:" not in off.log_text()


PERSONALITY_PROBE = (
    "python3 -c 'import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
    'r = libc.syscall(135, 0xFFFFFFFF); print(r, os.strerror(ctypes.get_errno()) if r < 0 else "allowed")\''
)


def test_a_refused_system_call_fails_with_eperm_and_the_backend_goes_on(
    start_backend: StartBackend, ns_guest: NsGuestFactory, shared_dir: Path
) -> None:
    """A cmd: child inherits the filter: personality(2), not on the allow-list, fails with EPERM
    (not a kill); the backend keeps serving."""
    backend = start_backend("--guestfwd", f"tcp:{SERVICE}:8-cmd:{PERSONALITY_PROBE}")
    wait_sandboxed(backend)
    guest = ns_guest(backend=backend, ipv6=False)
    guest.dhcp()
    probe = guest.run(
        ["python3", "-c", f"import socket; print(socket.create_connection(('{SERVICE}', 8), 5).makefile().read())"],
        timeout=20,
    )
    assert probe.stdout.strip() == "-1 Operation not permitted", probe.stdout + probe.stderr
    assert backend.is_running()


def test_backend_as_nobody_still_dies_with_what_started_it(shared_dir: Path) -> None:
    """setuid clears the parent-death signal (setpriv --pdeathsig, which the harness uses): the
    backend sets it again after the drop, so it does not outlive a supervisor that was killed."""
    from integration.common import pid_alive, wait_until

    sock = shared_dir / "pd.sock"
    script = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen(['setpriv', '--pdeathsig', 'KILL', '--', sys.executable, '-m', 'qemu_vpnnet',\n"
        f"    '--socket', {str(sock)!r}, '--dns-upstream', '127.0.0.1:9', '--user', 'nobody'],\n"
        "    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ)
    if os.environ.get("VPNNET_TEST_INSTALLED", "") in ("", "0"):
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    supervisor = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd="/")
    try:
        assert supervisor.stdout is not None
        backend = int(supervisor.stdout.readline())
        assert wait_until(sock.is_socket, 15)
        assert wait_until(lambda: status(backend).get("Uid", "").split()[:1] == ["65534"], 5)
        supervisor.kill()
        supervisor.wait(5)
        assert wait_until(lambda: not pid_alive(backend), 5), "the backend outlived its supervisor"
    finally:
        supervisor.kill()
        supervisor.wait(5)
        if "backend" in locals() and pid_alive(backend):
            os.kill(backend, 9)

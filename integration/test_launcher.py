"""`qemu-vpnnet run [backend options] -- qemu-system-x86_64 ...` with a real VM, and its process handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from integration.common import REPO_ROOT, read_text
from integration.vmguest import VmGuest, VmImage

NO_DNS = ("--dns-upstream", "127.0.0.1:9")


class HostHttp:
    """An HTTP server on 127.0.0.1 (the guest reaches it as 10.0.2.2): /hello.txt, and /done, which
    answers "yes" once the test has set :attr:`done`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/hello.txt":
                    body = b"hello-from-the-host\n"
                elif self.path == "/done":
                    body = b"yes\n" if owner.done.is_set() else b"not-yet\n"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def host_http() -> Iterator[HostHttp]:
    server = HostHttp()
    yield server
    server.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LaunchedVm(VmGuest):
    """The tiny VM, started through `python -m qemu_vpnnet run [run_args] -- <QEMU command>`."""

    def __init__(self, *args: Any, run_args: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_args = list(run_args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "qemu_vpnnet", "run", *self.run_args, "--", *super().command()]


GUEST_SCRIPT = """\
timeout 15 wget -q -O- http://10.0.2.2:{http}/hello.txt || exit 3
httpd -p 80 -h /www
echo GUEST-HTTPD-UP
i=0
until timeout 5 wget -q -O- http://10.0.2.2:{http}/done 2>/dev/null | grep -q yes; do
  i=$((i+1)); [ $i -gt 120 ] && exit 9; sleep 0.5
done
exit 0
"""


@pytest.mark.parametrize("form", ["-nic", "-netdev", "vhost-user"])
def test_run_replaces_user_networking(
    form: str,
    vm_image: VmImage,
    host_http: HostHttp,
    tmp_path: Path,
    vpnnet_run_dir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """`run` boots the tiny VM with its user netdev replaced: lease, a fetch from the host, and the guest's
    web server through the forward translated from hostfwd=. "vhost-user" is `--transport vhost-user`
    with the user's own -device (which gets vectors=0 under TCG) and the RAM put in a memfd of -m's size."""
    fwd = free_port()
    transport: list[str] = []
    if form == "-nic":
        netdev = None
        qemu_args = ["-nic", f"user,model=virtio-net-pci,mac=52:54:00:12:34:77,hostfwd=tcp:127.0.0.1:{fwd}-:80"]
        mac = "52:54:00:12:34:77"
    else:
        netdev = f"user,id=n0,hostfwd=tcp::{fwd}-:80,net=10.0.2.0/24"
        qemu_args = []
        mac = "52:54:00:12:34:78"
        if form == "vhost-user":
            transport = ["--transport", "vhost-user"]
            mac = "52:54:00:12:34:79"
    backend_log = tmp_path / "backend.log"
    vm = LaunchedVm(
        GUEST_SCRIPT.format(http=host_http.port),
        netdev=netdev,
        mac=mac,
        image=vm_image,
        dhcp="once",
        qemu_args=qemu_args,
        log_path=tmp_path / "console.log",
        run_dir=vpnnet_run_dir,
        env={"PYTHONPATH": str(REPO_ROOT)},
        run_args=["--backend-log", str(backend_log), *transport, *NO_DNS],
    )
    try:
        vm.start()
        lease = vm.lease(60)
        assert lease["ip"] == "10.0.2.15" and lease["router"] == "10.0.2.2"
        vm.wait_for(r"hello-from-the-host\n", 30)
        vm.wait_for(r"GUEST-HTTPD-UP\n", 30)
        # The guest's web server, through the forward translated from QEMU's hostfwd=.
        with urllib.request.urlopen(f"http://127.0.0.1:{fwd}/", timeout=10) as reply:
            assert b"hello from qemu-vpnnet guest" in reply.read()
        host_http.done.set()
        assert vm.wait_exit(60) == 0
        assert vm.qemu_returncode == 0  # QEMU's status, passed through by `run`
        record_property("run_boot_to_poweroff_seconds", round(vm.elapsed, 2))
    finally:
        vm.kill()
    log = read_text(backend_log)
    assert "guest connected" in log and "stopping" in log, log
    assert f"lease: {mac} -> 10.0.2.15" in log
    if form == "vhost-user":
        assert "vhost-user /tmp/qemu-vpnnet-" in log, log


def run(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "qemu_vpnnet", "run", *NO_DNS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_run_exit_status_passes_through() -> None:
    p = run("--", "sh", "-c", "exit 7")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 7, err
    p = run("--", "sh", "-c", 'kill -TERM "$$"')
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM
    p = run("--", "qemu-system-x86_64", "-no-such-option")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert "-no-such-option" in err


def test_run_forwards_sigterm_and_stops_the_backend() -> None:
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        "print('ready', ' '.join(sys.argv[1:]), flush=True)\n"
        "time.sleep(60)\n"
    )
    p = run("--", sys.executable, "-c", child)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("ready -netdev stream,id=vpnnet0,server=off,addr.type=unix,addr.path=/tmp/qemu-vpnnet-")
    sock = line.split("addr.path=")[1].split()[0]
    pids = children(p.pid)
    backend = [c for c in pids if "qemu_vpnnet --socket" in cmdline(c)]
    assert len(backend) == 1, [cmdline(c) for c in pids]
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 42
    deadline = time.monotonic() + 5
    while not gone(backend[0]):
        assert time.monotonic() < deadline, "the backend outlived `run`"
        time.sleep(0.05)
    assert not os.path.exists(os.path.dirname(sock)), "the launcher's socket folder is left behind"


def test_run_reports_bad_arguments() -> None:
    p = run("--", "qemu-system-x86_64", "-nic", "user,restrict=on")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert err.strip() == "qemu-vpnnet run: -nic user: restrict=on is not supported by qemu-vpnnet " \
        "(the guest would reach the host's networks)"  # fmt: skip
    p = run("qemu-system-x86_64")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "missing '--'" in err
    p = run("--mtu", "5", "--", "sh", "-c", "exit 0")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "MTU 5 is out of range" in err
    assert "the backend exited with status 2 before listening" in err

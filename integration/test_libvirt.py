"""libvirt 9.0 with the qemu-vpnnet hook: a transient domain whose metadata asks for a backend.

The module fixture installs libvirt when it is missing (the suite runs as root) and starts
virtlogd and libvirtd when they are not running; it stops only what it started. Every test
uninstalls the hook and removes its domain, images and run folder, whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from integration.common import REPO_ROOT, parse_leases
from integration.vmguest import VmImage, default_accel, encode_script

VIRSH = ["virsh", "-c", "qemu:///system"]
IMAGES = Path("/var/lib/libvirt/images")
QEMU_LOGS = Path("/var/log/libvirt/qemu")
NS = "https://qemu-vpnnet.invalid/xmlns/1"
DAEMONS = ("virtlogd", "libvirtd")
NO_KVM = "/run/vpnnet-test-no-kvm"  # what libvirtd's /dev/kvm is (without_kvm)
QEMU_CONF = "/run/vpnnet-test-qemu.conf"  # and its /etc/libvirt/qemu.conf


def run(cmd: list[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def vpnnet(*args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "qemu_vpnnet", *args], env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


def daemon_pid(name: str) -> int | None:
    """The pid of a running (not zombie) process called `name`."""
    for word in run(["pgrep", "-x", name]).stdout.split():
        try:
            with open(f"/proc/{word}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return int(word)
        except OSError:
            continue
    return None


def ensure_libvirt() -> str | None:
    """None when libvirtd and virsh are there (installing them if needed), else why not."""
    if shutil.which("libvirtd") and shutil.which("virsh") and shutil.which("virtlogd"):
        return None
    if os.geteuid() != 0:
        return "libvirt is not installed and installing it needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "libvirt-daemon-system", "libvirt-clients"]
    result = run(install, timeout=900, env=env)
    if result.returncode != 0:
        run(["apt-get", "update"], timeout=600, env=env)
        result = run(install, timeout=900, env=env)
    if result.returncode != 0 or not shutil.which("libvirtd"):
        return f"cannot install libvirt: {result.stderr.strip()[-300:]}"
    return None


def without_kvm(daemon: str) -> list[str]:
    """The command that starts ``daemon`` (libvirtd) where it sees no usable /dev/kvm, unless the
    tests run with KVM (VPNNET_TEST_ACCEL=kvm).

    Without udev, /dev/kvm here is root's alone (0600) while libvirt's QEMU user is in group kvm:
    libvirt then probes QEMU with KVM, finds KVM unusable for that user at every domain start,
    and probes again, 45 s each time. In a mount namespace of its own, a root-only empty file
    bind-mounted over /dev/kvm makes both answers "no KVM": one probe, TCG domains as before. The
    machine's /dev/kvm is left as it is."""
    if daemon != "libvirtd" or default_accel() == "kvm" or not os.path.exists("/dev/kvm"):
        return [daemon]
    # libvirt would move /dev's mounts into each QEMU's own /dev and fails on this one: its QEMU
    # namespaces are off there, through a copy of qemu.conf bind-mounted in the same namespace.
    # Both files stay until the fixture stops the libvirtd it started.
    script = (
        f"touch {NO_KVM} && chmod 600 {NO_KVM} && mount --bind {NO_KVM} /dev/kvm"
        f" && cp /etc/libvirt/qemu.conf {QEMU_CONF} && echo 'namespaces = []' >> {QEMU_CONF}"
        f' && mount --bind {QEMU_CONF} /etc/libvirt/qemu.conf && exec "$0" "$@"'
    )
    return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, daemon]


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """libvirtd and virtlogd running (started here if they were not; stopped at the end if so)."""
    if os.geteuid() != 0:
        pytest.skip("the libvirt test needs root")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64")
    reason = ensure_libvirt()
    if reason is not None:
        pytest.skip(reason)
    started: list[int] = []
    try:
        for name in DAEMONS:
            if daemon_pid(name) is None:
                result = run([*without_kvm(name), "-d"], timeout=30)
                assert result.returncode == 0, f"{name} -d: {result.stderr}"
                deadline = time.monotonic() + 10
                while (pid := daemon_pid(name)) is None:
                    assert time.monotonic() < deadline, f"{name} did not start"
                    time.sleep(0.1)
                started.append(pid)
        deadline = time.monotonic() + 30
        while run([*VIRSH, "version"]).returncode != 0:
            assert time.monotonic() < deadline, "libvirtd does not answer"
            time.sleep(0.2)
        yield
    finally:
        for pid in reversed(started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
        if started:
            for path in (NO_KVM, QEMU_CONF):
                if os.path.exists(path):
                    os.unlink(path)


class HostHttp:
    """HTTP on 127.0.0.1 (the guest reaches it through the gateway, 10.0.2.2)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/hello.txt":
                    self.send_error(404)
                    return
                body = b"hello-from-the-host\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


GUEST_SCRIPT = """\
timeout 15 wget -q -O- http://10.0.2.2:{http}/hello.txt || exit 3
httpd -p 80 -h /www
echo GUEST-HTTPD-UP
sleep 600
"""


def domain_xml(name: str, image: dict[str, Path], console: Path, port: int, fwd: int, script: str) -> str:
    cmdline = f"console=ttyS0 quiet panic=-1 vpnnet.dhcp=once {encode_script(script)}"
    return f"""\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image["kernel"]}</kernel>
    <initrd>{image["initrd"]}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <metadata>
    <vpnnet:net xmlns:vpnnet="{NS}">
      <vpnnet:listen-tcp address="127.0.0.1" port="{port}"/>
      <vpnnet:hostfwd rule="tcp:127.0.0.1:{fwd}-:80"/>
      <vpnnet:option name="dns-upstream" value="127.0.0.1:9"/>
    </vpnnet:net>
  </metadata>
  <devices>
    <interface type='client'>
      <mac address='52:54:00:5e:00:01'/>
      <source address='127.0.0.1' port='{port}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='{console}'/></serial>
  </devices>
</domain>
"""


def vhost_user_domain_xml(name: str, image: dict[str, Path], console: Path, snippet: str, script: str) -> str:
    """A type='qemu' domain with `qemu-vpnnet libvirt xml --vhost-user --domain-type qemu`'s snippet put
    where its comment says: <metadata> and <memoryBacking> in <domain>, <interface> in <devices>,
    <qemu:override> after them, and the qemu namespace on the root element."""
    body = snippet.split("-->", 1)[1]
    metadata, rest = body.split("</metadata>", 1)
    backing, rest = rest.split("</memoryBacking>", 1)
    interface, override = rest.split("</interface>", 1)
    cmdline = f"console=ttyS0 quiet panic=-1 vpnnet.dhcp=once {encode_script(script)}"
    return f"""\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  {backing}</memoryBacking>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image["kernel"]}</kernel>
    <initrd>{image["initrd"]}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  {metadata}</metadata>
  <devices>
    {interface}</interface>
    <serial type='file'><source path='{console}'/></serial>
  </devices>
  {override}
</domain>
"""


class Setup:
    """Names, files and cleanup of one test's domain."""

    def __init__(self, vm_image: VmImage, run_root: Path, tag: str) -> None:
        self.name = f"vpnt-{os.getpid()}-{tag}"
        self.run_dir = run_root / f"libvirt-{tag}"
        self.hooks_dir = "/etc/libvirt/hooks"
        self.console = Path(f"/tmp/{self.name}.console.log")
        self.image = {
            "kernel": IMAGES / f"{self.name}-{vm_image.kernel.name}",
            "initrd": IMAGES / f"{self.name}-initrd.gz",
        }
        IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vm_image.kernel, self.image["kernel"])
        shutil.copyfile(vm_image.initrd, self.image["initrd"])
        self.console.write_bytes(b"")
        self.console.chmod(0o666)

    def install_hook(self) -> None:
        out = vpnnet("libvirt", "hook", "install", "--hooks-dir", self.hooks_dir, "--run-dir", str(self.run_dir))
        assert out.returncode == 0, out.stderr
        assert "reloaded libvirtd" in out.stdout, out.stdout
        time.sleep(1.0)  # libvirtd re-reads its hook folder in its reload thread

    def domain_exists(self) -> bool:
        return run([*VIRSH, "domstate", self.name]).returncode == 0

    def backend_pid(self) -> int | None:
        try:
            return int((self.run_dir / self.name / "backend.pid").read_text())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        if self.domain_exists():
            run([*VIRSH, "destroy", self.name])
            problems.append("domain left running")
        out = vpnnet("libvirt", "hook", "uninstall", "--hooks-dir", self.hooks_dir)
        if out.returncode != 0:
            problems.append(f"hook uninstall: {out.stderr}")
        pid = self.backend_pid()
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
            problems.append(f"backend {pid} left running")
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        for path in [*self.image.values(), self.console, QEMU_LOGS / f"{self.name}.log"]:
            path.unlink(missing_ok=True)
        return problems


def wait_file(path: Path, pattern: str, timeout: float) -> re.Match[str]:
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace").replace("\r", "")
        m = regex.search(text)
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"console did not show {pattern!r} within {timeout} s:\n{text[-3000:]}")
        time.sleep(0.1)


def destroy_and_check_released(setup: Setup, pid: int) -> None:
    """virsh destroy; the hook's release must stop the backend and leave no run directory."""
    out = run([*VIRSH, "destroy", setup.name])
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{pid}") or (setup.run_dir / setup.name).exists():
        assert time.monotonic() < deadline, "the hook did not stop the backend on release"
        time.sleep(0.1)
    assert not setup.domain_exists()
    assert list(setup.run_dir.iterdir()) == []


def test_libvirt_domain_with_hook_started_backend(
    libvirtd: None, vm_image: VmImage, vpnnet_run_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    setup = Setup(vm_image, vpnnet_run_dir, "d1")
    http = HostHttp()
    port, fwd = free_port(), free_port()
    xml = vpnnet_run_dir / f"{setup.name}.xml"
    xml.write_text(domain_xml(setup.name, setup.image, setup.console, port, fwd, GUEST_SCRIPT.format(http=http.port)))
    problems: list[str] = []
    try:
        setup.install_hook()
        started = time.monotonic()
        out = run([*VIRSH, "create", str(xml)], timeout=120)
        assert out.returncode == 0, out.stderr
        create_seconds = time.monotonic() - started
        pid = setup.backend_pid()
        assert pid is not None, "the hook started no backend"
        assert (setup.run_dir / setup.name / "backend.log").exists()

        wait_file(setup.console, r"^VPNNET-LEASE .*\n", 60)
        lease = parse_leases(setup.console.read_text(errors="replace").replace("\r", ""))[-1]
        assert lease["ip"] == "10.0.2.15" and lease["router"] == "10.0.2.2"
        wait_file(setup.console, r"^hello-from-the-host\n", 30)
        wait_file(setup.console, r"^GUEST-HTTPD-UP\n", 30)
        ready_seconds = time.monotonic() - started
        # The guest's web server through the forward declared in the domain's metadata.
        with urllib.request.urlopen(f"http://127.0.0.1:{fwd}/", timeout=10) as reply:
            assert b"hello from qemu-vpnnet guest" in reply.read()

        destroy_and_check_released(setup, pid)
        record_property("virsh_create_seconds", round(create_seconds, 2))
        record_property("create_to_guest_httpd_seconds", round(ready_seconds, 2))
        print(f"virsh create {create_seconds:.2f} s; lease, fetch and guest httpd up after {ready_seconds:.2f} s")
    finally:
        http.close()
        xml.unlink(missing_ok=True)
        problems = setup.cleanup()
    assert problems == []
    assert not Path(setup.hooks_dir, "qemu.d", "qemu-vpnnet").exists()


def test_libvirt_hook_failure_aborts_the_domain_start(libvirtd: None, vm_image: VmImage, vpnnet_run_dir: Path) -> None:
    setup = Setup(vm_image, vpnnet_run_dir, "d2")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = int(busy.getsockname()[1])
    xml = vpnnet_run_dir / f"{setup.name}.xml"
    xml.write_text(domain_xml(setup.name, setup.image, setup.console, port, free_port(), "exit 0\n"))
    problems: list[str] = []
    try:
        setup.install_hook()
        out = run([*VIRSH, "create", str(xml)], timeout=120)
        assert out.returncode != 0
        assert "qemu-vpnnet: backend for" in out.stderr and "exited with status 2" in out.stderr, out.stderr
        assert not setup.domain_exists()
        assert not (setup.run_dir / setup.name).exists()
    finally:
        busy.close()
        xml.unlink(missing_ok=True)
        problems = setup.cleanup()
    assert problems == []


def test_libvirt_vhost_user_domain_boots_leases_and_fetches_through_a_forward(
    libvirtd: None, vm_image: VmImage, vpnnet_run_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    """A libvirt domain with <interface type='vhostuser'> boots, leases and fetches through a forward.

    The XML is `qemu-vpnnet libvirt xml --vhost-user --domain-type qemu`'s: shared memfd RAM, QEMU
    connecting to the hook-started backend's RUN_DIR/DOMAIN/vhost-user.sock, and vectors=0 through
    <qemu:override> (without it QEMU 7.2 under TCG segfaults as the NIC starts)."""
    setup = Setup(vm_image, vpnnet_run_dir, "vu")
    http = HostHttp()
    fwd = free_port()
    snippet = vpnnet(
        "libvirt", "xml", "--vhost-user", "--domain", setup.name, "--domain-type", "qemu",
        "--mac", "52:54:00:5e:00:02", "--hostfwd", f"tcp:127.0.0.1:{fwd}-:80",
        "--option", "dns-upstream=127.0.0.1:9", "--run-dir", str(setup.run_dir),
    )  # fmt: skip
    assert snippet.returncode == 0, snippet.stderr
    xml = vpnnet_run_dir / f"{setup.name}.xml"
    script = GUEST_SCRIPT.format(http=http.port)
    xml.write_text(vhost_user_domain_xml(setup.name, setup.image, setup.console, snippet.stdout, script))
    sock = setup.run_dir / setup.name / "vhost-user.sock"
    problems: list[str] = []
    try:
        setup.install_hook()
        started = time.monotonic()
        out = run([*VIRSH, "create", str(xml)], timeout=120)
        assert out.returncode == 0, out.stderr
        pid = setup.backend_pid()
        assert pid is not None, "the hook started no backend"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f"\0--vhost-user\0{sock}\0".encode() in f.read()
        assert sock.is_socket()

        wait_file(setup.console, r"^VPNNET-LEASE .*\n", 60)
        lease = parse_leases(setup.console.read_text(errors="replace").replace("\r", ""))[-1]
        assert lease["ip"] == "10.0.2.15" and lease["router"] == "10.0.2.2"
        wait_file(setup.console, r"^hello-from-the-host\n", 30)
        wait_file(setup.console, r"^GUEST-HTTPD-UP\n", 30)
        ready_seconds = time.monotonic() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{fwd}/", timeout=10) as reply:
            assert b"hello from qemu-vpnnet guest" in reply.read()
        backend_log = (setup.run_dir / setup.name / "backend.log").read_text()
        assert f"guest connected: port=1 vhost-user {sock}" in backend_log, backend_log
        qemu_log = (QEMU_LOGS / f"{setup.name}.log").read_text(errors="replace")
        assert '"vectors":0' in qemu_log and "memory-backend-memfd" in qemu_log, qemu_log[-3000:]

        destroy_and_check_released(setup, pid)
        record_property("vhost_user_create_to_guest_httpd_seconds", round(ready_seconds, 2))
        print(f"vhost-user: lease, fetch and guest httpd up {ready_seconds:.2f} s after virsh create")
    finally:
        http.close()
        xml.unlink(missing_ok=True)
        problems = setup.cleanup()
    assert problems == []

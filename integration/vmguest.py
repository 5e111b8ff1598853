"""The tiny QEMU guest (vm-images/build.sh): a real Linux VM with virtio-net.

The guest's /init (vm-images/init) brings eth0 up with DHCP, prints
``VPNNET-LEASE ...`` lines, runs the test script passed on the kernel command
line, prints ``VPNNET-DONE rc=N`` and powers off. Everything the guest prints
arrives on its serial console, which :class:`VmGuest` collects.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .common import (
    VM_IMAGES,
    HarnessError,
    parse_leases,
    read_text,
    stop_process,
    tail,
    with_pdeathsig,
)

BUILD_SCRIPT = VM_IMAGES / "build.sh"
BUILD_DIR = VM_IMAGES / "build"
DEFAULT_MAC = "52:54:00:12:34:56"
#: COMMAND_LINE_SIZE on x86, including the terminating NUL.
CMDLINE_MAX = 2047

_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[ -/]*[@-~])")
_DONE_RE = re.compile(r"^VPNNET-DONE rc=(\d+)\n", re.MULTILINE)
_LEASE_LINE_RE = re.compile(r"^VPNNET-LEASE .*\n", re.MULTILINE)


class GuestError(HarnessError):
    """The VM did not print what was expected in time, or died."""


@dataclass(frozen=True)
class VmImage:
    """Kernel and initramfs of the test guest."""

    kernel: Path
    initrd: Path

    @property
    def is_uncompressed(self) -> bool:
        return self.kernel.name == "vmlinux"


def find_vm_image(build_dir: Path = BUILD_DIR) -> VmImage | None:
    """The built image, or None. Prefers the uncompressed ``vmlinux`` (PVH
    direct boot, about twice as fast under TCG); ``VPNNET_TEST_KERNEL`` and
    ``VPNNET_TEST_INITRD`` override the files."""
    kernel_env = os.environ.get("VPNNET_TEST_KERNEL")
    initrd_env = os.environ.get("VPNNET_TEST_INITRD")
    initrd = Path(initrd_env) if initrd_env else build_dir / "initrd.gz"
    if kernel_env:
        kernel = Path(kernel_env)
    elif (build_dir / "vmlinux").is_file():
        kernel = build_dir / "vmlinux"
    else:
        kernel = build_dir / "vmlinuz"
    if kernel.is_file() and initrd.is_file():
        return VmImage(kernel, initrd)
    return None


def ensure_vm_image(build_dir: Path = BUILD_DIR, *, rebuild_if_stale: bool = True) -> VmImage:
    """Build the image with vm-images/build.sh if needed; return it.

    The script itself is idempotent and quick when everything is up to date
    (it rebuilds the initramfs when vm-images/init or udhcpc.script changed).
    """
    image = find_vm_image(build_dir)
    if image is None or rebuild_if_stale:
        env = dict(os.environ)
        env["VPNNET_VM_BUILD_DIR"] = str(build_dir)
        result = subprocess.run(
            [str(BUILD_SCRIPT)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise GuestError(
                f"{BUILD_SCRIPT} failed (status {result.returncode}):\n{tail(result.stdout + result.stderr)}"
            )
        image = find_vm_image(build_dir)
    if image is None:
        raise GuestError(f"{BUILD_SCRIPT} ran but {build_dir} has no vmlinuz/initrd.gz")
    return image


def default_accel() -> str:
    """QEMU accelerator: ``VPNNET_TEST_ACCEL`` or ``tcg`` (KVM hangs on the CI
    machines; set VPNNET_TEST_ACCEL=kvm where it works)."""
    return os.environ.get("VPNNET_TEST_ACCEL", "tcg") or "tcg"


def encode_script(script: str) -> str:
    """The kernel parameter carrying ``script``: ``vpnnet.cmd=`` (base64) or,
    when shorter, ``vpnnet.cmdz=`` (gzip, then base64)."""
    data = script.encode()
    plain = "vpnnet.cmd=" + base64.b64encode(data).decode()
    packed = "vpnnet.cmdz=" + base64.b64encode(gzip.compress(data, 9, mtime=0)).decode()
    return packed if len(packed) < len(plain) else plain


def netdev_with_id(spec: str, netdev_id: str) -> str:
    """``spec`` (``user``, ``user,hostfwd=...``, ``stream,...``) with ``id=``."""
    parts = spec.split(",")
    if any(p.startswith("id=") for p in parts):
        return spec
    return ",".join([parts[0], f"id={netdev_id}", *parts[1:]])


def stream_netdev(socket_path: Path | str) -> str:
    """The ``-netdev`` spec (without id) of a client of a Unix stream socket."""
    return f"stream,server=off,addr.type=unix,addr.path={socket_path}"


def vhost_user_args(path: Path | str, memory_mb: int, mac: str, accel: str) -> list[str]:
    """QEMU arguments of a virtio-net NIC served by a vhost-user back-end at ``path``: the
    guest's RAM (``memory_mb``, as ``-m``) in a shared memfd, as vhost-user needs.

    Under TCG the NIC gets ``vectors=0`` (legacy INTx): QEMU 7.2 without KVM segfaults in
    msix_set_vector_notifiers when a vhost-user device starts with MSI-X."""
    device = f"virtio-net-pci,netdev=n0,mac={mac}"
    if accel.split(",")[0] == "tcg":
        device += ",vectors=0"
    return [
        "-object",
        f"memory-backend-memfd,id=vpnnet-mem,size={memory_mb}M,share=on",
        "-numa",
        "node,memdev=vpnnet-mem",
        "-chardev",
        f"socket,id=vpnnet-vu,path={path}",
        "-netdev",
        "vhost-user,id=n0,chardev=vpnnet-vu",
        "-device",
        device,
    ]


def wait_for_listener(socket_path: Path | str, timeout: float = 10.0) -> None:
    """check_listener, waiting up to ``timeout`` for the socket to appear (a backend creates its
    vhost-user socket just after the stream socket its start waited for)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    check_listener(socket_path)


def check_listener(socket_path: Path | str) -> None:
    """QEMU fails at start when nobody listens on the socket: check first."""
    try:
        mode = os.stat(socket_path).st_mode
    except FileNotFoundError:
        raise GuestError(f"no backend socket at {socket_path}") from None
    if not stat.S_ISSOCK(mode):
        raise GuestError(f"{socket_path} is not a socket")


class VmGuest:
    """One QEMU VM booting the tiny guest.

    ``script`` is a shell script (busybox sh) run after DHCP; ``None`` boots the
    demo mode (HTTP on port 80, TCP echo on port 7, never exits). The NIC is
    virtio-net-pci with ``mac`` on netdev ``n0``: ``socket_path`` for a
    ``-netdev stream`` client of the backend, or ``netdev`` for any spec
    (``"user"`` is QEMU's libslirp baseline); neither means no NIC.

    ``dhcp``: ``bg`` (udhcpc stays and renews), ``once`` or ``off``.
    ``qmp=True`` adds a QMP socket at :attr:`qmp_path` (hot-plug tests).
    The console is also written to ``log_path``, QEMU's stderr next to it.
    """

    def __init__(
        self,
        script: str | None = None,
        *,
        socket_path: Path | str | None = None,
        netdev: str | None = None,
        vhost_user_path: Path | str | None = None,
        mac: str = DEFAULT_MAC,
        image: VmImage | None = None,
        accel: str | None = None,
        memory_mb: int = 256,
        dhcp: str = "bg",
        append: str = "",
        qemu_args: Sequence[str] = (),
        qmp: bool = False,
        log_path: Path | str,
        run_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        qemu: str = "qemu-system-x86_64",
    ) -> None:
        if sum(x is not None for x in (socket_path, netdev, vhost_user_path)) > 1:
            raise ValueError("give one of socket_path, netdev and vhost_user_path")
        self.script = script
        self.vhost_user_path = Path(vhost_user_path) if vhost_user_path is not None else None
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.netdev = netdev
        self.mac = mac
        self.image = image
        self.accel = accel or default_accel()
        self.memory_mb = memory_mb
        self.dhcp = dhcp
        self.append = append
        self.qemu_args = list(qemu_args)
        self.log_path = Path(log_path)
        self.stderr_path = self.log_path.with_name(self.log_path.name + ".stderr")
        self.run_dir = Path(run_dir) if run_dir is not None else self.log_path.parent
        self.qmp_path: Path | None = self.run_dir / f"{self.log_path.stem}.qmp" if qmp else None
        self.env = dict(env or {})
        self.qemu = qemu
        self.process: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None
        self._started_at = 0.0
        self._raw = bytearray()
        self._clean = ""
        self._clean_len = 0
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None

    # --- command line -------------------------------------------------------

    def kernel_cmdline(self) -> str:
        words = ["console=ttyS0", "quiet", "panic=-1", f"vpnnet.dhcp={self.dhcp}"]
        if self.append:
            words.append(self.append)
        if self.script is not None:
            words.append(encode_script(self.script))
        cmdline = " ".join(words)
        if len(cmdline) > CMDLINE_MAX:
            raise ValueError(
                f"kernel command line is {len(cmdline)} bytes, the limit is {CMDLINE_MAX}: shorten the guest script"
            )
        return cmdline

    def command(self) -> list[str]:
        if self.image is None:
            raise RuntimeError("VmGuest needs an image (see ensure_vm_image)")
        cmd = [
            self.qemu,
            "-accel",
            self.accel,
            "-m",
            str(self.memory_mb),
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            self.kernel_cmdline(),
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-no-user-config",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ]
        spec = None
        if self.socket_path is not None:
            spec = stream_netdev(self.socket_path)
        elif self.netdev is not None:
            spec = self.netdev
        if spec is not None:
            cmd += ["-netdev", netdev_with_id(spec, "n0"), "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}"]
        elif self.vhost_user_path is not None:
            cmd += vhost_user_args(self.vhost_user_path, self.memory_mb, self.mac, self.accel)
        if self.qmp_path is not None:
            cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        return cmd + self.qemu_args

    # --- life cycle ---------------------------------------------------------

    def start(self) -> VmGuest:
        if self.process is not None:
            raise RuntimeError("VM already started")
        if self.socket_path is not None:
            check_listener(self.socket_path)
        if self.vhost_user_path is not None:
            wait_for_listener(self.vhost_user_path)
        if shutil.which(self.qemu) is None:
            raise GuestError(f"{self.qemu} not found")
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        env = dict(os.environ)
        env.update(self.env)
        with open(self.stderr_path, "wb") as err:
            err.write(f"$ {' '.join(cmd)}\n".encode())
            err.flush()
            self._started_at = time.monotonic()
            self.process = subprocess.Popen(
                with_pdeathsig(cmd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        self._reader = threading.Thread(target=self._read_console, daemon=True, name=f"console-{self.process.pid}")
        self._reader.start()
        return self

    def _read_console(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        with open(self.log_path, "ab", buffering=0) as log:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                log.write(data)
                with self._cond:
                    self._raw += data
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def kill(self, timeout: float = 5.0) -> int | None:
        """Stop QEMU (SIGTERM, then SIGKILL) and collect the rest of the console."""
        if self.process is None:
            return None
        rc = stop_process(self.process, timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return rc

    close = kill

    def __enter__(self) -> VmGuest:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    # --- console ------------------------------------------------------------

    def console_text(self) -> str:
        """The console so far, decoded, without CR and terminal escapes."""
        with self._cond:
            if self._clean_len != len(self._raw):
                text = self._raw.decode(errors="replace").replace("\r", "")
                self._clean = _ANSI_RE.sub("", text)
                self._clean_len = len(self._raw)
            return self._clean

    def stderr_text(self) -> str:
        return read_text(self.stderr_path)

    def _failure(self, what: str) -> GuestError:
        if self._eof and self.process is not None:
            try:  # the console closed: QEMU is exiting
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                pass
        status = "running"
        if self.process is not None and self.process.poll() is not None:
            status = f"exited with status {self.process.returncode}"
        return GuestError(
            f"VM ({status}) {what}\n--- console (tail) ---\n{tail(self.console_text())}"
            f"\n--- qemu stderr (tail) ---\n{tail(self.stderr_text(), 20)}"
        )

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0, *, pos: int = 0) -> re.Match[str]:
        """Wait until the console matches ``pattern`` (a str is compiled with
        re.MULTILINE) at or after offset ``pos`` of :meth:`console_text`.

        The console arrives in pieces: a ``$`` also matches at the end of a line
        still arriving. End the pattern with ``\\n`` to match whole lines.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                text = self.console_text()
                seen = len(self._raw)
            m = regex.search(text, pos)
            if m:
                return m
            with self._cond:
                eof = self._eof
                if not eof and len(self._raw) == seen:
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        self._cond.wait(min(remaining, 1.0))
            if eof:
                m = regex.search(self.console_text(), pos)
                if m:
                    return m
                raise self._failure(f"ended before printing {regex.pattern!r}")
            if time.monotonic() >= deadline:
                m = regex.search(self.console_text(), pos)
                if m:
                    return m
                raise self._failure(f"did not print {regex.pattern!r} within {timeout} s")

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for QEMU to exit; return the guest script's exit code (from its
        ``VPNNET-DONE rc=N`` line). Fails if QEMU does not exit in time or the
        guest died without that line (panic, QEMU error)."""
        if self.process is None:
            raise RuntimeError("VM not started")
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._failure(f"did not power off within {timeout} s") from None
        if self._reader is not None:
            self._reader.join(10)
        if self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self._started_at
        m = _DONE_RE.search(self.console_text())
        if m is None:
            raise self._failure("powered off without printing VPNNET-DONE")
        return int(m.group(1))

    @property
    def qemu_returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def elapsed(self) -> float:
        """Seconds since QEMU started."""
        return time.monotonic() - self._started_at

    def leases(self) -> list[dict[str, str]]:
        """Every ``VPNNET-LEASE`` line so far (bound, renew...), parsed."""
        return parse_leases(self.console_text())

    def lease(self, timeout: float = 60.0) -> dict[str, str]:
        """Wait for the first lease; return the latest one (see
        :func:`integration.common.parse_lease_line` for the keys)."""
        self.wait_for(_LEASE_LINE_RE, timeout)
        return self.leases()[-1]

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"<VmGuest pid={pid} mac={self.mac} accel={self.accel}>"

"""The backend under test as a subprocess: ``python -m qemu_vpnnet --socket PATH``."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .common import REPO_ROOT, HarnessError, read_text, stop_process, tail, with_pdeathsig

#: Upstream DNS given to a backend that would otherwise use the machine's
#: resolver: nothing listens there, so queries fail locally.
GUARD_DNS_UPSTREAM = "127.0.0.1:9"


def _option_values(args: Sequence[str], option: str) -> list[str]:
    """The values of ``option`` in ``args`` (``--opt VALUE`` and ``--opt=VALUE``), in order."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg[len(option) + 1 :])
    return values


def dns_guarded(args: Sequence[str], *, netns: str | None, module: str = "qemu_vpnnet") -> tuple[str, ...]:
    """``args`` made safe for a qemu_vpnnet backend in the root namespace: plus
    ``--dns-upstream 127.0.0.1:9`` unless a plain ``--dns-upstream IP`` is given
    (a ``DOMAIN=IP`` one covers only its domain), and plus ``--dns-mode forward``
    unless a mode is given; ``--dns-mode host`` there is refused (HarnessError).

    The machine's resolver (its /etc/resolv.conf, and getaddrinfo, which host
    mode calls) must never get test traffic; a backend in a test's own namespace
    reads that namespace's resolv.conf and hosts.
    """
    if netns is not None or module != "qemu_vpnnet":
        return tuple(args)
    modes = _option_values(args, "--dns-mode")
    if modes and modes[-1] != "forward":
        raise HarnessError(
            f"--dns-mode {modes[-1]} in the root namespace would ask this machine's resolver: "
            "run the backend in an NsHost namespace"
        )
    extra: list[str] = []
    if not any("=" not in value for value in _option_values(args, "--dns-upstream")):
        extra += ["--dns-upstream", GUARD_DNS_UPSTREAM]
    if not modes:
        extra += ["--dns-mode", "forward"]
    return (*args, *extra)


#: The user a backend drops to when VPNNET_TEST_SANDBOX=1 (docs/security.rst).
SANDBOX_USER = "nobody"


def sandboxed() -> bool:
    """VPNNET_TEST_SANDBOX=1: every backend starts as root and drops to ``--user nobody
    --sandbox`` (the suite's sandboxed pass, scripts/test)."""
    return os.environ.get("VPNNET_TEST_SANDBOX", "") not in ("", "0")


class BackendError(HarnessError):
    """The backend did not start, or did not log what a test waited for."""


class Backend:
    """One backend process.

    Runs ``[python, "-m", module, "--socket", socket_path, *args]`` with its
    stdout and stderr in ``log_path``, inside network namespace ``netns`` when
    given (``ip netns exec NETNS ...``, which execs: :attr:`pid` is the
    backend's own). The source tree is first on ``PYTHONPATH`` unless the
    environment variable ``VPNNET_TEST_INSTALLED=1`` asks for the installed
    (compiled) package.

    :meth:`start` returns once the Unix socket exists; :meth:`stop` sends
    SIGTERM, then SIGKILL. Also a context manager.
    """

    def __init__(
        self,
        *args: str,
        socket_path: Path | str,
        log_path: Path | str,
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
        module: str = "qemu_vpnnet",
        python: str = sys.executable,
        socket_arg: str | None = "--socket",
    ) -> None:
        self.args: tuple[str, ...] = args
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path)
        self.netns = netns
        self.module = module
        self.python = python
        self.socket_arg = socket_arg
        self.extra_env: dict[str, str] = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    # --- command line -------------------------------------------------------

    @property
    def command(self) -> list[str]:
        cmd = [self.python, "-m", self.module]
        if self.socket_arg is not None:
            cmd += [self.socket_arg, str(self.socket_path)]
        cmd += list(self.args)
        if sandboxed() and self.module.split(".")[0] == "qemu_vpnnet":
            cmd += ["--user", SANDBOX_USER, "--sandbox"]
        strace_dir = os.environ.get("VPNNET_TEST_STRACE")
        if strace_dir and self.module.split(".")[0] == "qemu_vpnnet":
            cmd_backend = cmd
            # every system call of every backend (and its children), unsandboxed, to re-derive the
            # seccomp allow-list (docs/security.rst): a line per call as it is made (a summary, -c,
            # is lost when the test kills strace); the pid of such a backend is strace's
            out = Path(strace_dir) / f"strace-{self.socket_path.name}-{os.getpid()}-{time.monotonic_ns()}.txt"
            # (setpriv: the backend gets SIGTERM when strace, its parent, is killed by the test)
            cmd = ["strace", "-f", "-qq", "-s", "0", "-o", str(out), "setpriv", "--pdeathsig", "TERM", "--"]
            cmd += [*cmd_backend, "--no-sandbox"]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def _installed(self) -> bool:
        """Run the installed package (not the source tree)? Harness modules always run from it."""
        wanted = os.environ.get("VPNNET_TEST_INSTALLED", "") not in ("", "0")
        return wanted and self.module.split(".")[0] == "qemu_vpnnet"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if not self._installed():
            paths = [str(REPO_ROOT)]
            if env.get("PYTHONPATH"):
                paths.append(env["PYTHONPATH"])
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"
        env.update(self.extra_env)
        return env

    # --- life cycle ---------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Backend:
        """Start and wait until ``socket_path`` is a listening socket's file."""
        if self.process is not None:
            raise RuntimeError("backend already started")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.is_socket():
            self.socket_path.unlink()
        installed = self._installed()
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                with_pdeathsig(self.command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd="/" if installed else REPO_ROOT,
            )
        if self.socket_arg is not None:
            self.wait_for_socket(timeout)
        return self

    def wait_for_socket(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._socket_ready():
                return
            if self.process is not None and self.process.poll() is not None:
                raise BackendError(
                    f"backend exited with status {self.process.returncode} before "
                    f"creating {self.socket_path}:\n{tail(self.log_text())}"
                )
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"backend did not create {self.socket_path} within {timeout} s:\n{tail(self.log_text())}"
                )
            time.sleep(0.02)

    def _socket_ready(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.socket_path).st_mode)
        except FileNotFoundError:
            return False

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait ``timeout``, SIGKILL. Returns the exit status."""
        if self.process is None:
            return None
        return stop_process(self.process, timeout)

    def __enter__(self) -> Backend:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- state --------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("backend not started")
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """Everything the backend wrote to stdout and stderr so far."""
        return read_text(self.log_path)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (re.MULTILINE); return the match."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.log_text())
            if m:
                return m
            if not self.is_running():
                raise BackendError(
                    f"backend exited (status {self.returncode}) before logging "
                    f"{regex.pattern!r}:\n{tail(self.log_text())}"
                )
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"backend did not log {regex.pattern!r} within {timeout} s:\n{tail(self.log_text())}"
                )
            time.sleep(0.05)

    @property
    def vhost_user_path(self) -> Path | None:
        """The socket of the backend's (last) ``--vhost-user`` option, if it has one."""
        paths = _option_values(self.args, "--vhost-user")
        return Path(paths[-1]) if paths else None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"<Backend {self.module} {self.socket_path} {state}>"

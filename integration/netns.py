"""Network namespaces made with pyroute2, and the sweep of leftovers.

Every namespace gets ``/etc/netns/NAME/resolv.conf`` *before* anything runs in
it: ``ip netns exec`` bind-mounts that file over ``/etc/resolv.conf`` only when
it exists, and a DHCP script would otherwise rewrite the machine's own. With
``hosts`` given, ``/etc/netns/NAME/hosts`` is written too and becomes the
namespace's ``/etc/hosts`` (names only that namespace's resolver library knows).
Both go with the folder at close.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from pyroute2 import IPRoute, netns

from .common import PREFIX, owner_pid, stale_owner, stop_process, with_pdeathsig

NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")

_File = int | IO[bytes] | IO[str] | None


def namespace_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_RUN / name)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def namespace_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name``."""
    ident = namespace_inode(name)
    if ident is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            pids.append(int(entry))
    return pids


def kill_namespace_processes(name: str, timeout: float = 3.0) -> None:
    """SIGKILL every process left in namespace ``name`` (all started in it by
    the harness or its tests), and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in namespace_pids(name) if p != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_namespace(name: str) -> None:
    """Kill what runs in ``name``, delete it and its /etc/netns folder."""
    kill_namespace_processes(name)
    if name in netns.listnetns():
        netns.remove(name)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


class Netns:
    """A named network namespace (visible to ``ip netns``) with lo up.

    :meth:`run` and :meth:`popen` run commands inside (``ip netns exec``);
    :meth:`iproute` is a pyroute2 ``IPRoute`` bound to it; :meth:`close`
    kills what runs inside and deletes it with its devices.
    """

    def __init__(self, name: str, *, resolv_conf: str = "", hosts: str | None = None) -> None:
        self.name = name
        self.initial_resolv_conf = resolv_conf
        self.initial_hosts = hosts
        self.created = False
        self.closed = False
        self._procs: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []

    @property
    def etc_dir(self) -> Path:
        return NETNS_ETC / self.name

    @property
    def resolv_conf_path(self) -> Path:
        """The file that is ``/etc/resolv.conf`` inside the namespace."""
        return self.etc_dir / "resolv.conf"

    @property
    def hosts_path(self) -> Path:
        """The file that is ``/etc/hosts`` inside the namespace (when ``hosts`` was given)."""
        return self.etc_dir / "hosts"

    def create(self) -> Netns:
        if self.created:
            raise RuntimeError(f"namespace {self.name} already created")
        if self.name in netns.listnetns():
            raise RuntimeError(f"namespace {self.name} exists already")
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        self.resolv_conf_path.write_text(self.initial_resolv_conf)
        if self.initial_hosts is not None:
            self.hosts_path.write_text(self.initial_hosts)
        netns.create(self.name)
        self.created = True
        with self.iproute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return self

    def set_resolv_conf(self, text: str) -> None:
        """Rewrite the namespace's resolv.conf in place (same inode, so the
        bind mount of running ``ip netns exec`` processes sees it too)."""
        with open(self.resolv_conf_path, "r+") as f:
            f.truncate(0)
            f.write(text)

    def set_hosts(self, text: str) -> None:
        """Rewrite the namespace's hosts file in place (it must have been given at creation)."""
        with open(self.hosts_path, "r+") as f:
            f.truncate(0)
            f.write(text)

    def resolv_conf(self) -> str:
        return self.resolv_conf_path.read_text()

    def iproute(self) -> IPRoute:
        """A pyroute2 IPRoute inside this namespace (use as a context manager)."""
        return IPRoute(netns=self.name)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(
        self,
        cmd: Sequence[str],
        timeout: float = 30.0,
        *,
        check: bool = False,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside; capture its output as text.

        Raises ``subprocess.TimeoutExpired`` after ``timeout`` (the command is
        killed) and, with ``check``, ``CalledProcessError`` on failure.
        """
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(
            with_pdeathsig([*self.exec_prefix(), *cmd]),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=full_env,
        )

    def ping(
        self, address: str, *, count: int = 1, timeout: float = 5.0, size: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """busybox ping from inside (the machine may have no iputils-ping);
        check ``.returncode == 0``. ``timeout`` is ping's -W (whole seconds)."""
        cmd = ["busybox", "ping", "-6" if ":" in address else "-4", "-c", str(count), "-W", str(max(1, round(timeout)))]
        if size is not None:
            cmd += ["-s", str(size)]
        return self.run([*cmd, address], timeout + count + 5)

    def popen(
        self,
        cmd: Sequence[str],
        *,
        stdin: _File = subprocess.DEVNULL,
        stdout: _File = None,
        stderr: _File = None,
        env: Mapping[str, str] | None = None,
        text: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside; it is killed at :meth:`close` at the latest.

        Output goes to the test's own stdout/stderr (captured by pytest) unless
        redirected. ``text`` only sets the pipes' mode.
        """
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            with_pdeathsig([*self.exec_prefix(), *cmd]),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=full_env,
            text=text,
        )
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Processes running inside the namespace."""
        return namespace_pids(self.name)

    def close(self) -> None:
        """Stop the processes started with :meth:`popen` (SIGTERM, then SIGKILL),
        kill anything else left inside, delete the namespace (its devices go
        with it) and /etc/netns/NAME. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for proc in self._procs:
            stop_process(proc, 3.0)
        self._procs.clear()
        remove_namespace(self.name)

    def __enter__(self) -> Netns:
        if not self.created:
            self.create()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def sweep(*, include_own: bool = True) -> list[str]:
    """Remove harness namespaces, links, /etc/netns and /tmp folders whose owner
    process (the PID in the name) is gone — and, with ``include_own``, this
    process's own. Other live test sessions' objects are left alone.
    Returns what was removed."""
    removed: list[str] = []

    def stale(name: str) -> bool:
        return stale_owner(name) and (include_own or owner_pid(name) != os.getpid())

    for name in netns.listnetns():
        if name.startswith(PREFIX + "-") and stale(name):
            remove_namespace(name)
            removed.append(f"netns {name}")
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get("ifname") or ""
            if ifname.startswith(PREFIX) and stale(ifname):
                try:
                    ipr.link("del", index=link["index"])
                    removed.append(f"link {ifname}")
                except Exception:  # gone already (the peer of a deleted veth)
                    pass
    for entry in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        # Socket folders of the fixtures (vpnnet_run_dir): /tmp/vpnt-PID-xxxx.
        if entry.is_dir() and stale(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(f"dir {entry}")
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.iterdir():
            if entry.name.startswith(PREFIX + "-") and stale(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(f"dir {entry}")
        try:
            NETNS_ETC.rmdir()  # only if empty: leave others' folders alone
        except OSError:
            pass
    return removed

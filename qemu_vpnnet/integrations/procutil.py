"""Small process and socket helpers shared by the integrations (attach, run, libvirt hook).

Nothing here imports the core or the event loop: the libvirt hook calls these on every domain
start and stop and should stay quick.
"""

import ctypes
import ctypes.util
import errno
import os
import signal
import socket
import stat
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


class IntegrationError(Exception):
    """A failure to report to the user as one line (exit status 1)."""


def set_pdeathsig(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn that has the kernel send `sig` to the child when its parent dies."""
    libc_name = ctypes.util.find_library("c") or "libc.so.6"

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except OSError:
            pass

    return preexec


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat ('R', 'S', 'Z'...), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # pid (comm) S ...: comm may contain spaces and parentheses; the state follows the last ')'.
    close = data.rfind(b")")
    if close < 0 or close + 2 >= len(data):
        return "?"
    return data[close + 2 : close + 3].decode("ascii", "replace")


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def reap(pid: int) -> None:
    """Collect `pid` if it is our child (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def terminate_pid(pid: int, timeout: float = 5.0, kill_timeout: float = 2.0) -> bool:
    """SIGTERM, wait up to `timeout`, then SIGKILL. True when the process is gone at the end."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, kill_timeout)):
        reap(pid)
        if not pid_alive(pid):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap(pid)
            if not pid_alive(pid):
                return True
            time.sleep(0.02)
    reap(pid)
    return not pid_alive(pid)


# ---- listening sockets -----------------------------------------------------------------------

SO_ACCEPTCON = 0x00010000  # the "Flags" column of /proc/net/unix for a listening socket
TCP_LISTEN = "0A"


def unix_listening_in_proc(path: str, proc_net_unix: str = "/proc/net/unix") -> bool | None:
    """Whether /proc/net/unix lists a listening socket bound to `path`: True, False (bound but
    not listening), or None (not listed in this network namespace)."""
    found: bool | None = None
    try:
        with open(proc_net_unix, encoding="utf-8", errors="replace") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) < 8 or fields[7].rstrip("\n") != path:
                    continue
                if int(fields[3], 16) & SO_ACCEPTCON:
                    return True
                found = False
    except OSError:
        return None
    return found


def check_unix_listener(path: str) -> None:
    """Raise IntegrationError unless a process listens on the Unix stream socket `path`.

    Reads /proc/net/unix first (no connection is made); a socket not listed there (it may live in
    another network namespace) is probed with a connect, which the backend sees as a guest that
    connects and leaves at once.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise IntegrationError(f"no backend socket at {path}: start `qemu-vpnnet --socket {path}` first") from None
    except PermissionError as exc:
        raise IntegrationError(f"cannot reach {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise IntegrationError(f"{path} is not a socket")
    listed = unix_listening_in_proc(os.path.abspath(path))
    if listed:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise IntegrationError(f"nobody listens on {path} (stale socket file): is the backend running?") from None
        if exc.errno == errno.EPROTOTYPE:
            raise IntegrationError(f"{path} is a datagram socket; attach needs a stream socket (--socket)") from None
        raise IntegrationError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def pid_listens_tcp(pid: int, port: int) -> bool:
    """Whether process `pid` has a TCP socket listening on `port` (any address)."""
    inodes = _socket_inodes(pid)
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        try:
            with open(table, encoding="ascii", errors="replace") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 10 or fields[3] != TCP_LISTEN:
                        continue
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    if local_port == port and int(fields[9]) in inodes:
                        return True
        except OSError:
            continue
    return False


def pid_listens_unix(pid: int, path: str) -> bool:
    """Whether process `pid` has a listening Unix socket bound to `path`."""
    inodes = _socket_inodes(pid)
    try:
        with open(f"/proc/{pid}/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) < 8 or fields[7].rstrip("\n") != path:
                    continue
                if int(fields[3], 16) & SO_ACCEPTCON and int(fields[6]) in inodes:
                    return True
    except OSError:
        return False
    return False

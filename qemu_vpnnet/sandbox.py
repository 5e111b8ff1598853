"""Least privilege, as passt does it: once its listening sockets are open the backend drops root
(``--user``), and then (``--sandbox``, the default) sets no-new-privileges, restricts the file
system to a few writable directories (Landlock) and the kernel interface to the system calls its
workload makes (seccomp). docs/security.rst explains it for users.

Order: setgroups/setgid/setuid; PR_SET_NO_NEW_PRIVS; Landlock (its own system calls are not in
the seccomp allow-list); seccomp with TSYNC, so every thread of the process (the resolver's
threads, the capture writer) gets the filter. All of it is inherited by child processes (the
``cmd:`` targets of gateway services): they run as the user, without the ability to gain
privileges, under the same rules -- the allow-list includes what small programs (cat, sh, nc,
socat) need, execve included.

The seccomp default action is ERRNO(EPERM), not KILL: a system call missing from the list fails
like a refused permission (logged by the program that made it) instead of killing the backend
with every guest's connections; with the log flag set the kernel also reports each one (``dmesg``
or the audit log: ``type=1326 ... syscall=NNN``). The list was derived by running the integration
tests under ``strace -f`` (``VPNNET_TEST_STRACE=DIR``, integration/backend.py) and adding what
error paths and children need.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import pwd
import struct
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger("qemu_vpnnet.sandbox")

PR_SET_NO_NEW_PRIVS: Final = 38
PR_SET_PDEATHSIG: Final = 1
PR_GET_PDEATHSIG: Final = 2

# ---- the user ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetUser:
    """Whom to become: --user USER[:GROUP]."""

    name: str
    uid: int
    gid: int

    def describe(self) -> str:
        try:
            group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            group = str(self.gid)
        return f"{self.name} (uid {self.uid}, gid {self.gid} {group})"


def parse_user(text: str) -> TargetUser:
    """USER[:GROUP], names or numbers; GROUP defaults to USER's primary group. ValueError says why."""
    user, _, group = text.partition(":")
    if not user:
        raise ValueError(f"--user {text!r}: expected USER[:GROUP]")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        name, uid, gid = entry.pw_name, entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            raise ValueError(f"--user {text!r}: no user {user!r}") from None
        name, uid, gid = user, int(user), int(user)  # a bare uid with no passwd entry
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"--user {text!r}: no group {group!r}") from None
    if uid == 0:
        raise ValueError(f"--user {text!r}: that is root")
    return TargetUser(name, uid, gid)


def drop_privileges(user: TargetUser) -> None:
    """Become user: no supplementary groups, then real, effective and saved gid and uid. Raises
    OSError when the kernel refuses, RuntimeError when root could be regained."""
    death_signal = parent_death_signal()  # the kernel clears it when the credentials change
    parent = os.getppid()
    os.setgroups([])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if death_signal:
        set_parent_death_signal(death_signal)
        if os.getppid() != parent:  # the parent died in between: the signal would never come
            os.kill(os.getpid(), death_signal)
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3 or os.getgroups():
        raise RuntimeError(f"dropping to {user.describe()} did not take")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("root could be regained after dropping privileges")


def parent_death_signal() -> int:
    """The signal this process gets when its parent dies (prctl PR_GET_PDEATHSIG; 0: none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(0)
    if libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) != 0:
        return 0
    return value.value


def set_parent_death_signal(sig: int) -> None:
    """Keep a supervisor's parent-death signal (setpriv --pdeathsig, a test harness) across the
    drop of privileges, which clears it: a backend must not outlive what started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def hand_over(paths: list[str], user: TargetUser) -> None:
    """Give the user the files the backend created as root (its Unix sockets), so it can remove
    them at exit (in a sticky /tmp only the owner may) and clients of that user can connect."""
    for path in paths:
        try:
            os.lchown(path, user.uid, user.gid)
        except FileNotFoundError:
            continue


def no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def no_new_privs_set() -> bool:
    with open("/proc/self/status") as f:
        return any(line.split() == ["NoNewPrivs:", "1"] for line in f)


# ---- Landlock ------------------------------------------------------------------------------

SYS_LANDLOCK_CREATE_RULESET: Final = 444
SYS_LANDLOCK_ADD_RULE: Final = 445
SYS_LANDLOCK_RESTRICT_SELF: Final = 446
LANDLOCK_CREATE_RULESET_VERSION: Final = 1
LANDLOCK_RULE_PATH_BENEATH: Final = 1

FS_EXECUTE: Final = 1 << 0
FS_WRITE_FILE: Final = 1 << 1
FS_READ_FILE: Final = 1 << 2
FS_READ_DIR: Final = 1 << 3
FS_REMOVE_DIR: Final = 1 << 4
FS_REMOVE_FILE: Final = 1 << 5
FS_MAKE_CHAR: Final = 1 << 6
FS_MAKE_DIR: Final = 1 << 7
FS_MAKE_REG: Final = 1 << 8
FS_MAKE_SOCK: Final = 1 << 9
FS_MAKE_FIFO: Final = 1 << 10
FS_MAKE_BLOCK: Final = 1 << 11
FS_MAKE_SYM: Final = 1 << 12
FS_REFER: Final = 1 << 13  # ABI 2
FS_TRUNCATE: Final = 1 << 14  # ABI 3

# Only changes to the file system are handled (restricted): reading and executing stay as the
# user's permissions allow (Python imports lazily; the resolver reads /etc; cmd: runs programs).
WRITE_ACCESS_V1: Final = (
    FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_CHAR
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_BLOCK
    | FS_MAKE_SYM
)
FILE_ACCESS: Final = FS_WRITE_FILE | FS_TRUNCATE  # the rights a rule on a file (not a directory) may carry
WRITABLE_FILES: Final = ("/dev/null",)  # children write their stderr there, and so may we


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is disabled at boot)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = int(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION))
    return max(version, 0)


def handled_access(abi: int) -> int:
    access = WRITE_ACCESS_V1
    if abi >= 2:
        access |= FS_REFER
    if abi >= 3:
        access |= FS_TRUNCATE
    return access


def apply_landlock(writable: list[str], abi: int) -> list[str]:
    """Restrict this process (and its future children) to writing only below the directories in
    writable (and to the files of WRITABLE_FILES); the directories that could be opened."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    handled = handled_access(abi)
    attr = struct.pack("=Q", handled)  # struct landlock_ruleset_attr, its first member (ABI 1..)
    ruleset = int(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), 0))
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    allowed: list[str] = []
    try:
        for path in [*writable, *WRITABLE_FILES]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("sandbox: cannot keep %s writable: %s", path, exc.strerror or exc)
                continue
            try:
                is_dir = os.path.isdir(path)
                rights = handled if is_dir else handled & FILE_ACCESS
                # struct landlock_path_beneath_attr { __u64 allowed_access; __s32 parent_fd; } packed
                rule = struct.pack("=Qi", rights, fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule {path}: {os.strerror(err)}")
                if is_dir:
                    allowed.append(path)
            finally:
                os.close(fd)
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return allowed


# ---- seccomp -------------------------------------------------------------------------------

# Every system call the backend's workload makes (strace -f over the integration tests: TCP,
# UDP, ping, DNS forward and host mode with getaddrinfo in threads, QMP, TCP/UDP forwards, gateway
# services with cmd: children, capture, the policy and zone file watchers), plus what their error
# paths and small child programs need. Not here, among others: ptrace, mount/umount2, pivot_root,
# chroot, unshare/setns, bpf, perf_event_open, keyctl/add_key, the module and kexec calls, reboot,
# userfaultfd, process_vm_*, io_uring_*, open_by_handle_at, setuid/setgid and their kin, personality.
# fmt: off
ALLOWED_SYSCALLS: Final = (
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mlock", "munlock", "membarrier",
    # files and descriptors
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "open", "openat", "openat2", "close", "close_range", "creat", "lseek", "fstat", "stat", "lstat",
    "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getdents64", "getcwd", "chdir", "fchdir", "rename", "renameat", "renameat2",
    "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir", "chmod", "fchmod", "fchmodat", "umask",
    "ftruncate", "truncate", "fsync", "fdatasync", "fallocate", "fadvise64", "flock", "fcntl",
    "dup", "dup2", "dup3", "pipe", "pipe2", "ioctl", "sendfile", "splice", "copy_file_range",
    "utimensat", "futimesat", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    "getxattr", "lgetxattr", "fgetxattr",
    # sockets
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "shutdown",
    "getsockname", "getpeername", "setsockopt", "getsockopt", "sendto", "recvfrom", "sendmsg",
    "recvmsg", "sendmmsg", "recvmmsg",
    # waiting, events, time
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "poll", "ppoll", "select", "pselect6", "eventfd", "eventfd2", "timerfd_create", "timerfd_settime",
    "timerfd_gettime", "signalfd", "signalfd4", "futex", "futex_waitv", "nanosleep", "clock_nanosleep",
    "clock_gettime", "clock_getres", "gettimeofday", "time", "sched_yield", "pause",
    # signals
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigqueueinfo",
    "sigaltstack", "kill", "tgkill", "tkill",
    # threads and processes (the resolver's threads; cmd: children, which also exec)
    "clone", "clone3", "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid",
    "set_tid_address", "set_robust_list", "get_robust_list", "rseq", "arch_prctl", "prctl",
    "setsid", "setpgid", "getpgid", "getpgrp", "getsid", "sched_getaffinity", "sched_setaffinity",
    "sched_getparam", "sched_getscheduler", "getpriority", "setpriority",
    # identity and limits (reading only)
    "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getgroups", "getrlimit", "prlimit64", "getrusage", "sysinfo", "uname", "getrandom", "times",
    # libuv (1.52, in uvloop) sets up an io_uring when the loop is made, before the filter, and
    # aborts when io_uring_enter fails; io_uring_setup (new rings) and _register stay refused
    "io_uring_enter",
)
# fmt: on


def seccomp_available() -> str | None:
    """None when a filter can be installed here; else why not."""
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError) as exc:  # RuntimeError: pyseccomp found no libseccomp.so
        return f"libseccomp's bindings are not usable ({exc}; pip install pyseccomp, apt install libseccomp2)"
    return None


def apply_seccomp() -> int:
    """Install the allow-list on every thread of this process; the number of system calls allowed."""
    import pyseccomp

    flt = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.EPERM))
    flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)  # all threads, the resolver's already running
    try:
        flt.set_attr(pyseccomp.Attr.CTL_LOG, 1)  # the kernel logs each refusal
    except OSError:
        pass
    allowed = 0
    for name in ALLOWED_SYSCALLS:
        try:
            flt.add_rule(pyseccomp.ALLOW, name)
        except (OSError, RuntimeError, ValueError):
            continue  # not a system call of this architecture (or unknown to this libseccomp)
        allowed += 1
    flt.load()
    return allowed


# ---- imports before the drop ------------------------------------------------------------------

# Imported on first use, after the drop, by the standard library: a Python installed where the
# user cannot read (pyenv under /root, mode 0700) would fail there ("unknown encoding: idna").
STDLIB_PRELOAD: Final = (
    "encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_8", "stringprep",
    "unicodedata", "ctypes.util", "concurrent.futures.thread", "asyncio.subprocess", "subprocess",
    "shlex", "json", "tempfile", "traceback", "linecache", "tokenize", "email.utils",
)  # fmt: skip


def preload(everything: bool) -> None:
    """Import now what the backend imports lazily, while its files can still be read: the codecs
    and modules above, the seccomp bindings and, with everything, every qemu_vpnnet module."""
    import codecs
    import importlib
    import pkgutil

    import qemu_vpnnet

    names = list(STDLIB_PRELOAD)
    if everything:
        names += [m.name for m in pkgutil.walk_packages(qemu_vpnnet.__path__, "qemu_vpnnet.")]
    for name in names:
        if name == "qemu_vpnnet.__main__":
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional part (libvirt bindings, ...): it was not usable anyway
            log.debug("sandbox: preloading %s: %s", name, exc)
    for codec in ("idna", "ascii", "latin-1", "utf-8"):
        codecs.lookup(codec)
    seccomp_available()


# ---- all together --------------------------------------------------------------------------


@dataclass
class Lockdown:
    """What to apply once the listeners are open, and what was applied."""

    user: TargetUser | None = None
    sandbox: bool = True
    writable: list[str] = field(default_factory=list)  # directories that stay writable
    created: list[str] = field(default_factory=list)  # files made as root, handed to the user
    applied: list[str] = field(default_factory=list)

    def apply(self) -> None:
        """Drop privileges and sandbox; OSError/RuntimeError when --user cannot be honoured (a
        sandbox part the kernel lacks is skipped, and said so in the log)."""
        if self.user is not None or self.sandbox:
            preload(everything=self.user is not None)
        if self.user is not None:
            if os.geteuid() != 0:
                if os.geteuid() != self.user.uid:
                    raise RuntimeError(f"--user {self.user.name}: only root can change user")
            else:
                hand_over(self.created, self.user)
                drop_privileges(self.user)
                self.applied.append(f"user {self.user.describe()}")
        if not self.sandbox:
            return
        no_new_privs()
        self.applied.append("no-new-privileges")
        abi = landlock_abi()
        if abi:
            dirs = apply_landlock(unique_dirs(self.writable), abi)
            self.applied.append(f"landlock ABI {abi} (writable: {', '.join(dirs) or 'nothing'})")
        else:
            log.info("sandbox: this kernel has no Landlock; the file system is not restricted")
        why_not = seccomp_available()
        if why_not is None:
            self.applied.append(f"seccomp ({apply_seccomp()} system calls allowed, others fail with EPERM)")
        else:
            log.warning("sandbox: no seccomp filter: %s", why_not)


def unique_dirs(paths: list[str]) -> list[str]:
    """The existing directories of paths, each once, in order."""
    seen: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen:
            seen.append(real)
    return seen

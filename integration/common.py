"""Shared pieces of the integration harness: paths, names, processes, leases."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
VM_IMAGES = REPO_ROOT / "vm-images"
UDHCPC_SCRIPT = VM_IMAGES / "udhcpc.script"

#: Prefix of every namespace (``vpnt-PID-...``) and link (``vpntPID...``) the
#: harness creates. The PID is the owning test process: a sweep removes only
#: leftovers of processes that are gone (or its own), so concurrent test
#: sessions on one machine leave each other alone.
PREFIX = "vpnt"
IFNAMSIZ = 15

_counter = itertools.count(1)


class HarnessError(AssertionError):
    """A guest, namespace or backend did not do what the test waited for.

    An ``AssertionError`` so pytest reports it as a test failure with the
    message (console or log tail) in full.
    """


def unique_names(kind: str) -> tuple[str, str]:
    """A fresh (namespace name, link name) pair for this process.

    ``kind`` is one lowercase letter (g: guest, h: host, o: outside, ...).
    The namespace is ``vpnt-PID-kN``, the link ``vpntPIDkN`` (at most 15 bytes).
    """
    if not re.fullmatch(r"[a-z]", kind):
        raise ValueError(f"kind must be one lowercase letter, not {kind!r}")
    n = next(_counter)
    link = f"{PREFIX}{os.getpid()}{kind}{n}"
    if len(link) > IFNAMSIZ:
        raise RuntimeError(f"link name {link!r} longer than {IFNAMSIZ} bytes")
    return f"{PREFIX}-{os.getpid()}-{kind}{n}", link


def unique_mac() -> str:
    """A locally unique MAC in QEMU's 52:54:00 range, distinct per call."""
    pid = os.getpid() & 0xFFFF
    n = next(_counter) & 0xFF
    return f"52:54:00:{pid >> 8:02x}:{pid & 0xFF:02x}:{n:02x}"


def owner_pid(name: str) -> int | None:
    """The owning PID encoded in a harness namespace or link name, else None."""
    m = re.match(rf"{PREFIX}-?(\d+)", name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_owner(name: str) -> bool:
    """True for a harness name whose owner is dead or is this very process."""
    pid = owner_pid(name)
    return pid is not None and (pid == os.getpid() or not pid_alive(pid))


def with_pdeathsig(cmd: list[str]) -> list[str]:
    """Prefix ``cmd`` so the child is SIGKILLed if the test process dies.

    Uses util-linux ``setpriv --pdeathsig`` (the setting survives the exec of
    ``ip netns exec``). Without setpriv the command runs unchanged.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return cmd
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd]


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5.0) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
    return proc.returncode


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


#: A refusal (RST or ICMP error) must come back at once, not after a connect timeout.
PROMPT_MS = 1000


def refused_fast(outcome: dict[str, Any], *how: str) -> bool:
    """True if a guest client's ``outcome`` is one of the errors ``how`` within PROMPT_MS."""
    return outcome["result"] in how and outcome["ms"] < PROMPT_MS


def fastest_icmp_refusal(attempt: Callable[[], dict[str, Any]], *how: str, tries: int = 3) -> dict[str, Any]:
    """A guest TCP connect the backend answers with an ICMP error: run ``attempt`` until one
    outcome is ``refused_fast``, at most ``tries`` times, and return that one (else the last).

    Each outcome must be one of the errors ``how`` (so ICMP came back each time; without it
    connect() times out) -- only the time is given more than one chance, because Linux keeps
    an ICMP error for a SYN_SENT socket as a soft error when it arrives while the connecting
    thread still holds the socket lock (tcp_v4_err, tcp_v6_err), and connect() then fails on
    the answer to the SYN retransmitted 1 s later. The backend answers in well under a
    millisecond, so the guest thread has to be descheduled between sending its SYN and going
    to sleep: rare, but seen once on a loaded CI machine. An RST is never lost that way (it is
    queued to the socket's backlog), so refusals by RST are not given a second chance.
    """
    outcome: dict[str, Any] = {}
    for _ in range(tries):
        outcome = attempt()
        assert outcome["result"] in how, outcome
        if refused_fast(outcome, *how):
            return outcome
    return outcome


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --- DHCP lease lines printed by vm-images/udhcpc.script --------------------

#: Complete lines only (a line still arriving on a console has no newline yet).
LEASE_RE = re.compile(r"^VPNNET-LEASE (.*)\n", re.MULTILINE)


def parse_lease_line(line: str) -> dict[str, str]:
    """Parse ``VPNNET-LEASE k=v k=v ...`` (or just ``k=v ...``) into a dict.

    Keys: ip, mask (prefix length), router, dns, mtu, lease (seconds), domain,
    search, subnet (dotted), broadcast, serverid, hostname, staticroutes,
    iface, event (bound or renew). Lists are comma-separated; absent values
    are empty strings.
    """
    line = line.strip()
    if line.startswith("VPNNET-LEASE"):
        line = line[len("VPNNET-LEASE") :]
    lease: dict[str, str] = {}
    for word in line.split():
        key, sep, value = word.partition("=")
        if sep:
            lease[key] = value
    return lease


def parse_leases(text: str) -> list[dict[str, str]]:
    """All lease lines in ``text``, oldest first."""
    return [parse_lease_line(m.group(1)) for m in LEASE_RE.finditer(text)]

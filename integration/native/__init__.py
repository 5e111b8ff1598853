"""Small native helpers of the harness, compiled on first use (never committed as binaries)."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"


def whole_writes_library() -> str:
    """Path of the LD_PRELOAD shim that keeps QEMU's stream writes whole (whole_writes.c)."""
    source = HERE / "whole_writes.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = BUILD / f"whole_writes-{digest}.so"
    if target.exists():
        return str(target)
    BUILD.mkdir(exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            subprocess.run(
                ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(source), "-ldl"],
                check=True,
                capture_output=True,
            )
            tmp.rename(target)
    return str(target)

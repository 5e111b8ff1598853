"""glibc's malloc set for a packet pump: the heap is not given back to the kernel after each batch.

Every read from QEMU becomes a few hundred frame-sized objects that are freed again once the
batch has gone through the stack. With glibc's defaults (a trim threshold that starts at 128 KiB
and moves with the mmap threshold) freeing a batch often leaves more than the threshold free at
the top of the heap, so free() shrinks the heap with brk(), and the next batch faults the same
pages back in, each one zeroed by the kernel: 10 % of the backend's CPU on a UDP stream from a
guest (perf: exc_page_fault and clear_page under _int_malloc, __brk under free).

A fixed trim threshold keeps up to TRIM_THRESHOLD bytes of free heap mapped (a bound: above it
the heap is trimmed as before). Fixing it turns glibc's moving mmap threshold off, so that one is
fixed too, at MMAP_THRESHOLD: a buffer smaller than that (a 64 KiB segment, a 256 KiB host read)
comes from the heap, not from an mmap() and munmap() of its own each time.

Only on glibc (musl and others have no mallopt, or another allocator); a failure is not fatal.
"""

import ctypes
import ctypes.util
import logging
import platform
from typing import Final

log = logging.getLogger("qemu_vpnnet")

M_TRIM_THRESHOLD: Final = -1  # malloc.h
M_MMAP_THRESHOLD: Final = -3
TRIM_THRESHOLD: Final = 16 << 20
MMAP_THRESHOLD: Final = 4 << 20


def tune_malloc() -> bool:
    """Set glibc's trim and mmap thresholds; True if both took."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        log.debug("malloc tuning: no mallopt: %s", exc)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
    if not done:
        log.debug("malloc tuning: mallopt refused")
    return done

"""Adaptive busy polling: trade a little CPU for round-trip latency on request/response traffic.

Every frame crosses two sleeping processes more than with QEMU's built-in libslirp (QEMU's
stream to us, our socket to the host server), and on a virtual machine each wake-up from idle
costs tens of microseconds. So after a light turn of the loop (a few small frames, the mark of a
request or its reply) the backend keeps polling its sockets without sleeping for a short window:
a reply that comes back within it is handled at once. Bulk transfers never start a window (their
turns move many kilobytes, and so do the last few milliseconds around their lighter turns, such
as an ACK that releases nothing), and when windows keep expiring with nothing caught (sparse traffic)
polling pauses, so an idle or bulk backend spends nothing on it. Off with a window of 0.

Polling also pauses when the CPU is contended: each poll yields the CPU, and when that yield
returns only after CONTENDED seconds, another task wanted our CPU. There the poller gains nothing
(events arrive all the time) and costs much: a task that yields goes behind the others, while one
that sleeps in epoll is woken ahead of them. Measured with wrk's 32 connections on 2 CPUs: 2100-2570
connections/s polling, 2220-3350 without.
"""

import asyncio
import os
import time
from collections.abc import Callable
from typing import Final

LIGHT_BYTES: Final = 4096  # a turn that moved less than this may be a request or a reply
RATE_SPAN: Final = 0.002  # seconds per bucket of the recent byte rate
BULK_BYTES: Final = 65536  # bytes in the last bucket and this one that mean bulk: no polling
MAX_MISSES: Final = 8  # windows in a row that caught nothing: pause
PAUSE: Final = 1.0  # seconds without polling after MAX_MISSES
CONTENDED: Final = 0.0002  # a yield that took this long: another task ran on our CPU meanwhile
CONTENDED_PAUSE: Final = 0.1  # seconds without polling after that


class BusyPoller:
    """Keeps the event loop polling (never blocking) for `window` seconds after light activity."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        window: float,
        clock: Callable[[], float] = time.perf_counter,
        yield_cpu: Callable[[], None] = os.sched_yield,
    ) -> None:
        self.loop = loop
        self.window = window
        self.clock = clock
        self.yield_cpu = yield_cpu
        self.until = 0.0
        self.spinning = False
        self.misses = 0
        self.paused_until = 0.0
        self.hits = 0  # windows that caught an event (introspection and tests)
        self.windows = 0
        self.contended = 0  # windows ended because another task wanted the CPU
        self.bucket_start = 0.0
        self.bucket_bytes = 0
        self.last_bucket_bytes = 0

    def activity(self, moved_bytes: int) -> None:
        """After a turn that handled an event: moved_bytes crossed the stack during it."""
        if self.window <= 0:
            return
        now = self.clock()
        if self.spinning:
            self.hits += 1
            self.misses = 0
        if now - self.bucket_start >= RATE_SPAN:
            # the previous bucket counts only if it is the one just before this
            self.last_bucket_bytes = self.bucket_bytes if now - self.bucket_start < 2 * RATE_SPAN else 0
            self.bucket_start = now
            self.bucket_bytes = 0
        self.bucket_bytes += moved_bytes
        if (
            moved_bytes >= LIGHT_BYTES
            or self.bucket_bytes + self.last_bucket_bytes >= BULK_BYTES
            or now < self.paused_until
        ):
            return
        self.until = now + self.window
        if not self.spinning:
            self.spinning = True
            self.windows += 1
            self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        # each call_soon makes the loop poll its sockets with a zero timeout before running us
        now = self.clock()
        if now < self.until:
            # and the CPU goes first to anything else runnable on it: after bulk traffic the
            # scheduler often keeps QEMU or the guest's process on our CPU, and a poller that
            # does not yield delays the very frames it waits for (measured: round-trip p99
            # 380-400 -> 170-200 us right after iperf3 runs; median unchanged)
            self.yield_cpu()
            if self.clock() - now >= CONTENDED:
                self.spinning = False
                self.contended += 1
                self.paused_until = now + CONTENDED_PAUSE
                return
            self.loop.call_soon(self._poll)
            return
        self.spinning = False
        self.misses += 1
        if self.misses >= MAX_MISSES:
            self.misses = 0
            self.paused_until = now + PAUSE

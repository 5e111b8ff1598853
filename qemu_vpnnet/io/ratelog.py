"""Log lines a guest (or a host peer) can trigger at will, at most once per key per interval.

A booting VM's ssh retries against a forward with no lease yet, a guest's malformed DNS over
TCP, a QEMU datagram socket's errors: each kind is logged once per LOG_INTERVAL, and the next
line of that kind says how many were suppressed since. Keys are bounded (MAX_KEYS; the table is
emptied when full, which at worst logs one extra line per key).
"""

import logging
import time
from collections.abc import Callable
from typing import Final

LOG_INTERVAL: Final = 10.0  # seconds between two lines of one key
MAX_KEYS: Final = 1024


class RateLog:
    def __init__(self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: dict[str, float] = {}  # key -> when its last line was logged
        self.suppressed: dict[str, int] = {}  # key -> lines dropped since

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: object) -> bool:
        """Log msg % args under key unless a line of key was logged within the interval;
        True when it was logged."""
        if not logger.isEnabledFor(level):
            return False
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if last is None and len(self.last) >= MAX_KEYS:
            self.last.clear()
            self.suppressed.clear()
        self.last[key] = now
        dropped = self.suppressed.pop(key, 0)
        if dropped:
            msg += " (%d more like this suppressed in the last %.0f s)"
            args = (*args, dropped, self.interval)
        logger.log(level, msg, *args)
        return True


RATELOG: Final = RateLog()  # the one the io modules share


def info(logger: logging.Logger, key: str, msg: str, *args: object) -> bool:
    return RATELOG.log(logger, logging.INFO, key, msg, *args)


def warning(logger: logging.Logger, key: str, msg: str, *args: object) -> bool:
    return RATELOG.log(logger, logging.WARNING, key, msg, *args)

"""Python's cyclic garbage collector set for a long-running packet pump, and watched.

CPython's collector stops the whole process while it walks a generation's objects, so every
guest and every connection waits for it. With its defaults (a young collection every 700 net
allocations of tracked objects, a full one once the survivors reach a quarter of the old ones)
a backend holding 10,000 idle connections (about 14 tracked objects each) ran 4 full collections
in 8 s of connection churn at 8,000 connections/s, stalling for up to 74 ms each, and spent
0.43 s in the collector in all (scripts/bench-gc). Almost nothing it walks is garbage: the
backend's objects die by reference counting when their flow ends, and the collector finds a few
hundred objects in cycles over such a run.

So, once the backend has started:

- `freeze_startup` collects once and moves what start-up made (modules, classes, the parsed
  configuration: about 30,000 objects) to the permanent generation, which no collection walks
  again. A full collection of a backend with a few connections is then about as short as a
  young one.
- `tune_gc` lets YOUNG_THRESHOLD net allocations go by between young collections. A frame's,
  an op's, a short connection's objects are then mostly freed before any collection sees them,
  so far fewer reach the old generation and full collections become rare. Cyclic garbage is
  still collected, only later: at most YOUNG_THRESHOLD objects wait in the young generation.

`GcWatch` counts collections and their pauses per generation, for `query-stats`.
"""

import gc
import time
from typing import Final, final

YOUNG_THRESHOLD: Final = 50_000  # CPython's default is 700
MIDDLE_THRESHOLD: Final = 10  # young collections per middle one (the default)
OLD_THRESHOLD: Final = 10  # middle collections per full one, at least (the default)


def tune_gc() -> None:
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)


def freeze_startup() -> int:
    """Collect what start-up left, then keep everything alive now out of later collections;
    the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@final
class GcWatch:
    """The collections since install(), per generation: how many, their pauses added, the longest."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_total = [0.0, 0.0, 0.0]
        self.pause_longest = [0.0, 0.0, 0.0]
        self.collected = 0  # unreachable objects found (cyclic garbage)
        self.started = 0.0
        self.hook = self.callback  # one bound method: what gc.callbacks holds and removes again

    def install(self) -> None:
        if self.hook not in gc.callbacks:
            gc.callbacks.append(self.hook)

    def uninstall(self) -> None:
        if self.hook in gc.callbacks:
            gc.callbacks.remove(self.hook)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        pause = time.perf_counter() - self.started
        generation = info.get("generation", 2)
        if not 0 <= generation <= 2:
            return
        self.collections[generation] += 1
        self.pause_total[generation] += pause
        if pause > self.pause_longest[generation]:
            self.pause_longest[generation] = pause
        self.collected += info.get("collected", 0)

    def describe(self) -> dict[str, object]:
        """For query-stats: per generation (young, middle, full), and the collector's settings."""
        return {
            "collections": list(self.collections),
            "pause-ms": [round(p * 1e3, 3) for p in self.pause_total],
            "longest-pause-ms": [round(p * 1e3, 3) for p in self.pause_longest],
            "collected": self.collected,
            "frozen-objects": gc.get_freeze_count(),
            "thresholds": list(gc.get_threshold()),
        }


WATCH: Final = GcWatch()  # the process's collector: one watch, installed by the backend's serve()

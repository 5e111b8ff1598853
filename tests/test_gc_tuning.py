"""io/gc_tuning: the collector's pauses are counted per generation, start-up's objects are frozen
out of later collections, and cyclic garbage is still collected with the raised threshold. The
process-wide settings are checked in a fresh interpreter each."""

import gc
import subprocess
import sys
from pathlib import Path

from qemu_vpnnet.io.gc_tuning import GcWatch

REPO = Path(__file__).resolve().parent.parent


def test_watch_counts_each_generation_until_uninstalled() -> None:
    watch = GcWatch()
    watch.install()
    watch.install()  # once only
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        watch.uninstall()
    gc.collect(2)
    assert watch.collections[0] >= 1  # an automatic young collection may have run as well
    assert watch.collections[2] == 2
    assert 0 < watch.pause_longest[2] <= watch.pause_total[2]
    described = watch.describe()
    assert described["collections"] == watch.collections
    assert described["thresholds"] == list(gc.get_threshold())
    assert watch.hook not in gc.callbacks


def test_watch_counts_the_cycles_it_finds() -> None:
    watch = GcWatch()
    watch.install()
    try:
        for _ in range(10):
            cycle: list[object] = []
            cycle.append(cycle)
        del cycle
        gc.collect()
    finally:
        watch.uninstall()
    assert watch.collected >= 10


PROBE = """
import gc, sys, weakref
sys.path.insert(0, sys.argv[1])
from qemu_vpnnet.io.gc_tuning import YOUNG_THRESHOLD, freeze_startup, tune_gc

class Node:
    def __init__(self):
        self.me = self

walked_before = len(gc.get_objects())
tune_gc()
frozen = freeze_startup()
walked_after = len(gc.get_objects())
first = Node()
alive = weakref.ref(first)
del first
for _ in range(3 * YOUNG_THRESHOLD):  # cycles only the collector can free; no gc.collect() here
    Node()
print(gc.get_threshold()[0], frozen, walked_before, walked_after, alive() is None, len(gc.get_objects()))
"""


def test_tuned_collector_freezes_start_up_and_still_frees_cycles() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    threshold, frozen, walked_before, walked_after = (int(v) for v in out[:4])
    assert threshold == 50_000
    assert frozen >= walked_before // 2 and walked_after < walked_before // 10, out
    assert out[4] == "True", "a cycle made after the freeze was never collected"
    assert int(out[5]) < 2 * threshold, "cyclic garbage piles up past the young threshold"

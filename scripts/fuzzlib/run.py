"""The long fuzz run over the sans-IO core: millions of frames from a dpkt-built corpus with
cheap random mutations, random host events and time advancing (tests/fuzzharness.py).

Prints frames/s and, every million frames, the table sizes, the number of counters and RSS;
at the end asserts that RSS stayed flat after warm-up and every table bounded. On an
exception it saves the crashing frame (and the seed and frame number) to tests/fuzz_corpus/,
which tests/test_fuzz.py replays, and exits 1.

    .venv/bin/python -P scripts/fuzzlib/run.py --frames 10000000 [--seed N] [--dns-mode host|forward]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO))  # after site-packages: the installed (compiled) core, the repo's tests

from tests.fuzzharness import PORTS, Harness, corpus, mutate  # noqa: E402

CORPUS_DIR = REPO / "tests" / "fuzz_corpus"
RSS_GROWTH_LIMIT_KB = 20 * 1024
WARMUP = 1_000_000


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def save_crash(frame: bytes, seed: int, number: int, error: str) -> Path:
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(frame).hexdigest()[:16]
    path = CORPUS_DIR / f"crash-{name}.bin"
    path.write_bytes(frame)
    (CORPUS_DIR / f"crash-{name}.txt").write_text(f"seed {seed} frame {number}\n{error}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dns-mode", default="host", choices=("host", "forward"))
    parser.add_argument("--report-every", type=int, default=1_000_000)
    args = parser.parse_args()

    import qemu_vpnnet.core.stack as stack_module

    print(f"core: {stack_module.__file__}", flush=True)
    frames = corpus()
    rnd = random.Random(args.seed)
    harness = Harness(args.seed, args.dns_mode)
    rss_start = rss_kb()
    rss_warm = 0
    rss_max_after = 0
    started = time.monotonic()
    last_t = started
    last_n = 0
    frame = b""
    number = 0
    try:
        for number in range(1, args.frames + 1):
            r = rnd.random()
            if r < 0.25:
                frame = rnd.choice(frames)
            elif r < 0.35:
                frame = harness.reply_frame() or rnd.choice(frames)
            else:
                frame = mutate(rnd, rnd.choice(frames))
            harness.frame(PORTS[number % 3], frame)
            if r < 0.2:
                frame = b""  # a host event: nothing to save but the seed
                harness.host_event()
            elif r > 0.995:
                frame = b""
                harness.tcp_session()
            if number & 31 == 0:
                harness.advance(rnd.choice((0.001, 0.01, 0.2, 1.0, 5.0)) if number & 0xFFF else 60.0)
            if number % args.report_every == 0:
                harness.check()
                now = time.monotonic()
                rss = rss_kb()
                if number == WARMUP:
                    rss_warm = rss
                elif number > WARMUP:
                    rss_max_after = max(rss_max_after, rss)
                rate = (number - last_n) / (now - last_t)
                last_t, last_n = now, number
                sizes = harness.sizes()
                table = " ".join(f"{k}={v}" for k, v in sizes.items())
                print(f"{number:>11,} frames {rate:>9,.0f} frames/s rss={rss} kB host-events={harness.events} {table}",
                      flush=True)  # fmt: skip
    except Exception:
        error = traceback.format_exc()
        path = save_crash(frame, args.seed, number, error)
        print(error, file=sys.stderr)
        print(f"CRASH at frame {number} (seed {args.seed}); input saved to {path}", file=sys.stderr)
        return 1
    harness.check()
    elapsed = time.monotonic() - started
    print(f"done: {args.frames:,} frames in {elapsed:.1f} s = {args.frames / elapsed:,.0f} frames/s; "
          f"host events {harness.events:,}; counters {len(harness.stack.counters.values)}; "
          f"rss start {rss_start} kB, after warm-up {rss_warm} kB, max after {rss_max_after} kB")  # fmt: skip
    if rss_warm and rss_max_after - rss_warm > RSS_GROWTH_LIMIT_KB:
        print(f"FAIL: RSS grew {rss_max_after - rss_warm} kB after warm-up", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

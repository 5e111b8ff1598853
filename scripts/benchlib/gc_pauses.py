"""Connection churn beside many idle connections: what Python's garbage collector costs the
backend, with its settings (io/gc_tuning.py) and with Python's defaults (--gc-defaults), beside
QEMU's libslirp.

A namespace guest holds --idle TCP connections to the host, then wrk opens and closes connections
for --seconds (from the widened port range) while sockperf ping-pongs over one more; the backend's
query-stats (over QMP, qemu.qmp's client) before and after give the collections and their pauses.
A collection stops every guest and connection for as long as it walks its generation, so its
longest pause shows up in the round trip's maximum. Medians of --rounds rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from qemu.qmp import QMPClient

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from scripts.benchlib.main import (  # noqa: E402
    GATEWAY,
    WRK_PORT_RANGE,
    HostServers,
    Setup,
    cpu_seconds,
    hold_idle_connections,
    release_idle_connections,
    wrk_run,
)

MODES = {"tuned": "", "gc-defaults": "--gc-defaults", "slirp": None}


def query_stats(path: Path) -> dict[str, object]:
    async def ask() -> dict[str, object]:
        client = QMPClient("bench-gc")
        await client.connect(str(path))
        try:
            reply = await client.execute("query-stats")
        finally:
            await client.disconnect()
        assert isinstance(reply, dict)
        return reply

    return asyncio.run(ask())


def sockperf_during(setup: Setup, seconds: int, out: dict[str, float]) -> None:
    text = setup.run(
        ["sockperf", "ping-pong", "--tcp", "-i", GATEWAY, "-p", str(HostServers.SOCKPERF), "-t", str(seconds)],
        timeout=seconds + 30,
    )
    for pattern, name in (
        (r"percentile 99\.000 =\s+([\d.]+)", "rtt p99 us during churn"),
        (r"<MAX> observation =\s+([\d.]+)", "rtt max us during churn"),
    ):
        m = re.search(pattern, text)
        if m:
            out[name] = float(m.group(1))


def one_round(mode: str, idle: int, seconds: int, workdir: Path) -> dict[str, float]:
    extra = MODES[mode]
    qmp = workdir / f"qmp-{mode}.sock"
    os.environ["VPNNET_BENCH_ARGS"] = f"--qmp unix:{qmp} {extra}" if extra is not None else ""
    setup = Setup("slirp" if extra is None else "vpnnet", 1500, workdir / mode)
    figures: dict[str, float] = {}
    setup.start()
    try:
        holder, line = hold_idle_connections(setup, idle)
        try:
            m = re.search(r"opened=(\d+)", line)
            figures["idle connections held"] = float(m.group(1)) if m else 0.0
            time.sleep(1.0)
            setup.run(["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={WRK_PORT_RANGE}"], timeout=10)
            before = query_stats(qmp)["gc"] if extra is not None else None
            pid = setup.memory_pid()
            cpu_before = cpu_seconds([pid])
            pinger = threading.Thread(target=sockperf_during, args=(setup, seconds, figures))
            pinger.start()
            rate = wrk_run(setup, seconds, HostServers.HTTP_WIDE)
            pinger.join()
            cpu = cpu_seconds([pid]) - cpu_before
            if rate:
                figures["connections/s"] = rate
                figures["backend (or QEMU) CPU ms per 1000 connections"] = cpu / (rate * seconds) * 1e6
            if before is not None:
                after = query_stats(qmp)["gc"]
                assert isinstance(before, dict) and isinstance(after, dict)
                runs = [a - b for a, b in zip(after["collections"], before["collections"], strict=True)]
                paused = [a - b for a, b in zip(after["pause-ms"], before["pause-ms"], strict=True)]
                figures["full collections during churn"] = float(runs[2])
                figures["young and middle collections during churn"] = float(runs[0] + runs[1])
                figures["collector ms during churn"] = sum(paused)
                figures["longest collector pause ms (whole run)"] = max(after["longest-pause-ms"])
                figures["objects frozen at start-up"] = float(after["frozen-objects"])
        finally:
            release_idle_connections(holder)
    finally:
        setup.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-gc", description=__doc__)
    parser.add_argument("--idle", type=int, default=10000, help="idle connections held (default 10000)")
    parser.add_argument("--seconds", type=int, default=8, help="churn seconds per round (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the modes alternating (default 2)")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    servers = HostServers()
    servers.start()
    try:
        with tempfile.TemporaryDirectory(prefix="vpnnet-bench-gc-") as tmp:
            for round_no in range(args.rounds):
                for mode in MODES:
                    workdir = Path(tmp) / f"round{round_no}"
                    workdir.mkdir(exist_ok=True)
                    try:
                        figures = one_round(mode, args.idle, args.seconds, workdir)
                    except Exception as exc:  # one failed round must not lose the others
                        print(f"  {mode}: {exc}", file=sys.stderr)
                        continue
                    for name, value in figures.items():
                        results[mode].setdefault(name, []).append(value)
                    print(f"  round {round_no + 1} {mode}: {figures}", file=sys.stderr, flush=True)
    finally:
        servers.stop()
    names: list[str] = []
    for mode in MODES:
        names += [n for n in results[mode] if n not in names]
    print(f"\n## {args.idle} idle connections, {args.seconds} s of wrk churn; medians of {args.rounds} rounds\n")
    print("| metric | qemu-vpnnet | qemu-vpnnet --gc-defaults | libslirp |")
    print("|---|---|---|---|")
    for name in names:
        cells = []
        for mode in MODES:
            values = results[mode].get(name)
            value = statistics.median(values) if values else None
            cells.append("—" if value is None else f"{value:.3g}" if value < 1000 else f"{value:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

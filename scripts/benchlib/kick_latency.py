"""How long the backend takes from a vhost-user guest's kick to its call, after pauses of
different lengths: a vhost-user front-end written in Python (integration/vhost_client.py) puts
an ICMP echo request for the gateway on its TX ring, kicks, and times the gap until the RX call
eventfd is readable; then the same gap for a uvloop process that only echoes one eventfd to
another, the floor any process on this machine pays for the same two wake-ups.

On a VM whose idle CPUs are slow to come back this shows why a sparse ping is slower than a
busy one (docs/vhost-user.rst, "Latency under TCG"). The installed (compiled) package is run,
with --busy-poll 0 unless told otherwise (--backend-args).
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dpkt

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from integration.common import with_pdeathsig  # noqa: E402
from integration.vhost_client import VhostUserClient  # noqa: E402

VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])

ECHO_PROCESS = """
import os, sys, uvloop
kick, call = int(sys.argv[1]), int(sys.argv[2])
loop = uvloop.new_event_loop()
def echo() -> None:
    os.read(kick, 8)
    os.write(call, b"\\1\\0\\0\\0\\0\\0\\0\\0")
loop.add_reader(kick, echo)
loop.run_forever()
"""


def echo_request(gateway_mac: bytes, seq: int) -> bytes:
    icmp = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=77, seq=seq, data=b"x" * 56))
    ip = dpkt.ip.IP(src=GUEST_IP, dst=GATEWAY_IP, p=1, ttl=64, data=icmp)
    return bytes(dpkt.ethernet.Ethernet(src=GUEST_MAC, dst=gateway_mac, type=0x0800, data=ip))


def percentiles(samples: list[float]) -> str:
    s = sorted(samples)
    return f"{statistics.median(s):8.1f} {s[len(s) // 10]:8.1f} {s[len(s) * 9 // 10]:8.1f} {s[int(len(s) * 0.99)]:8.1f}"


def time_pauses(gaps: list[float], count: int, kick: Callable[[int], float]) -> dict[float, list[float]]:
    """{pause: microseconds}: count calls of kick(seq), each after that pause; kick returns the
    seconds from its kick to the answer."""
    results: dict[float, list[float]] = {}
    for gap in gaps:
        samples: list[float] = []
        for seq in range(count):
            if gap:
                time.sleep(gap)
            samples.append(kick(seq) * 1e6)
        results[gap] = samples
    return results


def backend_gaps(path: Path, gaps: list[float], count: int) -> dict[float, list[float]]:
    client = VhostUserClient(path)
    try:
        client.set_up()
        gateway_mac = client.arp_gateway(GUEST_MAC)
        if gateway_mac is None:
            raise SystemExit("the backend answered no ARP request for the gateway")
        call = client.rings[0].call

        def kick(seq: int) -> float:
            frame = echo_request(gateway_mac, seq)
            started = time.perf_counter()
            client.send_frame(frame)
            ready, _, _ = select.select([call], [], [], 1.0)
            elapsed = time.perf_counter() - started
            try:  # the call's count, so that the next kick's select waits for its own
                os.eventfd_read(call)
            except BlockingIOError:
                pass
            if not ready or not client.receive_frames(1.0):
                raise SystemExit(f"echo request {seq}: no answer")
            return elapsed

        return time_pauses(gaps, count, kick)
    finally:
        client.close()


def echo_gaps(gaps: list[float], count: int) -> dict[float, list[float]]:
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    proc = subprocess.Popen(
        with_pdeathsig([VENV_PYTHON, "-c", ECHO_PROCESS, str(kick_fd), str(call)]), pass_fds=(kick_fd, call)
    )

    def kick(seq: int) -> float:
        started = time.perf_counter()
        os.eventfd_write(kick_fd, 1)
        select.select([call], [], [], 1.0)
        elapsed = time.perf_counter() - started
        try:
            os.eventfd_read(call)
        except BlockingIOError:
            raise SystemExit("the echo process did not answer") from None
        return elapsed

    try:
        time.sleep(1.0)
        return time_pauses(gaps, count, kick)
    finally:
        proc.kill()
        proc.wait()
        os.close(kick_fd)
        os.close(call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaps", default="0,0.001,0.01,0.02,0.05,0.1", help="pauses in seconds, comma-separated")
    parser.add_argument("--count", type=int, default=200, help="kicks per pause (default 200)")
    parser.add_argument("--backend-args", default="--busy-poll 0", help="extra qemu-vpnnet options")
    args = parser.parse_args()
    gaps = [float(g) for g in args.gaps.split(",") if g]
    with tempfile.TemporaryDirectory(prefix="vpnnet-kick-") as tmp:
        path = Path(tmp) / "vu.sock"
        cmd = [VENV_PYTHON, "-P", "-m", "qemu_vpnnet", "--vhost-user", str(path), "--no-ipv6"]
        cmd += ["--dns-upstream", "127.0.0.1:9", "--log-level", "warning", *shlex.split(args.backend_args)]
        backend = subprocess.Popen(with_pdeathsig(cmd), cwd="/")
        try:
            deadline = time.monotonic() + 20
            while not path.exists():
                if backend.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the backend did not start")
                time.sleep(0.05)
            ours = backend_gaps(path, gaps, args.count)
        finally:
            backend.terminate()
            backend.wait(10)
    floor = echo_gaps(gaps, args.count)
    print(f"## kick to call, us ({args.count} kicks per pause; median p10 p90 p99)\n")
    print("| pause ms | qemu-vpnnet: median p10 p90 p99 | uvloop echo: median p10 p90 p99 |")
    print("|---|---|---|")
    for gap in gaps:
        print(f"| {gap * 1000:g} | {percentiles(ours[gap])} | {percentiles(floor[gap])} |")


if __name__ == "__main__":
    main()

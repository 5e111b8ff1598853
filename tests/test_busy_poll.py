"""The adaptive busy poller on a real event loop: when it polls, when it stops, when it pauses."""

import asyncio
import time

import pytest

from qemu_vpnnet.cli import build_parser
from qemu_vpnnet.io import busy_poll
from qemu_vpnnet.io.busy_poll import BusyPoller


def no_yield() -> None:
    """The tests' yield: never late (a real sched_yield on a loaded machine may be, and would end
    the window as contended; test_a_contended_cpu_ends_the_window_and_pauses_polling has that)."""


async def turns_while(poller: BusyPoller, seconds: float) -> int:
    """Loop turns (sleep(0) round trips) completed in `seconds` of wall time."""
    turns = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        await asyncio.sleep(0)
        turns += 1
    return turns


def test_light_activity_polls_for_the_window_then_stops() -> None:
    async def main() -> None:
        poller = BusyPoller(asyncio.get_running_loop(), 0.002, yield_cpu=no_yield)
        poller.activity(200)
        assert poller.spinning and poller.windows == 1
        await asyncio.sleep(0.01)  # the window passes: it stops by itself
        assert not poller.spinning and poller.misses == 1 and poller.hits == 0

    asyncio.run(main())


def test_bulk_turns_never_start_a_window() -> None:
    async def main() -> None:
        poller = BusyPoller(asyncio.get_running_loop(), 0.002, yield_cpu=no_yield)
        poller.activity(busy_poll.LIGHT_BYTES)
        assert not poller.spinning and poller.windows == 0

    asyncio.run(main())


def test_light_turns_amid_bulk_traffic_do_not_poll() -> None:
    async def main() -> None:
        now = [100.0]
        poller = BusyPoller(asyncio.get_running_loop(), 0.001, clock=lambda: now[0], yield_cpu=no_yield)
        for _ in range(busy_poll.BULK_BYTES // 3000 + 1):  # light turns, 64 KiB within 2 ms
            poller.activity(3000)
            now[0] += 0.00005
        now[0] += 0.002  # the first window ends unextended
        await asyncio.sleep(0.005)
        assert not poller.spinning and poller.windows == 1
        poller.activity(3000)  # the last bucket still says bulk
        assert not poller.spinning and poller.windows == 1
        now[0] += 2 * busy_poll.RATE_SPAN  # traffic calmed down: a light turn polls again
        poller.activity(100)
        assert poller.spinning and poller.windows == 2
        now[0] += 0.01
        await asyncio.sleep(0.005)
        assert not poller.spinning

    asyncio.run(main())


def test_activity_inside_a_window_is_a_hit_and_extends_it() -> None:
    async def main() -> None:
        # a 50 ms window: a loaded machine (the CI's) may stall the loop for milliseconds
        poller = BusyPoller(asyncio.get_running_loop(), 0.05, yield_cpu=no_yield)
        poller.activity(100)
        await turns_while(poller, 0.03)
        poller.activity(100)  # a reply caught while polling
        assert poller.hits == 1 and poller.misses == 0
        await turns_while(poller, 0.03)
        assert poller.spinning  # extended past the first window's end
        await asyncio.sleep(0.1)
        assert not poller.spinning and poller.windows == 1

    asyncio.run(main())


def test_windows_that_catch_nothing_pause_polling() -> None:
    async def main() -> None:
        poller = BusyPoller(asyncio.get_running_loop(), 0.0005, yield_cpu=no_yield)
        for _ in range(busy_poll.MAX_MISSES):
            poller.activity(100)
            await asyncio.sleep(0.003)
        assert not poller.spinning and poller.paused_until > time.perf_counter()
        poller.activity(100)
        assert not poller.spinning  # paused: sparse traffic costs nothing

    asyncio.run(main())


def test_zero_window_is_off() -> None:
    async def main() -> None:
        poller = BusyPoller(asyncio.get_running_loop(), 0.0, yield_cpu=no_yield)
        poller.activity(1)
        assert not poller.spinning and poller.windows == 0

    asyncio.run(main())


@pytest.mark.parametrize("bad", ["-1", "10001", "fast"])
def test_busy_poll_option_is_checked(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--socket", "/tmp/x.sock", "--busy-poll", bad])
    assert exc.value.code == 2
    assert "--busy-poll" in capsys.readouterr().err


def test_a_contended_cpu_ends_the_window_and_pauses_polling() -> None:
    """A yield that returns late (another task ran on our CPU): polling stops at once and pauses
    for CONTENDED_PAUSE; a prompt yield goes on polling."""

    async def main() -> None:
        now = [50.0]
        late = [False]

        def yield_cpu() -> None:
            now[0] += 2 * busy_poll.CONTENDED if late[0] else busy_poll.CONTENDED / 10

        poller = BusyPoller(asyncio.get_running_loop(), 0.01, clock=lambda: now[0], yield_cpu=yield_cpu)
        poller.activity(100)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert poller.spinning and poller.contended == 0  # prompt yields: still polling
        late[0] = True
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not poller.spinning and poller.contended == 1
        assert poller.paused_until == pytest.approx(now[0] - 2 * busy_poll.CONTENDED + busy_poll.CONTENDED_PAUSE)
        poller.activity(100)
        assert not poller.spinning and poller.windows == 1  # paused
        now[0] += busy_poll.CONTENDED_PAUSE
        late[0] = False
        poller.activity(100)
        assert poller.spinning and poller.windows == 2  # the pause is over
        now[0] += 1.0
        await asyncio.sleep(0.001)
        assert not poller.spinning

    asyncio.run(main())

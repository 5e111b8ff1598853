"""The shell's timer under uvloop: a deadline already past must not break the next flush."""

import asyncio
from collections.abc import Iterator

import uvloop

from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io.shell import Shell


class StackWithDeadlines:
    """A real Stack (compiled or not) whose next deadlines the test chooses."""

    def __init__(self, stack: Stack, deadlines: Iterator[float]) -> None:
        self.stack = stack
        self.deadlines = deadlines
        self.fired: list[float] = []

    def next_deadline(self) -> float:
        return next(self.deadlines, float("inf"))

    def timer(self, now: float) -> None:
        self.fired.append(now)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stack, name)


def test_timer_for_a_deadline_in_the_past_then_rearmed() -> None:
    async def scenario() -> tuple[int, int]:
        stack = Stack(NetConfig())
        shell = Shell(stack)
        now = shell.loop.time()
        fake = StackWithDeadlines(stack, iter([now - 1.0, now - 0.5, now + 0.01]))
        shell.stack = fake  # type: ignore[assignment]
        shell.arm_timer()  # uvloop gives a plain Handle (no when()) for a past deadline
        shell.arm_timer()
        shell.arm_timer()
        for _ in range(20):
            await asyncio.sleep(0.01)
        return len(fake.fired), shell.internal_errors

    fired, errors = uvloop.run(scenario())
    assert fired >= 1 and errors == 0

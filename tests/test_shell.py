"""The shell's timer under uvloop: a deadline already past must not break the next flush."""

import asyncio
from collections.abc import Iterator

import uvloop

from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io.shell import Shell


class ChosenDeadlines:
    """The core's timer as the shell sees it, with deadlines the test chooses; a real Stack's
    timer still runs when one fires."""

    def __init__(self, stack: Stack, deadlines: Iterator[float]) -> None:
        self.stack = stack
        self.deadlines = deadlines
        self.fired: list[float] = []

    def next_deadline(self) -> float:
        return next(self.deadlines, float("inf"))

    def timer(self, now: float) -> None:
        self.fired.append(now)
        self.stack.timer(now)


def test_timer_for_a_deadline_in_the_past_then_rearmed() -> None:
    async def scenario() -> tuple[int, int]:
        stack = Stack(NetConfig())
        shell = Shell(stack)
        now = shell.loop.time()
        fake = ChosenDeadlines(stack, iter([now - 1.0, now - 0.5, now + 0.01]))
        shell.next_deadline = fake.next_deadline
        shell.deadline_passed = fake.timer
        shell.arm_timer()  # uvloop gives a plain Handle (no when()) for a past deadline
        shell.arm_timer()
        shell.arm_timer()
        for _ in range(20):
            await asyncio.sleep(0.01)
        return len(fake.fired), shell.internal_errors

    fired, errors = uvloop.run(scenario())
    assert fired >= 1 and errors == 0

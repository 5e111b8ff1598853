"""The shell's timer under uvloop: a deadline already past must not break the next flush."""

import uvloop

from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io.shell import Shell


def test_timer_for_a_deadline_in_the_past_then_rearmed() -> None:
    async def scenario() -> int:
        stack = Stack(NetConfig())
        shell = Shell(stack)
        fired: list[float] = []
        now = shell.loop.time()
        deadlines = iter([now - 1.0, now - 0.5, now + 0.01])
        stack.next_deadline = lambda: next(deadlines, float("inf"))  # type: ignore[method-assign]
        stack.timer = lambda t: fired.append(t)  # type: ignore[method-assign]
        shell.arm_timer()  # uvloop gives a plain Handle (no when()) for a past deadline
        shell.arm_timer()
        shell.arm_timer()
        for _ in range(20):
            await __import__("asyncio").sleep(0.01)
        return len(fired) + shell.internal_errors * 1000

    assert 1 <= uvloop.run(scenario()) < 1000

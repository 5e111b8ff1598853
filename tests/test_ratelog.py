"""Guest-triggerable log lines: once per key per interval, with the count of suppressed ones."""

import logging

import pytest

from qemu_vpnnet.io.ratelog import MAX_KEYS, RateLog


def test_one_line_per_key_per_interval_then_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    rl = RateLog(10.0, clock=lambda: now[0])
    log = logging.getLogger("qemu_vpnnet.test")
    with caplog.at_level(logging.INFO, logger="qemu_vpnnet.test"):
        for _ in range(12):  # a booting VM's ssh retries
            rl.log(log, logging.INFO, "no-lease r1", "forward %s: no guest has a lease yet", "r1")
            now[0] += 0.5
        assert rl.log(log, logging.INFO, "other", "another kind")  # keys are independent
        now[0] = 111.0
        assert rl.log(log, logging.INFO, "no-lease r1", "forward %s: no guest has a lease yet", "r1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "forward r1: no guest has a lease yet",
        "another kind",
        "forward r1: no guest has a lease yet (11 more like this suppressed in the last 10 s)",
    ]


def test_keys_are_bounded() -> None:
    rl = RateLog(10.0, clock=lambda: 0.0)
    log = logging.getLogger("qemu_vpnnet.test.bounded")
    log.setLevel(logging.INFO)
    log.propagate = False
    for i in range(3 * MAX_KEYS):
        rl.log(log, logging.INFO, f"k{i}", "x")
    assert len(rl.last) <= MAX_KEYS and len(rl.suppressed) <= MAX_KEYS


def test_a_disabled_level_costs_nothing_and_counts_nothing() -> None:
    rl = RateLog(10.0, clock=lambda: 0.0)
    log = logging.getLogger("qemu_vpnnet.test.quiet")
    log.setLevel(logging.ERROR)
    assert not rl.log(log, logging.INFO, "k", "x")
    assert rl.last == {} and rl.suppressed == {}

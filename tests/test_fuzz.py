"""Fuzzing the sans-IO core (bounded, derandomized, for CI): well-formed and mutated guest
frames, random host events for the flows the core opened, several guests and ports, time
advancing. No exception may escape and every table stays bounded (tests/fuzzharness.py).
The long run is scripts/fuzz; the inputs it found crashing are replayed from tests/fuzz_corpus/.
"""

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_vpnnet.core.dns import MODE_FORWARD, MODE_HOST
from tests.fuzzharness import MACS, PORTS, Harness, corpus, fix_checksums, mutate

CORPUS = corpus()
CORPUS_DIR = Path(__file__).parent / "fuzz_corpus"


@st.composite
def mutated_frame(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(0, 4))):
        if not base:
            break
        base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(base)))
    if draw(st.booleans()):
        del base[cut:]
    base += draw(st.binary(max_size=64))
    if draw(st.booleans()):
        fix_checksums(base)
    return bytes(base)


# one step: a frame from a port, a host event, or time passing
STEP = st.one_of(
    st.tuples(st.just("frame"), st.sampled_from(PORTS), st.sampled_from(CORPUS)),
    st.tuples(st.just("frame"), st.sampled_from(PORTS), mutated_frame()),
    st.tuples(st.just("raw"), st.sampled_from(PORTS), st.binary(max_size=200)),
    st.tuples(st.just("host"), st.just(0), st.just(b"")),
    st.tuples(st.just("reply"), st.sampled_from(PORTS), st.just(b"")),
    st.tuples(st.just("session"), st.just(0), st.just(b"")),
    st.tuples(st.just("time"), st.sampled_from((0, 1, 5, 40, 700)), st.just(b"")),
)


@settings(derandomize=True, max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=60), seed=st.integers(0, 1 << 16),
       forward=st.booleans())  # fmt: skip
def test_no_exception_escapes_and_tables_stay_bounded(steps: list[tuple[str, int, bytes]], seed: int,
                                                       forward: bool) -> None:  # fmt: skip
    harness = Harness(seed, MODE_FORWARD if forward else MODE_HOST)
    for kind, arg, data in steps:
        if kind in ("frame", "raw"):
            harness.frame(arg, data)
        elif kind == "host":
            harness.host_event()
        elif kind == "session":
            harness.tcp_session()
        elif kind == "reply":
            reply = harness.reply_frame()
            if reply is not None:
                harness.frame(arg, reply)
        else:
            harness.advance(arg / 10)
        harness.check()


def test_a_longer_mixed_run_with_every_host_event_kind() -> None:
    """Cheap mutations, as the long run does, for 2 x 40,000 frames: reaches states (established
    connections, pending DNS, leases of every guest) that short hypothesis examples do not."""
    rnd = random.Random(7)
    for mode in (MODE_HOST, MODE_FORWARD):
        harness = Harness(11, mode)
        for number in range(40_000):
            r = rnd.random()
            frame = rnd.choice(CORPUS) if r < 0.3 else (harness.reply_frame() or mutate(rnd, rnd.choice(CORPUS)))
            harness.frame(PORTS[number % 3], frame)
            if r < 0.25:
                harness.host_event()
            elif r > 0.995:
                harness.tcp_session()
            if number % 32 == 0:
                harness.advance(rnd.choice((0.01, 0.5, 5.0)))
        harness.check()
        counters = harness.stack.counters.snapshot()
        assert counters["rx-frames"] >= 40_000
        assert harness.events > 1000
        assert len(harness.stack.dhcp.by_mac) >= len(MACS) - 1  # the well-formed frames did their work
        assert counters["tcp-established"] > 50 and counters["dns-queries"] > 100


CRASHES = sorted(CORPUS_DIR.glob("*.bin"))


@pytest.mark.parametrize("path", CRASHES, ids=[p.name for p in CRASHES])
def test_crashing_inputs_found_by_the_long_run_stay_fixed(path: Path) -> None:
    frame = path.read_bytes()
    for mode in (MODE_HOST, MODE_FORWARD):
        harness = Harness(0, mode)
        for port in PORTS:
            harness.frame(port, frame)
            harness.advance(1.0)
        harness.check()

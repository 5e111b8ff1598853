"""The data-path segment builder: C (when built) and Python give the same, valid frames."""

import os

import dpkt
import pytest

from qemu_vpnnet.core import tcp_wire
from qemu_vpnnet.core.checksum import checksum, finish, pseudo_header_sum, sum16
from qemu_vpnnet.io import framing

GUEST_MAC = bytes.fromhex("525400123456")
GW_MAC = bytes.fromhex("525400123502")
REMOTE = bytes([10, 0, 2, 2])
GUEST = bytes([10, 0, 2, 15])
REMOTE6 = bytes.fromhex("20010db8000100000000000000000001")  # 2001:db8:1::1
GUEST6 = bytes.fromhex("fec000000000000050540000fe123456")
SPORT, DPORT = 5201, 40000


def build(
    segments: object,
    payload: bytes,
    off: int,
    end: int,
    psh_end: int,
    mss: int,
    seq: int,
    ident: int,
    remote: bytes = REMOTE,
    guest: bytes = GUEST,
    checksum: bool = True,
) -> list[bytes]:
    header = tcp_wire.header_template(GUEST_MAC, GW_MAC, remote, guest, SPORT, DPORT)
    ip_base, tcp_base = tcp_wire.address_sums(remote, guest, SPORT, DPORT)
    frames: list[bytes] = []
    count = segments(  # type: ignore[operator]
        frames,
        header,
        bytearray(payload),
        off,
        end,
        psh_end,
        mss,
        seq,
        0xFEDCBA98,
        4321,
        ident,
        ip_base,
        tcp_base,
        checksum,
    )
    assert count == len(frames)
    return frames


CASES = [
    # payload length, off, end, psh_end, mss, seq, ident
    (10000, 0, 10000, 10000, 1460, 1000, 7),
    (10000, 123, 9001, 10000, 1460, 0xFFFFF000, 0xFFFE),  # sequence and ident wrap
    (4097, 1, 4097, 4097, 1, 5, 0),  # one-byte segments, odd lengths
    (70000, 0, 70000, 65000, 65480, 0, 1),  # MTU 65520 segments; PSH nowhere
    (3, 0, 3, 3, 1460, 1 << 40, 9),  # a 64-bit unwrapped sequence number
]


@pytest.mark.parametrize("length,off,end,psh_end,mss,seq,ident", CASES)
def test_python_segments_are_valid_tcp(
    length: int, off: int, end: int, psh_end: int, mss: int, seq: int, ident: int
) -> None:
    payload = os.urandom(length)
    frames = build(tcp_wire.tcp_segments_py, payload, off, end, psh_end, mss, seq, ident)
    assert len(frames) == -(-(end - off) // mss)
    pos = off
    for i, frame in enumerate(frames):
        eth = dpkt.ethernet.Ethernet(frame)
        assert eth.dst == GUEST_MAC and eth.src == GW_MAC
        ip = eth.data
        assert isinstance(ip, dpkt.ip.IP)
        assert checksum(frame[14:34]) == 0, "IP header checksum"
        assert ip.id == (ident + i) & 0xFFFF and ip.len == len(frame) - 14 and ip.off == dpkt.ip.IP_DF
        tcp = ip.data
        assert isinstance(tcp, dpkt.tcp.TCP)
        segment = frame[34:]
        total = sum16(segment, pseudo_header_sum(REMOTE, GUEST, 6, len(segment)))
        assert finish(total) == 0, "TCP checksum"
        n = min(mss, end - pos)
        assert tcp.data == payload[pos : pos + n]
        assert tcp.seq == (seq + pos - off) & 0xFFFFFFFF and tcp.ack == 0xFEDCBA98 and tcp.win == 4321
        want_flags = dpkt.tcp.TH_ACK | (dpkt.tcp.TH_PUSH if pos + n == psh_end else 0)
        assert tcp.flags == want_flags
        assert (tcp.sport, tcp.dport) == (SPORT, DPORT)
        pos += n
    assert pos == end


@pytest.mark.parametrize("length,off,end,psh_end,mss,seq,ident", CASES)
def test_python_segments_are_valid_tcp_over_ipv6(
    length: int, off: int, end: int, psh_end: int, mss: int, seq: int, ident: int
) -> None:
    payload = os.urandom(length)
    mss = min(mss, 65535 - 20 - 40)
    frames = build(tcp_wire.tcp_segments_py, payload, off, end, psh_end, mss, seq, ident, REMOTE6, GUEST6)
    pos = off
    for frame in frames:
        eth = dpkt.ethernet.Ethernet(frame)
        ip6 = eth.data
        assert isinstance(ip6, dpkt.ip6.IP6), "an IPv6 packet"
        assert (ip6.src, ip6.dst, ip6.nxt, ip6.hlim) == (REMOTE6, GUEST6, 6, 64)
        assert ip6.plen == len(frame) - 54
        segment = frame[54:]
        total = sum16(segment, pseudo_header_sum(REMOTE6, GUEST6, 6, len(segment)))
        assert finish(total) == 0, "TCP checksum over the IPv6 pseudo-header"
        tcp = dpkt.tcp.TCP(segment)
        n = min(mss, end - pos)
        assert tcp.data == payload[pos : pos + n]
        assert tcp.seq == (seq + pos - off) & 0xFFFFFFFF and tcp.ack == 0xFEDCBA98 and tcp.win == 4321
        assert tcp.flags == dpkt.tcp.TH_ACK | (dpkt.tcp.TH_PUSH if pos + n == psh_end else 0)
        pos += n
    assert pos == end


def test_single_ipv6_frame_matches_the_segment_loop() -> None:
    """build_tcp_frame (ACKs, SYNs) and the data loop build the same IPv6 bytes."""
    payload = os.urandom(1000)
    (looped,) = build(tcp_wire.tcp_segments_py, payload, 0, 1000, 0, 1440, 77, 0, REMOTE6, GUEST6)
    single = tcp_wire.build_tcp_frame(
        GUEST_MAC, GW_MAC, REMOTE6, GUEST6, SPORT, DPORT, 77, 0xFEDCBA98, 0x10, 4321, b"", payload, 0
    )
    assert single == looped


@pytest.mark.skipif(not tcp_wire.HAVE_C_SEGMENTS, reason="the C extension is not built (plain sources)")
@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("length,off,end,psh_end,mss,seq,ident", CASES)
def test_c_segments_equal_python(
    family: int, length: int, off: int, end: int, psh_end: int, mss: int, seq: int, ident: int, checksum: bool
) -> None:
    payload = os.urandom(length)
    addrs = (REMOTE, GUEST) if family == 4 else (REMOTE6, GUEST6)
    mss = min(mss, 65535 - 60)
    want = build(tcp_wire.tcp_segments_py, payload, off, end, psh_end, mss, seq, ident, *addrs, checksum)
    got = build(tcp_wire.c_tcp_segments, payload, off, end, psh_end, mss, seq, ident, *addrs, checksum)
    assert got == want


def test_segments_without_checksum_differ_only_there() -> None:
    """checksum=False (a partial-checksum guest): the TCP checksum field is 0, all else the same."""
    payload = os.urandom(5000)
    full = build(tcp_wire.tcp_segments_py, payload, 0, 5000, 5000, 1460, 1, 2)
    bare = build(tcp_wire.tcp_segments_py, payload, 0, 5000, 5000, 1460, 1, 2, REMOTE, GUEST, False)
    assert [f[:50] + f[52:] for f in bare] == [f[:50] + f[52:] for f in full]
    assert all(f[50:52] == b"\0\0" for f in bare) and all(f[50:52] != b"\0\0" for f in full)


@pytest.mark.skipif(not tcp_wire.HAVE_C_SEGMENTS, reason="the C extension is not built (plain sources)")
def test_c_segments_reject_bad_arguments() -> None:
    header = tcp_wire.header_template(GUEST_MAC, GW_MAC, REMOTE, GUEST, SPORT, DPORT)
    buf = bytearray(100)
    with pytest.raises(ValueError):
        tcp_wire.c_tcp_segments([], header, buf, 0, 101, 101, 1460, 0, 0, 0, 0, 0, 0)  # past the end
    with pytest.raises(ValueError):
        tcp_wire.c_tcp_segments([], header, buf, 0, 10, 10, 0, 0, 0, 0, 0, 0, 0)  # mss 0
    with pytest.raises(TypeError):
        tcp_wire.c_tcp_segments([], header[:10], buf, 0, 10, 10, 1460, 0, 0, 0, 0, 0, 0)


def stream_cases() -> list[tuple[bytes, int, int]]:
    """(buffer, start, end): whole and cut frames, a start inside the buffer, bad prefixes."""
    import random

    rng = random.Random(14)
    cases: list[tuple[bytes, int, int]] = []
    for _ in range(200):
        frames = [
            os.urandom(rng.choice((1, 13, 14, 60, 1514, 9000, framing.MAX_FRAME))) for _ in range(rng.randint(0, 6))
        ]
        pad = os.urandom(rng.randint(0, 40))  # what came before start: not looked at
        data = pad + b"".join(framing.frame_parts(frames))
        if rng.random() < 0.2:  # garbage where a prefix should be: a zero length or one too large
            bad = rng.choice((0, framing.MAX_FRAME + 1, 0xFFFFFFFF)).to_bytes(4, "big")
            data = data + bad + os.urandom(rng.randint(0, 100))
        start = len(pad)
        end = rng.choice((len(data), rng.randint(start, len(data))))  # all of it, or cut anywhere
        cases.append((data, start, end))
    return cases


@pytest.mark.skipif(not framing.HAVE_C, reason="the C extension is not built (plain sources)")
def test_c_split_frames_equals_python() -> None:
    """The C framing loop and the Python one give the same frames, remainder and errors."""
    for data, start, end in stream_cases():
        outcomes = []
        for split in (framing.split_frames, framing.split_frames_loop):
            frames: list[bytes] = []
            try:
                outcome: object = split(bytearray(data), start, end, frames)
            except framing.FramingError as exc:
                outcome = str(exc)
            outcomes.append((outcome, frames))
        assert outcomes[0] == outcomes[1]
        assert all(type(f) is bytes for f in outcomes[0][1])


@pytest.mark.skipif(not framing.HAVE_C, reason="the C extension is not built (plain sources)")
def test_c_split_frames_rejects_bounds_outside_the_buffer() -> None:
    with pytest.raises(ValueError):
        framing.c_split_frames(bytearray(8), 0, 9, [], framing.MAX_FRAME)
    with pytest.raises(ValueError):
        framing.c_split_frames(bytearray(8), 5, 4, [], framing.MAX_FRAME)
    with pytest.raises(ValueError):
        framing.c_split_frames(bytearray(8), -1, 4, [], framing.MAX_FRAME)

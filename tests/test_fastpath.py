"""The data-path segment builder: C (when built) and Python give the same, valid frames."""

import os

import dpkt
import pytest

from qemu_vpnnet.core import tcp_wire
from qemu_vpnnet.core.checksum import checksum, finish, pseudo_header_sum, sum16

GUEST_MAC = bytes.fromhex("525400123456")
GW_MAC = bytes.fromhex("525400123502")
REMOTE = bytes([10, 0, 2, 2])
GUEST = bytes([10, 0, 2, 15])
SPORT, DPORT = 5201, 40000


def build(
    segments: object, payload: bytes, off: int, end: int, psh_end: int, mss: int, seq: int, ident: int
) -> list[bytes]:
    header = tcp_wire.header_template(GUEST_MAC, GW_MAC, REMOTE, GUEST, SPORT, DPORT)
    ip_base, tcp_base = tcp_wire.address_sums(REMOTE, GUEST, SPORT, DPORT)
    frames: list[bytes] = []
    count = segments(  # type: ignore[operator]
        frames, header, bytearray(payload), off, end, psh_end, mss, seq, 0xFEDCBA98, 4321, ident, ip_base, tcp_base
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


@pytest.mark.skipif(not tcp_wire.HAVE_C_SEGMENTS, reason="the C extension is not built (plain sources)")
@pytest.mark.parametrize("length,off,end,psh_end,mss,seq,ident", CASES)
def test_c_segments_equal_python(length: int, off: int, end: int, psh_end: int, mss: int, seq: int, ident: int) -> None:
    payload = os.urandom(length)
    want = build(tcp_wire.tcp_segments_py, payload, off, end, psh_end, mss, seq, ident)
    got = build(tcp_wire.c_tcp_segments, payload, off, end, psh_end, mss, seq, ident)
    assert got == want


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

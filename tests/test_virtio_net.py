"""The virtio-net header and the offloads around it (core/virtio_net.py), checked with dpkt's own
checksums; and the TCP engine's large segments toward a guest whose NIC takes them."""

import struct

import dpkt
import pytest

from qemu_vpnnet.core import virtio_net as V
from qemu_vpnnet.core.switch import TSO_V4, TSO_V6
from tests.test_tcp import ACK, MSS_1460_WS7, PSH, Guest

MAC_A = b"\x52\x54\x00\x00\x00\x0a"
MAC_B = b"\x52\x54\x00\x00\x00\x0b"
CWR = 0x80


def tcp4(payload: bytes, flags: int = ACK | PSH, seq: int = 1000, ident: int = 7) -> bytes:
    tcp = dpkt.tcp.TCP(sport=40000, dport=80, seq=seq, ack=5, flags=flags, win=500, data=payload)
    ip = dpkt.ip.IP(src=bytes([10, 0, 2, 15]), dst=bytes([10, 0, 2, 16]), p=6, id=ident, ttl=64, data=tcp)
    ip.df = 1
    return bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=0x0800, data=ip))


def tcp6(payload: bytes, flags: int = ACK | PSH, seq: int = 1000) -> bytes:
    tcp = dpkt.tcp.TCP(sport=40000, dport=80, seq=seq, ack=5, flags=flags, win=500, data=payload)
    src = bytes.fromhex("fec0000000000000000000000000000f")
    dst = bytes.fromhex("fec00000000000000000000000000010")
    ip6 = dpkt.ip6.IP6(src=src, dst=dst, nxt=6, hlim=64, plen=len(bytes(tcp)), data=tcp)
    return bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=0x86DD, data=ip6))


def checksums_ok(frame: bytes) -> bool:
    """Both checksums as dpkt computes them on a copy with the fields zeroed."""
    eth = dpkt.ethernet.Ethernet(frame)
    ip = eth.data
    tcp = ip.data
    sent = tcp.sum
    tcp.sum = 0
    if isinstance(ip, dpkt.ip.IP):
        sent_ip = ip.sum
        ip.sum = 0
        fresh = dpkt.ip.IP(bytes(ip))
        return bool(fresh.sum == sent_ip and fresh.data.sum == sent)
    fresh6 = dpkt.ethernet.Ethernet(bytes(eth))
    return bool(fresh6.data.data.sum == sent)


@pytest.mark.parametrize("build", [tcp4, tcp6])
def test_a_tso_segment_is_cut_as_a_nic_would(build: object) -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes
    assert callable(build)
    frame = build(payload, flags=ACK | PSH | dpkt.tcp.TH_FIN | CWR)
    segments = V.segment_tcp(frame, 1448)
    assert len(segments) == 8  # 7 x 1448 + 104
    joined = b""
    seq = 1000
    for i, seg in enumerate(segments):
        assert checksums_ok(seg)
        ip = dpkt.ethernet.Ethernet(seg).data
        tcp = ip.data
        assert tcp.seq == seq
        seq += len(tcp.data)
        joined += tcp.data
        last = i == len(segments) - 1
        assert bool(tcp.flags & dpkt.tcp.TH_FIN) == last and bool(tcp.flags & PSH) == last
        assert bool(tcp.flags & CWR) == (i == 0) and tcp.flags & ACK
        if isinstance(ip, dpkt.ip.IP):
            assert ip.id == 7 + i and ip.len == len(seg) - 14 and ip.df == 1
        else:
            assert ip.plen == len(seg) - 54
    assert joined == payload


def test_tso_segments_refused_when_they_make_no_sense() -> None:
    frame = tcp4(b"x" * 60000)
    with pytest.raises(V.VirtioNetError):
        V.segment_tcp(frame, 0)
    with pytest.raises(V.VirtioNetError):
        V.segment_tcp(frame, 1)  # 60000 segments: a hostile gso_size, not a frame storm
    with pytest.raises(V.VirtioNetError):
        V.segment_tcp(frame[:-100], 1448)  # IP length beyond the frame
    udp = bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=0x0800, data=dpkt.ip.IP(p=17, data=b"")))
    with pytest.raises(V.VirtioNetError):
        V.segment_tcp(udp, 1448)
    with pytest.raises(V.VirtioNetError):
        V.tcp_offsets(b"\x00" * 30)


def test_a_partial_checksum_is_completed() -> None:
    """NEEDS_CSUM: the TCP checksum field holds the pseudo-header sum only; completing it gives
    the frame dpkt built."""
    frame = tcp4(b"hello, partial checksum" * 50)
    start = 14 + 20
    src, dst = frame[26:30], frame[30:34]
    tcp_len = len(frame) - start
    pseudo = sum(struct.unpack("!HHHH", src + dst)) + 6 + tcp_len
    while pseudo > 0xFFFF:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    partial = bytearray(frame)
    partial[start + 16 : start + 18] = pseudo.to_bytes(2, "big")
    V.complete_checksum(partial, start, 16)
    assert bytes(partial) == frame
    for bad_start, bad_offset in ((len(frame) - 1, 16), (4, 16), (start, len(frame))):
        with pytest.raises(V.VirtioNetError):
            V.complete_checksum(bytearray(frame), bad_start, bad_offset)


def test_headers_round_trip() -> None:
    header = V.rx_header(V.F_DATA_VALID, V.GSO_TCPV4, 54, 1448, 3)
    assert len(header) == V.HEADER_LEN
    assert V.parse_header(header, V.HEADER_LEN) == (V.F_DATA_VALID, V.GSO_TCPV4, 54, 1448, 0, 0)
    assert header[10:12] == b"\x03\x00"  # num_buffers
    assert V.header_len(True, False) == V.header_len(False, True) == 12 and V.header_len(False, False) == 10
    with pytest.raises(V.VirtioNetError):
        V.parse_header(b"\x00" * 5, 10)


@pytest.mark.parametrize("tso", [True, False])
def test_a_tso_guest_gets_64k_segments_of_whole_mss(tso: bool) -> None:
    """With the guest's port taking TSO, data goes out in segments of a multiple of the MSS up to
    64 KiB; the frame's MSS (its gso_size) is found from the frame; without, MSS-sized segments."""
    g = Guest()
    if tso:
        g.stack.switch.set_tso(1, TSO_V4 | TSO_V6)
    flow = g.connect(opts=MSS_1460_WS7)
    g.send(ACK, window=65535)
    g.frames()
    g.stack.tcp.host_data(flow, b"z" * 60000, 0.0)
    raw = list(g.stack.switch.out[1])
    segs = g.frames()
    sizes = [len(s.data) for s in segs]
    assert sum(sizes) == 60000
    if tso:
        assert sizes == [60000]  # under 65475 // 1460 * 1460 = 64240: one segment
        assert V.tcp_offsets(raw[0]) == (False, 34, 20)
        assert raw[0][50:52] == b"\0\0"  # the payload not summed: the port sends it NEEDS_CSUM
        assert g.stack.tcp.mss_toward(raw[0], False, 34) == 1460
    else:
        assert max(sizes) == 1460
    g.stack.tcp.host_data(flow, b"w" * 200000, 0.0)
    g.send(ACK, ack=g.peer_seq + 60000, window=65535)
    if tso:
        big = [len(s.data) for s in g.frames()]
        assert big and all(n % 1460 == 0 or n == big[-1] for n in big) and max(big) > 1460

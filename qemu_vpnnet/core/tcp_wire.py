"""TCP on the wire: whole frames toward a guest, option parsing, 32-bit sequence arithmetic."""

import struct
from typing import Final

from qemu_vpnnet.core.checksum import finish, sum16
from qemu_vpnnet.core.packets import ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, TCP_ACK, TCP_PSH

try:  # the segment loop in C (core/_fastpath.c); optional
    from qemu_vpnnet.core._fastpath import tcp_segments as c_tcp_segments

    HAVE_C_SEGMENTS: Final = True
except ImportError:
    HAVE_C_SEGMENTS = False  # type: ignore[misc]

_ETH: Final = struct.Struct("!6s6sH")
_IP: Final = struct.Struct("!BBHHHBBH4s4s")
_TCP: Final = struct.Struct("!HHIIBBHHH")
_HEADERS: Final = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIHHHH")  # Ethernet + IPv4 + TCP without options
_HEADERS6: Final = struct.Struct("!6s6sHIHBB16s16sHHIIHHHH")  # Ethernet + IPv6 + TCP without options
HEADER_LEN: Final = 54  # Ethernet + IPv4 + TCP without options
HEADER6_LEN: Final = 74  # Ethernet + IPv6 + TCP without options
SEQ_MOD: Final = 1 << 32
SEQ_HALF: Final = 1 << 31

OPT_END: Final = 0
OPT_NOP: Final = 1
OPT_MSS: Final = 2
OPT_WSCALE: Final = 3
OPT_SACK_PERMITTED: Final = 4
OPT_SACK: Final = 5
MAX_SACK_BLOCKS: Final = 4  # 2 NOPs, kind, length and 4 blocks of 8 bytes fill 36 of the 40 option bytes


def address_sums(src: bytes, dst: bytes, sport: int, dport: int) -> tuple[int, int]:
    """Partial checksums of what stays fixed for one connection's frames toward the guest.

    The first covers the IPv4 header's constant words (version, flags, TTL, protocol,
    addresses), the second the TCP pseudo-header's addresses and protocol plus the ports. For
    16-byte (IPv6) addresses the first is 0: IPv6 has no header checksum.
    """
    if len(src) == 16:
        return 0, sum16(src, sum16(dst, IPPROTO_TCP + sport + dport))
    addr_words = (
        ((src[0] << 8) | src[1]) + ((src[2] << 8) | src[3]) + ((dst[0] << 8) | dst[1]) + ((dst[2] << 8) | dst[3])
    )
    ip_base = 0x4500 + 0x4000 + ((64 << 8) | IPPROTO_TCP) + addr_words
    tcp_base = addr_words + IPPROTO_TCP + sport + dport
    return ip_base, tcp_base


def segment_sum(
    tcp_base: int, tcp_len: int, seq: int, ack: int, off_flags: int, window: int, options: bytes, payload: bytes
) -> int:
    """The TCP checksum's partial sum of one segment: tcp_base (address_sums) and the fields,
    summed as numbers, plus the options' and payload's bytes."""
    total = tcp_base + tcp_len + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF) + off_flags + window
    if options:
        total = sum16(options, total)
    if payload:
        total = sum16(payload, total)
    return total


def build_tcp_frame_with(
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes,
    payload: bytes,
    ident: int,
    ip_base: int,
    tcp_base: int,
) -> bytes:
    """An Ethernet frame carrying one TCP segment; ip_base and tcp_base from address_sums().

    The headers are packed once, their checksums summed from the fields rather than the bytes.
    IPv6 when the addresses are 16 bytes (ident is then unused).
    """
    hlen = 20 + len(options)
    if len(src) == 16:
        return build_tcp6_frame_with(
            dst_mac, src_mac, src, dst, sport, dport, seq, ack, flags, window, options, payload, tcp_base
        )
    tcp_len = hlen + len(payload)
    ident &= 0xFFFF
    seq &= 0xFFFFFFFF
    ack &= 0xFFFFFFFF
    ip_csum = finish(ip_base + 20 + tcp_len + ident)
    off_flags = ((hlen >> 2) << 12) | flags
    total = segment_sum(tcp_base, tcp_len, seq, ack, off_flags, window, options, payload)
    header = _HEADERS.pack(
        dst_mac,
        src_mac,
        ETH_P_IP,
        0x45,
        0,
        20 + tcp_len,
        ident,
        0x4000,
        64,
        IPPROTO_TCP,
        ip_csum,
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        off_flags,
        window,
        finish(total),
        0,
    )
    if options:
        return b"".join((header, options, payload))
    return header + payload


def build_tcp6_frame_with(
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes,
    payload: bytes,
    tcp_base: int,
) -> bytes:
    """build_tcp_frame_with() for IPv6 (hop limit 64, traffic class and flow label 0)."""
    hlen = 20 + len(options)
    tcp_len = hlen + len(payload)
    seq &= 0xFFFFFFFF
    ack &= 0xFFFFFFFF
    off_flags = ((hlen >> 2) << 12) | flags
    total = segment_sum(tcp_base, tcp_len, seq, ack, off_flags, window, options, payload)
    header = _HEADERS6.pack(
        dst_mac,
        src_mac,
        ETH_P_IPV6,
        0x60000000,
        tcp_len,
        IPPROTO_TCP,
        64,
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        off_flags,
        window,
        finish(total),
        0,
    )
    if options:
        return b"".join((header, options, payload))
    return header + payload


def header_template(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The 54 (IPv4) or 74 (IPv6) header bytes shared by a connection's data segments toward
    the guest.

    Length, ident, sequence numbers, flags, window and checksums are left zero for
    tcp_segments() to fill in.
    """
    if len(src) == 16:
        return _HEADERS6.pack(
            dst_mac, src_mac, ETH_P_IPV6, 0x60000000, 0, IPPROTO_TCP, 64, src, dst, sport, dport, 0, 0, 0, 0, 0, 0
        )
    return _HEADERS.pack(
        dst_mac, src_mac, ETH_P_IP, 0x45, 0, 0, 0, 0x4000, 64, IPPROTO_TCP, 0, src, dst, sport, dport, 0, 0, 0, 0, 0, 0
    )


def tcp_segments_py(
    frames: list[bytes],
    header: bytes,
    buf: bytearray,
    off: int,
    end: int,
    psh_end: int,
    mss: int,
    seq: int,
    ack: int,
    window: int,
    ident: int,
    ip_base: int,
    tcp_base: int,
    checksum: bool = True,
) -> int:
    """Append one frame per segment of buf[off:end] (at most mss bytes each) to frames.

    header comes from header_template(); idents count up from ident, sequence numbers from seq;
    the segment ending at psh_end carries PSH. Returns the number of frames. The plain version
    of core/_fastpath.c's tcp_segments (the same bytes), one build_tcp_frame_with() each.
    Without checksum the TCP checksum field is 0 (a partial-checksum guest: core/vhost_net.py).
    """
    if len(header) == HEADER6_LEN:
        dst_mac, src_mac, src, dst = header[0:6], header[6:12], header[22:38], header[38:54]
        t = 54
    else:
        dst_mac, src_mac, src, dst = header[0:6], header[6:12], header[26:30], header[30:34]
        t = 34
    sport, dport = (header[t] << 8) | header[t + 1], (header[t + 2] << 8) | header[t + 3]
    count = 0
    view = memoryview(buf)
    while off < end:
        n = end - off if end - off < mss else mss
        flags = TCP_ACK | TCP_PSH if off + n == psh_end else TCP_ACK
        payload = bytes(view[off : off + n])
        frame = build_tcp_frame_with(
            dst_mac,
            src_mac,
            src,
            dst,
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
            b"",
            payload,
            ident,
            ip_base,
            tcp_base,
        )
        if not checksum:
            frame = frame[: t + 16] + b"\x00\x00" + frame[t + 18 :]
        frames.append(frame)
        off += n
        seq += n
        ident += 1
        count += 1
    view.release()
    return count


# what the TCP engine calls: the loop in C when the extension is built
tcp_segments: Final = c_tcp_segments if HAVE_C_SEGMENTS else tcp_segments_py


def build_tcp_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes,
    payload: bytes,
    ident: int,
) -> bytes:
    """An Ethernet frame carrying one TCP segment, IP and TCP checksums filled in."""
    ip_base, tcp_base = address_sums(src, dst, sport, dport)
    return build_tcp_frame_with(
        dst_mac, src_mac, src, dst, sport, dport, seq, ack, flags, window, options, payload, ident, ip_base, tcp_base
    )


def unpack_tcp_header(frame: bytes, offset: int) -> tuple[int, int, int, int, int, int, int, int, int]:
    """(sport, dport, seq, ack, data offset byte, flags, window, checksum, urgent)."""
    return _TCP.unpack_from(frame, offset)


def tcp_options(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(kind, offset of the option's value, value length) of each option in data[start:end].

    Raises ValueError for options that run past their end.
    """
    found: list[tuple[int, int, int]] = []
    i = start
    while i < end:
        kind = data[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise ValueError("truncated TCP option")
        length = data[i + 1]
        if length < 2 or i + length > end:
            raise ValueError("bad TCP option length")
        found.append((kind, i + 2, length - 2))
        i += length
    return found


def parse_syn_options(options: bytes) -> tuple[int, int, bool]:
    """(MSS, window scale, SACK permitted) from a SYN's options; MSS 536 and scale -1 when absent.

    Raises ValueError for options that run past their end.
    """
    mss = 536
    wscale = -1
    sack = False
    for kind, at, size in tcp_options(options, 0, len(options)):
        if kind == OPT_MSS and size == 2:
            mss = (options[at] << 8) | options[at + 1]
        elif kind == OPT_WSCALE and size == 1:
            wscale = min(options[at], 14)
        elif kind == OPT_SACK_PERMITTED and size == 0:
            sack = True
    return mss, wscale, sack


def syn_options(mss: int, wscale: int, sack: bool) -> bytes:
    """Options for our SYN or SYN-ACK: MSS, SACK permitted when sack, window scale when wscale >= 0."""
    opts = bytes((OPT_MSS, 4, (mss >> 8) & 0xFF, mss & 0xFF))
    if sack:
        opts += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
    if wscale >= 0:
        opts += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    return opts


def sack_option(blocks: list[tuple[int, int]]) -> bytes:
    """A SACK option (RFC 2018) for up to MAX_SACK_BLOCKS (left, right) edges, NOP-padded to 4n bytes."""
    blocks = blocks[:MAX_SACK_BLOCKS]
    parts = [bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks)))]
    for left, right in blocks:
        parts.append((left & 0xFFFFFFFF).to_bytes(4, "big"))
        parts.append((right & 0xFFFFFFFF).to_bytes(4, "big"))
    return b"".join(parts)


def unwrap(value: int, reference: int) -> int:
    """The 64-bit sequence number nearest reference whose low 32 bits are value."""
    delta = (value - reference) & 0xFFFFFFFF
    if delta >= SEQ_HALF:
        delta -= SEQ_MOD
    return reference + delta

"""The virtio-net header (virtio 1.x, 5.1.6) in front of every frame on a vhost-user ring, sans-IO.

Each buffer on the TX and RX rings starts with this header: flags u8, gso_type u8, hdr_len u16,
gso_size u16, csum_start u16, csum_offset u16 (10 bytes), then num_buffers u16 with
VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF (12 bytes), little-endian.

From the guest (TX), with the offloads negotiated:
- NEEDS_CSUM: the bytes from csum_start on carry a checksum still to be completed; the field at
  csum_start + csum_offset holds only the pseudo-header sum. The TCP engine and the UDP path never
  read a guest's TCP or UDP checksum (they take the payload), so frames for the gateway go in as
  they are; a frame for another guest, or of another protocol, has its checksum completed here
  (`complete_checksum`), as the receiver may verify it.
- gso_type TCPV4/TCPV6 (HOST_TSO4/6): one TCP segment of up to 64 KiB that the NIC would cut into
  gso_size pieces. The TCP engine takes it whole; for another guest `segment_tcp` cuts it as the
  NIC would (that guest's link may be a 1500-byte stream socket).

Toward the guest (RX): a frame either goes with flags 0 (the guest verifies), or, with GUEST_CSUM,
DATA_VALID (our frames' checksums are right: the guest need not verify them), and a TCP frame
longer than the guest's MTU allows, with GUEST_TSO4/6, as gso_type TCPV4/TCPV6 and gso_size the
connection's MSS (the guest's stack treats it as the segments GRO would have merged).

Everything here checks its input: the header comes from an untrusted guest, and a csum_start or
hdr_len pointing outside the frame is an error (VirtioNetError), never an index out of range.
"""

import struct
from typing import Final

from qemu_vpnnet.core.checksum import checksum, finish, pseudo_header_sum, sum16
from qemu_vpnnet.core.packets import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP6_HLEN, IPPROTO_TCP, TCP_FIN, TCP_PSH

F_NEEDS_CSUM: Final = 1
F_DATA_VALID: Final = 2
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_UDP: Final = 3
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80

HEADER_LEN: Final = 12  # with VERSION_1 or MRG_RXBUF (num_buffers); 10 for a legacy guest
NUM_BUFFERS_AT: Final = 10  # the offset of num_buffers in the 12-byte header
TCP_CHECKSUM_OFFSET: Final = 16  # csum_offset of TCP: its checksum field from the start of its header
LEGACY_HEADER_LEN: Final = 10
MAX_GSO_SEGMENTS: Final = 1024  # a hostile gso_size of 1 must not make 64 Ki frames
TCP_CWR: Final = 0x80

_HEADER: Final = struct.Struct("<BBHHHHH")
_HEADER10: Final = struct.Struct("<BBHHHH")
NO_OFFLOAD_HEADER: Final = bytes(HEADER_LEN)
DATA_VALID_HEADER: Final = bytes((F_DATA_VALID,)) + bytes(HEADER_LEN - 1)


class VirtioNetError(ValueError):
    """A guest's virtio-net header that cannot be honoured (the frame is dropped)."""


def header_len(version_1: bool, mrg_rxbuf: bool) -> int:
    return HEADER_LEN if version_1 or mrg_rxbuf else LEGACY_HEADER_LEN


def parse_header(data: bytes, length: int) -> tuple[int, int, int, int, int, int]:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) of the header at data[0:length]."""
    if len(data) < length:
        raise VirtioNetError(f"buffer of {len(data)} bytes holds no {length}-byte virtio-net header")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HEADER10.unpack_from(data, 0)
    return int(flags), int(gso_type), int(hdr_len), int(gso_size), int(csum_start), int(csum_offset)


def rx_header(
    flags: int, gso_type: int, hdr_len: int, gso_size: int, num_buffers: int, csum_start: int = 0, csum_offset: int = 0
) -> bytes:
    """A 12-byte header toward the guest (csum_start and csum_offset for F_NEEDS_CSUM)."""
    return _HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def partial_tcp_checksum(frame: bytes | bytearray, v6: bool, start: int) -> int:
    """What the checksum field of a NEEDS_CSUM TCP frame holds: the pseudo-header's sum, folded,
    not complemented (the guest adds the TCP header and payload if it ever needs the checksum).
    The TCP length is the IP header's, not the frame's (an Ethernet frame may be padded)."""
    if v6:
        length = (frame[18] << 8) | frame[19]
        total = pseudo_header_sum(bytes(frame[22:38]), bytes(frame[38:54]), IPPROTO_TCP, length)
    else:
        length = ((frame[16] << 8) | frame[17]) - (start - ETH_HLEN)
        total = pseudo_header_sum(bytes(frame[26:30]), bytes(frame[30:34]), IPPROTO_TCP, length)
    return finish(total) ^ 0xFFFF  # folded, and the complement undone


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """NEEDS_CSUM: sum frame[csum_start:] (its checksum field holds the pseudo-header sum) and store
    the complement at csum_start + csum_offset."""
    field = csum_start + csum_offset
    if csum_start < ETH_HLEN or field + 2 > len(frame):
        raise VirtioNetError(f"checksum at {csum_start}+{csum_offset} outside a frame of {len(frame)} bytes")
    value = finish(sum16(bytes(frame[csum_start:])))
    frame[field] = value >> 8
    frame[field + 1] = value & 0xFF


def tcp_offsets(frame: bytes | bytearray) -> tuple[bool, int, int]:
    """(is_v6, start of TCP header, its length) of an Ethernet frame carrying TCP directly over IPv4
    or IPv6 (no extension headers); VirtioNetError otherwise."""
    if len(frame) < ETH_HLEN + 20:
        raise VirtioNetError("frame too short for IP")
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == ETH_P_IP:
        start = ETH_HLEN + (frame[ETH_HLEN] & 0x0F) * 4
        if frame[ETH_HLEN] >> 4 != 4 or start < ETH_HLEN + 20 or frame[ETH_HLEN + 9] != IPPROTO_TCP:
            raise VirtioNetError("not an IPv4 TCP frame")
        v6 = False
    elif ethertype == ETH_P_IPV6:
        start = ETH_HLEN + IP6_HLEN
        if len(frame) < start or frame[ETH_HLEN + 6] != IPPROTO_TCP:
            raise VirtioNetError("not an IPv6 TCP frame (or one with extension headers)")
        v6 = True
    else:
        raise VirtioNetError(f"ethertype {ethertype:#x} carries no TCP")
    if len(frame) < start + 20:
        raise VirtioNetError("frame too short for TCP")
    hlen = (frame[start + 12] >> 4) * 4
    if hlen < 20 or start + hlen > len(frame):
        raise VirtioNetError("bad TCP header length")
    return v6, start, hlen


def _tcp_checksum(segment: bytearray, v6: bool, start: int) -> None:
    """The full TCP checksum of one segment built by segment_tcp."""
    segment[start + 16] = 0
    segment[start + 17] = 0
    if v6:
        src, dst = bytes(segment[ETH_HLEN + 8 : ETH_HLEN + 24]), bytes(segment[ETH_HLEN + 24 : ETH_HLEN + 40])
    else:
        src, dst = bytes(segment[ETH_HLEN + 12 : ETH_HLEN + 16]), bytes(segment[ETH_HLEN + 16 : ETH_HLEN + 20])
    value = finish(sum16(bytes(segment[start:]), pseudo_header_sum(src, dst, IPPROTO_TCP, len(segment) - start)))
    segment[start + 16] = value >> 8
    segment[start + 17] = value & 0xFF


def segment_tcp(frame: bytes | bytearray, gso_size: int) -> list[bytes]:
    """Cut a guest's TSO super-segment into the frames a NIC would send: gso_size bytes of payload
    each, sequence numbers advanced, FIN and PSH on the last only, CWR on the first only, IPv4
    total length, ident and header checksum and IPv6 payload length set, TCP checksums complete."""
    v6, start, hlen = tcp_offsets(frame)
    if v6:
        end = ETH_HLEN + IP6_HLEN + ((frame[ETH_HLEN + 4] << 8) | frame[ETH_HLEN + 5])
    else:
        end = ETH_HLEN + ((frame[ETH_HLEN + 2] << 8) | frame[ETH_HLEN + 3])
    if end > len(frame) or end < start + hlen:
        raise VirtioNetError("IP length disagrees with the frame")
    payload = end - start - hlen
    if gso_size <= 0:
        raise VirtioNetError("gso_size 0")
    if (payload + gso_size - 1) // gso_size > MAX_GSO_SEGMENTS:
        raise VirtioNetError(f"gso_size {gso_size} would cut {payload} bytes into too many segments")
    header = bytearray(frame[: start + hlen])
    seq = int.from_bytes(frame[start + 4 : start + 8], "big")
    flags = header[start + 13]
    ident = 0 if v6 else int.from_bytes(frame[ETH_HLEN + 4 : ETH_HLEN + 6], "big")
    out: list[bytes] = []
    offset = start + hlen
    while True:
        n = min(gso_size, end - offset)
        last = offset + n >= end
        segment = bytearray(header)
        segment += frame[offset : offset + n]
        segment[start + 4 : start + 8] = (seq & 0xFFFFFFFF).to_bytes(4, "big")
        seg_flags = flags if last else flags & ~(TCP_FIN | TCP_PSH)
        if out:
            seg_flags &= ~TCP_CWR
        segment[start + 13] = seg_flags
        if v6:
            segment[ETH_HLEN + 4 : ETH_HLEN + 6] = (len(segment) - ETH_HLEN - IP6_HLEN).to_bytes(2, "big")
        else:
            segment[ETH_HLEN + 2 : ETH_HLEN + 4] = (len(segment) - ETH_HLEN).to_bytes(2, "big")
            segment[ETH_HLEN + 4 : ETH_HLEN + 6] = (ident & 0xFFFF).to_bytes(2, "big")
            segment[ETH_HLEN + 10] = 0
            segment[ETH_HLEN + 11] = 0
            ip_sum = checksum(bytes(segment[ETH_HLEN:start]))
            segment[ETH_HLEN + 10] = ip_sum >> 8
            segment[ETH_HLEN + 11] = ip_sum & 0xFF
            ident += 1
        _tcp_checksum(segment, v6, start)
        out.append(bytes(segment))
        seq += n
        offset += n
        if last:
            return out

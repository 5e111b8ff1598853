"""Parse and build Ethernet, ARP, IPv4, ICMP, UDP and TCP headers.

Builders return whole Ethernet frames as bytes with every checksum filled in. Parsers are
plain functions over bytes that raise nothing: callers check lengths first and count drops.
"""

import struct
from typing import Final

from qemu_vpnnet.core.checksum import checksum, finish, pseudo_header_sum, sum16

ETH_HLEN: Final = 14
ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
BROADCAST_MAC: Final = b"\xff\xff\xff\xff\xff\xff"

IPPROTO_ICMP: Final = 1
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_ICMPV6: Final = 58
# IPv6 extension headers (RFC 8200 4)
IPPROTO_HOPOPTS: Final = 0
IPPROTO_ROUTING: Final = 43
IPPROTO_FRAGMENT: Final = 44
IPPROTO_ESP: Final = 50
IPPROTO_AH: Final = 51
IPPROTO_NONE: Final = 59
IPPROTO_DSTOPTS: Final = 60

IP_HLEN: Final = 20
IP6_HLEN: Final = 40
UDP_HLEN: Final = 8
TCP_HLEN: Final = 20

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

_ETH: Final = struct.Struct("!6s6sH")
_IP: Final = struct.Struct("!BBHHHBBH4s4s")
_IP6: Final = struct.Struct("!IHBB16s16s")
_UDP: Final = struct.Struct("!HHHH")
_TCP: Final = struct.Struct("!HHIIBBHHH")
_ARP: Final = struct.Struct("!HHBBH6s4s6s4s")
_ICMP_ECHO: Final = struct.Struct("!BBHHH")


def mac_str(mac: bytes) -> str:
    """52:54:00:12:34:56 form of a 6-byte MAC address."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """6 bytes from 52:54:00:12:34:56 (or with dashes); ValueError when malformed."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


def eth_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return _ETH.pack(dst, src, ethertype)


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int, ttl: int = 64) -> bytes:
    """A 20-byte IPv4 header with the checksum filled in, Don't-Fragment set."""
    hdr = _IP.pack(0x45, 0, IP_HLEN + payload_len, ident & 0xFFFF, 0x4000, ttl, proto, 0, src, dst)
    csum = checksum(hdr)
    return hdr[:10] + bytes(((csum >> 8) & 0xFF, csum & 0xFF)) + hdr[12:]


def build_ipv4_frame(
    dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, proto: int, l4: bytes, ident: int
) -> bytes:
    return _ETH.pack(dst_mac, src_mac, ETH_P_IP) + ipv4_header(src, dst, proto, len(l4), ident) + l4


def ipv6_header(src: bytes, dst: bytes, next_header: int, payload_len: int, hop_limit: int = 64) -> bytes:
    """A 40-byte IPv6 header (traffic class and flow label 0)."""
    return _IP6.pack(0x60000000, payload_len, next_header, hop_limit, src, dst)


def build_ipv6_frame(
    dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, next_header: int, l4: bytes, hop_limit: int = 64
) -> bytes:
    header = _IP6.pack(0x60000000, len(l4), next_header, hop_limit, src, dst)
    return _ETH.pack(dst_mac, src_mac, ETH_P_IPV6) + header + l4


def unpack_ipv6(data: bytes, offset: int) -> tuple[int, int, int, int, bytes, bytes]:
    """(version/class/flow word, payload length, next header, hop limit, source, destination)."""
    return _IP6.unpack_from(data, offset)


def icmpv6_message(src: bytes, dst: bytes, icmp_type: int, code: int, rest: bytes) -> bytes:
    """An ICMPv6 message (RFC 4443), checksum over the IPv6 pseudo-header filled in."""
    body = bytes((icmp_type, code, 0, 0)) + rest
    csum = finish(sum16(body, pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(body))))
    return body[:2] + bytes(((csum >> 8) & 0xFF, csum & 0xFF)) + body[4:]


def ipv6_fragments(
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    next_header: int,
    l4: bytes,
    ident: int,
    mtu: int,
) -> list[bytes]:
    """Whole Ethernet frames carrying l4 in IPv6 fragments (RFC 8200 4.5) of at most mtu bytes.

    For a packet larger than the guest's MTU (a big UDP reply or echo reply); mtu is at least
    1280, so every fragment carries 8-byte multiples of at least 1232 bytes.
    """
    step = ((mtu - IP6_HLEN - 8) // 8) * 8
    eth = _ETH.pack(dst_mac, src_mac, ETH_P_IPV6)
    frames: list[bytes] = []
    offset = 0
    total = len(l4)
    ident &= 0xFFFFFFFF
    while offset < total:
        chunk = l4[offset : offset + step]
        more = 1 if offset + len(chunk) < total else 0
        frag = struct.pack("!BBHI", next_header, 0, offset | more, ident)
        frames.append(eth + _IP6.pack(0x60000000, 8 + len(chunk), IPPROTO_FRAGMENT, 64, src, dst) + frag + chunk)
        offset += len(chunk)
    return frames


def udp_segment(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP header plus payload, checksum over the pseudo-header filled in."""
    length = UDP_HLEN + len(payload)
    hdr = _UDP.pack(sport, dport, length, 0)
    total = sum16(hdr, pseudo_header_sum(src, dst, IPPROTO_UDP, length))
    csum = finish(sum16(payload, total))
    if csum == 0:
        csum = 0xFFFF
    return _UDP.pack(sport, dport, length, csum) + payload


def icmp_message(icmp_type: int, code: int, rest: bytes) -> bytes:
    """An ICMP message: type, code, checksum, then rest (identifier/sequence/data or unused+quote)."""
    body = bytes((icmp_type, code, 0, 0)) + rest
    csum = checksum(body)
    return body[:2] + bytes(((csum >> 8) & 0xFF, csum & 0xFF)) + body[4:]


def arp_packet(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return _ARP.pack(1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)


def unpack_arp(data: bytes, offset: int) -> tuple[int, int, int, int, int, bytes, bytes, bytes, bytes]:
    return _ARP.unpack_from(data, offset)


def unpack_udp(data: bytes, offset: int) -> tuple[int, int, int, int]:
    return _UDP.unpack_from(data, offset)


def unpack_tcp(data: bytes, offset: int) -> tuple[int, int, int, int, int, int, int, int, int]:
    return _TCP.unpack_from(data, offset)


def unpack_icmp_echo(data: bytes, offset: int) -> tuple[int, int, int, int, int]:
    return _ICMP_ECHO.unpack_from(data, offset)


def ipv4_fragments(
    dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, proto: int, l4: bytes, ident: int, mtu: int
) -> list[bytes]:
    """Whole Ethernet frames carrying l4 as IPv4 fragments of at most mtu bytes each (RFC 791).

    For a packet that does not fit the guest's MTU (a large UDP reply, a big echo reply); the
    fragments have Don't-Fragment clear and share ident. mtu must be at least 28.
    """
    step = ((mtu - IP_HLEN) // 8) * 8
    eth = _ETH.pack(dst_mac, src_mac, ETH_P_IP)
    frames: list[bytes] = []
    offset = 0
    total = len(l4)
    while offset < total:
        chunk = l4[offset : offset + step]
        more = 0x2000 if offset + len(chunk) < total else 0
        hdr = _IP.pack(0x45, 0, IP_HLEN + len(chunk), ident & 0xFFFF, more | (offset >> 3), 64, proto, 0, src, dst)
        csum = checksum(hdr)
        frames.append(eth + hdr[:10] + bytes(((csum >> 8) & 0xFF, csum & 0xFF)) + hdr[12:] + chunk)
        offset += len(chunk)
    return frames


def ip_quote(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    """The IP header (IPv4 or IPv6 by the addresses' length) of a packet, for an ICMP error's quote."""
    if len(src) == 16:
        return ipv6_header(src, dst, proto, payload_len)
    return ipv4_header(src, dst, proto, payload_len, 0)


def udp_quote(src: bytes, dst: bytes, sport: int, dport: int, payload_len: int) -> bytes:
    """The IP + UDP header of a datagram as an ICMP error quotes it (UDP checksum left 0)."""
    length = UDP_HLEN + payload_len
    return ip_quote(src, dst, IPPROTO_UDP, length) + _UDP.pack(sport, dport, length, 0)


def is_unicast_outside(addr: bytes) -> bool:
    """False for addresses no packet may be sent to from outside: 0/8, 127/8, multicast, class E;
    for IPv6 (16 bytes) ::/8 (unspecified, loopback, v4-compatible), v4-mapped, link-local and
    multicast."""
    first = addr[0]
    if len(addr) == 16:
        if first == 0xFF or first == 0 or (first == 0xFE and addr[1] & 0xC0 == 0x80):
            return False
        return True
    return first != 0 and first != 127 and first < 224

"""Frames a guest would send, built with dpkt (independently of the core's own builders)."""

import socket

import dpkt

GUEST_MAC = bytes.fromhex("525400123456")
GUEST2_MAC = bytes.fromhex("525400abcdef")
GW_MAC = bytes.fromhex("52550a000202")
BCAST = b"\xff" * 6


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


def eth(dst: bytes, src: bytes, etype: int, payload: bytes) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=etype, data=payload))


def ipv4(src: str, dst: str, proto: int, l4: dpkt.Packet) -> dpkt.ip.IP:
    pkt = dpkt.ip.IP(src=ip(src), dst=ip(dst), p=proto, ttl=64, data=l4)
    pkt.len = 20 + len(bytes(l4))
    return pkt


def ip_frame(src_mac: bytes, dst_mac: bytes, pkt: dpkt.ip.IP) -> bytes:
    return eth(dst_mac, src_mac, dpkt.ethernet.ETH_TYPE_IP, bytes(pkt))


def dhcp_frame(
    mac: bytes,
    mtype: int,
    xid: int = 0x1234,
    requested: str | None = None,
    ciaddr: str = "0.0.0.0",
    server_id: str | None = None,
) -> bytes:
    opts = [(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes((mtype,)))]
    if requested:
        opts.append((dpkt.dhcp.DHCP_OPT_REQ_IP, ip(requested)))
    if server_id:
        opts.append((dpkt.dhcp.DHCP_OPT_SERVER_ID, ip(server_id)))
    msg = dpkt.dhcp.DHCP(chaddr=mac + b"\x00" * 10, xid=xid, opts=opts, ciaddr=int.from_bytes(ip(ciaddr), "big"))
    udp = dpkt.udp.UDP(sport=68, dport=67, data=bytes(msg))
    udp.ulen = 8 + len(bytes(msg))
    src = ciaddr
    pkt = ipv4(src, "255.255.255.255", dpkt.ip.IP_PROTO_UDP, udp)
    return ip_frame(mac, BCAST, pkt)


def tcp_frame(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    data: bytes = b"",
    window: int = 65535,
    opts: bytes = b"",
    mac: bytes = GUEST_MAC,
) -> bytes:
    seg = dpkt.tcp.TCP(
        sport=sport,
        dport=dport,
        seq=seq & 0xFFFFFFFF,
        ack=ack & 0xFFFFFFFF,
        flags=flags,
        win=window,
        opts=opts,
        data=data,
    )
    seg.off = (20 + len(opts)) // 4
    return ip_frame(mac, GW_MAC, ipv4(src, dst, dpkt.ip.IP_PROTO_TCP, seg))


def parse(frame: bytes) -> dpkt.ethernet.Ethernet:
    return dpkt.ethernet.Ethernet(frame)


def l4_checksum_ok(frame: bytes) -> bool:
    """Recompute the IP and L4 checksums of a frame the core built, with dpkt."""
    e = parse(frame)
    pkt = e.data
    raw_ip = bytes(frame[14 : 14 + pkt.len])
    reparsed = dpkt.ip.IP(raw_ip)
    want_ip = reparsed.sum
    want_l4 = reparsed.data.sum
    reparsed.sum = 0
    reparsed.data.sum = 0
    rebuilt = dpkt.ip.IP(bytes(reparsed))  # dpkt fills in checksums on pack when they are 0
    return rebuilt.sum == want_ip and rebuilt.data.sum == want_l4

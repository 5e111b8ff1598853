"""A fuzz harness over the sans-IO core: a frame corpus built with dpkt, cheap byte mutations,
and a Harness that plays every host socket the core asks for with random events.

Shared by tests/test_fuzz.py (hypothesis, bounded, in CI) and scripts/fuzzlib/run.py (the long
run of millions of frames). Invariants checked by Harness.check(): every table bounded and
next_deadline() a float. An exception from the core is the failure itself.
"""

import random
import socket
import struct

import dpkt

from qemu_vpnnet.core import actions as A
from qemu_vpnnet.core.checksum import checksum
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.dns import MODE_FORWARD, MODE_HOST, question_end
from qemu_vpnnet.core.fragments import MAX_DATAGRAMS
from qemu_vpnnet.core.guard import MAX_V6_CLAIMS
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.core.switch import MAX_MACS

GW_MAC = bytes.fromhex("52550a000202")
BCAST = b"\xff" * 6
MACS = [bytes.fromhex(h) for h in ("525400123456", "525400abcdef", "525400777777", "020000000001")]
PORTS = (1, 2, 3)
GUEST_IPS = ["10.0.2.15", "10.0.2.16", "10.0.2.17", "0.0.0.0", "10.0.2.99"]
DESTS = ["10.0.2.2", "10.0.2.3", "198.51.100.7", "203.0.113.9", "127.0.0.1", "224.0.0.251", "10.0.2.16"]
NAMES = ["example.com", "host.internal", "gateway.internal", "a." * 60 + "x", "", "2.2.0.10.in-addr.arpa"]

# Small limits so that eviction paths run within a short fuzz run; the bounds checked are these.
MAX_UDP_FLOWS = 64
MAX_TCP_FLOWS = 256
MAX_PING_FLOWS = 1024  # core/icmp.py's own constant (checked below against the module)
MAX_COUNTERS = 2000  # distinct counter names: drop reasons and event kinds are a closed set
MAX_DNS_PENDING = 4096
MAX_TIMERS = 16 * MAX_TCP_FLOWS + 4096


def _ip(text: str) -> bytes:
    return socket.inet_aton(text)


def _eth(dst: bytes, src: bytes, etype: int, payload: bytes) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=etype, data=payload))


def _ipv4(mac: bytes, src: str, dst: str, proto: int, l4: bytes, dst_mac: bytes = GW_MAC, off: int = 0) -> bytes:
    pkt = dpkt.ip.IP(src=_ip(src), dst=_ip(dst), p=proto, ttl=64, data=l4)
    pkt.len = 20 + len(l4)
    if off:  # flags and fragment offset, patched in: dpkt's own setter splits them
        raw = bytearray(bytes(pkt))
        raw[6:8] = struct.pack("!H", off)
        raw[10:12] = b"\x00\x00"
        raw[10:12] = struct.pack("!H", checksum(bytes(raw[:20])))
        return _eth(dst_mac, mac, dpkt.ethernet.ETH_TYPE_IP, bytes(raw))
    return _eth(dst_mac, mac, dpkt.ethernet.ETH_TYPE_IP, bytes(pkt))


def _udp(mac: bytes, src: str, dst: str, sport: int, dport: int, data: bytes, dst_mac: bytes = GW_MAC) -> bytes:
    seg = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    seg.ulen = 8 + len(data)
    pkt = dpkt.ip.IP(src=_ip(src), dst=_ip(dst), p=dpkt.ip.IP_PROTO_UDP, ttl=64, data=seg)
    pkt.len = 20 + len(bytes(seg))
    return _eth(dst_mac, mac, dpkt.ethernet.ETH_TYPE_IP, bytes(pkt))


def _tcp(mac: bytes, src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b"",
         opts: bytes = b"") -> bytes:  # fmt: skip
    seg = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF, flags=flags,
                       win=65535, opts=opts, data=data)  # fmt: skip
    seg.off = (20 + len(opts)) // 4
    pkt = dpkt.ip.IP(src=_ip(src), dst=_ip(dst), p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=seg)
    pkt.len = 20 + len(bytes(seg))
    return _eth(GW_MAC, mac, dpkt.ethernet.ETH_TYPE_IP, bytes(pkt))


def dns_query(name: str, qtype: int = 1, qid: int = 0x4242) -> bytes:
    msg = dpkt.dns.DNS(id=qid, qd=[dpkt.dns.DNS.Q(name=name, type=qtype)])
    return bytes(msg)


def dns_response(qid: int, name: str = "example.com") -> bytes:
    msg = dpkt.dns.DNS(id=qid, op=dpkt.dns.DNS_RA | 0x8000, qd=[dpkt.dns.DNS.Q(name=name, type=1)])
    msg.an = [dpkt.dns.DNS.RR(name=name, type=1, ip=_ip("192.0.2.1"), ttl=60)]
    return bytes(msg)


def answer_to(query: bytes) -> bytes:
    """An upstream answer to query (its question repeated, one A record), else a bare one."""
    end = question_end(query, 12) if len(query) >= 12 else -1
    if end < 0:
        return dns_response(int.from_bytes(query[:2].ljust(2, b"\0"), "big"))
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + _ip("192.0.2.1")
    return query[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + query[12:end] + rr


def dhcp(mac: bytes, mtype: int, requested: str | None = None, server_id: str | None = None,
         ciaddr: str = "0.0.0.0") -> bytes:  # fmt: skip
    opts = [(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes((mtype,)))]
    if requested:
        opts.append((dpkt.dhcp.DHCP_OPT_REQ_IP, _ip(requested)))
    if server_id:
        opts.append((dpkt.dhcp.DHCP_OPT_SERVER_ID, _ip(server_id)))
    opts.append((dpkt.dhcp.DHCP_OPT_PARAM_REQ, bytes(range(1, 60))))
    msg = dpkt.dhcp.DHCP(chaddr=mac + b"\x00" * 10, xid=0x1234, opts=opts, ciaddr=int.from_bytes(_ip(ciaddr), "big"))
    return _udp(mac, ciaddr, "255.255.255.255", 68, 67, bytes(msg), dst_mac=BCAST)


def arp(mac: bytes, op: int, spa: str, tpa: str, dst: bytes = BCAST) -> bytes:
    packet = dpkt.arp.ARP(op=op, sha=mac, spa=_ip(spa), tha=b"\x00" * 6, tpa=_ip(tpa))
    return _eth(dst, mac, dpkt.ethernet.ETH_TYPE_ARP, bytes(packet))


def icmp(mac: bytes, src: str, dst: str, itype: int = 8, ident: int = 7, data: bytes = b"ping") -> bytes:
    msg = dpkt.icmp.ICMP(type=itype, code=0, data=dpkt.icmp.ICMP.Echo(id=ident, seq=1, data=data))
    return _ipv4(mac, src, dst, dpkt.ip.IP_PROTO_ICMP, bytes(msg))


def fragments(mac: bytes, src: str, dst: str, payload: bytes, size: int = 24) -> list[bytes]:
    """A UDP datagram to dst split into IP fragments of size bytes (a multiple of 8)."""
    seg = dpkt.udp.UDP(sport=4000, dport=53, data=payload)
    seg.ulen = 8 + len(payload)
    whole = bytes(seg)
    out = []
    for start in range(0, len(whole), size):
        more = start + size < len(whole)
        out.append(_ipv4(mac, src, dst, dpkt.ip.IP_PROTO_UDP, whole[start : start + size],
                         off=(start // 8) | (dpkt.ip.IP_MF if more else 0)))  # fmt: skip
    return out


def corpus() -> list[bytes]:
    """Well-formed frames of every kind a guest sends, for several guests (about 400)."""
    frames: list[bytes] = []
    for mac in MACS:
        for mtype in (dpkt.dhcp.DHCPDISCOVER, dpkt.dhcp.DHCPREQUEST, dpkt.dhcp.DHCPRELEASE, dpkt.dhcp.DHCPINFORM,
                      dpkt.dhcp.DHCPDECLINE):  # fmt: skip
            frames.append(dhcp(mac, mtype))
        frames.append(dhcp(mac, dpkt.dhcp.DHCPREQUEST, requested="10.0.2.15", server_id="10.0.2.2"))
        frames.append(dhcp(mac, dpkt.dhcp.DHCPREQUEST, requested="10.0.2.16", server_id="10.0.2.2"))
        frames.append(dhcp(mac, dpkt.dhcp.DHCPREQUEST, requested="10.0.2.15", ciaddr="10.0.2.15"))
        for src in GUEST_IPS[:3]:
            frames.append(arp(mac, 1, src, "10.0.2.2"))
            frames.append(arp(mac, 2, src, src))
            frames.append(arp(mac, 1, "0.0.0.0", src))
            for dst in DESTS:
                frames.append(icmp(mac, src, dst))
                frames.append(_udp(mac, src, dst, 5000, 123, b"ntp?"))
                frames.append(_tcp(mac, src, dst, 40000, 80, 1000, 0, dpkt.tcp.TH_SYN,
                                   opts=b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07\x01\x01"))  # fmt: skip
                frames.append(_tcp(mac, src, dst, 40000, 80, 1001, 1, dpkt.tcp.TH_ACK, data=b"GET / HTTP/1.0\r\n\r\n"))
                frames.append(_tcp(mac, src, dst, 40000, 80, 9001, 1, dpkt.tcp.TH_RST))  # out of window
                frames.append(_tcp(mac, src, dst, 40000, 80, 9001, 1, dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK))
            for name in NAMES:
                for qtype in (1, 28, 12, 16):
                    frames.append(_udp(mac, src, "10.0.2.3", 5353, 53, dns_query(name, qtype)))
            frames.append(_tcp(mac, src, "10.0.2.3", 40001, 53, 5, 0, dpkt.tcp.TH_SYN))
            frames.extend(fragments(mac, src, "198.51.100.7", b"y" * 60))
            frames.extend(fragments(mac, src, "10.0.2.3", dns_query("example.com")))
        frames.append(_eth(BCAST, mac, dpkt.ethernet.ETH_TYPE_IP6, b"\x60" + b"\x00" * 39))
        frames.append(_eth(MACS[1], mac, 0x88B5, b"local experimental"))
        frames.append(_udp(mac, "10.0.2.15", "10.0.2.16", 9, 9, b"to a neighbour", dst_mac=MACS[1]))
        frames.append(_udp(mac, "10.0.2.15", "10.0.2.255", 137, 137, b"bcast", dst_mac=BCAST))
    return frames + corpus6()


def _a6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def _slaac(mac: bytes) -> str:
    iid = bytes((mac[0] ^ 2,)) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return socket.inet_ntop(socket.AF_INET6, bytes.fromhex("fec0000000000000") + iid)


def _l4_checksum6(src: bytes, dst: bytes, nh: int, l4: bytes) -> int:
    return checksum(src + dst + struct.pack("!IxxxB", len(l4), nh) + l4)


def _ipv6(mac: bytes, src: str, dst: str, nh: int, payload: bytes, dst_mac: bytes = GW_MAC, hop: int = 64,
          upper: int = -1, csum_at: int = -1) -> bytes:  # fmt: skip
    """An IPv6 frame; the upper-layer checksum (at csum_at of the payload's upper header, which
    starts after the extension headers: the last len(upper payload) bytes) filled in."""
    s6, d6 = _a6(src), _a6(dst)
    body = bytearray(payload)
    if csum_at >= 0:
        proto = upper if upper >= 0 else nh
        start = len(body) - upper_len(body, nh) if upper >= 0 else 0
        body[start + csum_at : start + csum_at + 2] = b"\x00\x00"
        value = _l4_checksum6(s6, d6, proto, bytes(body[start:]))
        body[start + csum_at : start + csum_at + 2] = struct.pack("!H", value)
    header = struct.pack("!IHBB", 0x60000000, len(body), nh, hop) + s6 + d6
    return dst_mac + mac + b"\x86\xdd" + header + bytes(body)


def upper_len(body: bytearray, nh: int) -> int:
    """Length of the upper-layer part of body behind its extension headers."""
    at = 0
    while nh in (0, 43, 60) and at + 8 <= len(body):
        nh, at = body[at], at + (body[at + 1] + 1) * 8
    return len(body) - at


def icmp6(mac: bytes, src: str, dst: str, kind: int, body: bytes, dst_mac: bytes = GW_MAC, hop: int = 64) -> bytes:
    return _ipv6(mac, src, dst, 58, bytes((kind, 0, 0, 0)) + body, dst_mac, hop, csum_at=2)


def udp6(mac: bytes, src: str, dst: str, sport: int, dport: int, data: bytes, dst_mac: bytes = GW_MAC) -> bytes:
    return _ipv6(mac, src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data, dst_mac, csum_at=6)


def tcp6(mac: bytes, src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
         data: bytes = b"") -> bytes:  # fmt: skip
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 65535, 0, 0) + data
    return _ipv6(mac, src, dst, 6, seg, csum_at=16)


def corpus6() -> list[bytes]:
    """Well-formed IPv6 frames of every kind a guest sends: ND, DHCPv6, DNS, echo, UDP, TCP,
    fragments and extension headers."""
    frames: list[bytes] = []
    all_routers, all_nodes = bytes.fromhex("333300000002"), bytes.fromhex("333300000001")
    for mac in MACS:
        me, ll = _slaac(mac), "fe80::" + _slaac(mac).split("::", 1)[1]
        slla = b"\x01\x01" + mac
        frames.append(icmp6(mac, ll, "ff02::2", 133, bytes(4) + slla, all_routers, 255))
        frames.append(icmp6(mac, "::", "ff02::1:ff00:2", 135, bytes(4) + _a6(me), bytes.fromhex("3333ff000002"), 255))
        frames.append(icmp6(mac, me, "ff02::1:ff00:2", 135, bytes(4) + _a6("fec0::2") + slla, BCAST, 255))
        frames.append(icmp6(mac, me, "ff02::1", 136, b"\x20\0\0\0" + _a6(me) + b"\x02\x01" + mac, all_nodes, 255))
        frames.append(icmp6(mac, ll, "ff02::16", 143, b"\0\0\0\1" + bytes(20), bytes.fromhex("333300000016"), 1))
        duid = struct.pack("!HH", 1, 10) + b"\x00\x03\x00\x01" + mac
        for mtype in (11, 1, 3):
            msg = bytes((mtype, 0, 0, 7)) + duid + (struct.pack("!HHIII", 3, 12, 1, 0, 0) if mtype != 11 else b"")
            frames.append(udp6(mac, ll, "ff02::1:2", 546, 547, msg, bytes.fromhex("333300010002")))
        for dst in ("fec0::2", "fec0::3", "2001:db8:1::1", "fe80::2", "fec0::99", "ff02::1", "::1"):
            frames.append(icmp6(mac, me, dst, 128, b"\x00\x07\x00\x01ping"))
            frames.append(udp6(mac, me, dst, 5000, 123, b"ntp?"))
            frames.append(tcp6(mac, me, dst, 40000, 80, 1000, 0, dpkt.tcp.TH_SYN))
            frames.append(tcp6(mac, me, dst, 40000, 80, 1001, 1, dpkt.tcp.TH_ACK, b"GET / HTTP/1.0\r\n\r\n"))
        for name in NAMES[:3]:
            frames.append(udp6(mac, me, "fec0::3", 5353, 53, dns_query(name, 28)))
        frames.append(tcp6(mac, me, "fec0::3", 40001, 53, 5, 0, dpkt.tcp.TH_SYN))
        whole = struct.pack("!HHHH", 5001, 9, 8 + 2000, 0) + b"z" * 2000
        value = _l4_checksum6(_a6(me), _a6("2001:db8:1::1"), 17, whole)
        whole = whole[:6] + struct.pack("!H", value) + whole[8:]
        for offset, chunk in ((0, whole[:1232]), (1232, whole[1232:])):
            more = 1 if offset == 0 else 0
            frag = struct.pack("!BBHI", 17, 0, offset | more, 0x42)
            frames.append(_ipv6(mac, me, "2001:db8:1::1", 44, frag + chunk))
        hbh = b"\x3c\x00\x01\x04" + bytes(4)  # hop-by-hop, PadN, then destination options
        dstopts = b"\x11\x00\x01\x04" + bytes(4)
        udp = struct.pack("!HHHH", 5002, 9, 12, 0) + b"opts"
        frames.append(_ipv6(mac, me, "2001:db8:1::1", 0, hbh + dstopts + udp, upper=17, csum_at=6))
        frames.append(_ipv6(mac, me, "2001:db8:1::1", 43, b"\x11\x02\x00\x01" + bytes(4) + _a6("::1") + udp))
        frames.append(udp6(mac, me, _slaac(MACS[1]), 9, 9, b"to a neighbour", dst_mac=MACS[1]))
    return frames


def fix_checksums(frame: bytearray) -> None:
    """Recompute the IPv4 header and TCP/UDP/ICMP checksums of a mutated frame (when its header
    is long enough to have them), so that mutations get past the checksum checks; for IPv6 the
    upper-layer checksum when no extension header comes first."""
    if len(frame) >= 54 and frame[12:14] == b"\x86\xdd":
        nh = frame[20]
        at6 = {6: 16, 17: 6, 58: 2}.get(nh)
        end6 = min(54 + struct.unpack_from("!H", frame, 18)[0], len(frame))
        if at6 is None or end6 - 54 < at6 + 2:
            return
        frame[54 + at6 : 56 + at6] = b"\x00\x00"
        value = _l4_checksum6(bytes(frame[22:38]), bytes(frame[38:54]), nh, bytes(frame[54:end6]))
        frame[54 + at6 : 56 + at6] = struct.pack("!H", (value or 0xFFFF) if nh == 17 else value)
        return
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return
    ihl = (frame[14] & 0x0F) * 4
    if ihl < 20 or len(frame) < 14 + ihl:
        return
    frame[24:26] = b"\x00\x00"
    frame[24:26] = struct.pack("!H", checksum(bytes(frame[14 : 14 + ihl])))
    total = min(struct.unpack_from("!H", frame, 16)[0], len(frame) - 14)
    start = 14 + ihl
    end = 14 + max(total, ihl)
    proto = frame[23]
    if frame[20] & 0x3F or frame[21]:  # a fragment: its L4 header is not here
        return
    at = {6: 16, 17: 6, 1: 2}.get(proto)
    if at is None or end - start < at + 2:
        return
    frame[start + at : start + at + 2] = b"\x00\x00"
    body = bytes(frame[start:end])
    if proto == 1:
        value = checksum(body)
    else:
        pseudo = bytes(frame[26:34]) + struct.pack("!BBH", 0, proto, len(body))
        value = checksum(pseudo + body)
        if proto == 17 and value == 0:
            value = 0xFFFF
    frame[start + at : start + at + 2] = struct.pack("!H", value)


def mutate(rnd: random.Random, frame: bytes) -> bytes:
    """One cheap random mutation of frame: flipped/set bytes, truncation, extension, a splice."""
    data = bytearray(frame)
    choice = rnd.randrange(10)
    if choice < 4 and data:
        for _ in range(rnd.randint(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
    elif choice == 4 and data:
        # the interesting fields: lengths, flags, ports, header lengths, option bytes
        at = rnd.choice((14, 16, 17, 20, 21, 23, 34, 36, 38, 39, 46, 47, 42, 43, 54, 282))
        if at < len(data):
            data[at] = rnd.choice((0, 1, 0x0F, 0x45, 0x7F, 0x80, 0xFF, rnd.randrange(256)))
    elif choice == 5:
        del data[rnd.randrange(len(data) + 1) :]
    elif choice == 6:
        data += rnd.randbytes(rnd.choice((1, 8, 64, 600)))
    elif choice == 7 and len(data) > 20:
        at = rnd.randrange(len(data))
        data[at:at] = rnd.randbytes(rnd.randint(1, 16))
    elif choice == 8:
        del data[rnd.randrange(len(data) + 1) : rnd.randrange(len(data) + 1) + 8]
    if rnd.random() < 0.8:
        fix_checksums(data)
    return bytes(data)


class Harness:
    """A Stack on three ports, its clock, and the host side: every socket it asks to open is
    answered later by random events (including ones for flows it closed already)."""

    def __init__(self, seed: int = 0, dns_mode: str = MODE_HOST) -> None:
        self.rnd = random.Random(seed)
        self.stack = Stack(NetConfig(max_udp_flows=MAX_UDP_FLOWS, max_tcp_flows=MAX_TCP_FLOWS, udp_idle_timeout=5.0))
        if dns_mode == MODE_FORWARD:
            self.stack.dns.set_mode(MODE_FORWARD)
        for port in PORTS:
            self.stack.attach_port(port)
        self.now = 0.0
        self.tcp: list[int] = []  # flows the core opened (some closed since): the host may still speak
        self.udp: dict[int, tuple[str, int]] = {}  # flow -> last destination
        self.ping: dict[int, tuple[str, bytes]] = {}  # flow -> (addr, request)
        self.dns_query: dict[int, bytes] = {}  # query -> the query sent upstream
        self.dns_resolve: list[int] = []
        self.replies: list[bytes] = []  # guest frames that answer what the core sent (TCP acks)
        self.events = 0
        self.last_connect = -1  # the flow of the latest OP_TCP_CONNECT

    # ---- input -----------------------------------------------------------------------------
    def frame(self, port: int, frame: bytes) -> None:
        self.stack.frame_received(port, frame, self.now)
        self.after()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        if self.now >= self.stack.next_deadline():
            self.stack.timer(self.now)
            self.after()

    def host_event(self) -> None:
        """One random host-side event for a flow the core asked for."""
        rnd = self.rnd
        stack = self.stack
        now = self.now
        self.events += 1
        kind = rnd.randrange(5)
        if kind == 0 and self.tcp:
            flow = rnd.choice(self.tcp)
            what = rnd.randrange(7)
            if what == 0:
                stack.tcp.host_connected(flow, now)
            elif what == 1:
                stack.tcp.host_refused(flow, rnd.choice((111, 113, 110, 24, 0)), now)
            elif what in (2, 3):
                stack.tcp.host_data(flow, rnd.randbytes(rnd.choice((1, 100, 1460, 5000))), now)
            elif what == 4:
                stack.tcp.host_eof(flow, now)
            elif what == 5:
                stack.tcp.host_reset(flow, now)
            else:
                stack.tcp.host_write_paused(flow)
                stack.tcp.host_write_resumed(flow)
        elif kind == 1 and self.udp:
            flow = rnd.choice(list(self.udp))
            addr, port = self.udp[flow]
            what = rnd.randrange(4)
            if what < 2:
                stack.udp.host_datagram(flow, rnd.randbytes(rnd.choice((0, 10, 1400))), addr, port, now)
            elif what == 2:
                stack.udp.host_error(flow, addr, port, 3, rnd.choice((1, 3, 4)), 1400, now)
            else:
                stack.udp.host_failed(flow, now)
        elif kind == 2 and self.ping:
            flow = rnd.choice(list(self.ping))
            addr, request = self.ping[flow]
            if rnd.random() < 0.7:
                reply = bytes((0,)) + request[1:] if request else b""
                if rnd.random() < 0.3:
                    reply = mutate(rnd, reply)
                stack.icmp.host_reply(flow, reply, addr, now)
            else:
                stack.icmp.host_error(flow, addr, 3, 1, 0, request, now)
        elif kind == 3 and self.dns_query:
            query = rnd.choice(list(self.dns_query))
            sent = self.dns_query.pop(query)
            what = rnd.randrange(3)
            if what == 0:
                stack.dns.failed(query, now)
            else:
                answer = answer_to(sent)
                stack.dns.answer(query, answer if what == 1 else mutate(rnd, answer), now)
        elif kind == 4 and self.dns_resolve:
            query = self.dns_resolve.pop(rnd.randrange(len(self.dns_resolve)))
            status = rnd.randrange(-1, 6)
            addresses = [rnd.randbytes(rnd.choice((4, 16, 3))) for _ in range(rnd.randrange(4))]
            stack.dns.resolved(query, status, addresses, now)
        else:
            self.events -= 1
            return
        self.after()

    def tcp_session(self) -> None:
        """A guest connection that gets far: SYN, the host side connects at once, then rounds of
        guest segments answering the core's (ACKs, data, FIN, RST) and host data, EOF or reset."""
        rnd = self.rnd
        which = rnd.randrange(3)
        mac, src, port = MACS[which], GUEST_IPS[which], PORTS[which]
        dst = rnd.choice(("198.51.100.7", "203.0.113.9", "10.0.2.2"))
        opts = rnd.choice((b"", b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07\x01\x01", b"\x02\x04\x00\x10"))
        self.last_connect = -1
        self.frame(port, _tcp(mac, src, dst, rnd.randrange(1024, 65536), 80, rnd.randrange(1 << 32), 0, 0x02,
                              opts=opts))  # fmt: skip
        flow = self.last_connect
        if flow < 0:
            return  # refused (limits, virtual address)
        self.stack.tcp.host_connected(flow, self.now)
        self.after()
        for _ in range(rnd.randint(1, 12)):
            for _ in range(min(len(self.replies), rnd.randint(1, 4))):
                self.frame(port, self.replies.pop(rnd.randrange(max(0, len(self.replies) - 4), len(self.replies))))
            what = rnd.randrange(8)
            if what < 4:
                self.stack.tcp.host_data(flow, rnd.randbytes(rnd.choice((10, 1460, 9000, 70000))), self.now)
            elif what == 4:
                self.stack.tcp.host_eof(flow, self.now)
            elif what == 5 and rnd.random() < 0.3:
                self.stack.tcp.host_reset(flow, self.now)
            elif what == 6:
                self.advance(rnd.choice((0.001, 0.05, 0.3, 1.5)))
            self.after()

    def reply_frame(self) -> bytes | None:
        """A guest segment answering one the core sent (right seq and ack), or None."""
        if not self.replies:
            return None
        return self.replies.pop(self.rnd.randrange(len(self.replies)))

    # ---- output, as the shell drains it --------------------------------------------------------
    def after(self) -> None:
        stack = self.stack
        stack.flush(self.now)
        ops = stack.out.ops
        for op in ops:
            kind = op.kind
            if kind == A.OP_TCP_CONNECT or kind == A.OP_TCP_ACCEPTED:
                self.last_connect = op.flow
                self.tcp.append(op.flow)
                if len(self.tcp) > 64:
                    del self.tcp[0]
            elif kind == A.OP_UDP_OPEN:
                self.udp[op.flow] = ("198.51.100.7", 123)
            elif kind == A.OP_UDP_SEND:
                self.udp[op.flow] = (op.addr, op.port)
            elif kind == A.OP_UDP_CLOSE:
                if self.rnd.random() < 0.9:
                    self.udp.pop(op.flow, None)
            elif kind == A.OP_PING_SEND:
                self.ping[op.flow] = (op.addr, op.data)
            elif kind == A.OP_PING_CLOSE:
                if self.rnd.random() < 0.9:
                    self.ping.pop(op.flow, None)
            elif kind == A.OP_DNS_QUERY:
                self.dns_query[op.flow] = op.data
            elif kind == A.OP_DNS_RESOLVE:
                self.dns_resolve.append(op.flow)
        ops.clear()
        stack.out.events.clear()
        for port, frames in stack.switch.out.items():
            if frames:
                for frame in frames[-4:]:
                    self.learn(port, frame)
                frames.clear()
        for table in (self.udp, self.ping, self.dns_query):
            while len(table) > 256:
                del table[next(iter(table))]
        if len(self.dns_resolve) > 256:
            del self.dns_resolve[:128]

    def learn(self, port: int, frame: bytes) -> None:
        """Keep a guest answer to a TCP segment the core sent toward the guest."""
        if len(frame) < 54 or frame[6:12] != GW_MAC or frame[23] != 6:
            return  # only the core's own segments (other frames are guests' ones, switched)
        if not frame[14 + (frame[14] & 0x0F) * 4 + 13] & 0x02 and self.rnd.random() < 0.5:
            return  # every SYN-ACK, half of the rest
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        t = 14 + ihl
        sport, dport, seq, ack = struct.unpack_from("!HHII", frame, t)
        flags = frame[t + 13]
        length = total - ihl - (frame[t + 12] >> 4) * 4 + (1 if flags & 0x03 else 0)
        src = socket.inet_ntoa(frame[30:34])
        dst = socket.inet_ntoa(frame[26:30])
        mac = frame[0:6]
        rnd = self.rnd
        reply_flags = rnd.choice((0x04, 0x14)) if rnd.random() < 0.03 else rnd.choice((0x10, 0x10, 0x18, 0x11))
        data = rnd.randbytes(rnd.choice((0, 0, 10, 1400))) if reply_flags & 0x08 else b""
        if flags & 0x04:
            return
        self.replies.append(_tcp(mac, src, dst, dport, sport, ack, seq + length, reply_flags, data))
        if flags & 0x02 or rnd.random() < 0.3:  # and the guest's data, then maybe its FIN, after the handshake
            data = rnd.randbytes(rnd.choice((1, 100, 1400)))
            self.replies.append(_tcp(mac, src, dst, dport, sport, ack, seq + length, 0x18, data))
            if rnd.random() < 0.3:
                self.replies.append(_tcp(mac, src, dst, dport, sport, ack + len(data), seq + length, 0x11))
        if len(self.replies) > 64:
            del self.replies[:32]
        _ = port

    # ---- invariants ----------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        s = self.stack
        return {
            "tcp.flows": len(s.tcp.flows),
            "tcp.by_key": len(s.tcp.by_key),
            "tcp.timers": len(s.tcp.timers),
            "udp": len(s.udp.table.by_id),
            "icmp": len(s.icmp.table.by_id),
            "dns.pending": len(s.dns.pending),
            "dns.waiting": len(s.dns.waiting),
            "fragments": len(s.fragments.pending),
            "mac_table": len(s.switch.mac_table),
            "guest_macs": len(s.out.guest_macs),
            "owners": len(s.owners),
            "claims6": len(s.guard.claims6),
            "dhcpv6.leases": len(s.dhcpv6.by_key),
            "ndp.solicited": len(s.ndp.solicited),
            "guard.guests": len(s.guard.guests),
            "dhcp.leases": len(s.dhcp.by_mac),
            "udp_forwards": len(s.udp_forwards.by_flow),
            "counters": len(s.counters.values),
        }

    def check(self) -> None:
        deadline = self.stack.next_deadline()
        assert isinstance(deadline, float), deadline
        sizes = self.sizes()
        limits = {
            "tcp.flows": MAX_TCP_FLOWS,
            "tcp.by_key": MAX_TCP_FLOWS,
            "tcp.timers": MAX_TIMERS,
            "udp": MAX_UDP_FLOWS,
            "icmp": MAX_PING_FLOWS,
            "dns.pending": MAX_DNS_PENDING,
            "dns.waiting": MAX_DNS_PENDING,
            "fragments": MAX_DATAGRAMS,
            "mac_table": MAX_MACS,
            "guest_macs": 4096,
            "owners": 8192 + MAX_V6_CLAIMS,
            "claims6": MAX_V6_CLAIMS,
            "dhcpv6.leases": 4096,
            "ndp.solicited": 256,
            "guard.guests": 4096,
            "dhcp.leases": 4096,
            "udp_forwards": 4096,
            "counters": MAX_COUNTERS,
        }
        for name, size in sizes.items():
            assert size <= limits[name], f"{name} holds {size} > {limits[name]}"

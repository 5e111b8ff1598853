"""Servers and guest-side clients of the IPv6 integration tests (integration/test_ipv6.py).

A standalone script (standard library only), run with this machine's python3 in an NsHost
namespace (the servers) or in a namespace guest (the clients). The address family of every
socket follows its address (``:`` in it: IPv6).

Server: ``python3 ipv6_peers.py serve ADDR [tcp:PORT,...] [udp:PORT,...] [http:PORT,...]``: TCP
echo, UDP echo and HTTP (``GET /`` answers ``hello PEER via LOCAL``) on ADDR; one line per
connection or datagram (``TCP PORT PEER``, ``UDP PORT LENGTH PEER``, ``HTTP PORT PEER``), and
``READY 0`` once all listen. A test reads those lines: what the backend must drop never shows up.

Clients (each prints one JSON object; ``result`` is ``ok``, an errno name or ``timeout``; ``ms``
the time it took):

- ``tcp ADDR PORT TEXT``: connect, send TEXT, shut down writing, read until EOF.
- ``connect ADDR PORT``: only connect (how fast a refusal or an ICMPv6 error comes back).
- ``udp ADDR PORT SIZE``: a connected UDP socket (IPv6: with IPV6_RECVERR, so every ICMPv6 error
  surfaces) sends SIZE bytes, waits 3 s for the echo.
- ``ra IFACE``: send a router solicitation and report the first router advertisement:
  ``router`` (its source), ``mac`` (source link-layer option), ``hop_limit``, ``managed``,
  ``other``, ``lifetime``, ``prefixes`` ([prefix/len, on-link, autonomous, valid, preferred]),
  ``mtu``, ``rdnss`` ([addresses], lifetime), ``dnssl`` ([domains], lifetime).
- ``dhcpv6-info IFACE``: a stateless DHCPv6 information-request: ``dns`` and ``domains``.
- ``dhcpv6-address IFACE``: solicit, advertise, request, reply for an IA_NA: ``addresses``.
- ``frames IFACE DST_MAC KIND [ARGS...]``: send hand-made Ethernet frames on an AF_PACKET socket
  (see :func:`frames`); prints ``{"sent": N}``.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import threading
import time

_print_lock = threading.Lock()

ETH_P_IPV6 = 0x86DD
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)  # <linux/in6.h>
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"
ALL_DHCP = "ff02::1:2"


def say(text: str) -> None:
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, repr(exc)) if exc.errno else type(exc).__name__


# ---- servers -----------------------------------------------------------------------------------


def echo_stream(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def http_answer(conn: socket.socket, local: str, peer: str) -> None:
    with conn:
        try:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            body = f"hello {peer} via {local}\n".encode()
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body)
            )
        except OSError:
            pass


def stream_listener(addr: str, port: int) -> socket.socket:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    return s


def serve_tcp(addr: str, port: int, ready: threading.Semaphore, http: bool) -> None:
    s = stream_listener(addr, port)
    ready.release()
    while True:
        conn, peer = s.accept()
        local = conn.getsockname()[0]
        say(f"{'HTTP' if http else 'TCP'} {port} {peer[0]}")
        if http:
            threading.Thread(target=http_answer, args=(conn, local, peer[0]), daemon=True).start()
        else:
            threading.Thread(target=echo_stream, args=(conn,), daemon=True).start()


def serve_udp(addr: str, port: int, ready: threading.Semaphore) -> None:
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    ready.release()
    while True:
        data, peer = s.recvfrom(65535)
        say(f"UDP {port} {len(data)} {peer[0]}")
        s.sendto(data, peer)


def serve(addr: str, specs: list[str]) -> None:
    ready = threading.Semaphore(0)
    jobs: list[tuple[object, tuple[object, ...]]] = []
    for spec in specs:
        kind, _, ports = spec.partition(":")
        for port in ports.split(","):
            if kind == "udp":
                jobs.append((serve_udp, (addr, int(port), ready)))
            else:
                jobs.append((serve_tcp, (addr, int(port), ready, kind == "http")))
    for fn, args in jobs:
        threading.Thread(target=fn, args=args, daemon=True).start()  # type: ignore[arg-type]
    for _ in jobs:
        ready.acquire()
    say("READY 0")
    threading.Event().wait()


# ---- plain clients -----------------------------------------------------------------------------


def timed(start: float, **values: object) -> dict[str, object]:
    return {**values, "ms": round((time.monotonic() - start) * 1000, 1)}


def client_tcp(addr: str, port: int, text: str) -> dict[str, object]:
    start = time.monotonic()
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((addr, port))
        local = s.getsockname()[0]
        s.sendall(text.encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return timed(start, result="ok", data=data.decode(errors="replace"), local=local)
    except TimeoutError:
        return timed(start, result="timeout")
    except OSError as exc:
        return timed(start, result=error_name(exc))
    finally:
        s.close()


def client_connect(addr: str, port: int) -> dict[str, object]:
    start = time.monotonic()
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((addr, port))
        return timed(start, result="connected")
    except TimeoutError:
        return timed(start, result="timeout")
    except OSError as exc:
        return timed(start, result=error_name(exc))
    finally:
        s.close()


def client_udp(addr: str, port: int, size: int) -> dict[str, object]:
    start = time.monotonic()
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    if s.family == socket.AF_INET6:
        # Linux reports only "hard" ICMPv6 errors (port unreachable, administratively prohibited)
        # to a UDP socket; no route / address unreachable need IPV6_RECVERR
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    s.settimeout(3)
    try:
        s.connect((addr, port))
        s.send(b"u" * size)
        data, peer = s.recvfrom(65535)
        return timed(start, result="ok", bytes=len(data), peer=peer[0])
    except TimeoutError:
        return timed(start, result="timeout")
    except OSError as exc:
        return timed(start, result=error_name(exc))
    finally:
        s.close()


# ---- neighbour discovery and DHCPv6 ------------------------------------------------------------


def dns_names(data: bytes) -> list[str]:
    """Domain names in DNS label encoding, one after another, zero padding at the end."""
    names: list[str] = []
    i = 0
    while i < len(data):
        labels = []
        while i < len(data) and data[i]:
            n = data[i]
            labels.append(data[i + 1 : i + 1 + n].decode(errors="replace"))
            i += 1 + n
        i += 1
        if labels:
            names.append(".".join(labels))
    return names


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def parse_ra(data: bytes, src: str) -> dict[str, object]:
    hop_limit, flags, lifetime = data[4], data[5], struct.unpack("!H", data[6:8])[0]
    ra: dict[str, object] = {
        "router": src.split("%")[0],
        "hop_limit": hop_limit,
        "managed": bool(flags & 0x80),
        "other": bool(flags & 0x40),
        "lifetime": lifetime,
        "prefixes": [],
        "mtu": None,
        "rdnss": None,
        "dnssl": None,
        "mac": None,
    }
    prefixes: list[list[object]] = []
    i = 16
    while i + 2 <= len(data):
        kind, length = data[i], data[i + 1] * 8
        if length == 0:
            break
        body = data[i + 2 : i + length]
        if kind == 1:
            ra["mac"] = mac_text(body[:6])
        elif kind == 3:
            plen, pflags = body[0], body[1]
            valid, preferred = struct.unpack("!II", body[2:10])
            prefix = socket.inet_ntop(socket.AF_INET6, body[14:30])
            prefixes.append([f"{prefix}/{plen}", bool(pflags & 0x80), bool(pflags & 0x40), valid, preferred])
        elif kind == 5:
            ra["mtu"] = struct.unpack("!I", body[2:6])[0]
        elif kind == 25:
            life = struct.unpack("!I", body[2:6])[0]
            addrs = [socket.inet_ntop(socket.AF_INET6, body[j : j + 16]) for j in range(6, len(body) - 15, 16)]
            ra["rdnss"] = [addrs, life]
        elif kind == 31:
            life = struct.unpack("!I", body[2:6])[0]
            ra["dnssl"] = [dns_names(body[6:]), life]
        i += length
    ra["prefixes"] = prefixes
    return ra


def send_when_ready(s: socket.socket, data: bytes, dest: tuple[str, int, int, int], timeout: float = 5.0) -> None:
    """sendto, retried while the interface's link-local address is still tentative (EADDRNOTAVAIL
    during duplicate address detection)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.sendto(data, dest)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def client_ra(iface: str, timeout: float = 6.0) -> dict[str, object]:
    index = socket.if_nametoindex(iface)
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    start = time.monotonic()
    rs = struct.pack("!BBHI", 133, 0, 0, 0)  # the kernel fills in the checksum of ICMPv6 raw sockets
    send_when_ready(s, rs, (ALL_ROUTERS, 0, 0, index))
    deadline = start + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        data, peer = s.recvfrom(65535)
        if data and data[0] == 134:
            return timed(start, result="ok", **parse_ra(data, peer[0]))
    return timed(start, result="timeout")


def dhcpv6_options(data: bytes) -> list[tuple[int, bytes]]:
    options = []
    i = 0
    while i + 4 <= len(data):
        code, length = struct.unpack("!HH", data[i : i + 4])
        options.append((code, data[i + 4 : i + 4 + length]))
        i += 4 + length
    return options


def dhcpv6_option(code: int, body: bytes) -> bytes:
    return struct.pack("!HH", code, len(body)) + body


class Dhcpv6Client:
    def __init__(self, iface: str) -> None:
        self.index = socket.if_nametoindex(iface)
        with open(f"/sys/class/net/{iface}/address") as f:
            mac = bytes.fromhex(f.read().strip().replace(":", ""))
        self.duid = struct.pack("!HH", 3, 1) + mac  # DUID-LL
        self.s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.s.bind(("::", 546))
        self.s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.index)

    def exchange(
        self, msg_type: int, options: bytes, want: int, timeout: float = 4.0
    ) -> tuple[int, list[tuple[int, bytes]]]:
        xid = os.urandom(3)
        base = dhcpv6_option(1, self.duid) + dhcpv6_option(8, b"\0\0") + dhcpv6_option(6, struct.pack("!HH", 23, 24))
        message = bytes([msg_type]) + xid + base + options
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while (left := deadline - time.monotonic()) > 0:
            if time.monotonic() >= next_send:
                send_when_ready(self.s, message, (ALL_DHCP, 547, 0, self.index))
                next_send = time.monotonic() + 1.0
            if not select.select([self.s], [], [], min(left, 1.0))[0]:
                continue
            data, _peer = self.s.recvfrom(65535)
            if len(data) >= 4 and data[1:4] == xid and data[0] == want:
                return data[0], dhcpv6_options(data[4:])
        raise TimeoutError

    @staticmethod
    def summary(options: list[tuple[int, bytes]]) -> dict[str, object]:
        addresses: list[list[object]] = []
        out: dict[str, object] = {"dns": [], "domains": [], "addresses": addresses, "status": None}
        for code, body in options:
            if code == 23:
                out["dns"] = [socket.inet_ntop(socket.AF_INET6, body[i : i + 16]) for i in range(0, len(body), 16)]
            elif code == 24:
                out["domains"] = dns_names(body)
            elif code == 13:
                out["status"] = struct.unpack("!H", body[:2])[0]
            elif code == 3:  # IA_NA: IAID, T1, T2, then its options
                for sub, sub_body in dhcpv6_options(body[12:]):
                    if sub == 5:
                        addr = socket.inet_ntop(socket.AF_INET6, sub_body[:16])
                        preferred, valid = struct.unpack("!II", sub_body[16:24])
                        addresses.append([addr, preferred, valid])
                    elif sub == 13:
                        out["status"] = struct.unpack("!H", sub_body[:2])[0]
        return out


def client_dhcpv6_info(iface: str) -> dict[str, object]:
    start = time.monotonic()
    client = Dhcpv6Client(iface)
    try:
        _kind, options = client.exchange(11, b"", 7)  # INFORMATION-REQUEST -> REPLY
    except TimeoutError:
        return timed(start, result="timeout")
    return timed(start, result="ok", **client.summary(options))


def client_dhcpv6_address(iface: str) -> dict[str, object]:
    start = time.monotonic()
    client = Dhcpv6Client(iface)
    ia_na = dhcpv6_option(3, struct.pack("!III", 1, 0, 0))
    try:
        _kind, advertised = client.exchange(1, ia_na, 2)  # SOLICIT -> ADVERTISE
        server = next(body for code, body in advertised if code == 2)
        ia = next(dhcpv6_option(3, body) for code, body in advertised if code == 3)
        _kind, reply = client.exchange(3, dhcpv6_option(2, server) + ia, 7)  # REQUEST -> REPLY
    except (TimeoutError, StopIteration) as exc:
        return timed(start, result="timeout" if isinstance(exc, TimeoutError) else "no IA_NA")
    return timed(start, result="ok", advertised=client.summary(advertised), **client.summary(reply))


# ---- hand-made frames --------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def a6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def upper_sum(src: bytes, dst: bytes, proto: int, body: bytes, offset: int) -> bytes:
    """``body`` (an upper-layer header and data) with its checksum at ``offset`` filled in."""
    pseudo = src + dst + struct.pack("!IxxxB", len(body), proto)
    value = checksum(pseudo + body) or 0xFFFF
    return body[:offset] + struct.pack("!H", value) + body[offset + 2 :]


def udp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    body = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return upper_sum(src, dst, 17, body, 6)


def ipv6(src: bytes, dst: bytes, next_header: int, payload: bytes, *, plen: int | None = None, hops: int = 64) -> bytes:
    length = len(payload) if plen is None else plen
    return struct.pack("!IHBB", 0x60000000, length, next_header, hops) + src + dst + payload


def dest_options(next_header: int) -> bytes:
    """An 8-byte destination options header: one PadN option of 4 bytes."""
    return bytes([next_header, 0, 1, 4, 0, 0, 0, 0])


def fragment(next_header: int, offset: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BxHI", next_header, (offset << 3) | int(more), ident)


def link_local(mac: bytes) -> bytes:
    eui = bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return a6("fe80::")[:8] + eui


def frames(iface: str, dst_mac_text: str, kind: str, args: list[str]) -> list[bytes]:
    """The IPv6 packets of ``kind`` (their Ethernet header is added by the caller).

    - ``spoof-udp SRC DST PORT TEXT``: a well-formed UDP datagram from SRC (an address that is
      not this guest's).
    - ``spoof-na TARGET [DST]``: an unsolicited neighbour advertisement (override flag) claiming
      TARGET is at this interface's MAC, to DST (default ff02::1).
    - ``bad-plen SRC DST PORT``: payload length 1000, 28 bytes follow.
    - ``ext-chain SRC DST PORT N``: a UDP datagram behind N destination options headers.
    - ``ext-endless SRC DST PORT N``: N destination options headers, each naming another as the
      next, and the packet ends (no upper-layer header).
    - ``jumbo SRC DST PORT``: payload length 0 with a hop-by-hop jumbo payload option (70000).
    - ``frag-no-header SRC DST PORT``: a 1232-byte first fragment holding only a destination
      options header, the UDP header in the second (RFC 7112).
    - ``frag-overlap SRC DST PORT``: three full-size fragments of a 3000-byte UDP datagram, the
      second overlapping the first by 8 bytes with other contents (RFC 5722).
    - ``frag-good SRC DST PORT``: the same datagram in three proper fragments (a control).
    - ``tiny-frag SRC DST PORT``: fragments of three malformed datagrams: a first fragment that
      ends inside its extension headers (no UDP header in it, RFC 7112), a non-last fragment
      whose length is not a multiple of 8, and two overlapping fragments (RFC 5722).
    """
    with open(f"/sys/class/net/{iface}/address") as f:
        own_mac = bytes.fromhex(f.read().strip().replace(":", ""))
    if kind == "spoof-na":
        target = a6(args[0])
        dst = a6(args[1] if len(args) > 1 else ALL_NODES)
        src = link_local(own_mac)
        body = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + target + bytes([2, 1]) + own_mac
        return [ipv6(src, dst, 58, upper_sum(src, dst, 58, body, 2), hops=255)]
    src, dst = a6(args[0]), a6(args[1])
    if kind == "ext-endless":
        n = int(args[3])
        return [ipv6(src, dst, 60, b"".join(dest_options(60) for _ in range(n)))]
    port = int(args[2])
    if kind == "spoof-udp":
        return [ipv6(src, dst, 17, udp6(src, dst, 40000, port, args[3].encode()))]
    if kind == "bad-plen":
        return [ipv6(src, dst, 17, udp6(src, dst, 40001, port, b"bad payload length!!"), plen=1000)]
    if kind == "ext-chain":
        n = int(args[3])
        chain = b"".join(dest_options(60) for _ in range(n - 1)) + dest_options(17)
        return [ipv6(src, dst, 60, chain + udp6(src, dst, 40002, port, b"behind a long chain"))]
    if kind == "jumbo":
        hop_by_hop = bytes([17, 0, 0xC2, 4]) + struct.pack("!I", 70000)
        return [ipv6(src, dst, 0, hop_by_hop + udp6(src, dst, 40003, port, b"jumbogram"), plen=0)]
    if kind == "frag-no-header":
        # a first fragment of 1232 bytes holding only a destination options header: the UDP header
        # comes in the next fragment (RFC 7112: such a datagram must be dropped)
        options = b"".join(bytes([1, 255]) + bytes(255) for _ in range(4)) + bytes([1, 200]) + bytes(200)
        big = bytes([17, 153]) + options  # (153 + 1) * 8 = 1232 bytes
        datagram = udp6(src, dst, 40005, port, b"n" * 64)
        return [
            ipv6(src, dst, 44, fragment(60, 0, True, 0x1004) + big),
            ipv6(src, dst, 44, fragment(60, len(big) // 8, False, 0x1004) + datagram),
        ]
    if kind == "frag-overlap":
        # three full-size fragments; the second repeats the first's last 8 bytes with other
        # contents (RFC 5722: the whole datagram must be dropped)
        datagram = udp6(src, dst, 40006, port, b"o" * 3000)
        second = b"X" * 8 + datagram[1232:2456]
        return [
            ipv6(src, dst, 44, fragment(17, 0, True, 0x1005) + datagram[:1232]),
            ipv6(src, dst, 44, fragment(17, 1224 // 8, True, 0x1005) + second),
            ipv6(src, dst, 44, fragment(17, 2456 // 8, False, 0x1005) + datagram[2456:]),
        ]
    if kind == "frag-good":
        # the control: the same datagram in three proper fragments
        datagram = udp6(src, dst, 40007, port, b"g" * 3000)
        return [
            ipv6(src, dst, 44, fragment(17, 0, True, 0x1006) + datagram[:1232]),
            ipv6(src, dst, 44, fragment(17, 1232 // 8, True, 0x1006) + datagram[1232:2464]),
            ipv6(src, dst, 44, fragment(17, 2464 // 8, False, 0x1006) + datagram[2464:]),
        ]
    if kind == "tiny-frag":
        datagram = udp6(src, dst, 40004, port, b"t" * 64)
        packets = []
        # 1: the first fragment holds only a destination options header; the UDP header follows later
        first = fragment(60, 0, True, 0x1001) + dest_options(17)
        second = fragment(60, 1, False, 0x1001) + datagram
        packets += [ipv6(src, dst, 44, first), ipv6(src, dst, 44, second)]
        # 2: a non-last fragment of 13 bytes (not a multiple of 8)
        packets.append(ipv6(src, dst, 44, fragment(17, 0, True, 0x1002) + datagram[:13]))
        packets.append(ipv6(src, dst, 44, fragment(17, 2, False, 0x1002) + datagram[16:]))
        # 3: overlapping fragments: bytes 16..40 sent twice with different contents
        packets.append(ipv6(src, dst, 44, fragment(17, 0, True, 0x1003) + datagram[:40]))
        forged = datagram[16:24] + b"X" * 16 + datagram[40:]
        packets.append(ipv6(src, dst, 44, fragment(17, 2, False, 0x1003) + forged))
        return packets
    raise SystemExit(f"unknown frame kind {kind!r}")


def send_frames(iface: str, dst_mac_text: str, kind: str, args: list[str], repeat: int = 1) -> dict[str, object]:
    dst_mac = bytes.fromhex(dst_mac_text.replace(":", ""))
    with open(f"/sys/class/net/{iface}/address") as f:
        own_mac = bytes.fromhex(f.read().strip().replace(":", ""))
    if kind == "spoof-na":
        target = ipaddress.IPv6Address(args[1] if len(args) > 1 else ALL_NODES)
        if target.is_multicast:  # 33:33 + the low 32 bits of the group
            dst_mac = b"\x33\x33" + target.packed[12:]
    packets = frames(iface, dst_mac_text, kind, args)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    sent = 0
    for _ in range(repeat):
        for packet in packets:
            s.send(dst_mac + own_mac + struct.pack("!H", ETH_P_IPV6) + packet)
            sent += 1
    s.close()
    return {"result": "ok", "sent": sent}


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "serve":
        serve(argv[1], argv[2:])
        return 0
    if mode == "tcp":
        out = client_tcp(argv[1], int(argv[2]), argv[3] if len(argv) > 3 else "hello\n")
    elif mode == "connect":
        out = client_connect(argv[1], int(argv[2]))
    elif mode == "udp":
        out = client_udp(argv[1], int(argv[2]), int(argv[3]))
    elif mode == "ra":
        out = client_ra(argv[1])
    elif mode == "dhcpv6-info":
        out = client_dhcpv6_info(argv[1])
    elif mode == "dhcpv6-address":
        out = client_dhcpv6_address(argv[1])
    elif mode == "frames":
        repeat = int(os.environ.get("FRAMES_REPEAT", "1"))
        out = send_frames(argv[1], argv[2], argv[3], argv[4:], repeat)
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

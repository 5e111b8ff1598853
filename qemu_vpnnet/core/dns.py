"""The DNS server at the virtual DNS address, UDP port 53 (TCP: io/dns_tcp.py, same answers).

Queries are parsed with dpkt.dns. Each query is decided here, in this order (`local_answer`,
then `route`):

1. Malformed: FORMERR when the header can be read; an unsupported opcode: NOTIMP.
2. Built-in names (host.internal, gateway.internal and the --host-name names: the gateway
   address; dns.internal: the DNS address) and names of the zones (core/dns_zone.py) are
   answered here: A and AAAA from their addresses, ANY both, any other type NOERROR with no
   answers. PTR queries for the gateway and DNS addresses (in-addr.arpa) answer
   gateway.internal and dns.internal.
3. A name at or below a split upstream's domain (`split`, longest domain wins) goes to that
   server only: OP_DNS_QUERY with addr and port set, every type, in every mode.
4. In MODE_HOST, A and AAAA queries of class IN for an ordinary host name go to the host's
   resolver library: OP_DNS_RESOLVE with the name as addr and the type as port; the shell
   calls resolved() with a RESOLVED_* status and the addresses, and the answer is built here
   (TTL HOST_TTL, addresses deduplicated in their order).
5. Everything else is forwarded: OP_DNS_QUERY with addr "" (the shell's default upstreams) and
   the guest's query as data; the shell calls answer() or failed() with the query number.

Answers go back with the guest's own id, from the address the guest sent its query to (the
DNS address, or any address a policy route sends here). One longer than 512 bytes (or the UDP
payload size of the guest's EDNS0 OPT record) is cut to header and question with TC set, so
the guest asks again over TCP. A query that gets no answer within QUERY_TIMEOUT seconds, or
that the shell reports failed, gets SERVFAIL.

At most MAX_PENDING queries wait for the shell at once; past that, new ones get SERVFAIL.
A guest's retransmission of a query still waiting (same address, port and id) is dropped.
"""

import struct
from typing import Final, final

import dpkt

from qemu_vpnnet.core.actions import OP_DNS_QUERY, OP_DNS_RESOLVE, HostOp
from qemu_vpnnet.core.dns_names import AnswerNames
from qemu_vpnnet.core.dns_zone import DnsZones
from qemu_vpnnet.core.output import Output
from qemu_vpnnet.core.udp import send_udp_to_guest

DNS_PORT: Final = 53
HEADER_LEN: Final = 12
QUERY_TIMEOUT: Final = 5.0
MAX_PENDING: Final = 1024
MAX_QUERY: Final = 4096  # a longer query is not forwarded (FORMERR)
MAX_UDP_ANSWER: Final = 65507
MAX_TCP_ANSWER: Final = 65535
BUILTIN_TTL: Final = 60  # built-in names and zones
HOST_TTL: Final = 30  # answers from the host's resolver (getaddrinfo gives no TTL)
MAX_ANSWERS: Final = 64  # address records in one answer

MODE_HOST: Final = "host"
MODE_FORWARD: Final = "forward"
MODES: Final = (MODE_HOST, MODE_FORWARD)

# what the shell reports to resolved()
RESOLVED_OK: Final = 0  # the addresses found (an empty list is NODATA)
RESOLVED_NODATA: Final = 1  # the name exists, without an address of the family asked for
RESOLVED_NXDOMAIN: Final = 2  # no such name
RESOLVED_SERVFAIL: Final = 3  # the resolver failed (EAI_AGAIN, EAI_FAIL, timeout, overload)

# how a query that is not answered locally leaves (DnsRoute.kind)
ROUTE_FORWARD: Final = 0  # to the default upstream servers
ROUTE_SPLIT: Final = 1  # to one split upstream server (addr, port)
ROUTE_HOST: Final = 2  # to the host's resolver library (name, qtype)

FLAG_QR: Final = 0x8000
FLAG_OPCODE: Final = 0x7800
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4

TYPE_A: Final = 1
TYPE_PTR: Final = 12
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
TYPE_ANY: Final = 255
CLASS_IN: Final = 1

_HEADER: Final = struct.Struct("!HHHHHH")
_RECORD: Final = struct.Struct("!HHIH")
_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def question_end(data: bytes, offset: int) -> int:
    """Where the question at offset ends (after QTYPE and QCLASS); -1 when malformed.

    The name in a query's question is never compressed: a pointer there is malformed too.
    """
    n = len(data)
    while offset < n:
        length = data[offset]
        if length == 0:
            end = offset + 5
            return end if end <= n else -1
        if length & 0xC0:
            return -1
        offset += 1 + length
    return -1


def answers_question(answer: bytes, question: bytes) -> bool:
    """Whether an upstream answer (at least a header) repeats question, the query's one
    (name, type, class; the name compared case-insensitively); an error answer may carry none."""
    qdcount = (answer[4] << 8) | answer[5]
    if qdcount == 0:
        return answer[3] & 0x0F != 0
    end = HEADER_LEN + len(question)
    return qdcount == 1 and len(answer) >= end and answer[HEADER_LEN:end].lower() == question.lower()


def question_name(data: bytes, offset: int) -> str:
    """The (well-formed) question name at offset, lower case, dotted, no trailing dot."""
    labels: list[str] = []
    while data[offset]:
        length = data[offset]
        labels.append(data[offset + 1 : offset + 1 + length].decode("latin-1").lower())
        offset += 1 + length
    return ".".join(labels)


def encode_name(name: str) -> bytes:
    """A dotted name in DNS wire form (labels already valid)."""
    out = b""
    for label in name.split("."):
        if label:
            raw = label.encode("ascii")
            out += bytes((len(raw),)) + raw
    return out + b"\x00"


def reverse_name(addr: bytes) -> str:
    """The in-addr.arpa name of an IPv4 address, the ip6.arpa name (RFC 3596) of an IPv6 one."""
    if len(addr) == 16:
        return ".".join(reversed(addr.hex())) + ".ip6.arpa"
    return f"{addr[3]}.{addr[2]}.{addr[1]}.{addr[0]}.in-addr.arpa"


def is_host_lookup_name(name: str) -> bool:
    """Whether name is one to give getaddrinfo: a multi-character host name, not an address."""
    if not name or len(name) > 253 or not all(c in _HOST_CHARS for c in name):
        return False
    labels = name.split(".")
    if any(not 0 < len(label) <= 63 for label in labels):
        return False
    return not (len(labels) == 4 and all(label.isdigit() for label in labels))  # "1.2.3.4"


def servfail_for(query: bytes) -> bytes:
    """SERVFAIL answering a well-formed query (header and question echoed)."""
    qid, flags = _HEADER.unpack_from(query, 0)[:2]
    qend = question_end(query, HEADER_LEN)
    if qend < 0:
        return reply_header(qid, flags, RCODE_SERVFAIL, 0, 0)
    return reply_header(qid, flags, RCODE_SERVFAIL, 1, 0) + query[HEADER_LEN:qend]


def reply_header(qid: int, query_flags: int, rcode: int, qdcount: int, ancount: int) -> bytes:
    """A response header answering a query with query_flags (opcode and RD are kept)."""
    flags = FLAG_QR | (query_flags & (FLAG_OPCODE | FLAG_RD)) | FLAG_RA | rcode
    return _HEADER.pack(qid, flags, qdcount, ancount, 0, 0)


def address_message(
    qid: int, flags: int, question: bytes, qtype: int, qclass: int, addresses: list[bytes], ttl: int
) -> bytes:
    """NOERROR with the addresses of the family qtype asks for (ANY: both), deduplicated, in
    order; no answers (NODATA) for another type or class, or when none is of that family."""
    records: list[bytes] = []
    if qclass == CLASS_IN and (qtype == TYPE_A or qtype == TYPE_AAAA or qtype == TYPE_ANY):
        seen: set[bytes] = set()
        for addr in addresses:
            if addr in seen or len(records) >= MAX_ANSWERS:
                continue
            if len(addr) == 4 and qtype != TYPE_AAAA:
                rtype = TYPE_A
            elif len(addr) == 16 and qtype != TYPE_A:
                rtype = TYPE_AAAA
            else:
                continue
            seen.add(addr)
            records.append(b"\xc0\x0c" + _RECORD.pack(rtype, CLASS_IN, ttl, len(addr)) + addr)
    return reply_header(qid, flags, RCODE_NOERROR, 1, len(records)) + question + b"".join(records)


def resolved_message(qid: int, flags: int, question: bytes, qtype: int, status: int, addresses: list[bytes]) -> bytes:
    """The answer to an A or AAAA query from what the host's resolver said (RESOLVED_*)."""
    if status == RESOLVED_NXDOMAIN:
        return reply_header(qid, flags, RCODE_NXDOMAIN, 1, 0) + question
    if status == RESOLVED_OK:
        return address_message(qid, flags, question, qtype, CLASS_IN, addresses, HOST_TTL)
    if status == RESOLVED_NODATA:
        return reply_header(qid, flags, RCODE_NOERROR, 1, 0) + question
    return reply_header(qid, flags, RCODE_SERVFAIL, 1, 0) + question


def truncated(message: bytes, question: bytes) -> bytes:
    """message cut to its header and question, with TC set."""
    qid, flags = _HEADER.unpack_from(message, 0)[:2]
    return _HEADER.pack(qid, flags | FLAG_TC, 1, 0, 0, 0) + question


@final
class DnsRoute:
    """Where a query that is not answered locally goes (ROUTE_*)."""

    def __init__(self, kind: int, addr: str, port: int, name: str, qtype: int) -> None:
        self.kind = kind
        self.addr = addr  # ROUTE_SPLIT: the server
        self.port = port
        self.name = name  # ROUTE_HOST: the name to look up, and its type
        self.qtype = qtype


@final
class PendingQuery:
    """A query waiting for the shell (an upstream's answer or the host resolver's)."""

    def __init__(
        self,
        key: bytes,
        guest_mac: bytes,
        guest_ip: bytes,
        guest_port: int,
        server_ip: bytes,
        guest_id: int,
        flags: int,
        question: bytes,
        qtype: int,
        limit: int,
        deadline: float,
    ) -> None:
        self.key = key
        self.guest_mac = guest_mac
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.server_ip = server_ip  # where the guest sent it: the answer's source
        self.guest_id = guest_id
        self.flags = flags
        self.question = question
        self.qtype = qtype
        self.limit = limit
        self.deadline = deadline


@final
class DnsServer:
    def __init__(self, out: Output) -> None:
        self.out = out
        cfg = out.config
        self.mode = MODE_HOST
        self.host_names: set[str] = {name.lower().rstrip(".") for name in cfg.host_names}
        gateway = [cfg.host_ip, cfg.host_ip6] if cfg.ipv6 else [cfg.host_ip]  # A and AAAA
        self.builtin: dict[str, list[bytes]] = {name: gateway for name in self.host_names}
        self.builtin["gateway.internal"] = gateway
        self.builtin["dns.internal"] = [cfg.dns_ip, cfg.dns_ip6] if cfg.ipv6 else [cfg.dns_ip]
        self.ptr: dict[str, str] = {reverse_name(cfg.host_ip): "gateway.internal"}
        if cfg.dns_ip != cfg.host_ip:
            self.ptr[reverse_name(cfg.dns_ip)] = "dns.internal"
        if cfg.ipv6:
            self.ptr[reverse_name(cfg.host_ip6)] = "gateway.internal"
            self.ptr[reverse_name(cfg.dns_ip6)] = "dns.internal"
        self.zones = DnsZones()
        self.names = AnswerNames()  # address -> name resolved, for the proxy's no_proxy (core/dns_names.py)
        self.split: dict[str, tuple[str, int]] = {}  # domain -> (server address, port)
        self.pending: dict[int, PendingQuery] = {}  # query number -> query, oldest first
        self.waiting: dict[bytes, int] = {}  # guest address + port + id -> query number
        self.next_query = 1

    # ---- configuration -----------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """MODE_HOST or MODE_FORWARD; ValueError for anything else."""
        if mode not in MODES:
            raise ValueError(f"DNS mode {mode!r}: expected host or forward")
        self.mode = mode

    def set_split(self, split: dict[str, tuple[str, int]]) -> None:
        """The split upstreams: domain (lower case, no trailing dot) -> (server, port)."""
        self.split = {domain.lower().rstrip("."): server for domain, server in split.items()}

    def split_upstream(self, name: str) -> tuple[str, int] | None:
        """The server of the longest split domain that is name or above it; None when none is."""
        split = self.split
        if not split:
            return None
        while True:
            server = split.get(name)
            if server is not None:
                return server
            dot = name.find(".")
            if dot < 0:
                return None
            name = name[dot + 1 :]

    # ---- deciding ----------------------------------------------------------------------
    def local_answer(self, payload: bytes) -> tuple[bytes | None, str]:
        """What the server answers itself: (reply, counter) for a malformed query (FORMERR), an
        unsupported opcode (NOTIMP), a built-in or zone name or a virtual address's PTR; (None,
        "") when the query must leave (see route()); (None, reason) when it must be dropped
        (not a query at all).

        Shared by the UDP server and DNS over TCP (io/dns_tcp.py).
        """
        if len(payload) < HEADER_LEN:
            return None, "dns-short"
        qid, flags, _qd, _an, _ns, _ar = _HEADER.unpack_from(payload, 0)
        if flags & FLAG_QR:
            return None, "dns-not-query"
        if (flags & FLAG_OPCODE) != 0:
            return reply_header(qid, flags, RCODE_NOTIMP, 0, 0), "dns-notimp"
        try:
            questions = list(dpkt.dns.DNS(payload).qd)
        except Exception:
            questions = []
        qend = question_end(payload, HEADER_LEN) if len(questions) == 1 else -1
        if qend < 0 or len(payload) > MAX_QUERY:
            return reply_header(qid, flags, RCODE_FORMERR, 0, 0), "dns-formerr"
        name = question_name(payload, HEADER_LEN)
        question = payload[HEADER_LEN:qend]
        qtype = (payload[qend - 4] << 8) | payload[qend - 3]
        qclass = (payload[qend - 2] << 8) | payload[qend - 1]
        counter = "dns-builtin"
        addrs = self.builtin.get(name)
        if addrs is None:
            counter = "dns-zone"
            addrs = self.zones.lookup(name)
        if addrs is not None:
            self.names.remember(name, addrs)
            return address_message(qid, flags, question, qtype, qclass, addrs, BUILTIN_TTL), counter
        if qtype == TYPE_PTR and qclass == CLASS_IN:
            target = self.ptr.get(name)
            if target is not None:
                rdata = encode_name(target)
                record = b"\xc0\x0c" + _RECORD.pack(TYPE_PTR, CLASS_IN, BUILTIN_TTL, len(rdata)) + rdata
                return reply_header(qid, flags, RCODE_NOERROR, 1, 1) + question + record, "dns-builtin"
        return None, ""

    def route(self, payload: bytes) -> DnsRoute:
        """Where a well-formed query that local_answer() did not answer goes."""
        qend = question_end(payload, HEADER_LEN)
        name = question_name(payload, HEADER_LEN)
        qtype = (payload[qend - 4] << 8) | payload[qend - 3]
        qclass = (payload[qend - 2] << 8) | payload[qend - 1]
        server = self.split_upstream(name)
        if server is not None:
            return DnsRoute(ROUTE_SPLIT, server[0], server[1], name, qtype)
        if (
            self.mode == MODE_HOST
            and qclass == CLASS_IN
            and (qtype == TYPE_A or qtype == TYPE_AAAA)
            and is_host_lookup_name(name)
        ):
            return DnsRoute(ROUTE_HOST, "", 0, name, qtype)
        return DnsRoute(ROUTE_FORWARD, "", 0, name, qtype)

    def host_answer(self, query: bytes, status: int, addresses: list[bytes]) -> bytes:
        """The answer to query (routed ROUTE_HOST) from the host resolver's result (for TCP)."""
        qid, flags = _HEADER.unpack_from(query, 0)[:2]
        qend = question_end(query, HEADER_LEN)
        qtype = (query[qend - 4] << 8) | query[qend - 3]
        self.names.remember(question_name(query, HEADER_LEN), addresses)
        return resolved_message(qid, flags, query[HEADER_LEN:qend], qtype, status, addresses)

    # ---- guest side --------------------------------------------------------------------
    def from_guest(self, src_mac: bytes, src: bytes, dst: bytes, sport: int, payload: bytes, now: float) -> None:
        """A datagram from a guest to port 53 of dst (the DNS address, or any a policy routes here)."""
        out = self.out
        reply, counter = self.local_answer(payload)
        if counter:
            if reply is None:
                out.drop(counter)
            else:
                out.counters.add(counter)
                if counter == "dns-builtin" or counter == "dns-zone":
                    out.counters.add("dns-queries")
                self.reply(src_mac, src, sport, dst, reply)
            return
        out.counters.add("dns-queries")
        qid, flags = _HEADER.unpack_from(payload, 0)[:2]
        qend = question_end(payload, HEADER_LEN)
        question = payload[HEADER_LEN:qend]
        key = src + bytes(((sport >> 8) & 0xFF, sport & 0xFF, (qid >> 8) & 0xFF, qid & 0xFF))
        if key in self.waiting:
            out.drop("dns-retransmit")
            return
        if len(self.pending) >= MAX_PENDING:
            out.counters.add("dns-pending-full")
            self.reply(src_mac, src, sport, dst, reply_header(qid, flags, RCODE_SERVFAIL, 1, 0) + question)
            return
        limit = 512
        try:
            for rr in dpkt.dns.DNS(payload).ar:
                if rr.type == TYPE_OPT:
                    limit = min(max(512, int(rr.cls)), MAX_UDP_ANSWER)
        except Exception:
            pass
        route = self.route(payload)
        number = self.next_query
        self.next_query += 1
        self.pending[number] = PendingQuery(
            key, src_mac, src, sport, dst, qid, flags, question, route.qtype, limit, now + QUERY_TIMEOUT
        )
        self.waiting[key] = number
        if route.kind == ROUTE_HOST:
            out.counters.add("dns-host-lookups")
            out.op(HostOp(OP_DNS_RESOLVE, number, addr=route.name, port=route.qtype))
        elif route.kind == ROUTE_SPLIT:
            out.counters.add("dns-forwarded-split")
            out.op(HostOp(OP_DNS_QUERY, number, addr=route.addr, port=route.port, data=payload))
        else:
            out.counters.add("dns-forwarded")
            out.op(HostOp(OP_DNS_QUERY, number, data=payload))

    def is_host_name(self, payload: bytes, offset: int) -> bool:
        """Whether the (well-formed) question name at offset is a built-in name."""
        return question_name(payload, offset) in self.builtin

    def reply(self, guest_mac: bytes, guest_ip: bytes, guest_port: int, server_ip: bytes, message: bytes) -> None:
        send_udp_to_guest(self.out, guest_mac, server_ip, guest_ip, DNS_PORT, guest_port, message)

    # ---- host side ---------------------------------------------------------------------
    def answer(self, query: int, data: bytes, now: float) -> None:
        """Upstream answered query number `query` with the DNS message data."""
        pending = self.take(query)
        if pending is None:
            self.out.counters.add("dns-late-answer")
            return
        if len(data) < HEADER_LEN:
            self.servfail(pending)
            return
        if not answers_question(data, pending.question):
            self.out.counters.add("dns-bad-answer")  # not an answer to this question (RFC 5452 9.1)
            self.servfail(pending)
            return
        gid = pending.guest_id
        if len(data) <= pending.limit:
            message = bytes(((gid >> 8) & 0xFF, gid & 0xFF)) + data[2:]
        else:
            self.out.counters.add("dns-truncated")
            flags = ((data[2] << 8) | data[3]) | FLAG_TC
            message = _HEADER.pack(gid, flags, 1, 0, 0, 0) + pending.question
        self.out.counters.add("dns-answers")
        self.names.learn(data)
        self.send(pending, message)

    def resolved(self, query: int, status: int, addresses: list[bytes], now: float) -> None:
        """The host's resolver answered query number `query` (OP_DNS_RESOLVE): a RESOLVED_*
        status and, for RESOLVED_OK, the addresses (4 or 16 bytes each; others are ignored)."""
        pending = self.take(query)
        if pending is None:
            self.out.counters.add("dns-late-answer")
            return
        if status == RESOLVED_SERVFAIL or not RESOLVED_OK <= status <= RESOLVED_SERVFAIL:
            self.servfail(pending)
            return
        self.names.remember(question_name(pending.question, 0), addresses)
        message = resolved_message(pending.guest_id, pending.flags, pending.question, pending.qtype, status, addresses)
        if len(message) > pending.limit:
            self.out.counters.add("dns-truncated")
            message = truncated(message, pending.question)
        self.out.counters.add("dns-nxdomain" if status == RESOLVED_NXDOMAIN else "dns-host-answers")
        self.send(pending, message)

    def failed(self, query: int, now: float) -> None:
        """No upstream could answer query number `query`: SERVFAIL."""
        pending = self.take(query)
        if pending is not None:
            self.servfail(pending)

    def take(self, query: int) -> PendingQuery | None:
        pending = self.pending.pop(query, None)
        if pending is not None:
            self.waiting.pop(pending.key, None)
        return pending

    def send(self, pending: PendingQuery, message: bytes) -> None:
        self.reply(pending.guest_mac, pending.guest_ip, pending.guest_port, pending.server_ip, message)

    def servfail(self, pending: PendingQuery) -> None:
        self.out.counters.add("dns-servfail")
        self.send(pending, reply_header(pending.guest_id, pending.flags, RCODE_SERVFAIL, 1, 0) + pending.question)

    # ---- time --------------------------------------------------------------------------
    def timer(self, now: float) -> None:
        while self.pending:
            number = next(iter(self.pending))
            pending = self.pending[number]
            if pending.deadline > now:
                break
            self.take(number)
            self.out.counters.add("dns-timeouts")
            self.servfail(pending)

    def next_deadline(self) -> float:
        if not self.pending:
            return float("inf")
        return next(iter(self.pending.values())).deadline

"""The DNS server at the virtual DNS address, UDP port 53 (TCP: io/dns_tcp.py, same answers).

Queries are parsed with dpkt.dns. Built-in names (config.host_names, case-insensitive) are
answered here: A gives the gateway address, any other type NOERROR with no answers. Every
other query is forwarded: OP_DNS_QUERY with a query number as the flow and the guest's query
as data; the shell picks the upstream server and calls answer() or failed() with the number.

Answers go back with the guest's own id. One longer than 512 bytes (or the UDP payload size
of the guest's EDNS0 OPT record) is cut to header and question with TC set, so the guest asks
again over TCP. A query that gets no answer within QUERY_TIMEOUT seconds, or that the shell
reports failed, gets SERVFAIL. Malformed queries get FORMERR when their header can be read.

At most MAX_PENDING queries wait for upstream at once; past that, new ones get SERVFAIL.
A guest's retransmission of a query still waiting (same address, port and id) is dropped.
"""

import struct
from typing import Final, final

import dpkt

from qemu_vpnnet.core.actions import OP_DNS_QUERY, HostOp
from qemu_vpnnet.core.output import Output
from qemu_vpnnet.core.udp import send_udp_to_guest

DNS_PORT: Final = 53
HEADER_LEN: Final = 12
QUERY_TIMEOUT: Final = 5.0
MAX_PENDING: Final = 1024
MAX_QUERY: Final = 4096  # a longer query is not forwarded (FORMERR)
MAX_UDP_ANSWER: Final = 65507
BUILTIN_TTL: Final = 60

FLAG_QR: Final = 0x8000
FLAG_OPCODE: Final = 0x7800
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NOTIMP: Final = 4

TYPE_A: Final = 1
TYPE_OPT: Final = 41
TYPE_ANY: Final = 255
CLASS_IN: Final = 1

_HEADER: Final = struct.Struct("!HHHHHH")
_A_RECORD: Final = struct.Struct("!HHIH")


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


@final
class PendingQuery:
    """A forwarded query waiting for upstream."""

    def __init__(
        self,
        key: bytes,
        guest_mac: bytes,
        guest_ip: bytes,
        guest_port: int,
        guest_id: int,
        flags: int,
        question: bytes,
        limit: int,
        deadline: float,
    ) -> None:
        self.key = key
        self.guest_mac = guest_mac
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.guest_id = guest_id
        self.flags = flags
        self.question = question
        self.limit = limit
        self.deadline = deadline


@final
class DnsServer:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.host_names: set[str] = {name.lower().rstrip(".") for name in out.config.host_names}
        self.pending: dict[int, PendingQuery] = {}  # query number -> query, oldest first
        self.waiting: dict[bytes, int] = {}  # guest address + port + id -> query number
        self.next_query = 1

    # ---- guest side --------------------------------------------------------------------
    def local_answer(self, payload: bytes) -> tuple[bytes | None, str]:
        """What the server answers itself: (reply, counter) for a malformed query (FORMERR), an
        unsupported opcode (NOTIMP) or a built-in name; (None, "") when the query must go
        upstream; (None, reason) when it must be dropped (not a query at all).

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
        if not self.is_host_name(payload, HEADER_LEN):
            return None, ""
        question = payload[HEADER_LEN:qend]
        qtype = (payload[qend - 4] << 8) | payload[qend - 3]
        qclass = (payload[qend - 2] << 8) | payload[qend - 1]
        if qclass == CLASS_IN and (qtype == TYPE_A or qtype == TYPE_ANY):
            record = b"\xc0\x0c" + _A_RECORD.pack(TYPE_A, CLASS_IN, BUILTIN_TTL, 4) + self.out.config.host_ip
            return reply_header(qid, flags, RCODE_NOERROR, 1, 1) + question + record, "dns-builtin"
        return reply_header(qid, flags, RCODE_NOERROR, 1, 0) + question, "dns-builtin"

    def from_guest(self, src_mac: bytes, src: bytes, dst: bytes, sport: int, payload: bytes, now: float) -> None:
        """A datagram from a guest to the DNS address, port 53."""
        out = self.out
        reply, counter = self.local_answer(payload)
        if counter:
            if reply is None:
                out.drop(counter)
            else:
                out.counters.add(counter)
                if counter == "dns-builtin":
                    out.counters.add("dns-queries")
                self.reply(src_mac, src, sport, reply)
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
            self.reply(src_mac, src, sport, reply_header(qid, flags, RCODE_SERVFAIL, 1, 0) + question)
            return
        limit = 512
        try:
            for rr in dpkt.dns.DNS(payload).ar:
                if rr.type == TYPE_OPT:
                    limit = min(max(512, int(rr.cls)), MAX_UDP_ANSWER)
        except Exception:
            pass
        number = self.next_query
        self.next_query += 1
        self.pending[number] = PendingQuery(key, src_mac, src, sport, qid, flags, question, limit, now + QUERY_TIMEOUT)
        self.waiting[key] = number
        out.counters.add("dns-forwarded")
        out.op(HostOp(OP_DNS_QUERY, number, data=payload))

    def is_host_name(self, payload: bytes, offset: int) -> bool:
        """Whether the (well-formed) question name at offset is a built-in name."""
        labels: list[str] = []
        while payload[offset]:
            length = payload[offset]
            labels.append(payload[offset + 1 : offset + 1 + length].decode("latin-1").lower())
            offset += 1 + length
        return ".".join(labels) in self.host_names

    def reply(self, guest_mac: bytes, guest_ip: bytes, guest_port: int, message: bytes) -> None:
        cfg = self.out.config
        send_udp_to_guest(self.out, guest_mac, cfg.dns_ip, guest_ip, DNS_PORT, guest_port, message)

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
        gid = pending.guest_id
        if len(data) <= pending.limit:
            message = bytes(((gid >> 8) & 0xFF, gid & 0xFF)) + data[2:]
        else:
            self.out.counters.add("dns-truncated")
            flags = ((data[2] << 8) | data[3]) | FLAG_TC
            message = _HEADER.pack(gid, flags, 1, 0, 0, 0) + pending.question
        self.out.counters.add("dns-answers")
        self.reply(pending.guest_mac, pending.guest_ip, pending.guest_port, message)

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

    def servfail(self, pending: PendingQuery) -> None:
        self.out.counters.add("dns-servfail")
        message = reply_header(pending.guest_id, pending.flags, RCODE_SERVFAIL, 1, 0) + pending.question
        self.reply(pending.guest_mac, pending.guest_ip, pending.guest_port, message)

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

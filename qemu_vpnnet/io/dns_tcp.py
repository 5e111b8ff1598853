"""DNS over TCP at the virtual DNS address: the guest's connection ends here, not at a socket.

A guest TCP connection to the DNS address, port 53, is spliced by the TCP engine like any other,
but its "host socket" is a DnsTcpSession: it reads the guest's length-prefixed queries and
decides each as the UDP server does (core/dns.py local_answer and route): built-in and zone
names are answered by the core; in host mode A and AAAA go to the host's resolver
(io/dns_host.py) and the core builds the answer; the rest is asked of the split upstream, or
of the upstream servers in turn, over TCP, answering SERVFAIL when none answers. Answers
go back in the order the queries came. Bounded: at most MAX_PENDING queries of one connection
wait at once and at most 64 KiB of a partial query is kept; a guest that sends garbage is
disconnected.
"""

import asyncio
import logging
from typing import Any, Final

from qemu_vpnnet.core.dns import ROUTE_HOST, ROUTE_SPLIT, servfail_for
from qemu_vpnnet.io import ratelog
from qemu_vpnnet.io.dns_upstream import DnsUpstreams, UpstreamError
from qemu_vpnnet.io.host_tcp import HostConnection

log = logging.getLogger("qemu_vpnnet.dns")

MAX_PENDING: Final = 16
MAX_BUFFER: Final = 65536 + 2


class DnsTcpSession(asyncio.Transport):
    """Plays the host socket of one guest DNS-over-TCP connection."""

    def __init__(self, protocol: HostConnection, upstreams: DnsUpstreams) -> None:
        super().__init__()
        self.protocol = protocol
        self.upstreams = upstreams
        self.shell = upstreams.shell
        self.buffer = bytearray()
        self.answers: list[asyncio.Future[bytes]] = []  # in query order
        self.eof = False
        self.closing = False
        self.writer: asyncio.Task[None] | None = None

    # ---- what HostConnection and HostTcp call ------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Query bytes from the guest."""
        if self.closing:
            return
        self.buffer += data
        while len(self.buffer) >= 2:
            length = (self.buffer[0] << 8) | self.buffer[1]
            if length < 12:
                self.fail("a DNS message shorter than its header")
                return
            if len(self.buffer) < 2 + length:
                break
            query = bytes(self.buffer[2 : 2 + length])
            del self.buffer[: 2 + length]
            if len(self.answers) >= MAX_PENDING:
                self.fail("too many DNS queries waiting on one connection")
                return
            self.answers.append(asyncio.ensure_future(self.answer(query)))
        if len(self.buffer) > MAX_BUFFER:
            self.fail("DNS query too long")
            return
        if self.writer is None or self.writer.done():
            self.writer = asyncio.ensure_future(self.send_answers())

    def write_eof(self) -> None:
        """The guest sent FIN: answer what came, then close our side."""
        self.eof = True
        if self.writer is None or self.writer.done():
            self.writer = asyncio.ensure_future(self.send_answers())

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.shutdown(None)

    def abort(self) -> None:
        self.shutdown(None)

    # ---- answering ---------------------------------------------------------------------
    async def answer(self, query: bytes) -> bytes:
        dns = self.shell.stack.dns
        reply, counter = dns.local_answer(query)
        if counter:
            self.shell.stack.counters.add(counter + "-tcp")
            return b"" if reply is None else reply
        route = dns.route(query)
        resolver = self.upstreams.resolver
        if route.kind == ROUTE_HOST and resolver is not None:
            self.shell.stack.counters.add("dns-host-lookups-tcp")
            status, addresses = await resolver.lookup(route.name, route.qtype)
            return self.shell.stack.dns.host_answer(query, status, addresses)
        servers = [(route.addr, route.port)] if route.kind == ROUTE_SPLIT else None
        self.shell.stack.counters.add("dns-forwarded-tcp")
        try:
            answer = await self.upstreams.resolve_tcp(query, servers)
            return query[:2] + answer[2:]  # the guest's own id (the upstream saw a random one)
        except UpstreamError:
            self.shell.stack.counters.add("dns-servfail-tcp")
            return servfail_for(query)

    async def send_answers(self) -> None:
        while self.answers and not self.closing:
            reply = await self.answers[0]
            self.answers.pop(0)
            if reply and not self.closing:
                self.protocol.data_received(len(reply).to_bytes(2, "big") + reply)
        if self.eof and not self.closing:
            self.protocol.eof_received()
            self.shutdown(None)

    def fail(self, reason: str) -> None:
        ratelog.info(log, "dns-tcp-malformed", "DNS over TCP from a guest: %s; closing that connection", reason)
        self.shell.stack.counters.add("dns-tcp-malformed")
        self.shutdown(ConnectionResetError(reason))

    def shutdown(self, exc: Exception | None) -> None:
        if self.closing:
            return
        self.closing = True
        for future in self.answers:
            future.cancel()
        self.answers.clear()
        if self.writer is not None and self.writer is not asyncio.current_task():
            self.writer.cancel()
        self.shell.loop.call_soon(self.protocol.connection_lost, exc)


def open_dns_session(protocol: HostConnection, upstreams: DnsUpstreams) -> None:
    """Connect protocol (the flow's HostConnection) to a new DNS-over-TCP session."""
    protocol.connection_made(DnsTcpSession(protocol, upstreams))

"""Upstream DNS for the core's DNS server: performs OP_DNS_QUERY.

Servers come from `--dns-upstream IP[:PORT]` (repeatable; then resolv.conf is not read) or
from the `nameserver` lines of /etc/resolv.conf, which is checked for changes (device, inode,
size, modification time) at most once a second, so DNS follows the host as its VPN comes and
goes. A split upstream (`--dns-upstream DOMAIN=IP[:PORT]`) is chosen by the core, which names
that one server in the op (addr, port); then only that server is asked.

A query goes over UDP to the first server, from a fresh socket with a random id; after
UDP_TIMEOUT seconds without an answer, or an error (ECONNREFUSED when nothing listens), the
next server is tried. An answer with TC set is fetched again over TCP from the same server.
When every server failed, the core is told at once (it answers SERVFAIL).
"""

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING, Final

from qemu_vpnnet.core.actions import OP_DNS_QUERY, HostOp
from qemu_vpnnet.io.shell import Shell, StartupError

if TYPE_CHECKING:
    from qemu_vpnnet.io.dns_host import HostResolver, ZoneFiles

log = logging.getLogger("qemu_vpnnet.dns")

RESOLV_CONF: Final = "/etc/resolv.conf"
UDP_TIMEOUT: Final = 1.5
TCP_TIMEOUT: Final = 3.0
CHECK_INTERVAL: Final = 1.0
MAX_SERVERS: Final = 8
WARN_INTERVAL: Final = 60.0

Server = tuple[str, int]


class UpstreamError(Exception):
    """An upstream's answer is unusable."""


def parse_server(text: str) -> Server:
    """IP, IP:PORT, IPv6, or [IPv6]:PORT; ValueError when malformed."""
    text = text.strip()
    port = 53
    host = text
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad DNS server {text!r}")
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host.split("%", 1)[0])
    if not 0 < port < 65536:
        raise ValueError(f"bad port in DNS server {text!r}")
    return host, port


def parse_split(text: str) -> tuple[str, Server]:
    """DOMAIN=IP[:PORT] as (domain, server); ValueError when malformed."""
    from qemu_vpnnet.core.dns_zone import normal_name

    domain, _, server = text.partition("=")
    name = normal_name(domain)
    if name.startswith("*"):
        raise ValueError(f"bad domain {domain!r} (no wildcards: a domain covers the names below it)")
    return name, parse_server(server)


def split_upstream_values(values: list[str]) -> tuple[list[Server], dict[str, Server]]:
    """--dns-upstream values as (plain servers, {domain: server}); ValueError when one is malformed."""
    plain: list[Server] = []
    split: dict[str, Server] = {}
    for text in values:
        if "=" in text:
            domain, server = parse_split(text)
            split[domain] = server
        else:
            plain.append(parse_server(text))
    return plain, split


def parse_resolv_conf(text: str) -> list[Server]:
    """The nameserver entries of a resolv.conf, in order (bad ones skipped)."""
    servers: list[Server] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                host = fields[1]
                ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                continue
            if (host, 53) not in servers:
                servers.append((host, 53))
    return servers[:MAX_SERVERS]


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class DnsUpstreams:
    """Where DNS queries go, and the forwarding of the core's queries."""

    def __init__(self, shell: Shell, fixed: list[Server], resolv_conf: str = RESOLV_CONF) -> None:
        self.shell = shell
        self.loop = shell.loop
        self.fixed = list(fixed)
        self.resolv_conf = resolv_conf
        self.from_file: list[Server] = []
        self.file_key: tuple[int, int, int, int] | None = None
        self.checked = -CHECK_INTERVAL
        self.tasks: set[asyncio.Task[None]] = set()
        self.warned: dict[Server, float] = {}
        self.resolver: HostResolver | None = None  # set by dns_host.configure_dns
        self.zone_files: ZoneFiles | None = None

    def install(self) -> None:
        self.shell.op_performers[OP_DNS_QUERY] = self.perform
        if self.fixed:
            log.info("DNS upstream: %s", ", ".join(f"{h}:{p}" for h, p in self.fixed))
        else:
            self.servers()

    # ---- servers -----------------------------------------------------------------------
    def servers(self) -> list[Server]:
        """The upstream servers in order of preference (re-reading resolv.conf if it changed)."""
        if self.fixed:
            return self.fixed
        now = self.loop.time()
        if now - self.checked >= CHECK_INTERVAL:
            self.checked = now
            self.reload()
        return self.from_file

    def reload(self) -> None:
        try:
            st = os.stat(self.resolv_conf)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as exc:
            if self.file_key != (0, 0, 0, 0):
                log.warning("cannot read %s: %s; DNS queries will fail", self.resolv_conf, exc.strerror)
            self.file_key = (0, 0, 0, 0)
            self.from_file = []
            return
        if key == self.file_key:
            return
        self.file_key = key
        try:
            with open(self.resolv_conf, encoding="utf-8", errors="replace") as f:
                servers = parse_resolv_conf(f.read(65536))
        except OSError as exc:
            log.warning("cannot read %s: %s; DNS queries will fail", self.resolv_conf, exc.strerror)
            servers = []
        if servers != self.from_file:
            if servers:
                log.info("DNS upstream from %s: %s", self.resolv_conf, ", ".join(f"{h}:{p}" for h, p in servers))
            else:
                log.warning("no nameserver in %s; DNS queries will fail", self.resolv_conf)
        self.from_file = servers

    # ---- forwarding --------------------------------------------------------------------
    def perform(self, op: HostOp) -> None:
        servers = [(op.addr, op.port)] if op.addr else None
        task = self.loop.create_task(self.resolve(op.flow, op.data, servers))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def resolve(self, query_id: int, query: bytes, servers: list[Server] | None = None) -> None:
        """Forward query to servers (default: the upstream servers) in turn; tell the core."""
        dns = self.shell.stack.dns
        for server in list(self.servers()) if servers is None else servers:
            try:
                answer = await self.ask_udp(server, query)
                if answer[2] & 0x02:
                    try:
                        answer = await self.ask_tcp(server, query)
                    except (OSError, TimeoutError, EOFError, UpstreamError) as exc:
                        log.debug("DNS over TCP to %s:%d failed (%s); passing the truncated answer", *server, exc)
            except (OSError, TimeoutError, UpstreamError) as exc:
                self.warn(server, exc)
                continue
            dns.answer(query_id, answer, self.loop.time())
            self.shell.schedule_flush()
            return
        dns.failed(query_id, self.loop.time())
        self.shell.schedule_flush()

    async def resolve_tcp(self, query: bytes, servers: list[Server] | None = None) -> bytes:
        """Ask servers (default: the upstream servers) over TCP in turn; the first answer, else
        UpstreamError."""
        for server in list(self.servers()) if servers is None else servers:
            try:
                return await self.ask_tcp(server, query)
            except (OSError, TimeoutError, EOFError, UpstreamError) as exc:
                self.warn(server, exc)
        raise UpstreamError("no upstream DNS server answered over TCP")

    def warn(self, server: Server, exc: BaseException) -> None:
        now = self.loop.time()
        if now - self.warned.get(server, -WARN_INTERVAL) >= WARN_INTERVAL:
            self.warned[server] = now
            if len(self.warned) > 4 * MAX_SERVERS:
                self.warned.clear()
                self.warned[server] = now
            what = "no answer" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            log.warning("DNS upstream %s:%d failed: %s", server[0], server[1], what)

    async def ask_udp(self, server: Server, query: bytes) -> bytes:
        wire_id = secrets.token_bytes(2)
        sock = socket.socket(family_of(server[0]), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(server)
            sock.send(wire_id + query[2:])
            async with asyncio.timeout(UDP_TIMEOUT):
                while True:
                    data = await self.loop.sock_recv(sock, 65536)
                    if len(data) >= 12 and data[:2] == wire_id and data[2] & 0x80:
                        return data
        finally:
            sock.close()

    async def ask_tcp(self, server: Server, query: bytes) -> bytes:
        wire_id = secrets.token_bytes(2)
        async with asyncio.timeout(TCP_TIMEOUT):
            reader, writer = await asyncio.open_connection(server[0], server[1])
            try:
                writer.write(len(query).to_bytes(2, "big") + wire_id + query[2:])
                await writer.drain()
                length = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(length)
            finally:
                writer.close()
        if len(data) < 12 or data[:2] != wire_id:
            raise UpstreamError("answer over TCP does not match the query")
        return data

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.resolver is not None:
            self.resolver.close()
        if self.zone_files is not None:
            self.zone_files.close()


def install_dns_upstream(shell: Shell, upstream: list[str]) -> DnsUpstreams:
    """Register the OP_DNS_QUERY performer; upstream holds --dns-upstream values (may be empty;
    the DOMAIN=server ones are the core's, see dns_host.configure_dns)."""
    try:
        fixed, _split = split_upstream_values(upstream)
    except ValueError as exc:
        raise StartupError(f"--dns-upstream: {exc} (expected IP[:PORT] or [IPv6]:PORT)") from exc
    upstreams = DnsUpstreams(shell, fixed)
    upstreams.install()
    return upstreams

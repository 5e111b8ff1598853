"""DNS through the host's resolver library, zone files, and the DNS options of the command line.

HostResolver performs OP_DNS_RESOLVE: `getaddrinfo(name, AF_UNSPEC)` in a thread pool
of its own (MAX_CONCURRENT threads), so /etc/hosts, nsswitch and systemd-resolved answer for
the guest as for any host program. At most MAX_CONCURRENT lookups run at once and MAX_QUEUED
more wait; past that, and after LOOKUP_TIMEOUT seconds, the core is told RESOLVED_SERVFAIL. A
lookup that times out keeps its thread until getaddrinfo returns (threads cannot be cancelled),
so a stuck resolver holds at most MAX_CONCURRENT threads.

NXDOMAIN and NODATA: one AF_UNSPEC lookup answers both A and AAAA (a guest's A and AAAA
questions for one name share it while it runs). Addresses of the other family only: the name
exists (NOERROR, no answers); nothing (EAI_NONAME, EAI_NODATA, EAI_ADDRFAMILY): NXDOMAIN.
EAI_AGAIN, EAI_FAIL and other errors are SERVFAIL. The name goes to getaddrinfo without a
trailing dot, as a host program would give it (glibc's files backend does not match "name." in
/etc/hosts), so the host's search list may apply to it.

ZoneFiles loads each --dns-zone-file into the core's zones and checks it for changes (device,
inode, size, modification time) once a second; a file with a bad line is logged with the line
number and its previous zone kept.
"""

import argparse
import asyncio
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from qemu_vpnnet.core.actions import OP_DNS_RESOLVE, HostOp
from qemu_vpnnet.core.dns import (
    MODE_FORWARD,
    MODE_HOST,
    QUERY_TIMEOUT,
    RESOLVED_NODATA,
    RESOLVED_NXDOMAIN,
    RESOLVED_OK,
    RESOLVED_SERVFAIL,
    TYPE_AAAA,
)
from qemu_vpnnet.core.dns_zone import SOURCE_COMMAND_LINE, ZoneError, parse_zone_entry, parse_zone_text
from qemu_vpnnet.io.dns_upstream import DnsUpstreams, split_upstream_values
from qemu_vpnnet.io.shell import Shell, StartupError

log = logging.getLogger("qemu_vpnnet.dns")

MAX_CONCURRENT: Final = 32
MAX_QUEUED: Final = 512
LOOKUP_TIMEOUT: Final = QUERY_TIMEOUT
CHECK_INTERVAL: Final = 1.0
MAX_ZONE_FILE: Final = 4 << 20

_NOT_FOUND: Final = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, name)
)


Lookup = tuple[int, list[bytes], list[bytes]]  # (RESOLVED_* status, IPv4 addresses, IPv6 addresses)


def lookup(name: str) -> Lookup:
    """What getaddrinfo(name, AF_UNSPEC) finds, as a host program would ask it.

    One question for both families: a name that /etc/hosts knows for IPv4 only is not then
    looked up again in DNS for IPv6 (an AF_INET6 lookup is, and waits for a DNS timeout when
    the host's name servers are unreachable). A name with no address at all is NXDOMAIN.
    """
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return (RESOLVED_NXDOMAIN if exc.errno in _NOT_FOUND else RESOLVED_SERVFAIL), [], []
    except (OSError, UnicodeError):
        return RESOLVED_SERVFAIL, [], []
    v4: list[bytes] = []
    v6: list[bytes] = []
    for info in infos:
        family = info[0]
        if family != socket.AF_INET and family != socket.AF_INET6:
            continue
        try:
            addr = socket.inet_pton(family, str(info[4][0]).split("%", 1)[0])
        except OSError:
            continue
        found = v4 if family == socket.AF_INET else v6
        if addr not in found:
            found.append(addr)
    return RESOLVED_OK, v4, v6


def answer_for(result: Lookup, qtype: int) -> tuple[int, list[bytes]]:
    """The core's (status, addresses) for an A or AAAA question from one lookup."""
    status, v4, v6 = result
    if status != RESOLVED_OK:
        return status, []
    addresses = v6 if qtype == TYPE_AAAA else v4
    return (RESOLVED_OK if addresses else RESOLVED_NODATA), addresses


class HostResolver:
    """Performs OP_DNS_RESOLVE with getaddrinfo (see the module docstring)."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.loop = shell.loop
        self.executor = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="vpnnet-dns")
        self.slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.queued = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight: dict[str, asyncio.Task[Lookup]] = {}  # name -> its lookup, shared by A and AAAA

    def install(self) -> None:
        self.shell.op_performers[OP_DNS_RESOLVE] = self.perform

    def perform(self, op: HostOp) -> None:
        task = self.loop.create_task(self.resolve(op.flow, op.addr, op.port))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def resolve(self, query: int, name: str, qtype: int) -> None:
        status, addresses = await self.lookup(name, qtype)
        self.shell.stack.dns.resolved(query, status, addresses, self.loop.time())
        self.shell.schedule_flush()

    async def lookup(self, name: str, qtype: int) -> tuple[int, list[bytes]]:
        """What getaddrinfo says of name (RESOLVED_SERVFAIL when overloaded or too slow).

        A guest asks A and AAAA at once: both wait for the same lookup of the name.
        """
        pending = self.inflight.get(name)
        if pending is None:
            if len(self.inflight) >= MAX_CONCURRENT + MAX_QUEUED:
                self.shell.stack.counters.add("dns-host-overload")
                return RESOLVED_SERVFAIL, []
            pending = self.loop.create_task(self.lookup_name(name))
            self.inflight[name] = pending
            pending.add_done_callback(lambda _task: self.inflight.pop(name, None))
        return answer_for(await asyncio.shield(pending), qtype)

    async def lookup_name(self, name: str) -> Lookup:
        if self.queued >= MAX_QUEUED:
            self.shell.stack.counters.add("dns-host-overload")
            return RESOLVED_SERVFAIL, [], []
        self.queued += 1
        deadline = self.loop.time() + LOOKUP_TIMEOUT
        try:
            async with asyncio.timeout_at(deadline):
                await self.slots.acquire()
        except TimeoutError:
            self.shell.stack.counters.add("dns-host-timeouts")
            return RESOLVED_SERVFAIL, [], []
        finally:
            self.queued -= 1
        future = self.loop.run_in_executor(self.executor, lookup, name)
        future.add_done_callback(lambda _f: self.slots.release())  # when the thread is done
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            self.shell.stack.counters.add("dns-host-timeouts")
            log.debug("getaddrinfo(%s) took more than %.0f s", name, LOOKUP_TIMEOUT)
            return RESOLVED_SERVFAIL, [], []

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


def read_zone_file(path: str) -> list[tuple[str, bytes]]:
    """The entries of a zone file; ZoneError (with the line number) or OSError."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(MAX_ZONE_FILE + 1)
    if len(text) > MAX_ZONE_FILE:
        raise ZoneError(f"larger than {MAX_ZONE_FILE} bytes")
    return parse_zone_text(text)


class ZoneFiles:
    """The --dns-zone-file zones, reloaded when a file changes."""

    def __init__(self, shell: Shell, paths: list[str]) -> None:
        self.shell = shell
        self.paths = list(dict.fromkeys(paths))
        self.keys: dict[str, tuple[int, int, int, int]] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for path in self.paths:
            self.check(path)
        if self.paths:
            self.task = self.shell.loop.create_task(self.watch())

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            for path in self.paths:
                self.check(path)

    def check(self, path: str) -> None:
        """Load path again if it changed; keep its old zone when it cannot be read or parsed."""
        try:
            st = os.stat(path)
        except OSError as exc:
            if self.keys.get(path) != (0, 0, 0, 0):
                log.warning("DNS zone file %s: %s; keeping its previous names", path, exc.strerror)
            self.keys[path] = (0, 0, 0, 0)
            return
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self.keys.get(path) == key:
            return
        self.keys[path] = key
        try:
            entries = read_zone_file(path)
            self.shell.stack.dns.zones.set_source(path, entries)
        except (OSError, ZoneError) as exc:
            log.warning("DNS zone file %s: %s; keeping its previous names", path, exc)
            return
        log.info("DNS zone file %s: %d names", path, len({name for name, _ in entries}))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


def dns_mode_of(args: argparse.Namespace) -> str:
    """--dns-mode, or its default: forward when a plain --dns-upstream is given, else host."""
    mode: str | None = args.dns_mode
    if mode:
        return mode
    plain, _split = split_upstream_values(list(args.dns_upstream))
    return MODE_FORWARD if plain else MODE_HOST


def configure_dns(shell: Shell, upstreams: DnsUpstreams, args: argparse.Namespace) -> None:
    """Mode, split upstreams, zones and the host resolver from the parsed CLI options."""
    dns = shell.stack.dns
    mode = dns_mode_of(args)
    dns.set_mode(mode)
    _plain, split = split_upstream_values(list(args.dns_upstream))
    dns.set_split(split)
    try:
        dns.zones.set_source(SOURCE_COMMAND_LINE, [parse_zone_entry(text) for text in args.dns_zone])
    except ZoneError as exc:  # checked by the parser already; here only the size limits
        raise StartupError(f"--dns-zone: {exc}") from exc
    resolver = HostResolver(shell)
    resolver.install()  # also in forward mode: a QMP client or test may switch the mode
    upstreams.resolver = resolver
    zone_files = ZoneFiles(shell, list(args.dns_zone_file))
    zone_files.start()
    upstreams.zone_files = zone_files
    log.info(
        "DNS mode %s%s",
        mode,
        "".join(f"; {domain} via {host}:{port}" for domain, (host, port) in split.items()),
    )

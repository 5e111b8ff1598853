"""Host-side TCP sockets of the splice engine: connect, read, write, half-close, reset.

OP_TCP_CONNECT carries the flow's route (core/fwd.py), which picks the connector: a TCP
connect() (direct, or a forward to tcp:HOST:PORT), a Unix stream socket (unix:PATH), a process
per connection with the connection as its stdin and stdout (cmd:COMMAND, run without a shell),
the backend's own DNS over TCP (local dns), the upstream HTTP proxy (proxy http/https) or the
explicit proxy at the gateway (local http-proxy), both in io/http_proxy.py. Each one answers
the core with host_connected() or host_refused(); a forward whose target fails is logged (once per target and interval).
"""

import asyncio
import errno
import fcntl
import logging
import os
import select
import shlex
import signal
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from qemu_vpnnet.core.actions import (
    OP_PAUSE_READING,
    OP_RESUME_READING,
    OP_TCP_ABORT,
    OP_TCP_ACCEPTED,
    OP_TCP_CLOSE,
    OP_TCP_CONNECT,
    OP_TCP_SEND,
    OP_TCP_SHUTDOWN,
    HostOp,
)
from qemu_vpnnet.core.fwd import FORWARD, LOCAL, PROXY, TARGET_CMD, TARGET_UNIX, Route
from qemu_vpnnet.io.core_calls import TcpCalls
from qemu_vpnnet.io.shell import Shell

if TYPE_CHECKING:
    from qemu_vpnnet.io.http_proxy import HttpProxy

try:  # whether a host socket's FIN waits behind what was read (io/_tcp_state.c); optional
    from qemu_vpnnet.io._tcp_state import peer_closed as c_peer_closed

    HAVE_TCP_STATE = True
except ImportError:  # the package was built without it: a socket object asks
    HAVE_TCP_STATE = False

log = logging.getLogger("qemu_vpnnet.tcp")

WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
LINGER_RST: Final = struct.pack("ii", 1, 0)
WARN_INTERVAL: Final = 10.0  # seconds between two log lines about the same failing forward target
MAX_WARNED: Final = 256
COMMAND_GRACE: Final = 5.0  # seconds a command may run on after its connection closed
MAX_COMMANDS: Final = 128  # cmd: forward processes at once: a guest must not fork without bound


def tune_stream(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """A host stream socket as every splice wants it: a bounded write buffer. (No Nagle delay:
    uvloop's TCP transports, like asyncio's, set TCP_NODELAY themselves.)"""
    stream = cast(asyncio.Transport, transport)
    stream.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
    return stream


SIOCINQ: Final = 0x541B  # linux/sockios.h (= FIONREAD): bytes unread, not counting a FIN
PEER_SHUT: Final = select.POLLIN | select.POLLRDHUP
POLL_FAILED: Final = select.POLLERR | select.POLLNVAL


def peer_closed(fd: int) -> bool:
    """True when the peer of stream socket fd (TCP or Unix) shut its side (poll: POLLRDHUP, no error) with
    nothing unread before its FIN (SIOCINQ); False otherwise and on errors. Takes nothing from
    the socket and leaves a pending error to the event loop's read (io/_tcp_state.c says why)."""
    if HAVE_TCP_STATE:
        return c_peer_closed(fd)
    poller = select.poll()
    poller.register(fd, PEER_SHUT)
    try:
        events = poller.poll(0)
        if not events or not events[0][1] & select.POLLRDHUP or events[0][1] & POLL_FAILED:
            return False
        unread = fcntl.ioctl(fd, SIOCINQ, b"\0\0\0\0")
        return bool(struct.unpack("i", unread)[0] == 0)
    except OSError:
        return False


SCRATCH_SIZE: Final = 256 << 10  # bytes one read of a host socket takes at most, outside a download
EARLY_LIMIT: Final = 256 << 10  # bytes an accepted connection may send before it has a flow


class HostConnection(asyncio.BufferedProtocol):
    """The host socket of one spliced flow.

    A buffered protocol: while the flow's send buffer toward the guest holds data (a download
    under way), the socket is read straight into the room at that buffer's end (TcpEngine.
    host_read_buffer), not into a bytes object that is then copied there (measured on a vhost-user
    download: the two copies took 15 % of the backend's CPU). Otherwise the read goes into the
    HostTcp's scratch buffer and from there through host_data, as from the DNS and proxy sessions
    that call data_received.

    A read that did not fill its buffer may have the peer's FIN right behind it, which the event
    loop would report only on its next turn: peer_closed looks, so that an answer and its FIN
    reach the guest in one segment. Then the loop's own eof_received comes too late to
    matter.
    """

    def __init__(self, host: "HostTcp", flow: int, on_made: "Callable[[HostConnection], None] | None" = None) -> None:
        self.host = host
        self.flow = flow
        self.transport: asyncio.Transport | None = None
        self.gone = False  # the core no longer knows this flow
        self.on_made = on_made  # for accepted (forwarded) connections: the forwarder picks the flow
        # what an accepted connection's client sent before the forwarder gave it a flow (it may
        # wait for an IPv6 guest's neighbour advertisement): handed on by HostTcp.adopt
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.direct = False  # the last get_buffer handed out room in the flow's own send buffer
        self.asked = 0  # bytes the last get_buffer handed out
        self.fd = -1  # the host socket's descriptor, for peer_closed
        self.eof_seen = False  # the peer's FIN was seen (and the core told)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tune_stream(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        room = None
        if not self.gone and self.flow >= 0:
            room = self.host.tcp.host_read_buffer(self.flow)
        self.direct = room is not None
        buffer = room if room is not None else self.host.scratch
        self.asked = len(buffer)
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        host = self.host
        if self.direct:
            self.direct = False
            if self.gone:
                return
            host.tcp.host_data_read(self.flow, nbytes, host.shell.now())
        elif not self.take(host.scratch[:nbytes]):
            return
        if nbytes < self.asked and self.fd >= 0 and peer_closed(self.fd):
            self.eof_seen = True
            host.tcp.host_eof(self.flow, host.shell.now())
        host.shell.flush()  # the segments go out now (see Shell.frames_received)

    def data_received(self, data: bytes | memoryview) -> None:
        if self.take(data):
            self.host.shell.flush()  # the segments go out now (see Shell.frames_received)

    def take(self, data: bytes | memoryview) -> bool:
        """Hand data to the core; False when there is no flow to take it (yet)."""
        if self.gone:
            return False
        if self.flow < 0:  # no flow yet: keep it (bounded: reading stops past EARLY_LIMIT)
            self.early.append(bytes(data))
            self.early_bytes += len(data)
            if self.early_bytes >= EARLY_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return False
        host = self.host
        host.tcp.host_data(self.flow, data, host.shell.now())
        return True

    def eof_received(self) -> bool:
        if not self.gone and not self.eof_seen:
            self.eof_seen = True
            self.host.tcp.host_eof(self.flow, self.host.shell.now())
            self.host.shell.flush()  # the FIN goes out now, as data does
        return True  # keep our side open: the guest may still send (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        host = self.host
        if host.conns.get(self.flow) is self:
            del host.conns[self.flow]
        if self.gone:
            return
        self.gone = True
        if exc is not None:
            host.tcp.host_reset(self.flow, host.shell.now())
        else:
            host.tcp.host_eof(self.flow, host.shell.now())
        host.shell.schedule_flush()

    def pause_writing(self) -> None:
        self.host.tcp.host_write_paused(self.flow)

    def resume_writing(self) -> None:
        if not self.gone:
            self.host.tcp.host_write_resumed(self.flow)
            self.host.shell.schedule_flush()

    def abort_with_rst(self) -> None:
        self.gone = True
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass
        transport.abort()


class HostTcp:
    """Performs the TCP ops of the core on real sockets."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.tcp: TcpCalls = shell.stack.tcp  # core/tcp.py TcpEngine (a test may record its calls)
        self.conns: dict[int, HostConnection] = {}
        self.connecting: dict[int, asyncio.Task[None]] = {}
        self.commands: dict[int, asyncio.subprocess.Process] = {}  # cmd: forwards, by flow
        self.warned: dict[str, float] = {}  # forward target -> when its failure was last logged
        self.proxy: HttpProxy | None = None  # the HTTP proxy (io/http_proxy.py), set by start_proxy
        # what a host socket reads into when its flow's send buffer is empty (one read at a time:
        # the data is copied out before the next read)
        self.scratch = memoryview(bytearray(SCRATCH_SIZE))
        performers = shell.op_performers
        performers[OP_TCP_CONNECT] = self.op_connect
        performers[OP_TCP_SEND] = self.op_send
        performers[OP_TCP_SHUTDOWN] = self.op_shutdown
        performers[OP_TCP_CLOSE] = self.op_close
        performers[OP_TCP_ABORT] = self.op_abort
        performers[OP_PAUSE_READING] = self.op_pause
        performers[OP_RESUME_READING] = self.op_resume
        performers[OP_TCP_ACCEPTED] = self.op_accepted

    def adopt(self, flow: int, conn: HostConnection) -> None:
        """Register an accepted (forwarded) host connection under the flow the core gave it, and
        hand the core what its client sent before (it waits for the guest's handshake)."""
        self.conns[flow] = conn
        if conn.early:
            now = self.shell.now()
            for data in conn.early:
                self.tcp.host_data(flow, data, now)
            conn.early = []
            conn.early_bytes = 0

    def op_connect(self, op: HostOp) -> None:
        route = op.route
        if route is not None and route.kind == LOCAL and route.path == "http-proxy":
            self.connect_explicit_proxy(op.flow)
            return
        if route is not None and route.kind == LOCAL:
            self.connect_dns(op.flow)
            return
        proxy = self.proxy
        if route is not None and route.kind == PROXY and proxy is not None:
            coro = proxy.connect_transparent(self, op.flow, op.addr, op.port, route.path)
            self.connecting[op.flow] = self.shell.loop.create_task(coro)
            return
        if route is not None and route.kind == FORWARD and route.target == TARGET_UNIX:
            coro = self.connect_unix(op.flow, route)
        elif route is not None and route.kind == FORWARD and route.target == TARGET_CMD:
            coro = self.connect_command(op.flow, route)
        else:
            coro = self.connect(op.flow, op.addr, op.port, route)
        self.connecting[op.flow] = self.shell.loop.create_task(coro)

    def connect_dns(self, flow: int) -> None:
        """Guest TCP to the DNS address, port 53 (or a local dns route): answered here (io/dns_tcp.py)."""
        upstreams = self.shell.dns_upstreams
        if upstreams is None:
            self.tcp.host_refused(flow, errno.ECONNREFUSED, self.shell.now())
            self.shell.schedule_flush()
            return
        from qemu_vpnnet.io.dns_tcp import open_dns_session

        conn = HostConnection(self, flow)
        open_dns_session(conn, upstreams)
        self.conns[flow] = conn
        self.tcp.host_connected(flow, self.shell.now())
        self.shell.schedule_flush()

    def connect_explicit_proxy(self, flow: int) -> None:
        """Guest TCP to the explicit proxy's gateway port (local http-proxy)."""
        if self.proxy is None:
            self.tcp.host_refused(flow, errno.ECONNREFUSED, self.shell.now())
            self.shell.schedule_flush()
            return
        self.proxy.open_explicit(self, flow)

    async def connect(self, flow: int, addr: str, port: int, route: Route | None = None) -> None:
        loop = self.shell.loop
        try:
            _transport, protocol = await loop.create_connection(lambda: HostConnection(self, flow), addr, port)
        except OSError as exc:
            self.failed(flow, exc, f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}", route)
            return
        except asyncio.CancelledError:
            self.connecting.pop(flow, None)
            raise
        self.opened(flow, protocol)

    async def connect_unix(self, flow: int, route: Route) -> None:
        loop = self.shell.loop
        try:
            _transport, protocol = await loop.create_unix_connection(lambda: HostConnection(self, flow), route.path)
        except OSError as exc:
            self.failed(flow, exc, route.path, route)
            return
        except asyncio.CancelledError:
            self.connecting.pop(flow, None)
            raise
        self.opened(flow, protocol)

    async def connect_command(self, flow: int, route: Route) -> None:
        """Run route.path (split like a shell would, but not run by one) with the connection as its
        stdin and stdout; a command that cannot start refuses the connection."""
        loop = self.shell.loop
        if len(self.commands) >= MAX_COMMANDS:
            self.failed(flow, OSError(errno.EAGAIN, f"{MAX_COMMANDS} commands run already"), route.path, route)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = shlex.split(route.path)
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=theirs.fileno(), stdout=theirs.fileno(), start_new_session=True
            )
        except (OSError, ValueError) as exc:
            ours.close()
            if not isinstance(exc, OSError):
                exc = OSError(errno.EINVAL, str(exc))
            self.failed(flow, exc, route.path, route)
            return
        except asyncio.CancelledError:
            ours.close()
            self.connecting.pop(flow, None)
            raise
        finally:
            theirs.close()
        self.commands[flow] = process
        watcher = loop.create_task(self.reap(flow, process))
        self.shell.tasks.add(watcher)
        watcher.add_done_callback(self.shell.tasks.discard)
        try:
            _transport, protocol = await loop.create_unix_connection(lambda: HostConnection(self, flow), sock=ours)
        except OSError as exc:
            ours.close()
            self.kill_command(flow)
            self.failed(flow, exc, route.path, route)
            return
        except asyncio.CancelledError:
            ours.close()
            self.kill_command(flow)
            self.connecting.pop(flow, None)
            raise
        log.debug("flow %d: started %s (pid %d)", flow, route.path, process.pid)
        self.opened(flow, protocol)

    async def reap(self, flow: int, process: "asyncio.subprocess.Process") -> None:
        """Wait for a command to exit; once its connection is gone, give it COMMAND_GRACE seconds."""
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(process.wait()), COMMAND_GRACE)
                    break
                except TimeoutError:
                    if flow not in self.conns and flow not in self.connecting:
                        log.info(
                            "flow %d: command pid %d still runs after its connection closed; killed", flow, process.pid
                        )
                        self.signal_command(process, signal.SIGKILL)
        finally:
            if self.commands.get(flow) is process:
                del self.commands[flow]

    def kill_command(self, flow: int) -> None:
        process = self.commands.get(flow)
        if process is not None and process.returncode is None:
            self.signal_command(process, signal.SIGTERM)

    @staticmethod
    def signal_command(process: "asyncio.subprocess.Process", sig: int) -> None:
        try:
            os.killpg(process.pid, sig)  # its own session: the whole group
        except (ProcessLookupError, PermissionError):
            pass

    def failed(self, flow: int, exc: OSError, where: str, route: Route | None) -> None:
        """A connector failed: the guest gets RST (or ICMP unreachable); forwards say why in the log."""
        self.connecting.pop(flow, None)
        err = exc.errno if exc.errno is not None else errno.ECONNREFUSED
        if err == errno.EMFILE or err == errno.ENFILE:
            self.shell.out_of_descriptors(f"connect {where}", exc)
        elif route is not None and route.kind == FORWARD:
            self.warn_target(route, exc)
        else:
            log.debug("flow %d: connect %s failed: %s", flow, where, exc)
        self.tcp.host_refused(flow, err, self.shell.now())
        self.shell.schedule_flush()

    def warn_target(self, route: Route, exc: OSError) -> None:
        now = self.shell.now()
        target = route.target_text()
        if now - self.warned.get(target, -WARN_INTERVAL) < WARN_INTERVAL:
            return
        if len(self.warned) >= MAX_WARNED:
            self.warned.clear()
        self.warned[target] = now
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        log.warning("forward %s (rule %s) failed: %s; the guest's connection is reset", target, route.rule, reason)

    def opened(self, flow: int, conn: HostConnection) -> None:
        self.connecting.pop(flow, None)
        if flow not in self.tcp.flows:  # the guest gave up meanwhile
            conn.abort_with_rst()
            self.kill_command(flow)
            return
        self.conns[flow] = conn
        self.tcp.host_connected(flow, self.shell.now())
        self.shell.flush()  # the SYN-ACK goes out now, not a turn of the loop later

    def op_send(self, op: HostOp) -> None:
        conn = self.conns.get(op.flow)
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(op.data)

    def op_shutdown(self, op: HostOp) -> None:
        conn = self.conns.get(op.flow)
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            try:
                conn.transport.write_eof()
            except (OSError, RuntimeError) as exc:
                log.debug("flow %d: shutdown failed: %s", op.flow, exc)

    def op_close(self, op: HostOp) -> None:
        conn = self.conns.pop(op.flow, None)
        if conn is not None:
            conn.gone = True
            if conn.transport is not None:
                conn.transport.close()

    def op_abort(self, op: HostOp) -> None:
        task = self.connecting.pop(op.flow, None)
        if task is not None:
            task.cancel()
        conn = self.conns.pop(op.flow, None)
        if conn is not None:
            conn.abort_with_rst()
        self.kill_command(op.flow)

    def op_pause(self, op: HostOp) -> None:
        conn = self.conns.get(op.flow)
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.pause_reading()

    def op_resume(self, op: HostOp) -> None:
        conn = self.conns.get(op.flow)
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.resume_reading()

    def op_accepted(self, op: HostOp) -> None:
        self.op_resume(op)

    def close_all(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for task in self.connecting.values():
            task.cancel()
        self.connecting.clear()
        for conn in list(self.conns.values()):
            conn.abort_with_rst()
        self.conns.clear()
        for process in list(self.commands.values()):
            if process.returncode is None:
                self.signal_command(process, signal.SIGKILL)

"""Host-side TCP sockets of the splice engine: connect, read, write, half-close, reset."""

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Final, cast

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
from qemu_vpnnet.core.tcp import DNS_UPSTREAM, TcpEngine
from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.tcp")

WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
LINGER_RST: Final = struct.pack("ii", 1, 0)


class HostConnection(asyncio.Protocol):
    """The host socket of one spliced flow."""

    def __init__(self, host: "HostTcp", flow: int, on_made: "Callable[[HostConnection], None] | None" = None) -> None:
        self.host = host
        self.flow = flow
        self.transport: asyncio.Transport | None = None
        self.gone = False  # the core no longer knows this flow
        self.on_made = on_made  # for accepted (forwarded) connections: the forwarder picks the flow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.gone:
            return
        host = self.host
        host.tcp.host_data(self.flow, data, host.shell.now())
        host.shell.flush()  # the segments go out now (see Shell.frames_received)

    def eof_received(self) -> bool:
        if not self.gone:
            self.host.tcp.host_eof(self.flow, self.host.shell.now())
            self.host.shell.schedule_flush()
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
        self.tcp: TcpEngine = shell.stack.tcp
        self.conns: dict[int, HostConnection] = {}
        self.connecting: dict[int, asyncio.Task[None]] = {}
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
        """Register an accepted (forwarded) host connection under the flow the core gave it."""
        self.conns[flow] = conn

    def op_connect(self, op: HostOp) -> None:
        addr = op.addr
        port = op.port
        if addr == DNS_UPSTREAM:
            self.connect_dns(op.flow)
            return
        task = self.shell.loop.create_task(self.connect(op.flow, addr, port))
        self.connecting[op.flow] = task

    def connect_dns(self, flow: int) -> None:
        """Guest TCP to the DNS address, port 53: answered here (io/dns_tcp.py)."""
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

    async def connect(self, flow: int, addr: str, port: int) -> None:
        loop = self.shell.loop
        try:
            _transport, protocol = await loop.create_connection(lambda: HostConnection(self, flow), addr, port)
        except OSError as exc:
            self.connecting.pop(flow, None)
            err = exc.errno if exc.errno is not None else errno.ECONNREFUSED
            log.debug("flow %d: connect %s:%d failed: %s", flow, addr, port, exc)
            self.tcp.host_refused(flow, err, loop.time())
            self.shell.schedule_flush()
            return
        except asyncio.CancelledError:
            self.connecting.pop(flow, None)
            raise
        self.connecting.pop(flow, None)
        conn = protocol
        if flow not in self.tcp.flows:  # the guest gave up meanwhile
            conn.abort_with_rst()
            return
        self.conns[flow] = conn
        self.tcp.host_connected(flow, loop.time())
        self.shell.schedule_flush()

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
        for task in self.connecting.values():
            task.cancel()
        self.connecting.clear()
        for conn in list(self.conns.values()):
            conn.abort_with_rst()
        self.conns.clear()

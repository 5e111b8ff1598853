"""QEMU-side transports: each connected QEMU netdev is one port of the virtual switch.

- StreamPort: `-netdev stream` (Unix) and `-netdev socket` (TCP), length-prefixed frames.
- DgramEndpoint: `-netdev dgram` over Unix datagram sockets, one frame per datagram; each
  distinct peer address is its own port.
"""

import asyncio
import logging
import socket
from typing import Final, Protocol, cast

from mypy_extensions import mypyc_attr

from qemu_vpnnet.io import ratelog
from qemu_vpnnet.io.framing import FramingError, frame_parts, split_frames

log = logging.getLogger("qemu_vpnnet.qemu")

READ_BUFFER: Final = 1 << 20
# Fairness between guests: a read that brought more than MANY_FRAMES frames (a flood of small
# ones) makes the port read at most SMALL_READ bytes at a time until its frames grow again, so
# one callback of a flooding port costs about as much as one of a port moving bulk data, and the
# other ports and host sockets get their turn in between (a 1 MiB read of 60-byte SYNs took
# the core tens of milliseconds).
MANY_FRAMES: Final = 512
SMALL_READ: Final = 32 << 10
WRITE_HIGH_WATER: Final = 4 << 20  # QEMU not reading: stop feeding this port new TCP data
WRITE_LOW_WATER: Final = 1 << 20
WRITE_HARD_LIMIT: Final = 32 << 20  # beyond this, frames for the port are dropped (counted)
# Kernel send buffer of a Unix stream socket toward QEMU. The default (wmem_default, ~208 KiB)
# holds a fifth of the 1 MiB a connection may have in flight toward its guest: writes then end
# short and wait for EPOLLOUT, a wake-up each. Measured host->guest at MTU 1500: 2.0 -> 2.3-2.6
# Gbit/s and less CPU. SO_SNDBUFFORCE (CAP_NET_ADMIN) passes net.core.wmem_max; without it the
# kernel caps SO_SNDBUF there.
UNIX_SNDBUF: Final = 4 << 20
SO_SNDBUFFORCE: Final = 32  # Linux; not in Python's socket module


def enlarge_send_buffer(sock: socket.socket) -> None:
    """Give a Unix stream socket toward QEMU UNIX_SNDBUF bytes of kernel buffer, or what we may."""
    for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UNIX_SNDBUF)
            return
        except OSError:
            continue


class FrameSink(Protocol):
    """What the ports deliver to (the Shell)."""

    def port_opened(self, port: "QemuPort") -> None: ...

    def port_closed(self, port: "QemuPort", reason: str) -> None: ...

    def frames_received(self, port: "QemuPort", frames: list[bytes]) -> None: ...

    def malformed_input(self, port: "QemuPort", reason: str) -> None: ...

    def port_congested(self, port: "QemuPort", congested: bool) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # tests' fake ports
class QemuPort:
    """One QEMU netdev attached to the switch."""

    id: int
    description: str

    def send_frames(self, frames: list[bytes]) -> int:
        """Queue frames toward QEMU; the number dropped (the port is gone or hopelessly behind)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def hold_reading(self, seconds: float) -> None:
        """Read nothing from this QEMU for a while (its guest floods us); a no-op where the
        transport is shared."""

    def direct_written(self) -> None:
        """The TCP engine wrote segments straight into this port's guest memory: signal the guest
        if it asks for it (vhost-user; other ports take no direct writes)."""


class StreamPort(asyncio.BufferedProtocol, QemuPort):
    """A stream connection from (or to) QEMU, read into one large buffer."""

    def __init__(self, sink: FrameSink, port_id: int, description: str) -> None:
        self.sink = sink
        self.id = port_id
        self.description = description
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.small_reads = False
        self.held = False  # reading paused for a while: its guest floods us (hold_reading)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:  # TCP keeps its autotuning
            enlarge_send_buffer(sock)
        peer = transport.get_extra_info("peername")
        if peer:
            self.description = f"{self.description} peer={peer}"
        self.sink.port_opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.end < 65536 + 8:
            # move the partial frame to the front to make room
            remaining = self.end - self.start
            self.buf[0:remaining] = self.buf[self.start : self.end]
            self.start, self.end = 0, remaining
        if self.small_reads:
            return self.view[self.end : self.end + SMALL_READ]
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        frames: list[bytes] = []
        try:
            self.start = split_frames(self.buf, self.start, self.end, frames)
        except FramingError as exc:
            if frames:
                self.sink.frames_received(self, frames)
            self.sink.malformed_input(self, str(exc))
            if self.transport is not None:
                self.transport.abort()
            return
        if frames:
            self.small_reads = len(frames) > (MANY_FRAMES // 4 if self.small_reads else MANY_FRAMES)
            self.sink.frames_received(self, frames)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.port_closed(self, str(exc) if exc else "closed by peer")
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.sink.port_congested(self, True)

    def resume_writing(self) -> None:
        self.sink.port_congested(self, False)

    def send_frames(self, frames: list[bytes]) -> int:
        transport = self.transport
        if transport is None or transport.is_closing():
            return len(frames)
        if transport.get_write_buffer_size() > WRITE_HARD_LIMIT:
            return len(frames)  # QEMU stopped reading: drop rather than grow
        # prefixes and frames as separate buffers: uvloop writes them with one writev, no join
        transport.writelines(frame_parts(frames))
        return 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def hold_reading(self, seconds: float) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.held:
            return
        self.held = True
        transport.pause_reading()
        asyncio.get_running_loop().call_later(seconds, self.release_reading)

    def release_reading(self) -> None:
        self.held = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()


class DgramPeer(QemuPort):
    """One QEMU talking to our datagram socket from its own address."""

    def __init__(self, endpoint: "DgramEndpoint", port_id: int, address: str) -> None:
        self.endpoint = endpoint
        self.id = port_id
        self.address = address
        self.description = f"dgram peer={address!r}"

    def send_frames(self, frames: list[bytes]) -> int:
        transport = self.endpoint.transport
        if transport is None or transport.get_write_buffer_size() > WRITE_HIGH_WATER:  # type: ignore[attr-defined]
            return len(frames)  # datagrams: dropped when QEMU does not keep up
        for i, frame in enumerate(frames):
            try:
                transport.sendto(frame, self.address)
            except OSError as exc:
                ratelog.warning(log, f"dgram-send {self.address}", "dgram send to %s failed: %s", self.address, exc)
                return len(frames) - i
        return 0

    def close(self) -> None:
        self.endpoint.peers.pop(self.address, None)


class DgramEndpoint(asyncio.DatagramProtocol):
    """Our bound Unix datagram socket for `-netdev dgram`."""

    MAX_PEERS: Final = 64

    def __init__(self, sink: FrameSink, next_id: "PortIds", peer: str | None) -> None:
        self.sink = sink
        self.next_id = next_id
        self.fixed_peer = peer
        self.peers: dict[str, DgramPeer] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        if self.fixed_peer is not None:
            self._peer(self.fixed_peer)

    def _peer(self, address: str) -> DgramPeer:
        peer = self.peers.get(address)
        if peer is None:
            if len(self.peers) >= self.MAX_PEERS:
                oldest = next(iter(self.peers.values()))
                self.sink.port_closed(oldest, "too many datagram peers")
                oldest.close()
            peer = DgramPeer(self, self.next_id.take(), address)
            self.peers[address] = peer
            self.sink.port_opened(peer)
        return peer

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not isinstance(addr, str) or not addr:
            if self.fixed_peer is None:
                ratelog.warning(
                    log, "dgram-unbound", "dgram frame from an unbound socket ignored (QEMU must bind local.path)"
                )
                return
            addr = self.fixed_peer
        assert isinstance(addr, str)
        self.sink.frames_received(self._peer(addr), [data])

    def error_received(self, exc: Exception) -> None:
        ratelog.warning(log, "dgram-error", "dgram socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        for peer in list(self.peers.values()):
            self.sink.port_closed(peer, "dgram socket closed")
        self.peers.clear()


class PortIds:
    """Hands out port numbers."""

    def __init__(self) -> None:
        self.last = 0

    def take(self) -> int:
        self.last += 1
        return self.last

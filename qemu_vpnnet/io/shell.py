"""The Shell: runs the core on the event loop, moving frames, socket operations and time."""

import asyncio
import errno
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from qemu_vpnnet.core.actions import HostOp
from qemu_vpnnet.core.stack import NO_DEADLINE, Stack
from qemu_vpnnet.core.switch import TSO_V4, TSO_V6
from qemu_vpnnet.core.vhost_net import NetDevice

if TYPE_CHECKING:
    from qemu_vpnnet.io.capture import Capture
    from qemu_vpnnet.io.dns_upstream import DnsUpstreams
    from qemu_vpnnet.io.host_ping import HostPing
    from qemu_vpnnet.io.host_tcp import HostTcp
    from qemu_vpnnet.io.host_udp import HostUdp
from qemu_vpnnet.io.busy_poll import BusyPoller
from qemu_vpnnet.io.qemu_ports import DgramEndpoint, PortIds, QemuPort, StreamPort
from qemu_vpnnet.io.vhost_user_port import VhostUserListener

log = logging.getLogger("qemu_vpnnet")

EventListener = Callable[[str, dict[str, object]], None]
OpPerformer = Callable[[HostOp], None]
RECONNECT_DELAY: Final = 1.0
# A guest whose frames of one read were refused (over its per-guest limits, core/guard.py) more
# than FLOOD_REFUSALS times floods us: its QEMU is not read for FLOOD_HOLD seconds, so the frames
# it keeps sending wait in its own QEMU (which then drops them) instead of taking our CPU from
# the other guests.
FLOOD_REFUSALS: Final = 128
FLOOD_HOLD: Final = 0.05
FD_RESERVE_MIN: Final = 64  # descriptors kept from the flows' budget: QEMU ports, listeners, DNS, QMP


def host_socket_budget() -> int:
    """How many host sockets the flows may hold: the open-file limit (the soft one raised to the
    hard one first) less a reserve of an eighth, at least FD_RESERVE_MIN."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = hard if hard != resource.RLIM_INFINITY and hard <= 1 << 20 else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - max(FD_RESERVE_MIN, soft // 8))


class StartupError(Exception):
    """A start-up argument cannot be used (the message says why)."""


def prepare_unix_path(path: str) -> None:
    """Make path usable for a listening Unix socket, or raise StartupError.

    A stale socket file (nobody accepting) is removed; a live one is an error, as is any other
    kind of file or a directory we cannot write to.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StartupError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(f"{path}: directory {directory} is not writable")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path}: exists and is not a socket")
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        if _accepting(path, kind):
            raise StartupError(f"{path}: socket is in use by a running process")
    os.unlink(path)


def _accepting(path: str, kind: int) -> bool:
    """Whether a process listens on the Unix socket path with this socket type."""
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.EPROTOTYPE, errno.ECONNREFUSED):
            return False
        raise StartupError(f"{path}: cannot probe socket: {exc}") from exc
    finally:
        probe.close()
    return True


class Shell:
    """Owns the core (Stack) and every QEMU-side port; performs what the core asks for."""

    def __init__(self, stack: Stack, busy_poll: float = 0.0) -> None:
        self.stack = stack
        self.loop = asyncio.get_running_loop()
        self.poller = BusyPoller(self.loop, busy_poll)
        self.bytes_seen = 0  # the stack's rx + tx bytes at the last flush
        self.ports: dict[int, QemuPort] = {}
        self.port_ids = PortIds()
        self.event_listeners: list[EventListener] = []
        self.op_performers: dict[int, OpPerformer] = {}
        # called after each batch of ops: a performer that queued work (io/host_udp.py batches
        # a socket's datagrams into one sendmmsg) completes it there
        self.ops_done: list[Callable[[], None]] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.dgram_transports: list[asyncio.DatagramTransport] = []
        self.vhost_listeners: list[VhostUserListener] = []
        self.unix_paths: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.flush_scheduled = False
        self.timer_handle: asyncio.Handle | None = None
        self.timer_when = 0.0
        # the core's timer, through these two (a test gives its own deadlines)
        self.next_deadline: Callable[[], float] = stack.next_deadline
        self.deadline_passed: Callable[[float], None] = stack.timer
        self.internal_errors = 0
        self.capture: Capture | None = None  # io/capture.py; checked once per batch, not per frame
        # the host-side handlers, set by io.host_side.install_host_side
        self.host_tcp: HostTcp | None = None
        self.host_udp: HostUdp | None = None
        self.host_ping: HostPing | None = None
        self.dns_upstreams: DnsUpstreams | None = None
        stack.guard.set_budget(host_socket_budget())
        self.fd_warned = -1e9  # when running out of descriptors was last logged

    def now(self) -> float:
        return self.loop.time()

    # ---- FrameSink ---------------------------------------------------------------------
    def port_opened(self, port: QemuPort) -> None:
        self.ports[port.id] = port
        self.stack.attach_port(port.id)
        log.info("guest connected: port=%d %s", port.id, port.description)
        self.emit("GUEST_CONNECTED", {"port": port.id, "transport": port.description})

    def port_closed(self, port: QemuPort, reason: str) -> None:
        if self.ports.pop(port.id, None) is None:
            return
        closed = self.stack.detach_port(port.id)
        flows = ", ".join(f"{count} {kind}" for kind, count in closed.items() if count)
        log.info(
            "guest disconnected: port=%d %s (%s); %s",
            port.id,
            port.description,
            reason,
            f"its flows closed: {flows}" if flows else "no flows were open",
        )
        self.schedule_flush()
        self.emit("GUEST_DISCONNECTED", {"port": port.id, "transport": port.description, "reason": reason})

    def malformed_input(self, port: QemuPort, reason: str) -> None:
        self.stack.counters.add("drop-malformed-stream")
        log.error("port %d (%s): %s; dropping this connection", port.id, port.description, reason)

    def port_offloads(self, port: QemuPort, tso4: bool, tso6: bool) -> None:
        """port's guest NIC takes large TCP segments (vhost-user GUEST_TSO4/6), or no longer does."""
        self.stack.switch.set_tso(port.id, (TSO_V4 if tso4 else 0) | (TSO_V6 if tso6 else 0))

    def port_direct(self, port: QemuPort, device: NetDevice) -> None:
        """TCP segments toward port's guest may be written straight into device's RX ring."""
        self.stack.switch.set_direct(port.id, device)

    def port_congested(self, port: QemuPort, congested: bool) -> None:
        """QEMU is not reading fast enough (or caught up): hold (or resume) TCP data toward it."""
        self.stack.port_congested(port.id, congested, self.loop.time())
        if not congested:
            self.schedule_flush()

    def frames_received(self, port: QemuPort, frames: list[bytes]) -> None:
        stack = self.stack
        now = self.loop.time()
        port_id = port.id
        if self.capture is not None:
            try:
                self.capture.frames_in(port_id, frames)
            except Exception:
                self.internal_error("capture")
        for frame in frames:
            try:
                stack.frame_received(port_id, frame, now)
            except Exception:
                self.internal_error(f"frame from port {port_id}")
        guard = stack.guard
        if guard.batch_refusals:
            if guard.batch_refusals > FLOOD_REFUSALS:
                stack.counters.add("port-flood-holds")
                port.hold_reading(FLOOD_HOLD)
            guard.batch_refusals = 0
        # at once, not on the next turn of the loop: a read from QEMU carries a whole batch of
        # frames already, and the turn saved is latency (measured: round trip 234 -> 181 us)
        self.flush()

    def internal_error(self, what: str) -> None:
        self.internal_errors += 1
        self.stack.counters.add("internal-errors")
        if self.internal_errors <= 20 or self.internal_errors % 1000 == 0:
            log.exception("internal error handling %s (count %d)", what, self.internal_errors)

    # ---- output ------------------------------------------------------------------------
    def schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write queued frames, perform queued ops, deliver events, re-arm the timer."""
        self.flush_scheduled = False
        stack = self.stack
        try:
            stack.flush(self.loop.time())
        except Exception:
            self.internal_error("flush")
        for _round in range(8):
            # host socket operations first: a guest's request reaches its server before the
            # guest gets the ACK for it
            if stack.out.ops:
                ops = list(stack.out.ops)
                stack.out.ops.clear()
                for op in ops:
                    performer = self.op_performers.get(op.kind)
                    if performer is None:
                        log.debug("no performer for %r", op)
                        continue
                    try:
                        performer(op)
                    except Exception:
                        self.internal_error(repr(op))
                for done in self.ops_done:
                    try:
                        done()
                    except Exception:
                        self.internal_error("ops")
            out = stack.out.switch.out
            if self.capture is not None:
                try:
                    self.capture.frames_out(out)
                except Exception:
                    self.internal_error("capture")
            for port_id, frames in list(out.items()):  # a port may leave while we write
                if frames and port_id in out:
                    out[port_id] = []
                    port = self.ports.get(port_id)
                    if port is not None:
                        try:
                            dropped = port.send_frames(frames)
                        except Exception:
                            self.internal_error(f"frames to port {port_id}")
                            continue
                        if dropped:
                            stack.counters.add("drop-port-congested", dropped)
            # vhost-user guests whose RX rings took TCP segments straight in: signal them
            for port_id, device in list(stack.out.switch.direct.items()):
                if device.rx_mark >= 0:
                    port = self.ports.get(port_id)
                    if port is not None:
                        try:
                            port.direct_written()
                        except Exception:
                            self.internal_error(f"signal to port {port_id}")
            if stack.out.events:
                events = list(stack.out.events)
                stack.out.events.clear()
                for name, data in events:
                    self.emit(name, data)
            if not stack.out.ops and not stack.switch.pending() and not stack.out.events:
                break
        else:
            self.schedule_flush()  # still more: another turn of the loop, after other work
        try:
            self.arm_timer()
        except Exception:
            self.internal_error("timer")
        counters = stack.counters
        seen = counters.rx_bytes + counters.tx_bytes
        self.poller.activity(seen - self.bytes_seen)
        self.bytes_seen = seen

    def out_of_descriptors(self, what: str, exc: OSError) -> None:
        """EMFILE/ENFILE from a host socket: logged once per interval."""
        now = self.now()
        if now - self.fd_warned < 10.0:
            return
        self.fd_warned = now
        guard = self.stack.guard
        log.warning(
            "out of file descriptors (%s: %s); flows hold %d host sockets (budget %d); "
            "sockets are taken from the guest holding the most",
            what,
            os.strerror(exc.errno) if exc.errno else exc,
            guard.sockets,
            guard.fd_budget,
        )

    def emit(self, name: str, data: dict[str, object]) -> None:
        if name == "GUEST_LEASE":
            log.info("lease: %s -> %s", data.get("mac"), data.get("address"))
        elif name == "GUEST_LIMIT":
            log.warning(
                "guest %s: %s (%s so far; it holds %s connections, %s connecting, %s datagram flows; "
                "host sockets %s of %s); logged once per 10 s",
                data.get("mac"),
                data.get("reason"),
                data.get("count"),
                data.get("tcp"),
                data.get("pending"),
                data.get("datagram-flows"),
                data.get("host-sockets"),
                data.get("budget"),
            )
        for listener in list(self.event_listeners):
            try:
                listener(name, data)
            except Exception:
                log.exception("event listener failed")

    def arm_timer(self) -> None:
        """Make the one timer fire at the core's next deadline (not later, not needlessly earlier).

        The time it is set for is kept here: uvloop's call_at returns a plain Handle, with no
        when(), for a deadline already past.
        """
        deadline = self.next_deadline()
        if deadline == NO_DEADLINE:
            return
        handle = self.timer_handle
        if handle is not None and not handle.cancelled() and self.timer_when <= deadline + 0.001:
            return
        if handle is not None:
            handle.cancel()
        self.timer_when = deadline
        self.timer_handle = self.loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        self.timer_handle = None
        try:
            self.deadline_passed(self.loop.time())
        except Exception:
            self.internal_error("timer")
        self.flush()

    # ---- transports --------------------------------------------------------------------
    async def listen_unix(self, path: str) -> None:
        prepare_unix_path(path)
        server = await self.loop.create_unix_server(
            lambda: StreamPort(self, self.port_ids.take(), f"stream unix={path}"), path
        )
        self.servers.append(server)
        self.unix_paths.append(path)

    def listen_vhost_user(self, path: str, offloads: bool = True, unsealed_ok: bool = False) -> None:
        """Serve QEMU's vhost-user netdev on a Unix socket (io/vhost_user_port.py)."""
        prepare_unix_path(path)
        listener = VhostUserListener(self, self.port_ids, path, offloads, unsealed_ok)
        try:
            listener.start()
        except OSError as exc:
            listener.close()
            raise StartupError(f"--vhost-user {path}: {exc.strerror or exc}") from exc
        self.vhost_listeners.append(listener)
        self.unix_paths.append(path)

    async def listen_tcp(self, host: str, port: int) -> None:
        try:
            server = await self.loop.create_server(
                lambda: StreamPort(self, self.port_ids.take(), f"socket tcp={host}:{port}"),
                host,
                port,
                reuse_address=True,
            )
        except OSError as exc:
            raise StartupError(f"--listen-tcp {host}:{port}: {exc.strerror or exc}") from exc
        self.servers.append(server)

    async def open_dgram(self, path: str, peer: str | None) -> None:
        prepare_unix_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise StartupError(f"--dgram {path}: {exc.strerror or exc}") from exc
        # uvloop takes a Unix datagram socket only ready-made (sock=), not as local_addr
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: DgramEndpoint(self, self.port_ids, peer), sock=sock
        )
        self.dgram_transports.append(transport)
        self.unix_paths.append(path)

    def connect_unix(self, path: str) -> None:
        """Connect to a QEMU that listens (`server=on`), and reconnect whenever it goes away."""
        task = self.loop.create_task(self._connect_loop(path))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect_loop(self, path: str) -> None:
        warned = False
        while True:
            try:
                _, protocol = await self.loop.create_unix_connection(
                    lambda: StreamPort(self, self.port_ids.take(), f"stream connect={path}"), path
                )
            except OSError as exc:
                if not warned:
                    log.warning("cannot connect to QEMU at %s: %s; retrying every %.0fs", path, exc, RECONNECT_DELAY)
                    warned = True
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            warned = False
            assert isinstance(protocol, StreamPort)
            await protocol.closed
            await asyncio.sleep(RECONNECT_DELAY / 4)

    async def close(self) -> None:
        if self.capture is not None:
            from qemu_vpnnet.io.capture import stop_capture

            await stop_capture(self)
        if self.host_tcp is not None:
            self.host_tcp.close_all()
        if self.host_udp is not None:
            self.host_udp.close_all()
        if self.host_ping is not None:
            self.host_ping.close_all()
        if self.dns_upstreams is not None:
            self.dns_upstreams.close()
        for task in list(self.tasks):
            task.cancel()
        for server in self.servers:
            server.close()
        for port in list(self.ports.values()):
            port.close()
        for transport in self.dgram_transports:
            transport.close()
        for listener in self.vhost_listeners:
            listener.close()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except TimeoutError:
                pass
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # after --user: a directory that user may not write to
                log.warning("cannot remove %s: %s", path, exc.strerror or exc)
        if self.timer_handle is not None:
            self.timer_handle.cancel()

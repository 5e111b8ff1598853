"""The QMP server: QEMU's Machine Protocol on Unix or TCP sockets, for qemu.qmp, qmp-shell and ctl.

The wire protocol is QEMU's (docs/interop/qmp-spec): on connect the server sends its greeting; the
client must first run `qmp_capabilities` (until then every other command fails with
CommandNotFound); then each `{"execute": NAME, "arguments": {...}, "id": ID}` gets one
`{"return": VALUE, "id": ID}` or `{"error": {"class": ..., "desc": ...}, "id": ID}`, in order, and
asynchronous events `{"event": NAME, "data": {...}, "timestamp": {...}}` go to every negotiated
client. Every message we send is one JSON object followed by "\\r\\n".

Bounded: a message over 1 MiB is answered with a parse error and skipped (up to the next newline);
a client that does not read its events is disconnected once 4 MiB of them are waiting.
"""

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from qemu_vpnnet.control.qmp_commands import (
    GENERIC,
    NOT_FOUND,
    Command,
    Context,
    QmpError,
    command_table,
    greeting,
    validate,
)
from qemu_vpnnet.control.qmp_hmp import HMP_COMMAND
from qemu_vpnnet.control.qmp_json import JsonParseError, JsonStreamer, JsonTooLong, JsonValue, Parsed
from qemu_vpnnet.io.shell import StartupError, prepare_unix_path

if TYPE_CHECKING:
    from qemu_vpnnet.io.forwards import Forwarder
    from qemu_vpnnet.io.policy_control import Policy
    from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.qmp")

READ_SIZE: Final = 65536
MAX_OUTPUT: Final = 4 << 20  # bytes of unsent output after which a client is dropped
CLOSE_TIMEOUT: Final = 2.0
QEMU_SOCKET_OPTIONS: Final = ("server", "server=on", "wait=off", "nowait")


def encode(message: dict[str, object]) -> bytes:
    return json.dumps(message, default=str).encode() + b"\r\n"


def error_message(desc: str, error_class: str = GENERIC) -> dict[str, object]:
    return {"error": {"class": error_class, "desc": desc}}


def event_message(name: str, data: dict[str, object]) -> dict[str, object]:
    now = time.time()
    seconds = int(now)
    return {
        "event": name,
        "data": data,
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
    }


def parse_spec(spec: str) -> tuple[str, str, int]:
    """`unix:PATH` as ("unix", PATH, 0), `tcp:HOST:PORT` as ("tcp", HOST, PORT); StartupError otherwise.

    QEMU's `,server=on,wait=off` (or `,server,nowait`) suffixes are accepted and ignored; an empty
    or bracketed HOST works as on QEMU's command line, except that empty means 127.0.0.1.
    """
    text = spec
    while True:
        head, comma, option = text.rpartition(",")
        if comma and option in QEMU_SOCKET_OPTIONS:
            text = head
        else:
            break
    kind, colon, rest = text.partition(":")
    if kind == "unix" and colon and rest:
        return "unix", rest, 0
    if kind == "tcp" and colon:
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit() and int(port) <= 65535:
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            host = host or "127.0.0.1"
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise StartupError(f"--qmp {spec}: {host!r} is not an IP address") from exc
            return "tcp", host, int(port)
    raise StartupError(f"--qmp {spec}: expected unix:PATH or tcp:HOST:PORT")


class QmpServer:
    """Listeners and client sessions of the QMP control plane; forwards the shell's events."""

    def __init__(
        self, shell: "Shell", forwarder: "Forwarder", stop: asyncio.Event, policy: "Policy | None" = None
    ) -> None:
        from qemu_vpnnet.io.policy_control import Policy

        self.shell = shell
        self.forwarder = forwarder
        self.policy = policy if policy is not None else Policy(shell)
        self.stop = stop
        self.commands: dict[str, Command] = command_table()
        self.commands[HMP_COMMAND.name] = HMP_COMMAND
        self.servers: list[asyncio.AbstractServer] = []
        self.unix_paths: list[tuple[str, int]] = []  # (path, inode) of the sockets we created
        self.addresses: list[str] = []  # where we listen, as unix:PATH / tcp:HOST:PORT
        self.sessions: set[QmpSession] = set()
        self.shutdown_reason = "host-signal"
        self.closed = False
        shell.event_listeners.append(self.on_event)

    # ---- listeners ---------------------------------------------------------------------
    async def listen(self, spec: str) -> None:
        kind, where, port = parse_spec(spec)
        if kind == "unix":
            await self._listen_unix(spec, where)
        else:
            await self._listen_tcp(spec, where, port)

    async def _listen_unix(self, spec: str, path: str) -> None:
        try:
            prepare_unix_path(path)
        except StartupError as exc:
            raise StartupError(f"--qmp {spec}: {exc}") from exc
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created mode 0600: QMP has no authentication
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"--qmp {spec}: cannot bind {path}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)
        try:
            os.chmod(path, 0o600)
            inode = os.stat(path).st_ino
            sock.listen(16)
            sock.setblocking(False)
            server = await asyncio.start_unix_server(self._accepted, sock=sock)
        except OSError as exc:
            sock.close()
            os.unlink(path)
            raise StartupError(f"--qmp {spec}: {exc.strerror or exc}") from exc
        self.servers.append(server)
        self.unix_paths.append((path, inode))
        self.addresses.append(f"unix:{path}")
        log.info("QMP listening on unix:%s", path)

    async def _listen_tcp(self, spec: str, host: str, port: int) -> None:
        try:
            server = await asyncio.start_server(self._accepted, host, port, reuse_address=True)
        except OSError as exc:  # asyncio's strerror repeats the address: keep only the reason
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise StartupError(f"--qmp {spec}: cannot listen on {host}:{port}: {reason}") from exc
        self.servers.append(server)
        for sock in server.sockets:
            addr = sock.getsockname()
            bound = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            self.addresses.append(f"tcp:{bound}:{addr[1]}")
            log.info("QMP listening on tcp:%s:%d", bound, addr[1])
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("QMP on %s:%d is reachable from the network and has no authentication", host, port)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closed:
            writer.close()
            return
        session = QmpSession(self, reader, writer)
        self.sessions.add(session)
        try:
            await session.run()
        except asyncio.CancelledError:
            pass  # close() gave up waiting for this client; nobody awaits this task's result
        finally:
            self.sessions.discard(session)

    # ---- events ------------------------------------------------------------------------
    def on_event(self, name: str, data: dict[str, object]) -> None:
        """A shell or forwarder event: to every client past capabilities negotiation."""
        if not self.sessions:
            return
        payload = encode(event_message(name, data))
        for session in list(self.sessions):
            if session.negotiated:
                session.write(payload)

    def quit(self) -> None:
        """`quit` was executed: the backend stops (after the reply went out)."""
        self.shutdown_reason = "host-qmp-quit"
        self.stop.set()

    # ---- shutdown ----------------------------------------------------------------------
    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.on_event in self.shell.event_listeners:
            self.shell.event_listeners.remove(self.on_event)
        for server in self.servers:
            server.close()
        shutdown = encode(event_message("SHUTDOWN", {"guest": False, "reason": self.shutdown_reason}))
        tasks = []
        for session in list(self.sessions):
            if session.negotiated:
                session.write(shutdown)
            session.writer.close()  # sends what is buffered, then closes
            if session.task is not None:
                tasks.append(session.task)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in pending:
                task.cancel()
            for session in list(self.sessions):
                session.writer.transport.abort()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)
            except TimeoutError:
                pass
        self.servers.clear()
        for path, inode in self.unix_paths:
            try:
                if os.stat(path).st_ino == inode:  # not a socket someone else created since
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # after --user: a directory that user may not write to
                log.warning("cannot remove %s: %s", path, exc.strerror or exc)
        self.unix_paths.clear()


class QmpSession:
    """One client connection: greeting, negotiation, then commands in order."""

    def __init__(self, server: QmpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.streamer = JsonStreamer()
        self.negotiated = False
        self.task = asyncio.current_task()
        self.peer = str(writer.get_extra_info("peername") or "unix client")

    def write(self, payload: bytes) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            return
        self.writer.write(payload)
        if transport.get_write_buffer_size() > MAX_OUTPUT:
            log.warning("QMP client %s does not read its messages; disconnecting it", self.peer)
            transport.abort()

    async def send(self, message: dict[str, object]) -> None:
        self.write(encode(message))
        try:
            await self.writer.drain()
        except ConnectionError:
            pass

    async def run(self) -> None:
        log.debug("QMP client connected: %s", self.peer)
        try:
            await self.send(greeting())
            while not self.writer.transport.is_closing():
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                for item in self.streamer.feed(data):
                    await self.handle(item)
        except (ConnectionError, OSError) as exc:
            log.debug("QMP client %s: %s", self.peer, exc)
        finally:
            self.writer.close()
            log.debug("QMP client disconnected: %s", self.peer)

    async def handle(self, item: Parsed) -> None:
        if isinstance(item, (JsonParseError, JsonTooLong)):
            await self.send(error_message(item.message))
            return
        assert isinstance(item, JsonValue)
        request = item.value
        if not isinstance(request, dict):
            await self.send(error_message("QMP input must be a JSON object"))
            return
        after_reply: list[Callable[[], None]] = []
        reply = await self.execute(request, after_reply)
        if "id" in request:
            reply["id"] = request["id"]
        await self.send(reply)
        for action in after_reply:
            action()

    async def execute(self, request: dict[str, object], after_reply: list[Callable[[], None]]) -> dict[str, object]:
        """The reply (without id) to one request object; after_reply gets what to do once it is sent."""
        for member, value in request.items():
            if member == "execute":
                if not isinstance(value, str):
                    return error_message("QMP input member 'execute' must be a string")
            elif member == "arguments":
                if not isinstance(value, dict):
                    return error_message("QMP input member 'arguments' must be an object")
            elif member != "id":
                return error_message(f"QMP input member '{member}' is unexpected")
        name = request.get("execute")
        if not isinstance(name, str):
            return error_message("Expected 'execute' in QMP input")
        arguments = request.get("arguments", {})
        assert isinstance(arguments, dict)
        if not self.negotiated:
            if name != "qmp_capabilities":
                return error_message("Expecting capabilities negotiation with 'qmp_capabilities'", NOT_FOUND)
        elif name == "qmp_capabilities":
            return error_message("Capabilities negotiation is already complete, command ignored", NOT_FOUND)
        command = self.server.commands.get(name)
        if command is None:
            return error_message(f"The command {name} has not been found", NOT_FOUND)
        server = self.server
        ctx = Context(
            server.shell, server.forwarder, server.stop, server.commands, server.quit, after_reply, server.policy
        )
        try:
            value = await command.handler(ctx, validate(command, arguments))
        except QmpError as exc:
            return error_message(exc.desc, exc.error_class)
        except Exception as exc:
            log.exception("QMP command %s failed", name)
            return error_message(f"internal error in {name}: {exc}")
        if name == "qmp_capabilities":
            self.negotiated = True
        return {"return": value}

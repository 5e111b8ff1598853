"""The QMP server in-process: a real Stack, Shell and Forwarder, driven by qemu.qmp's QMPClient and by
raw sockets. Forwards are real: they bind loopback ports, which the tests check by binding them."""

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.message import Message

from qemu_vpnnet.control import qmp_server
from qemu_vpnnet.control.qmp_json import MAX_MESSAGE
from qemu_vpnnet.control.qmp_server import QmpServer
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io.forwards import Forwarder
from qemu_vpnnet.io.host_tcp import HostTcp
from qemu_vpnnet.io.shell import Shell, StartupError

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, "package": "qemu-vpnnet 0.1.0"},
        "capabilities": [],
    }
}
TIMEOUT = 10.0


class Raw:
    """A QMP connection by hand: bytes out, one "\\r\\n"-terminated JSON object at a time in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        assert line.endswith(b"\r\n"), line
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, request: dict[str, object]) -> dict[str, Any]:
        await self.send(json.dumps(request).encode() + b"\n")
        return await self.recv()

    async def nothing_more(self, wait: float = 0.2) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.reader.readline(), wait)


class Env:
    """One backend's control plane on a Unix socket in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "qmp.sock")
        self.shell = Shell(Stack(NetConfig()))
        self.shell.host_tcp = HostTcp(self.shell)
        self.forwarder = Forwarder(self.shell)
        self.stop = asyncio.Event()
        self.server = QmpServer(self.shell, self.forwarder, self.stop)
        self.clients: list[QMPClient] = []
        self.raws: list[Raw] = []

    async def client(self) -> QMPClient:
        client = QMPClient("test")
        await asyncio.wait_for(client.connect(self.path), TIMEOUT)
        self.clients.append(client)
        return client

    async def raw(self, negotiate: bool = False) -> Raw:
        reader, writer = await asyncio.open_unix_connection(self.path)
        raw = Raw(reader, writer)
        self.raws.append(raw)
        assert await raw.recv() == GREETING
        if negotiate:
            assert await raw.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
        return raw

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.disconnect()
        for raw in self.raws:
            raw.writer.close()
        await self.server.close()
        await self.forwarder.close()
        await self.shell.close()


def run(tmp_path: Path, test: Callable[[Env], Awaitable[None]]) -> None:
    async def main() -> None:
        env = Env(tmp_path)
        try:
            await env.server.listen(f"unix:{env.path}")
            await asyncio.wait_for(test(env), 60)
        finally:
            await env.close()
        assert not os.path.exists(env.path)

    uvloop.run(main())


async def error_of(client: QMPClient, name: str, arguments: dict[str, object] | None = None) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as info:
        await client.execute(name, arguments)
    return info.value.error_class, str(info.value)


def port_is_free(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[None]:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield
    finally:
        writer.close()


# ---- protocol -----------------------------------------------------------------------------------


def test_greeting_negotiation_and_ids(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        raw = await env.raw()
        before = await raw.cmd({"execute": "query-version", "id": "x1"})
        assert before == {
            "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
            "id": "x1",
        }
        assert await raw.cmd({"execute": "qmp_capabilities", "id": 7}) == {"return": {}, "id": 7}
        again = await raw.cmd({"execute": "qmp_capabilities", "arguments": {}, "id": [1, {"a": None}]})
        assert again["error"]["class"] == "CommandNotFound"
        assert again["id"] == [1, {"a": None}]
        version = await raw.cmd({"execute": "query-version"})
        assert version == {"return": GREETING["QMP"]["version"]}  # no id asked, none given
        # Several commands in one write are answered in order.
        await raw.send(b'{"execute": "query-stats", "id": 1}{"execute": "query-leases", "id": 2}\r\n')
        assert [(await raw.recv())["id"], (await raw.recv())["id"]] == [1, 2]

    run(tmp_path, test)


def test_capabilities_cannot_enable_oob(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        raw = await env.raw()
        reply = await raw.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
        assert reply == {"error": {"class": "GenericError", "desc": "Capability 'oob' not available"}}
        assert await raw.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    run(tmp_path, test)


def test_qmp_client_commands(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        assert client.greeting is not None
        assert client.greeting.QMP.version == GREETING["QMP"]["version"]
        assert list(client.greeting.QMP.capabilities) == []
        assert await client.execute("query-version") == GREETING["QMP"]["version"]
        commands = await client.execute("query-commands")
        assert isinstance(commands, list)
        names = [c["name"] for c in commands]
        for name in (
            "qmp_capabilities",
            "query-version",
            "query-commands",
            "quit",
            "hostfwd-add",
            "hostfwd-remove",
            "query-hostfwd",
            "query-leases",
            "query-connections",
            "query-stats",
            "human-monitor-command",
        ):
            assert name in names
        assert await client.execute("query-leases") == []
        assert await client.execute("query-connections") == []
        stats = await client.execute("query-stats")
        assert {k: stats[k] for k in ("counters", "guests", "tcp-connections", "host-sockets")} == {
            "counters": {},
            "guests": 0,
            "tcp-connections": 0,
            "host-sockets": 0,
        }

    run(tmp_path, test)


def test_bad_requests_on_a_raw_socket(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        raw = await env.raw(negotiate=True)
        await raw.send(b'{"execute": query-version}\r\n')
        error = await raw.recv()
        assert set(error) == {"error"} and error["error"]["class"] == "GenericError"
        assert error["error"]["desc"].startswith("JSON parse error, ")
        await raw.send(b"{bad json\n}\n")
        assert (await raw.recv())["error"]["desc"].startswith("JSON parse error, ")
        cases: list[tuple[object, str]] = [
            ([1, 2], "QMP input must be a JSON object"),
            ("query-version", "QMP input must be a JSON object"),
            ({"arguments": {}}, "Expected 'execute' in QMP input"),
            ({"execute": 42}, "QMP input member 'execute' must be a string"),
            ({"execute": "query-version", "arguments": []}, "QMP input member 'arguments' must be an object"),
            ({"exec-oob": "query-version"}, "QMP input member 'exec-oob' is unexpected"),
            ({"execute": "query-version", "extra": 1}, "QMP input member 'extra' is unexpected"),
        ]
        for request, desc in cases:
            await raw.send(json.dumps(request).encode() + b"\r\n")
            assert await raw.recv() == {"error": {"class": "GenericError", "desc": desc}}, request
        # Still connected and working.
        assert (await raw.cmd({"execute": "query-version", "id": 5}))["id"] == 5

    run(tmp_path, test)


def test_ten_megabyte_line_is_refused_and_the_server_goes_on(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        other = await env.client()
        raw = await env.raw(negotiate=True)
        chunk = b"x" * (1 << 20)
        raw.writer.write(b'{"execute": "query-version", "arguments": {"junk": "')
        for _ in range(10):
            raw.writer.write(chunk)
            await raw.writer.drain()
            # The session holds at most about one message's worth, never the whole line.
            for session in env.server.sessions:
                assert session.streamer.pending() <= MAX_MESSAGE + qmp_server.READ_SIZE
        await raw.send(b'"}}\r\n')
        error = await raw.recv()
        assert error["error"]["class"] == "GenericError"
        assert "longer than" in error["error"]["desc"]
        after = await raw.cmd({"execute": "query-stats", "id": "after"})
        assert after["id"] == "after" and after["return"]["counters"] == {} and after["return"]["guests"] == 0
        assert await other.execute("query-version") == GREETING["QMP"]["version"]

    run(tmp_path, test)


def test_argument_errors(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        assert await error_of(client, "foo") == ("CommandNotFound", "The command foo has not been found")
        generic: list[tuple[str, dict[str, object], str]] = [
            ("hostfwd-remove", {}, "Parameter 'host-port' is missing"),
            ("hostfwd-add", {"guest-port": 22}, "Parameter 'host-port' is missing"),
            ("hostfwd-add", {"host-port": 0}, "Parameter 'guest-port' is missing"),
            (
                "hostfwd-add",
                {"host-port": "8080", "guest-port": 22},
                "Invalid parameter type for 'host-port', expected: integer",
            ),
            (
                "hostfwd-add",
                {"host-port": True, "guest-port": 22},
                "Invalid parameter type for 'host-port', expected: integer",
            ),
            ("hostfwd-add", {"rule": 5}, "Invalid parameter type for 'rule', expected: string"),
            (
                "hostfwd-remove",
                {"host-port": 1, "close-connections": "yes"},
                "Invalid parameter type for 'close-connections', expected: boolean",
            ),
            ("hostfwd-add", {"host-port": 0, "guest-port": 22, "foo": 1}, "Parameter 'foo' is unexpected"),
            ("query-version", {"verbose": True}, "Parameter 'verbose' is unexpected"),
            (
                "hostfwd-add",
                {"host-port": 70000, "guest-port": 22},
                "Parameter 'host-port' expects a port number between 0 and 65535",
            ),
            (
                "hostfwd-add",
                {"host-port": 0, "guest-port": 0},
                "Parameter 'guest-port' expects a port number between 1 and 65535",
            ),
            (
                "hostfwd-add",
                {"rule": "tcp::0-:22", "host-port": 1},
                "Parameters 'rule' and 'host-port' are mutually exclusive",
            ),
            ("human-monitor-command", {}, "Parameter 'command-line' is missing"),
        ]
        for name, arguments, desc in generic:
            assert await error_of(client, name, arguments) == ("GenericError", desc), (name, arguments)
        assert await client.execute("query-hostfwd") == []

    run(tmp_path, test)


# ---- forwards -----------------------------------------------------------------------------------


def test_hostfwd_add_list_remove_binds_and_frees_the_port(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        added = await client.execute("hostfwd-add", {"rule": "tcp::0-:22"})
        assert isinstance(added, dict)
        port = added["host-port"]
        assert isinstance(port, int) and port > 0
        assert added["protocol"] == "tcp" and added["host-addr"] == "127.0.0.1"
        assert added["guest-addr"] == "" and added["guest-port"] == 22
        assert added["rule"] == f"tcp:127.0.0.1:{port}-:22"
        assert await client.execute("query-hostfwd") == [added]
        assert not port_is_free(port)
        async with connected(port):  # somebody listens there (no guest: the connection is reset)
            pass
        removed = await client.execute("hostfwd-remove", {"host-port": port})
        assert isinstance(removed, dict) and removed["rule"] == added["rule"]
        assert await client.execute("query-hostfwd") == []
        assert port_is_free(port)

    run(tmp_path, test)


def test_hostfwd_structured_arguments_and_udp(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        tcp = await client.execute(
            "hostfwd-add",
            {"protocol": "tcp", "host-addr": "127.0.0.1", "host-port": 0, "guest-addr": "10.0.2.15", "guest-port": 80},
        )
        udp = await client.execute("hostfwd-add", {"protocol": "udp", "host-port": 0, "guest-port": 53})
        assert isinstance(tcp, dict) and isinstance(udp, dict)
        assert tcp["guest-addr"] == "10.0.2.15" and tcp["guest-port"] == 80
        assert udp["protocol"] == "udp" and udp["host-addr"] == "127.0.0.1"
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", udp["host-port"]))
        probe.close()
        assert len(await client.execute("query-hostfwd")) == 2  # type: ignore[arg-type]
        await client.execute(
            "hostfwd-remove",
            {"protocol": "udp", "host-addr": "127.0.0.1", "host-port": udp["host-port"], "close-connections": True},
        )
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", udp["host-port"]))
        probe.close()
        assert await client.execute("query-hostfwd") == [tcp]

    run(tmp_path, test)


def test_hostfwd_failures(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        try:
            klass, desc = await error_of(client, "hostfwd-add", {"host-port": busy_port, "guest-port": 22})
            assert klass == "GenericError" and "address already in use" in desc.lower() and str(busy_port) in desc
            klass, desc = await error_of(client, "hostfwd-add", {"rule": f"tcp::{busy_port}-:22"})
            assert "address already in use" in desc.lower()
        finally:
            busy.close()
        cases = [
            ({"host-addr": "localhost", "host-port": 0, "guest-port": 22}, "bad host address 'localhost'"),
            (
                {"guest-addr": "10.0.2", "host-port": 0, "guest-port": 22},
                "bad guest address '10.0.2' (IPv4 or IPv6 expected)",
            ),
            ({"protocol": "sctp", "host-port": 0, "guest-port": 22}, "protocol must be tcp or udp, not 'sctp'"),
            ({"guest-addr": "192.168.1.5", "host-port": 0, "guest-port": 22}, "not a guest address"),
            ({"rule": "tcp:8080:22"}, "Invalid host forwarding rule 'tcp:8080:22' (missing '-'"),
        ]
        for arguments, text in cases:
            klass, desc = await error_of(client, "hostfwd-add", arguments)  # type: ignore[arg-type]
            assert klass == "GenericError" and text in desc, (arguments, desc)
        klass, desc = await error_of(client, "hostfwd-remove", {"host-port": 5555})
        assert (klass, desc) == ("GenericError", "no tcp forward from 127.0.0.1:5555")
        added = await client.execute("hostfwd-add", {"rule": "tcp::0-:22"})
        assert isinstance(added, dict)
        klass, desc = await error_of(client, "hostfwd-add", {"host-port": added["host-port"], "guest-port": 23})
        assert "exists already" in desc
        assert await client.execute("query-hostfwd") == [added]

    run(tmp_path, test)


# ---- events -------------------------------------------------------------------------------------


async def next_event(client: QMPClient) -> Message:
    return await asyncio.wait_for(client.events.get(), TIMEOUT)


def test_events_reach_every_negotiated_client(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        first = await env.client()
        second = await env.client()
        raw = await env.raw(negotiate=True)
        unnegotiated = await env.raw()
        added = await first.execute("hostfwd-add", {"rule": "tcp::0-:22"})
        for client in (first, second):
            event = await next_event(client)
            assert event["event"] == "HOSTFWD_ADDED" and event["data"] == added
        raw_event = await raw.recv()
        assert set(raw_event) == {"event", "data", "timestamp"}
        assert set(raw_event["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= raw_event["timestamp"]["microseconds"] < 1_000_000
        lease = {"mac": "52:54:00:12:34:56", "address": "10.0.2.15", "hostname": "guest", "lease-time": 86400}
        env.shell.emit("GUEST_LEASE", lease)
        env.shell.emit("GUEST_CONNECTED", {"port": 1, "transport": "stream unix=/x"})
        for client in (first, second):
            assert (await next_event(client))["data"] == lease
            assert (await next_event(client))["event"] == "GUEST_CONNECTED"
        assert (await raw.recv())["event"] == "GUEST_LEASE"
        assert (await raw.recv())["event"] == "GUEST_CONNECTED"
        await unnegotiated.nothing_more()

    run(tmp_path, test)


def test_a_client_that_does_not_read_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(qmp_server, "MAX_OUTPUT", 64 << 10)

    async def test(env: Env) -> None:
        raw = await env.raw(negotiate=True)
        transport = cast(asyncio.Transport, raw.writer.transport)  # uvloop's is not an asyncio subclass
        transport.pause_reading()
        for _ in range(2000):
            env.shell.emit("GUEST_LEASE", {"mac": "52:54:00:12:34:56", "address": "10.0.2.15", "x": "y" * 200})
            await asyncio.sleep(0)
        for _ in range(100):
            if not env.server.sessions:
                break
            await asyncio.sleep(0.05)
        assert not env.server.sessions
        assert "does not read its messages; disconnecting it" in caplog.text
        other = await env.client()
        assert await other.execute("query-leases") == []

    run(tmp_path, test)


# ---- quit, HMP ----------------------------------------------------------------------------------


def test_quit_answers_then_stops_and_close_says_shutdown(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        watcher = await env.client()
        raw = await env.raw(negotiate=True)
        assert await raw.cmd({"execute": "quit", "id": "q"}) == {"return": {}, "id": "q"}
        await asyncio.wait_for(env.stop.wait(), TIMEOUT)
        await env.server.close()
        event = await next_event(watcher)
        assert event["event"] == "SHUTDOWN"
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert (await raw.recv())["event"] == "SHUTDOWN"
        assert await raw.reader.read() == b""  # the server hung up

    run(tmp_path, test)


def test_human_monitor_command(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()

        async def hmp(line: str) -> object:
            return await client.execute("human-monitor-command", {"command-line": line})

        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        assert await hmp(f"hostfwd_add vnet tcp::{port}-:22") == ""
        assert not port_is_free(port)
        assert "TCP[HOST_FORWARD]" in str(await hmp("info usernet"))
        assert await hmp(f"hostfwd_remove vnet tcp::{port}") == f"host forwarding rule for tcp::{port} removed\r\n"
        assert port_is_free(port)
        assert await hmp(f"hostfwd_remove tcp::{port}") == f"host forwarding rule for tcp::{port} not found\r\n"
        assert await hmp("hostfwd_add tcp:8080:22") == (
            "Invalid host forwarding rule 'tcp:8080:22' (missing '-' between host and guest side in 'tcp:8080:22')\r\n"
        )
        assert await hmp("hostfwd_remove nonsense") == "invalid format\r\n"
        assert await hmp("frobnicate") == "unknown command: 'frobnicate'\r\n"
        help_text = str(await hmp("help"))
        assert help_text.endswith("\r\n") and "hostfwd_add" in help_text and "hostfwd_remove" in help_text
        assert "info usernet" in str(await hmp("info"))
        assert await hmp("info version") == "0.1.0 (qemu-vpnnet)\r\n"

    run(tmp_path, test)


# ---- listening ----------------------------------------------------------------------------------


def test_unix_socket_is_private_and_removed_on_close(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        mode = os.stat(env.path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        second = QmpServer(env.shell, env.forwarder, env.stop)
        try:
            with pytest.raises(StartupError, match="in use by a running process"):
                await second.listen(f"unix:{env.path}")
        finally:
            await second.close()
        assert os.path.exists(env.path)  # a failed listen does not remove another server's socket

    run(tmp_path, test)


def test_stale_socket_is_replaced_and_tcp_listening(tmp_path: Path) -> None:
    async def main() -> None:
        shell = Shell(Stack(NetConfig()))
        forwarder = Forwarder(shell)
        stale = tmp_path / "stale.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(stale))
        dead.close()  # the file stays; nobody accepts
        server = QmpServer(shell, forwarder, asyncio.Event())
        try:
            await server.listen(f"unix:{stale},server=on,wait=off")
            await server.listen("tcp:127.0.0.1:0")
            assert server.addresses[0] == f"unix:{stale}"
            tcp = server.addresses[1]
            host, port = tcp.removeprefix("tcp:").rsplit(":", 1)
            client = QMPClient("tcp")
            await client.connect((host, int(port)))
            assert await client.execute("query-hostfwd") == []
            await client.disconnect()
            with pytest.raises(StartupError, match="Address already in use"):
                await server.listen(f"tcp:127.0.0.1:{port}")
            for bad in ("tcp:nowhere:1", "tcp:127.0.0.1:99999", "unix:", "/plain/path", "udp:1.2.3.4:5"):
                with pytest.raises(StartupError, match="--qmp"):
                    await server.listen(bad)
            with pytest.raises(StartupError, match="does not exist"):
                await server.listen(f"unix:{tmp_path}/missing/q.sock")
            (tmp_path / "file").write_text("x")
            with pytest.raises(StartupError, match="not a socket"):
                await server.listen(f"unix:{tmp_path}/file")
        finally:
            await server.close()
            await forwarder.close()
            await shell.close()
        assert not stale.exists()
        assert (tmp_path / "file").exists()

    uvloop.run(main())

"""Unit tests of `qemu-vpnnet attach/detach` against a fake QMP server (no QEMU)."""

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from qemu_vpnnet.integrations import attach as at
from qemu_vpnnet.integrations.procutil import IntegrationError, check_unix_listener, unix_listening_in_proc


class FakeQemu:
    """Just enough QMP: greeting, qmp_capabilities, query-version, netdev_add/del, device_add/del."""

    def __init__(self, version: tuple[int, int, int] = (7, 2, 0)) -> None:
        self.version = version
        self.netdevs: set[str] = set()
        self.devices: set[str] = set()
        self.commands: list[str] = []
        self.device_add_error: str | None = None
        self.connect_ok = True
        self.release_devices = True

    @staticmethod
    async def messages(reader: asyncio.StreamReader) -> Any:
        """JSON objects as they arrive (qemu.qmp sends them without separators)."""
        decoder = json.JSONDecoder()
        buffer = ""
        while data := await reader.read(4096):
            buffer += data.decode()
            while buffer.strip():
                try:
                    msg, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break
                buffer = buffer.lstrip()[end:]
                yield msg

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(obj: dict[str, Any]) -> None:
            writer.write(json.dumps(obj).encode() + b"\r\n")

        major, minor, micro = self.version
        send({"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""},
                      "capabilities": ["oob"]}})  # fmt: skip
        async for msg in self.messages(reader):
            cmd, args, mid = msg["execute"], msg.get("arguments", {}), msg.get("id")
            self.commands.append(cmd)
            ret: Any = {}
            err: str | None = None
            event: dict[str, Any] | None = None
            if cmd == "query-version":
                ret = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}
            elif cmd == "netdev_add":
                if args["id"] in self.netdevs:
                    err = f"Duplicate ID '{args['id']}' for netdev"
                else:
                    self.netdevs.add(args["id"])
                    if self.connect_ok:
                        event = {"event": "NETDEV_STREAM_CONNECTED", "data": {"netdev-id": args["id"]}}
            elif cmd == "netdev_del":
                if args["id"] not in self.netdevs:
                    err = f"Device '{args['id']}' not found"
                self.netdevs.discard(args["id"])
            elif cmd == "device_add":
                if self.device_add_error:
                    err = self.device_add_error
                else:
                    self.devices.add(args["id"])
            elif cmd == "device_del":
                if args["id"] not in self.devices:
                    err = f"Device '{args['id']}' not found"
                elif self.release_devices:
                    self.devices.discard(args["id"])
                    event = {"event": "DEVICE_DELETED", "data": {"device": args["id"], "path": "/x"}}
            elif cmd == "human-monitor-command":
                ret = "".join(f" \\ {n}: index=0,type=stream,connection error\r\n" for n in self.netdevs)
            reply: dict[str, Any] = {"error": {"class": "GenericError", "desc": err}} if err else {"return": ret}
            if mid is not None:
                reply["id"] = mid
            send(reply)
            if event:
                send({"timestamp": {"seconds": 0, "microseconds": 0}, **event})
            await writer.drain()
        writer.close()


@pytest.fixture
def backend_socket(tmp_path: Path) -> Any:
    path = tmp_path / "b.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    yield str(path)
    s.close()


async def with_fake(fake: FakeQemu, tmp_path: Path, coro_factory: Any) -> Any:
    qmp = str(tmp_path / "qmp.sock")
    server = await asyncio.start_unix_server(fake.serve, qmp)
    try:
        return await coro_factory(qmp)
    finally:
        server.close()


def test_parse_qmp_address() -> None:
    assert at.parse_qmp_address("unix:/run/q.sock") == "/run/q.sock"
    assert at.parse_qmp_address("unix:/run/q.sock,server=on,wait=off") == "/run/q.sock"
    assert at.parse_qmp_address("/run/q.sock") == "/run/q.sock"
    assert at.parse_qmp_address("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert at.parse_qmp_address("tcp:[::1]:4444") == ("::1", 4444)
    with pytest.raises(IntegrationError):
        at.parse_qmp_address("tcp:host")


def test_version_check() -> None:
    at.check_version((7, 2, 0))
    at.check_version((8, 0, 0))
    with pytest.raises(IntegrationError, match=r"QEMU 7.1.0 is too old"):
        at.check_version((7, 1, 0))


def test_attach_then_detach(tmp_path: Path, backend_socket: str) -> None:
    fake = FakeQemu()
    added = asyncio.run(
        with_fake(fake, tmp_path, lambda q: at.attach(q, backend_socket, "net1", "52:54:00:00:00:05", timeout=3))
    )
    assert added == {"netdev": "net1", "device": "net1-nic", "mac": "52:54:00:00:00:05", "socket": backend_socket}
    assert fake.netdevs == {"net1"} and fake.devices == {"net1-nic"}
    removed = asyncio.run(with_fake(fake, tmp_path, lambda q: at.detach(q, "net1", timeout=3)))
    assert removed == ["net1-nic", "net1"]
    assert fake.netdevs == set() and fake.devices == set()


def test_attach_rolls_back_the_netdev_when_device_add_fails(tmp_path: Path, backend_socket: str) -> None:
    fake = FakeQemu()
    fake.device_add_error = "Bus 'pci.0' does not support hotplugging"
    with pytest.raises(IntegrationError, match=r"device_add: Bus 'pci.0' does not support hotplugging"):
        asyncio.run(with_fake(fake, tmp_path, lambda q: at.attach(q, backend_socket, "net1", timeout=3)))
    assert fake.netdevs == set()
    assert fake.commands[-1] == "netdev_del"


def test_attach_reports_duplicate_id_and_old_qemu(tmp_path: Path, backend_socket: str) -> None:
    fake = FakeQemu()
    fake.netdevs.add("net1")
    with pytest.raises(IntegrationError, match="netdev_add: Duplicate ID 'net1'"):
        asyncio.run(with_fake(fake, tmp_path, lambda q: at.attach(q, backend_socket, "net1", timeout=3)))
    assert fake.netdevs == {"net1"}  # not rolled back: it was not ours
    old = FakeQemu(version=(7, 1, 0))
    with pytest.raises(IntegrationError, match="too old"):
        asyncio.run(with_fake(old, tmp_path, lambda q: at.attach(q, backend_socket, "net1", timeout=3)))
    assert "netdev_add" not in old.commands


def test_attach_rolls_back_when_qemu_cannot_connect(tmp_path: Path, backend_socket: str) -> None:
    fake = FakeQemu()
    fake.connect_ok = False
    with pytest.raises(IntegrationError, match=r"could not connect .*connection error"):
        asyncio.run(with_fake(fake, tmp_path, lambda q: at.attach(q, backend_socket, "n", timeout=1.5)))
    assert fake.netdevs == set()


def test_detach_times_out_when_the_guest_keeps_the_device(tmp_path: Path) -> None:
    fake = FakeQemu()
    fake.netdevs.add("net1")
    fake.devices.add("net1-nic")
    fake.release_devices = False
    with pytest.raises(IntegrationError, match=r"did not release the device within 0.5 s"):
        asyncio.run(with_fake(fake, tmp_path, lambda q: at.detach(q, "net1", timeout=0.5)))
    assert fake.netdevs == {"net1"}


def test_detach_of_a_netdev_without_device(tmp_path: Path) -> None:
    fake = FakeQemu()
    fake.netdevs.add("net1")
    assert asyncio.run(with_fake(fake, tmp_path, lambda q: at.detach(q, "net1", timeout=1))) == ["net1"]
    with pytest.raises(IntegrationError, match="device_del: Device 'net1-nic' not found"):
        asyncio.run(with_fake(fake, tmp_path, lambda q: at.detach(q, "net1", timeout=1)))


def test_monitor_errors_are_one_line(tmp_path: Path, backend_socket: str) -> None:
    with pytest.raises(IntegrationError, match=r"cannot connect to the QEMU monitor unix:/nonexistent/q.sock"):
        asyncio.run(at.attach("/nonexistent/q.sock", backend_socket, timeout=1))


def test_listener_checks(tmp_path: Path, backend_socket: str) -> None:
    assert unix_listening_in_proc(backend_socket) is True
    check_unix_listener(backend_socket)
    with pytest.raises(IntegrationError, match="no backend socket"):
        check_unix_listener(str(tmp_path / "none.sock"))
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(IntegrationError, match="nobody listens"):
        check_unix_listener(str(stale))
    (tmp_path / "file").write_text("")
    with pytest.raises(IntegrationError, match="not a socket"):
        check_unix_listener(str(tmp_path / "file"))

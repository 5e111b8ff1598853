"""`qemu-vpnnet ctl` and qemu.qmp's qmp-shell against a QmpServer running in a thread of this process."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from qemu_vpnnet.control import ctl
from qemu_vpnnet.control.qmp_server import QmpServer
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io.forwards import Forwarder
from qemu_vpnnet.io.host_tcp import HostTcp
from qemu_vpnnet.io.shell import Shell

REPO = Path(__file__).resolve().parent.parent


class BackendThread:
    """Shell + Forwarder + QmpServer on their own event loop, until stopped or told to quit."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "qmp.sock")
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.shell: Shell | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            uvloop.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        shell = Shell(Stack(NetConfig()))
        shell.host_tcp = HostTcp(shell)
        self.shell = shell
        forwarder = Forwarder(shell)
        server = QmpServer(shell, forwarder, self.stop)
        try:
            await server.listen(f"unix:{self.path}")
            self.ready.set()
            await self.stop.wait()
        finally:
            await server.close()
            await forwarder.close()
            await shell.close()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10)
        if self.error is not None:
            raise self.error

    def emit(self, name: str, data: dict[str, object]) -> None:
        assert self.loop is not None and self.shell is not None
        self.loop.call_soon_threadsafe(self.shell.emit, name, data)

    def close(self) -> None:
        if self.loop is not None and self.stop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BackendThread]:
    thread = BackendThread(tmp_path)
    thread.start()
    yield thread
    thread.close()


def run_ctl(backend: BackendThread, *args: str) -> int:
    return ctl.main(["ctl", "--qmp", f"unix:{backend.path}", *args])


def port_is_free(port: int) -> bool:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def test_version(backend: BackendThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(backend, "version") == 0
    assert capsys.readouterr().out == "qemu-vpnnet 0.1.0\n"
    assert run_ctl(backend, "version", "--json") == 0
    assert json.loads(capsys.readouterr().out)["qemu"] == {"major": 0, "minor": 1, "micro": 0}


def test_hostfwd_add_list_remove(backend: BackendThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(backend, "--json", "hostfwd", "add", "tcp::0-:80", "udp::0-10.0.2.15:53") == 0
    added = json.loads(capsys.readouterr().out)
    tcp_port = added[0]["host-port"]
    assert added[0]["rule"] == f"tcp:127.0.0.1:{tcp_port}-:80"
    assert added[1]["protocol"] == "udp" and added[1]["guest-addr"] == "10.0.2.15"
    assert not port_is_free(tcp_port)

    assert run_ctl(backend, "hostfwd", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PROTO", "HOST", "GUEST", "CONNECTIONS", "ACCEPTED", "REFUSED"]
    assert lines[1].split()[:3] == ["tcp", f"127.0.0.1:{tcp_port}", "(first"]
    assert lines[2].split()[:3] == ["udp", f"127.0.0.1:{added[1]['host-port']}", "10.0.2.15:53"]

    assert run_ctl(backend, "hostfwd", "remove", f"tcp::{tcp_port}", "--close-connections") == 0
    assert capsys.readouterr().out == f"removed tcp:127.0.0.1:{tcp_port}-:80\n"
    assert port_is_free(tcp_port)
    assert run_ctl(backend, "hostfwd", "list", "--json") == 0
    assert [f["protocol"] for f in json.loads(capsys.readouterr().out)] == ["udp"]

    assert run_ctl(backend, "hostfwd", "add", "tcp::0-:22") == 0
    assert capsys.readouterr().out.startswith("added tcp:127.0.0.1:")


def test_command_errors_exit_1(backend: BackendThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(backend, "hostfwd", "remove", "tcp::5555") == 1
    assert capsys.readouterr().err == "qemu-vpnnet ctl: hostfwd-remove: no tcp forward from 127.0.0.1:5555\n"
    assert run_ctl(backend, "hostfwd", "add", "tcp:8080:80") == 1
    assert "Invalid host forwarding rule 'tcp:8080:80'" in capsys.readouterr().err
    assert run_ctl(backend, "exec", "no-such-command") == 1
    err = capsys.readouterr().err
    assert err == "qemu-vpnnet ctl: no-such-command: CommandNotFound: The command no-such-command has not been found\n"
    assert run_ctl(backend, "hostfwd", "remove", "8080") == 2
    assert "expected [tcp|udp]:[hostaddr]:hostport" in capsys.readouterr().err
    assert run_ctl(backend, "exec", "query-version", "{not json") == 2
    assert run_ctl(backend, "exec", "query-version", "[1]") == 2


def test_connection_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.sock"
    assert ctl.main(["ctl", "--qmp", f"unix:{missing}", "stats"]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"qemu-vpnnet ctl: cannot connect to unix:{missing}: No such file or directory")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    assert ctl.main(["ctl", "--qmp", f"unix:{tmp_path}/dead.sock", "stats"]) == 3
    assert "Connection refused" in capsys.readouterr().err
    monkeypatch.delenv(ctl.ENV_QMP, raising=False)
    assert ctl.main(["ctl", "stats"]) == 2
    assert "give --qmp" in capsys.readouterr().err
    assert ctl.main(["ctl", "--qmp", "tcp:localhost", "stats"]) == 2
    with pytest.raises(SystemExit) as info:
        ctl.main(["ctl", "--qmp", f"unix:{missing}", "frobnicate"])
    assert info.value.code == 2


def test_environment_variable_and_queries(
    backend: BackendThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ctl.ENV_QMP, f"unix:{backend.path}")
    assert ctl.main(["ctl", "leases"]) == 0
    assert capsys.readouterr().out == "no leases\n"
    assert ctl.main(["ctl", "connections"]) == 0
    assert capsys.readouterr().out == "no connections\n"
    assert ctl.main(["ctl", "stats"]) == 0
    assert capsys.readouterr().out.startswith("guests: 0\ntcp-connections: 0\n")
    assert ctl.main(["ctl", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {k: stats[k] for k in ("counters", "guests", "tcp-connections")} == {
        "counters": {},
        "guests": 0,
        "tcp-connections": 0,
    }
    assert stats["host-sockets"] == 0 and stats["guest-usage"] == []
    assert ctl.main(["ctl", "hmp", "info", "version"]) == 0
    assert capsys.readouterr().out == "0.1.0 (qemu-vpnnet)\n"
    assert ctl.main(["ctl", "exec", "hostfwd-add", '{"host-port": 0, "guest-port": 22}']) == 0
    assert json.loads(capsys.readouterr().out)["guest-port"] == 22


def test_watch(backend: BackendThread, capsys: pytest.CaptureFixture[str]) -> None:
    results: list[int] = []
    watcher = threading.Thread(
        target=lambda: results.append(
            run_ctl(backend, "watch", "--count", "2", "--timeout", "20", "--event", "GUEST_LEASE")
        )
    )
    watcher.start()
    lease = {"mac": "52:54:00:12:34:56", "address": "10.0.2.15", "hostname": "", "lease-time": 86400}
    for _ in range(200):  # until the watcher is connected: it sees events only from then on
        backend.emit("GUEST_CONNECTED", {"port": 1, "transport": "test"})
        backend.emit("GUEST_LEASE", lease)
        watcher.join(0.05)
        if not watcher.is_alive():
            break
    watcher.join(10)
    assert results == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        event = json.loads(line)
        assert event["event"] == "GUEST_LEASE" and event["data"] == lease and "timestamp" in event
    assert run_ctl(backend, "watch", "--timeout", "0.3") == 0
    assert run_ctl(backend, "watch", "--count", "1", "--timeout", "0.3", "--event", "NOTHING") == 1


def test_quit_stops_the_backend(backend: BackendThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(backend, "quit") == 0
    assert capsys.readouterr().out == "backend stopping\n"
    backend.thread.join(10)
    assert not backend.thread.is_alive()
    assert not os.path.exists(backend.path)


def qmp_shell(backend: BackendThread, commands: str, *options: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "qemu.qmp.qmp_shell", *options, backend.path],
        input=commands,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_qmp_shell(backend: BackendThread) -> None:
    out = qmp_shell(backend, "query-version\nhostfwd-add rule=tcp::0-:22\nquery-hostfwd\nfoo\n")
    assert "Connected to QEMU 0.1.0" in out
    replies = [json.loads(line.removeprefix("(QEMU) ")) for line in out.splitlines() if line.startswith("(QEMU) {")]
    assert replies[0] == {"return": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "qemu-vpnnet 0.1.0"}}
    port = replies[1]["return"]["host-port"]
    assert replies[2] == {"return": [replies[1]["return"]]}
    assert replies[3]["error"] == {"class": "CommandNotFound", "desc": "The command foo has not been found"}
    out = qmp_shell(backend, f"hostfwd-remove host-port={port}\nquery-hostfwd\n", "-p")
    assert '"return": []' in out
    assert port_is_free(port)


def test_hmp_shell(backend: BackendThread) -> None:
    out = qmp_shell(backend, "hostfwd_add tcp::0-:22\ninfo usernet\nhostfwd_remove tcp::1\n", "-H")
    assert "TCP[HOST_FORWARD]" in out
    assert "host forwarding rule for tcp::1 not found" in out


def test_policy_and_guestfwd_commands(backend: BackendThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ctl(backend, "policy", "add", "refuse tcp 192.0.2.0/24:22 id=ssh", "direct udp *:53") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "added refuse tcp 192.0.2.0/24:22 id=ssh"
    assert out[1].startswith("added direct udp *:53 id=qmp")
    assert run_ctl(backend, "policy", "add", "--position", "0", "refuse icmp * id=noping") == 0
    capsys.readouterr()
    assert run_ctl(backend, "policy", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "restrict: off, allow-metadata: off"
    assert lines[1].split() == ["ID", "ORIGIN", "HITS", "RULE"]
    ids = [line.split()[0] for line in lines[2:]]
    assert ids[:4] == ["metadata", "metadata6", "noping", "ssh"] and ids[4].startswith("qmp") and len(ids) == 5
    assert run_ctl(backend, "policy", "remove", "ssh") == 0
    assert capsys.readouterr().out == "removed refuse tcp 192.0.2.0/24:22 id=ssh\n"
    assert run_ctl(backend, "policy", "remove", "ssh") == 1
    assert capsys.readouterr().err == "qemu-vpnnet ctl: policy-rule-remove: no rule with id 'ssh'\n"
    assert run_ctl(backend, "policy", "add", "block *") == 1
    assert "unknown action 'block'" in capsys.readouterr().err
    assert run_ctl(backend, "--json", "policy", "set", "--restrict", "on") == 0
    assert json.loads(capsys.readouterr().out)["restrict"] is True

    assert run_ctl(backend, "guestfwd", "add", "tcp:10.0.2.100:1234-tcp:127.0.0.1:5000", "tcp:10.0.2.2:23-cmd:cat") == 0
    assert capsys.readouterr().out.splitlines() == [
        "added tcp:10.0.2.100:1234-tcp:127.0.0.1:5000",
        "added tcp:10.0.2.2:23-cmd:cat",
    ]
    assert run_ctl(backend, "guestfwd", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SERVICE", "CONNECTIONS"] and lines[2].split() == ["tcp:10.0.2.2:23-cmd:cat", "0"]
    assert run_ctl(backend, "guestfwd", "remove", "tcp:10.0.2.100:1234") == 0
    assert capsys.readouterr().out == "removed tcp:10.0.2.100:1234-tcp:127.0.0.1:5000\n"
    assert run_ctl(backend, "guestfwd", "remove", "10.0.2.100") == 2
    assert "expected tcp|udp:ADDR:PORT" in capsys.readouterr().err

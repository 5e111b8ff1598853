"""Packet capture of the real backend: ``--pcap FILE`` from the start, and QMP capture-start /
capture-stop at run time (qemu.qmp's QMPClient), with a namespace guest that pings and fetches a
page from the gateway; the files are read back with tcpdump, as a user would.

The HTTP server runs in this test process on the host's 127.0.0.1 (the guest's 10.0.2.2); no
traffic leaves the machine.
"""

from __future__ import annotations

import asyncio
import http.server
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from integration.fixtures import NsGuestFactory, StartBackend
from integration.nsguest import NsGuest

GATEWAY = "10.0.2.2"


@pytest.fixture
def web() -> Iterator[int]:
    """A web server on 127.0.0.1; its port."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def tcpdump(path: Path) -> list[str]:
    result = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def qmp(path: Path, command: str, arguments: dict[str, object] | None = None) -> object:
    async def call() -> object:
        client = QMPClient("capture-test")
        await asyncio.wait_for(client.connect(str(path)), 10)
        try:
            return await client.execute(command, arguments)
        finally:
            await client.disconnect()

    return asyncio.run(call())


def traffic(guest: NsGuest, port: int) -> None:
    ping = guest.run(["busybox", "ping", "-c", "2", "-W", "2", GATEWAY], timeout=20)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    page = guest.run(["curl", "-sS", "--max-time", "10", f"http://{GATEWAY}:{port}/"], timeout=20)
    assert page.returncode == 0, page.stderr
    assert page.stdout == "hello from the host\n"


def assert_both_directions(path: Path, guest_ip: str, port: int) -> None:
    """tcpdump shows the ping and the page's connection both ways; the page's bytes are in the file."""
    text = "\n".join(tcpdump(path))
    assert re.search(rf"IP {guest_ip} > {GATEWAY}: ICMP echo request", text), text
    assert re.search(rf"IP {GATEWAY} > {guest_ip}: ICMP echo reply", text), text
    assert re.search(rf"IP {guest_ip}\.\d+ > {GATEWAY}\.{port}: Flags \[S\]", text), text
    assert re.search(rf"IP {GATEWAY}\.{port} > {guest_ip}\.\d+: Flags \[S\.\]", text), text
    assert re.search(rf"IP {guest_ip}\.\d+ > {GATEWAY}\.{port}: Flags \[P\.\], seq 1:", text), text
    assert re.search(rf"IP {GATEWAY}\.{port} > {guest_ip}\.\d+: Flags \[P\.\], seq 1:", text), text
    raw = path.read_bytes()
    assert b"GET / HTTP/1.1" in raw and b"hello from the host" in raw


def test_pcap_from_the_start_has_dhcp_ping_and_tcp_both_ways(
    start_backend: StartBackend, ns_guest: NsGuestFactory, web: int, tmp_path: Path
) -> None:
    pcap = tmp_path / "start.pcap"
    backend = start_backend("--pcap", str(pcap))
    guest = ns_guest(backend=backend, ipv6=False)
    lease = guest.dhcp()
    traffic(guest, web)
    assert backend.stop() == 0  # SIGTERM: the capture is written out and closed
    assert_both_directions(pcap, lease["ip"], web)
    text = "\n".join(tcpdump(pcap))
    assert "BOOTP/DHCP, Request" in text and "BOOTP/DHCP, Reply" in text
    assert re.search(rf"ARP, Reply {GATEWAY} is-at", text), text


def test_capture_started_and_stopped_over_qmp(
    start_backend: StartBackend, ns_guest: NsGuestFactory, web: int, tmp_path: Path, vpnnet_run_dir: Path
) -> None:
    qmp_path = vpnnet_run_dir / f"cap-{tmp_path.name[-20:]}.qmp"
    # tmp_path is no directory the sandbox leaves writable by itself (docs/security.rst)
    backend = start_backend("--qmp", f"unix:{qmp_path}", "--writable", str(tmp_path))
    guest = ns_guest(backend=backend, ipv6=False)
    lease = guest.dhcp()
    assert qmp(qmp_path, "query-capture") == {"active": False}
    everything = tmp_path / "all.pcap"
    started = qmp(qmp_path, "capture-start", {"file": str(everything), "mac": guest.mac})
    assert isinstance(started, dict) and started["active"] is True
    traffic(guest, web)
    stopped = qmp(qmp_path, "capture-stop")
    assert isinstance(stopped, dict) and stopped["active"] is False and stopped["dropped"] == 0
    assert_both_directions(everything, lease["ip"], web)
    assert len(tcpdump(everything)) == stopped["frames"]

    only_icmp = tmp_path / "icmp.pcap"
    qmp(qmp_path, "capture-start", {"file": str(only_icmp), "filter": "icmp host " + GATEWAY, "snaplen": 64})
    traffic(guest, web)
    info = qmp(qmp_path, "query-capture")
    assert isinstance(info, dict) and info["active"] is True and info["filter"] == f"icmp host {GATEWAY}"
    qmp(qmp_path, "capture-stop")
    lines = tcpdump(only_icmp)
    assert len(lines) == 4 and all(" ICMP echo " in line for line in lines), lines
    traffic(guest, web)  # after the stop nothing more is written
    assert len(tcpdump(only_icmp)) == 4
    assert backend.stop() == 0

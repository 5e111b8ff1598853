"""DNS through the host's resolver, zones, split upstreams, DNS over TCP and zones over QMP.

Every backend runs inside an NsHost "host" namespace whose /etc/hosts and resolv.conf the test
wrote (``ns_host(hosts=..., resolv_conf=...)``): host mode asks that namespace's resolver
library, never this machine's. Its resolv.conf names a dnsmasq the test runs in the outside
namespace (198.18.0.2), which knows corp.test names the hosts file does not (and answers
NXDOMAIN for the rest of corp.test); a second dnsmasq on 198.19.8.8 serves split.test. The
guest is a namespace guest asking with dig (bind9-dnsutils) at the DNS address.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from integration.backend import Backend
from integration.common import wait_until
from integration.fixtures import NsGuestFactory, NsHostFactory, StartBackend
from integration.netns import Netns
from integration.nsguest import NsGuest
from integration.nshost import NsHost

DNS = "10.0.2.3"
GATEWAY = "10.0.2.2"
OUTSIDE = "198.18.0.2"
SPLIT_SERVER = "198.19.8.8"

HOSTS = """127.0.0.1 localhost
::1 localhost
198.18.0.77 intranet.corp.test
2001:db8::77 intranet.corp.test
198.18.0.78 v4only.corp.test
"""

CORP_RECORDS = (
    "--local=/corp.test/",  # names of corp.test and zone.test it does not know: NXDOMAIN
    "--local=/zone.test/",
    "--address=/dnsonly.corp.test/198.18.5.5",  # A only: AAAA is NODATA
    "--host-record=both.corp.test,198.18.5.6,2001:db8::6",
    "--mx-host=corp.test,mail.corp.test,10",
    "--txt-record=txt.corp.test,hello from dnsmasq",
)
SPLIT_RECORDS = (
    "--local=/split.test/",
    "--address=/split.test/198.18.9.9",
    "--txt-record=txt.split.test,split answer",
)

pytestmark = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v dnsmasq && command -v dig"], capture_output=True).returncode != 0,
    reason="needs dnsmasq (dnsmasq-base) and dig (bind9-dnsutils): scripts/install-deps",
)


@dataclass
class Answer:
    status: str
    records: list[tuple[str, str, int]]  # (type, data, ttl)

    def data(self, rtype: str) -> list[str]:
        return [data for kind, data, _ in self.records if kind == rtype]


@dataclass
class World:
    host: NsHost
    backend: Backend
    guest: NsGuest
    tmp: Path
    dnsmasq_logs: dict[str, Path]

    def dig(self, name: str, rtype: str = "A", *options: str) -> Answer:
        """Ask the backend's DNS address from the guest with dig."""
        cmd = ["dig", f"@{DNS}", "+time=4", "+tries=1", "+noall", "+comments", "+answer", *options, name, rtype]
        result = self.guest.run(cmd, timeout=20)
        status = re.search(r"status: ([A-Z]+)", result.stdout)
        assert status, f"dig {name} {rtype}: {result.stdout} {result.stderr}"
        records = []
        for line in result.stdout.splitlines():
            fields = line.split(None, 4)
            if line.startswith(";") or len(fields) < 5:
                continue
            records.append((fields[3], fields[4].strip('"'), int(fields[1])))
        return Answer(status.group(1), records)

    def queries_seen(self, server: str) -> str:
        """What the dnsmasq at server logged (query lines)."""
        return "\n".join(line for line in self.dnsmasq_logs[server].read_text().splitlines() if "query[" in line)


def start_dnsmasq(ns: Netns, address: str, records: tuple[str, ...], tmp: Path) -> Path:
    log = tmp / f"dnsmasq-{address}.log"
    cmd = [
        "dnsmasq", "-k", "--conf-file=/dev/null", "-u", "root", "-p", "53",
        f"--listen-address={address}", "--bind-interfaces", "--no-resolv", "--no-hosts",
        f"--pid-file={tmp / f'dnsmasq-{address}.pid'}", "--log-queries", "--log-facility=-", *records,
    ]  # fmt: skip
    with open(log, "wb") as out:
        ns.popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    assert wait_until(lambda: "started, version" in log.read_text(), 10), log.read_text()
    return log


@pytest.fixture
def world(
    ns_host: NsHostFactory,
    start_backend: StartBackend,
    ns_guest: NsGuestFactory,
    tmp_path: Path,
) -> Iterator[Callable[..., World]]:
    def make(*backend_args: str, split: bool = False) -> World:
        host = ns_host(hosts=HOSTS, resolv_conf=f"nameserver {OUTSIDE}\n")
        logs = {OUTSIDE: start_dnsmasq(host.outside, OUTSIDE, CORP_RECORDS, tmp_path)}
        if split:
            host.add_outside_address(f"{SPLIT_SERVER}/32")
            logs[SPLIT_SERVER] = start_dnsmasq(host.outside, SPLIT_SERVER, SPLIT_RECORDS, tmp_path)
        backend = start_backend("-v", *backend_args, netns=host.host.name)
        guest = ns_guest(backend=backend)
        lease = guest.dhcp()
        assert lease["dns"] == DNS
        return World(host, backend, guest, tmp_path, logs)

    yield make


# ---- host mode ------------------------------------------------------------------------------


def test_host_mode_answers_from_the_hosts_file_and_the_host_resolver(world: Callable[..., World]) -> None:
    w = world()  # host mode is the default
    a = w.dig("intranet.corp.test")
    assert (a.status, a.data("A")) == ("NOERROR", ["198.18.0.77"])
    assert [ttl for _, _, ttl in a.records] == [30]  # HOST_TTL: getaddrinfo gives none
    aaaa = w.dig("Intranet.Corp.Test", "AAAA")
    assert (aaaa.status, aaaa.data("AAAA")) == ("NOERROR", ["2001:db8::77"])
    # a name only the DNS server knows, through getaddrinfo
    assert w.dig("dnsonly.corp.test").data("A") == ["198.18.5.5"]
    assert w.dig("both.corp.test", "AAAA").data("AAAA") == ["2001:db8::6"]
    # NODATA (the name exists, not with that family) is not NXDOMAIN
    for name in ("v4only.corp.test", "dnsonly.corp.test"):
        nodata = w.dig(name, "AAAA")
        assert (nodata.status, nodata.records) == ("NOERROR", []), name
    nx = w.dig("nope.corp.test")
    assert (nx.status, nx.records) == ("NXDOMAIN", [])
    # other types are forwarded to the resolv.conf server as they are
    assert w.dig("corp.test", "MX").data("MX") == ["10 mail.corp.test."]
    assert w.dig("txt.corp.test", "TXT").data("TXT") == ["hello from dnsmasq"]
    seen = w.queries_seen(OUTSIDE)
    assert "query[MX] corp.test" in seen and "query[TXT] txt.corp.test" in seen
    assert "intranet.corp.test" not in seen  # /etc/hosts answered it
    # the virtual addresses' names, both ways
    assert w.dig("gateway.internal").data("A") == [GATEWAY]
    assert w.dig("2.2.0.10.in-addr.arpa", "PTR").data("PTR") == ["gateway.internal."]
    assert w.dig("3.2.0.10.in-addr.arpa", "PTR").data("PTR") == ["dns.internal."]


def test_dns_over_tcp_gives_the_same_answers_in_host_mode(world: Callable[..., World]) -> None:
    w = world("--dns-zone", "app.zone.test=192.0.2.10")
    for name, rtype in (
        ("intranet.corp.test", "A"),
        ("intranet.corp.test", "AAAA"),
        ("v4only.corp.test", "AAAA"),
        ("nope.corp.test", "A"),
        ("corp.test", "MX"),
        ("app.zone.test", "A"),
        ("gateway.internal", "A"),
    ):
        udp = w.dig(name, rtype)
        tcp = w.dig(name, rtype, "+tcp")
        assert (tcp.status, tcp.records) == (udp.status, udp.records), (name, rtype)
    assert w.dig("intranet.corp.test", "A", "+tcp").data("A") == ["198.18.0.77"]
    assert w.backend.log_text().count("DNS over TCP") == 0  # no session failed


@pytest.mark.parametrize("args", [("--dns-mode", "forward"), ("--dns-upstream", OUTSIDE)])
def test_forward_mode_does_not_see_the_hosts_file(world: Callable[..., World], args: tuple[str, ...]) -> None:
    """--dns-mode forward, or a plain --dns-upstream (which implies it): every query goes to the
    DNS server, which does not know the hosts file's names."""
    w = world(*args)
    assert w.dig("intranet.corp.test").status == "NXDOMAIN"
    assert w.dig("dnsonly.corp.test").data("A") == ["198.18.5.5"]
    assert "query[A] intranet.corp.test" in w.queries_seen(OUTSIDE)
    w.backend.wait_for_log(r"DNS mode forward")


def test_dns_mode_host_with_a_plain_upstream(world: Callable[..., World]) -> None:
    w = world("--dns-upstream", OUTSIDE, "--dns-mode", "host")
    assert w.dig("intranet.corp.test").data("A") == ["198.18.0.77"]
    assert w.dig("txt.corp.test", "TXT").data("TXT") == ["hello from dnsmasq"]


# ---- zones ----------------------------------------------------------------------------------


def test_zones_from_the_command_line_and_a_watched_zone_file(world: Callable[..., World], tmp_path: Path) -> None:
    zone_file = tmp_path / "zones.txt"
    zone_file.write_text("# lab names\nlab.zone.test 192.0.2.30 2001:db8::30\n")
    w = world(
        "--dns-zone",
        "app.zone.test=192.0.2.10",
        "--dns-zone",
        "app.zone.test=192.0.2.11",
        "--dns-zone",
        "*.wild.zone.test=2001:db8::20",
        "--dns-zone",
        "intranet.corp.test=192.0.2.99",  # a zone beats the host's resolver
        "--dns-zone-file",
        str(zone_file),
    )
    assert w.dig("APP.zone.test").data("A") == ["192.0.2.10", "192.0.2.11"]
    assert w.dig("app.zone.test").records[0][2] == 60
    empty = w.dig("app.zone.test", "AAAA")
    assert (empty.status, empty.records) == ("NOERROR", [])
    assert w.dig("a.b.wild.zone.test", "AAAA").data("AAAA") == ["2001:db8::20"]
    assert w.dig("a.b.wild.zone.test", "A").records == []
    assert w.dig("wild.zone.test").status == "NXDOMAIN"  # not below itself: host resolver, then DNS
    assert w.dig("intranet.corp.test").data("A") == ["192.0.2.99"]
    assert w.dig("lab.zone.test", "AAAA").data("AAAA") == ["2001:db8::30"]
    # the file changes: reloaded within a second or so
    zone_file.write_text("lab.zone.test 192.0.2.31\nnew.zone.test 192.0.2.32\n")
    assert wait_until(lambda: w.dig("new.zone.test").data("A") == ["192.0.2.32"], 5)
    assert w.dig("lab.zone.test").data("A") == ["192.0.2.31"]
    # a bad line: logged with its number, the previous zone kept
    time.sleep(0.05)
    zone_file.write_text("lab.zone.test 192.0.2.33\nbroken.zone.test not-an-address\n")
    w.backend.wait_for_log(r"zones.txt: line 2: bad address 'not-an-address'.*keeping its previous names", 5)
    assert w.dig("new.zone.test").data("A") == ["192.0.2.32"]
    assert w.dig("lab.zone.test").data("A") == ["192.0.2.31"]


class Qmp:
    """qemu.qmp's own client, one connection per test, on a private event loop."""

    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("dns-test")
        self.run(self.client.connect(str(path)))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        return self.run(self.client.execute(command, arguments))

    def error(self, command: str, arguments: dict[str, object]) -> str:
        with pytest.raises(ExecuteError) as info:
            self.execute(command, arguments)
        return str(info.value)

    def close(self) -> None:
        try:
            self.run(self.client.disconnect())
        finally:
            self.loop.close()


def test_zones_over_qmp(world: Callable[..., World], vpnnet_run_dir: Path) -> None:
    sock = vpnnet_run_dir / f"dnsqmp-{time.monotonic_ns()}.sock"
    w = world("--qmp", f"unix:{sock}", "--dns-zone", "cli.zone.test=192.0.2.1")
    qmp = Qmp(sock)
    try:
        assert w.dig("qmp.zone.test").status == "NXDOMAIN"
        added = qmp.execute("dns-zone-add", {"name": "QMP.zone.test.", "address": "192.0.2.50"})
        assert added == {"name": "qmp.zone.test", "addresses": ["192.0.2.50"], "source": "qmp"}
        qmp.execute("dns-zone-add", {"name": "qmp.zone.test", "address": "2001:db8::50"})
        qmp.execute("dns-zone-add", {"name": "*.qmpwild.zone.test", "address": "192.0.2.51"})
        assert w.dig("qmp.zone.test").data("A") == ["192.0.2.50"]
        assert w.dig("qmp.zone.test", "AAAA", "+tcp").data("AAAA") == ["2001:db8::50"]
        assert w.dig("x.qmpwild.zone.test").data("A") == ["192.0.2.51"]
        zones = qmp.execute("query-dns-zones")
        assert {"name": "cli.zone.test", "addresses": ["192.0.2.1"], "source": "command-line"} in zones
        assert {"name": "qmp.zone.test", "addresses": ["192.0.2.50", "2001:db8::50"], "source": "qmp"} in zones
        assert {"name": "gateway.internal", "addresses": [GATEWAY, "fec0::2"], "source": "built-in"} in zones
        # errors, in QEMU's words
        assert "has address '192.0.2.50' already" in qmp.error(
            "dns-zone-add", {"name": "qmp.zone.test", "address": "192.0.2.50"}
        )
        assert "Invalid DNS name 'bad name'" in qmp.error("dns-zone-add", {"name": "bad name", "address": "192.0.2.1"})
        assert "expects an IPv4 or IPv6 address" in qmp.error("dns-zone-add", {"name": "a.test", "address": "x"})
        assert "Parameter 'address' is missing" in qmp.error("dns-zone-add", {"name": "a.test"})
        assert "not found" in qmp.error("dns-zone-remove", {"name": "nothere.zone.test"})
        assert "only names added over QMP" in qmp.error("dns-zone-remove", {"name": "cli.zone.test"})
        assert "has no address '192.0.2.9'" in qmp.error(
            "dns-zone-remove", {"name": "qmp.zone.test", "address": "192.0.2.9"}
        )
        # removal: one address, then the name
        removed = qmp.execute("dns-zone-remove", {"name": "qmp.zone.test", "address": "192.0.2.50"})
        assert removed == {"name": "qmp.zone.test", "addresses": ["192.0.2.50"], "source": "qmp"}
        assert w.dig("qmp.zone.test").records == []  # AAAA left: NODATA
        qmp.execute("dns-zone-remove", {"name": "qmp.zone.test"})
        assert w.dig("qmp.zone.test").status == "NXDOMAIN"
    finally:
        qmp.close()


# ---- split upstreams ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["host", "forward"])
def test_split_upstream_takes_its_domain_in_every_mode(world: Callable[..., World], mode: str) -> None:
    w = world("--dns-mode", mode, "--dns-upstream", f"split.test={SPLIT_SERVER}", split=True)
    for options in ((), ("+tcp",)):
        assert w.dig("a.b.split.test", "A", *options).data("A") == ["198.18.9.9"], options
        assert w.dig("txt.split.test", "TXT", *options).data("TXT") == ["split answer"], options
    # other names: unchanged (host mode still answers the hosts file's names)
    expected = ["198.18.0.77"] if mode == "host" else []
    assert w.dig("intranet.corp.test").data("A") == expected
    assert "split.test" not in w.queries_seen(OUTSIDE)
    assert "query[A] a.b.split.test" in w.queries_seen(SPLIT_SERVER)


def test_hosts_file_names_answer_at_once_when_the_name_servers_are_down(
    ns_host: NsHostFactory, start_backend: StartBackend, ns_guest: NsGuestFactory
) -> None:
    """A name /etc/hosts knows for IPv4 only: its AAAA question is NODATA at once, as a host
    program's getaddrinfo(AF_UNSPEC) would see it, not after the resolv.conf server's timeout
    (an AF_INET6 lookup would go on to DNS, here a server that does not answer)."""
    host = ns_host(hosts=HOSTS, resolv_conf="nameserver 198.18.0.99\noptions timeout:3 attempts:1\n")
    backend = start_backend("-v", netns=host.host.name)
    guest = ns_guest(backend=backend)
    guest.dhcp()
    w = World(host, backend, guest, Path("/nonexistent"), {})
    started = time.monotonic()
    assert w.dig("v4only.corp.test").data("A") == ["198.18.0.78"]
    nodata = w.dig("v4only.corp.test", "AAAA")
    assert (nodata.status, nodata.records) == ("NOERROR", [])
    assert w.dig("intranet.corp.test", "AAAA").data("AAAA") == ["2001:db8::77"]
    assert time.monotonic() - started < 2.0

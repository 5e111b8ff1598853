"""The outbound policy (docs/policy.rst) with real parts: refusals, --restrict, gateway services,
the policy file, QMP, the metadata address and one VM.

The backend runs inside an NsHost "host" namespace; the test's servers (integration/policy_peers.py)
run in its loopback (the guest reaches it as the gateway 10.0.2.2 or through a gateway service)
and in the "outside" namespace (198.18.0.2, and 169.254.169.254 on its lo). Guests are namespace
guests (this machine's Linux stack, curl, busybox and python3) and, once, the tiny VM. Every
server logs each connection and datagram it gets, so "refused" also means "never arrived".
No traffic leaves the namespaces the tests make.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from integration import servers as srv
from integration.backend import Backend
from integration.common import PROMPT_MS, fastest_icmp_refusal, refused_fast, wait_until
from integration.fixtures import BOTH_TRANSPORTS, NsGuestFactory, NsHostFactory, StartBackend, VmGuestFactory
from integration.netns import Netns
from integration.nsguest import NsGuest
from integration.nshost import NsHost

PY = sys.executable
PEERS = Path(__file__).resolve().parent / "policy_peers.py"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
SERVICE = "10.0.2.100"
OUTSIDE = "198.18.0.2"
METADATA = "169.254.169.254"
_serial = iter(range(1, 1 << 30))


# ---- the test bed ----------------------------------------------------------------------------


@dataclass
class Peer:
    """A policy_peers.py server; :meth:`seen` are the connections and datagrams it got."""

    server: srv.Server

    def lines(self) -> list[str]:
        return self.server.output().splitlines()

    def seen(self, kind: str, port_or_path: int | str) -> list[str]:
        prefix = f"{kind} {port_or_path} " if kind != "UNIX" else f"UNIX {port_or_path}"
        return [line for line in self.lines() if line.startswith(prefix)]

    def count(self, kind: str, port_or_path: int | str, expected: int, timeout: float = 3.0) -> int:
        """How many times it saw ``kind`` at ``port_or_path``, once that is ``expected`` (or after
        ``timeout``): the server prints its line before it answers, but the test's reader thread
        may not have it yet when the guest has the answer."""
        wait_until(lambda: len(self.seen(kind, port_or_path)) >= expected, timeout)
        return len(self.seen(kind, port_or_path))


@dataclass
class Bed:
    """A backend in an NsHost host namespace with a leased namespace guest."""

    host: NsHost
    backend: Backend
    guest: NsGuest
    run_dir: Path
    qmp_path: Path | None = None
    peers: list[Peer] = field(default_factory=list)

    def peer(self, ns: Netns, addr: str, *specs: str) -> Peer:
        proc = ns.popen([PY, str(PEERS), "serve", addr, *specs], stdout=subprocess.PIPE)
        peer = Peer(srv.Server(proc, f"peers@{ns.name}:{addr}"))
        self.peers.append(peer)
        return peer

    def tcp(self, addr: str, port: int, text: str = "hello\n", guest: NsGuest | None = None) -> dict[str, Any]:
        return client(guest or self.guest, "tcp", addr, str(port), text)

    def udp(self, addr: str, port: int, size: int = 32, guest: NsGuest | None = None) -> dict[str, Any]:
        return client(guest or self.guest, "udp", addr, str(port), str(size))

    def hold(self, addr: str, port: int) -> Held:
        proc = self.guest.popen(
            [PY, str(PEERS), "hold", addr, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        held = Held(proc)
        assert held.read()["result"] == "open"
        return held


class Held:
    """A guest connection kept open by ``policy_peers.py hold``: each :meth:`echo` is one round trip."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"hold client ended (status {self.proc.poll()})"
        value: dict[str, Any] = json.loads(line)
        return value

    def echo(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return str(self.read()["echo"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def client(guest: NsGuest, *args: str) -> dict[str, Any]:
    result = guest.run([PY, str(PEERS), *args], timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def curl(guest: NsGuest, url: str) -> subprocess.CompletedProcess[str]:
    """The guest's curl (``-sS``: errors on stderr) with a connect timeout of 5 s."""
    return guest.run(["curl", "-sS", "--connect-timeout", "5", "-m", "8", url], timeout=20)


def nc(guest: NsGuest, addr: str, port: int, text: str = "hello\n") -> subprocess.CompletedProcess[str]:
    """busybox nc in the guest, ``text`` on its stdin; it says why a connect failed on stderr."""
    return guest.run(["busybox", "nc", "-w", "3", addr, str(port)], timeout=20, input=text)


BedFactory = Callable[..., Bed]


@pytest.fixture
def run_dir(vpnnet_run_dir: Path) -> Iterator[Path]:
    """A short folder of this test's Unix sockets (paths are limited to 108 bytes)."""
    path = vpnnet_run_dir / f"p{next(_serial)}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bed(ns_host: NsHostFactory, start_backend: StartBackend, ns_guest: NsGuestFactory, run_dir: Path) -> BedFactory:
    """Factory: ``bed(*backend_args, qmp=False, hosts=None, host=None)`` -- an NsHost (or ``host``),
    the backend in its host namespace (``--qmp unix:`` with ``qmp``) and a leased guest."""

    def make(*args: str, qmp: bool = False, hosts: str | None = None, host: NsHost | None = None) -> Bed:
        if host is None:
            host = ns_host(hosts=hosts)
            # the backend's ping sockets (a new namespace allows nobody)
            host.host.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"], check=True)
        qmp_path = None
        extra: list[str] = []
        if qmp:
            qmp_path = run_dir / f"qmp{next(_serial)}.sock"
            extra = ["--qmp", f"unix:{qmp_path}"]
        backend = start_backend("-v", *extra, *args, netns=host.host.name)
        if qmp_path is not None:
            assert wait_until(qmp_path.is_socket, 10), backend.log_text()
        guest = ns_guest(backend=backend)
        lease = guest.dhcp()
        assert lease["router"] == GATEWAY
        return Bed(host, backend, guest, run_dir, qmp_path)

    return make


# ---- refusals: RST, ICMP administratively prohibited ------------------------------------------


def test_deny_refuses_with_rst_icmp_and_admin_prohibited(bed: BedFactory) -> None:
    """--deny gives TCP a RST at once (curl fails after 0 ms, nc: "Connection refused"), a
    reply=icmp rule gives EHOSTUNREACH ("No route to host"), UDP gets ICMP 3/13 (EHOSTUNREACH on
    a connected socket), ping the admin-prohibited error, reply=drop nothing; the next port of
    the same host works, and the server never saw a refused flow."""
    b = bed(
        "--deny",
        f"{OUTSIDE}:8080",
        "--rule",
        f"refuse tcp {OUTSIDE}:8082 reply=icmp id=icmp8082",
        "--deny",
        f"{OUTSIDE}:5000",
        "--rule",
        "refuse icmp 198.19.0.9 id=noping",
        "--rule",
        f"refuse tcp {OUTSIDE}:8083 reply=drop",
    )
    b.host.add_outside_address("198.19.0.9/32")
    peer = b.peer(b.host.outside, "0.0.0.0", "tcp:8080,8081,8082,8083", "udp:5000,5001")

    rst = b.tcp(OUTSIDE, 8080)
    assert refused_fast(rst, "ECONNREFUSED"), rst
    ok = b.tcp(OUTSIDE, 8081, "next door\n")
    assert (ok["result"], ok.get("data")) == ("ok", "next door\n"), ok
    fetched = curl(b.guest, f"http://{OUTSIDE}:8080/")
    assert fetched.returncode == 7, fetched  # curl: couldn't connect
    assert re.search(r"after \d{1,3} ms", fetched.stderr), fetched.stderr  # at once, no timeout
    said = nc(b.guest, OUTSIDE, 8080)
    assert said.returncode != 0 and "Connection refused" in said.stderr, said

    icmp = fastest_icmp_refusal(lambda: b.tcp(OUTSIDE, 8082), "EHOSTUNREACH")
    assert refused_fast(icmp, "EHOSTUNREACH"), icmp
    said = nc(b.guest, OUTSIDE, 8082)
    assert said.returncode != 0 and "No route to host" in said.stderr, said

    udp = b.udp(OUTSIDE, 5000)
    assert refused_fast(udp, "EHOSTUNREACH"), udp
    assert b.udp(OUTSIDE, 5001)["result"] == "ok"

    # busybox ping does not print ICMP errors: it only fails; the raw-socket client shows the error
    assert b.guest.ping("198.19.0.9", timeout=1).returncode != 0
    pinged = client(b.guest, "ping", "198.19.0.9")
    assert (pinged["result"], pinged.get("type"), pinged.get("code")) == ("unreachable", 3, 13), pinged
    assert pinged["ms"] < PROMPT_MS and pinged["from"] == "198.19.0.9"  # from the refused address
    assert client(b.guest, "ping", OUTSIDE)["result"] == "reply"
    assert b.guest.ping(OUTSIDE, timeout=2).returncode == 0

    dropped = b.guest.run(["curl", "-sS", "--connect-timeout", "1", f"http://{OUTSIDE}:8083/"], timeout=20)
    assert dropped.returncode == 28, dropped  # reply=drop: nothing comes back, curl's timeout

    assert [peer.seen("TCP", port) for port in (8080, 8082, 8083)] == [[], [], []]
    assert peer.seen("UDP", 5000) == []
    assert peer.count("TCP", 8081, 1) == 1 and peer.count("UDP", 5001, 1) == 1


# ---- --restrict ------------------------------------------------------------------------------


def test_restrict_refuses_outside_and_host_but_not_services_and_dns(bed: BedFactory, run_dir: Path) -> None:
    """--restrict (QEMU's restrict=on): the outside and the host's loopback are refused, a
    gateway service and the DNS address still answer."""
    b = bed(
        "--restrict",
        "--guestfwd",
        f"tcp:{SERVICE}:1234-tcp:127.0.0.1:7001",
        hosts="198.18.0.77 restricted.policy.test\n",
    )
    outside = b.peer(b.host.outside, "0.0.0.0", "tcp:8080", "udp:5000")
    local = b.peer(b.host.host, "127.0.0.1", "tcp:7001,7002")

    assert refused_fast(b.tcp(OUTSIDE, 8080), "ECONNREFUSED")
    assert refused_fast(b.udp(OUTSIDE, 5000), "EHOSTUNREACH")
    assert refused_fast(b.tcp(GATEWAY, 7002), "ECONNREFUSED")
    assert client(b.guest, "ping", OUTSIDE)["result"] == "unreachable"
    served = b.tcp(SERVICE, 1234, "through the service\n")
    assert (served["result"], served.get("data")) == ("ok", "through the service\n"), served
    looked_up = b.guest.run(["busybox", "nslookup", "-type=a", "restricted.policy.test", DNS], timeout=20)
    assert "198.18.0.77" in looked_up.stdout, looked_up

    assert outside.seen("TCP", 8080) == [] and outside.seen("UDP", 5000) == []
    assert local.seen("TCP", 7002) == [] and local.count("TCP", 7001, 1) == 1
    b.backend.wait_for_log(r"policy: restrict=True")


# ---- local: the backend's own DNS -------------------------------------------------------------


def test_local_dns_rule_intercepts_dns_to_any_server(bed: BedFactory) -> None:
    """--rule 'local udp *:53 dns' (and tcp): a guest that asks another DNS server is answered by
    the backend's DNS (the host's resolver); the server it named never sees the query."""
    b = bed(
        "--rule",
        "local udp *:53 dns id=dns-udp",
        "--rule",
        "local tcp *:53 dns",
        hosts="198.18.0.77 intercepted.policy.test\n",
    )
    outside = b.peer(b.host.outside, "0.0.0.0", "udp:53", "tcp:53")
    asked = b.guest.run(["busybox", "nslookup", "-type=a", "intercepted.policy.test", OUTSIDE], timeout=20)
    assert asked.returncode == 0 and "198.18.0.77" in asked.stdout, asked
    assert f"Address:\t{OUTSIDE}:53" in asked.stdout  # nslookup believes the outside server answered
    assert outside.seen("UDP", 53) == [] and outside.seen("TCP", 53) == []


# ---- gateway services (guestfwd) -------------------------------------------------------------


def test_gateway_services_of_every_target_kind(bed: BedFactory, run_dir: Path) -> None:
    """tcp, unix, cmd and udp targets backed by real servers, a service on the gateway address
    itself; a Unix socket nobody listens on and a command that cannot start give RST at once and
    a log line; the service address answers ARP and ping."""
    app, docker, nobody = run_dir / "app.sock", run_dir / "docker.sock", run_dir / "nobody.sock"
    b = bed(
        "--guestfwd",
        f"tcp:{SERVICE}:1234-tcp:127.0.0.1:7001",
        "--guestfwd",
        f"tcp:{SERVICE}:1235-unix:{app}",
        "--guestfwd",
        f"tcp:{SERVICE}:23-cmd:cat",
        "--guestfwd",
        f"tcp:{SERVICE}:24-cmd:/bin/echo $HOME;id 'two words'",  # no shell: printed as it is
        "--guestfwd",
        f"udp:{SERVICE}:514-udp:127.0.0.1:5514",
        "--guestfwd",
        f"tcp:{GATEWAY}:2375-unix:{docker}",
        "--guestfwd",
        f"tcp:{SERVICE}:1236-unix:{nobody}",
        "--guestfwd",
        f"tcp:{SERVICE}:1237-cmd:/nonexistent/command",
    )
    local = b.peer(b.host.host, "127.0.0.1", "tcp:7001", "udp:5514", f"unix:{app}", f"unix:{docker}")
    # first of all (nothing cached): a broadcast ARP request for the service address is answered
    arp = b.guest.run(["busybox", "arping", "-c", "1", "-w", "3", "-I", b.guest.ifname, SERVICE], timeout=10)
    assert arp.returncode == 0 and "Received 1 response" in arp.stdout, arp

    got = b.tcp(SERVICE, 1234, "to tcp\n")
    assert (got["result"], got.get("data")) == ("ok", "to tcp\n"), got
    got = b.tcp(SERVICE, 1235, "to unix\n")
    assert (got["result"], got.get("data")) == ("ok", "unix:to unix\n"), got
    got = b.tcp(SERVICE, 23, "to cat\n")
    assert (got["result"], got.get("data")) == ("ok", "to cat\n"), got
    got = b.tcp(SERVICE, 24, "")
    assert (got["result"], got.get("data")) == ("ok", "$HOME;id two words\n"), got
    said = nc(b.guest, SERVICE, 23, "busybox nc through cat\n")
    assert said.stdout == "busybox nc through cat\n", said
    got = b.udp(SERVICE, 514, 100)
    assert (got["result"], got.get("bytes")) == ("ok", 100), got
    got = b.tcp(GATEWAY, 2375, "GET /_ping\n")
    assert (got["result"], got.get("data")) == ("ok", "unix:GET /_ping\n"), got
    assert local.count("TCP", 7001, 1) == 1 and local.count("UDP", 5514, 1) == 1
    assert local.count("UNIX", app, 1) == 1 and local.count("UNIX", docker, 1) == 1

    assert refused_fast(b.tcp(SERVICE, 1236), "ECONNREFUSED"), "a Unix socket nobody listens on: RST"
    b.backend.wait_for_log(
        rf"forward unix:{re.escape(str(nobody))} \(rule guestfwd-tcp-{SERVICE}:1236\) failed: "
        r"No such file or directory; the guest's connection is reset"
    )
    assert refused_fast(b.tcp(SERVICE, 1237), "ECONNREFUSED"), "a command that cannot start: RST"
    b.backend.wait_for_log(
        rf"forward cmd:/nonexistent/command \(rule guestfwd-tcp-{SERVICE}:1237\) failed: "
        r"No such file or directory; the guest's connection is reset"
    )
    assert refused_fast(b.tcp(SERVICE, 1238), "ECONNREFUSED"), "a port of the service address with no service"

    assert b.guest.ping(SERVICE, timeout=2).returncode == 0
    assert client(b.guest, "ping", SERVICE)["result"] == "reply"


# ---- no trick reaches a refused destination --------------------------------------------------


def test_no_trick_reaches_a_refused_destination(bed: BedFactory) -> None:
    """A rule on the host's 127.0.0.1 holds for the gateway address (and one on the gateway
    address for the host's loopback); a port range refuses both of its ends and not the next
    port; a UDP datagram larger than the MTU (sent in fragments) to a refused port is refused
    and never arrives, while the same datagram to an allowed port does."""
    b = bed(
        "--deny",
        "127.0.0.1:7002",
        "--deny",
        f"{GATEWAY}:7003",
        "--deny",
        f"{OUTSIDE}:8000-8100",
        "--deny",
        f"{OUTSIDE}:5000",
    )
    local = b.peer(b.host.host, "127.0.0.1", "tcp:7001,7002,7003")
    outside = b.peer(b.host.outside, "0.0.0.0", "tcp:7999,8000,8050,8100,8101", "udp:5000,5001")

    assert b.tcp(GATEWAY, 7001)["result"] == "ok"
    assert refused_fast(b.tcp(GATEWAY, 7002), "ECONNREFUSED"), "--deny 127.0.0.1:7002 covers 10.0.2.2:7002"
    assert refused_fast(b.tcp(GATEWAY, 7003), "ECONNREFUSED")
    assert local.seen("TCP", 7002) == [] and local.seen("TCP", 7003) == []

    for port in (8000, 8050, 8100):
        assert refused_fast(b.tcp(OUTSIDE, port), "ECONNREFUSED"), port
    for port in (7999, 8101):
        assert b.tcp(OUTSIDE, port)["result"] == "ok", port
    assert [outside.seen("TCP", port) for port in (8000, 8050, 8100)] == [[], [], []]

    big = 4000  # > MTU 1500: three fragments, the UDP header in the first only
    allowed = b.udp(OUTSIDE, 5001, big)
    assert (allowed["result"], allowed.get("bytes")) == ("ok", big), allowed
    assert outside.count("UDP", 5001, 1) == 1 and outside.seen("UDP", 5001)[0].startswith(f"UDP 5001 {big} ")
    refused = b.udp(OUTSIDE, 5000, big)
    assert refused_fast(refused, "EHOSTUNREACH"), refused
    assert refused_fast(b.udp(OUTSIDE, 5000, 20), "EHOSTUNREACH")
    time.sleep(0.3)  # anything that got through would have arrived by now
    assert outside.seen("UDP", 5000) == []


# ---- the policy file -------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_policy_file_reload_keeps_existing_connections_and_bad_lines(bed: BedFactory, tmp_path: Path) -> None:
    """--policy FILE: its rule holds from the start; rewritten, new connections follow the new rule
    within about 2 s while a connection opened before keeps its route; a bad line is logged with
    its number and the rules read before stay."""
    policy = tmp_path / "policy.rules"
    policy.write_text(f"# guests may not reach 8081\nrefuse tcp {OUTSIDE}:8081 id=no8081\n")
    b = bed("--policy", str(policy))
    outside = b.peer(b.host.outside, "0.0.0.0", "tcp:8080,8081")
    b.backend.wait_for_log(rf"policy file {re.escape(str(policy))}: 1 rules")

    assert refused_fast(b.tcp(OUTSIDE, 8081), "ECONNREFUSED")
    assert b.tcp(OUTSIDE, 8080)["result"] == "ok"
    held = b.hold(OUTSIDE, 8080)  # opened under the first rule: direct
    try:
        assert held.echo("before") == "before\n"
        write_atomically(policy, f"refuse tcp {OUTSIDE}:8080 id=no8080\n")
        changed_at = time.monotonic()
        assert wait_until(lambda: b.tcp(OUTSIDE, 8080)["result"] == "ECONNREFUSED", 5, 0.1)
        assert time.monotonic() - changed_at < 2.5
        time.sleep(0.3)  # the server's lines of the polls before the change, and of the held one
        arrived = len(outside.seen("TCP", 8080))
        assert b.tcp(OUTSIDE, 8081)["result"] == "ok"
        assert held.echo("after the change") == "after the change\n"  # its route is kept

        write_atomically(policy, f"refuse tcp {OUTSIDE}:8081 id=no8081\nrefuse tcp {OUTSIDE}:bogus\n")
        b.backend.wait_for_log(
            rf"policy file {re.escape(str(policy))}: line 2: bad port 'bogus'.*; keeping the 1 rules read before",
            5,
        )
        assert refused_fast(b.tcp(OUTSIDE, 8080), "ECONNREFUSED"), "the old rules stay"
        assert b.tcp(OUTSIDE, 8081)["result"] == "ok"
        assert held.echo("still") == "still\n"
    finally:
        held.close()
    assert len(outside.seen("TCP", 8080)) == arrived  # nothing new got through


# ---- QMP -------------------------------------------------------------------------------------


@pytest.fixture
def qmp_clients() -> Iterator[Callable[[Path], Any]]:
    """Factory: a qemu.qmp QMPClient (integration/test_forwarding.py's synchronous wrapper) on a
    QMP socket; closed at teardown."""
    from integration.test_forwarding import Qmp

    made: list[Qmp] = []

    def make(path: Path) -> Qmp:
        client = Qmp(path)
        made.append(client)
        return client

    yield make
    for client in made:
        if not client.loop.is_closed():  # not closed by the test already
            client.close()


def test_qmp_rules_guestfwd_counters_and_state(
    bed: BedFactory,
    qmp_clients: Callable[[Path], Any],
    start_backend: StartBackend,
    ns_guest: NsGuestFactory,
    tmp_path: Path,
) -> None:
    """policy-rule-add refuses new connections, policy-rule-remove lets them through again, a bad
    rule is a QMP error; guestfwd-add works at run time; query-connections shows the routes and
    query-stats the refusals per rule; gateway services and run-time rules survive a restart
    through --state."""
    state = tmp_path / "state.json"
    b = bed("--state", str(state), qmp=True)
    outside = b.peer(b.host.outside, "0.0.0.0", "tcp:8080,8081", "udp:5000")
    local = b.peer(b.host.host, "127.0.0.1", "tcp:7001")
    assert b.qmp_path is not None
    qmp = qmp_clients(b.qmp_path)

    assert b.tcp(OUTSIDE, 8080)["result"] == "ok"
    added = qmp.execute("policy-rule-add", {"rule": f"refuse tcp {OUTSIDE}:8080"})
    assert (added["action"], added["protocol"], added["destination"], added["ports"]) == (
        "refuse",
        "tcp",
        f"{OUTSIDE}/32",
        "8080",
    ), added
    rule_id = added["id"]
    assert qmp.event("POLICY_RULE_ADDED", id=rule_id)["data"]["rule"] == added["rule"]
    assert refused_fast(b.tcp(OUTSIDE, 8080), "ECONNREFUSED")
    assert refused_fast(b.tcp(OUTSIDE, 8080), "ECONNREFUSED")
    structured = qmp.execute(
        "policy-rule-add",
        {"action": "deny", "protocol": "udp", "destination": f"{OUTSIDE}:5000", "id": "no-udp", "position": 0},
    )
    assert structured["id"] == "no-udp" and structured["reply"] == "default"
    assert refused_fast(b.udp(OUTSIDE, 5000), "EHOSTUNREACH")
    counters = qmp.execute("query-stats")["counters"]
    assert counters[f"refused-by-rule-{rule_id}"] == 2 and counters["refused-by-rule-no-udp"] == 1, counters
    assert counters["route-refuse"] >= 3 and counters["route-direct"] >= 1
    rules = {r["id"]: r for r in qmp.execute("query-policy")["rules"]}
    assert rules[rule_id]["hits"] == 2 and rules[rule_id]["origin"] == "qmp"
    assert rules["metadata"]["origin"] == "builtin"

    desc = qmp.error("policy-rule-add", {"rule": f"refuse tcp {OUTSIDE}:99999"})
    assert "Invalid policy rule" in desc and "bad port range '99999'" in desc, desc
    desc = qmp.error("policy-rule-add", {"rule": "reject tcp *:22"})
    assert "unknown action 'reject'" in desc, desc
    desc = qmp.error("policy-rule-add", {"rule": "refuse tcp *:22", "action": "refuse"})
    assert "mutually exclusive" in desc, desc
    assert "no rule with id 'nonesuch'" in qmp.error("policy-rule-remove", {"id": "nonesuch"})

    removed = qmp.execute("policy-rule-remove", {"id": rule_id})
    assert removed["id"] == rule_id
    qmp.event("POLICY_RULE_REMOVED", id=rule_id)
    assert b.tcp(OUTSIDE, 8080)["result"] == "ok"

    fwd = qmp.execute("guestfwd-add", {"rule": f"tcp:{SERVICE}:1234-tcp:127.0.0.1:7001"})
    assert fwd["target"] == "tcp:127.0.0.1:7001"
    qmp.event("GUESTFWD_ADDED", **{"guest-port": 1234})
    got = b.tcp(SERVICE, 1234, "added at run time\n")
    assert (got["result"], got.get("data")) == ("ok", "added at run time\n"), got
    desc = qmp.error("guestfwd-add", {"rule": f"tcp:{DNS}:80-tcp:127.0.0.1:7001"})
    assert "is not a free address" in desc, desc
    assert [g["rule"] for g in qmp.execute("query-guestfwd")] == [f"tcp:{SERVICE}:1234-tcp:127.0.0.1:7001"]

    # query-connections: the route of each open connection
    direct, forwarded = b.hold(OUTSIDE, 8081), b.hold(SERVICE, 1234)
    try:
        conns = [c for c in qmp.execute("query-connections") if c["protocol"] == "tcp"]
        routes = {c["remote"]: (c["route"], c["rule"]) for c in conns if c["state"] == "ESTABLISHED"}
        assert routes[f"{OUTSIDE}:8081"] == ("direct", ""), conns
        assert routes[f"{SERVICE}:1234"] == (
            "forward tcp:127.0.0.1:7001",
            f"guestfwd-tcp-{SERVICE}:1234",
        ), conns
    finally:
        direct.close()
        forwarded.close()

    # a restart with the same --state: the service and the run-time rule are back
    saved = json.loads(state.read_text())
    assert saved["guestfwd"] == [f"tcp:{SERVICE}:1234-tcp:127.0.0.1:7001"], saved
    qmp.close()
    b.backend.stop()
    again = start_backend("-v", "--state", str(state), netns=b.host.host.name)
    again.wait_for_log(rf"gateway service added: tcp:{SERVICE}:1234-tcp:127.0.0.1:7001")
    guest = ns_guest(backend=again)
    guest.dhcp()
    got = b.tcp(SERVICE, 1234, "after the restart\n", guest=guest)
    assert (got["result"], got.get("data")) == ("ok", "after the restart\n"), got
    assert refused_fast(b.udp(OUTSIDE, 5000, guest=guest), "EHOSTUNREACH")
    assert b.tcp(OUTSIDE, 8080, guest=guest)["result"] == "ok"
    assert outside.seen("UDP", 5000) == [] and local.count("TCP", 7001, 3) == 3


# ---- the cloud metadata address --------------------------------------------------------------


def test_metadata_address_refused_by_default_reachable_with_allow_metadata(
    bed: BedFactory, ns_host: NsHostFactory
) -> None:
    """169.254.169.254 (a server on the outside namespace's lo, reached through the host's default
    route): refused by the built-in rule, TCP and ping; with --allow-metadata it answers."""
    host = ns_host()
    host.host.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"], check=True)
    host.add_outside_address(f"{METADATA}/32")
    default = bed(host=host)
    metadata = default.peer(host.outside, METADATA, "tcp:80")

    assert refused_fast(default.tcp(METADATA, 80, "GET /latest/meta-data/\n"), "ECONNREFUSED")
    assert client(default.guest, "ping", METADATA)["result"] == "unreachable"
    assert metadata.seen("TCP", 80) == []
    default.backend.wait_for_log(r"policy: restrict=False allow-metadata=False")

    allowed = bed("--allow-metadata", host=host)
    got = allowed.tcp(METADATA, 80, "GET /latest/meta-data/\n")
    assert (got["result"], got.get("data")) == ("ok", "GET /latest/meta-data/\n"), got
    assert metadata.count("TCP", 80, 1) == 1
    assert refused_fast(default.tcp(METADATA, 80), "ECONNREFUSED"), "the first backend still refuses"


# ---- the VM ----------------------------------------------------------------------------------

VM_SCRIPT = """\
echo via-service | timeout 10 nc {service} 1234; echo "SERVICE-RC=$?"
timeout 10 nc {outside} 8080 </dev/null; echo "DENIED-RC=$?"
echo direct | timeout 10 nc {outside} 8081; echo "DIRECT-RC=$?"
timeout 10 nslookup -type=a intranet.corp.test > /tmp/ns.out 2>&1; echo "NSLOOKUP-RC=$?"
addr=$(sed -n 's/^Address: *//p' /tmp/ns.out | tail -n 1); echo "RESOLVED=$addr"
echo by-name | timeout 10 nc "$addr" 8081; echo "BYNAME-RC=$?"
"""


@BOTH_TRANSPORTS
def test_vm_reaches_a_gateway_service_and_is_refused_by_deny(bed: BedFactory, vm_guest: VmGuestFactory) -> None:
    """The tiny VM (a real virtio-net NIC): busybox nc through a gateway service, a --deny'd port
    refused with "Connection refused" at once, the next port direct, and a name only the host's
    /etc/hosts knows resolved through the backend's DNS (host mode) and reached; one boot."""
    b = bed(
        "--guestfwd",
        f"tcp:{SERVICE}:1234-tcp:127.0.0.1:7001",
        "--deny",
        f"{OUTSIDE}:8080",
        hosts=f"127.0.0.1 localhost\n{OUTSIDE} intranet.corp.test\n",
    )
    local = b.peer(b.host.host, "127.0.0.1", "tcp:7001")
    outside = b.peer(b.host.outside, "0.0.0.0", "tcp:8080,8081")
    vm = vm_guest(VM_SCRIPT.format(service=SERVICE, outside=OUTSIDE), backend=b.backend, dhcp="once")
    assert vm.wait_exit(90) == 0
    console = vm.console_text()
    assert "via-service\r\n" in console or "via-service\n" in console, console
    assert "SERVICE-RC=0" in console, console
    assert "can't connect to remote host (198.18.0.2): Connection refused" in console, console
    assert "DENIED-RC=1" in console, console
    assert "DIRECT-RC=0" in console and "direct" in console, console
    assert local.count("TCP", 7001, 1) == 1 and outside.seen("TCP", 8080) == []
    assert "NSLOOKUP-RC=0" in console and f"RESOLVED={OUTSIDE}" in console, console
    assert "BYNAME-RC=0" in console, console
    assert outside.count("TCP", 8081, 2) == 2

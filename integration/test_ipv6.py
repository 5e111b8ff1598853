"""IPv6 dual stack (issue 13) with real parts: guests' own kernels, real servers, real clients.

The test bed (:func:`bed`): the backend runs inside an NsHost "host" namespace whose loopback
``::1`` is the host the guests reach as the gateway ``fec0::2``; a veth joins it to an "outside"
namespace holding the "internet" hosts ``2001:db8:1::1`` and ``2001:db8:2::1`` (on its lo,
routed through the veth's 2001:2::/64). The host namespace has IPv4's default route but no
IPv6 default route: ``2001:db8:dead::/48`` has no route at all. Guests are namespace guests
(this machine's Linux stack, bridged to the backend by QEMU's hub) whose kernels do SLAAC from
the backend's router advertisements (``accept_ra`` and ``autoconf`` are on in a new namespace),
and, once, the tiny VM. The servers and clients are integration/ipv6_peers.py, iperf3, curl,
dig, dnsmasq and busybox. No traffic leaves the namespaces the tests make.
"""

from __future__ import annotations

import json
import re
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
from integration.common import fastest_icmp_refusal, refused_fast, wait_until
from integration.fixtures import BOTH_TRANSPORTS, NsGuestFactory, NsHostFactory, StartBackend, VmGuestFactory
from integration.netns import Netns
from integration.nsguest import NsGuest
from integration.nshost import NsHost
from integration.vmguest import DEFAULT_MAC

PY = sys.executable
PEERS = Path(__file__).resolve().parent / "ipv6_peers.py"
PREFIX = "fec0::/64"
GATEWAY6 = "fec0::2"
DNS6 = "fec0::3"
ROUTER_LL = "fe80::2"
GATEWAY = "10.0.2.2"
#: Outside hosts (on the outside namespace's lo) and a network nobody routes.
FAR = "2001:db8:1::1"
FAR2 = "2001:db8:2::1"
NOWHERE = "2001:db8:dead::1"
MB = 1 << 20
BIG = 200 * MB
_serial = iter(range(1, 1 << 30))


def eui64(mac: str, prefix: str = "fec0::") -> str:
    """The SLAAC address (modified EUI-64 interface identifier) of ``mac`` in ``prefix``/64."""
    import ipaddress

    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 2]) + b[1:3] + b"\xff\xfe" + b[3:6]
    return str(ipaddress.IPv6Address(ipaddress.IPv6Address(prefix).packed[:8] + iid))


# ---- the test bed ----------------------------------------------------------------------------


@dataclass
class Peer:
    """An ipv6_peers.py server; :meth:`seen` are the connections and datagrams it got."""

    server: srv.Server

    def seen(self, kind: str, port: int) -> list[str]:
        return [line for line in self.server.output().splitlines() if line.startswith(f"{kind} {port} ")]

    def count(self, kind: str, port: int, expected: int, timeout: float = 3.0) -> int:
        wait_until(lambda: len(self.seen(kind, port)) >= expected, timeout)
        return len(self.seen(kind, port))


@dataclass
class Bed:
    """The backend in an NsHost host namespace (QMP on), its guests and the test's peers."""

    host: NsHost
    backend: Backend
    guest: NsGuest
    addr: str  # the guest's SLAAC address
    qmp: Any
    tmp: Path
    peers: list[Peer] = field(default_factory=list)

    def peer(self, ns: Netns, addr: str, *specs: str) -> Peer:
        proc = ns.popen([PY, str(PEERS), "serve", addr, *specs], stdout=subprocess.PIPE)
        peer = Peer(srv.Server(proc, f"ipv6-peers@{ns.name}:{addr}"))
        self.peers.append(peer)
        return peer

    def stats(self) -> dict[str, int]:
        counters: dict[str, int] = self.qmp.execute("query-stats")["counters"]
        return counters


def client(guest: NsGuest, *args: str, timeout: float = 30.0) -> dict[str, Any]:
    result = guest.run([PY, str(PEERS), *args], timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def curl(ns: Netns, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """curl (``-g``: brackets are an IPv6 address, not a glob) with a connect timeout of 5 s."""
    return ns.run(["curl", "-sS", "-g", "--connect-timeout", "5", "-m", "10", *args, url], timeout=20)


def counter_delta(before: dict[str, int], after: dict[str, int], prefix: str) -> dict[str, int]:
    """The counters named ``prefix...`` that grew, and by how much."""
    return {k: v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix) and v > before.get(k, 0)}


BedFactory = Callable[..., Bed]


@pytest.fixture
def qmp_clients() -> Iterator[Callable[[Path], Any]]:
    """Factory: integration/test_forwarding.py's synchronous QMP client on a socket; closed at teardown."""
    from integration.test_forwarding import Qmp

    made: list[Any] = []

    def make(path: Path) -> Any:
        made.append(Qmp(path))
        return made[-1]

    yield make
    for qmp in made:
        if not qmp.loop.is_closed():
            qmp.close()


def dual_stack_host(ns_host: NsHostFactory, hosts: str | None = None) -> NsHost:
    """An NsHost whose host namespace routes IPv4 by default, 2001:db8:1::/48 and 2001:db8:2::/48
    to the outside namespace (which holds FAR and FAR2), and no other IPv6 network; ping sockets
    allowed for everyone (the backend's ICMP echo)."""
    host = ns_host(default_route=False, hosts=hosts)
    with host.host.iproute() as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=host.outside_ip)
        for net in ("2001:db8:1::/48", "2001:db8:2::/48"):
            ipr.route("add", dst=net, gateway=host.outside_ip6, family=10)
    host.add_outside_address(f"{FAR}/128")
    host.add_outside_address(f"{FAR2}/128")
    host.host.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"], check=True)
    return host


@pytest.fixture
def bed(
    ns_host: NsHostFactory,
    start_backend: StartBackend,
    ns_guest: NsGuestFactory,
    qmp_clients: Callable[[Path], Any],
    vpnnet_run_dir: Path,
    tmp_path: Path,
) -> BedFactory:
    """Factory: ``bed(*backend_args, mtu=1500, guest_mtu=None, mac=None, dhcp4=True, slaac=True,
    hosts=None, verbose=True)`` -- a dual-stack host (:func:`dual_stack_host`), the backend in its
    host namespace with QMP, and a namespace guest (IPv4 lease unless ``dhcp4=False``; its
    SLAAC address waited for unless ``slaac=False``)."""

    def make(
        *args: str,
        mtu: int = 1500,
        guest_mtu: int | None = None,
        mac: str | None = None,
        dhcp4: bool = True,
        slaac: bool = True,
        hosts: str | None = None,
        verbose: bool = True,
    ) -> Bed:
        host = dual_stack_host(ns_host, hosts)
        qmp_path = vpnnet_run_dir / f"q6-{next(_serial)}.sock"
        extra = ["-v"] if verbose else []
        backend = start_backend(*extra, "--mtu", str(mtu), "--qmp", f"unix:{qmp_path}", *args, netns=host.host.name)
        assert wait_until(qmp_path.is_socket, 10), backend.log_text()
        qmp = qmp_clients(qmp_path)
        guest = ns_guest(backend=backend, mtu=guest_mtu or mtu, mac=mac)
        if dhcp4:
            assert guest.dhcp()["router"] == GATEWAY
        addr = guest.wait_slaac(PREFIX, 15) if slaac else ""
        return Bed(host, backend, guest, addr, qmp, tmp_path)

    return make


def second_guest(ns_guest: NsGuestFactory, b: Bed, mac: str | None = None) -> tuple[NsGuest, str]:
    guest = ns_guest(backend=b.backend, mac=mac)
    return guest, guest.wait_slaac(PREFIX, 15)


# ---- 1. SLAAC, the RA's options, DHCPv6, ping ------------------------------------------------


def test_guest_kernel_does_slaac_from_our_router_advertisements(bed: BedFactory) -> None:
    """The guest's own kernel configures fec0::EUI-64/64 from our RAs, a default route via
    fe80::2 and the RA's MTU (9000, below the link's 65520: the link stays, the IPv6 MTU
    follows the RA); the RA carries the prefix (on-link, autonomous), MTU, RDNSS fec0::3 and
    DNSSL; stateless DHCPv6 gives the DNS server and search list; the gateway and DNS
    addresses answer ping."""
    mac = "52:54:00:6a:00:01"
    b = bed("--dns-search", "v6.test", mtu=9000, guest_mtu=65520, mac=mac, dhcp4=False)
    ifname = b.guest.ifname
    assert b.addr == eui64(mac), b.guest.ipv6_addresses()
    routes = b.guest.run(["ip", "-6", "route", "show", "default"], check=True).stdout
    assert re.search(rf"default via {ROUTER_LL} dev {ifname} proto ra", routes), routes
    assert b.guest.run(["cat", f"/sys/class/net/{ifname}/mtu"]).stdout.strip() == "65520"
    mtu6 = b.guest.run(["sysctl", "-n", f"net.ipv6.conf.{ifname}.mtu"], check=True).stdout.strip()
    assert mtu6 == "9000", "the RA's MTU option was not applied"

    ra = client(b.guest, "ra", ifname)
    assert ra["result"] == "ok", ra
    assert ra["router"] == ROUTER_LL and ra["lifetime"] > 0, ra
    assert [p[:3] for p in ra["prefixes"]] == [[PREFIX, True, True]], ra
    assert ra["mtu"] == 9000, ra
    assert ra["rdnss"] is not None and ra["rdnss"][0] == [DNS6] and ra["rdnss"][1] > 0, ra
    assert ra["dnssl"] is not None and ra["dnssl"][0] == ["v6.test"], ra
    assert ra["other"] is True, "stateless DHCPv6 is offered: the RA should set the O flag"

    info = client(b.guest, "dhcpv6-info", ifname)
    assert (info["result"], info["dns"], info["domains"]) == ("ok", [DNS6], ["v6.test"]), info

    assert b.guest.ping(GATEWAY6, count=2).returncode == 0
    assert b.guest.ping(DNS6).returncode == 0


def test_stateful_dhcpv6_hands_out_an_address_in_the_prefix(bed: BedFactory) -> None:
    """With --dhcpv6 a guest that solicits an IA_NA gets an address in fec0::/64 (and the RA says
    M); stateless information-requests still work."""
    import ipaddress

    b = bed("--dhcpv6")
    ra = client(b.guest, "ra", b.guest.ifname)
    assert ra["result"] == "ok" and ra["managed"] is True, ra
    got = client(b.guest, "dhcpv6-address", b.guest.ifname)
    assert got["result"] == "ok" and got["addresses"], got
    addr, preferred, valid = got["addresses"][0]
    assert ipaddress.IPv6Address(addr) in ipaddress.IPv6Network(PREFIX) and valid >= preferred > 0, got
    assert addr not in (GATEWAY6, DNS6) and got["dns"] == [DNS6], got


# ---- 2, 3. to the host's ::1 and to an outside IPv6 host --------------------------------------


def test_curl_to_the_gateway_reaches_the_hosts_loopback(bed: BedFactory) -> None:
    """http://[fec0::2]:PORT/ reaches a server on the host's [::1] (from ::1), and IPv4 to the
    gateway still works beside it (dual stack); query-neighbours lists the guest's address."""
    b = bed()
    local = b.peer(b.host.host, "::1", "http:8080")
    local4 = b.peer(b.host.host, "127.0.0.1", "http:8081")
    got = curl(b.guest, f"http://[{GATEWAY6}]:8080/")
    assert got.returncode == 0 and got.stdout == "hello ::1 via ::1\n", got
    assert local.count("HTTP", 8080, 1) == 1
    got4 = curl(b.guest, f"http://{GATEWAY}:8081/")
    assert got4.returncode == 0 and got4.stdout == "hello 127.0.0.1 via 127.0.0.1\n", got4
    assert local4.count("HTTP", 8081, 1) == 1
    neighbours = json.dumps(b.qmp.execute("query-neighbours"))
    assert b.addr in neighbours, f"query-neighbours lacks the guest's SLAAC address: {neighbours}"


def test_outside_ipv6_host_http_ping_and_udp(bed: BedFactory) -> None:
    """An IPv6 host outside (a namespace behind the host's veth): curl, ping -6 (the backend's
    ping sockets), UDP echo, and a UDP datagram larger than the MTU (the guest fragments it, the
    backend reassembles it; the 3000-byte echo comes back in fragments); query-connections shows
    the v6 flows."""
    b = bed()
    far = b.peer(b.host.outside, FAR, "http:80", "udp:7")
    got = curl(b.guest, f"http://[{FAR}]:80/")
    assert got.returncode == 0 and got.stdout == f"hello {b.host.host_ip6} via {FAR}\n", got
    assert b.guest.ping(FAR, count=2).returncode == 0
    echo = client(b.guest, "udp", FAR, "7", "100")
    assert (echo["result"], echo.get("bytes"), echo.get("peer")) == ("ok", 100, FAR), echo
    big = client(b.guest, "udp", FAR, "7", "3000")
    assert (big["result"], big.get("bytes")) == ("ok", 3000), big
    assert far.count("UDP", 7, 2) == 2 and far.seen("UDP", 7)[1].startswith("UDP 7 3000 ")
    flows = [c for c in b.qmp.execute("query-connections") if FAR in json.dumps(c)]
    assert flows and all(b.addr in json.dumps(c) for c in flows), "query-connections shows no IPv6 flow"
    closed = client(b.guest, "udp", FAR, "9", "10")
    assert refused_fast(closed, "ECONNREFUSED"), closed  # ICMPv6 port unreachable


# ---- 4. throughput and integrity --------------------------------------------------------------


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_iperf3_over_ipv6_both_ways(bed: BedFactory, mtu: int) -> None:
    b = bed(mtu=mtu, verbose=False)
    servers = srv.Servers()
    try:
        servers.start_command(["iperf3", "-s", "-B", "::1", "-p", "5201"], ns=b.host.host)
        assert wait_until(lambda: bool(b.host.host.run(["ss", "-Hltn", "sport = :5201"]).stdout.strip()), 10)
        for reverse in (False, True):
            cmd = ["iperf3", "-6", "-c", GATEWAY6, "-p", "5201", "-t", "2", "-J", *(["-R"] if reverse else [])]
            result = b.guest.run(cmd, timeout=30)
            report = json.loads(result.stdout or "{}")
            assert result.returncode == 0 and "error" not in report, result.stdout[-2000:] + result.stderr
            received = report["end"]["sum_received"]
            direction = "host->guest" if reverse else "guest->host"
            print(f"MTU {mtu} iperf3 -6 {direction}: {received['bits_per_second'] / 1e9:.2f} Gbit/s")
            assert received["bytes"] > 10 * MB
    finally:
        servers.close()


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_200_mb_each_way_over_ipv6_with_matching_sha256(bed: BedFactory, mtu: int) -> None:
    b = bed(mtu=mtu, verbose=False)
    servers = srv.Servers()
    try:
        expected = srv.pattern_sha256(BIG)
        sink = servers.start("sink", "::1", ns=b.host.host)
        up = b.guest.run([PY, str(srv.SCRIPT), "send", GATEWAY6, str(sink.port), str(BIG)], timeout=120)
        assert up.returncode == 0, up.stderr
        sent = json.loads(up.stdout)
        assert sent["reply"] == {"bytes": BIG, "sha256": expected}
        source = servers.start("source", "::1", BIG, ns=b.host.host)
        down = b.guest.run([PY, str(srv.SCRIPT), "recv", GATEWAY6, str(source.port)], timeout=120)
        assert down.returncode == 0, down.stderr
        got = json.loads(down.stdout)
        assert (got["bytes"], got["sha256"]) == (BIG, expected)
        print(
            f"MTU {mtu} over IPv6: guest->host {BIG * 8 / sent['seconds'] / 1e9:.2f} Gbit/s, "
            f"host->guest {BIG * 8 / got['seconds'] / 1e9:.2f} Gbit/s"
        )
    finally:
        servers.close()


# ---- 5. DNS AAAA through fec0::3 --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["host", "forward"])
def test_dns_aaaa_through_the_ipv6_dns_address(bed: BedFactory, mode: str, tmp_path: Path) -> None:
    """AAAA (and A) queries to [fec0::3]:53 over UDP and TCP: in host mode answered from the host
    namespace's /etc/hosts, in forward mode by a dnsmasq upstream on an IPv6 address (2001:2::2)
    in the outside namespace; then a guest whose resolv.conf names only fec0::3 curls the name."""
    hosts = f"127.0.0.1 localhost\n{FAR} www.v6.test\n198.18.0.77 www.v6.test\n"
    if mode == "host":
        b = bed("--dns-mode", "host", hosts=hosts)
    else:
        b = bed("--dns-mode", "forward", "--dns-upstream", "2001:2::2")
        log = tmp_path / "dnsmasq.log"
        b.host.outside.popen(
            [
                "dnsmasq",
                "-k",
                "-C",
                "/dev/null",
                "--pid-file=",
                "--user=root",
                "-p",
                "53",
                "--listen-address=2001:2::2",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--host-record=www.v6.test,{FAR},198.18.0.77",
                "--log-queries",
                f"--log-facility={log}",
            ]
        )
        assert wait_until(lambda: bool(b.host.outside.run(["ss", "-Hlun", "sport = :53"]).stdout.strip()), 10)
    far = b.peer(b.host.outside, FAR, "http:80")
    for transport in ("+notcp", "+tcp"):
        aaaa = b.guest.run(["dig", "-6", f"@{DNS6}", "www.v6.test", "AAAA", "+short", "+time=3", "+tries=1", transport])
        assert aaaa.returncode == 0 and aaaa.stdout.split() == [FAR], (transport, aaaa)
        a = b.guest.run(["dig", "-6", f"@{DNS6}", "www.v6.test", "A", "+short", "+time=3", "+tries=1", transport])
        assert a.returncode == 0 and a.stdout.split() == ["198.18.0.77"], (transport, a)
    if mode == "forward":
        assert wait_until(lambda: "www.v6.test" in log.read_text(), 3), "dnsmasq was not asked"
    b.guest.set_resolv_conf(f"nameserver {DNS6}\n")
    got = curl(b.guest, "http://www.v6.test:80/", "-6")
    assert got.returncode == 0 and got.stdout.endswith(f" via {FAR}\n"), got
    assert far.count("HTTP", 80, 1) == 1


# ---- 6. forwards on [::1] -------------------------------------------------------------------


def test_forwards_on_the_hosts_ipv6_loopback(bed: BedFactory) -> None:
    """--hostfwd tcp:[::1]:P-:GP reaches the guest's IPv4 address; tcp:[::1]:P-[GUEST6]:GP its
    SLAAC address (the guest's server sees the gateway as the client, as with libslirp)."""
    mac = "52:54:00:6a:00:06"
    guest6 = eui64(mac)
    b = bed("--hostfwd", "tcp:[::1]:8022-:8080", "--hostfwd", f"tcp:[::1]:8023-[{guest6}]:8081", mac=mac)
    assert b.addr == guest6
    served = b.peer(b.guest, "::", "http:8080,8081")
    b.backend.wait_for_log(r"forward added: tcp:\[::1\]:8022-:8080")
    to_v4 = curl(b.host.host, "http://[::1]:8022/")
    assert to_v4.returncode == 0 and to_v4.stdout == f"hello ::ffff:{GATEWAY} via ::ffff:10.0.2.15\n", to_v4
    to_v6 = curl(b.host.host, "http://[::1]:8023/")
    assert to_v6.returncode == 0 and to_v6.stdout == f"hello {GATEWAY6} via {guest6}\n", to_v6
    assert served.count("HTTP", 8080, 1) == 1 and served.count("HTTP", 8081, 1) == 1


# ---- 7. refusals and unreachable networks -----------------------------------------------------


def test_refused_port_and_unreachable_network_fail_at_once(bed: BedFactory) -> None:
    """A closed port on the host's ::1 (via fec0::2) is refused at once (RST); a connect to a
    network the host has no route to fails within a second with an ICMPv6 error
    (ENETUNREACH/EHOSTUNREACH), not a timeout, so happy-eyeballs clients fall back at once; UDP
    to it gets the ICMPv6 error too (which Linux hands a UDP socket only with IPV6_RECVERR: no
    route is a soft error)."""
    b = bed()
    times = []
    for _ in range(3):
        refused = client(b.guest, "connect", GATEWAY6, "9")
        assert refused["result"] == "ECONNREFUSED", refused
        times.append(refused["ms"])
    assert max(times) < 100, times
    unreachable = fastest_icmp_refusal(lambda: client(b.guest, "connect", NOWHERE, "80"), "ENETUNREACH", "EHOSTUNREACH")
    print(f"refused after {times} ms; connect to {NOWHERE}: {unreachable}")
    assert refused_fast(unreachable, "ENETUNREACH", "EHOSTUNREACH"), unreachable
    udp = client(b.guest, "udp", NOWHERE, "7", "10")
    assert refused_fast(udp, "ENETUNREACH", "EHOSTUNREACH"), udp
    assert client(b.guest, "connect", FAR, "9")["result"] == "ECONNREFUSED"  # routed, closed port


# ---- 8. policy -------------------------------------------------------------------------------


def test_policy_rules_take_ipv6_networks(bed: BedFactory) -> None:
    """--deny 2001:db8:2::/48 refuses TCP (RST) and UDP (ICMPv6 administratively prohibited:
    EACCES); a 'refuse tcp [2001:db8:1::/48]:8081 reply=icmp' rule the same port only; the next
    port and the other host work; the servers never saw a refused flow; the rule's counter."""
    b = bed("--deny", "2001:db8:2::/48", "--rule", "refuse tcp [2001:db8:1::/48]:8081 reply=icmp id=v6icmp")
    far = b.peer(b.host.outside, FAR, "tcp:8080,8081")
    far2 = b.peer(b.host.outside, FAR2, "tcp:8080", "udp:5000")
    assert refused_fast(client(b.guest, "tcp", FAR2, "8080"), "ECONNREFUSED")
    assert refused_fast(client(b.guest, "udp", FAR2, "5000", "20"), "EACCES")
    icmp = fastest_icmp_refusal(lambda: client(b.guest, "tcp", FAR, "8081"), "EACCES")
    assert refused_fast(icmp, "EACCES"), icmp
    ok = client(b.guest, "tcp", FAR, "8080", "next door\n")
    assert (ok["result"], ok.get("data")) == ("ok", "next door\n"), ok
    assert far2.seen("TCP", 8080) == [] and far2.seen("UDP", 5000) == [] and far.seen("TCP", 8081) == []
    assert far.count("TCP", 8080, 1) == 1
    counters = b.stats()
    assert counters.get("refused-by-rule-v6icmp") == 1, counters


# ---- 9. anti-spoofing ------------------------------------------------------------------------


def test_a_guest_cannot_spoof_ipv6_addresses(bed: BedFactory, ns_guest: NsGuestFactory) -> None:
    """A second guest (another MAC) sending UDP from the first guest's address and from fec0::2,
    and unsolicited neighbour advertisements claiming fec0::2 and the first guest's address: its
    frames are dropped and counted (drop-ipv6-spoof-address/-gateway, drop-ndp-spoof-target),
    the datagrams never arrive, the first guest's neighbour entry for
    fec0::2 keeps the gateway's MAC and its own traffic works."""
    b = bed()
    echo = b.peer(b.host.host, "::1", "udp:7007")
    assert b.guest.ping(GATEWAY6).returncode == 0  # the backend has seen the first guest use its address
    ifname = b.guest.ifname

    def gateway_mac() -> str:
        out = b.guest.run(["ip", "-j", "-6", "neigh", "show", GATEWAY6, "dev", ifname], check=True).stdout
        entries = json.loads(out or "[]")
        return str(entries[0].get("lladdr", "")) if entries else ""

    router_mac = gateway_mac()
    assert router_mac, "the first guest has no neighbour entry for the gateway"
    mallory, _ = second_guest(ns_guest, b)
    before = b.stats()
    forged = [
        ("spoof-udp", b.addr, GATEWAY6, "7007", "from the first guest's address"),
        ("spoof-udp", GATEWAY6, DNS6, "7007", "from the gateway's address"),
        ("spoof-na", GATEWAY6),
        ("spoof-na", b.addr),
    ]
    for args in forged:
        assert client(mallory, "frames", mallory.ifname, router_mac, *args)["sent"] == 1
    time.sleep(0.5)
    drops = counter_delta(before, b.stats(), "drop-")
    print(f"drop counters: {drops}")
    assert drops == {
        "drop-ipv6-spoof-address": 1,
        "drop-ipv6-spoof-gateway": 1,
        "drop-ndp-spoof-target": 2,
    }, drops
    assert echo.seen("UDP", 7007) == [], "a datagram with a forged source arrived"
    assert gateway_mac() == router_mac
    # the first guest's own datagram, with the same frame builder: it arrives
    own = client(b.guest, "frames", ifname, router_mac, "spoof-udp", b.addr, GATEWAY6, "7007", "genuine")
    assert own["sent"] == 1 and echo.count("UDP", 7007, 1) == 1
    assert b.guest.ping(GATEWAY6).returncode == 0


# ---- 10. --no-ipv6 ---------------------------------------------------------------------------


def test_no_ipv6_sends_no_router_advertisements_and_only_switches(bed: BedFactory, ns_guest: NsGuestFactory) -> None:
    """--no-ipv6: no RA (no address in fec0::/64 after the kernel's solicitations, and none to
    our own), the gateway does not answer ping -6; two guests still reach each other's
    link-local addresses (IPv6 frames are switched)."""
    b = bed("--no-ipv6", slaac=False)
    other = ns_guest(backend=b.backend)
    ra = client(b.guest, "ra", b.guest.ifname)
    assert ra["result"] == "timeout", ra
    assert not [a for a in b.guest.ipv6_addresses() if str(a["local"]).startswith("fec0:")]
    assert b.guest.ping(GATEWAY6, timeout=1).returncode != 0
    other_ll = next(str(a["local"]) for a in other.ipv6_addresses() if a.get("scope") == "link")
    assert wait_until(lambda: not any(a.get("tentative") for a in other.ipv6_addresses()), 5)
    pinged = b.guest.run(["busybox", "ping", "-6", "-c", "1", "-W", "3", "-I", b.guest.ifname, other_ll], timeout=15)
    assert pinged.returncode == 0, pinged


# ---- 11. the VM ------------------------------------------------------------------------------

VM_SCRIPT = """\
i=0
while ! ip -6 addr show dev eth0 | grep -q 'inet6 fec0:.*dynamic' && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
while ip -6 addr show dev eth0 | grep -q tentative && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
ip -6 addr show dev eth0
ip -6 route
ping -6 -c 2 -W 3 {gw}; echo "PING6-RC=$?"
timeout 15 wget -q -O - 'http://[{gw}]:8080/'; echo "WGET6-RC=$?"
"""


@BOTH_TRANSPORTS
def test_vm_gets_an_ipv6_address_and_reaches_the_gateway(
    ns_host: NsHostFactory,
    start_backend: StartBackend,
    vm_guest: VmGuestFactory,
    vpnnet_run_dir: Path,
    tmp_path: Path,
) -> None:
    """The tiny VM (a real virtio-net NIC): its kernel configures fec0::EUI-64 from our RAs, ping
    -6 fec0::2 answers and busybox wget fetches from the host's [::1] through it; one boot."""
    host = dual_stack_host(ns_host)
    backend = start_backend(netns=host.host.name)
    proc = host.host.popen([PY, str(PEERS), "serve", "::1", "http:8080"], stdout=subprocess.PIPE)
    srv.Server(proc, "vm-http")
    vm = vm_guest(VM_SCRIPT.format(gw=GATEWAY6), backend=backend, dhcp="once")
    assert vm.wait_exit(120) == 0
    console = vm.console_text()
    assert f"inet6 {eui64(DEFAULT_MAC)}/64" in console, console
    assert re.search(rf"default via {ROUTER_LL} dev eth0", console), console
    assert "PING6-RC=0" in console, console
    assert "hello ::1 via ::1" in console and "WGET6-RC=0" in console, console


# ---- 12. malformed IPv6 -------------------------------------------------------------------------

MALFORMED: list[tuple[str, list[str], int]] = [
    # kind, arguments after SRC DST PORT, frames that must be dropped at once
    ("bad-plen", [], 1),
    ("ext-chain", ["150"], 1),
    ("ext-endless", ["100"], 1),
    ("jumbo", [], 1),
    ("tiny-frag", [], 3),
    ("frag-no-header", [], 1),
    ("frag-overlap", [], 1),
]


def test_malformed_ipv6_is_counted_and_dropped_and_the_backend_goes_on(bed: BedFactory) -> None:
    """From a guest's AF_PACKET socket: a payload length past the frame's end, a UDP datagram
    behind 150 extension headers, a chain of extension headers running off the packet, a
    hop-by-hop jumbogram, tiny fragments (non-final ones far below what any link needs), a
    first fragment without the UDP header (RFC 7112) and full-size overlapping fragments (RFC
    5722). Each is counted as a drop; none reaches the UDP server; then curl and ping still
    work. Well-formed datagrams from the same frame builder arrive (the controls: one whole, one
    in three fragments)."""
    b = bed()
    ports = {kind: 7100 + i for i, (kind, _, _) in enumerate(MALFORMED)}
    echo = b.peer(b.host.host, "::1", "udp:" + ",".join(map(str, [7008, *ports.values()])), "http:8080")
    assert b.guest.ping(GATEWAY6).returncode == 0
    out = b.guest.run(["ip", "-j", "-6", "neigh", "show", GATEWAY6, "dev", b.guest.ifname], check=True).stdout
    router_mac = json.loads(out)[0]["lladdr"]
    ifname = b.guest.ifname
    drops: dict[str, dict[str, int]] = {}
    wrong: dict[str, object] = {}  # kind: what happened instead of a drop
    for kind, extra, frames in MALFORMED:
        before = b.stats()
        port = str(ports[kind])
        sent = client(b.guest, "frames", ifname, router_mac, kind, b.addr, GATEWAY6, port, *extra)
        assert sent["result"] == "ok", sent

        def dropped(before: dict[str, int] = before, frames: int = frames) -> bool:
            return sum(counter_delta(before, b.stats(), "drop-").values()) >= frames

        if not wait_until(dropped, 3):
            wrong[kind] = counter_delta(before, b.stats(), "")
        drops[kind] = counter_delta(before, b.stats(), "drop-")
        assert b.backend.is_running(), b.backend.log_text()
    print(f"drop counters per kind: {drops}")
    time.sleep(0.3)
    for kind, port_number in ports.items():
        if echo.seen("UDP", port_number):
            wrong[kind] = f"arrived: {echo.seen('UDP', port_number)}"
    control = client(b.guest, "frames", ifname, router_mac, "spoof-udp", b.addr, GATEWAY6, "7008", "control")
    assert control["sent"] == 1 and echo.count("UDP", 7008, 1) == 1
    fragmented = client(b.guest, "frames", ifname, router_mac, "frag-good", b.addr, GATEWAY6, "7008")
    assert fragmented["sent"] == 3 and echo.count("UDP", 7008, 2) == 2
    assert echo.seen("UDP", 7008)[1].startswith("UDP 7008 3000 "), echo.server.output()
    got = curl(b.guest, f"http://[{GATEWAY6}]:8080/")
    assert got.returncode == 0 and got.stdout == "hello ::1 via ::1\n", got
    assert b.guest.ping(GATEWAY6).returncode == 0
    assert wrong == {}, f"not dropped at once (counters that moved instead, or what arrived): {wrong}"

"""Outbound UDP, DNS and ICMP echo through the backend, with real peers.

Every test runs the backend inside an NsHost "host" namespace (the tests of DNS forwarding
ask for --dns-mode forward; host mode has its own tests in integration/test_dns_host.py); the
peers -- UDP echo servers, DNS servers written here with dpkt -- run in that namespace's
loopback (reached through the gateway address) or in the "outside" namespace (198.18.0.2,
198.19.x.x). The guest is a namespace guest bridged to the backend by QEMU's hub; it runs this
machine's python3 for its side (GUEST_TOOL). No traffic leaves the namespaces the tests make.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.backend import Backend
from integration.common import wait_until
from integration.fixtures import NsGuestFactory, NsHostFactory, StartBackend
from integration.netns import Netns
from integration.nsguest import NsGuest
from integration.nshost import NsHost

PY = sys.executable
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
OUTSIDE = "198.18.0.2"
PING_REFUSED_LOG = "ping to the outside is off"

# Peers: "udp-echo ADDR PORT" (answers "big:N" with N bytes) or "dns LOG ADDR:ANSWER_IP ..." (UDP and TCP port 53 each).
# Each prints READY on its log file once listening.
SERVER = r"""
import socket, sys, threading
import dpkt

def udp_echo(addr, port, log):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, int(port)))
    log("READY")
    while True:
        data, peer = s.recvfrom(65535)
        if data.startswith(b"big:"):  # a reply larger than the guest's MTU
            data = b"x" * int(data[4:])
        s.sendto(data, peer)

def answer(query, answer_ip, tcp):
    q = dpkt.dns.DNS(query)
    name = q.qd[0].name.lower()
    qtype = q.qd[0].type
    r = dpkt.dns.DNS(id=q.id, op=0x8000 | dpkt.dns.DNS_RD | dpkt.dns.DNS_RA, qd=q.qd)  # QR, RD, RA
    if name in ("www.example.test", "tcponly.example.test", "many.example.test"):
        count = 60 if name != "www.example.test" else 1
        if qtype == dpkt.dns.DNS_A:
            r.an = [dpkt.dns.DNS.RR(name=name, type=1, cls=1, ttl=30, ip=socket.inet_aton(answer_ip))
                    for _ in range(count)]
        elif qtype == dpkt.dns.DNS_AAAA:
            r.an = [dpkt.dns.DNS.RR(name=name, type=28, cls=1, ttl=30,
                                    ip6=socket.inet_pton(socket.AF_INET6, "2001:db8::" + answer_ip.split(".")[-1]))]
        if name == "tcponly.example.test" and not tcp:
            r.an = []
            r.op |= dpkt.dns.DNS_TC
    else:
        r.rcode = dpkt.dns.DNS_RCODE_NXDOMAIN
    return bytes(r), name, qtype

def dns_udp(addr, answer_ip, log):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    ready.release()
    while True:
        data, peer = s.recvfrom(65535)
        try:
            reply, name, qtype = answer(data, answer_ip, False)
        except Exception as e:
            log(f"BAD {e!r}")
            continue
        log(f"QUERY udp {addr} {name} {qtype}")
        s.sendto(reply, peer)

def dns_tcp(addr, answer_ip, log):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 53))
    s.listen(16)
    ready.release()
    while True:
        c, _ = s.accept()
        with c:
            f = c.makefile("rb")
            n = int.from_bytes(f.read(2), "big")
            reply, name, qtype = answer(f.read(n), answer_ip, True)
            log(f"QUERY tcp {addr} {name} {qtype}")
            c.sendall(len(reply).to_bytes(2, "big") + reply)

lock = threading.Lock()
ready = threading.Semaphore(0)
logfile = open(sys.argv[2], "a", buffering=1)
def log(text):
    with lock:
        logfile.write(text + "\n")

if sys.argv[1] == "udp-echo":
    udp_echo(sys.argv[3], sys.argv[4], log)
else:
    specs = [spec.split(":") for spec in sys.argv[3:]]
    for addr, answer_ip in specs:
        for fn in (dns_udp, dns_tcp):
            threading.Thread(target=fn, args=(addr, answer_ip, log), daemon=True).start()
    for _ in range(2 * len(specs)):
        ready.acquire()
    log("READY")
    threading.Event().wait()
"""

# The guest's side. Prints one JSON object.
#   dns SERVER NAME TYPE [EDNS_SIZE]  -> {"rcode", "tc", "id_ok", "a": [...], "aaaa": [...], "seconds"}
#   udp ADDR PORT TEXT                -> {"data", "from": [addr, port]} or {"error": ...}
#   udp-connected ADDR PORT TEXT      -> the same, from a connected socket (sees ICMP errors)
GUEST_TOOL = r"""
import json, socket, sys, time
import dpkt

def dns(server, name, qtype, edns=0):
    q = dpkt.dns.DNS(id=0x5A5A, op=dpkt.dns.DNS_RD, qd=[dpkt.dns.DNS.Q(name=name, type=int(qtype), cls=1)])
    if int(edns):
        q.ar = [dpkt.dns.DNS.RR(name="", type=41, cls=int(edns), ttl=0, rdata=b"")]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(8)
    start = time.monotonic()
    s.sendto(bytes(q), (server, 53))
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        return {"error": "timeout"}
    r = dpkt.dns.DNS(data)
    return {
        "rcode": r.rcode, "tc": bool(r.op & dpkt.dns.DNS_TC), "id_ok": r.id == 0x5A5A,
        "a": [socket.inet_ntoa(rr.ip) for rr in r.an if rr.type == 1],
        "aaaa": [socket.inet_ntop(socket.AF_INET6, rr.ip6) for rr in r.an if rr.type == 28],
        "from": list(peer), "seconds": time.monotonic() - start, "size": len(data),
    }

def dns_over_tcp(server, *names):
    # one TCP connection: every query sent first, then every answer read (in order)
    c = socket.create_connection((server, 53), timeout=8)
    for i, name in enumerate(names):
        q = bytes(dpkt.dns.DNS(id=0x100 + i, op=dpkt.dns.DNS_RD, qd=[dpkt.dns.DNS.Q(name=name, type=1, cls=1)]))
        c.sendall(len(q).to_bytes(2, "big") + q)
    c.shutdown(socket.SHUT_WR)
    results = []
    data = b""
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    while len(data) >= 2:
        n = int.from_bytes(data[:2], "big")
        r = dpkt.dns.DNS(data[2 : 2 + n])
        data = data[2 + n :]
        results.append({"id": r.id, "rcode": r.rcode, "a": [socket.inet_ntoa(rr.ip) for rr in r.an if rr.type == 1]})
    return {"answers": results}

def udp(addr, port, text, connected=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(4)
    try:
        if connected:
            s.connect((addr, int(port)))
            s.send(text.encode())
            data = s.recv(65535)
            peer = (addr, int(port))
        else:
            s.sendto(text.encode(), (addr, int(port)))
            data, peer = s.recvfrom(65535)
    except ConnectionRefusedError:
        return {"error": "refused"}
    except socket.timeout:
        return {"error": "timeout"}
    return {"data": data.decode(errors="replace"), "from": list(peer)}

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "dns":
    print(json.dumps(dns(*args)))
elif cmd == "dns-tcp":
    print(json.dumps(dns_over_tcp(*args)))
elif cmd == "udp":
    print(json.dumps(udp(*args)))
else:
    print(json.dumps(udp(*args, connected=True)))
"""


@dataclass
class World:
    """Host namespace (backend), outside namespace (peers) and a guest with a lease."""

    host: NsHost
    backend: Backend
    guest: NsGuest
    tmp: Path

    def tool(self, *args: str) -> dict[str, object]:
        result = self.guest.run([PY, "-c", GUEST_TOOL, *args], timeout=20)
        assert result.returncode == 0, result.stderr
        value = json.loads(result.stdout)
        assert isinstance(value, dict)
        return value

    def serve(self, ns: Netns, *args: str) -> Path:
        """Start a SERVER in ns; returns its log once it is listening."""
        log = self.tmp / f"server-{time.monotonic_ns()}.log"
        log.touch()
        with open(log, "ab") as out:  # the server's tracebacks, if any, go there too
            ns.popen([PY, "-c", SERVER, args[0], str(log), *args[1:]], stdout=out, stderr=subprocess.STDOUT)
        assert wait_until(lambda: "READY" in log.read_text(), 10), log.read_text()
        return log

    def ping(self, addr: str, count: int = 1) -> bool:
        result = self.guest.run(["busybox", "ping", "-c", str(count), "-W", "3", addr], timeout=20)
        return result.returncode == 0


@pytest.fixture
def world(
    ns_host: NsHostFactory, start_backend: StartBackend, ns_guest: NsGuestFactory, tmp_path: Path
) -> Iterator[Callable[..., World]]:
    def make(*backend_args: str, ping: bool = False, resolv_conf: str | None = None) -> World:
        host = ns_host(resolv_conf=resolv_conf)
        if ping:
            host.host.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"], check=True)
        backend = start_backend("-v", *backend_args, netns=host.host.name)
        guest = ns_guest(backend=backend)
        lease = guest.dhcp()
        assert lease["router"] == GATEWAY and lease["dns"] == DNS
        return World(host, backend, guest, tmp_path)

    yield make


# ---- UDP -------------------------------------------------------------------------------


def test_udp_echo_through_the_gateway_reaches_host_loopback(world: Callable[..., World]) -> None:
    w = world()
    w.serve(w.host.host, "udp-echo", "127.0.0.1", "7777")
    reply = w.tool("udp", GATEWAY, "7777", "hello loopback")
    assert reply == {"data": "hello loopback", "from": [GATEWAY, 7777]}


def test_udp_echo_to_a_host_outside(world: Callable[..., World]) -> None:
    w = world()
    w.serve(w.host.outside, "udp-echo", OUTSIDE, "7000")
    far = w.host.add_outside_address("198.19.7.7/32")
    w.serve(w.host.outside, "udp-echo", far, "7001")
    assert w.tool("udp", OUTSIDE, "7000", "hi") == {"data": "hi", "from": [OUTSIDE, 7000]}
    # the reply is larger than the guest's MTU: it arrives in fragments
    assert w.tool("udp", far, "7001", "big:3000") == {"data": "x" * 3000, "from": [far, 7001]}


def test_closed_udp_port_gives_the_guest_port_unreachable(world: Callable[..., World]) -> None:
    w = world()
    assert w.tool("udp-connected", OUTSIDE, "9", "anyone?") == {"error": "refused"}
    assert w.tool("udp-connected", GATEWAY, "9", "anyone?") == {"error": "refused"}


def test_no_host_loopback_drops_udp_to_the_gateway(world: Callable[..., World]) -> None:
    w = world("--no-host-loopback")
    w.serve(w.host.host, "udp-echo", "127.0.0.1", "7777")
    assert w.tool("udp", GATEWAY, "7777", "hello") == {"error": "timeout"}


# ---- DNS -------------------------------------------------------------------------------


def test_dns_passthrough_nxdomain_and_builtin_names(world: Callable[..., World]) -> None:
    w = world("--dns-mode", "forward", "--host-name", "myhost.example.test")
    log = w.serve(w.host.outside, "dns", f"{OUTSIDE}:192.0.2.1")
    a = w.tool("dns", DNS, "www.example.test", "1")
    assert (a["rcode"], a["a"], a["id_ok"], a["from"]) == (0, ["192.0.2.1"], True, [DNS, 53])
    aaaa = w.tool("dns", DNS, "www.example.test", "28")
    assert (aaaa["rcode"], aaaa["aaaa"]) == (0, ["2001:db8::1"])
    nx = w.tool("dns", DNS, "nope.example.test", "1")
    assert (nx["rcode"], nx["a"]) == (3, [])
    for name in ("host.internal", "HOST.INTERNAL", "myhost.example.test"):
        builtin = w.tool("dns", DNS, name, "1")
        assert (builtin["rcode"], builtin["a"]) == (0, [GATEWAY]), name
    aaaa = w.tool("dns", DNS, "host.internal", "28")  # the gateway's IPv6 address (docs/ipv6.rst)
    assert (aaaa["rcode"], aaaa["a"], aaaa["aaaa"]) == (0, [], ["fec0::2"])
    queries = [line for line in log.read_text().splitlines() if line.startswith("QUERY")]
    assert queries == [
        f"QUERY udp {OUTSIDE} www.example.test 1",
        f"QUERY udp {OUTSIDE} www.example.test 28",
        f"QUERY udp {OUTSIDE} nope.example.test 1",
    ]


def test_dns_truncation_and_tcp_retry_upstream(world: Callable[..., World]) -> None:
    w = world("--dns-mode", "forward")
    log = w.serve(w.host.outside, "dns", f"{OUTSIDE}:192.0.2.1")
    # 60 records (> 512 bytes): the guest without EDNS gets TC; with EDNS 4096 all of it
    cut = w.tool("dns", DNS, "many.example.test", "1")
    assert cut["tc"] is True and cut["a"] == [] and cut["rcode"] == 0
    whole = w.tool("dns", DNS, "many.example.test", "1", "4096")
    assert whole["tc"] is False and len(whole["a"]) == 60  # type: ignore[arg-type]
    # upstream sets TC over UDP: the backend asks again over TCP
    tcp = w.tool("dns", DNS, "tcponly.example.test", "1", "4096")
    assert tcp["tc"] is False and len(tcp["a"]) == 60  # type: ignore[arg-type]
    assert f"QUERY tcp {OUTSIDE} tcponly.example.test 1" in log.read_text()


def test_dns_servfail_fast_when_the_upstream_is_dead(world: Callable[..., World]) -> None:
    w = world("--dns-upstream", "127.0.0.1:5353")  # nobody listens there: ECONNREFUSED
    r = w.tool("dns", DNS, "www.example.test", "1")
    assert r["rcode"] == 2 and r["id_ok"] is True
    assert isinstance(r["seconds"], float) and r["seconds"] < 1.0


def test_dns_upstream_option_with_port_and_fallback_to_the_next(world: Callable[..., World]) -> None:
    w = world("--dns-upstream", "127.0.0.1:5353", "--dns-upstream", "198.19.5.5:53")
    w.host.add_outside_address("198.19.5.5/32")
    log = w.serve(w.host.outside, "dns", "198.19.5.5:192.0.2.55")
    r = w.tool("dns", DNS, "www.example.test", "1")
    assert (r["rcode"], r["a"]) == (0, ["192.0.2.55"])
    assert "QUERY udp 198.19.5.5 www.example.test 1" in log.read_text()


def test_dns_over_tcp_builtin_names_and_fallback(world: Callable[..., World]) -> None:
    """Guest DNS over TCP at the DNS address: built-in names answered by the backend, the rest
    asked of the upstreams over TCP in turn (the first is dead here), answers in query order."""
    w = world("--dns-upstream", "127.0.0.1:5353", "--dns-upstream", "198.19.5.5:53")
    w.host.add_outside_address("198.19.5.5/32")
    log = w.serve(w.host.outside, "dns", "198.19.5.5:192.0.2.77")
    r = w.tool("dns-tcp", DNS, "www.example.test", "host.internal", "nope.example.test")
    assert r["answers"] == [
        {"id": 0x100, "rcode": 0, "a": ["192.0.2.77"]},
        {"id": 0x101, "rcode": 0, "a": [GATEWAY]},
        {"id": 0x102, "rcode": 3, "a": []},
    ]
    assert "QUERY tcp 198.19.5.5 www.example.test 1" in log.read_text()
    assert "host.internal" not in log.read_text()


def test_dns_over_tcp_servfail_when_no_upstream_answers(world: Callable[..., World]) -> None:
    w = world("--dns-upstream", "127.0.0.1:5353")
    r = w.tool("dns-tcp", DNS, "www.example.test", "host.internal")
    assert r["answers"] == [{"id": 0x100, "rcode": 2, "a": []}, {"id": 0x101, "rcode": 0, "a": [GATEWAY]}]


def test_dns_follows_resolv_conf_changes(world: Callable[..., World]) -> None:
    w = world("--dns-mode", "forward")  # the host namespace's resolv.conf names 198.18.0.2
    second = w.host.add_outside_address("198.19.9.9/32")
    w.serve(w.host.outside, "dns", f"{OUTSIDE}:192.0.2.1", f"{second}:192.0.2.99")
    assert w.tool("dns", DNS, "www.example.test", "1")["a"] == ["192.0.2.1"]
    w.host.set_resolv_conf(f"# the VPN came up\nnameserver {second}\n")
    time.sleep(1.2)  # the backend looks at the file at most once a second
    assert w.tool("dns", DNS, "www.example.test", "1")["a"] == ["192.0.2.99"]
    w.backend.wait_for_log(rf"DNS upstream from /etc/resolv.conf: {second}:53")


# ---- ICMP echo -------------------------------------------------------------------------


def test_ping_outside_through_ping_sockets(world: Callable[..., World]) -> None:
    w = world(ping=True)
    assert w.ping(GATEWAY)
    assert w.ping(OUTSIDE, count=3)
    far = w.host.add_outside_address("198.19.3.3/32")
    assert w.ping(far)
    assert PING_REFUSED_LOG not in w.backend.log_text()


def test_ping_refused_by_the_kernel_is_logged_once_and_gateway_still_answers(world: Callable[..., World]) -> None:
    w = world(ping=False)  # a new namespace's ping_group_range is "1 0": nobody may
    assert not w.ping(OUTSIDE)
    assert not w.ping(OUTSIDE)
    assert w.ping(GATEWAY)
    assert w.ping(DNS)
    assert w.backend.log_text().count(PING_REFUSED_LOG) == 1

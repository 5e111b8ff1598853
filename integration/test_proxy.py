"""HTTP and HTTPS through a real upstream proxy (tinyproxy), transparent and explicit.

The world of each test::

    guest namespace --(QEMU hub)--> backend, in an NsHost "host" namespace --> outside namespace
      curl, resolving through          | tinyproxy on 127.0.0.1:8888 (and      198.19.1.1 www.test, secure.test
      the backend's DNS (10.0.2.3)     |  :8889 with BasicAuth), as user       198.19.2.2 direct.test
                                       |  tinyproxy                            (origin servers: HTTP :80,
                                       | nftables: TCP to 198.19.0.0/16 on      HTTPS :443 with a test CA)
                                       |  80/443 is reset unless it comes
                                       |  from user tinyproxy (or goes to direct.test)

With ``make(..., ipv6=True)`` the world is dual stack: the guest also has its SLAAC address in
fec0::/64, the outside namespace also 2001:db8:19::1 (www.test and secure.test, AAAA in the same
/etc/hosts) and 2001:db8:29::2 (direct.test), with the same origin servers, reached through the
host namespace's default IPv6 route (nshost.py); nftables resets TCP to 2001:db8:19::/64 on
80/443 the same way (the table is inet). Without it the names have no AAAA and the guest no
IPv6, as before.

So a request that reaches www.test or secure.test went through the proxy; tinyproxy's log shows
each request with its host name and each CONNECT with the SNI name; direct.test is reachable
directly (no_proxy, and the explicit proxy without an upstream). The host namespace's /etc/hosts
holds the names (the backend answers the guest's DNS from it, in host mode), and its resolv.conf
a server nobody runs: the machine's own resolver is never asked.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration import servers as srv
from integration.backend import Backend
from integration.common import wait_until
from integration.fixtures import NsGuestFactory, NsHostFactory, StartBackend
from integration.nsguest import NsGuest
from integration.nshost import NsHost

PY = sys.executable
PEERS = Path(__file__).resolve().parent / "proxy_servers.py"
WWW = "198.19.1.1"
DIRECT = "198.19.2.2"
GATEWAY = "10.0.2.2"
HOSTS = f"""127.0.0.1 localhost
{WWW} www.test secure.test
{DIRECT} direct.test
198.19.3.3 blocked.test
"""
WWW6 = "2001:db8:19::1"
NET6 = "2001:db8:19::/64"  # what nftables resets unless tinyproxy connects
DIRECT6 = "2001:db8:29::2"
HOSTS6 = HOSTS + f"{WWW6} www.test secure.test www6.test\n{DIRECT6} direct.test direct6.test\n"  # *6.test: AAAA only
SLAAC = "fec0::/64"
MB = 1 << 20

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("tinyproxy", "curl", "openssl", "nft")),
    reason="needs tinyproxy, curl, openssl and nftables: scripts/install-deps",
)


@dataclass
class Proxy:
    port: int
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def requests(self) -> list[str]:
        """The request lines tinyproxy logged ('GET http://www.test/hello HTTP/1.1', 'CONNECT ...')."""
        return re.findall(r"Request \(file descriptor \d+\): (.+)", self.text())


@dataclass
class World:
    host: NsHost
    backend: Backend
    guest: NsGuest
    tmp: Path
    ca: Path
    proxies: dict[str, Proxy]
    origin_logs: list[Path] = field(default_factory=list)
    guest6: str = ""  # the guest's SLAAC address (ipv6 worlds)

    def curl(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["curl", "-sS", "--max-time", str(int(timeout) - 5), "--cacert", str(self.ca), *args]
        return self.guest.run(cmd, timeout, env={"no_proxy": "", "http_proxy": "", "https_proxy": "", **(env or {})})

    def ok(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        result = self.curl(*args, env=env, timeout=timeout)
        log = self.backend.log_text()[-3000:]
        assert result.returncode == 0, f"curl {args}: {result.returncode} {result.stderr}\n{log}"
        return result.stdout

    def origin_requests(self) -> str:
        return "\n".join(path.read_text() for path in self.origin_logs)

    def origin_log(self, addr: str, port: int) -> str:
        """What the origin server at addr:port printed (READY, then a REQ line per request)."""
        return (self.tmp / f"origin-{addr}-{port}.log").read_text()

    def peer(self, *args: str, timeout: float = 30) -> dict[str, object]:
        result = self.guest.run([PY, str(PEERS), *args], timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        value = json.loads(result.stdout)
        assert isinstance(value, dict)
        return value


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A test CA (openssl req -x509) and a certificate it signed for secure.test and 198.19.1.1."""
    d = tmp_path_factory.mktemp("ca")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=qemu-vpnnet test CA",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=secure.test",
    )
    (d / "san.ext").write_text(f"subjectAltName=DNS:secure.test,DNS:www.test,DNS:direct.test,IP:{WWW},IP:{WWW6}\n")
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    return d / "ca.pem", d / "server.pem", d / "server.key"


def tinyproxy_config(run: Path, name: str, port: int, extra: str = "") -> tuple[Path, Path]:
    log = run / f"{name}.log"
    log.touch()
    log.chmod(0o666)
    filt = run / "filter"
    filt.write_text("blocked.test\n")
    conf = run / f"{name}.conf"
    conf.write_text(
        f"User tinyproxy\nGroup tinyproxy\nPort {port}\nListen 127.0.0.1\nTimeout 60\n"
        f'LogFile "{log}"\nLogLevel Info\nMaxClients 200\nAllow 127.0.0.1\n'
        f'DisableViaHeader Yes\nFilter "{filt}"\nFilterURLs Off\n{extra}'
    )
    conf.chmod(0o644)
    return conf, log


NFT_RULES = f"""table inet vpnt_proxy {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr 198.19.0.0/16 ip daddr != {DIRECT} tcp dport {{ 80, 443 }} meta skuid != "tinyproxy" reject with tcp reset
    ip6 daddr {NET6} tcp dport {{ 80, 443 }} meta skuid != "tinyproxy" reject with tcp reset
  }}
}}
"""


@pytest.fixture
def world(
    ns_host: NsHostFactory,
    start_backend: StartBackend,
    ns_guest: NsGuestFactory,
    tmp_path: Path,
    vpnnet_run_dir: Path,
    test_ca: tuple[Path, Path, Path],
) -> Iterator[Callable[..., World]]:
    """``make(*backend_args, auth=False, ipv6=False)``: the world above, the backend started with
    backend_args; dual stack with ipv6."""
    ca, cert, key = test_ca

    def make(*backend_args: str, auth: bool = False, ipv6: bool = False) -> World:
        hosts = HOSTS6 if ipv6 else HOSTS
        host = ns_host(hosts=hosts, resolv_conf="nameserver 198.18.0.2\noptions timeout:1 attempts:1\n")
        origins = [(WWW, 80, False), (WWW, 443, True), (DIRECT, 80, False)]
        for addr in (WWW, DIRECT):
            host.add_outside_address(f"{addr}/32")
        if ipv6:  # reached through the host namespace's default route ::/0 via the outside namespace
            for addr in (WWW6, DIRECT6):
                host.add_outside_address(f"{addr}/128")
            origins += [(WWW6, 80, False), (WWW6, 443, True), (DIRECT6, 80, False)]
        logs = []
        for addr, port, tls in origins:
            log = tmp_path / f"origin-{addr}-{port}.log"
            with open(log, "wb") as out:
                tls_args = [str(cert), str(key)] if tls else []
                host.outside.popen([PY, "-u", str(PEERS), "origin", addr, str(port), *tls_args], stdout=out)
            logs.append(log)
        for log in logs:
            assert wait_until(lambda log=log: "READY" in log.read_text(), 10), log.read_text()
        nft = host.host.run(["nft", "-f", "-"], input=NFT_RULES)
        assert nft.returncode == 0, nft.stderr
        run = vpnnet_run_dir / tmp_path.name[-20:]
        run.mkdir(exist_ok=True)
        run.chmod(0o777)
        proxies: dict[str, Proxy] = {}
        for name, port, extra in (("open", 8888, ""), ("auth", 8889, "BasicAuth proxyuser s3cret\n")):
            if name == "auth" and not auth:
                continue
            conf, log = tinyproxy_config(run, name, port, extra)
            host.host.popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proxies[name] = Proxy(port, log)
        for proxy in proxies.values():
            probe = f"import socket; socket.create_connection(('127.0.0.1', {proxy.port}), 1).close()"
            assert wait_until(lambda probe=probe: host.host.run([PY, "-c", probe]).returncode == 0, 10), proxy.text()
        backend = start_backend("-v", *backend_args, netns=host.host.name)
        guest = ns_guest(backend=backend, ipv6=ipv6)
        guest.dhcp()
        guest6 = guest.wait_slaac(SLAAC, 15) if ipv6 else ""
        return World(host, backend, guest, tmp_path, ca, proxies, logs, guest6)

    yield make


UPSTREAM = ("--http-proxy", "http://127.0.0.1:8888", "--https-proxy", "127.0.0.1:8888")


def test_without_an_upstream_nothing_is_intercepted(world: Callable[..., World]) -> None:
    w = world()
    # direct TCP to www.test:80 is reset by nftables: the backend did not proxy it
    result = w.curl("http://www.test/hello", timeout=20)
    assert result.returncode in (7, 56), result
    assert w.proxies["open"].requests() == []
    assert w.ok("http://direct.test/hello") == "hello direct.test /hello\n"


def test_transparent_http_keep_alive_big_download_and_chunked_upload(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM)
    # three requests on one guest connection (curl reuses it: one connect in all)
    out = w.ok(
        "-w",
        "connects=%{num_connects}\n",
        "http://www.test/hello?1",
        "http://www.test/hello?2",
        "http://www.test/hello?3",
    )
    assert out.count("hello www.test /hello?") == 3, out
    assert re.findall(r"connects=(\d)", out) == ["1", "0", "0"], out
    lines = w.proxies["open"].requests()
    assert [line for line in lines if "www.test/hello" in line] == [
        f"GET http://www.test/hello?{i} HTTP/1.1" for i in (1, 2, 3)
    ], lines
    assert w.origin_requests().count("REQ GET /hello?") == 3
    # 100 MB through the proxy, intact
    size = 100 * MB
    digest = w.guest.run(["sh", "-c", f"curl -sS --max-time 100 http://www.test/big?size={size} | sha256sum"], 110)
    assert digest.stdout.split()[0] == srv.pattern_sha256(size), digest.stderr
    # a chunked upload (curl sends Expect: 100-continue with it) and a fixed-length one
    body = w.tmp / "body.bin"
    body.write_bytes(bytes(range(256)) * 40000)  # 10 MB
    import hashlib

    want = hashlib.sha256(body.read_bytes()).hexdigest()
    chunked = json.loads(
        w.ok("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{body}", "http://www.test/upload")
    )
    assert (chunked["length"], chunked["sha256"]) == (body.stat().st_size, want)
    fixed = json.loads(
        w.ok(
            "-H",
            "Expect: 100-continue",
            "-H",
            "Proxy-Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=",
            "--data-binary",
            f"@{body}",
            "http://www.test/upload",
        )
    )
    assert (fixed["length"], fixed["sha256"]) == (body.stat().st_size, want)
    assert "proxy-authorization" not in fixed["headers"]  # the guest's own is not passed on


def test_transparent_https_connects_by_the_sni_name(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM)
    assert w.ok("https://secure.test/hello") == "hello secure.test /hello\n"
    assert w.ok("-k", f"https://{WWW}/hello") == f"hello {WWW} /hello\n"  # no SNI for an address
    size = 20 * MB
    digest = w.guest.run(
        ["sh", "-c", f"curl -sS --cacert {w.ca} --max-time 60 https://secure.test/big?size={size} | sha256sum"], 70
    )
    assert digest.stdout.split()[0] == srv.pattern_sha256(size), digest.stderr
    connects = [line for line in w.proxies["open"].requests() if line.startswith("CONNECT")]
    assert connects[:2] == ["CONNECT secure.test:443 HTTP/1.1", f"CONNECT {WWW}:443 HTTP/1.1"], connects


def test_no_proxy_by_name_by_resolved_name_and_by_address(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM, "--no-proxy", "direct.test,192.0.2.0/24")
    assert w.ok("http://direct.test/hello") == "hello direct.test /hello\n"
    # by address: the guest resolved direct.test through our DNS, then names only the address
    assert w.ok(f"http://{DIRECT}/hello") == f"hello {DIRECT} /hello\n"
    assert not [line for line in w.proxies["open"].requests() if "direct" in line or DIRECT in line]
    assert "proxy-no-proxy-direct" not in w.backend.log_text()
    # and www.test still goes through the proxy
    assert w.ok("http://www.test/hello") == "hello www.test /hello\n"
    assert any("www.test" in line for line in w.proxies["open"].requests())


def test_explicit_proxy_through_the_upstream_and_directly(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM)
    explicit = {"http_proxy": f"http://{GATEWAY}:3128", "https_proxy": f"http://{GATEWAY}:3128"}
    assert w.ok("http://www.test/hello", env=explicit) == "hello www.test /hello\n"
    assert w.ok("https://secure.test/hello", env=explicit) == "hello secure.test /hello\n"
    lines = w.proxies["open"].requests()
    assert "GET http://www.test/hello HTTP/1.1" in lines and "CONNECT secure.test:443 HTTP/1.1" in lines, lines


def test_explicit_proxy_without_upstream_keeps_to_the_policy(world: Callable[..., World]) -> None:
    w = world("--deny", f"{WWW}/32")
    explicit = {"http_proxy": f"http://{GATEWAY}:3128", "https_proxy": f"http://{GATEWAY}:3128"}
    assert w.ok("http://direct.test/hello", env=explicit) == "hello direct.test /hello\n"
    refused = w.curl("-i", "http://www.test/hello", env=explicit)
    assert refused.stdout.startswith("HTTP/1.1 403"), refused.stdout
    assert "deny" in refused.stdout
    loop = w.curl("-i", "http://127.0.0.1:8888/", env=explicit)  # the backend's own loopback
    assert loop.stdout.startswith("HTTP/1.1 403"), loop.stdout
    connect = w.curl("https://www.test/hello", env=explicit)
    assert connect.returncode != 0 and "403" in connect.stderr, connect
    w.backend.wait_for_log(r"explicit proxy: www\.test:80 .* not reachable")
    assert w.proxies["open"].requests() == []


def test_proxy_authentication(world: Callable[..., World]) -> None:
    w = world(
        "--http-proxy",
        "http://proxyuser:s3cret@127.0.0.1:8889",
        "--https-proxy",
        "http://proxyuser:s3cret@127.0.0.1:8889",
        auth=True,
    )
    assert w.ok("http://www.test/hello") == "hello www.test /hello\n"
    assert w.ok("https://secure.test/hello") == "hello secure.test /hello\n"
    assert "s3cret" not in w.backend.log_text().split("\n", 1)[1]  # (the first line is the command)
    lines = w.proxies["auth"].requests()
    assert "GET http://www.test/hello HTTP/1.1" in lines and "CONNECT secure.test:443 HTTP/1.1" in lines, lines


def test_wrong_credentials_refusals_and_a_proxy_that_is_down(world: Callable[..., World]) -> None:
    w = world("--http-proxy", "http://proxyuser:wrong@127.0.0.1:8889", "--https-proxy", "127.0.0.1:8888", auth=True)
    denied = w.curl("-i", "http://www.test/hello")  # the proxy's answer, passed on (tinyproxy's is 401)
    assert re.match(r"HTTP/1.1 40[17] ", denied.stdout), denied.stdout
    # a refusing proxy: 403 for HTTPS is a reset (and a log line); for HTTP its answer
    w.backend.wait_for_log("serving")
    start = time.monotonic()
    refused = w.curl("https://blocked.test/hello", timeout=20)
    assert refused.returncode in (35, 56) and time.monotonic() - start < 5, refused
    w.backend.wait_for_log(r"CONNECT blocked\.test:443 via 127\.0\.0\.1:8888: the proxy answered 403")
    w.backend.wait_for_log(r"proxy: http http://proxyuser@127\.0\.0\.1:8889")  # (never the password)


def test_a_refusing_proxy_answers_http_itself(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM)
    refused = w.curl("-i", "http://blocked.test/hello")
    assert refused.stdout.startswith("HTTP/1.1 403 "), refused.stdout
    assert "GET http://blocked.test/hello HTTP/1.1" in w.proxies["open"].requests()


def test_proxy_down_resets_promptly_and_garbage_is_reset(world: Callable[..., World]) -> None:
    w = world("--http-proxy", "http://127.0.0.1:9", "--https-proxy", "http://127.0.0.1:8888")
    start = time.monotonic()
    down = w.curl("http://www.test/hello", timeout=20)
    assert down.returncode == 7 and time.monotonic() - start < 3, down  # refused at connect
    garbage = w.peer("raw", WWW, "443", "474554202f20485454502f312e310d0a0d0a", "10")  # HTTP on the TLS port
    assert garbage["reset"] and garbage["seconds"] < 3, garbage
    silent = w.peer("raw", WWW, "443", "", "15")  # no ClientHello at all
    assert (silent["reset"] or silent["eof"]) and 4 < float(str(silent["seconds"])) < 9, silent
    w.backend.wait_for_log(r"no TLS ClientHello within 5 s")


def test_pipelined_requests_and_an_upgrade(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM, "--no-proxy", "direct.test")
    # two requests in one segment, the second asking to close: two answers, in order, then EOF
    pipelined = (
        b"GET /hello?first HTTP/1.1\r\nHost: www.test\r\n\r\n"
        b"GET /hello?second HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n"
    )
    out = w.peer("raw", WWW, "80", pipelined.hex(), "15")
    reply = str(out["reply"])
    assert out["eof"] and reply.count("HTTP/1.1 200") == 2, out
    assert reply.index("hello www.test /hello?first") < reply.index("hello www.test /hello?second")
    # garbage instead of HTTP on a proxied port: reset
    garbage = w.peer("raw", WWW, "80", (b"\x00\x01 not http\r\n\r\n").hex(), "10")
    assert garbage["reset"], garbage
    w.backend.wait_for_log(r"not HTTP from the guest")
    # a request head over 64 KiB: reset, the log says why
    huge = b"GET /hello HTTP/1.1\r\nHost: www.test\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    (w.tmp / "huge.http").write_bytes(huge)
    too_long = w.peer("raw", WWW, "80", f"@{w.tmp / 'huge.http'}", "10")
    assert too_long["reset"] and not too_long["reply"], too_long
    w.backend.wait_for_log(r"request head over 65536 bytes; reset")
    # Upgrade through the explicit proxy, directly (no_proxy; tinyproxy does not pass upgrades):
    # after the 101 the connection is a tunnel to the origin, which echoes
    request = (
        b"GET http://direct.test/upgrade HTTP/1.1\r\nHost: direct.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        b"echo me\n"
    )
    upgraded = w.peer("raw", GATEWAY, "3128", request.hex(), "3")
    assert str(upgraded["reply"]).startswith("HTTP/1.1 101 "), upgraded
    assert str(upgraded["reply"]).endswith("\r\n\r\necho me\n"), upgraded


def test_proxy_settings_over_qmp(world: Callable[..., World], vpnnet_run_dir: Path) -> None:
    from integration.test_dns_host import Qmp

    sock = vpnnet_run_dir / f"proxyqmp-{time.monotonic_ns()}.sock"
    w = world("--qmp", f"unix:{sock}", auth=True)
    qmp = Qmp(sock)
    try:
        info = qmp.execute("query-proxy")
        assert (info["http-proxy"], info["https-proxy"], info["explicit-proxy"]) == ("", "", f"{GATEWAY}:3128")
        assert w.curl("http://www.test/hello", timeout=20).returncode in (7, 56)  # direct: reset by nftables
        info = qmp.execute(
            "proxy-set",
            {
                "http-proxy": "http://proxyuser:s3cret@127.0.0.1:8889",
                "https-proxy": "http://proxyuser:s3cret@127.0.0.1:8889",
                "no-proxy": "direct.test",
                "transparent-http-ports": [80, 8080],
            },
        )
        assert info["http-proxy"] == "http://proxyuser@127.0.0.1:8889" and "s3cret" not in json.dumps(info)
        assert info["transparent-http-ports"] == [80, 8080] and info["no-proxy"] == "direct.test"
        assert w.ok("http://www.test/hello") == "hello www.test /hello\n"
        assert w.ok("https://secure.test/hello") == "hello secure.test /hello\n"
        assert w.ok("http://direct.test/hello") == "hello direct.test /hello\n"
        counters = qmp.execute("query-proxy")["counters"]
        assert counters["proxy-http-connections"] >= 1 and counters["proxy-https-connects"] >= 1, counters
        assert "Invalid http-proxy" in qmp.error("proxy-set", {"http-proxy": "socks5://u:pw@x:1"})
        assert "pw" not in qmp.error("proxy-set", {"http-proxy": "socks5://u:pw@x:1"})
        # cleared: nothing is intercepted any more
        qmp.execute("proxy-set", {"http-proxy": "", "https-proxy": "", "explicit-proxy-port": 0})
        assert w.curl("http://www.test/hello", timeout=20).returncode in (7, 56)
        assert qmp.execute("query-proxy")["explicit-proxy"] == ""
        lines = w.proxies["auth"].requests()
        assert lines.count("GET http://www.test/hello HTTP/1.1") == 1, lines
    finally:
        qmp.close()


# ---- IPv6 (issue 13): a dual-stack guest is proxied the same way -----------------------------

REMOTE_IP = ("-w", "via=%{remote_ip}\n")  # curl: the address its connection went to
EXPLICIT = {"http_proxy": f"http://{GATEWAY}:3128", "https_proxy": f"http://{GATEWAY}:3128"}


def test_ipv6_without_an_upstream_nothing_is_intercepted(world: Callable[..., World]) -> None:
    w = world(ipv6=True)
    assert w.guest6.startswith("fec0::"), w.guest6
    result = w.curl("-6", "http://www.test/hello", timeout=20)  # direct IPv6 TCP to www.test: reset by nftables
    assert result.returncode in (7, 56), result
    assert w.ok("-6", *REMOTE_IP, "http://direct.test/hello") == f"hello direct.test /hello\nvia={DIRECT6}\n"
    assert w.proxies["open"].requests() == []


def test_ipv6_transparent_http_by_literal_and_by_aaaa(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM, ipv6=True)
    # an IPv6 literal: tinyproxy gets the absolute form with the brackets, and reaches the origin over IPv6
    assert w.ok("-6", *REMOTE_IP, f"http://[{WWW6}]/hello") == f"hello [{WWW6}] /hello\nvia={WWW6}\n"
    assert f"REQ GET /hello [{WWW6}]" in w.origin_log(WWW6, 80)
    # a name the guest resolved to its AAAA through our DNS, two requests on one connection
    out = w.ok("-6", *REMOTE_IP, "http://www.test/hello?1", "http://www.test/hello?2")
    assert out == f"hello www.test /hello?1\nvia={WWW6}\nhello www.test /hello?2\nvia={WWW6}\n", out
    lines = w.proxies["open"].requests()
    assert [line for line in lines if line.startswith("GET")] == [
        f"GET http://[{WWW6}]/hello HTTP/1.1",
        "GET http://www.test/hello?1 HTTP/1.1",
        "GET http://www.test/hello?2 HTTP/1.1",
    ], lines
    # 20 MB through the proxy on an IPv6 guest connection, intact
    size = 20 * MB
    digest = w.guest.run(["sh", "-c", f"curl -6 -sS --max-time 60 'http://[{WWW6}]/big?size={size}' | sha256sum"], 70)
    assert digest.stdout.split()[0] == srv.pattern_sha256(size), digest.stderr


def test_ipv6_transparent_https_connects_by_the_sni_name(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM, ipv6=True)
    assert w.ok("-6", *REMOTE_IP, "https://secure.test/hello") == f"hello secure.test /hello\nvia={WWW6}\n"
    # no SNI for an address literal: the CONNECT names the address, in brackets
    assert w.ok("-6", *REMOTE_IP, f"https://[{WWW6}]/hello") == f"hello [{WWW6}] /hello\nvia={WWW6}\n"
    assert f"REQ GET /hello [{WWW6}]" in w.origin_log(WWW6, 443)
    connects = [line for line in w.proxies["open"].requests() if line.startswith("CONNECT")]
    assert connects == ["CONNECT secure.test:443 HTTP/1.1", f"CONNECT [{WWW6}]:443 HTTP/1.1"], connects


def test_ipv6_no_proxy_by_resolved_name_and_by_address(world: Callable[..., World]) -> None:
    w = world(*UPSTREAM, "--no-proxy", "direct.test,[2001:db8:29::/64]", ipv6=True)
    # by the name the guest resolved (its AAAA) through our DNS, and by an address of the v6 network
    assert w.ok("-6", *REMOTE_IP, "http://direct.test/hello") == f"hello direct.test /hello\nvia={DIRECT6}\n"
    assert w.ok("-6", f"http://[{DIRECT6}]/hello") == f"hello [{DIRECT6}] /hello\n"
    assert not [line for line in w.proxies["open"].requests() if "direct" in line or DIRECT6 in line]
    assert w.origin_log(DIRECT6, 80).count("REQ GET /hello") == 2
    assert w.ok("-6", "http://www.test/hello") == "hello www.test /hello\n"  # and www.test is still proxied
    assert "GET http://www.test/hello HTTP/1.1" in w.proxies["open"].requests()


def test_ipv6_explicit_proxy_literal_through_the_upstream(world: Callable[..., World]) -> None:
    # (the explicit proxy is at the IPv4 gateway only: [fec0::2]:3128 is the host's [::1]:3128)
    w = world(*UPSTREAM, ipv6=True)
    assert w.ok(f"http://[{WWW6}]/hello", env=EXPLICIT) == f"hello [{WWW6}] /hello\n"
    assert w.ok(f"https://[{WWW6}]/hello", env=EXPLICIT) == f"hello [{WWW6}] /hello\n"
    assert w.ok("http://www6.test/hello", env=EXPLICIT) == "hello www6.test /hello\n"  # AAAA only
    lines = w.proxies["open"].requests()
    assert f"GET http://[{WWW6}]/hello HTTP/1.1" in lines and f"CONNECT [{WWW6}]:443 HTTP/1.1" in lines, lines
    assert "GET http://www6.test/hello HTTP/1.1" in lines, lines


def test_ipv6_explicit_proxy_without_upstream_keeps_to_the_policy(world: Callable[..., World]) -> None:
    w = world("--deny", NET6, ipv6=True)
    assert w.ok(f"http://[{DIRECT6}]/hello", env=EXPLICIT) == f"hello [{DIRECT6}] /hello\n"
    assert w.ok("http://direct6.test/hello", env=EXPLICIT) == "hello direct6.test /hello\n"  # resolved: AAAA only
    assert w.origin_log(DIRECT6, 80).count("REQ GET /hello") == 2
    refused = w.curl("-i", f"http://[{WWW6}]/hello", env=EXPLICIT)
    assert refused.stdout.startswith("HTTP/1.1 403"), refused.stdout
    assert "deny" in refused.stdout
    by_name = w.curl("-i", "http://www6.test/hello", env=EXPLICIT)  # its only address is denied
    assert by_name.stdout.startswith("HTTP/1.1 403") and f"({WWW6})" in by_name.stdout, by_name.stdout
    loop = w.curl("-i", "http://[::1]:8888/", env=EXPLICIT)  # the backend's own loopback
    assert loop.stdout.startswith("HTTP/1.1 403"), loop.stdout
    connect = w.curl(f"https://[{WWW6}]/hello", env=EXPLICIT)
    assert connect.returncode != 0 and "403" in connect.stderr, connect
    w.backend.wait_for_log(rf"explicit proxy: \[{re.escape(WWW6)}\]:80 .* not reachable")
    assert w.proxies["open"].requests() == []

"""HTTP and HTTPS through an upstream HTTP proxy, and the explicit proxy at the gateway.

Theory of operation. The route decision (core/fwd.py) gives a guest TCP flow to a transparent
port (80, 443 by default) the route PROXY while an upstream is set, and a flow to the gateway's
port 3128 the route LOCAL "http-proxy". HostTcp (io/host_tcp.py) hands both to this module: the
flow's "host socket" is a ProxySession (an asyncio.Transport, the trick of io/dns_tcp.py), which
talks to the guest through the flow's HostConnection and to its own upstream sockets.

- Transparent HTTP (route path "http"): the session connects to the upstream proxy first (a
  proxy that is down resets the guest's connection at once, like a refused direct connect), then
  reads the guest's requests with h11 (server role) and sends each to the proxy with h11 (client
  role) in absolute form built from its Host header: keep-alive, pipelined requests (answered one
  after the other), chunked and fixed-length bodies, Expect: 100-continue, and Upgrade (after a
  101 the connection is a plain tunnel). Hop-by-hop headers are not passed on; the guest's
  Proxy-Authorization is removed and ours (Basic, from the URL's user:password) set. When the
  proxy closes its connection after a response, the next request opens a new one: the guest's
  keep-alive does not depend on the proxy's.
- Transparent HTTPS (path "https"): the session connects to the proxy, waits up to HELLO_TIMEOUT
  for the guest's TLS ClientHello (io/tls_sni.py; read, never decrypted), sends `CONNECT
  SNI:PORT` (the destination address when there is no SNI) and checks the answer: 2xx splices the
  streams (the ClientHello goes on unchanged); anything else resets the guest's connection, logs
  the status and counts `proxy-connect-refused`.
- no_proxy (io/proxy_config.py) is matched against the destination address and the name the
  guest resolved for it through our DNS (before anything is connected: such a flow is simply a
  direct connection), and against the first request's Host name or the SNI name: a match
  closes the proxy connection and replays the guest's bytes to the destination directly.
- The explicit proxy (LOCAL "http-proxy", the gateway address, port 3128 by default):
  absolute-form requests and CONNECT, through the upstream when one is set for the scheme
  (http_proxy for requests, https_proxy for CONNECT) and no_proxy does not match, and directly
  otherwise. A direct destination is resolved (IP literal, our DNS zones and built-in names, else
  the host's resolver) and every address is checked with the route table (fwd.decide): only
  DIRECT or PROXY routes may be connected to, so the policy holds for the explicit proxy too
  (the host's loopback only as the gateway address, when the policy lets guests reach it);
  anything else is answered 403. Through the upstream, a destination given as an address (or a
  name our DNS answers) is checked the same way; other names are the upstream's to decide.

Bounds: a request or response head over MAX_HEAD bytes (h11's max_incomplete_event_size) or
bytes that are not HTTP end that connection (reset, logged, counted); so does a ClientHello that
does not come within HELLO_TIMEOUT or is not TLS. A session holds at most MAX_PENDING guest bytes
while its upstream is not ready, then pauses the guest (the core closes its window); the
upstream's write buffer pauses the guest the same way, and the core's pause_reading pauses the
upstream socket. Nothing else grows per connection.
"""

import argparse
import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import h11

from qemu_vpnnet.core.config import any_ip_bytes, ip_str
from qemu_vpnnet.core.fwd import DIRECT, KIND_NAMES, LOCAL, PROTO_TCP, PROXY, Route, RouteTable, Rule, addr_value
from qemu_vpnnet.io.host_tcp import tune_stream
from qemu_vpnnet.io.proxy_config import ProxyConfigError, ProxySettings, ProxyUrl, split_host_port
from qemu_vpnnet.io.tls_sni import FOUND, MAX_HELLO, NEED_MORE, parse_client_hello

if TYPE_CHECKING:
    from qemu_vpnnet.io.host_tcp import HostConnection, HostTcp
    from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.proxy")

MAX_HEAD: Final = 65536  # bytes of a request or response head
MAX_PENDING: Final = 256 * 1024  # guest bytes held while the upstream is not ready
HELLO_TIMEOUT: Final = 5.0  # seconds for the guest's ClientHello
WARN_INTERVAL: Final = 10.0  # seconds between two log lines about the same upstream failure
MAX_WARNED: Final = 256

# hop-by-hop headers (RFC 9110 section 7.6.1) and our own business: never passed on
HOP_BY_HOP: Final = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"upgrade",
    )
)

# session modes
HELLO: Final = "hello"  # transparent HTTPS: waiting for the ClientHello
HTTP: Final = "http"  # requests parsed with h11
CONNECT_WAIT: Final = "connect-wait"  # CONNECT sent upstream, waiting for its answer
DIRECT_WAIT: Final = "direct-wait"  # no_proxy matched: connecting to the destination itself
TUNNEL: Final = "tunnel"  # bytes both ways
CLOSED: Final = "closed"

Headers = list[tuple[bytes, bytes]]


class Lost:
    """To the guest: the "host socket" closed cleanly (connection_lost(None))."""


LOST: Final = Lost()
ToGuest = bytes | Exception | Lost | None  # data, FIN (None), reset (an exception), closed


class Refused(Exception):
    """A destination of the explicit proxy may not be reached: status code and text for the guest."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def absolute_target(target: bytes, host_header: bytes, dst_addr: str, dst_port: int) -> tuple[bytes, str, int]:
    """A transparent request's target in absolute form, and the host name and port it names.

    target is the request target as the guest sent it (origin form "/path", or already absolute
    "http://host/path"); host_header the Host value (b"" when none: the destination address is
    used); dst_port the port the guest connected to (the default when Host names none).
    ProxyConfigError when the Host value is not HOST[:PORT].
    """
    if target[:7].lower() == b"http://":
        rest = target[7:]
        slash = rest.find(b"/")
        authority = rest if slash < 0 else rest[:slash]
        host, port = split_host_port(authority.decode("latin-1"), 80)
        return target, host, port
    if host_header:
        host, port = split_host_port(host_header.decode("latin-1"), dst_port)
    else:
        host, port = dst_addr, dst_port
    shown = f"[{host}]" if ":" in host else host
    if port != 80:
        shown += f":{port}"
    path = target if target.startswith(b"/") else b"/" + target if target != b"*" else b"/"
    return b"http://" + shown.encode("latin-1") + path, host, port


def split_url(target: bytes) -> tuple[str, int, bytes]:
    """An explicit proxy request's absolute-form http:// target: (host, port, origin-form path)."""
    if target[:7].lower() != b"http://":
        raise ProxyConfigError("not an absolute http:// URL")
    rest = target[7:]
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    query = authority.find(b"?")
    if query >= 0:  # http://host?x
        authority, path = authority[:query], b"/" + authority[query:]
    host, port = split_host_port(authority.decode("latin-1"), 80)
    if not host:
        raise ProxyConfigError("no host in the URL")
    return host, port, path


def authority_text(host: str, port: int) -> str:
    """HOST:PORT, an IPv6 address in brackets ([2001:db8::1]:80): what logs and answers show."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forward_headers(headers: "h11._headers.Headers", keep_upgrade: bool) -> Headers:
    """headers without the hop-by-hop ones (and those the Connection header names); with
    keep_upgrade, Connection: upgrade and Upgrade stay (a protocol switch asked or granted)."""
    named: set[bytes] = set()
    upgrade = False
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                named.add(token)
                upgrade = upgrade or token == b"upgrade"
    result: Headers = []
    for name, value in headers.raw_items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            if keep_upgrade and upgrade and lower == b"upgrade":
                result.append((name, value))
            continue
        result.append((name, value))
    if keep_upgrade and upgrade:
        result.append((b"Connection", b"upgrade"))
    return result


def head_size(event: h11.Request) -> int:
    """About the bytes of a request head (h11 checks the size only of a head not complete yet)."""
    return len(event.method) + len(event.target) + 12 + sum(len(n) + len(v) + 4 for n, v in event.headers)


def header_value(headers: "h11._headers.Headers", wanted: bytes) -> bytes:
    for name, value in headers:
        if name == wanted:
            return bytes(value)
    return b""


class Upstream(asyncio.Protocol):
    """One upstream socket of a session (the proxy, or a destination)."""

    def __init__(self, session: "ProxySession") -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tune_stream(transport)
        if self.session.reading_paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.session.upstream is self:
            self.session.upstream_data(data)

    def eof_received(self) -> bool:
        if self.session.upstream is self:
            self.session.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session.upstream is self:
            self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.session.upstream is self:
            self.session.hold_guest("upstream", True)

    def resume_writing(self) -> None:
        if self.session.upstream is self:
            self.session.hold_guest("upstream", False)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, graceful: bool = False) -> None:
        if self.transport is not None:
            if graceful:
                self.transport.close()  # what is buffered still goes out
            else:
                self.transport.abort()


class ProxySession(asyncio.Transport):
    """Plays the host socket of one proxied guest connection (transparent or explicit)."""

    def __init__(
        self,
        proxy: "HttpProxy",
        protocol: "HostConnection",
        kind: str,
        dst_addr: str = "",
        dst_port: int = 0,
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self.shell = proxy.shell
        self.loop = proxy.shell.loop
        self.protocol = protocol
        self.kind = kind  # "http", "https" (transparent) or "explicit"
        self.dst_addr = dst_addr  # transparent: the destination (host side) and its port
        self.dst_port = dst_port
        self.mode = HELLO if kind == "https" else HTTP
        self.upstream: Upstream | None = None
        self.upstream_key: tuple[str, str, int] | None = None  # ("proxy"|"direct", host, port)
        self.upstream_url: ProxyUrl | None = None  # the proxy self.upstream talks to (None: direct)
        self.client: h11.Connection | None = None  # toward the upstream
        self.server = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)  # toward the guest
        self.raw = bytearray()  # guest bytes kept for a replay (until the first request or SNI is decided)
        self.keep_raw = kind != "explicit"
        self.pending = bytearray()  # guest bytes that came while blocked
        self.blocked = False  # not feeding h11: waiting for an upstream or the end of a response
        self.discard_body = False  # the current request was answered here: drop its body
        self.in_write = 0
        self.to_guest: list[ToGuest] = []
        self.flush_scheduled = False
        self.guest_eof = False
        self.eof_fed = False  # h11 knows of the guest's FIN
        self.holds: set[str] = set()
        self.reading_paused = False
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.hello_timer: asyncio.TimerHandle | None = None
        self.target_text = ""  # what the log says this session goes to
        # the current request, while it may be sent again: a kept-alive upstream connection that
        # closes before any answer (the proxy ended it meanwhile) gets it once more on a new one
        self.retry: tuple[tuple[str, str, int], str, int, h11.Request] | None = None
        if self.mode == HELLO:
            self.hello_timer = self.loop.call_later(HELLO_TIMEOUT, self.hello_timeout)

    # ---- what HostConnection and HostTcp call ------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading_paused = True
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None and not upstream.transport.is_closing():
            upstream.transport.pause_reading()

    def resume_reading(self) -> None:
        self.reading_paused = False
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None and not upstream.transport.is_closing():
            upstream.transport.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the guest."""
        if self.closing:
            return
        self.in_write += 1
        try:
            mode = self.mode
            if mode == TUNNEL:
                assert self.upstream is not None
                self.upstream.write(bytes(data))
            elif mode == HTTP:
                self.guest_http(bytes(data))
            elif mode == HELLO:
                self.guest_hello(bytes(data))
            else:  # CONNECT_WAIT, DIRECT_WAIT: kept for later
                self.raw += data
                if len(self.raw) > MAX_PENDING:
                    self.hold_guest("pending", True)
        except (h11.ProtocolError, ProxyConfigError) as exc:
            self.fail(f"{exc}", "proxy-bad-request")
        finally:
            self.in_write -= 1

    def write_eof(self) -> None:
        """The guest sent FIN."""
        if self.closing:
            return
        self.guest_eof = True
        self.in_write += 1
        try:
            if self.mode == TUNNEL:
                transport = self.upstream.transport if self.upstream is not None else None
                if transport is not None and not transport.is_closing() and transport.can_write_eof():
                    transport.write_eof()
            elif self.mode == HTTP and not self.blocked:
                self.eof_fed = True
                self.guest_http(b"")
            elif self.mode == HTTP:
                pass  # finish the response in progress; the end of the cycle sees guest_eof
            else:
                self.shutdown(None)
        except (h11.ProtocolError, ProxyConfigError) as exc:
            self.fail(f"{exc}", "proxy-bad-request")
        finally:
            self.in_write -= 1

    def close(self) -> None:
        self.shutdown(None, notify=False, graceful=True)

    def abort(self) -> None:
        self.shutdown(None, notify=False)

    # ---- toward the guest --------------------------------------------------------------
    def deliver(self, item: ToGuest) -> None:
        """Bytes to the guest, or its end (None: FIN; an exception: RST; LOST: closed); in order, and never
        from inside a call the core made (write, write_eof): those go on the next turn."""
        if self.to_guest or self.in_write:
            self.to_guest.append(item)
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self.flush_to_guest)
            return
        self.hand_over(item)

    def flush_to_guest(self) -> None:
        self.flush_scheduled = False
        items = self.to_guest
        self.to_guest = []
        for item in items:
            self.hand_over(item)

    def hand_over(self, item: ToGuest) -> None:
        protocol = self.protocol
        if isinstance(item, bytes):
            if item:
                protocol.data_received(item)
        elif item is None:
            protocol.eof_received()
        elif isinstance(item, Lost):
            protocol.connection_lost(None)
        else:
            protocol.connection_lost(item)

    def hold_guest(self, reason: str, hold: bool) -> None:
        """Stop (or let go on) the guest's sending for reason; it goes on when no reason is left."""
        holds = self.holds
        before = bool(holds)
        if hold:
            holds.add(reason)
        else:
            holds.discard(reason)
        if bool(holds) != before and not self.protocol.gone:
            if holds:
                self.protocol.pause_writing()
            else:
                self.protocol.resume_writing()

    # ---- upstream sockets --------------------------------------------------------------
    def attach(self, upstream: Upstream, key: tuple[str, str, int]) -> None:
        self.upstream = upstream
        self.upstream_key = key
        self.client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        if self.reading_paused and upstream.transport is not None:
            upstream.transport.pause_reading()

    def drop_upstream(self, graceful: bool = False) -> None:
        upstream = self.upstream
        self.upstream = None
        self.upstream_key = None
        self.client = None
        if upstream is not None:
            self.hold_guest("upstream", False)
            upstream.close(graceful)

    def spawn(self, coro: "Callable[[], Any]") -> None:
        task: asyncio.Task[None] = self.loop.create_task(coro())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open_upstream(self, host: str, port: int) -> Upstream:
        _transport, upstream = await self.loop.create_connection(lambda: Upstream(self), host, port)
        return upstream

    def upstream_data(self, data: bytes) -> None:
        if self.closing:
            return
        mode = self.mode
        try:
            if mode == TUNNEL:
                self.deliver(data)
            elif mode == HTTP:
                assert self.client is not None
                self.client.receive_data(data)
                self.pump_responses()
            elif mode == CONNECT_WAIT:
                assert self.client is not None
                self.client.receive_data(data)
                self.connect_answer()
            # HELLO: the proxy has nothing to say before our CONNECT; ignore
        except h11.ProtocolError as exc:
            self.fail(f"bad answer from {self.target_text or 'upstream'}: {exc}", "proxy-bad-response")

    def upstream_eof(self) -> None:
        if self.closing:
            return
        if self.mode == TUNNEL:
            self.deliver(None)  # half-close: the guest may still send
            return
        self.upstream_data_closed()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.closing:
            return
        if self.mode == TUNNEL:
            self.deliver(ConnectionResetError("upstream reset") if exc is not None else LOST)
            self.shutdown(None, notify=False)
            return
        self.upstream_data_closed()

    def upstream_data_closed(self) -> None:
        """The upstream closed in HTTP or CONNECT_WAIT mode."""
        client = self.client
        if self.mode == HTTP and client is not None and client.their_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE):
            if client.our_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                self.drop_upstream()  # between responses: the next request opens a new connection
                return
        retry = self.retry
        if self.mode == HTTP and retry is not None and client is not None and client.our_state is h11.DONE:
            self.retry = None
            self.proxy.count("proxy-request-retried")
            key, host, port, request = retry
            self.open_and_send(key, host, port, request, again=True)
            return
        if self.mode == HTTP and client is not None:
            try:
                client.receive_data(b"")
                self.pump_responses()  # a close-delimited body ends here
            except h11.ProtocolError:
                pass
            # (their_state first: after `self.client is not client` mypy takes client for self.client's
            # Optional type, and an isolated build has no h11 stubs to say more)
            if self.closing or client.their_state is h11.DONE or self.client is not client:
                return
        what = self.target_text or "upstream"
        if self.mode == HTTP and self.server.our_state is h11.SEND_RESPONSE:
            self.proxy.count("proxy-upstream-closed")
            self.drop_upstream()
            self.answer(502, f"{what} closed the connection before its answer", unblock=True)
            return
        self.fail(f"{what} closed the connection before its answer", "proxy-upstream-closed")

    # ---- transparent HTTPS -------------------------------------------------------------
    def guest_hello(self, data: bytes) -> None:
        self.raw += data
        status, name = parse_client_hello(bytes(self.raw))
        if status == NEED_MORE:
            if len(self.raw) > MAX_HELLO + 4096:
                self.fail("TLS ClientHello too long", "proxy-bad-hello")
            return
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        if status != FOUND:
            self.fail("not a TLS ClientHello", "proxy-bad-hello")
            return
        names = [name] if name else []
        if self.proxy.bypass(names, self.dst_addr, self.dst_port):
            self.go_direct(name or self.dst_addr)
            return
        url = self.upstream_url
        assert url is not None and self.client is not None
        host = name or self.dst_addr
        authority = (f"[{host}]" if ":" in host else host) + f":{self.dst_port}"
        self.target_text = f"CONNECT {authority} via {url.host}:{url.port}"
        self.mode = CONNECT_WAIT
        self.send_upstream(
            h11.Request(method=b"CONNECT", target=authority.encode(), headers=connect_headers(authority, url))
        )
        self.send_upstream(h11.EndOfMessage())
        self.proxy.count("proxy-https-connects")

    def hello_timeout(self) -> None:
        self.hello_timer = None
        if self.mode == HELLO and not self.closing:
            self.fail(f"no TLS ClientHello within {HELLO_TIMEOUT:.0f} s", "proxy-hello-timeout")

    def connect_answer(self) -> None:
        """The upstream's answer to our CONNECT (transparent HTTPS)."""
        client = self.client
        assert client is not None
        event = client.next_event()
        if event is h11.NEED_DATA:
            return
        if isinstance(event, h11.Response) and 200 <= event.status_code < 300 and self.kind == "explicit":
            self.switch_to_tunnel(
                h11.Response(status_code=200, headers=[], reason=b"Connection established"), client.trailing_data[0]
            )
            return
        if isinstance(event, h11.Response) and 200 <= event.status_code < 300:
            leftover = client.trailing_data[0]
            self.mode = TUNNEL
            assert self.upstream is not None
            raw = bytes(self.raw)
            self.raw = bytearray()
            self.keep_raw = False
            self.upstream.write(raw)
            self.hold_guest("pending", False)
            if leftover:
                self.deliver(leftover)
            if self.guest_eof:
                self.write_eof()
            return
        status, reason = 0, ""
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            status, reason = event.status_code, event.reason.decode("latin-1")
        self.proxy.count("proxy-connect-refused")
        if self.kind == "explicit":  # the guest asked for a proxy: it gets the proxy's status
            self.mode = HTTP
            self.drop_upstream()
            self.answer(status if 400 <= status < 600 else 502, f"{self.target_text}: {status} {reason}", unblock=True)
            return
        self.proxy.warn(
            f"refused:{status}",
            f"{self.target_text}: the proxy answered {status} {reason}; the guest's connection is reset",
        )
        self.shutdown(ConnectionResetError("CONNECT refused"))

    def go_direct(self, name: str) -> None:
        """no_proxy matched the first request's Host or the SNI: the destination directly, with
        the guest's bytes so far replayed."""
        self.proxy.count("proxy-no-proxy-direct")
        self.drop_upstream()
        self.mode = DIRECT_WAIT
        self.keep_raw = False
        self.target_text = f"{self.dst_addr}:{self.dst_port} (no_proxy {name})"

        async def connect() -> None:
            try:
                upstream = await self.open_upstream(self.dst_addr, self.dst_port)
            except OSError as exc:
                self.fail(f"direct connect to {self.target_text}: {exc.strerror or exc}", "proxy-direct-failed")
                return
            if self.closing:
                upstream.close()
                return
            self.attach(upstream, ("direct", self.dst_addr, self.dst_port))
            self.mode = TUNNEL
            raw = bytes(self.raw)
            self.raw = bytearray()
            self.pending = bytearray()
            upstream.write(raw)
            self.hold_guest("pending", False)
            if self.guest_eof:
                self.write_eof()

        self.spawn(connect)

    # ---- HTTP: requests from the guest ------------------------------------------------
    def guest_http(self, data: bytes) -> None:
        if self.blocked:
            self.pending += data
            if len(self.pending) > MAX_PENDING:
                self.hold_guest("pending", True)
            return
        if self.keep_raw:
            self.raw += data
        self.server.receive_data(data)
        self.pump_requests()

    def unblock(self) -> None:
        """Feed h11 what came while blocked, and read on."""
        self.blocked = False
        data = bytes(self.pending)
        self.pending = bytearray()
        self.hold_guest("pending", False)
        self.in_write += 1  # deliveries from here go on the next turn, as from write()
        try:
            if data:
                self.guest_http(data)
            else:
                self.pump_requests()
            if self.guest_eof and not self.eof_fed and not self.blocked and self.mode == HTTP and not self.closing:
                self.eof_fed = True
                self.server.receive_data(b"")
                self.pump_requests()
        except (h11.ProtocolError, ProxyConfigError) as exc:
            self.fail(f"{exc}", "proxy-bad-request")
        finally:
            self.in_write -= 1

    def pump_requests(self) -> None:
        server = self.server
        while not self.blocked and self.mode == HTTP and not self.closing:
            try:
                event = server.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    self.fail(f"request head over {MAX_HEAD} bytes", "proxy-head-too-large")
                else:
                    self.fail(f"not HTTP from the guest ({exc})", "proxy-bad-request")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                self.blocked = True  # until our response is done (maybe_next_cycle) or the switch
                return
            if isinstance(event, h11.Request):
                if head_size(event) > MAX_HEAD:  # h11 bounds only a head that is still incomplete
                    self.fail(f"request head over {MAX_HEAD} bytes", "proxy-head-too-large")
                    return
                self.keep_raw_until_decided(event)
                self.on_request(event)
            elif isinstance(event, h11.Data):
                if not self.discard_body:
                    self.send_upstream(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                if not self.discard_body:
                    self.send_upstream(h11.EndOfMessage(headers=list(event.headers.raw_items())))
                self.maybe_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self.finish()
                return

    def keep_raw_until_decided(self, event: h11.Request) -> None:
        """A transparent session keeps the raw bytes only until its first request is decided."""
        if self.kind == "http" and self.keep_raw:
            host = header_value(event.headers, b"host")
            _target, name, port = absolute_target(event.target, host, self.dst_addr, self.dst_port)
            if self.proxy.bypass([name], self.dst_addr, port):
                self.blocked = True  # everything goes as raw bytes from now on
                self.pending = bytearray()
                self.go_direct(name)
                return
        self.keep_raw = False
        self.raw = bytearray()

    def on_request(self, event: h11.Request) -> None:
        if self.mode != HTTP:
            return  # keep_raw_until_decided went direct
        self.discard_body = False
        self.proxy.count("proxy-requests")
        if self.kind == "http":
            self.transparent_request(event)
        elif event.method == b"CONNECT":
            self.explicit_connect(event)
        else:
            self.explicit_request(event)

    def transparent_request(self, event: h11.Request) -> None:
        url = self.upstream_url or self.proxy.settings.http
        assert url is not None
        host = header_value(event.headers, b"host")
        target, name, port = absolute_target(event.target, host, self.dst_addr, self.dst_port)
        headers = forward_headers(event.headers, keep_upgrade=True)
        if not host:
            shown = f"[{name}]" if ":" in name else name
            headers.append((b"Host", (shown if port == 80 else f"{shown}:{port}").encode("latin-1")))
        auth = url.authorization()
        if auth:
            headers.append((b"Proxy-Authorization", auth))
        self.upstream_url = url
        self.target_text = f"{url.host}:{url.port}"
        request = h11.Request(method=event.method, target=target, headers=headers)
        self.send_request(("proxy", url.host, url.port), url.host, url.port, request)

    def explicit_request(self, event: h11.Request) -> None:
        try:
            host, port, path = split_url(event.target)
        except ProxyConfigError as exc:
            self.answer(400, f"the explicit proxy takes absolute http:// URLs and CONNECT ({exc})")
            return
        headers = forward_headers(event.headers, keep_upgrade=True)
        if not header_value(event.headers, b"host"):
            shown = f"[{host}]" if ":" in host else host
            headers.append((b"Host", (shown if port == 80 else f"{shown}:{port}").encode("latin-1")))
        url = self.proxy.settings.http
        if url is not None and not self.proxy.bypass([host], "", port):
            auth = url.authorization()
            if auth:
                headers.append((b"Proxy-Authorization", auth))
            request = h11.Request(method=event.method, target=event.target, headers=headers)
            self.target_text = f"{url.host}:{url.port}"
            self.upstream_url = url
            self.send_request(("proxy", url.host, url.port), url.host, url.port, request, check=(host, port))
            return
        request = h11.Request(method=event.method, target=path, headers=headers)
        self.upstream_url = None
        self.target_text = authority_text(host, port)
        self.send_request(("direct", host, port), host, port, request, check=(host, port), resolve=True)

    def send_request(
        self,
        key: tuple[str, str, int],
        host: str,
        port: int,
        request: h11.Request,
        check: tuple[str, int] | None = None,
        resolve: bool = False,
    ) -> None:
        """Send request on the upstream connection for key, opening one (after the policy check
        of an explicit destination) when there is none that can take it."""
        client = self.client
        if (
            self.upstream is not None
            and self.upstream_key == key
            and client is not None
            and client.our_state is h11.IDLE
            and client.their_state is h11.IDLE
        ):
            self.retry = (key, host, port, request)
            self.send_upstream(request)
            return
        self.retry = None
        self.open_and_send(key, host, port, request, check, resolve)

    def open_and_send(
        self,
        key: tuple[str, str, int],
        host: str,
        port: int,
        request: h11.Request,
        check: tuple[str, int] | None = None,
        resolve: bool = False,
        again: bool = False,
    ) -> None:
        """Open an upstream connection for key and send the request head on it (again: the
        whole bodiless request once more, after a kept-alive connection closed unanswered)."""
        self.drop_upstream()
        self.blocked = True

        async def connect() -> None:
            try:
                addr = host
                if check is not None:
                    checked = await self.proxy.checked_address(check[0], check[1], resolve)
                    if resolve:
                        addr = checked
                upstream = await self.open_upstream(addr, port)
            except Refused as exc:
                self.answer(exc.status, exc.text, unblock=True)
                return
            except OSError as exc:
                self.proxy.count("proxy-upstream-failed")
                reason = exc.strerror or str(exc)
                where = authority_text(host, port)
                if key[0] == "proxy":
                    self.proxy.warn(f"up:{host}:{port}", f"upstream proxy {where}: {reason}")
                if self.kind == "explicit" or key[0] == "direct":
                    self.answer(502, f"cannot connect to {where}: {reason}", unblock=True)
                else:
                    self.fail(f"upstream proxy {where}: {reason}", "")
                return
            if self.closing:
                upstream.close()
                return
            self.attach(upstream, key)
            self.send_upstream(request)
            if again:
                self.send_upstream(h11.EndOfMessage())
            self.unblock_after_head()

        self.spawn(connect)

    def unblock_after_head(self) -> None:
        """The request head went out: read its body (or the next request) from h11 again."""
        self.unblock()

    def send_upstream(self, event: h11.Event) -> None:
        if isinstance(event, h11.Data) and event.data:
            self.retry = None  # a body went out: it cannot be sent again
        client = self.client
        upstream = self.upstream
        if client is None or upstream is None:
            return
        data = client.send(event)
        if data:
            upstream.write(data)

    def explicit_connect(self, event: h11.Request) -> None:
        end = self.server.next_event()  # a CONNECT has no body: its end is there already
        if not isinstance(end, h11.EndOfMessage):
            self.fail("CONNECT with a body", "proxy-bad-request")
            return
        try:
            host, port = split_host_port(event.target.decode("latin-1"), 443)
        except ProxyConfigError as exc:
            self.answer(400, f"CONNECT HOST:PORT expected ({exc})")
            return
        url = self.proxy.settings.https
        self.blocked = True
        authority = authority_text(host, port)
        via_proxy = url is not None and not self.proxy.bypass([host], "", port)

        async def connect() -> None:
            try:
                addr = await self.proxy.checked_address(host, port, resolve=not via_proxy)
                if via_proxy:
                    assert url is not None
                    upstream = await self.open_upstream(url.host, url.port)
                else:
                    upstream = await self.open_upstream(addr, port)
            except Refused as exc:
                self.answer(exc.status, exc.text, unblock=True)
                return
            except OSError as exc:
                self.proxy.count("proxy-upstream-failed")
                where = f"{url.host}:{url.port}" if via_proxy and url is not None else authority
                self.answer(502, f"cannot connect to {where}: {exc.strerror or exc}", unblock=True)
                return
            if self.closing:
                upstream.close()
                return
            if via_proxy:
                assert url is not None
                self.attach(upstream, ("proxy", url.host, url.port))
                self.target_text = f"CONNECT {authority} via {url.host}:{url.port}"
                self.mode = CONNECT_WAIT
                self.send_upstream(
                    h11.Request(method=b"CONNECT", target=authority.encode(), headers=connect_headers(authority, url))
                )
                self.send_upstream(h11.EndOfMessage())
                return
            self.attach(upstream, ("direct", host, port))
            self.target_text = authority
            self.switch_to_tunnel(h11.Response(status_code=200, headers=[], reason=b"Connection established"), b"")

        self.spawn(connect)

    def switch_to_tunnel(self, answer: h11.Response | h11.InformationalResponse, upstream_leftover: bytes) -> None:
        """Send the guest the answer that switches protocols (2xx to CONNECT, 101), then splice."""
        self.deliver(self.server.send(answer) or b"")
        guest_leftover = self.server.trailing_data[0] + bytes(self.pending) + bytes(self.raw)
        self.pending = bytearray()
        self.raw = bytearray()
        self.mode = TUNNEL
        self.blocked = False
        self.hold_guest("pending", False)
        if guest_leftover and self.upstream is not None:
            self.upstream.write(guest_leftover)
        if upstream_leftover:
            self.deliver(upstream_leftover)
        if self.guest_eof:
            self.write_eof()

    # ---- HTTP: responses from the upstream ---------------------------------------------
    def pump_responses(self) -> None:
        while self.mode == HTTP and not self.closing:
            client = self.client
            if client is None:
                return
            event = client.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            self.retry = None
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101 and client.their_state is h11.SWITCHED_PROTOCOL:
                    headers = forward_headers(event.headers, keep_upgrade=True)
                    answer = h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason)
                    self.switch_to_tunnel(answer, client.trailing_data[0])
                    return
                headers = forward_headers(event.headers, keep_upgrade=False)
                self.to_guest_event(
                    h11.InformationalResponse(status_code=event.status_code, headers=headers, reason=event.reason)
                )
            elif isinstance(event, h11.Response):
                if self.upstream_key is not None and self.upstream_key[0] == "proxy" and event.status_code == 407:
                    self.proxy.count("proxy-auth-required")
                headers = forward_headers(event.headers, keep_upgrade=False)
                self.to_guest_event(h11.Response(status_code=event.status_code, headers=headers, reason=event.reason))
            elif isinstance(event, h11.Data):
                self.to_guest_event(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.to_guest_event(h11.EndOfMessage(headers=list(event.headers.raw_items())))
                self.maybe_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    def to_guest_event(self, event: h11.Event) -> None:
        data = self.server.send(event)
        if data:
            self.deliver(data)

    def answer(self, status: int, text: str, unblock: bool = False) -> None:
        """Answer the guest's current request ourselves (explicit proxy errors); its body is dropped."""
        if self.closing:
            return
        if status == 403:
            self.proxy.count("proxy-explicit-forbidden")
            log.info("explicit proxy: %s", text)
        body = (text + "\n").encode("utf-8", "replace")
        reasons = {400: b"Bad Request", 403: b"Forbidden", 502: b"Bad Gateway"}
        headers = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", str(len(body)).encode())]
        self.discard_body = True
        try:
            if self.server.our_state is h11.SEND_RESPONSE:
                self.to_guest_event(h11.Response(status_code=status, headers=headers, reason=reasons.get(status, b"")))
                self.to_guest_event(h11.Data(data=body))
                self.to_guest_event(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            self.fail(f"cannot answer the guest: {exc}", "")
            return
        if self.mode == CONNECT_WAIT:
            self.mode = HTTP
        self.maybe_next_cycle()
        if unblock and self.mode == HTTP and not self.closing and self.server.our_state is not h11.MUST_CLOSE:
            self.unblock()

    def maybe_next_cycle(self) -> None:
        """After a request or response ended: once both are done, ready for the next request."""
        server = self.server
        if self.closing or self.mode != HTTP:
            return
        if server.our_state is h11.MUST_CLOSE:
            if server.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) or self.discard_body:
                self.finish()
            return
        if server.our_state is not h11.DONE or server.their_state is not h11.DONE:
            return
        client = self.client
        if client is not None:
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
            else:
                self.drop_upstream(graceful=True)  # it ends its connection: the next request opens another
        server.start_next_cycle()
        self.discard_body = False
        if self.blocked:
            self.loop.call_soon(self.unblock_if_open)

    def unblock_if_open(self) -> None:
        if not self.closing and self.mode == HTTP and self.blocked and self.server.their_state is h11.IDLE:
            self.unblock()

    def finish(self) -> None:
        """The guest's connection ends cleanly (its Connection: close, or its FIN between requests)."""
        self.deliver(None)
        self.shutdown(None, graceful=True)

    # ---- the end -----------------------------------------------------------------------
    def fail(self, reason: str, counter: str) -> None:
        """This connection ends with a reset; the log says why."""
        if self.closing:
            return
        if counter:
            self.proxy.count(counter)
        log.info(
            "proxied connection (%s%s): %s; reset",
            self.kind,
            f" {self.target_text}" if self.target_text else "",
            reason,
        )
        self.shutdown(ConnectionResetError(reason))

    def shutdown(self, exc: Exception | None, notify: bool = True, graceful: bool = False) -> None:
        """The end of the session: the guest's connection is reset (exc) or closed (None) unless
        the core itself ended it (notify False); the upstream socket is closed or aborted."""
        if self.closing:
            return
        if notify:
            self.deliver(exc if exc is not None else LOST)
        self.closing = True
        self.mode = CLOSED
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.drop_upstream(graceful)
        self.raw = bytearray()
        self.pending = bytearray()
        self.proxy.sessions.discard(self)


def add_explicit_proxy(table: RouteTable, port: int) -> Rule:
    """The explicit proxy as a gateway service of the route table: LOCAL "http-proxy" at the
    gateway address, TCP port port (before every rule, as any gateway service). ValueError when
    a gateway service has that port already."""
    cfg = table.config
    rule = Rule(
        "http-proxy",
        Route(LOCAL, "http-proxy", path="http-proxy"),
        proto=PROTO_TCP,
        net=addr_value(cfg.host_ip),
        prefix=32,
        port_lo=port,
        port_hi=port,
        text=f"local tcp {cfg.host_ip_str()}:{port} http-proxy",
    )
    table.add_guestfwd(rule, cfg.host_ip, port)
    rule.origin = "builtin"
    return rule


def connect_headers(authority: str, url: ProxyUrl) -> Headers:
    headers: Headers = [(b"Host", authority.encode())]
    auth = url.authorization()
    if auth:
        headers.append((b"Proxy-Authorization", auth))
    return headers


class HttpProxy:
    """The proxy settings in force, and the sessions; applies the settings to the route table."""

    def __init__(self, shell: "Shell", settings: ProxySettings) -> None:
        self.shell = shell
        self.settings = settings
        self.sessions: set[ProxySession] = set()
        self.warned: dict[str, float] = {}
        self.explicit_rule_port = 0
        self.apply(settings)

    # ---- settings ----------------------------------------------------------------------
    def apply(self, settings: ProxySettings) -> None:
        """Make settings the ones in force: the route table's proxy ports, the explicit proxy's
        gateway service, the DNS name map. New flows only; proxied flows keep their upstream."""
        stack = self.shell.stack
        table = stack.fwd
        cfg = stack.config
        self.settings = settings
        table.proxy_http_ports = set(settings.http_ports) if settings.http is not None else set()
        table.proxy_https_ports = set(settings.https_ports) if settings.https is not None else set()
        stack.dns.names.enabled = bool(settings.no_proxy) and (settings.http is not None or settings.https is not None)
        if self.explicit_rule_port != settings.explicit_port:
            if self.explicit_rule_port:
                table.remove_guestfwd(PROTO_TCP, cfg.host_ip, self.explicit_rule_port)
                self.explicit_rule_port = 0
            port = settings.explicit_port
            if port:
                add_explicit_proxy(table, port)  # ValueError: that port is a gateway service already
                self.explicit_rule_port = port
        ups = [
            f"http {settings.http.text()}" if settings.http else "",
            f"https {settings.https.text()}" if settings.https else "",
        ]
        log.info(
            "proxy: %s; no_proxy %s; explicit proxy %s",
            ", ".join(u for u in ups if u) or "no upstream (nothing intercepted)",
            settings.no_proxy.text() or "(none)",
            f"{cfg.host_ip_str()}:{settings.explicit_port}" if settings.explicit_port else "off",
        )

    def describe(self) -> dict[str, object]:
        info = self.settings.describe()
        info["explicit-proxy"] = (
            f"{self.shell.stack.config.host_ip_str()}:{self.settings.explicit_port}"
            if self.settings.explicit_port
            else ""
        )
        info["connections"] = len(self.sessions)
        counters = self.shell.stack.counters.snapshot()
        info["counters"] = {name: value for name, value in counters.items() if name.startswith("proxy-")}
        return info

    def count(self, name: str) -> None:
        self.shell.stack.counters.add(name)

    def warn(self, key: str, text: str) -> None:
        now = self.shell.now()
        if now - self.warned.get(key, -WARN_INTERVAL) < WARN_INTERVAL:
            return
        if len(self.warned) >= MAX_WARNED:
            self.warned.clear()
        self.warned[key] = now
        log.warning("%s", text)

    # ---- decisions ---------------------------------------------------------------------
    def bypass(self, names: list[str], addr: str, port: int) -> bool:
        """Whether no_proxy says the destination goes directly: by names, by the name the guest
        resolved for addr through our DNS, or by addr itself."""
        no_proxy = self.settings.no_proxy
        if not no_proxy:
            return False
        resolved = ""
        if addr:
            try:
                resolved = self.shell.stack.dns.names.name_of(any_ip_bytes(addr))
            except (ValueError, OSError):
                resolved = ""
        return no_proxy.matches([*names, resolved], addr, port)

    def upstream_for(self, path: str) -> ProxyUrl | None:
        return self.settings.http if path == "http" else self.settings.https

    async def checked_address(self, host: str, port: int, resolve: bool) -> str:
        """The host-side address to connect to for an explicit proxy destination, after the
        route table allowed it (Refused: 403, or 502 when the name does not resolve).

        resolve=False (through the upstream): only addresses and names our DNS knows are
        checked; other names are returned as they are (the upstream resolves them)."""
        stack = self.shell.stack
        cfg = stack.config
        candidates: list[bytes] = []
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            ip = None
        if ip is not None:
            if ip.version == 6 and not cfg.ipv6:
                raise Refused(403, f"{host}: IPv6 is off (--no-ipv6)")
            candidates = [ip.packed]
        else:
            name = host.lower().rstrip(".")
            known = stack.dns.builtin.get(name)
            if known is None:
                known = stack.dns.zones.lookup(name)
            if known is not None:
                candidates = [addr for addr in known if len(addr) == 4 or cfg.ipv6]
            elif not resolve:
                return host
            else:
                family = socket.AF_UNSPEC if cfg.ipv6 else socket.AF_INET
                try:
                    infos = await self.shell.loop.getaddrinfo(name, port, family=family, type=socket.SOCK_STREAM)
                except (OSError, UnicodeError) as exc:
                    raise Refused(502, f"cannot resolve {host}: {exc}") from None
                for info in infos:
                    packed = ipaddress.ip_address(str(info[4][0]).partition("%")[0]).packed
                    if packed not in candidates:
                        candidates.append(packed)
        if not candidates:
            raise Refused(502, f"{host} has no address")
        last = ""
        for addr in candidates:
            route = stack.fwd.decide(PROTO_TCP, addr, port)
            if route.kind == DIRECT or route.kind == PROXY:
                side = cfg.host_side_address(addr)
                if side:
                    return side if resolve else host
            last = f"{KIND_NAMES[route.kind]} (rule {route.rule or 'default'})"
        shown = ip_str(candidates[-1])
        raise Refused(403, f"{authority_text(host, port)} ({shown}) is not reachable for guests: route {last}")

    # ---- sessions ----------------------------------------------------------------------
    async def connect_transparent(self, host_tcp: "HostTcp", flow: int, addr: str, port: int, path: str) -> None:
        """A PROXY route's flow: connect to the upstream, then the guest's connection is up."""
        from qemu_vpnnet.io.host_tcp import HostConnection

        url = self.upstream_for(path)
        if url is None or self.bypass([], addr, port):
            await host_tcp.connect(flow, addr, port)  # no upstream any more, or no_proxy: direct
            return
        loop = self.shell.loop
        conn = HostConnection(host_tcp, flow)
        session = ProxySession(self, conn, path, addr, port)
        try:
            _transport, upstream = await loop.create_connection(lambda: Upstream(session), url.host, url.port)
        except OSError as exc:
            session.shutdown(None, notify=False)
            self.count("proxy-upstream-failed")
            self.warn(
                f"up:{url.host}:{url.port}",
                f"upstream proxy {url.host}:{url.port}: {exc.strerror or exc}; the guest's connection is reset",
            )
            host_tcp.failed(flow, exc, f"{url.host}:{url.port}", None)
            return
        except asyncio.CancelledError:
            session.shutdown(None, notify=False)
            host_tcp.connecting.pop(flow, None)
            raise
        session.upstream_url = url
        session.attach(upstream, ("proxy", url.host, url.port))
        session.target_text = f"{url.host}:{url.port}"
        self.count(f"proxy-{path}-connections")
        self.sessions.add(session)
        conn.connection_made(session)
        host_tcp.opened(flow, conn)

    def open_explicit(self, host_tcp: "HostTcp", flow: int) -> None:
        """A flow to the explicit proxy: up at once (the session answers the guest itself)."""
        from qemu_vpnnet.io.host_tcp import HostConnection

        conn = HostConnection(host_tcp, flow)
        session = ProxySession(self, conn, "explicit")
        self.sessions.add(session)
        self.count("proxy-explicit-connections")
        conn.connection_made(session)
        host_tcp.conns[flow] = conn
        host_tcp.tcp.host_connected(flow, self.shell.now())
        self.shell.schedule_flush()

    def close(self) -> None:
        for session in list(self.sessions):
            session.shutdown(None, notify=False)
        self.sessions.clear()


def start_proxy(shell: "Shell", args: argparse.Namespace) -> "HttpProxy":
    """The proxy of the command line (io/proxy_config.py add_proxy_options) on shell's HostTcp;
    StartupError when it cannot be used."""
    from qemu_vpnnet.io.proxy_config import settings_from_args
    from qemu_vpnnet.io.shell import StartupError

    try:
        settings = settings_from_args(args)
    except ProxyConfigError as exc:
        raise StartupError(str(exc)) from exc
    assert shell.host_tcp is not None
    try:
        proxy = HttpProxy(shell, settings)
    except ValueError as exc:
        raise StartupError(
            f"--explicit-proxy-port {settings.explicit_port}: {exc} (give another port, or 0 for none)"
        ) from exc
    shell.host_tcp.proxy = proxy
    return proxy

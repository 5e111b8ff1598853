"""Upstream HTTP proxy settings: proxy URLs, no_proxy lists (curl's meaning), port lists.

Plain parsing, no I/O. `ProxyUrl.parse` takes what curl takes for a proxy: `[http://][USER[:PASSWORD]@]HOST[:PORT]`
(user and password percent-decoded; no port: 1080, as curl); other schemes (https://, socks5://) are refused, since the
backend speaks plain HTTP to its upstream. `NoProxy.parse` takes curl's no_proxy: entries separated by commas or
white space; `*` alone matches everything; a host name matches itself and every name below it (a leading dot changes
nothing, `.example.com` = `example.com`); an IPv4 or IPv6 address or CIDR network matches addresses; any entry may
name one port (`host:8080`, `[2001:db8::1]:443`, `10.0.0.0/8:80`) and then matches only that port.
"""

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

DEFAULT_PROXY_PORT: Final = 1080  # curl's, for a proxy URL without a port
DEFAULT_HTTP_PORTS: Final = (80,)
DEFAULT_HTTPS_PORTS: Final = (443,)
DEFAULT_EXPLICIT_PORT: Final = 3128
MAX_NO_PROXY: Final = 1024  # entries of one no_proxy list
MAX_PORTS: Final = 64  # ports of one --transparent-*-ports list


class ProxyConfigError(ValueError):
    """A proxy setting cannot be used; the message names the bad part."""


@dataclass(frozen=True)
class ProxyUrl:
    """An upstream HTTP proxy: where it listens, and the Basic credentials to give it."""

    host: str
    port: int
    user: str = ""
    password: str = ""

    @staticmethod
    def parse(text: str) -> "ProxyUrl":
        raw = text.strip()
        if not raw:
            raise ProxyConfigError("empty proxy URL")
        scheme, sep, rest = raw.partition("://")
        if not sep:
            scheme, rest = "http", raw
        if scheme.lower() != "http":
            raise ProxyConfigError(f"proxy scheme {scheme}:// is not supported (only http://)")
        rest = rest.split("/", 1)[0]  # a path ("http://proxy:3128/") means nothing for a proxy
        userinfo, at, hostport = rest.rpartition("@")
        user = password = ""
        if at:
            name, colon, secret = userinfo.partition(":")
            user, password = unquote(name), unquote(secret) if colon else ""
        host, port = split_host_port(hostport, DEFAULT_PROXY_PORT)
        if not host:
            raise ProxyConfigError(f"proxy URL {safe_text(text)!r} has no host")
        return ProxyUrl(host, port, user, password)

    def text(self) -> str:
        """The URL without the password (for query-proxy and the log)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        return f"http://{user}{host}:{self.port}"

    def authorization(self) -> bytes:
        """The Proxy-Authorization value (b"" without credentials)."""
        if not self.user and not self.password:
            return b""
        import base64

        return b"Basic " + base64.b64encode(f"{self.user}:{self.password}".encode())


def safe_text(url: str) -> str:
    """url with any password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostport = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return (scheme + sep if sep else "") + (userinfo + at if at else "") + hostport


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """HOST[:PORT] or [V6][:PORT] -> (host, port); a bare IPv6 address takes default_port."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ProxyConfigError(f"{text!r}: missing ]")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ProxyConfigError(f"{text!r}: junk after ]")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ProxyConfigError(f"{text!r}: port {port_text!r} is not 1..65535")
    return host, int(port_text)


def parse_ports(text: str, what: str) -> tuple[int, ...]:
    """A comma-separated port list ("80,8080"); "" is no port at all."""
    ports: list[int] = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) <= 65535:
            raise ProxyConfigError(f"{what}: {item!r} is not a port number 1..65535")
        if int(item) not in ports:
            ports.append(int(item))
    if len(ports) > MAX_PORTS:
        raise ProxyConfigError(f"{what}: more than {MAX_PORTS} ports")
    return tuple(ports)


@dataclass(frozen=True)
class NoProxyEntry:
    """One entry: a name suffix (name), or a network (net), optionally for one port (0: any)."""

    name: str = ""
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int = 0

    def text(self) -> str:
        what = self.name if self.net is None else str(self.net)
        if self.port:
            return f"[{what}]:{self.port}" if self.net is not None and self.net.version == 6 else f"{what}:{self.port}"
        return what


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def parse_no_proxy_entry(item: str) -> NoProxyEntry:
    port = 0
    body = item
    if body.startswith("["):  # [v6] or [v6]:port or [v6/len]:port
        end = body.find("]")
        if end < 0:
            raise ProxyConfigError(f"no_proxy entry {item!r}: missing ]")
        rest = body[end + 1 :]
        body = body[1:end]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ProxyConfigError(f"no_proxy entry {item!r}: expected [ADDRESS]:PORT")
            port = int(rest[1:])
    elif body.count(":") == 1:  # name:port, v4:port, v4/len:port
        body, port_text = body.split(":")
        if not port_text.isdigit():
            raise ProxyConfigError(f"no_proxy entry {item!r}: port {port_text!r} is not a number")
        port = int(port_text)
    if port and not 0 < port <= 65535:
        raise ProxyConfigError(f"no_proxy entry {item!r}: port {port} is not 1..65535")
    net = parse_network(body)
    if net is not None:
        return NoProxyEntry(net=net, port=port)
    if ":" in body or "/" in body:
        raise ProxyConfigError(f"no_proxy entry {item!r} is neither a host name nor an address")
    name = body.lower().strip(".")
    if name.startswith("*."):
        name = name[2:]  # *.example.com: as example.com (curl ignores the star too)
    if not name or "*" in name:
        raise ProxyConfigError(f"no_proxy entry {item!r}: '*' only alone or as '*.' in front")
    return NoProxyEntry(name=name, port=port)


@dataclass(frozen=True)
class NoProxy:
    """A parsed no_proxy list."""

    entries: tuple[NoProxyEntry, ...] = ()
    everything: bool = False  # "*"
    source: str = ""

    @staticmethod
    def parse(text: str) -> "NoProxy":
        entries: list[NoProxyEntry] = []
        everything = False
        for item in text.replace(",", " ").split():
            if item == "*":
                everything = True
                continue
            entries.append(parse_no_proxy_entry(item))
        if len(entries) > MAX_NO_PROXY:
            raise ProxyConfigError(f"no_proxy: more than {MAX_NO_PROXY} entries")
        return NoProxy(tuple(entries), everything, text.strip())

    @property
    def has_names(self) -> bool:
        return self.everything or any(entry.net is None for entry in self.entries)

    def __bool__(self) -> bool:
        return self.everything or bool(self.entries)

    def matches(self, names: "list[str] | tuple[str, ...]", addr: str, port: int) -> bool:
        """Whether a destination named any of names (Host header, SNI, the name the guest
        resolved; an address literal counts as an address), at address addr ("" when not
        known) and port, must not be proxied."""
        if self.everything:
            return True
        if not self.entries:
            return False
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        hostnames: list[str] = []
        for value in (*names, addr):
            if not value:
                continue
            value = value.strip("[]")
            try:
                ips.append(ipaddress.ip_address(value))
                continue
            except ValueError:
                pass
            hostnames.append(value.lower().rstrip("."))
        for entry in self.entries:
            if entry.port and entry.port != port:
                continue
            net = entry.net
            if net is not None:
                if any(ip.version == net.version and ip in net for ip in ips):
                    return True
            elif any(name == entry.name or name.endswith("." + entry.name) for name in hostnames):
                return True
        return False

    def text(self) -> str:
        items = ["*"] if self.everything else []
        return ",".join(items + [entry.text() for entry in self.entries])


@dataclass
class ProxySettings:
    """Everything about the upstream proxy: what the command line and proxy-set change."""

    http: ProxyUrl | None = None
    https: ProxyUrl | None = None
    no_proxy: NoProxy = field(default_factory=NoProxy)
    http_ports: tuple[int, ...] = DEFAULT_HTTP_PORTS
    https_ports: tuple[int, ...] = DEFAULT_HTTPS_PORTS
    explicit_port: int = DEFAULT_EXPLICIT_PORT  # 0: no explicit proxy at the gateway

    def describe(self) -> dict[str, object]:
        """For query-proxy: the settings, without passwords."""
        return {
            "http-proxy": self.http.text() if self.http else "",
            "https-proxy": self.https.text() if self.https else "",
            "no-proxy": self.no_proxy.text(),
            "transparent-http-ports": list(self.http_ports),
            "transparent-https-ports": list(self.https_ports),
            "explicit-proxy-port": self.explicit_port,
        }


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """name in lower case, else in upper case (curl's order); None when neither is set."""
    value = env.get(name)
    if value is None:
        value = env.get(name.upper())
    return value


def settings_from_env(settings: ProxySettings, env: Mapping[str, str] | None = None) -> ProxySettings:
    """settings with http_proxy, https_proxy and no_proxy (either case) from env (default: os.environ)
    filled in where settings has none; an empty variable is not set."""
    values = os.environ if env is None else env
    http_text = env_value(values, "http_proxy")
    https_text = env_value(values, "https_proxy")
    no_text = env_value(values, "no_proxy")
    try:
        if settings.http is None and http_text:
            settings.http = ProxyUrl.parse(http_text)
        if settings.https is None and https_text:
            settings.https = ProxyUrl.parse(https_text)
    except ProxyConfigError as exc:
        raise ProxyConfigError(f"proxy environment: {exc}") from exc
    if not settings.no_proxy and no_text:
        settings.no_proxy = NoProxy.parse(no_text)
    return settings


# ---- the command line ----------------------------------------------------------------------
def url_arg(text: str) -> str:
    """--http-proxy/--https-proxy: checked at parse time, kept as text."""
    try:
        ProxyUrl.parse(text)
    except ProxyConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def no_proxy_arg(text: str) -> str:
    try:
        NoProxy.parse(text)
    except ProxyConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def ports_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_ports(text, "ports")
    except ProxyConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def port_arg(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number 0..65535")
    return int(text)


def add_proxy_options(p: argparse.ArgumentParser) -> None:
    """The upstream HTTP proxy and the explicit proxy (docs/proxy.rst)."""
    g = p.add_argument_group("HTTP proxy (see docs/proxy.rst)")
    g.add_argument(
        "--http-proxy",
        type=url_arg,
        metavar="URL",
        help="upstream proxy [http://][USER:PASSWORD@]HOST[:PORT] (port default 1080, as curl) for guest HTTP: "
        "guest TCP to --transparent-http-ports goes through it, requests rewritten to absolute form "
        "(default: none, nothing intercepted)",
    )
    g.add_argument(
        "--https-proxy",
        type=url_arg,
        metavar="URL",
        help="upstream proxy for guest HTTPS: guest TCP to --transparent-https-ports is tunnelled with "
        "CONNECT NAME:PORT, NAME from the TLS ClientHello's SNI (default: none)",
    )
    g.add_argument(
        "--no-proxy",
        type=no_proxy_arg,
        metavar="LIST",
        help="destinations that go directly, curl's no_proxy: host names (and the names below them), "
        "addresses, CIDRs, '*'; NAME:PORT for one port (default: none)",
    )
    g.add_argument(
        "--proxy-env",
        action="store_true",
        help="take http_proxy, https_proxy and no_proxy (either case) from the environment where the "
        "options above are not given (default: off)",
    )
    g.add_argument(
        "--transparent-http-ports",
        type=ports_arg,
        default=DEFAULT_HTTP_PORTS,
        metavar="PORTS",
        help="comma-separated TCP ports proxied as HTTP while --http-proxy is set (default 80)",
    )
    g.add_argument(
        "--transparent-https-ports",
        type=ports_arg,
        default=DEFAULT_HTTPS_PORTS,
        metavar="PORTS",
        help="comma-separated TCP ports proxied with CONNECT while --https-proxy is set (default 443)",
    )
    g.add_argument(
        "--explicit-proxy-port",
        type=port_arg,
        default=DEFAULT_EXPLICIT_PORT,
        metavar="PORT",
        help="the gateway address's port of the explicit HTTP proxy (http_proxy=http://GATEWAY:PORT in a "
        f"guest); 0 turns it off (default {DEFAULT_EXPLICIT_PORT})",
    )
    g.add_argument(
        "--no-explicit-proxy",
        dest="explicit_proxy_port",
        action="store_const",
        const=0,
        help="no explicit proxy at the gateway (as --explicit-proxy-port 0)",
    )


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ProxySettings:
    """The settings of the command line (ProxyConfigError names a bad environment variable)."""
    settings = ProxySettings(
        http=ProxyUrl.parse(args.http_proxy) if args.http_proxy else None,
        https=ProxyUrl.parse(args.https_proxy) if args.https_proxy else None,
        no_proxy=NoProxy.parse(args.no_proxy) if args.no_proxy else NoProxy(),
        http_ports=tuple(args.transparent_http_ports),
        https_ports=tuple(args.transparent_https_ports),
        explicit_port=args.explicit_proxy_port,
    )
    if args.proxy_env:
        settings = settings_from_env(settings, env)
    return settings

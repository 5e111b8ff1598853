"""QMP commands of the HTTP proxy: proxy-set and query-proxy. Reference: docs/qmp.rst."""

import dataclasses

from qemu_vpnnet.control.qmp_commands import Command, Context, Param, QmpError, port_param
from qemu_vpnnet.io.http_proxy import HttpProxy
from qemu_vpnnet.io.proxy_config import (
    MAX_PORTS,
    NoProxy,
    ProxyConfigError,
    ProxyUrl,
    safe_text,
    settings_from_env,
)


def proxy_of(ctx: Context) -> HttpProxy:
    host_tcp = ctx.shell.host_tcp
    if host_tcp is None or host_tcp.proxy is None:
        raise QmpError("the HTTP proxy is not available")
    return host_tcp.proxy


def port_list(args: dict[str, object], name: str) -> tuple[int, ...] | None:
    value = args.get(name)
    if value is None:
        return None
    assert isinstance(value, list)
    ports: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= 65535:
            raise QmpError(f"Parameter '{name}' expects port numbers between 1 and 65535")
        if item not in ports:
            ports.append(item)
    if len(ports) > MAX_PORTS:
        raise QmpError(f"Parameter '{name}' takes at most {MAX_PORTS} ports")
    return tuple(ports)


async def cmd_proxy_set(ctx: Context, args: dict[str, object]) -> object:
    """Change the proxy settings; what is not given stays. An empty URL clears that upstream."""
    proxy = proxy_of(ctx)
    settings = dataclasses.replace(proxy.settings)
    try:
        for name, attr in (("http-proxy", "http"), ("https-proxy", "https")):
            text = args.get(name)
            if text is not None:
                assert isinstance(text, str)
                try:
                    setattr(settings, attr, ProxyUrl.parse(text) if text.strip() else None)
                except ProxyConfigError as exc:
                    raise QmpError(f"Invalid {name} '{safe_text(text)}' ({exc})") from exc
        text = args.get("no-proxy")
        if text is not None:
            assert isinstance(text, str)
            settings.no_proxy = NoProxy.parse(text)
        if args.get("from-env"):
            # the backend's own environment fills what is not set (as --proxy-env at start)
            settings = settings_from_env(settings)
    except ProxyConfigError as exc:
        raise QmpError(str(exc)) from exc
    http_ports = port_list(args, "transparent-http-ports")
    https_ports = port_list(args, "transparent-https-ports")
    if http_ports is not None:
        settings.http_ports = http_ports
    if https_ports is not None:
        settings.https_ports = https_ports
    port = args.get("explicit-proxy-port")
    if port is not None:
        assert isinstance(port, int)
        settings.explicit_port = port
    try:
        proxy.apply(settings)
    except ValueError as exc:
        proxy.apply(dataclasses.replace(settings, explicit_port=0))
        raise QmpError(f"explicit-proxy-port {settings.explicit_port}: {exc}; the explicit proxy is off") from exc
    return proxy.describe()


async def cmd_query_proxy(ctx: Context, args: dict[str, object]) -> object:
    return proxy_of(ctx).describe()


def proxy_commands() -> list[Command]:
    return [
        Command(
            "proxy-set",
            (
                Param("http-proxy", str),
                Param("https-proxy", str),
                Param("no-proxy", str),
                Param("from-env", bool),
                Param("transparent-http-ports", list),
                Param("transparent-https-ports", list),
                port_param("explicit-proxy-port", False, True),
            ),
            cmd_proxy_set,
        ),
        Command("query-proxy", (), cmd_query_proxy),
    ]

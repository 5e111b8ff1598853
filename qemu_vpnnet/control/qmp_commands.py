"""The QMP commands: their argument schemas, validation with QEMU's error texts, and handlers.

Each command is a `Command` (name, parameters, async handler). `validate` checks a request's
`arguments` against the parameters the way QEMU's QAPI input visitor does, so errors read the same
("Parameter 'host-port' is missing", "Invalid parameter type for 'host-port', expected: integer",
"Parameter 'foo' is unexpected"). A handler returns the JSON value of `{"return": ...}` or raises
`QmpError`. The reference of every command is docs/qmp.rst; keep the two in step.
"""

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from qemu_vpnnet import __version__
from qemu_vpnnet.hostfwd import (
    ForwardSpec,
    HostFwdSyntaxError,
    check_guest_addr,
    check_host_addr,
    check_protocol,
    parse_hostfwd,
)
from qemu_vpnnet.io.forwards import ForwardError
from qemu_vpnnet.io.gc_tuning import WATCH as gc_watch

if TYPE_CHECKING:
    import asyncio

    from qemu_vpnnet.io.forwards import Forwarder
    from qemu_vpnnet.io.policy_control import Policy
    from qemu_vpnnet.io.shell import Shell

PACKAGE: Final = f"qemu-vpnnet {__version__}"
GENERIC: Final = "GenericError"
NOT_FOUND: Final = "CommandNotFound"

JSON_TYPE_NAMES: Final = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}


class QmpError(Exception):
    """A command failed; becomes `{"error": {"class": error_class, "desc": desc}}`."""

    def __init__(self, desc: str, error_class: str = GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class Param:
    """One argument: JSON type, whether required, and for integers the allowed range."""

    name: str
    kind: type
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    range_text: str = ""


@dataclass
class Context:
    """What a handler may use: the backend's parts, and actions to run once the reply is sent."""

    shell: "Shell"
    forwarder: "Forwarder"
    stop: "asyncio.Event"
    commands: "dict[str, Command]"
    quit: Callable[[], None]  # stops the backend
    after_reply: list[Callable[[], None]] = field(default_factory=list)
    policy: "Policy | None" = None  # the outbound policy (control/qmp_policy.py)


Handler = Callable[[Context, dict[str, object]], Awaitable[object]]


@dataclass(frozen=True)
class Command:
    name: str
    params: tuple[Param, ...]
    handler: Handler


def port_param(name: str, required: bool, allow_zero: bool) -> Param:
    low = 0 if allow_zero else 1
    return Param(name, int, required, low, 65535, f"a port number between {low} and 65535")


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return JSON_TYPE_NAMES.get(type(value), "value")


def validate(command: Command, arguments: dict[str, object]) -> dict[str, object]:
    """The arguments checked against command's parameters (QEMU's wording on errors)."""
    known = {p.name: p for p in command.params}
    for name in arguments:
        if name not in known:
            raise QmpError(f"Parameter '{name}' is unexpected")
    for param in command.params:
        if param.name not in arguments:
            if param.required:
                raise QmpError(f"Parameter '{param.name}' is missing")
            continue
        value = arguments[param.name]
        ok = isinstance(value, param.kind) and not (param.kind is int and isinstance(value, bool))
        if not ok:
            expected = JSON_TYPE_NAMES.get(param.kind, "value")
            raise QmpError(f"Invalid parameter type for '{param.name}', expected: {expected}")
        if isinstance(value, int) and not isinstance(value, bool):
            if (param.minimum is not None and value < param.minimum) or (
                param.maximum is not None and value > param.maximum
            ):
                raise QmpError(f"Parameter '{param.name}' expects {param.range_text}")
    return arguments


def version_triple(version: str) -> dict[str, int]:
    numbers = [int(part) for part in re.findall(r"\d+", version)[:3]]
    numbers += [0] * (3 - len(numbers))
    return {"major": numbers[0], "minor": numbers[1], "micro": numbers[2]}


def greeting() -> dict[str, object]:
    return {"QMP": {"version": query_version_value(), "capabilities": []}}


def query_version_value() -> dict[str, object]:
    return {"qemu": version_triple(__version__), "package": PACKAGE}


# ---- handlers -------------------------------------------------------------------------------


async def cmd_qmp_capabilities(ctx: Context, args: dict[str, object]) -> object:
    # Only reached in capabilities negotiation mode; the server answers later calls itself.
    enable = args.get("enable", [])
    assert isinstance(enable, list)
    for index, capability in enumerate(enable):
        if not isinstance(capability, str):
            raise QmpError(f"Invalid parameter type for 'enable[{index}]', expected: string")
        raise QmpError(f"Capability '{capability}' not available")
    return {}


async def cmd_query_version(ctx: Context, args: dict[str, object]) -> object:
    return query_version_value()


async def cmd_query_commands(ctx: Context, args: dict[str, object]) -> object:
    return [{"name": name} for name in ctx.commands]


async def cmd_quit(ctx: Context, args: dict[str, object]) -> object:
    ctx.after_reply.append(ctx.quit)
    return {}


STRUCTURED: Final = ("protocol", "host-addr", "host-port", "guest-addr", "guest-port")


def spec_from_arguments(args: dict[str, object]) -> ForwardSpec:
    """hostfwd-add's arguments as a ForwardSpec (QmpError when they do not make one)."""
    rule = args.get("rule")
    if rule is not None:
        for name in STRUCTURED:
            if name in args:
                raise QmpError(f"Parameters 'rule' and '{name}' are mutually exclusive")
        assert isinstance(rule, str)
        try:
            return parse_hostfwd(rule)
        except HostFwdSyntaxError as exc:
            raise QmpError(f"Invalid host forwarding rule '{rule}' ({exc})") from exc
    for name in ("host-port", "guest-port"):
        if name not in args:
            raise QmpError(f"Parameter '{name}' is missing")
    host_port = args["host-port"]
    guest_port = args["guest-port"]
    assert isinstance(host_port, int) and isinstance(guest_port, int)
    try:
        return ForwardSpec(
            check_protocol(str(args.get("protocol", "tcp"))),
            check_host_addr(str(args.get("host-addr", "127.0.0.1"))),
            host_port,
            check_guest_addr(str(args.get("guest-addr", ""))),
            guest_port,
        )
    except HostFwdSyntaxError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_hostfwd_add(ctx: Context, args: dict[str, object]) -> object:
    spec = spec_from_arguments(args)
    try:
        return await ctx.forwarder.add(spec)
    except ForwardError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_hostfwd_remove(ctx: Context, args: dict[str, object]) -> object:
    try:
        protocol = check_protocol(str(args.get("protocol", "tcp")))
        host_addr = check_host_addr(str(args.get("host-addr", "127.0.0.1")))
    except HostFwdSyntaxError as exc:
        raise QmpError(str(exc)) from exc
    host_port = args["host-port"]
    assert isinstance(host_port, int)
    try:
        return await ctx.forwarder.remove(protocol, host_addr, host_port, bool(args.get("close-connections", False)))
    except ForwardError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_query_hostfwd(ctx: Context, args: dict[str, object]) -> object:
    return ctx.forwarder.list()


def leases(shell: "Shell") -> list[dict[str, object]]:
    """The bound DHCP leases (with the host name each guest sent), each with the IPv6 addresses
    its MAC claimed (core/guard.py), the most recently claimed first."""
    now = shell.now()
    stack = shell.stack
    by_mac: dict[str, list[tuple[float, str]]] = {}
    for neighbour in stack.ipv6_neighbours(now):
        age = neighbour.get("age", 0.0)  # seconds since the address was claimed
        seen = float(age) if isinstance(age, (int, float)) else 0.0
        by_mac.setdefault(str(neighbour.get("mac", "")), []).append((seen, str(neighbour.get("address", ""))))
    result = stack.dhcp.leases(now)
    for lease in result:
        lease["ipv6-addresses"] = [addr for _age, addr in sorted(by_mac.get(str(lease.get("mac")), []))]
    return result


async def cmd_query_leases(ctx: Context, args: dict[str, object]) -> object:
    return leases(ctx.shell)


async def cmd_query_neighbours(ctx: Context, args: dict[str, object]) -> object:
    return ctx.shell.stack.ipv6_neighbours(ctx.shell.now())


def connections(shell: "Shell") -> list[dict[str, object]]:
    """Every TCP connection, UDP flow and ping flow of the core."""
    now = shell.now()
    stack = shell.stack
    return stack.tcp.connections(now) + stack.udp.flows(now) + stack.udp_forwards.flows(now) + stack.icmp.flows(now)


async def cmd_query_connections(ctx: Context, args: dict[str, object]) -> object:
    return connections(ctx.shell)


async def cmd_query_stats(ctx: Context, args: dict[str, object]) -> object:
    stack = ctx.shell.stack
    return {
        "counters": stack.counters.snapshot() | stack.fwd.counters(),
        "guests": len(ctx.shell.ports),
        "tcp-connections": len(stack.tcp.flows),
        "host-sockets": stack.guard.sockets,  # held by flows, against the budget (docs/isolation.rst)
        "host-socket-budget": stack.guard.fd_budget,
        "guest-usage": stack.guard.describe(),
        "gc": gc_watch.describe(),  # the garbage collector's pauses (io/gc_tuning.py)
    }


def zone_arguments(args: dict[str, object]) -> tuple[str, bytes | None]:
    """dns-zone-add/-remove's name (normalized) and address (None when not given)."""
    from qemu_vpnnet.core.dns_zone import ZoneError, address_bytes, normal_name

    name = args["name"]
    assert isinstance(name, str)
    try:
        normal = normal_name(name)
    except ZoneError:
        raise QmpError(f"Invalid DNS name '{name}'") from None
    address = args.get("address")
    if address is None:
        return normal, None
    assert isinstance(address, str)
    try:
        return normal, address_bytes(address)
    except ZoneError:
        raise QmpError("Parameter 'address' expects an IPv4 or IPv6 address") from None


def zone_entry(name: str, addrs: list[bytes], source: str) -> dict[str, object]:
    from qemu_vpnnet.core.dns_zone import address_text

    return {"name": name, "addresses": [address_text(a) for a in addrs], "source": source}


async def cmd_dns_zone_add(ctx: Context, args: dict[str, object]) -> object:
    from qemu_vpnnet.core.dns_zone import SOURCE_QMP, ZoneError

    name, addr = zone_arguments(args)
    assert addr is not None
    zones = ctx.shell.stack.dns.zones
    try:
        added = zones.add(SOURCE_QMP, name, addr)
    except ZoneError as exc:
        raise QmpError(str(exc)) from exc
    if not added:
        raise QmpError(f"DNS name '{name}' has address '{args['address']}' already")
    return zone_entry(name, zones.sources[SOURCE_QMP][name], SOURCE_QMP)


async def cmd_dns_zone_remove(ctx: Context, args: dict[str, object]) -> object:
    from qemu_vpnnet.core.dns_zone import SOURCE_QMP

    name, addr = zone_arguments(args)
    zones = ctx.shell.stack.dns.zones
    removed = zones.remove(SOURCE_QMP, name, addr)
    if not removed:
        if addr is not None and name in zones.sources.get(SOURCE_QMP, {}):
            raise QmpError(f"DNS name '{name}' has no address '{args['address']}'")
        others = [source for source, zone in zones.sources.items() if name in zone]
        if others:
            raise QmpError(f"DNS name '{name}' comes from {others[0]}; only names added over QMP can be removed")
        raise QmpError(f"DNS name '{name}' not found")
    return zone_entry(name, removed, SOURCE_QMP)


async def cmd_query_dns_zones(ctx: Context, args: dict[str, object]) -> object:
    dns = ctx.shell.stack.dns
    result = [zone_entry(name, addrs, "built-in") for name, addrs in dns.builtin.items()]
    return result + [zone_entry(name, addrs, source) for source, name, addrs in dns.zones.entries()]


def command_table() -> dict[str, Command]:
    """The QMP commands by name, in the order query-commands lists them (human-monitor-command,
    which runs the HMP subset, is added by the server from qmp_hmp)."""
    commands = [
        Command("qmp_capabilities", (Param("enable", list),), cmd_qmp_capabilities),
        Command("query-version", (), cmd_query_version),
        Command("query-commands", (), cmd_query_commands),
        Command("quit", (), cmd_quit),
        Command(
            "hostfwd-add",
            (
                Param("rule", str),
                Param("protocol", str),
                Param("host-addr", str),
                port_param("host-port", False, True),
                Param("guest-addr", str),
                port_param("guest-port", False, False),
            ),
            cmd_hostfwd_add,
        ),
        Command(
            "hostfwd-remove",
            (
                Param("protocol", str),
                Param("host-addr", str),
                port_param("host-port", True, False),
                Param("close-connections", bool),
            ),
            cmd_hostfwd_remove,
        ),
        Command("query-hostfwd", (), cmd_query_hostfwd),
        Command("dns-zone-add", (Param("name", str, True), Param("address", str, True)), cmd_dns_zone_add),
        Command("dns-zone-remove", (Param("name", str, True), Param("address", str)), cmd_dns_zone_remove),
        Command("query-dns-zones", (), cmd_query_dns_zones),
        Command("query-leases", (), cmd_query_leases),
        Command("query-neighbours", (), cmd_query_neighbours),
        Command("query-connections", (), cmd_query_connections),
        Command("query-stats", (), cmd_query_stats),
    ]
    from qemu_vpnnet.control.qmp_capture import capture_commands
    from qemu_vpnnet.control.qmp_policy import policy_commands
    from qemu_vpnnet.control.qmp_proxy import proxy_commands

    commands += policy_commands()
    commands += proxy_commands()
    commands += capture_commands()
    return {c.name: c for c in commands}

"""`human-monitor-command`: the subset of QEMU's HMP that concerns a user-mode network.

`hostfwd_add [netdev_id] RULE` and `hostfwd_remove [netdev_id] [tcp|udp]:[hostaddr]:hostport` answer
exactly as QEMU's slirp backend does (nothing on success for add; "host forwarding rule for ...
removed" for remove; the error text otherwise), so scripts written for `-netdev user` work
unchanged. Like QEMU, HMP never fails at the QMP level: errors are in the returned text, whose lines
end in "\\r\\n" as the monitor writes them.
"""

from typing import Final

from qemu_vpnnet import __version__
from qemu_vpnnet.control.qmp_commands import Command, Context, Param, connections, leases
from qemu_vpnnet.hostfwd import HostFwdSyntaxError, parse_hostfwd, parse_hostfwd_remove
from qemu_vpnnet.io.forwards import ForwardError

HOSTFWD_ADD_USAGE: Final = "hostfwd_add [netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport"
HOSTFWD_REMOVE_USAGE: Final = "hostfwd_remove [netdev_id] [tcp|udp]:[hostaddr]:hostport"

HELP: Final = (
    ("help|? [cmd]", "show the help"),
    (HOSTFWD_ADD_USAGE, "redirect TCP or UDP connections from host to guest"),
    (HOSTFWD_REMOVE_USAGE, "remove host-to-guest TCP or UDP redirection"),
    ("info [subcommand]", "show various information about the system state"),
    ("quit|q", "stop the backend"),
)
INFO_HELP: Final = (
    ("info version", "show the version of qemu-vpnnet"),
    ("info usernet", "show user network stack connection states"),
    ("info hostfwd", "show the host forwarding rules"),
    ("info leases", "show the DHCP leases"),
)


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def _table(rows: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"{usage} -- {text}\n" for usage, text in rows)


async def run_hmp(ctx: Context, command_line: str) -> str:
    """The text QEMU's monitor would print for command_line."""
    return _crlf(await _dispatch(ctx, command_line.split()))


async def _dispatch(ctx: Context, words: list[str]) -> str:
    if not words:
        return ""
    name, args = words[0], words[1:]
    if name in ("help", "?"):
        return _help(args)
    if name == "info":
        return _info(ctx, args)
    if name == "hostfwd_add":
        return await _hostfwd_add(ctx, args)
    if name == "hostfwd_remove":
        return await _hostfwd_remove(ctx, args)
    if name in ("quit", "q"):
        ctx.after_reply.append(ctx.quit)
        return ""
    return f"unknown command: '{name}'\n"


def _help(args: list[str]) -> str:
    if not args:
        return _table(HELP)
    if args[0] == "info":
        return _table(INFO_HELP)
    rows = tuple(row for row in HELP if args[0] in row[0].split()[0].split("|"))
    return _table(rows) if rows else f"unknown command: '{args[0]}'\n"


async def _hostfwd_add(ctx: Context, args: list[str]) -> str:
    if not 1 <= len(args) <= 3:  # QEMU also knew `hostfwd_add hub_id netdev_id rule`
        return f"usage: {HOSTFWD_ADD_USAGE}\n"
    rule = args[-1]
    try:
        spec = parse_hostfwd(rule)
    except HostFwdSyntaxError as exc:
        return f"Invalid host forwarding rule '{rule}' ({exc})\n"
    try:
        await ctx.forwarder.add(spec)
    except ForwardError as exc:
        return f"Could not set up host forwarding rule '{rule}': {exc}\n"
    return ""


async def _hostfwd_remove(ctx: Context, args: list[str]) -> str:
    if not 1 <= len(args) <= 3:
        return f"usage: {HOSTFWD_REMOVE_USAGE}\n"
    source = args[-1]
    try:
        protocol, addr, port = parse_hostfwd_remove(source)
    except HostFwdSyntaxError:
        return "invalid format\n"
    try:
        await ctx.forwarder.remove(protocol, addr, port)
    except ForwardError:
        return f"host forwarding rule for {source} not found\n"
    return f"host forwarding rule for {source} removed\n"


def _info(ctx: Context, args: list[str]) -> str:
    if not args:
        return _table(INFO_HELP)
    what = args[0]
    if what == "version":
        return f"{__version__} (qemu-vpnnet)\n"
    if what == "usernet":
        return _usernet(ctx)
    if what == "hostfwd":
        lines = [str(f["rule"]) for f in ctx.forwarder.list()]
        return "".join(f"{line}\n" for line in lines) or "no forwards\n"
    if what == "leases":
        lines = []
        for lease in leases(ctx.shell):
            line = f"{lease['mac']} {lease['address']} expires in {lease['expires-in']} s"
            name = str(lease.get("hostname", ""))
            if name:
                line += " hostname " + "".join(c if c.isprintable() else "?" for c in name)
            v6 = lease.get("ipv6-addresses")
            if isinstance(v6, list) and v6:
                line += " ipv6 " + ",".join(str(a) for a in v6)
            lines.append(line + "\n")
        return "".join(lines)
    return f"info: unknown subcommand '{what}'\n"


def _endpoint(text: object) -> tuple[str, str]:
    host, _, port = str(text).rpartition(":")
    return host, port


def _usernet(ctx: Context) -> str:
    """Like QEMU's `info usernet`: forwards, then the connections and flows of the core."""
    row = "  {:<22} {:>15} {:>5} {:>15} {:>5} {:>10} {:>10}\n"
    out = [f"qemu-vpnnet {ctx.shell.stack.config.network}:\n"]
    out.append(row.format("Protocol[State]", "Source Address", "Port", "Dest. Address", "Port", "To-host", "To-guest"))
    for fwd in ctx.forwarder.list():
        proto = str(fwd["protocol"]).upper()
        guest = str(fwd["guest-addr"]) or "*"
        out.append(
            row.format(f"{proto}[HOST_FORWARD]", fwd["host-addr"], fwd["host-port"], guest, fwd["guest-port"], "-", "-")
        )
    for conn in connections(ctx.shell):
        proto = str(conn["protocol"])
        if proto == "tcp":
            src, sport = _endpoint(conn["guest"])
            dst, dport = _endpoint(conn["remote"])
            state = f"TCP[{conn['state']}]"
            to_host, to_guest = conn["bytes-to-host"], conn["bytes-to-guest"]
        elif proto == "udp":
            src, sport = str(conn["guest-address"]), str(conn["guest-port"])
            dst, dport = str(conn["remote-address"]), str(conn["remote-port"])
            state = f"UDP[{int(float(str(conn['idle'])))} sec idle]"
            to_host, to_guest = conn["bytes-out"], conn["bytes-in"]
        else:
            src, sport = str(conn.get("guest-address", "")), str(conn.get("echo-id", "-"))
            dst, dport = str(conn.get("remote-address", "")), "-"
            state = f"{proto.upper()}[{int(float(str(conn.get('idle', 0))))} sec idle]"
            to_host, to_guest = conn.get("requests", "-"), conn.get("replies", "-")
        out.append(row.format(state, src, sport, dst, dport, to_host, to_guest))
    return "".join(out)


async def cmd_human_monitor_command(ctx: Context, args: dict[str, object]) -> object:
    line = args["command-line"]
    assert isinstance(line, str)
    return await run_hmp(ctx, line)


HMP_COMMAND: Final = Command(
    "human-monitor-command",
    (Param("command-line", str, True), Param("cpu-index", int)),
    cmd_human_monitor_command,
)

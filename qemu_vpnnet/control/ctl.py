"""`qemu-vpnnet ctl`: drive a running backend over QMP (built on qemu.qmp's QMPClient).

    qemu-vpnnet ctl --qmp unix:/run/vpnnet.qmp hostfwd add tcp::8080-:80
    qemu-vpnnet ctl --qmp unix:/run/vpnnet.qmp hostfwd list
    qemu-vpnnet ctl --qmp unix:/run/vpnnet.qmp hostfwd remove tcp::8080 --close-connections
    qemu-vpnnet ctl --qmp unix:/run/vpnnet.qmp watch --count 1 --timeout 30 --event GUEST_LEASE

Output is for people by default and JSON with --json (`watch` always prints JSON lines). Exit
status: 0 success, 1 the backend refused the command (its QMP error is printed), 2 usage error,
3 no connection (cannot connect, or the connection was lost), 130 interrupted.
"""

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Final

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, Runstate
from qemu.qmp.message import Message

from qemu_vpnnet.hostfwd import HostFwdSyntaxError, parse_hostfwd_remove

ENV_QMP: Final = "QEMU_VPNNET_QMP"
EXIT_OK: Final = 0
EXIT_COMMAND: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONNECTION: Final = 3
EXIT_INTERRUPTED: Final = 130


class CtlError(Exception):
    """Ends ctl with a message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ---- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Global options may be given before or after the subcommand: the subparsers repeat them
    # with SUPPRESS defaults so that they override only when given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--qmp", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = argparse.ArgumentParser(
        prog="qemu-vpnnet ctl",
        description="Control a running qemu-vpnnet backend over its QMP socket.",
        epilog="Exit status: 0 success, 1 command refused, 2 usage, 3 no connection.",
    )
    p.add_argument(
        "--qmp",
        default=os.environ.get(ENV_QMP),
        metavar="unix:PATH|tcp:HOST:PORT",
        help=f"the backend's QMP socket (as given to its --qmp; default ${ENV_QMP})",
    )
    p.add_argument("--json", action="store_true", default=False, help="print JSON instead of tables")
    p.add_argument(
        "--connect-timeout", type=float, default=10.0, metavar="SECONDS", help="connection timeout (default 10)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log the QMP traffic to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    hostfwd = sub.add_parser("hostfwd", parents=[common], help="add, list or remove port forwards")
    hsub = hostfwd.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = hsub.add_parser(
        "add",
        parents=[common],
        help="add forwards",
        description="Add forwards in QEMU's syntax; a host port of 0 takes a free port (printed).",
    )
    add.add_argument("rules", nargs="+", metavar="[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport")
    hsub.add_parser("list", parents=[common], help="list the forwards")
    remove = hsub.add_parser("remove", parents=[common], help="remove forwards")
    remove.add_argument("sources", nargs="+", metavar="[tcp|udp]:[hostaddr]:hostport")
    remove.add_argument(
        "--close-connections", action="store_true", help="also reset the connections the forward opened"
    )

    from qemu_vpnnet.control.ctl_policy import add_parsers

    add_parsers(sub, common)
    sub.add_parser("leases", parents=[common], help="the DHCP leases, with each guest's IPv6 addresses")
    sub.add_parser("neighbours", parents=[common], help="the IPv6 addresses guests were seen using")
    sub.add_parser("stats", parents=[common], help="counters of the network stack")
    sub.add_parser("connections", parents=[common], help="the TCP connections and UDP/ping flows")
    sub.add_parser("version", parents=[common], help="the backend's version")
    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="print events as JSON lines",
        description="Print the backend's QMP events, one JSON object a line, until interrupted.",
    )
    watch.add_argument("--count", type=int, metavar="N", help="stop after N events (exit 1 if --timeout ends first)")
    watch.add_argument("--timeout", type=float, metavar="SECONDS", help="stop after SECONDS")
    watch.add_argument(
        "--event", action="append", default=[], metavar="NAME", help="only events called NAME (repeatable)"
    )
    hmp = sub.add_parser("hmp", parents=[common], help="run a human monitor command (hostfwd_add, info usernet...)")
    hmp.add_argument("words", nargs="+", metavar="WORD")
    execute = sub.add_parser("exec", parents=[common], help="run any QMP command; prints its JSON result")
    execute.add_argument("name", metavar="COMMAND")
    execute.add_argument("arguments", nargs="?", metavar="JSON", help="the arguments as a JSON object")
    sub.add_parser("quit", parents=[common], help="stop the backend")
    return p


def address_of(spec: str) -> str | tuple[str, int]:
    """QMPClient's address for unix:PATH, tcp:HOST:PORT or a plain socket path."""
    kind, colon, rest = spec.partition(":")
    if kind == "unix" and colon and rest:
        return rest.split(",")[0]
    if kind == "tcp" and colon:
        host, sep, port = rest.split(",")[0].rpartition(":")
        if sep and port.isdigit():
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            return (host or "127.0.0.1", int(port))
        raise CtlError(f"--qmp {spec}: expected tcp:HOST:PORT", EXIT_USAGE)
    if "/" in spec or os.path.exists(spec):
        return spec
    raise CtlError(f"--qmp {spec}: expected unix:PATH or tcp:HOST:PORT", EXIT_USAGE)


# ---- output -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def endpoint(addr: object, port: object) -> str:
    text = str(addr)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def format_forwards(forwards: list[dict[str, object]]) -> str:
    if not forwards:
        return "no forwards"
    rows = [
        [
            str(f.get("protocol", "")),
            endpoint(f.get("host-addr", ""), f.get("host-port", "")),
            endpoint(f.get("guest-addr") or "(first guest)", f.get("guest-port", "")),
            str(f.get("connections", "")),
            str(f.get("accepted", "")),
            str(f.get("refused", "")),
        ]
        for f in forwards
    ]
    return table(["PROTO", "HOST", "GUEST", "CONNECTIONS", "ACCEPTED", "REFUSED"], rows)


def printable(text: object) -> str:
    """A guest-chosen string (a DHCP host name) safe for a terminal: control characters as '?'."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def format_leases(leases: list[dict[str, object]]) -> str:
    if not leases:
        return "no leases"
    rows = []
    for x in leases:
        ipv6 = x.get("ipv6-addresses")
        rows.append(
            [
                str(x.get("mac", "")),
                str(x.get("address", "")),
                ",".join(str(a) for a in ipv6) if isinstance(ipv6, list) and ipv6 else "-",
                f"{x.get('expires-in', '')}s",
                printable(x.get("hostname", "")),
            ]
        )
    return table(["MAC", "ADDRESS", "IPV6", "EXPIRES-IN", "HOSTNAME"], rows)


def format_neighbours(neighbours: list[dict[str, object]]) -> str:
    if not neighbours:
        return "no IPv6 neighbours"
    rows = []
    for x in neighbours:
        age = x.get("age", "")
        age_text = f"{float(age):.0f}s" if isinstance(age, (int, float)) else str(age)
        here = "yes" if x.get("present", True) else "no"
        rows.append([str(x.get("address", "")), str(x.get("mac", "")), age_text, here])
    return table(["ADDRESS", "MAC", "AGE", "PRESENT"], rows)


def format_stats(stats: dict[str, object]) -> str:
    lines = [f"guests: {stats.get('guests', 0)}", f"tcp-connections: {stats.get('tcp-connections', 0)}"]
    if "host-sockets" in stats:
        lines.append(f"host-sockets: {stats['host-sockets']} (budget {stats.get('host-socket-budget')})")
    usage = stats.get("guest-usage")
    if isinstance(usage, list) and usage:
        lines.append("per guest:")
        for u in usage:
            if isinstance(u, dict):
                lines.append(
                    f"  {u.get('mac')}  tcp {u.get('tcp')} (connecting {u.get('pending')})  "
                    f"datagram flows {u.get('datagram-flows')}"
                )
    gc_stats = stats.get("gc")
    if isinstance(gc_stats, dict):
        lines.append(
            f"garbage collector: collections {gc_stats.get('collections')} (young, middle, full), "
            f"paused {gc_stats.get('pause-ms')} ms, longest {gc_stats.get('longest-pause-ms')} ms"
        )
    counters = stats.get("counters")
    if isinstance(counters, dict) and counters:
        width = max(len(str(name)) for name in counters)
        lines.append("counters:")
        lines += [f"  {name:<{width}}  {counters[name]}" for name in sorted(counters)]
    return "\n".join(lines)


def connection_row(c: dict[str, object]) -> list[str]:
    proto = str(c.get("protocol", ""))
    age = c.get("age", "")
    age_text = f"{float(str(age)):.1f}s" if isinstance(age, (int, float)) else str(age)
    if proto == "tcp":
        return [
            proto,
            str(c.get("direction", "")),
            str(c.get("guest", "")),
            str(c.get("remote", "")),
            str(c.get("state", "")),
            str(c.get("bytes-to-host", "")),
            str(c.get("bytes-to-guest", "")),
            str(c.get("route", "")),
            age_text,
        ]
    guest = endpoint(c.get("guest-address", ""), c.get("guest-port", c.get("echo-id", "")))
    remote = str(c.get("remote-address", ""))
    if "remote-port" in c:
        remote = endpoint(remote, c["remote-port"])
    sent = c.get("bytes-out", c.get("requests", ""))
    received = c.get("bytes-in", c.get("replies", ""))
    return [proto, "outbound", guest, remote, "-", str(sent), str(received), str(c.get("route", "direct")), age_text]


def format_connections(conns: list[dict[str, object]]) -> str:
    if not conns:
        return "no connections"
    headers = ["PROTO", "DIRECTION", "GUEST", "REMOTE", "STATE", "TO-HOST", "TO-GUEST", "ROUTE", "AGE"]
    return table(headers, [connection_row(c) for c in conns])


def print_result(value: object, as_json: bool, human: str) -> None:
    print(json.dumps(value, indent=2) if as_json else human)


# ---- talking to the backend ---------------------------------------------------------------


async def connect(spec: str | None, timeout: float) -> QMPClient:
    if not spec:
        raise CtlError(f"no QMP socket: give --qmp unix:PATH (or set ${ENV_QMP})", EXIT_USAGE)
    address = address_of(spec)
    client = QMPClient("qemu-vpnnet-ctl")
    try:
        await asyncio.wait_for(client.connect(address), timeout)
    except ConnectError as exc:
        cause = exc.exc
        hint = ""
        if isinstance(cause, FileNotFoundError):
            hint = " (is the backend running with --qmp " + spec + "?)"
        elif isinstance(cause, PermissionError):
            hint = " (the socket is mode 0600: run as the backend's user)"
        elif isinstance(cause, ConnectionRefusedError):
            hint = " (nobody is listening there)"
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise CtlError(f"cannot connect to {spec}: {reason}{hint}", EXIT_CONNECTION) from exc
    except TimeoutError as exc:
        await disconnect(client)
        raise CtlError(f"cannot connect to {spec}: no QMP greeting within {timeout:g}s", EXIT_CONNECTION) from exc
    return client


async def disconnect(client: QMPClient) -> None:
    try:
        await client.disconnect()
    except Exception:  # the server may already be gone (after quit); nothing left to do
        pass


async def execute(client: QMPClient, name: str, arguments: dict[str, object] | None = None) -> object:
    try:
        return await client.execute(name, arguments)
    except ExecuteError as exc:
        klass = exc.error_class
        prefix = "" if klass == "GenericError" else f"{klass}: "
        raise CtlError(f"{name}: {prefix}{exc}", EXIT_COMMAND) from exc
    except (ExecInterruptedError, EOFError, ConnectionError) as exc:
        raise CtlError(f"{name}: connection to the backend lost", EXIT_CONNECTION) from exc


def as_list(value: object) -> list[dict[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def as_dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


async def run_command(client: QMPClient, args: argparse.Namespace) -> int:
    as_json: bool = args.json
    command: str = args.command
    if command == "hostfwd":
        return await run_hostfwd(client, args)
    if command in ("policy", "guestfwd"):
        from qemu_vpnnet.control.ctl_policy import run_guestfwd, run_policy

        return await (run_policy(client, args) if command == "policy" else run_guestfwd(client, args))
    if command == "leases":
        leases = as_list(await execute(client, "query-leases"))
        print_result(leases, as_json, format_leases(leases))
    elif command == "neighbours":
        neighbours = as_list(await execute(client, "query-neighbours"))
        print_result(neighbours, as_json, format_neighbours(neighbours))
    elif command == "stats":
        stats = as_dict(await execute(client, "query-stats"))
        print_result(stats, as_json, format_stats(stats))
    elif command == "connections":
        conns = as_list(await execute(client, "query-connections"))
        print_result(conns, as_json, format_connections(conns))
    elif command == "version":
        version = as_dict(await execute(client, "query-version"))
        print_result(version, as_json, str(version.get("package", version)))
    elif command == "watch":
        return await watch(client, args)
    elif command == "hmp":
        text = await execute(client, "human-monitor-command", {"command-line": " ".join(args.words)})
        if as_json:
            print(json.dumps(text))
        else:
            sys.stdout.write(str(text).replace("\r\n", "\n"))
    elif command == "exec":
        arguments: object = None
        if args.arguments:
            try:
                arguments = json.loads(args.arguments)
            except json.JSONDecodeError as exc:
                raise CtlError(f"exec: arguments are not JSON: {exc}", EXIT_USAGE) from exc
            if not isinstance(arguments, dict):
                raise CtlError("exec: arguments must be a JSON object", EXIT_USAGE)
        result = await execute(client, args.name, arguments if isinstance(arguments, dict) else None)
        print(json.dumps(result) if as_json else json.dumps(result, indent=2))
    elif command == "quit":
        await execute(client, "quit")
        if not as_json:
            print("backend stopping")
    return EXIT_OK


async def run_hostfwd(client: QMPClient, args: argparse.Namespace) -> int:
    as_json: bool = args.json
    if args.action == "list":
        forwards = as_list(await execute(client, "query-hostfwd"))
        print_result(forwards, as_json, format_forwards(forwards))
        return EXIT_OK
    if args.action == "add":
        added = []
        for rule in args.rules:
            info = as_dict(await execute(client, "hostfwd-add", {"rule": rule}))
            added.append(info)
            if not as_json:
                print(f"added {info.get('rule', rule)}")
        if as_json:
            print(json.dumps(added, indent=2))
        return EXIT_OK
    removed = []
    for source in args.sources:
        try:
            protocol, addr, port = parse_hostfwd_remove(source)
        except HostFwdSyntaxError as exc:
            raise CtlError(f"hostfwd remove: {exc}", EXIT_USAGE) from exc
        arguments: dict[str, object] = {"protocol": protocol, "host-addr": addr, "host-port": port}
        if args.close_connections:
            arguments["close-connections"] = True
        info = as_dict(await execute(client, "hostfwd-remove", arguments))
        removed.append(info)
        if not as_json:
            print(f"removed {info.get('rule', source)}")
    if as_json:
        print(json.dumps(removed, indent=2))
    return EXIT_OK


async def watch(client: QMPClient, args: argparse.Namespace) -> int:
    """Print events until --count of them, --timeout, the backend's exit, or an interrupt."""
    loop = asyncio.get_running_loop()
    deadline = None if args.timeout is None else loop.time() + args.timeout
    listener = client.events  # the default listener, drained here (so it does not grow)
    listener.names.update(args.event)
    # Events sent from now on are ours: say so (on stderr, so stdout stays JSON lines).
    print(f"qemu-vpnnet ctl: watching events on {args.qmp}", file=sys.stderr, flush=True)
    seen = 0
    shutdown = False

    def show(event: Message) -> None:
        nonlocal seen, shutdown
        print(json.dumps(dict(event)), flush=True)
        seen += 1
        shutdown = shutdown or event.get("event") == "SHUTDOWN"

    def enough() -> bool:
        return args.count is not None and seen >= args.count

    get: asyncio.Future[Message] = asyncio.ensure_future(listener.get())
    try:
        while not enough():
            if client.runstate != Runstate.RUNNING:  # disconnected: show what arrived before
                if get.done() and not get.cancelled():
                    show(get.result())
                for event in listener.clear():
                    if not enough():
                        show(event)
                break
            state = asyncio.ensure_future(client.runstate_changed())
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            waiters: set[asyncio.Future[Any]] = {get, state}
            done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            state.cancel()
            if get in done:
                show(get.result())
                get = asyncio.ensure_future(listener.get())
            elif not done:  # --timeout
                return EXIT_COMMAND if args.count is not None else EXIT_OK
    finally:
        get.cancel()
    if enough() or shutdown:
        return EXIT_OK
    raise CtlError("watch: connection to the backend lost", EXIT_CONNECTION)


async def run(args: argparse.Namespace) -> int:
    client = await connect(args.qmp, args.connect_timeout)
    try:
        return await run_command(client, args)
    finally:
        await disconnect(client)


def main(argv: list[str]) -> int:
    """Entry point: argv[0] is "ctl"."""
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL, stream=sys.stderr)
    if args.command == "watch" and args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    try:
        return asyncio.run(run(args))
    except CtlError as exc:
        print(f"qemu-vpnnet ctl: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "watch" else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(["ctl", *sys.argv[1:]]))

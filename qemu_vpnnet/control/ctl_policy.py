"""`qemu-vpnnet ctl policy ...` and `ctl guestfwd ...`: the outbound policy over QMP."""

import argparse
import json

from qemu.qmp import QMPClient

from qemu_vpnnet.control.ctl import EXIT_OK, EXIT_USAGE, CtlError, as_dict, as_list, execute, print_result, table

ON_OFF = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False}


def on_off(text: str) -> bool:
    try:
        return ON_OFF[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}") from None


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    policy = sub.add_parser("policy", parents=[common], help="list, add or remove outbound policy rules")
    psub = policy.add_subparsers(dest="action", metavar="ACTION", required=True)
    psub.add_parser("list", parents=[common], help="the rules in the order they are tried, with their hits")
    add = psub.add_parser(
        "add",
        parents=[common],
        help="add run-time rules (tried before the command line's and the policy file's)",
        description="Add rules: 'ACTION [PROTO] DEST[:PORTS] [TARGET] [reply=...] [id=NAME]' (docs/policy.rst).",
    )
    add.add_argument("rules", nargs="+", metavar="RULE")
    add.add_argument("--position", type=int, metavar="N", help="insert at N among the run-time rules (default last)")
    remove = psub.add_parser("remove", parents=[common], help="remove rules by id")
    remove.add_argument("ids", nargs="+", metavar="ID")
    set_ = psub.add_parser("set", parents=[common], help="turn restrict or allow-metadata on or off")
    set_.add_argument("--restrict", type=on_off, metavar="on|off")
    set_.add_argument("--allow-metadata", type=on_off, metavar="on|off")

    guestfwd = sub.add_parser("guestfwd", parents=[common], help="add, list or remove gateway services")
    gsub = guestfwd.add_subparsers(dest="action", metavar="ACTION", required=True)
    gadd = gsub.add_parser("add", parents=[common], help="add gateway services")
    gadd.add_argument("specs", nargs="+", metavar="[tcp|udp]:ADDR:PORT-TARGET")
    gsub.add_parser("list", parents=[common], help="list the gateway services")
    gremove = gsub.add_parser("remove", parents=[common], help="remove gateway services")
    gremove.add_argument("services", nargs="+", metavar="[tcp|udp]:ADDR:PORT")


def format_rules(policy: dict[str, object]) -> str:
    rules = as_list(policy.get("rules"))
    header = f"restrict: {'on' if policy.get('restrict') else 'off'}, allow-metadata: " + (
        "on" if policy.get("allow-metadata") else "off"
    )
    if policy.get("policy-file"):
        header += f", policy file: {policy['policy-file']}"
    rows = [
        [str(r.get("id", "")), str(r.get("origin", "")), str(r.get("hits", "")), str(r.get("rule", ""))] for r in rules
    ]
    return header + "\n" + table(["ID", "ORIGIN", "HITS", "RULE"], rows)


def format_guestfwds(services: list[dict[str, object]]) -> str:
    if not services:
        return "no gateway services"
    rows = [[str(s.get("rule", "")), str(s.get("connections", ""))] for s in services]
    return table(["SERVICE", "CONNECTIONS"], rows)


def print_changes(results: list[dict[str, object]], verb: str, as_json: bool) -> None:
    """What add and remove did: the objects as JSON, or a line "VERB RULE" each."""
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for info in results:
        print(f"{verb} {info.get('rule', '')}")


def parse_service(text: str) -> dict[str, object]:
    protocol, sep, rest = text.partition(":")
    addr, colon, port = rest.rpartition(":")
    if not sep or not colon or not port.isdigit() or protocol not in ("tcp", "udp"):
        raise CtlError(f"guestfwd remove: expected tcp|udp:ADDR:PORT, got {text!r}", EXIT_USAGE)
    return {"protocol": protocol, "guest-addr": addr, "guest-port": int(port)}


async def run_policy(client: QMPClient, args: argparse.Namespace) -> int:
    as_json: bool = args.json
    if args.action == "list":
        policy = as_dict(await execute(client, "query-policy"))
        print_result(policy, as_json, format_rules(policy))
        return EXIT_OK
    if args.action == "set":
        arguments: dict[str, object] = {}
        if args.restrict is not None:
            arguments["restrict"] = args.restrict
        if args.allow_metadata is not None:
            arguments["allow-metadata"] = args.allow_metadata
        policy = as_dict(await execute(client, "policy-set", arguments))
        print_result(policy, as_json, format_rules(policy))
        return EXIT_OK
    results = []
    if args.action == "add":
        for i, rule in enumerate(args.rules):
            request: dict[str, object] = {"rule": rule}
            if args.position is not None:
                request["position"] = args.position + i
            results.append(as_dict(await execute(client, "policy-rule-add", request)))
    else:
        for rule_id in args.ids:
            results.append(as_dict(await execute(client, "policy-rule-remove", {"id": rule_id})))
    print_changes(results, "added" if args.action == "add" else "removed", as_json)
    return EXIT_OK


async def run_guestfwd(client: QMPClient, args: argparse.Namespace) -> int:
    as_json: bool = args.json
    if args.action == "list":
        services = as_list(await execute(client, "query-guestfwd"))
        print_result(services, as_json, format_guestfwds(services))
        return EXIT_OK
    results = []
    if args.action == "add":
        for spec in args.specs:
            results.append(as_dict(await execute(client, "guestfwd-add", {"rule": spec})))
    else:
        for text in args.services:
            results.append(as_dict(await execute(client, "guestfwd-remove", parse_service(text))))
    print_changes(results, "added" if args.action == "add" else "removed", as_json)
    return EXIT_OK

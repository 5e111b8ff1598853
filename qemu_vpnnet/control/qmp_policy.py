"""QMP commands of the outbound policy: rules (policy-rule-add/-remove, query-policy, policy-set)
and gateway services (guestfwd-add/-remove, query-guestfwd). Reference: docs/qmp.rst."""

from qemu_vpnnet.control.qmp_commands import Command, Context, Param, QmpError, port_param
from qemu_vpnnet.io.policy_control import Policy, PolicyError
from qemu_vpnnet.policy import (
    GuestFwdSpec,
    PolicySyntaxError,
    RuleFields,
    build_rule,
    guestfwd_rule,
    parse_guestfwd,
    parse_rule,
)

RULE_FIELDS = ("action", "protocol", "destination", "target", "reply", "id")
GUESTFWD_FIELDS = ("protocol", "guest-addr", "guest-port", "target")


def policy_of(ctx: Context) -> Policy:
    if ctx.policy is None:
        raise QmpError("the outbound policy is not available")
    return ctx.policy


def exclusive(args: dict[str, object], fields: tuple[str, ...]) -> None:
    for name in fields:
        if name in args:
            raise QmpError(f"Parameters 'rule' and '{name}' are mutually exclusive")


async def cmd_policy_rule_add(ctx: Context, args: dict[str, object]) -> object:
    policy = policy_of(ctx)
    default_id = policy.new_rule_id("qmp")
    text = args.get("rule")
    try:
        if text is not None:
            exclusive(args, RULE_FIELDS)
            assert isinstance(text, str)
            rule = parse_rule(text, default_id)
        else:
            if "action" not in args:
                raise QmpError("Parameter 'action' is missing")
            fields = RuleFields(
                str(args["action"]),
                str(args.get("protocol", "any")),
                str(args.get("destination", "*")),
                str(args.get("target", "")),
                str(args.get("reply", "")),
                str(args.get("id", "")),
            )
            rule = build_rule(fields, default_id)
    except PolicySyntaxError as exc:
        raise QmpError(f"Invalid policy rule ({exc})") from exc
    position = args.get("position")
    assert position is None or isinstance(position, int)
    try:
        return policy.add_rule(rule, position)
    except PolicyError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_policy_rule_remove(ctx: Context, args: dict[str, object]) -> object:
    rule_id = args["id"]
    assert isinstance(rule_id, str)
    try:
        return policy_of(ctx).remove_rule(rule_id)
    except PolicyError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_query_policy(ctx: Context, args: dict[str, object]) -> object:
    return policy_of(ctx).describe()


async def cmd_policy_set(ctx: Context, args: dict[str, object]) -> object:
    policy = policy_of(ctx)
    restrict = args.get("restrict")
    allow_metadata = args.get("allow-metadata")
    assert restrict is None or isinstance(restrict, bool)
    assert allow_metadata is None or isinstance(allow_metadata, bool)
    policy.set_options(restrict, allow_metadata)
    return policy.describe()


def guestfwd_from_arguments(args: dict[str, object]) -> GuestFwdSpec:
    text = args.get("rule")
    try:
        if text is not None:
            exclusive(args, GUESTFWD_FIELDS)
            assert isinstance(text, str)
            return parse_guestfwd(text)
        for name in ("guest-addr", "guest-port", "target"):
            if name not in args:
                raise QmpError(f"Parameter '{name}' is missing")
        protocol = str(args.get("protocol", "tcp"))
        spec = parse_guestfwd(f"{protocol}:{args['guest-addr']}:{args['guest-port']}-{args['target']}")
        guestfwd_rule(spec)
        return spec
    except PolicySyntaxError as exc:
        raise QmpError(f"Invalid gateway service ({exc})") from exc


async def cmd_guestfwd_add(ctx: Context, args: dict[str, object]) -> object:
    spec = guestfwd_from_arguments(args)
    try:
        return policy_of(ctx).add_guestfwd(spec)
    except PolicyError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_guestfwd_remove(ctx: Context, args: dict[str, object]) -> object:
    protocol = str(args.get("protocol", "tcp")).lower()
    if protocol not in ("tcp", "udp"):
        raise QmpError(f"protocol must be tcp or udp, not '{protocol}'")
    addr = args["guest-addr"]
    port = args["guest-port"]
    assert isinstance(addr, str) and isinstance(port, int)
    try:
        return policy_of(ctx).remove_guestfwd(protocol, addr, port)
    except PolicyError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_query_guestfwd(ctx: Context, args: dict[str, object]) -> object:
    return policy_of(ctx).list_guestfwds()


def policy_commands() -> list[Command]:
    return [
        Command(
            "policy-rule-add",
            (
                Param("rule", str),
                Param("action", str),
                Param("protocol", str),
                Param("destination", str),
                Param("target", str),
                Param("reply", str),
                Param("id", str),
                Param("position", int, False, 0, 4096, "a position between 0 and 4096"),
            ),
            cmd_policy_rule_add,
        ),
        Command("policy-rule-remove", (Param("id", str, True),), cmd_policy_rule_remove),
        Command("policy-set", (Param("restrict", bool), Param("allow-metadata", bool)), cmd_policy_set),
        Command("query-policy", (), cmd_query_policy),
        Command(
            "guestfwd-add",
            (
                Param("rule", str),
                Param("protocol", str),
                Param("guest-addr", str),
                port_param("guest-port", False, False),
                Param("target", str),
            ),
            cmd_guestfwd_add,
        ),
        Command(
            "guestfwd-remove",
            (Param("protocol", str), Param("guest-addr", str, True), port_param("guest-port", True, False)),
            cmd_guestfwd_remove,
        ),
        Command("query-guestfwd", (), cmd_query_guestfwd),
    ]

"""The text of the outbound policy: rules, gateway services (guestfwd) and the policy file.

A rule, on the command line (``--rule``), in a policy file (one per line) or over QMP::

    ACTION [PROTOCOL] DESTINATION [TARGET] [reply=rst|icmp|drop] [id=NAME]

- ACTION: ``direct`` (or ``allow``), ``refuse`` (or ``deny``), ``forward``, ``local``.
- PROTOCOL: ``tcp``, ``udp``, ``icmp`` or ``any`` (the default).
- DESTINATION: an address or network (``10.0.0.0/8``, ``198.51.100.7``, ``*`` for every
  address), optionally with ``:PORT`` or ``:LOW-HIGH``; IPv6 in brackets when a port follows
  (``[2001:db8::/32]:443``).
- TARGET, for ``forward``: ``tcp:HOST:PORT``, ``udp:HOST:PORT``, ``unix:PATH`` or
  ``cmd:COMMAND`` (quote a command with spaces); for ``local``: a service of the backend
  (``dns``).
- ``reply=`` (refuse only): ``rst`` (TCP's default), ``icmp`` (administratively prohibited;
  the default for UDP and ICMP) or ``drop``.

A gateway service (``--guestfwd``, QEMU's guestfwd syntax and more)::

    [tcp|udp]:ADDR:PORT-TARGET     e.g. tcp:10.0.2.100:1234-tcp:127.0.0.1:5000
                                        tcp:10.0.2.2:2375-unix:/run/docker.sock
                                        tcp:10.0.2.100:23-cmd:cat
                                        udp:10.0.2.100:514-udp:127.0.0.1:5514

Parsing errors are `PolicySyntaxError` with a message for the user.
"""

import ipaddress
import shlex
from dataclasses import dataclass

from qemu_vpnnet.core.fwd import (
    DIRECT,
    FORWARD,
    KIND_NAMES,
    LOCAL,
    LOCAL_SERVICES,
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_NAMES,
    PROTO_TCP,
    PROTO_UDP,
    REFUSE,
    REPLY_DEFAULT,
    REPLY_NAMES,
    TARGET_CMD,
    TARGET_TCP,
    TARGET_UDP,
    TARGET_UNIX,
    Route,
    Rule,
)

ACTIONS = {"direct": DIRECT, "allow": DIRECT, "refuse": REFUSE, "deny": REFUSE, "forward": FORWARD, "local": LOCAL}
PROTOCOLS = {"any": PROTO_ANY, "tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP}
MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
MAX_COMMAND = 4096
TARGET_SYNTAX = "tcp:HOST:PORT, udp:HOST:PORT, unix:PATH or cmd:COMMAND"


class PolicySyntaxError(ValueError):
    """A rule or gateway service that cannot be parsed; the message says what is wrong."""


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_port_range(text: str, what: str) -> tuple[int, int]:
    """``80`` or ``8000-8100`` as an inclusive range."""
    low, dash, high = text.partition("-")
    try:
        lo = int(low)
        hi = int(high) if dash else lo
    except ValueError:
        raise PolicySyntaxError(f"bad port {text!r} in {what}") from None
    if not (1 <= lo <= hi <= 65535):
        raise PolicySyntaxError(f"bad port range {text!r} in {what} (1..65535, low before high)")
    return lo, hi


def parse_destination(text: str) -> tuple[int, int, int, int, int]:
    """DESTINATION[:PORTS] as (family, network value, prefix, port low, port high)."""
    ports = ""
    net_text = text
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or (close + 1 < len(text) and text[close + 1] != ":"):
            raise PolicySyntaxError(f"bad destination {text!r}")
        net_text, ports = text[1:close], text[close + 2 :]
    elif text.count(":") == 1:
        net_text, _, ports = text.partition(":")
    if net_text in ("*", "any", ""):
        net_text = "0.0.0.0/0"
    try:
        network = ipaddress.ip_network(net_text, strict=False)
    except ValueError as exc:
        raise PolicySyntaxError(f"bad destination {text!r}: {exc}") from None
    lo, hi = parse_port_range(ports, f"destination {text!r}") if ports else (0, 65535)
    return network.version, int(network.network_address), network.prefixlen, lo, hi


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT of a forward target."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise PolicySyntaxError(f"bad {what} {text!r} (expected [ADDRESS]:PORT)")
        host, port = text[1:close], text[close + 2 :]
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise PolicySyntaxError(f"bad {what} {text!r} (expected HOST:PORT)")
    try:
        host = str(ipaddress.ip_address(host or "127.0.0.1"))
    except ValueError:
        raise PolicySyntaxError(f"bad address {host!r} in {what} {text!r}") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise PolicySyntaxError(f"bad port {port!r} in {what} {text!r}")
    return host, int(port)


def parse_target(text: str, rule_id: str) -> Route:
    """A forward target: tcp:HOST:PORT, udp:HOST:PORT, unix:PATH or cmd:COMMAND."""
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if not sep or not rest:
        raise PolicySyntaxError(f"bad target {text!r} (expected {TARGET_SYNTAX})")
    if kind in ("tcp", "udp"):
        host, port = parse_host_port(rest, "target")
        return Route(FORWARD, rule_id, TARGET_TCP if kind == "tcp" else TARGET_UDP, host, port)
    if kind == "unix":
        if len(rest.encode()) > MAX_PATH:
            raise PolicySyntaxError(f"Unix socket path too long (at most {MAX_PATH} bytes): {rest!r}")
        return Route(FORWARD, rule_id, TARGET_UNIX, path=rest)
    if kind == "cmd":
        if len(rest) > MAX_COMMAND:
            raise PolicySyntaxError(f"command too long (at most {MAX_COMMAND} characters)")
        try:
            if not shlex.split(rest):
                raise PolicySyntaxError("empty command")
        except ValueError as exc:
            raise PolicySyntaxError(f"bad command {rest!r}: {exc}") from None
        return Route(FORWARD, rule_id, TARGET_CMD, path=rest)
    raise PolicySyntaxError(f"unknown target type {kind!r} in {text!r} (tcp, udp, unix or cmd)")


def target_matches_protocol(route: Route, proto: int, what: str) -> None:
    if proto == PROTO_UDP and route.target != TARGET_UDP:
        raise PolicySyntaxError(f"{what}: a UDP flow can only be forwarded to udp:HOST:PORT")
    if proto == PROTO_TCP and route.target == TARGET_UDP:
        raise PolicySyntaxError(f"{what}: a TCP connection cannot be forwarded to udp:")
    if proto not in (PROTO_TCP, PROTO_UDP):
        raise PolicySyntaxError(f"{what}: forward needs the protocol tcp or udp")


@dataclass
class RuleFields:
    """A rule's parts, from text or from QMP's structured arguments."""

    action: str
    protocol: str = "any"
    destination: str = "*"
    target: str = ""
    reply: str = ""
    rule_id: str = ""


def build_rule(fields: RuleFields, default_id: str) -> Rule:
    """A Rule from its parts (PolicySyntaxError names what is wrong)."""
    action_name = fields.action.lower()
    if action_name not in ACTIONS:
        raise PolicySyntaxError(f"unknown action {fields.action!r} (direct, refuse, forward or local)")
    action = ACTIONS[action_name]
    proto_name = fields.protocol.lower() or "any"
    if proto_name not in PROTOCOLS:
        raise PolicySyntaxError(f"unknown protocol {fields.protocol!r} (tcp, udp, icmp or any)")
    proto = PROTOCOLS[proto_name]
    rule_id = fields.rule_id or default_id
    if not rule_id or len(rule_id) > 64 or not all(c.isalnum() or c in "-_.:" for c in rule_id):
        raise PolicySyntaxError(f"bad rule id {rule_id!r} (letters, digits and -_.: only, at most 64)")
    family, net, prefix, lo, hi = parse_destination(fields.destination)
    if proto == PROTO_ICMP and (lo, hi) != (0, 65535):
        raise PolicySyntaxError("an icmp rule takes no port")
    reply = REPLY_DEFAULT
    if fields.reply:
        if action != REFUSE:
            raise PolicySyntaxError("reply= is only for refuse rules")
        if fields.reply not in REPLY_NAMES[1:]:
            raise PolicySyntaxError(f"bad reply {fields.reply!r} (rst, icmp or drop)")
        reply = REPLY_NAMES.index(fields.reply)
        if reply == REPLY_NAMES.index("rst") and proto not in (PROTO_TCP, PROTO_ANY):
            raise PolicySyntaxError("reply=rst is for TCP rules")
    if action == FORWARD:
        if not fields.target:
            raise PolicySyntaxError(f"forward needs a target ({TARGET_SYNTAX})")
        route = parse_target(fields.target, rule_id)
        target_matches_protocol(route, proto, "forward")
    elif action == LOCAL:
        service = fields.target or "dns"
        if service not in LOCAL_SERVICES:
            raise PolicySyntaxError(f"unknown local service {service!r} (known: {', '.join(LOCAL_SERVICES)})")
        if proto not in (PROTO_TCP, PROTO_UDP):
            raise PolicySyntaxError("local needs the protocol tcp or udp")
        route = Route(LOCAL, rule_id, path=service)
    else:
        if fields.target:
            raise PolicySyntaxError(f"unexpected {fields.target!r}: only forward and local rules take a target")
        route = Route(action, rule_id, reply=reply)
    rule = Rule(rule_id, route, proto, family, net, prefix, lo, hi)
    rule.text = rule_text(rule)
    return rule


def rule_text(rule: Rule) -> str:
    """The canonical text of a rule, which parse_rule reads back to the same rule."""
    route = rule.route
    dest = rule.destination_text()
    if rule.prefix == 0 and rule.family == 4:
        dest = "*"
    if rule.port_lo != 0 or rule.port_hi != 65535:
        ports = str(rule.port_lo) if rule.port_lo == rule.port_hi else f"{rule.port_lo}-{rule.port_hi}"
        dest = f"[{dest}]:{ports}" if rule.family == 6 else f"{dest}:{ports}"
    parts = [KIND_NAMES[route.kind], PROTO_NAMES[rule.proto], dest]
    if route.kind == FORWARD:
        parts.append(shlex.quote(route.target_text()))
    elif route.kind == LOCAL:
        parts.append(route.path)
    elif route.kind == REFUSE and route.reply != REPLY_DEFAULT:
        parts.append("reply=" + REPLY_NAMES[route.reply])
    parts.append("id=" + rule.id)
    return " ".join(parts)


def parse_rule(text: str, default_id: str) -> Rule:
    """One rule in the text syntax of this module's docstring."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError as exc:
        raise PolicySyntaxError(f"{exc} in {text!r}") from None
    if not words:
        raise PolicySyntaxError("empty rule")
    options: dict[str, str] = {}
    plain: list[str] = []
    for word in words:
        name, eq, value = word.partition("=")
        if eq and name in ("reply", "id"):
            if name in options:
                raise PolicySyntaxError(f"{name}= given twice")
            options[name] = value
        else:
            plain.append(word)
    fields = RuleFields(plain[0])
    rest = plain[1:]
    if rest and rest[0].lower() in PROTOCOLS:
        fields.protocol = rest.pop(0)
    if not rest:
        raise PolicySyntaxError(f"missing destination in {text!r}")
    fields.destination = rest.pop(0)
    if rest:
        fields.target = rest.pop(0)
    if rest:
        raise PolicySyntaxError(f"unexpected {' '.join(rest)!r} in {text!r}")
    fields.reply = options.get("reply", "")
    fields.rule_id = options.get("id", "")
    return build_rule(fields, default_id)


def shorthand_rule(action: str, text: str, default_id: str) -> Rule:
    """--allow/--deny CIDR[:PORT[-PORT]]: a rule for any protocol."""
    return build_rule(RuleFields(action, "any", text), default_id)


def parse_policy_file(text: str) -> list[Rule]:
    """The rules of a policy file, one per line (``#`` starts a comment); ids default to lineN.

    PolicySyntaxError names the line of the first bad rule.
    """
    rules: list[Rule] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rule = parse_rule(line, f"line{number}")
        except PolicySyntaxError as exc:
            raise PolicySyntaxError(f"line {number}: {exc}") from None
        if rule.id in seen:
            raise PolicySyntaxError(f"line {number}: rule id {rule.id!r} is used twice")
        seen.add(rule.id)
        rules.append(rule)
    return rules


@dataclass
class GuestFwdSpec:
    """One gateway service: guest-side (protocol, address, port) and its target route."""

    protocol: str
    addr: str
    port: int
    target: str  # as written: tcp:HOST:PORT, udp:..., unix:PATH, cmd:COMMAND

    def text(self) -> str:
        return f"{self.protocol}:{self.addr}:{self.port}-{self.target}"


def parse_guestfwd(text: str) -> GuestFwdSpec:
    """`[tcp|udp]:ADDR:PORT-TARGET` (or QEMU's `guestfwd=...`); TARGET as parse_target, where a bare
    HOST:PORT means the service's own protocol."""
    rule = text.strip()
    if rule.startswith("guestfwd="):
        rule = rule[len("guestfwd=") :]
    protocol, sep, rest = rule.partition(":")
    if not sep:
        raise PolicySyntaxError(f"expected [tcp|udp]:ADDR:PORT-TARGET, got {text!r}")
    protocol = protocol.lower() or "tcp"
    if protocol not in ("tcp", "udp"):
        raise PolicySyntaxError(f"protocol must be tcp or udp, not {protocol!r}")
    guest, dash, target = rest.partition("-")
    if not dash or not target:
        raise PolicySyntaxError(f"missing '-TARGET' in {text!r}")
    addr, colon, port = guest.rpartition(":")
    if not colon:
        raise PolicySyntaxError(f"expected ADDR:PORT before '-' in {text!r}")
    try:
        addr = str(ipaddress.IPv4Address(addr))
    except ValueError:
        raise PolicySyntaxError(f"bad guest-side address {addr!r} in {text!r} (IPv4 expected)") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise PolicySyntaxError(f"bad guest-side port {port!r} in {text!r}")
    first = target.split(":", 1)[0]
    if first.lower() not in ("tcp", "udp", "unix", "cmd"):
        if first and not first.startswith("[") and not is_ip_address(first):
            raise PolicySyntaxError(f"unknown target type {first!r} in {text!r} ({TARGET_SYNTAX})")
        target = f"{protocol}:{target}"  # a bare HOST:PORT: the service's own protocol
    spec = GuestFwdSpec(protocol, addr, int(port), target)
    guestfwd_rule(spec)  # checks the target
    return spec


def guestfwd_rule(spec: GuestFwdSpec) -> Rule:
    """The rule of a gateway service (exact address and port)."""
    proto = PROTOCOLS[spec.protocol]
    rule_id = f"guestfwd-{spec.protocol}-{spec.addr}:{spec.port}"
    route = parse_target(spec.target, rule_id)
    target_matches_protocol(route, proto, f"guestfwd {spec.text()}")
    rule = Rule(rule_id, route, proto, 4, int(ipaddress.IPv4Address(spec.addr)), 32, spec.port, spec.port, spec.text())
    return rule

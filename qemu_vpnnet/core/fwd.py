"""One route decision for every new guest flow: direct, forward, local service, or refuse.

Theory of operation (passt's fwd.c is the model): each new guest TCP connection, each new
destination of a guest UDP flow and each ICMP echo is matched once, when it starts, by
`RouteTable.route_from_guest(proto, dst, dport)`. The answer is a `Route`, kept by the flow for
its whole life, so a change of the table applies to new flows only. The engines carry a route
out: DIRECT and FORWARD become host sockets (the shell picks the connector by
`Route.target`), LOCAL a service of the backend itself (its DNS server), REFUSE a TCP RST, an
ICMP destination-unreachable (administratively prohibited, type 3 code 13) or nothing.

The order of the decision:

1. Gateway services (guestfwd): an exact (protocol, address, port) of the guest network.
   They are reachable whatever the rules say, as QEMU's guestfwd is under restrict=on.
2. The virtual DNS address, TCP port 53: LOCAL dns (UDP port 53 is answered before routing).
3. Addresses nothing may reach: other virtual addresses of the guest network, 0/8, 127/8,
   multicast and class E, the gateway when host loopback is off. REFUSE (rule "virtual").
   For IPv6 likewise: the rest of the guests' prefix, ::/8, link-local, multicast.
4. The rules, first match wins: the built-in metadata rule (169.254.169.254, unless
   allow_metadata), then the rules added at run time (QMP), then those of the command line,
   then those of the policy file. A rule matches protocol, destination network and port
   range; the destination is matched as the guest sees it *and* as the host will see it (the
   gateway address is the host's 127.0.0.1), so a rule on either name holds for both.
5. No rule matched: DIRECT, or REFUSE (rule "restrict") when restrict is on.
6. A TCP flow that would go DIRECT to a port of proxy_http_ports or proxy_https_ports (set only
   while an upstream HTTP proxy is configured) goes through that proxy instead: PROXY, whose
   path says "http" (requests rewritten to absolute form) or "https" (CONNECT by the SNI name).
   The gateway's own ports (the host's loopback) are never proxied.

Everything here is plain data and arithmetic: no sockets, no clock; tests/test_fwd.py drives
it as a table.
"""

import ipaddress
import socket
from typing import Final, final

from qemu_vpnnet.core.config import IP6_LOOPBACK, NetConfig
from qemu_vpnnet.core.packets import is_unicast_outside

# route kinds
DIRECT: Final = 0
FORWARD: Final = 1
LOCAL: Final = 2
REFUSE: Final = 3
PROXY: Final = 4  # through the upstream HTTP proxy, transparently (Route.path: "http" or "https")
KIND_NAMES: Final = ("direct", "forward", "local", "refuse", "proxy")

# what a FORWARD route connects to (Route.target)
TARGET_NONE: Final = 0
TARGET_TCP: Final = 1  # host address:port over TCP
TARGET_UDP: Final = 2  # host address:port over UDP
TARGET_UNIX: Final = 3  # a host Unix stream socket (Route.path)
TARGET_CMD: Final = 4  # a command run per connection, the connection on its stdin/stdout
TARGET_NAMES: Final = ("", "tcp", "udp", "unix", "cmd")

# how a REFUSE route answers the guest
REPLY_DEFAULT: Final = 0  # TCP: RST; UDP and ICMP: ICMP administratively prohibited
REPLY_RST: Final = 1
REPLY_ICMP: Final = 2
REPLY_DROP: Final = 3  # nothing (the guest times out)
REPLY_NAMES: Final = ("default", "rst", "icmp", "drop")

# protocols a rule can name (IP protocol numbers; 0 is any)
PROTO_ANY: Final = 0
PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_NAMES: Final = {PROTO_ANY: "any", PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp"}

LOCAL_SERVICES: Final = ("dns", "http-proxy")  # what a LOCAL route may name
METADATA_ADDR: Final = b"\xa9\xfe\xa9\xfe"  # 169.254.169.254, cloud instance metadata
METADATA_ADDR6: Final = b"\xfd\x00\x0e\xc2" + bytes(10) + b"\x02\x54"  # fd00:ec2::254, its IPv6 address (AWS)
MAX_RULES: Final = 4096  # rules of one origin (run time, command line, file)
MAX_GUESTFWDS: Final = 1024


@final
class Route:
    """Where a flow goes: kind, and for FORWARD the target; shared by every flow of one rule."""

    __slots__ = ("addr", "kind", "path", "port", "reply", "rule", "target")

    def __init__(
        self,
        kind: int,
        rule: str = "",
        target: int = TARGET_NONE,
        addr: str = "",
        port: int = 0,
        path: str = "",
        reply: int = REPLY_DEFAULT,
    ) -> None:
        self.kind = kind
        self.rule = rule  # id of the rule that chose it ("" for the default)
        self.target = target
        self.addr = addr  # FORWARD to tcp/udp: the host address
        self.port = port  # ... and port
        self.path = path  # FORWARD unix: the socket path; cmd: the command; LOCAL: the service
        self.reply = reply  # REFUSE: REPLY_*

    def describe(self) -> str:
        """As query-connections and the log show it: "direct", "forward tcp:127.0.0.1:5000", ..."""
        kind = self.kind
        if kind == FORWARD:
            return "forward " + self.target_text()
        if kind == LOCAL:
            return "local " + self.path
        if kind == REFUSE:
            return "refuse " + REPLY_NAMES[self.reply] if self.reply != REPLY_DEFAULT else "refuse"
        if kind == PROXY:
            return "proxy " + self.path
        return "direct"

    def target_text(self) -> str:
        """The forward target in guestfwd syntax: tcp:HOST:PORT, udp:HOST:PORT, unix:PATH, cmd:COMMAND."""
        target = self.target
        if target == TARGET_TCP or target == TARGET_UDP:
            host = f"[{self.addr}]" if ":" in self.addr else self.addr
            return f"{TARGET_NAMES[target]}:{host}:{self.port}"
        if target == TARGET_UNIX or target == TARGET_CMD:
            return f"{TARGET_NAMES[target]}:{self.path}"
        return ""


DIRECT_ROUTE: Final = Route(DIRECT)
VIRTUAL_ROUTE: Final = Route(REFUSE, "virtual")
RESTRICT_ROUTE: Final = Route(REFUSE, "restrict")
DNS_ROUTE: Final = Route(LOCAL, "dns", path="dns")
PROXY_HTTP_ROUTE: Final = Route(PROXY, "proxy-http", path="http")
PROXY_HTTPS_ROUTE: Final = Route(PROXY, "proxy-https", path="https")


def addr_value(addr: bytes) -> int:
    return int.from_bytes(addr, "big")


@final
class Rule:
    """One line of the rule table: what it matches, and the route it gives."""

    def __init__(
        self,
        rule_id: str,
        route: Route,
        proto: int = PROTO_ANY,
        family: int = 4,
        net: int = 0,
        prefix: int = 0,
        port_lo: int = 0,
        port_hi: int = 65535,
        text: str = "",
        origin: str = "",
    ) -> None:
        width = 32 if family == 4 else 128
        if not 0 <= prefix <= width:
            raise ValueError(f"prefix /{prefix} is out of range for IPv{family}")
        self.id = rule_id
        self.route = route
        self.proto = proto
        self.family = family
        self.mask = ((1 << width) - 1) ^ ((1 << (width - prefix)) - 1)
        self.net = net & self.mask
        self.prefix = prefix
        self.port_lo = port_lo
        self.port_hi = port_hi
        self.text = text  # the rule as written (for query-policy and the log)
        self.origin = origin  # "builtin", "qmp", "cli", "file", "guestfwd"
        self.hits = 0

    def matches(self, proto: int, family: int, value: int, port: int) -> bool:
        """Whether a flow of proto to (value, port) falls under this rule (port 0: no port, ICMP)."""
        if self.proto != PROTO_ANY and self.proto != proto:
            return False
        if self.family != family or (value & self.mask) != self.net:
            return False
        if port == 0:
            return self.port_lo == 0 and self.port_hi == 65535
        return self.port_lo <= port <= self.port_hi

    def describe(self) -> dict[str, object]:
        """For query-policy: the rule's fields as JSON."""
        route = self.route
        info: dict[str, object] = {
            "id": self.id,
            "rule": self.text,
            "origin": self.origin,
            "action": KIND_NAMES[route.kind],
            "protocol": PROTO_NAMES.get(self.proto, str(self.proto)),
            "destination": self.destination_text(),
            "hits": self.hits,
        }
        if self.port_lo != 0 or self.port_hi != 65535:
            info["ports"] = str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}-{self.port_hi}"
        if route.kind == FORWARD:
            info["target"] = route.target_text()
        elif route.kind == LOCAL:
            info["service"] = route.path
        elif route.kind == REFUSE:
            info["reply"] = REPLY_NAMES[route.reply]
        return info

    def destination_text(self) -> str:
        if self.family == 4:
            return str(ipaddress.IPv4Network((self.net, self.prefix)))
        return str(ipaddress.IPv6Network((self.net, self.prefix)))


def metadata_rules() -> list[Rule]:
    route = Route(REFUSE, "metadata")
    return [
        Rule(
            "metadata",
            route,
            net=addr_value(METADATA_ADDR),
            prefix=32,
            text="refuse any 169.254.169.254",
            origin="builtin",
        ),
        Rule(
            "metadata6",
            route,
            family=6,
            net=addr_value(METADATA_ADDR6),
            prefix=128,
            text="refuse any fd00:ec2::254",
            origin="builtin",
        ),
    ]


@final
class RouteTable:
    """The rule table and the gateway services, and the one decision for new flows."""

    def __init__(self, config: NetConfig, owners: dict[bytes, bytes] | None = None) -> None:
        self.config = config
        # address -> the only MAC that may send from it (core/guard.py): gateway services' are ours
        self.owners: dict[bytes, bytes] = owners if owners is not None else {}
        self.restrict = False
        self.builtin: list[Rule] = metadata_rules()
        self.runtime: list[Rule] = []  # QMP
        self.cli: list[Rule] = []
        self.file: list[Rule] = []
        self.rules: list[Rule] = list(self.builtin)  # the four above, in order: what route_from_guest walks
        # gateway services: (proto << 48 | address << 16 | port) -> rule
        self.guestfwds: dict[int, Rule] = {}
        self.service_addrs: dict[bytes, int] = {}  # addresses of gateway services -> how many use it
        self.counts: dict[int, int] = {DIRECT: 0, FORWARD: 0, LOCAL: 0, REFUSE: 0, PROXY: 0}
        # TCP ports whose direct flows go through the upstream HTTP proxy (empty: no upstream)
        self.proxy_http_ports: set[int] = set()
        self.proxy_https_ports: set[int] = set()
        self.refusals: dict[str, int] = {}  # refusing rule id (or "virtual", "restrict") -> flows refused

    # ---- the table ---------------------------------------------------------------------
    def set_allow_metadata(self, allow: bool) -> None:
        self.builtin = [] if allow else metadata_rules()
        self.rebuild()

    def set_rules(self, origin: str, rules: list[Rule]) -> None:
        """Replace all rules of one origin ("qmp", "cli" or "file")."""
        if len(rules) > MAX_RULES:
            raise ValueError(f"too many rules ({len(rules)}; at most {MAX_RULES})")
        for rule in rules:
            rule.origin = origin
        if origin == "qmp":
            self.runtime = list(rules)
        elif origin == "cli":
            self.cli = list(rules)
        elif origin == "file":
            self.file = list(rules)
        else:
            raise ValueError(f"unknown rule origin {origin!r}")
        self.rebuild()

    def rebuild(self) -> None:
        self.rules = self.builtin + self.runtime + self.cli + self.file

    def rule_by_id(self, rule_id: str) -> Rule | None:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        for rule in self.guestfwds.values():
            if rule.id == rule_id:
                return rule
        return None

    def describe(self) -> list[dict[str, object]]:
        """Every rule in the order they are tried (gateway services first)."""
        return [rule.describe() for rule in list(self.guestfwds.values()) + self.rules]

    # ---- gateway services --------------------------------------------------------------
    @staticmethod
    def service_key(proto: int, addr: bytes, port: int) -> int:
        return (proto << 48) | (addr_value(addr) << 16) | port

    def add_guestfwd(self, rule: Rule, addr: bytes, port: int) -> None:
        """A gateway service at addr:port of the guest network (rule.route is its target)."""
        cfg = self.config
        if len(addr) != 4 or not cfg.contains(addr) or addr in (cfg.net_addr, cfg.broadcast, cfg.dns_ip):
            raise ValueError(f"{'.'.join(str(b) for b in addr)} is not a free address of {cfg.network}")
        key = self.service_key(rule.proto, addr, port)
        if key in self.guestfwds:
            raise ValueError(f"a {PROTO_NAMES[rule.proto]} gateway service at {rule.destination_text()} exists already")
        if len(self.guestfwds) >= MAX_GUESTFWDS:
            raise ValueError(f"too many gateway services (at most {MAX_GUESTFWDS})")
        rule.origin = "guestfwd"
        self.guestfwds[key] = rule
        self.service_addrs[addr] = self.service_addrs.get(addr, 0) + 1
        self.owners[addr] = cfg.gateway_mac

    def remove_guestfwd(self, proto: int, addr: bytes, port: int) -> Rule | None:
        rule = self.guestfwds.pop(self.service_key(proto, addr, port), None)
        if rule is not None:
            left = self.service_addrs.get(addr, 0) - 1
            if left > 0:
                self.service_addrs[addr] = left
            else:
                self.service_addrs.pop(addr, None)
                cfg = self.config
                if addr != cfg.host_ip and addr != cfg.dns_ip and self.owners.get(addr) == cfg.gateway_mac:
                    del self.owners[addr]
        return rule

    def is_service_address(self, addr: bytes) -> bool:
        """Whether addr is an address of the guest network that only gateway services use."""
        return addr in self.service_addrs and addr != self.config.host_ip

    # ---- the decision ------------------------------------------------------------------
    def route_from_guest(self, proto: int, dst: bytes, dport: int) -> Route:
        """The route of a new guest flow of proto (PROTO_TCP/UDP/ICMP) to dst:dport (4 or 16 bytes).

        dport is 0 for ICMP. Counts the decision (per kind) and the matching rule's hits.
        """
        route = self.decide(proto, dst, dport)
        self.counts[route.kind] += 1
        if route.kind == REFUSE:
            refusals = self.refusals
            if route.rule in refusals or len(refusals) < MAX_RULES:
                refusals[route.rule] = refusals.get(route.rule, 0) + 1
        return route

    def decide(self, proto: int, dst: bytes, dport: int) -> Route:
        if len(dst) == 16:
            return self.decide6(proto, dst, dport)
        cfg = self.config
        if self.guestfwds:
            service = self.guestfwds.get(self.service_key(proto, dst, dport))
            if service is not None:
                service.hits += 1
                return service.route
        if dst == cfg.dns_ip:
            return DNS_ROUTE if proto == PROTO_TCP and dport == 53 else VIRTUAL_ROUTE
        first = dst[0]
        if first == 0 or first == 127 or first >= 224:
            return VIRTUAL_ROUTE
        value = (first << 24) | (dst[1] << 16) | (dst[2] << 8) | dst[3]
        host_value = value
        if (value & cfg.mask_int) == cfg.net_int:
            if dst != cfg.host_ip or not cfg.host_loopback:
                return VIRTUAL_ROUTE
            host_value = 0x7F000001  # the gateway is the host's 127.0.0.1
        return self.by_rules(proto, 4, value, host_value, dport)

    def by_rules(self, proto: int, family: int, value: int, host_value: int, dport: int) -> Route:
        """Steps 4 to 6 of the decision for a destination that is value as the guest sees it and
        host_value as the host does (they differ for the gateway only)."""
        route = RESTRICT_ROUTE if self.restrict else DIRECT_ROUTE
        for rule in self.rules:
            if rule.matches(proto, family, value, dport) or (
                host_value != value and rule.matches(proto, family, host_value, dport)
            ):
                rule.hits += 1
                route = rule.route
                break
        if route.kind == DIRECT and proto == PROTO_TCP and host_value == value:  # never the host's own ports
            if dport in self.proxy_http_ports:
                return PROXY_HTTP_ROUTE
            if dport in self.proxy_https_ports:
                return PROXY_HTTPS_ROUTE
        return route

    def decide6(self, proto: int, dst: bytes, dport: int) -> Route:
        """decide() for an IPv6 destination: the same order, with fec0::3 the DNS address,
        fec0::2 the host's ::1, and ::/8, link-local, multicast and the rest of the guests'
        prefix unreachable."""
        cfg = self.config
        if dst == cfg.dns_ip6:
            return DNS_ROUTE if proto == PROTO_TCP and dport == 53 else VIRTUAL_ROUTE
        if not is_unicast_outside(dst):
            return VIRTUAL_ROUTE
        value = int.from_bytes(dst, "big")
        host_value = value
        if dst[:8] == cfg.prefix6:
            if dst != cfg.host_ip6 or not cfg.host_loopback:
                return VIRTUAL_ROUTE
            host_value = 1  # the gateway is the host's ::1
        return self.by_rules(proto, 6, value, host_value, dport)

    def guest_visible_source(self, addr: str) -> bytes:
        """The address a packet from host-side addr appears to come from to guests; b"" to drop it.

        The inverse of NetConfig.host_side_address: 127.0.0.1 (::1) is the gateway when host
        loopback is on; other loopback, multicast, link-local and addresses inside the virtual
        networks cannot be sources from the outside.
        """
        cfg = self.config
        if ":" in addr:
            try:
                raw = socket.inet_pton(socket.AF_INET6, addr.partition("%")[0])
            except OSError:
                return b""
            if raw == IP6_LOOPBACK:
                return cfg.host_ip6 if cfg.host_loopback else b""
            if not is_unicast_outside(raw) or raw[:8] == cfg.prefix6:
                return b""
            return raw
        if addr == "127.0.0.1":
            return cfg.host_ip if cfg.host_loopback else b""
        try:
            raw = socket.inet_aton(addr)
        except OSError:
            return b""
        if not is_unicast_outside(raw) or cfg.contains(raw):
            return b""
        return raw

    def counters(self) -> dict[str, int]:
        """Decisions per route kind, and the hits of every refusing rule, for query-stats."""
        values = {f"route-{KIND_NAMES[kind]}": count for kind, count in self.counts.items() if count}
        for rule_id, count in self.refusals.items():
            values[f"refused-by-rule-{rule_id}"] = count
        return values

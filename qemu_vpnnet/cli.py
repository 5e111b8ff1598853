"""The `qemu-vpnnet` command: run the backend, or one of its subcommands."""

import argparse
import asyncio
import importlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from qemu_vpnnet import __version__
from qemu_vpnnet.control.qmp_server import QmpServer
from qemu_vpnnet.core.config import (
    DEFAULT_MTU,
    DEFAULT_NET,
    DEFAULT_PREFIX6,
    GUEST_MAX_PENDING,
    GUEST_MAX_TCP,
    GUEST_MAX_UDP,
    GUEST_NEW_FLOWS,
    NetConfig,
    ip_bytes,
    ip_str,
)
from qemu_vpnnet.core.fwd import Rule
from qemu_vpnnet.core.packets import parse_mac
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.hostfwd import HostFwdSyntaxError, parse_hostfwd
from qemu_vpnnet.io.forwards import Forwarder, ForwardError
from qemu_vpnnet.io.gc_tuning import WATCH as gc_watch
from qemu_vpnnet.io.gc_tuning import freeze_startup, tune_gc
from qemu_vpnnet.io.host_side import install_host_side
from qemu_vpnnet.io.http_proxy import start_proxy
from qemu_vpnnet.io.policy_control import Policy
from qemu_vpnnet.io.proxy_config import add_proxy_options
from qemu_vpnnet.io.shell import Shell, StartupError
from qemu_vpnnet.policy import GuestFwdSpec, PolicySyntaxError, parse_guestfwd, parse_rule, shorthand_rule
from qemu_vpnnet.sandbox import Lockdown, TargetUser

log = logging.getLogger("qemu_vpnnet")

DEVICE_HINT = "-device virtio-net-pci,netdev=vpnnet0"
LOG_LEVELS = ("debug", "info", "warning", "error")


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be [v6] or empty for 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def dns_server(text: str) -> str:
    """[DOMAIN=]IP[:PORT] or [DOMAIN=][v6]:PORT for --dns-upstream, checked at parse time."""
    from qemu_vpnnet.io.dns_upstream import parse_server, parse_split

    try:
        if "=" in text:
            parse_split(text)
        else:
            parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--dns-upstream {text!r}: {exc}") from exc
    return text


def dns_zone(text: str) -> str:
    """NAME=ADDR for --dns-zone, checked at parse time."""
    from qemu_vpnnet.core.dns_zone import ZoneError, parse_zone_entry

    try:
        parse_zone_entry(text)
    except ZoneError as exc:
        raise argparse.ArgumentTypeError(f"--dns-zone {text!r}: {exc}") from exc
    return text


def dns_zone_file(text: str) -> str:
    """--dns-zone-file: a readable zone file without bad lines (checked at start)."""
    from qemu_vpnnet.core.dns_zone import ZoneError
    from qemu_vpnnet.io.dns_host import read_zone_file

    try:
        read_zone_file(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"--dns-zone-file {text}: {exc.strerror or exc}") from exc
    except ZoneError as exc:
        raise argparse.ArgumentTypeError(f"--dns-zone-file {text}: {exc}") from exc
    return text


def ipv6_prefix(text: str) -> str:
    """--ipv6-prefix: an IPv6 /64 a guest can use (ADDRESS/64)."""
    try:
        network = ipaddress.IPv6Network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ipv6-prefix {text!r}: not an IPv6 network (ADDRESS/64)") from None
    if network.prefixlen != 64:
        raise argparse.ArgumentTypeError(
            f"--ipv6-prefix {text}: must be a /64 (SLAAC needs 64 bits for the interface identifier)"
        )
    if network.is_multicast or network.is_link_local or network.is_loopback or network.is_unspecified:
        raise argparse.ArgumentTypeError(f"--ipv6-prefix {text}: not a unicast prefix a guest can use")
    return str(network)


def ipv6_address(option: str) -> Callable[[str], str]:
    """A type for --ipv6-host/--ipv6-dns: one IPv6 address (brackets allowed), in normal form."""

    def parse(text: str) -> str:
        try:
            return str(ipaddress.IPv6Address(text.removeprefix("[").removesuffix("]")))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: not an IPv6 address") from None

    return parse


def check_ipv6_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the IPv6 options together (naming the option), or None."""
    if args.no_ipv6 and args.dhcpv6:
        return "--dhcpv6: IPv6 is off (--no-ipv6)"
    network = ipaddress.IPv6Network(args.ipv6_prefix)
    base = network.network_address
    host = ipaddress.IPv6Address(args.ipv6_host) if args.ipv6_host else base + 2
    dns = ipaddress.IPv6Address(args.ipv6_dns) if args.ipv6_dns else base + 3
    for option, addr in (("--ipv6-host", host), ("--ipv6-dns", dns)):
        if addr not in network or addr == base:
            return f"{option} {addr}: not a host address of --ipv6-prefix {network}"
    if host == dns:
        return f"--ipv6-dns {dns}: the gateway (--ipv6-host) has that address"
    return None


def static_lease(text: str) -> tuple[bytes, bytes]:
    """MAC=ADDR for --dhcp-static."""
    mac, sep, addr = text.partition("=")
    try:
        if not sep:
            raise ValueError("expected MAC=ADDRESS")
        return parse_mac(mac), ip_bytes(addr)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--dhcp-static {text!r}: {exc}") from exc


def busy_poll_usec(text: str) -> int:
    """--busy-poll: microseconds, 0..10000."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--busy-poll {text!r}: expected microseconds (an integer)") from None
    if not 0 <= value <= 10000:
        raise argparse.ArgumentTypeError(f"--busy-poll {value}: must be 0..10000 microseconds")
    return value


def size_bytes(text: str) -> int:
    """--pcap-max-size: bytes, or with k/M/G."""
    from qemu_vpnnet.io.capture import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def target_user(text: str) -> "TargetUser":
    """--user USER[:GROUP], looked up at parse time."""
    from qemu_vpnnet.sandbox import parse_user

    try:
        return parse_user(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_security_options(p: argparse.ArgumentParser) -> None:
    """Packet capture and least privilege (docs/security.rst)."""
    from qemu_vpnnet.io.capture import DEFAULT_FILES, DEFAULT_SNAPLEN

    s = p.add_argument_group("packet capture and least privilege (see docs/security.rst)")
    s.add_argument(
        "--pcap",
        metavar="FILE",
        help="capture every frame to and from the guests, from the start, in pcap format (tcpdump -r, "
        "Wireshark); QMP capture-start/capture-stop do the same at run time (default: no capture)",
    )
    s.add_argument(
        "--pcap-filter",
        default="",
        metavar="EXPR",
        help="keep only frames matching '[arp|ip|icmp|tcp|udp] [host ADDR] [port N]' (default: all)",
    )
    s.add_argument(
        "--pcap-snaplen",
        type=int,
        default=DEFAULT_SNAPLEN,
        metavar="BYTES",
        help=f"bytes kept of each frame, 64..262144 (default {DEFAULT_SNAPLEN}: whole frames)",
    )
    s.add_argument(
        "--pcap-max-size",
        type=size_bytes,
        default="64M",
        metavar="SIZE",
        help="start a new file when the capture reaches SIZE (k, M, G; 0: no limit) (default 64M)",
    )
    s.add_argument(
        "--pcap-files",
        type=int,
        default=DEFAULT_FILES,
        metavar="N",
        help=f"files kept: FILE, FILE.1, ... FILE.N-1; the oldest is removed (default {DEFAULT_FILES})",
    )
    s.add_argument(
        "--user",
        type=target_user,
        metavar="USER[:GROUP]",
        help="started as root, become USER (and GROUP, default USER's) once the listening sockets are open: "
        "no supplementary groups, no capabilities (default: stay as started)",
    )
    s.add_argument(
        "--sandbox",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="once listening: set no-new-privileges, allow only the system calls the backend makes "
        "(seccomp) and, where the kernel has Landlock, writes only below the state file's, capture "
        "file's and sockets' directories and --writable ones; --no-sandbox turns it off (default on)",
    )
    s.add_argument(
        "--writable",
        action="append",
        default=[],
        metavar="DIR",
        help="one more directory the sandbox leaves writable, e.g. for QMP capture-start files or what "
        "cmd: targets write (repeatable; default none)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qemu-vpnnet",
        description="User-mode network backend for QEMU: guests' traffic leaves as ordinary host sockets.",
        epilog="Subcommands: see README.rst.",
    )
    p.add_argument("--version", action="version", version=f"qemu-vpnnet {__version__}")
    t = p.add_argument_group("QEMU-side transports (several may be given)")
    t.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="PATH",
        help="listen on a Unix stream socket (QEMU: -netdev stream,server=off,addr.path=PATH)",
    )
    t.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="PATH",
        help="connect to a QEMU listening on PATH (-netdev stream,server=on,...), reconnecting",
    )
    t.add_argument(
        "--listen-tcp",
        action="append",
        default=[],
        metavar="HOST:PORT",
        type=host_port,
        help="listen on TCP for -netdev socket,connect=HOST:PORT (libvirt type='client')",
    )
    t.add_argument(
        "--vhost-user",
        action="append",
        default=[],
        metavar="PATH",
        help="serve QEMU's vhost-user netdev on a Unix socket (one VM each; its RAM must be shared: "
        "see docs/vhost-user.rst)",
    )
    t.add_argument(
        "--vhost-user-unsealed-memory",
        action="store_true",
        help="vhost-user: accept guest memory in files not sealed against shrinking (memory-backend-file); "
        "a front-end that shrank one would kill the backend",
    )
    t.add_argument(
        "--no-offloads",
        action="store_true",
        help="vhost-user: offer no checksum or segmentation offloads (for comparison and debugging)",
    )
    t.add_argument(
        "--dgram",
        action="append",
        default=[],
        metavar="PATH",
        help="bind a Unix datagram socket for -netdev dgram,remote.type=unix,remote.path=PATH",
    )
    n = p.add_argument_group("virtual network (defaults are QEMU -netdev user's)")
    n.add_argument("--net", default=DEFAULT_NET, metavar="CIDR", help=f"guest network (default {DEFAULT_NET})")
    n.add_argument("--host", metavar="ADDR", help="gateway/host address (default: .2 of --net)")
    n.add_argument("--dns", metavar="ADDR", help="DNS server address (default: .3 of --net)")
    n.add_argument("--dhcp-start", metavar="ADDR", help="first address handed out (default: .15 of --net)")
    n.add_argument(
        "--dhcp-static",
        action="append",
        default=[],
        type=static_lease,
        metavar="MAC=ADDR",
        help="always give ADDR to the guest with MAC (repeatable)",
    )
    n.add_argument("--lease-time", type=int, default=86400, metavar="SECONDS", help="DHCP lease time (default 86400)")
    n.add_argument("--domain", default="", help="DNS domain handed out by DHCP")
    n.add_argument("--dns-search", action="append", default=[], metavar="DOMAIN", help="DNS search domain (repeatable)")
    n.add_argument(
        "--mtu",
        type=int,
        default=DEFAULT_MTU,
        help=f"MTU offered by DHCP and in IPv6 router advertisements, 576..65520 (default {DEFAULT_MTU})",
    )
    n.add_argument(
        "--busy-poll",
        type=busy_poll_usec,
        default=200,
        metavar="USEC",
        help="after a light request/reply turn keep polling this long instead of sleeping: lower "
        "round-trip latency for some CPU while such traffic flows; 0 turns it off (default 200)",
    )
    n.add_argument(
        "--gc-defaults",
        action="store_true",
        help="keep Python's garbage collector as it comes (io/gc_tuning.py; for comparison: scripts/bench-gc)",
    )
    v = p.add_argument_group("IPv6 (see docs/ipv6.rst; defaults are QEMU -netdev user's)")
    v.add_argument(
        "--ipv6-prefix",
        type=ipv6_prefix,
        default=DEFAULT_PREFIX6,
        metavar="PREFIX",
        help=f"the guests' IPv6 /64, announced in router advertisements for SLAAC (default {DEFAULT_PREFIX6})",
    )
    v.add_argument(
        "--ipv6-host",
        type=ipv6_address("--ipv6-host"),
        metavar="ADDR",
        help="the gateway's IPv6 address, the host's ::1 for guests (default: ::2 of --ipv6-prefix)",
    )
    v.add_argument(
        "--ipv6-dns",
        type=ipv6_address("--ipv6-dns"),
        metavar="ADDR",
        help="the DNS server's IPv6 address (default: ::3 of --ipv6-prefix)",
    )
    v.add_argument(
        "--dhcpv6",
        action="store_true",
        help="also give stateful DHCPv6 addresses to guests that ask (default: SLAAC, and stateless DHCPv6 "
        "for DNS servers and the search list only)",
    )
    v.add_argument(
        "--no-ipv6",
        action="store_true",
        help="no IPv6 service for guests: no router advertisements, DHCPv6, or IPv6 to the gateway, the host "
        "and beyond (default: IPv6 on)",
    )
    d = p.add_argument_group("DNS (see docs/dns.rst)")
    d.add_argument(
        "--dns-mode",
        choices=("host", "forward"),
        default=None,
        help="host: answer A/AAAA with the host's resolver library (getaddrinfo: /etc/hosts, nsswitch, "
        "systemd-resolved), forward the rest; forward: forward every query (default host, or forward "
        "when a plain --dns-upstream IP is given)",
    )
    d.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        type=dns_server,
        metavar="[DOMAIN=]IP[:PORT]",
        help="upstream DNS server (repeatable; default: the host's /etc/resolv.conf, followed when it changes); "
        "DOMAIN=IP sends queries for DOMAIN and the names below it to IP only, in every mode",
    )
    d.add_argument(
        "--dns-zone",
        action="append",
        default=[],
        type=dns_zone,
        metavar="NAME=ADDR",
        help="answer NAME (or *.DOMAIN: every name below DOMAIN) with IPv4 or IPv6 ADDR "
        "(repeatable, also for several addresses of one name; default none)",
    )
    d.add_argument(
        "--dns-zone-file",
        action="append",
        default=[],
        type=dns_zone_file,
        metavar="FILE",
        help="names from FILE, lines 'NAME ADDR [ADDR...]', reloaded when it changes (repeatable; default none)",
    )
    d.add_argument(
        "--host-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name that resolves to the gateway address, besides host.internal and gateway.internal (repeatable)",
    )
    o = p.add_argument_group("outbound traffic")
    o.add_argument(
        "--no-host-loopback",
        action="store_true",
        help="do not map the gateway address to the host's 127.0.0.1",
    )
    o.add_argument("--udp-timeout", type=float, default=60.0, metavar="SECONDS", help="UDP flow idle timeout")
    o.add_argument("--max-udp-flows", type=int, default=4096, help="UDP flows kept at once (oldest evicted)")
    o.add_argument("--max-tcp-flows", type=int, default=65536, help="TCP connections kept at once")
    g = p.add_argument_group(
        "per-guest limits (docs/isolation.rst): by guest MAC; over a limit a new TCP connection gets RST "
        "at once and a new UDP flow evicts that guest's oldest; 0 means no limit"
    )
    g.add_argument(
        "--guest-max-tcp",
        type=int,
        default=GUEST_MAX_TCP,
        metavar="N",
        help=f"TCP connections one guest may hold (default {GUEST_MAX_TCP})",
    )
    g.add_argument(
        "--guest-max-pending",
        type=int,
        default=GUEST_MAX_PENDING,
        metavar="N",
        help=f"of those, still connecting to their host (default {GUEST_MAX_PENDING})",
    )
    g.add_argument(
        "--guest-max-udp",
        type=int,
        default=GUEST_MAX_UDP,
        metavar="N",
        help=f"UDP flows one guest may hold, and as many ping flows (default {GUEST_MAX_UDP})",
    )
    g.add_argument(
        "--guest-new-flows",
        type=int,
        default=GUEST_NEW_FLOWS,
        metavar="PER_SECOND",
        help=f"new TCP connections per second of one guest, a new UDP flow counting as four, in "
        f"bursts of twice as many (default {GUEST_NEW_FLOWS})",
    )
    r = p.add_argument_group(
        "outbound policy (see docs/policy.rst): each new flow's route -- direct, forward, local or refuse"
    )
    r.add_argument(
        "--rule",
        dest="policy_rules",
        action="append",
        default=[],
        type=lambda text: ("rule", text),
        metavar="RULE",
        help="a policy rule 'ACTION [PROTO] DEST[:PORTS] [TARGET] [reply=rst|icmp|drop] [id=NAME]', e.g. "
        "'refuse tcp 10.0.0.0/8:22' or 'forward tcp *:80 tcp:127.0.0.1:3128'; repeatable, first match wins "
        "(command-line rules come after those added over QMP and before the --policy file's)",
    )
    r.add_argument(
        "--deny",
        dest="policy_rules",
        action="append",
        type=lambda text: ("deny", text),
        metavar="CIDR[:PORT[-PORT]]",
        help="refuse new flows to CIDR (any protocol): TCP gets RST, UDP and ping ICMP administratively "
        "prohibited (repeatable; in order with --rule and --allow)",
    )
    r.add_argument(
        "--allow",
        dest="policy_rules",
        action="append",
        type=lambda text: ("allow", text),
        metavar="CIDR[:PORT[-PORT]]",
        help="route new flows to CIDR directly, before later --deny rules (repeatable)",
    )
    r.add_argument(
        "--restrict",
        action="store_true",
        help="as QEMU's restrict=on: guests reach only gateway services (--guestfwd), DNS, forwards and what "
        "an --allow or direct rule lets through; everything else, the host included, is refused (default off)",
    )
    r.add_argument(
        "--allow-metadata",
        action="store_true",
        help="let guests reach the cloud metadata address 169.254.169.254 (default: refused)",
    )
    r.add_argument(
        "--policy",
        metavar="FILE",
        help="rules from FILE, one per line (# comments), re-read when it changes; a bad line is logged with "
        "its number and the rules read before are kept (default: none)",
    )
    r.add_argument(
        "--guestfwd",
        action="append",
        default=[],
        metavar="SPEC",
        help="a gateway service: guest connections to ADDR:PORT of the guest network (any free address, or the "
        "gateway's on a port) go to a host target: tcp:ADDR:PORT-tcp:HOST:PORT, -unix:PATH, -cmd:COMMAND (a "
        "process per connection, run without a shell, the connection as its stdin/stdout), or "
        "udp:ADDR:PORT-udp:HOST:PORT (repeatable; kept in --state)",
    )
    c = p.add_argument_group("port forwarding and control")
    c.add_argument(
        "--hostfwd",
        action="append",
        default=[],
        metavar="RULE",
        help="forward host to guest, QEMU syntax [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport "
        "(hostaddr default 127.0.0.1, guestaddr default the first leased guest; repeatable)",
    )
    c.add_argument(
        "--qmp",
        action="append",
        default=[],
        metavar="unix:PATH|tcp:HOST:PORT",
        help="QMP control socket (repeatable); unix sockets are created mode 0600",
    )
    c.add_argument(
        "--state",
        metavar="FILE",
        help="keep the forwards, gateway services and run-time policy rules in FILE across restarts",
    )
    add_security_options(p)
    add_proxy_options(p)
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="log level (default info)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v is debug)")
    return p


def config_from(args: argparse.Namespace) -> NetConfig:
    return NetConfig(
        net=args.net,
        host=args.host,
        dns=args.dns,
        dhcp_start=args.dhcp_start,
        mtu=args.mtu,
        lease_time=args.lease_time,
        domain=args.domain,
        search=args.dns_search,
        static_leases=dict(args.dhcp_static),
        host_loopback=not args.no_host_loopback,
        host_names=args.host_name,
        udp_idle_timeout=args.udp_timeout,
        max_udp_flows=args.max_udp_flows,
        max_tcp_flows=args.max_tcp_flows,
        guest_max_tcp=args.guest_max_tcp,
        guest_max_pending=args.guest_max_pending,
        guest_max_udp=args.guest_max_udp,
        guest_new_flows=args.guest_new_flows,
        ipv6=not args.no_ipv6,
        prefix6=args.ipv6_prefix,
        host6=args.ipv6_host,
        dns6=args.ipv6_dns,
        dhcpv6=args.dhcpv6,
    )


def ipv6_summary(config: NetConfig) -> str:
    """The IPv6 part of the "serving" line."""
    if not config.ipv6:
        return "ipv6=off"
    return (
        f"ipv6={config.network6} gateway6={ip_str(config.host_ip6)} dns6={ip_str(config.dns_ip6)} "
        f"dhcpv6={'stateful' if config.dhcpv6 else 'stateless'}"
    )


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    if args.log_level:
        level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="qemu-vpnnet %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def qemu_hints(args: argparse.Namespace) -> list[str]:
    hints: list[str] = []
    for path in args.socket:
        hints.append(f"-netdev stream,id=vpnnet0,server=off,addr.type=unix,addr.path={path} {DEVICE_HINT}")
    for host, port in args.listen_tcp:
        hints.append(f"-netdev socket,id=vpnnet0,connect={host}:{port} -device virtio-net-pci,netdev=vpnnet0")
    for path in args.dgram:
        hints.append(
            "-netdev dgram,id=vpnnet0,local.type=unix,local.path=/tmp/qemu-guest.dgram,"
            f"remote.type=unix,remote.path={path} -device virtio-net-pci,netdev=vpnnet0"
        )
    for path in args.vhost_user:
        hints.append(
            "-object memory-backend-memfd,id=mem0,size=RAM,share=on -numa node,memdev=mem0 "
            f"-chardev socket,id=vpnnet0,path={path},reconnect=1 -netdev vhost-user,id=vpnnet0,chardev=vpnnet0 "
            "-device virtio-net-pci,netdev=vpnnet0 (RAM: the same size as -m; under TCG add vectors=0 "
            "to the device: QEMU 7.2 without KVM crashes with MSI-X)"
        )
    for path in args.connect:
        hints.append(f"(QEMU listens) -netdev stream,id=vpnnet0,server=on,addr.type=unix,addr.path={path}")
    return hints


async def add_forwards(forwarder: Forwarder, rules: list[str]) -> None:
    """The --hostfwd rules and those kept in the state file; StartupError when one fails.

    A saved forward stands for a --hostfwd rule with the same protocol and host address and
    the same port, or, for a rule with port 0, the same guest side: restarting with the same
    options keeps the ephemeral port it had rather than adding one more forward.
    """
    try:
        specs = [parse_hostfwd(rule) for rule in rules]
        saved = forwarder.load_state()
        for i, spec in enumerate(specs):
            for old in saved:
                same_side = old.protocol == spec.protocol and old.host_addr == spec.host_addr
                if same_side and (
                    old.host_port == spec.host_port
                    or (spec.host_port == 0 and (old.guest_addr, old.guest_port) == (spec.guest_addr, spec.guest_port))
                ):
                    specs[i] = old
                    saved.remove(old)
                    break
        for spec in specs + saved:
            await forwarder.add(spec, persist=False)
    except (HostFwdSyntaxError, ForwardError) as exc:
        raise StartupError(f"--hostfwd: {exc}") from exc
    forwarder.save()


def policy_rules(args: argparse.Namespace) -> list[Rule]:
    """--rule, --allow and --deny in the order given; StartupError names a bad one."""
    rules: list[Rule] = []
    counts: dict[str, int] = {}
    for kind, text in args.policy_rules or []:
        counts[kind] = counts.get(kind, 0) + 1
        default_id = f"{kind}{counts[kind]}"
        option = f"--{kind}"
        try:
            rule = parse_rule(text, default_id) if kind == "rule" else shorthand_rule(kind, text, default_id)
        except PolicySyntaxError as exc:
            raise StartupError(f"{option} {text!r}: {exc}") from exc
        rules.append(rule)
    return rules


def start_policy(shell: Shell, forwarder: Forwarder, args: argparse.Namespace) -> Policy:
    """The outbound policy of the command line, the policy file and the state file."""
    policy = Policy(shell, args.policy)
    policy.set_options(args.restrict, args.allow_metadata)
    policy.set_cli_rules(policy_rules(args))
    policy.load_file(initial=True)
    specs: list[GuestFwdSpec] = []
    for text in args.guestfwd:
        try:
            specs.append(parse_guestfwd(text))
        except PolicySyntaxError as exc:
            raise StartupError(f"--guestfwd {text!r}: {exc}") from exc
    try:
        saved = forwarder.load_state_data()
    except ForwardError as exc:
        raise StartupError(str(exc)) from exc
    policy.restore(saved, specs)
    forwarder.extra_state = policy.state
    policy.save_state = forwarder.save
    policy.start_watching()
    return policy


def start_pcap(shell: Shell, args: argparse.Namespace) -> None:
    """--pcap FILE and its options; StartupError when they cannot be used."""
    import os

    from qemu_vpnnet.io.capture import CaptureError, CaptureOptions, parse_filter, start_capture

    try:
        options = CaptureOptions(
            os.path.abspath(args.pcap),
            args.pcap_snaplen,
            args.pcap_max_size,
            args.pcap_files,
            None,
            parse_filter(args.pcap_filter),
        )
        start_capture(shell, options)
    except (ValueError, CaptureError) as exc:
        raise StartupError(f"--pcap: {exc}") from exc


def lock_down(args: argparse.Namespace, shell: Shell, qmp: QmpServer, forwarder: Forwarder) -> None:
    """--user and --sandbox, once every listener is open (docs/security.rst); StartupError when the
    user cannot be taken."""
    import os

    sockets = [*shell.unix_paths, *(path for path, _inode in qmp.unix_paths)]
    files = [f for f in (args.state, args.pcap) if f]
    lockdown = Lockdown(
        user=args.user,
        sandbox=args.sandbox,
        writable=[os.path.dirname(os.path.abspath(p)) for p in [*files, *sockets]] + list(args.writable),
        created=[os.path.abspath(p) for p in [*sockets, *files]],
    )
    try:
        lockdown.apply()
    except (OSError, RuntimeError) as exc:
        raise StartupError(f"--user/--sandbox: {exc}") from exc
    for part in lockdown.applied:
        log.info("sandbox: %s", part)
    if args.user is not None:
        forwarder.privilege_note = (
            f"the backend dropped root and runs as {args.user.name}: ports below 1024 need --hostfwd at start"
        )
        checks = [("--state", args.state, "saving it"), ("--pcap", args.pcap, "rotation")]
        checks += [("socket", path, "removing it at exit") for path in sockets]
        for option, path, what in checks:
            directory = os.path.dirname(os.path.abspath(path)) if path else ""
            if directory and not os.access(directory, os.W_OK | os.X_OK):
                log.warning("%s %s: %s is not writable by %s: %s fails", option, path, directory, args.user.name, what)


async def serve(args: argparse.Namespace, config: NetConfig) -> int:
    stack = Stack(config)
    shell = Shell(stack, busy_poll=args.busy_poll / 1e6)
    install_host_side(shell, args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    forwarder = Forwarder(shell, args.state)
    try:
        policy = start_policy(shell, forwarder, args)
    except StartupError as exc:
        log.error("%s", exc)
        await shell.close()
        return 2
    qmp = QmpServer(shell, forwarder, stop, policy)
    try:
        start_proxy(shell, args)  # after the policy: a --guestfwd on the explicit proxy's port wins
        if args.pcap:
            start_pcap(shell, args)
        for spec in args.qmp:
            await qmp.listen(spec)
        for path in args.socket:
            await shell.listen_unix(path)
        for host, port in args.listen_tcp:
            await shell.listen_tcp(host, port)
        for path in args.dgram:
            await shell.open_dgram(path, None)
        for path in args.vhost_user:
            shell.listen_vhost_user(path, not args.no_offloads, args.vhost_user_unsealed_memory)
        for path in args.connect:
            shell.connect_unix(path)
        await add_forwards(forwarder, args.hostfwd)
        lock_down(args, shell, qmp, forwarder)
    except StartupError as exc:
        log.error("%s", exc)
        policy.close()
        await qmp.close()
        await forwarder.close()
        await shell.close()
        return 2
    # integrations/libvirt.py (the libvirt hook) waits for this "serving net=" line: keep it.
    log.info(
        "serving net=%s gateway=%s dns=%s dhcp-start=%s mtu=%d %s",
        config.network,
        config.host_ip_str(),
        config.dns_ip_str(),
        config.dhcp_start_str(),
        config.mtu,
        ipv6_summary(config),
    )
    for hint in qemu_hints(args):
        log.info("QEMU arguments: %s", hint)
    gc_watch.install()
    if not args.gc_defaults:  # start-up is over: what it made is never walked again
        log.debug("garbage collector: %d start-up objects frozen", freeze_startup())
    await stop.wait()
    gc_watch.uninstall()
    log.info("stopping")
    policy.close()
    await qmp.close()
    await forwarder.close()
    await shell.close()
    return 0


def run_backend(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    if not (args.socket or args.connect or args.listen_tcp or args.dgram or args.vhost_user):
        parser.error("give at least one of --socket, --connect, --listen-tcp, --dgram, --vhost-user")
    problem = check_ipv6_options(args)
    if problem is not None:
        parser.error(problem)
    try:
        config = config_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    import uvloop

    from qemu_vpnnet.io.malloc_tuning import tune_malloc

    tune_malloc()
    if not args.gc_defaults:
        tune_gc()
    return uvloop.run(serve(args, config))


# Subcommands: each module has main(argv) -> int. Imported only when used.
SUBCOMMANDS = {
    "ctl": "qemu_vpnnet.control.ctl",
    "attach": "qemu_vpnnet.integrations.attach",
    "detach": "qemu_vpnnet.integrations.attach",
    "run": "qemu_vpnnet.integrations.launcher",
    "libvirt": "qemu_vpnnet.integrations.libvirt",
}


def main(argv: Sequence[str] | None = None) -> int:
    """`qemu-vpnnet [backend options]` runs the backend; `qemu-vpnnet SUBCOMMAND ...` the rest."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[args[0]])
        entry: Callable[[list[str]], int] = module.main
        return entry(args)
    return run_backend(args)


if __name__ == "__main__":
    sys.exit(main())

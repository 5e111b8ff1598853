"""`qemu-vpnnet libvirt ...`: domain XML for libvirt, and a libvirt hook that runs one backend per domain.

    qemu-vpnnet libvirt xml [--domain NAME] [--tcp HOST:PORT | --socket [PATH] | --vhost-user [PATH]]
                            [--domain-type kvm|qemu] [--hostfwd RULE]...
    qemu-vpnnet libvirt hook install [--hooks-dir DIR] [--run-dir DIR] [--no-reload] [--force]
    qemu-vpnnet libvirt hook uninstall [--hooks-dir DIR] [--no-reload]
    qemu-vpnnet libvirt hook-run DOMAIN OPERATION SUBOPERATION EXTRA   (the hook itself; XML on stdin)

A domain opts in with a metadata element in our namespace::

    <metadata>
      <vpnnet:net xmlns:vpnnet="https://qemu-vpnnet.invalid/xmlns/1">
        <vpnnet:listen-tcp address="127.0.0.1" port="5558"/>    (or <vpnnet:socket path="..."/>,
                                                                  or <vpnnet:vhost-user path="..."/>)
        <vpnnet:hostfwd rule="tcp::2222-:22"/>                    (repeatable)
        <vpnnet:option name="mtu" value="65520"/>                  (repeatable; see ALLOWED_OPTIONS)
      </vpnnet:net>
    </metadata>

On `prepare begin` the hook starts `python -m qemu_vpnnet` for that domain, detached, with its QMP
socket, state file, pid file and log in RUN_DIR/DOMAIN/, and returns once the backend listens (a
failure exits non-zero, which aborts the domain start; the reason goes to stderr, which libvirt
shows). On `release end` it stops that backend (SIGTERM, then SIGKILL) and removes RUN_DIR/DOMAIN.
The hook never calls virsh (libvirt would deadlock).

vhost-user (<vpnnet:vhost-user/>, `--vhost-user PATH`): the domain's <interface type='vhostuser'> has
QEMU connect to the backend's socket, and the guest's RAM must be shared (<memoryBacking> with
<access mode='shared'/>); the hook refuses a domain without either. QEMU 7.2 under TCG (type='qemu')
segfaults in msix_set_vector_notifiers when a vhost-user NIC starts with MSI-X, and libvirt has no
attribute for virtio-net-pci's vectors=: the generated XML of a type='qemu' domain sets vectors=0 with
<qemu:override> on the interface's alias (libvirt then marks the domain tainted, "custom-device");
type='kvm' domains get none.
"""

import argparse
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from qemu_vpnnet.hostfwd import HostFwdSyntaxError, parse_hostfwd
from qemu_vpnnet.integrations.launcher import python_env
from qemu_vpnnet.integrations.procutil import (
    IntegrationError,
    pid_alive,
    pid_listens_tcp,
    pid_listens_unix,
    proc_cmdline,
    terminate_pid,
)

NS = "https://qemu-vpnnet.invalid/xmlns/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_RUN_DIR = "/run/qemu-vpnnet"
RUN_DIR_ENV = "VPNNET_LIBVIRT_RUN_DIR"
QEMU_USER_ENV = "VPNNET_LIBVIRT_QEMU_USER"
DEFAULT_QEMU_USER = "libvirt-qemu"
DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"
HOOK_NAME = "qemu-vpnnet"
HOOK_MARKER = "# qemu-vpnnet libvirt hook"
DEFAULT_TCP = ("127.0.0.1", 5558)
#: The user alias the generated vhost-user interface gets, which <qemu:override> names.
VHOST_ALIAS = "ua-vpnnet0"
TRANSPORT_ELEMENTS = "<vpnnet:listen-tcp>, <vpnnet:socket> or <vpnnet:vhost-user>"
START_TIMEOUT = 10.0
DAEMON_PID_FILES = ("/run/libvirtd.pid", "/run/virtqemud.pid", "/var/run/libvirtd.pid")

#: Backend options a domain's metadata may set (<vpnnet:option name="..." value="..."/>); False: a flag.
ALLOWED_OPTIONS: dict[str, bool] = {
    "net": True,
    "host": True,
    "dns": True,
    "dhcp-start": True,
    "dhcp-static": True,
    "lease-time": True,
    "domain": True,
    "dns-search": True,
    "mtu": True,
    "dns-upstream": True,
    "dns-mode": True,
    "dns-zone": True,
    "host-name": True,
    "no-host-loopback": False,
    "udp-timeout": True,
    "max-udp-flows": True,
    "max-tcp-flows": True,
    "log-level": True,
    "no-offloads": False,
}
_DOMAIN_RE = re.compile(r"^[^/\0\s][^/\0]*$")


class MetadataError(IntegrationError):
    """The domain's <vpnnet:net> element is invalid (the message says where)."""


@dataclass
class DomainNet:
    """What a domain's <vpnnet:net> metadata asks for."""

    listen_tcp: tuple[str, int] | None = None
    socket: str | None = None  # "" = the default path in the run dir
    hostfwd: list[str] = field(default_factory=list)
    options: list[tuple[str, str]] = field(default_factory=list)
    vhost_user: str | None = None  # "" = the default path in the run dir

    def socket_path(self, domain_dir: str) -> str | None:
        if self.socket is None:
            return None
        return self.socket or os.path.join(domain_dir, "net.sock")

    def vhost_user_path(self, domain_dir: str) -> str | None:
        if self.vhost_user is None:
            return None
        return self.vhost_user or os.path.join(domain_dir, "vhost-user.sock")

    def unix_paths(self, domain_dir: str) -> list[str]:
        """The Unix sockets the backend listens on, which QEMU (libvirt-qemu) must reach."""
        return [p for p in (self.socket_path(domain_dir), self.vhost_user_path(domain_dir)) if p is not None]


# ---- metadata --------------------------------------------------------------------------------


def _attr(element: ET.Element, name: str, where: str) -> str:
    value = element.get(name)
    if value is None or value == "":
        raise MetadataError(f"{where}: attribute {name}= is missing")
    return value


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise MetadataError(f"{where}: bad port {text!r}")
    return int(text)


def parse_domain_xml(xml_text: str) -> tuple[str, DomainNet | None]:
    """(domain name, our metadata or None when the domain has none)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise MetadataError(f"cannot parse the domain XML: {exc}") from None
    name = (root.findtext("name") or "").strip()
    net = root.find(f"metadata/{{{NS}}}net")
    if net is None:
        return name, None
    return name, parse_net_element(net)


def parse_net_element(net: ET.Element) -> DomainNet:
    config = DomainNet()
    for child in net:
        tag = child.tag
        if not tag.startswith(f"{{{NS}}}"):
            raise MetadataError(f"<vpnnet:net>: unexpected element {tag}")
        local = tag[len(NS) + 2 :]
        where = f"<vpnnet:{local}>"
        if local in ("listen-tcp", "socket", "vhost-user") and (
            config.listen_tcp is not None or config.socket is not None or config.vhost_user is not None
        ):
            raise MetadataError(f"{where}: only one {TRANSPORT_ELEMENTS} per domain")
        if local == "listen-tcp":
            address = child.get("address") or DEFAULT_TCP[0]
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise MetadataError(f"{where}: bad address {address!r}") from None
            config.listen_tcp = (address, _port(_attr(child, "port", where), where))
        elif local in ("socket", "vhost-user"):
            path = child.get("path") or ""
            if path and not os.path.isabs(path):
                raise MetadataError(f"{where}: path must be absolute, not {path!r}")
            if local == "socket":
                config.socket = path
            else:
                config.vhost_user = path
        elif local == "hostfwd":
            rule = _attr(child, "rule", where)
            try:
                parse_hostfwd(rule)
            except HostFwdSyntaxError as exc:
                raise MetadataError(f"{where}: {exc}") from None
            config.hostfwd.append(rule)
        elif local == "option":
            name = _attr(child, "name", where).removeprefix("--")
            if name not in ALLOWED_OPTIONS:
                raise MetadataError(f"{where}: option {name!r} is not allowed (allowed: {', '.join(ALLOWED_OPTIONS)})")
            value = child.get("value", "")
            if ALLOWED_OPTIONS[name] and not value:
                raise MetadataError(f"{where}: option {name!r} needs value=")
            config.options.append((name, value))
        else:
            raise MetadataError(f"<vpnnet:net>: unknown element <vpnnet:{local}>")
    if config.listen_tcp is None and config.socket is None and config.vhost_user is None:
        raise MetadataError(
            "<vpnnet:net>: needs <vpnnet:listen-tcp address=... port=.../>, <vpnnet:socket/> or <vpnnet:vhost-user/>"
        )
    return config


def check_vhost_user_domain(xml_text: str, path: str) -> None:
    """MetadataError unless the domain can use the backend's vhost-user socket at `path`: an
    <interface type='vhostuser'> whose QEMU connects to `path` (mode='client'), and guest RAM the
    backend can map (<memoryBacking><access mode='shared'/>, or every NUMA cell memAccess='shared').
    libvirt 9.0 starts a domain without shared memory, and its guest then has no network."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise MetadataError(f"cannot parse the domain XML: {exc}") from None
    wanted = f"<interface type='vhostuser'><source type='unix' path={quoteattr(path)} mode='client'/>"
    modes = [
        source.get("mode", "")
        for iface in root.findall("devices/interface[@type='vhostuser']")
        for source in iface.findall("source")
        if source.get("path") == path
    ]
    if not modes:
        raise MetadataError(f"<vpnnet:vhost-user>: the domain has no {wanted} in <devices>")
    if "client" not in modes:
        raise MetadataError(
            f"<vpnnet:vhost-user>: the interface on {path} has mode={quoteattr(modes[0])}: "
            f"the backend listens, so QEMU must connect ({wanted})"
        )
    cells = root.findall("cpu/numa/cell")
    shared = root.find("memoryBacking/access[@mode='shared']") is not None
    if cells:
        shared = all(cell.get("memAccess", "shared" if shared else "") == "shared" for cell in cells)
    if not shared:
        raise MetadataError(
            "<vpnnet:vhost-user>: vhost-user needs the guest's memory shared with the backend: add "
            "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking> to the domain"
        )


def backend_args(config: DomainNet, domain_dir: str) -> list[str]:
    """The backend's command-line options for a domain (without python -m qemu_vpnnet)."""
    args: list[str] = []
    if config.listen_tcp is not None:
        host, port = config.listen_tcp
        args += ["--listen-tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    socket_path = config.socket_path(domain_dir)
    if socket_path is not None:
        args += ["--socket", socket_path]
    vhost_path = config.vhost_user_path(domain_dir)
    if vhost_path is not None:
        args += ["--vhost-user", vhost_path]
    for rule in config.hostfwd:
        args += ["--hostfwd", rule]
    for name, value in config.options:
        args += [f"--{name}", value] if ALLOWED_OPTIONS[name] else [f"--{name}"]
    args += ["--qmp", f"unix:{os.path.join(domain_dir, 'qmp.sock')}"]
    args += ["--state", os.path.join(domain_dir, "state.json")]
    return args


# ---- XML for users -----------------------------------------------------------------------------


def metadata_xml(config: DomainNet, indent: str = "") -> str:
    lines = [f"{indent}<metadata>", f'{indent}  <vpnnet:net xmlns:vpnnet="{NS}">']
    if config.listen_tcp is not None:
        host, port = config.listen_tcp
        lines.append(f'{indent}    <vpnnet:listen-tcp address={quoteattr(host)} port="{port}"/>')
    if config.socket is not None:
        path = f" path={quoteattr(config.socket)}" if config.socket else ""
        lines.append(f"{indent}    <vpnnet:socket{path}/>")
    if config.vhost_user is not None:
        path = f" path={quoteattr(config.vhost_user)}" if config.vhost_user else ""
        lines.append(f"{indent}    <vpnnet:vhost-user{path}/>")
    for rule in config.hostfwd:
        lines.append(f"{indent}    <vpnnet:hostfwd rule={quoteattr(rule)}/>")
    for name, value in config.options:
        lines.append(f"{indent}    <vpnnet:option name={quoteattr(name)} value={quoteattr(value)}/>")
    lines += [f"{indent}  </vpnnet:net>", f"{indent}</metadata>"]
    return "\n".join(lines)


def interface_xml(host: str, port: int, mac: str | None = None, model: str = "virtio", indent: str = "") -> str:
    lines = [f"{indent}<interface type='client'>"]
    if mac:
        lines.append(f"{indent}  <mac address={quoteattr(mac)}/>")
    lines += [
        f'{indent}  <source address={quoteattr(host)} port="{port}"/>',
        f"{indent}  <model type={quoteattr(model)}/>",
        f"{indent}</interface>",
    ]
    return "\n".join(lines)


def commandline_xml(socket_path: str, mac: str | None = None, netdev_id: str = "vpnnet0", indent: str = "") -> str:
    netdev = f"stream,id={netdev_id},server=off,addr.type=unix,addr.path={socket_path.replace(',', ',,')}"
    device = f"virtio-net-pci,netdev={netdev_id}" + (f",mac={mac}" if mac else "")
    lines = [f"{indent}<qemu:commandline>"]
    for value in ("-netdev", netdev, "-device", device):
        lines.append(f"{indent}  <qemu:arg value={quoteattr(value)}/>")
    lines.append(f"{indent}</qemu:commandline>")
    return "\n".join(lines)


def vhost_user_interface_xml(path: str, mac: str | None = None, indent: str = "") -> str:
    """<interface type='vhostuser'>: QEMU connects to the backend's socket (and reconnects after 1 s
    when the backend restarts); the alias is what <qemu:override> names."""
    lines = [f"{indent}<interface type='vhostuser'>"]
    if mac:
        lines.append(f"{indent}  <mac address={quoteattr(mac)}/>")
    lines += [
        f"{indent}  <source type='unix' path={quoteattr(path)} mode='client'>",
        f"{indent}    <reconnect enabled='yes' timeout='1'/>",
        f"{indent}  </source>",
        f"{indent}  <model type='virtio'/>",
        f"{indent}  <alias name='{VHOST_ALIAS}'/>",
        f"{indent}</interface>",
    ]
    return "\n".join(lines)


def memory_backing_xml(indent: str = "") -> str:
    """The guest's RAM in a shared memfd, which vhost-user maps."""
    return "\n".join(
        [
            f"{indent}<memoryBacking>",
            f"{indent}  <source type='memfd'/>",
            f"{indent}  <access mode='shared'/>",
            f"{indent}</memoryBacking>",
        ]
    )


def vectors_override_xml(alias: str = VHOST_ALIAS, indent: str = "") -> str:
    """vectors=0 (legacy INTx) on the NIC's virtio-net-pci device: QEMU 7.2 under TCG segfaults in
    msix_set_vector_notifiers when a vhost-user NIC starts with MSI-X. libvirt >= 8.2; taints."""
    return "\n".join(
        [
            f"{indent}<qemu:override>",
            f"{indent}  <qemu:device alias={quoteattr(alias)}>",
            f"{indent}    <qemu:frontend>",
            f"{indent}      <qemu:property name='vectors' type='unsigned' value='0'/>",
            f"{indent}    </qemu:frontend>",
            f"{indent}  </qemu:device>",
            f"{indent}</qemu:override>",
        ]
    )


def vhost_user_snippet(config: DomainNet, path: str, mac: str | None, domain_type: str) -> str:
    lines = [
        "<!-- qemu-vpnnet over vhost-user (QEMU's virtio-net rings served from the backend, in shared guest RAM).",
        "     Put <metadata> and <memoryBacking> in <domain> (merge with existing ones) and <interface> in <devices>.",
    ]
    if domain_type == "qemu":
        lines += [
            "     TCG (type='qemu'): <qemu:override> (in <domain>, after <devices>) sets vectors=0, since QEMU 7.2",
            "     without KVM crashes when a vhost-user NIC starts with MSI-X; libvirt marks the domain 'tainted'.",
            f"     The root element needs the qemu namespace: <domain type='qemu' xmlns:qemu='{QEMU_NS}'> -->",
        ]
    else:
        lines[-1] += " -->"
    lines += [metadata_xml(config), memory_backing_xml(), vhost_user_interface_xml(path, mac)]
    if domain_type == "qemu":
        lines.append(vectors_override_xml())
    return "\n".join(lines)


def tcp_snippet(config: DomainNet, mac: str | None) -> str:
    assert config.listen_tcp is not None
    host, port = config.listen_tcp
    return "\n".join(
        [
            "<!-- qemu-vpnnet over TCP (pure domain XML: QEMU's -netdev socket,connect=HOST:PORT).",
            "     Put <metadata> in <domain> (merge with an existing <metadata>) and <interface> in <devices>.",
            "     With the hook installed (qemu-vpnnet libvirt hook install), libvirt starts the backend. -->",
            metadata_xml(config),
            interface_xml(host, port, mac),
        ]
    )


def socket_snippet(config: DomainNet, socket_path: str, mac: str | None) -> str:
    return "\n".join(
        [
            "<!-- qemu-vpnnet over a Unix socket (-netdev stream; libvirt marks the domain 'tainted').",
            f"     The root element needs the qemu namespace: <domain type='kvm' xmlns:qemu='{QEMU_NS}'>",
            "     Put <metadata> and <qemu:commandline> in <domain>, after <devices>. -->",
            metadata_xml(config),
            commandline_xml(socket_path, mac),
        ]
    )


def host_port_arg(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or DEFAULT_TCP[0], int(port)


def cmd_xml(args: argparse.Namespace) -> int:
    for rule in args.hostfwd:
        try:
            parse_hostfwd(rule)
        except HostFwdSyntaxError as exc:
            raise IntegrationError(f"--hostfwd {rule}: {exc}") from None
    options: list[tuple[str, str]] = []
    for text in args.option:
        name, _, value = text.partition("=")
        name = name.removeprefix("--")
        if name not in ALLOWED_OPTIONS:
            raise IntegrationError(f"--option {name}: not allowed (allowed: {', '.join(ALLOWED_OPTIONS)})")
        options.append((name, value))
    domain = args.domain or "DOMAIN"
    check_domain_name(domain)
    snippets: list[str] = []
    if args.vhost_user is not None:
        vu = DomainNet(vhost_user=args.vhost_user, hostfwd=args.hostfwd, options=options)
        path = vu.vhost_user_path(os.path.join(args.run_dir, domain))
        assert path is not None
        print(vhost_user_snippet(vu, path, args.mac, args.domain_type))
        return 0
    if args.socket is None or args.tcp is not None:
        tcp = DomainNet(listen_tcp=args.tcp or DEFAULT_TCP, hostfwd=args.hostfwd, options=options)
        snippets.append(tcp_snippet(tcp, args.mac))
    if args.socket is not None or args.tcp is None:
        sock = DomainNet(socket=args.socket or "", hostfwd=args.hostfwd, options=options)
        path = sock.socket_path(os.path.join(args.run_dir, domain))
        assert path is not None
        snippets.append(socket_snippet(sock, path, args.mac))
    print("\n\n".join(snippets))
    return 0


# ---- the hook: starting and stopping a domain's backend ------------------------------------------


def check_domain_name(name: str) -> str:
    if not name or not _DOMAIN_RE.match(name) or name in (".", ".."):
        raise IntegrationError(f"unusable domain name {name!r}")
    return name


def qemu_owner() -> tuple[int, int] | None:
    """uid/gid of the user libvirt runs QEMU as (VPNNET_LIBVIRT_QEMU_USER, default libvirt-qemu)."""
    name = os.environ.get(QEMU_USER_ENV, DEFAULT_QEMU_USER)
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def is_our_backend(pid: int, domain_dir: str) -> bool:
    cmdline = proc_cmdline(pid)
    return "qemu_vpnnet" in cmdline and any(domain_dir in arg for arg in cmdline)


def stop_backend(domain: str, run_dir: str) -> str:
    """Stop the domain's backend (if any) and remove its run dir; returns what happened."""
    domain_dir = os.path.join(run_dir, check_domain_name(domain))
    if not os.path.isdir(domain_dir):
        return f"{domain}: no backend"
    pid = read_pid(os.path.join(domain_dir, "backend.pid"))
    what = f"{domain}: no backend running"
    if pid is not None and pid_alive(pid) and is_our_backend(pid, domain_dir):
        gone = terminate_pid(pid)
        what = f"{domain}: backend {pid} stopped" if gone else f"{domain}: backend {pid} did not stop"
    shutil.rmtree(domain_dir, ignore_errors=True)
    return what


def tail_file(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def start_backend(domain: str, config: DomainNet, run_dir: str, timeout: float = START_TIMEOUT) -> int:
    """Start the domain's backend, detached; return its pid once it listens. IntegrationError otherwise."""
    check_domain_name(domain)
    stale = stop_backend(domain, run_dir)
    del stale
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    os.chmod(run_dir, 0o755)  # QEMU (another user) must reach the sockets inside
    domain_dir = os.path.join(run_dir, domain)
    os.mkdir(domain_dir, 0o755)
    os.chmod(domain_dir, 0o755)
    log_path = os.path.join(domain_dir, "backend.log")
    cmd = [sys.executable, "-m", "qemu_vpnnet", *backend_args(config, domain_dir)]
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=python_env(),
            start_new_session=True,  # detached: libvirt waits for the hook's own pipes only
            close_fds=True,
        )
    with open(os.path.join(domain_dir, "backend.pid"), "w", encoding="ascii") as f:
        f.write(f"{proc.pid}\n")
    unix_paths = config.unix_paths(domain_dir)
    deadline = time.monotonic() + timeout
    listening = False
    while True:
        status = proc.poll()
        if status is not None:
            log_text = tail_file(log_path)
            shutil.rmtree(domain_dir, ignore_errors=True)
            raise IntegrationError(f"backend for {domain} exited with status {status}:\n{log_text}")
        if not listening:
            listening = (config.listen_tcp is None or pid_listens_tcp(proc.pid, config.listen_tcp[1])) and all(
                pid_listens_unix(proc.pid, path) for path in unix_paths
            )
        # The backend logs "serving ..." once every transport and forward is set up.
        if listening and "serving net=" in tail_file(log_path, 200):
            break
        if time.monotonic() > deadline:
            if listening:
                break  # listening, but its log is quiet (e.g. --log-level warning): good enough
            log_text = tail_file(log_path)
            terminate_pid(proc.pid)
            shutil.rmtree(domain_dir, ignore_errors=True)
            raise IntegrationError(f"backend for {domain} did not listen within {timeout:g} s:\n{log_text}")
        time.sleep(0.02)
    owner = qemu_owner()
    for path in unix_paths:
        if owner is not None:
            os.chown(path, *owner)
            os.chmod(path, 0o660)
    return proc.pid


def hook_run(argv: Sequence[str], xml_text: str, run_dir: str) -> int:
    """The hook proper: argv is DOMAIN OPERATION SUBOPERATION [EXTRA], xml_text libvirt's stdin."""
    if len(argv) < 3:
        print("qemu-vpnnet libvirt hook-run: expected DOMAIN OPERATION SUBOPERATION", file=sys.stderr)
        return 2
    domain, operation, sub = argv[0], argv[1], argv[2]
    try:
        if (operation, sub) == ("prepare", "begin"):
            _, config = parse_domain_xml(xml_text)
            if config is None:
                return 0
            vhost_path = config.vhost_user_path(os.path.join(run_dir, check_domain_name(domain)))
            if vhost_path is not None:
                check_vhost_user_domain(xml_text, vhost_path)
            pid = start_backend(domain, config, run_dir)
            print(f"qemu-vpnnet: backend {pid} started for {domain}", file=sys.stderr)
        elif (operation, sub) == ("release", "end"):
            print(f"qemu-vpnnet: {stop_backend(domain, run_dir)}", file=sys.stderr)
    except IntegrationError as exc:
        print(f"qemu-vpnnet: {exc}", file=sys.stderr)
        return 1
    return 0


# ---- installing the hook -------------------------------------------------------------------------


def hook_path(hooks_dir: str) -> str:
    """libvirt >= 6.5 runs every executable in hooks/qemu.d/ (as it does hooks/qemu): no clash with a
    hook the user already has."""
    return os.path.join(hooks_dir, "qemu.d", HOOK_NAME)


def hook_script(python: str, run_dir: str, env: dict[str, str]) -> str:
    """The shell script libvirt runs: it passes only the two operations we handle to Python."""
    exports = [f"{RUN_DIR_ENV}={shlex.quote(run_dir)}"]
    if env.get("PYTHONPATH"):
        exports.append(f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])}")
    if os.environ.get(QEMU_USER_ENV) is not None:
        exports.append(f"{QEMU_USER_ENV}={shlex.quote(os.environ[QEMU_USER_ENV])}")
    return "\n".join(
        [
            "#!/bin/sh",
            HOOK_MARKER,
            "# Installed by `qemu-vpnnet libvirt hook install`; removed by `qemu-vpnnet libvirt hook uninstall`.",
            "# Starts a qemu-vpnnet backend for domains whose XML has <vpnnet:net> metadata.",
            'case "$2 $3" in',
            '    "prepare begin"|"release end")',
            f"        export {' '.join(exports)}",
            f'        exec {shlex.quote(python)} -m qemu_vpnnet libvirt hook-run "$@"',
            "        ;;",
            "esac",
            "cat >/dev/null",
            "exit 0",
            "",
        ]
    )


def reload_libvirt() -> str:
    """SIGHUP to the running libvirtd/virtqemud, which reads the hook directory on (re)load only."""
    for pid_file in DAEMON_PID_FILES:
        pid = read_pid(pid_file)
        if pid is None or not pid_alive(pid):
            continue
        name = os.path.basename(proc_cmdline(pid)[0]) if proc_cmdline(pid) else ""
        if name not in ("libvirtd", "virtqemud"):
            continue
        os.kill(pid, signal.SIGHUP)
        return f"reloaded {name} ({pid})"
    return "libvirtd is not running: it reads the hook when it starts"


def install_hook(hooks_dir: str, run_dir: str, force: bool = False, reload: bool = True) -> list[str]:
    path = hook_path(hooks_dir)
    if os.path.exists(path) and not force:
        with open(path, encoding="utf-8", errors="replace") as f:
            if HOOK_MARKER not in f.read():
                raise IntegrationError(f"{path} exists and is not ours (use --force to replace it)")
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(hook_script(sys.executable, os.path.abspath(run_dir), python_env()))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    done = [f"installed {path}"]
    if reload:
        done.append(reload_libvirt())
    return done


def uninstall_hook(hooks_dir: str, reload: bool = True) -> list[str]:
    path = hook_path(hooks_dir)
    done: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if HOOK_MARKER not in f.read():
                raise IntegrationError(f"{path} is not ours: not removed")
        os.unlink(path)
        done.append(f"removed {path}")
    except FileNotFoundError:
        done.append(f"{path} was not installed")
    try:
        os.rmdir(os.path.dirname(path))  # only when empty
    except OSError:
        pass
    if reload:
        done.append(reload_libvirt())
    return done


# ---- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qemu-vpnnet libvirt", description="libvirt integration")
    sub = p.add_subparsers(dest="command", required=True)
    x = sub.add_parser("xml", help="print the domain XML that uses qemu-vpnnet")
    x.add_argument("--domain", help="domain name (for the default socket path)")
    g = x.add_mutually_exclusive_group()
    g.add_argument("--tcp", type=host_port_arg, metavar="HOST:PORT", help="<interface type='client'> to HOST:PORT")
    g.add_argument("--socket", nargs="?", const="", metavar="PATH", help="<qemu:commandline> -netdev stream on PATH")
    g.add_argument(
        "--vhost-user",
        nargs="?",
        const="",
        metavar="PATH",
        help="<interface type='vhostuser'> on PATH (default RUN_DIR/DOMAIN/vhost-user.sock), with shared memory",
    )
    x.add_argument(
        "--domain-type",
        choices=("kvm", "qemu"),
        default="kvm",
        help="the domain's type= (vhost-user: 'qemu', TCG, adds the vectors=0 override; default kvm)",
    )
    x.add_argument("--hostfwd", action="append", default=[], metavar="RULE", help="port forward (QEMU syntax)")
    x.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="backend option")
    x.add_argument("--mac", help="the NIC's MAC address")
    x.add_argument("--run-dir", default=os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR), help=argparse.SUPPRESS)
    h = sub.add_parser("hook", help="install or uninstall the libvirt hook")
    h.add_argument("action", choices=("install", "uninstall"))
    h.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR, help=f"default {DEFAULT_HOOKS_DIR}")
    h.add_argument(
        "--run-dir",
        default=os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR),
        help=f"where backends keep sockets, pid, log, state (default ${RUN_DIR_ENV} or {DEFAULT_RUN_DIR})",
    )
    h.add_argument("--no-reload", action="store_true", help="do not send SIGHUP to libvirtd")
    h.add_argument("--force", action="store_true", help="replace a file of that name that is not ours")
    r = sub.add_parser("hook-run", help="the hook itself (run by libvirt; domain XML on stdin)")
    r.add_argument("hook_args", nargs="*")
    r.add_argument("--run-dir", default=os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR))
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:])
    try:
        if args.command == "xml":
            return cmd_xml(args)
        if args.command == "hook":
            if args.action == "install":
                done = install_hook(args.hooks_dir, args.run_dir, args.force, not args.no_reload)
            else:
                done = uninstall_hook(args.hooks_dir, not args.no_reload)
            for line in done:
                print(line)
            return 0
        xml_text = sys.stdin.read()
        return hook_run(args.hook_args, xml_text, args.run_dir)
    except IntegrationError as exc:
        print(f"qemu-vpnnet libvirt: {exc}", file=sys.stderr)
        return 1

"""`qemu-vpnnet run [backend options] -- qemu-system-x86_64 ...`: QEMU with qemu-vpnnet instead of -netdev user.

The launcher starts the backend (`python -m qemu_vpnnet --socket DIR/net.sock [backend options]`),
waits until its socket listens, then runs QEMU with its arguments rewritten by
:func:`rewrite_qemu_args`:

- `-nic user,...` becomes `-netdev stream,id=ID,...` plus `-device MODEL,netdev=ID[,mac=MAC]` (the
  same id, model and MAC; without model=, the machine's default NIC model);
- `-netdev user,id=X,...` becomes `-netdev stream,id=X,...` (the user's own `-device ...,netdev=X`
  stays as it is);
- with neither, `-netdev stream,id=vpnnet0,... -device virtio-net-pci,netdev=vpnnet0` is added.

The user netdev's options become backend options: hostfwd= to --hostfwd, net= to --net, host= to
--host, dns= to --dns, dhcpstart= to --dhcp-start, domainname= to --domain, dnssearch= to
--dns-search. SIGTERM, SIGINT and SIGHUP are passed on to QEMU; when QEMU exits the backend is
stopped and the launcher exits with QEMU's status (128+N when QEMU died of signal N).

`--transport vhost-user` serves the NIC over vhost-user instead (`--vhost-user DIR/vhost-user.sock`):
the netdev becomes `-chardev socket,id=ID-vu,path=SOCK,reconnect=1 -netdev vhost-user,id=ID,chardev=ID-vu`,
the NIC must be a virtio-net one (the default model then), the guest's RAM goes into a shared memfd
of -m's size (`-object memory-backend-memfd,...,share=on -numa node,memdev=...`; a command line with
its own -numa or memory-backend= keeps its memory, which must then be shared), and under TCG the
virtio-net-pci NIC gets `vectors=0`: QEMU 7.2 without KVM segfaults in msix_set_vector_notifiers when
a vhost-user NIC starts with MSI-X.
"""

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from qemu_vpnnet.hostfwd import HostFwdSyntaxError, parse_hostfwd
from qemu_vpnnet.integrations.procutil import (
    IntegrationError,
    set_pdeathsig,
    terminate_pid,
    unix_listening_in_proc,
)

DEFAULT_ID = "vpnnet0"
DEFAULT_MODEL = "virtio-net-pci"
TRANSPORTS = ("stream", "vhost-user")
#: The memory backend the launcher adds for vhost-user, and the -m it assumes when there is none
#: (x86's default RAM size; the launcher then passes it explicitly, so both always agree).
MEMORY_ID = "vpnnet-mem"
DEFAULT_MEMORY = "128M"
#: QEMU's size suffixes (qemu_strtosz; -m takes MiB without one).
_SIZE_SUFFIXES = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}

#: QEMU options that take no argument (qemu-options.def, HAS_ARG 0). Every other option takes one.
FLAG_OPTIONS = frozenset(
    """
    S s snapshot nographic no-reboot no-shutdown daemonize nodefaults no-user-config enable-kvm
    no-hpet no-acpi no-fd-bootchk full-screen win2k-hack rtc-td-hack no-kvm-pit-reinjection
    old-param only-migratable preconfig version help h portrait alt-grab ctrl-grab usb curses
    enable-fips semihosting xen-attach xen-domid-restrict sdl no-frame no-quit singlestep
    enable-sync-profile perfmap no-graphic
    """.split()
)

#: -nic model= names that are not device names (hw/pci/pci.c).
NIC_MODEL_ALIASES = {"virtio": "virtio-net-pci"}

#: -netdev user options and the backend option each becomes.
USER_OPTION_MAP = {
    "net": "--net",
    "host": "--host",
    "dns": "--dns",
    "dhcpstart": "--dhcp-start",
    "domainname": "--domain",
    "dnssearch": "--dns-search",
}
USER_OPTIONS_IGNORED = frozenset(
    """
    hostname ipv6 ipv6-net ipv6-host ipv6-dns ipv6-prefix ipv6-prefixlen tftp bootfile
    tftp-server-name smb smbserver
    """.split()
)
USER_OPTIONS_REFUSED = {
    "guestfwd": "guestfwd= is not supported by qemu-vpnnet",
    "restrict": "restrict=on is not supported by qemu-vpnnet (the guest would reach the host's networks)",
    "ipv4": "ipv4=off is not supported by qemu-vpnnet",
}


class RewriteError(IntegrationError):
    """QEMU arguments the launcher cannot translate (the message says which and why)."""


@dataclass
class Rewrite:
    """The outcome of :func:`rewrite_qemu_args`."""

    qemu_args: list[str]
    backend_args: list[str] = field(default_factory=list)
    netdev_id: str = DEFAULT_ID
    replaced: str = ""  # "-nic user" or "-netdev user"; "" when our NIC was added
    warnings: list[str] = field(default_factory=list)


def split_opts(text: str) -> list[str]:
    """QEMU's comma-separated option string into its parts (",," is a literal comma)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def join_opts(parts: Sequence[str]) -> str:
    return ",".join(part.replace(",", ",,") for part in parts)


def parse_kv(parts: Sequence[str]) -> list[tuple[str, str]]:
    """["user", "id=n0", "hostfwd=..."] (type first, optional) into (key, value) pairs; the type is "type"."""
    pairs: list[tuple[str, str]] = []
    for i, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if i == 0:
                pairs.append(("type", key))
                continue
            # QEMU's boolean shorthand: "restrict" means restrict=on, "norestrict" restrict=off.
            if key.startswith("no") and len(key) > 2:
                pairs.append((key[2:], "off"))
            else:
                pairs.append((key, "on"))
            continue
        pairs.append((key, value))
    return pairs


def is_on(value: str) -> bool:
    return value.lower() in ("on", "yes", "y", "true", "1")


def normalize_net(value: str) -> str:
    """net= as QEMU takes it (addr[/prefix | /mask], prefix 24 when absent) to CIDR."""
    addr, sep, mask = value.partition("/")
    try:
        network = ipaddress.IPv4Network(f"{addr}/{mask if sep else 24}", strict=False)
    except ValueError as exc:
        raise RewriteError(f"net={value}: {exc}") from None
    return str(network)


def default_nic_model(qemu_args: Sequence[str]) -> str:
    """The NIC model QEMU picks for -nic without model= (x86: e1000 on pc, e1000e on q35)."""
    binary = os.path.basename(qemu_args[0]) if qemu_args else ""
    machine = ""
    i = 1
    while i < len(qemu_args) - 1:
        opt = qemu_args[i].lstrip("-")
        if qemu_args[i].startswith("-") and opt in ("M", "machine"):
            pairs = parse_kv(split_opts(qemu_args[i + 1]))
            machine = next((v for k, v in pairs if k == "type"), machine)
        i += 1
    if binary.endswith(("x86_64", "i386")):
        if "q35" in machine:
            return "e1000e"
        if "microvm" in machine:
            return "virtio-net-device"
        return "e1000"
    return DEFAULT_MODEL


def stream_netdev(netdev_id: str, socket_path: str) -> str:
    return join_opts(["stream", f"id={netdev_id}", "server=off", "addr.type=unix", f"addr.path={socket_path}"])


def vhost_user_chardev_id(netdev_id: str) -> str:
    return f"{netdev_id}-vu"


def vhost_user_chardev(netdev_id: str, socket_path: str) -> str:
    """The client chardev of a vhost-user netdev; reconnect=1 brings QEMU back to a restarted backend."""
    return join_opts(["socket", f"id={vhost_user_chardev_id(netdev_id)}", f"path={socket_path}", "reconnect=1"])


def vhost_user_netdev(netdev_id: str) -> str:
    return join_opts(["vhost-user", f"id={netdev_id}", f"chardev={vhost_user_chardev_id(netdev_id)}"])


def option_values(qemu_args: Sequence[str], names: Sequence[str]) -> list[tuple[str, str]]:
    """(option name, value) of every option in `names` (without dashes), in command-line order."""
    found: list[tuple[str, str]] = []
    i = 1
    while i < len(qemu_args):
        arg = qemu_args[i]
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not arg.startswith("-") or len(arg) < 2 or name in FLAG_OPTIONS or i + 1 >= len(qemu_args):
            if arg.startswith("-") and name in names:
                found.append((name, ""))
            i += 1
            continue
        if name in names:
            found.append((name, qemu_args[i + 1]))
        i += 2
    return found


def accelerators(qemu_args: Sequence[str]) -> list[str]:
    """The accelerators QEMU tries, in order: -accel, -machine accel=A:B, -enable-kvm; else its default
    (tcg first, or kvm first for a binary whose name ends with "kvm": vl.c's configure_accelerators)."""
    accels: list[str] = []
    for name, value in option_values(qemu_args, ("accel", "machine", "M", "enable-kvm")):
        if name == "enable-kvm":
            accels.append("kvm")
            continue
        pairs = parse_kv(split_opts(value))
        if name == "accel":
            accels += [v for k, v in pairs if k in ("type", "accel")][:1]
        else:
            for key, val in pairs:
                if key == "accel":
                    accels += [a for a in val.split(":") if a]
    if accels:
        return accels
    binary = os.path.basename(qemu_args[0]) if qemu_args else ""
    return ["kvm", "tcg"] if binary.endswith("kvm") else ["tcg", "kvm"]


def kvm_usable() -> bool:
    """Whether QEMU could open KVM here (what decides a kvm:tcg fallback)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def runs_under_tcg(qemu_args: Sequence[str], kvm: bool | None = None) -> bool:
    """Whether QEMU will run the guest with TCG: the first accelerator, or the next one when the
    first is KVM and `kvm` (default: :func:`kvm_usable`) says it cannot open."""
    accels = accelerators(qemu_args)
    if accels[0] == "kvm" and len(accels) > 1 and not (kvm_usable() if kvm is None else kvm):
        return accels[1] == "tcg"
    return accels[0] == "tcg"


def parse_size(text: str, where: str) -> int:
    """A QEMU size in bytes: -m's unit is MiB without a suffix (also "1.5G", "512M", "2g")."""
    value = text.strip().lower()
    number = value.rstrip("bkmgtp")
    suffix = value[len(number) :]
    if suffix not in _SIZE_SUFFIXES:
        raise RewriteError(f"{where}: bad size {text!r}")
    try:
        size = float(number) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        raise RewriteError(f"{where}: bad size {text!r}") from None
    if size <= 0 or size != int(size):
        raise RewriteError(f"{where}: bad size {text!r}")
    return int(size)


def format_size(size: int) -> str:
    return f"{size >> 20}M" if size % (1 << 20) == 0 else str(size)


def memory_size(qemu_args: Sequence[str]) -> int | None:
    """The guest's RAM in bytes from the last -m (size= or its first part), or None without -m."""
    values = [v for _, v in option_values(qemu_args, ("m",))]
    if not values:
        return None
    pairs = parse_kv(split_opts(values[-1]))
    size = next((v for k, v in pairs if k in ("type", "size")), "")
    if not size:
        return None
    return parse_size(size, f"-m {values[-1]}")


def memory_backends(qemu_args: Sequence[str]) -> dict[str, tuple[str, dict[str, str]]]:
    """The -object memory-backend-* of the command line: id -> (qom type, options)."""
    backends: dict[str, tuple[str, dict[str, str]]] = {}
    for _, value in option_values(qemu_args, ("object",)):
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except json.JSONDecodeError:
                continue
            if not isinstance(spec, dict):
                continue
            options = dict(json_netdev_pairs(spec))
            qom_type = options.pop("qom-type", "")
        else:
            options = dict(parse_kv(split_opts(value)))
            qom_type = options.pop("type", "") or options.pop("qom-type", "")
        if qom_type.startswith("memory-backend-") and options.get("id"):
            backends[options["id"]] = (qom_type, options)
    return backends


def shared_memory_args(qemu_args: Sequence[str]) -> list[str]:
    """What QEMU needs for vhost-user: the guest's RAM in a file the back-end can map.

    A memfd of -m's size as the single NUMA node (-m 128M is added without -m). A command line that
    places its RAM itself (-numa, -machine memory-backend=) keeps it; its backends must then be
    memfd (shared by default) or share=on files, else RewriteError."""
    numa = [v for _, v in option_values(qemu_args, ("numa",))]
    machine_backends = [
        v
        for _, value in option_values(qemu_args, ("machine", "M"))
        for k, v in parse_kv(split_opts(value))
        if k == "memory-backend"
    ]
    if not numa and not machine_backends:
        size = memory_size(qemu_args)
        extra = [] if size is not None else ["-m", DEFAULT_MEMORY]
        size = size if size is not None else parse_size(DEFAULT_MEMORY, "-m")
        backend = join_opts(["memory-backend-memfd", f"id={MEMORY_ID}", f"size={format_size(size)}", "share=on"])
        return [*extra, "-object", backend, "-numa", f"node,memdev={MEMORY_ID}"]
    used = list(machine_backends)
    for value in numa:
        pairs = parse_kv(split_opts(value))
        if (pairs[0][1] if pairs and pairs[0][0] == "type" else "node") != "node":
            continue
        memdev = next((v for k, v in pairs if k == "memdev"), "")
        if not memdev:
            raise RewriteError(
                f"-numa {value}: vhost-user needs the guest's RAM shared with the backend: give every "
                "-numa node a memdev= of a memory-backend-memfd (or drop -numa and let qemu-vpnnet add one)"
            )
        used.append(memdev)
    backends = memory_backends(qemu_args)
    for memdev in used:
        qom_type, options = backends.get(memdev, ("", {}))
        share = options.get("share", "on" if qom_type == "memory-backend-memfd" else "off")
        if qom_type not in ("memory-backend-memfd", "memory-backend-file") or not is_on(share):
            raise RewriteError(
                f"memory backend {memdev!r}: vhost-user needs the guest's RAM shared with the backend: "
                "use memory-backend-memfd (or memory-backend-file with share=on)"
            )
    return []


def translate_user_options(pairs: Sequence[tuple[str, str]], where: str, rewrite: Rewrite) -> None:
    """The options of a user netdev into backend options (appended to rewrite.backend_args)."""
    for key, value in pairs:
        if key in ("type", "id"):
            continue
        if key == "hostfwd":
            try:
                parse_hostfwd(value)
            except HostFwdSyntaxError as exc:
                raise RewriteError(f"{where}: hostfwd={value}: {exc}") from None
            rewrite.backend_args += ["--hostfwd", value]
        elif key == "net":
            rewrite.backend_args += ["--net", normalize_net(value)]
        elif key in USER_OPTION_MAP:
            rewrite.backend_args += [USER_OPTION_MAP[key], value]
        elif key == "restrict":
            if is_on(value):
                raise RewriteError(f"{where}: {USER_OPTIONS_REFUSED[key]}")
        elif key == "ipv4":
            if not is_on(value):
                raise RewriteError(f"{where}: {USER_OPTIONS_REFUSED[key]}")
        elif key in USER_OPTIONS_REFUSED:
            raise RewriteError(f"{where}: {USER_OPTIONS_REFUSED[key]}")
        elif key in USER_OPTIONS_IGNORED:
            rewrite.warnings.append(f"{where}: {key}= is not supported by qemu-vpnnet; ignored")
        else:
            raise RewriteError(f"{where}: unknown option {key}=")


def json_netdev_pairs(spec: dict[str, object]) -> list[tuple[str, str]]:
    """A JSON -netdev ({"type": "user", "hostfwd": [{"str": ...}], ...}) as (key, value) pairs."""
    pairs: list[tuple[str, str]] = []
    for key, value in spec.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                item = item.get("str", "")
            if isinstance(item, bool):
                item = "on" if item else "off"
            pairs.append((key, str(item)))
    return pairs


def rewrite_qemu_args(
    qemu_args: Sequence[str], socket_path: str, transport: str = "stream", kvm: bool | None = None
) -> Rewrite:
    """QEMU's command line (binary first) with our netdev instead of (or besides) user networking.

    `transport` is "stream" (a -netdev stream client of `socket_path`) or "vhost-user" (a vhost-user
    netdev whose chardev connects to `socket_path`, with shared RAM; `kvm` as for :func:`runs_under_tcg`)."""
    if not qemu_args:
        raise RewriteError("no QEMU command given")
    if transport not in TRANSPORTS:
        raise RewriteError(f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})")
    vhost = transport == "vhost-user"
    tcg = vhost and runs_under_tcg(qemu_args, kvm)
    out = [qemu_args[0]]
    rewrite = Rewrite(qemu_args=out)
    user_netdevs = 0
    i = 1
    while i < len(qemu_args):
        arg = qemu_args[i]
        if not arg.startswith("-") or len(arg) < 2:
            out.append(arg)
            i += 1
            continue
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if name in FLAG_OPTIONS or i + 1 >= len(qemu_args):
            out.append(arg)
            i += 1
            continue
        value = qemu_args[i + 1]
        i += 2
        if name == "net":
            kind = split_opts(value)[0]
            if kind in ("user", "nic", "type=user", "type=nic"):
                raise RewriteError(
                    f"-net {value}: the legacy -net option is not supported; use -nic user,... "
                    "or -netdev user,id=X,... with -device ...,netdev=X"
                )
            out += [arg, value]
        elif name == "netdev" and value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RewriteError(f"-netdev {value}: bad JSON: {exc}") from None
            if not isinstance(spec, dict) or spec.get("type") != "user":
                out += [arg, value]
                continue
            user_netdevs += 1
            netdev_id = str(spec.get("id", ""))
            if not netdev_id:
                raise RewriteError(f"-netdev {value}: id is missing")
            translate_user_options(json_netdev_pairs(spec), f"-netdev {netdev_id}", rewrite)
            if vhost:
                ours = {"type": "vhost-user", "id": netdev_id, "chardev": vhost_user_chardev_id(netdev_id)}
                out += ["-chardev", vhost_user_chardev(netdev_id, socket_path), arg, json.dumps(ours)]
            else:
                stream = {
                    "type": "stream", "id": netdev_id, "server": False, "addr": {"type": "unix", "path": socket_path},
                }  # fmt: skip
                out += [arg, json.dumps(stream)]
            rewrite.netdev_id = netdev_id
            rewrite.replaced = "-netdev user"
        elif name in ("netdev", "nic"):
            pairs = parse_kv(split_opts(value))
            kind = pairs[0][1] if pairs and pairs[0][0] == "type" else ""
            if kind != "user":
                out += [arg, value]
                continue
            user_netdevs += 1
            options = dict(pairs)
            if name == "netdev":
                netdev_id = options.get("id", "")
                if not netdev_id:
                    raise RewriteError(f"-netdev {value}: id= is missing")
                translate_user_options(pairs, f"-netdev {netdev_id}", rewrite)
                if vhost:
                    out += ["-chardev", vhost_user_chardev(netdev_id, socket_path), arg, vhost_user_netdev(netdev_id)]
                else:
                    out += [arg, stream_netdev(netdev_id, socket_path)]
                rewrite.replaced = "-netdev user"
            else:
                netdev_id = options.get("id", "") or DEFAULT_ID
                nic_pairs = [(k, v) for k, v in pairs if k not in ("model", "mac")]
                translate_user_options(nic_pairs, "-nic user", rewrite)
                default = vhost_default_model(qemu_args) if vhost else default_nic_model(qemu_args)
                model = options.get("model") or default
                if model == "help":
                    raise RewriteError("-nic model=help: run QEMU with -nic model=help itself")
                model = NIC_MODEL_ALIASES.get(model, model)
                if vhost and not model.startswith("virtio-net"):
                    raise RewriteError(f"-nic user,model={model}: vhost-user serves virtio-net NICs only")
                device = [model, f"netdev={netdev_id}"]
                if options.get("mac"):
                    device.append(f"mac={options['mac']}")
                if tcg and "pci" in model:
                    device.append("vectors=0")
                out += [*our_netdev(netdev_id, socket_path, vhost), "-device", join_opts(device)]
                rewrite.replaced = "-nic user"
            rewrite.netdev_id = netdev_id
        else:
            out += [arg, value]
    if user_netdevs > 1:
        raise RewriteError("more than one -nic user / -netdev user: qemu-vpnnet run replaces only one")
    if user_netdevs == 0:
        device = [DEFAULT_MODEL, f"netdev={DEFAULT_ID}", *(["vectors=0"] if tcg else [])]
        out += [*our_netdev(DEFAULT_ID, socket_path, vhost), "-device", join_opts(device)]
    if vhost:
        if rewrite.replaced == "-netdev user":
            adapt_user_devices(out, rewrite.netdev_id, tcg)
        out += shared_memory_args(qemu_args)
    return rewrite


def our_netdev(netdev_id: str, socket_path: str, vhost: bool) -> list[str]:
    """["-netdev", SPEC] for the stream transport; with the -chardev before it for vhost-user."""
    if vhost:
        return ["-chardev", vhost_user_chardev(netdev_id, socket_path), "-netdev", vhost_user_netdev(netdev_id)]
    return ["-netdev", stream_netdev(netdev_id, socket_path)]


def vhost_default_model(qemu_args: Sequence[str]) -> str:
    """-nic without model= under vhost-user: the machine's default NIC cannot do vhost-user, virtio-net can."""
    return "virtio-net-device" if default_nic_model(qemu_args) == "virtio-net-device" else DEFAULT_MODEL


def adapt_user_devices(args: list[str], netdev_id: str, tcg: bool) -> None:
    """The user's own -device ...,netdev=ID (kept as given) must be virtio-net for vhost-user, and a
    virtio-net-pci one gets vectors=0 under TCG (unless it sets vectors= itself)."""
    for i in range(1, len(args) - 1):
        if args[i] not in ("-device", "--device"):
            continue
        value = args[i + 1]
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except json.JSONDecodeError:
                continue
            if not isinstance(spec, dict) or spec.get("netdev") != netdev_id:
                continue
            driver = str(spec.get("driver", ""))
            check_vhost_driver(driver, value)
            if tcg and "pci" in driver and "vectors" not in spec:
                spec["vectors"] = 0
                args[i + 1] = json.dumps(spec)
            continue
        parts = split_opts(value)
        pairs = parse_kv(parts)
        options = dict(pairs)
        if options.get("netdev") != netdev_id:
            continue
        driver = options.get("type") or options.get("driver", "")
        check_vhost_driver(driver, value)
        if tcg and "pci" in driver and "vectors" not in options:
            args[i + 1] = join_opts([*parts, "vectors=0"])


def check_vhost_driver(driver: str, value: str) -> None:
    if not driver.startswith("virtio-net"):
        raise RewriteError(f"-device {value}: vhost-user serves virtio-net NICs only")


# ---- the process side --------------------------------------------------------------------------


def python_env() -> dict[str, str]:
    """Our environment, with PYTHONPATH reaching this qemu_vpnnet when it is not installed."""
    import site

    import qemu_vpnnet

    env = dict(os.environ)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(qemu_vpnnet.__file__)))
    site_dirs = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if parent not in site_dirs:
        paths = [parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != parent]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


USAGE = (
    "usage: qemu-vpnnet run [--backend-log FILE] [--transport stream|vhost-user] [backend options] "
    "-- QEMU [QEMU options]"
)


@dataclass
class RunArgs:
    """`run`'s arguments: ours, the backend's and QEMU's."""

    backend: list[str]
    log_file: str | None
    qemu: list[str]
    transport: str = "stream"


def split_argv(argv: Sequence[str]) -> RunArgs:
    """`run`'s arguments: --backend-log FILE and --transport T are ours, the rest before -- the backend's."""
    args = list(argv)
    if "--" not in args:
        raise RewriteError(f"missing '--' before the QEMU command\n{USAGE}")
    cut = args.index("--")
    ours, qemu = args[:cut], args[cut + 1 :]
    if not qemu:
        raise RewriteError(f"no QEMU command after '--'\n{USAGE}")
    result = RunArgs(backend=[], log_file=None, qemu=qemu)
    i = 0
    while i < len(ours):
        arg = ours[i]
        if arg in ("-h", "--help"):
            raise RewriteError(USAGE + "\n" + (__doc__ or ""))
        name, eq, inline = arg.partition("=")
        if name in ("--backend-log", "--transport"):
            if eq:
                value = inline
                i += 1
            elif i + 1 < len(ours):
                value = ours[i + 1]
                i += 2
            else:
                raise RewriteError(f"{name} needs a {'FILE' if name == '--backend-log' else 'TRANSPORT'}")
            if name == "--backend-log":
                result.log_file = value
            elif value in TRANSPORTS:
                result.transport = value
            else:
                raise RewriteError(f"--transport {value}: expected one of {', '.join(TRANSPORTS)}")
            continue
        result.backend.append(arg)
        i += 1
    return result


class Launcher:
    """Runs the backend and QEMU; forwards signals to QEMU."""

    def __init__(self, backend_cmd: list[str], qemu_cmd: list[str], socket_path: str, log_file: str | None) -> None:
        self.backend_cmd = backend_cmd
        self.qemu_cmd = qemu_cmd
        self.socket_path = socket_path
        self.log_file = log_file
        self.backend: subprocess.Popen[bytes] | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.pending_signal: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.qemu is not None and self.qemu.poll() is None:
            try:
                os.kill(self.qemu.pid, signum)
            except ProcessLookupError:
                pass
        else:
            self.pending_signal = signum

    def start_backend(self, timeout: float = 10.0) -> None:
        log = open(self.log_file, "ab") if self.log_file else None
        try:
            self.backend = subprocess.Popen(
                self.backend_cmd,
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None else sys.stderr,
                stderr=subprocess.STDOUT,
                env=python_env(),
                start_new_session=True,  # a Ctrl-C on the terminal is QEMU's business; we stop it after
                preexec_fn=set_pdeathsig(),
            )
        finally:
            if log is not None:
                log.close()
        deadline = time.monotonic() + timeout
        while not unix_listening_in_proc(self.socket_path):
            status = self.backend.poll()
            if status is not None:
                raise IntegrationError(
                    f"the backend exited with status {status} before listening"
                    + (f" (see {self.log_file})" if self.log_file else "")
                )
            if self.pending_signal is not None:
                raise IntegrationError(f"interrupted by signal {self.pending_signal}")
            if time.monotonic() > deadline:
                raise IntegrationError(f"the backend did not listen on {self.socket_path} within {timeout:g} s")
            time.sleep(0.02)

    def run_qemu(self) -> int:
        try:
            self.qemu = subprocess.Popen(self.qemu_cmd, preexec_fn=set_pdeathsig())
        except OSError as exc:
            raise IntegrationError(f"cannot run {self.qemu_cmd[0]}: {exc.strerror or exc}") from None
        if self.pending_signal is not None:
            os.kill(self.qemu.pid, self.pending_signal)
        warned = False
        while True:
            try:
                status = self.qemu.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if not warned and self.backend is not None and self.backend.poll() is not None:
                print(
                    f"qemu-vpnnet run: the backend exited with status {self.backend.returncode}; "
                    "the guest has no network",
                    file=sys.stderr,
                )
                warned = True
        return status if status >= 0 else 128 - status

    def stop_backend(self) -> None:
        if self.backend is not None and self.backend.poll() is None:
            terminate_pid(self.backend.pid)
        if self.backend is not None:
            try:
                self.backend.wait(1.0)
            except subprocess.TimeoutExpired:
                pass


def main(argv: list[str]) -> int:
    try:
        run_args = split_argv(argv[1:])
    except RewriteError as exc:
        print(f"qemu-vpnnet run: {exc}", file=sys.stderr)
        return 2
    run_dir = tempfile.mkdtemp(prefix="qemu-vpnnet-")
    vhost = run_args.transport == "vhost-user"
    socket_path = os.path.join(run_dir, "vhost-user.sock" if vhost else "net.sock")
    try:
        rewrite = rewrite_qemu_args(run_args.qemu, socket_path, run_args.transport)
        for warning in rewrite.warnings:
            print(f"qemu-vpnnet run: warning: {warning}", file=sys.stderr)
        listen = ["--vhost-user" if vhost else "--socket", socket_path]
        backend_args = [*listen, *rewrite.backend_args, *run_args.backend]
        check_backend_args(backend_args)
        launcher = Launcher(
            [sys.executable, "-m", "qemu_vpnnet", *backend_args], rewrite.qemu_args, socket_path, run_args.log_file
        )
        previous = {
            sig: signal.signal(sig, launcher.on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            launcher.start_backend()
            return launcher.run_qemu()
        finally:
            launcher.stop_backend()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except IntegrationError as exc:
        print(f"qemu-vpnnet run: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def check_backend_args(args: list[str]) -> None:
    """Let the backend's own parser reject bad options before anything starts (it exits 2 with usage)."""
    from qemu_vpnnet.cli import build_parser

    parser = build_parser()
    parser.prog = "qemu-vpnnet run"
    parser.parse_args(args)

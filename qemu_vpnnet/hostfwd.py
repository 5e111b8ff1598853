"""Port-forward rules in QEMU's own syntax: `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`.

Either address may be IPv6 in brackets, as on QEMU's command line: `tcp:[::1]:2222-:22` listens on
the host's ::1 and goes to the guest's IPv4 address (an empty guest address always means IPv4, as
in QEMU); `tcp:[::1]:2222-[fec0::5054:ff:fe12:3456]:22` goes to that guest address over IPv6, and
the guest address `[::]` means the first guest's IPv6 address (GUEST_IPV6_ANY).
"""

import ipaddress
from dataclasses import dataclass

DEFAULT_HOST_ADDR = "127.0.0.1"
GUEST_IPV6_ANY = "::"  # guest address [::]: the first guest's IPv6 address at each connection


class HostFwdSyntaxError(ValueError):
    """A forward rule that cannot be parsed; the message says what is wrong."""


@dataclass(frozen=True)
class ForwardSpec:
    """One forward: host_port 0 means an ephemeral port; guest_addr "" means the first leased guest
    (its IPv4 address), "::" the first guest's IPv6 address."""

    protocol: str
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int

    def rule(self, host_port: int | None = None) -> str:
        """The rule in QEMU's syntax (with host_port instead of the spec's, e.g. the bound one)."""
        port = self.host_port if host_port is None else host_port
        return f"{self.protocol}:{bracketed(self.host_addr)}:{port}-{bracketed(self.guest_addr)}:{self.guest_port}"


def bracketed(addr: str) -> str:
    """An address as it stands before ":PORT": IPv6 in brackets."""
    return f"[{addr}]" if ":" in addr else addr


def _split_addr_port(text: str, what: str) -> tuple[str, str]:
    """ "[v6]:port", "v4:port" or ":port" into (address, port text)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise HostFwdSyntaxError(f"bad {what}address in {text!r}")
        return text[1:close], text[close + 2 :]
    addr, sep, port = text.rpartition(":")
    if not sep:
        raise HostFwdSyntaxError(f"expected {what}ADDR:PORT, got {text!r}")
    return addr, port


def _port(text: str, what: str, allow_zero: bool) -> int:
    if not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        raise HostFwdSyntaxError(f"bad {what} port {text!r}")
    return int(text)


def check_protocol(protocol: str) -> str:
    protocol = protocol.lower() or "tcp"
    if protocol not in ("tcp", "udp"):
        raise HostFwdSyntaxError(f"protocol must be tcp or udp, not {protocol!r}")
    return protocol


def unbracketed(addr: str) -> str:
    return addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr


def check_host_addr(addr: str) -> str:
    """The host address in normal form (IPv6 brackets allowed); empty means 127.0.0.1."""
    if not addr:
        return DEFAULT_HOST_ADDR
    try:
        return str(ipaddress.ip_address(unbracketed(addr)))
    except ValueError as exc:
        raise HostFwdSyntaxError(f"bad host address {addr!r}") from exc


def check_guest_addr(addr: str) -> str:
    """The guest address in normal form: empty (the first leased guest), IPv4, IPv6 (brackets
    allowed) or "::" (the first guest's IPv6 address)."""
    if not addr:
        return ""
    try:
        return str(ipaddress.ip_address(unbracketed(addr)))
    except ValueError as exc:
        raise HostFwdSyntaxError(f"bad guest address {addr!r} (IPv4 or IPv6 expected)") from exc


def parse_hostfwd(text: str) -> ForwardSpec:
    """Parse `tcp:127.0.0.1:2222-:22`, `udp::5353-10.0.2.15:53`, `tcp:[::1]:8080-:80` (or `hostfwd=...`)."""
    rule = text.strip()
    if rule.startswith("hostfwd="):
        rule = rule[len("hostfwd=") :]
    protocol, sep, rest = rule.partition(":")
    if not sep:
        raise HostFwdSyntaxError(f"expected [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport, got {text!r}")
    host_part, dash, guest_part = rest.partition("-")
    if not dash:
        raise HostFwdSyntaxError(f"missing '-' between host and guest side in {text!r}")
    host_addr, host_port = _split_addr_port(host_part, "host ")
    guest_addr, guest_port = _split_addr_port(guest_part, "guest ")
    return ForwardSpec(
        check_protocol(protocol),
        check_host_addr(host_addr),
        _port(host_port, "host", True),
        check_guest_addr(guest_addr),
        _port(guest_port, "guest", False),
    )


def parse_hostfwd_remove(text: str) -> tuple[str, str, int]:
    """QEMU's hostfwd_remove argument `[tcp|udp]:[hostaddr]:hostport` as (protocol, addr, port)."""
    protocol, sep, rest = text.strip().partition(":")
    if not sep:
        raise HostFwdSyntaxError(f"expected [tcp|udp]:[hostaddr]:hostport, got {text!r}")
    if ":" not in rest and not rest.startswith("["):
        raise HostFwdSyntaxError(f"expected [tcp|udp]:[hostaddr]:hostport, got {text!r}")
    addr, port = _split_addr_port(rest, "host ")
    return check_protocol(protocol), check_host_addr(addr), _port(port, "host", False)

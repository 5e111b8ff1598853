"""Port-forward rules in QEMU's own syntax: `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`."""

import ipaddress
from dataclasses import dataclass

DEFAULT_HOST_ADDR = "127.0.0.1"


class HostFwdSyntaxError(ValueError):
    """A forward rule that cannot be parsed; the message says what is wrong."""


@dataclass(frozen=True)
class ForwardSpec:
    """One forward: host_port 0 means an ephemeral port; guest_addr "" means the first leased guest."""

    protocol: str
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int

    def rule(self) -> str:
        host = f"[{self.host_addr}]" if ":" in self.host_addr else self.host_addr
        return f"{self.protocol}:{host}:{self.host_port}-{self.guest_addr}:{self.guest_port}"


def _split_addr_port(text: str, what: str) -> tuple[str, str]:
    """ "[v6]:port", "v4:port" or ":port" into (address, port text)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise HostFwdSyntaxError(f"bad {what} address in {text!r}")
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


def check_host_addr(addr: str) -> str:
    if not addr:
        return DEFAULT_HOST_ADDR
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError as exc:
        raise HostFwdSyntaxError(f"bad host address {addr!r}") from exc


def check_guest_addr(addr: str) -> str:
    if not addr:
        return ""
    try:
        return str(ipaddress.IPv4Address(addr))
    except ValueError as exc:
        raise HostFwdSyntaxError(f"bad guest address {addr!r} (IPv4 expected)") from exc


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

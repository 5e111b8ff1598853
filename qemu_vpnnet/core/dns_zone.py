"""Names of our own for the DNS server: zones from the command line, zone files and QMP.

A zone maps a name to its addresses (4 bytes: an A record, 16 bytes: AAAA), kept in the order
given and without duplicates. Names are case-insensitive and kept lower case without the
trailing dot. A name `*.corp.test` is a wildcard: it matches every name below corp.test (not
corp.test itself); an exact name beats any wildcard, and a longer wildcard beats a shorter one.

Each source (SOURCE_COMMAND_LINE, a zone file's path, SOURCE_QMP) has a zone of its own, so a
reloaded file replaces only its own names. A lookup sees the union of all sources: a name given
in several sources has all their addresses. Bounded: at most MAX_NAMES names per source and
MAX_ADDRESSES addresses per name.

Zone file syntax: one `NAME ADDR [ADDR...]` per line; `#` starts a comment; blank lines are
ignored. parse_zone_text raises ZoneError naming the first bad line.
"""

import ipaddress
from typing import Final, final

MAX_NAMES: Final = 4096
MAX_ADDRESSES: Final = 32
MAX_NAME_LENGTH: Final = 253
SOURCE_COMMAND_LINE: Final = "command-line"
SOURCE_QMP: Final = "qmp"


class ZoneError(ValueError):
    """A zone entry or zone file cannot be used (the message says why)."""


def normal_name(text: str) -> str:
    """A DNS name as zones keep it (lower case, no trailing dot); ZoneError when it is not one.

    Labels are 1..63 characters of letters, digits, '-' and '_'; the first label may be '*'
    (a wildcard, then at least one more label must follow).
    """
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ZoneError(f"bad DNS name {text!r}")
    labels = name.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 1:
            continue
        if not 0 < len(label) <= 63 or not all((c.isalnum() and c.isascii()) or c in "-_" for c in label):
            raise ZoneError(f"bad DNS name {text!r}")
    return name


def address_bytes(text: str) -> bytes:
    """The packed form of an IPv4 or IPv6 address; ZoneError when it is neither."""
    try:
        return ipaddress.ip_address(text.strip()).packed
    except ValueError:
        raise ZoneError(f"bad address {text!r} (expected an IPv4 or IPv6 address)") from None


def address_text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


def parse_zone_entry(text: str) -> tuple[str, bytes]:
    """NAME=ADDR (--dns-zone) as (name, packed address); ZoneError when malformed."""
    name, sep, addr = text.partition("=")
    if not sep:
        raise ZoneError(f"expected NAME=ADDR, got {text!r}")
    return normal_name(name), address_bytes(addr)


def parse_zone_text(text: str) -> list[tuple[str, bytes]]:
    """The (name, address) entries of a zone file; ZoneError naming the first bad line."""
    entries: list[tuple[str, bytes]] = []
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            if len(fields) < 2:
                raise ZoneError(f"expected NAME ADDR [ADDR...], got {line.strip()!r}")
            name = normal_name(fields[0])
            names.add(name)
            if len(names) > MAX_NAMES:
                raise ZoneError(f"more than {MAX_NAMES} names")
            for addr in fields[1:]:
                entries.append((name, address_bytes(addr)))
        except ZoneError as exc:
            raise ZoneError(f"line {number}: {exc}") from None
    return entries


@final
class DnsZones:
    """The zones of every source and their merged view (see the module docstring)."""

    def __init__(self) -> None:
        self.sources: dict[str, dict[str, list[bytes]]] = {}
        self.merged: dict[str, list[bytes]] = {}
        self.has_wildcards = False

    def set_source(self, source: str, entries: list[tuple[str, bytes]]) -> None:
        """Replace the zone of source with entries (ZoneError when it is too big; nothing changes)."""
        zone: dict[str, list[bytes]] = {}
        for name, addr in entries:
            addrs = zone.get(name)
            if addrs is None:
                if len(zone) >= MAX_NAMES:
                    raise ZoneError(f"more than {MAX_NAMES} names")
                addrs = zone[name] = []
            if addr not in addrs:
                if len(addrs) >= MAX_ADDRESSES:
                    raise ZoneError(f"more than {MAX_ADDRESSES} addresses for {name}")
                addrs.append(addr)
        if zone:
            self.sources[source] = zone
        else:
            self.sources.pop(source, None)
        self.rebuild()

    def add(self, source: str, name: str, addr: bytes) -> bool:
        """Add one address (name already normal); False when it was there already."""
        zone = self.sources.setdefault(source, {})
        addrs = zone.get(name)
        if addrs is None:
            if len(zone) >= MAX_NAMES:
                raise ZoneError(f"the DNS zone is full ({MAX_NAMES} names)")
            addrs = zone[name] = []
        if addr in addrs:
            return False
        if len(addrs) >= MAX_ADDRESSES:
            raise ZoneError(f"DNS name '{name}' has {MAX_ADDRESSES} addresses already")
        addrs.append(addr)
        self.rebuild_name(name)
        return True

    def remove(self, source: str, name: str, addr: bytes | None) -> list[bytes]:
        """Remove name's address addr, or all its addresses; the ones removed (empty: none were)."""
        zone = self.sources.get(source, {})
        addrs = zone.get(name)
        if addrs is None:
            return []
        if addr is None:
            removed = list(addrs)
            addrs.clear()
        elif addr in addrs:
            removed = [addr]
            addrs.remove(addr)
        else:
            return []
        if not addrs:
            del zone[name]
        if not zone:
            self.sources.pop(source, None)
        self.rebuild_name(name)
        return removed

    def rebuild(self) -> None:
        self.merged = {name: self.addresses_of(name) for zone in self.sources.values() for name in zone}
        self.has_wildcards = any(name.startswith("*.") for name in self.merged)

    def rebuild_name(self, name: str) -> None:
        """The merged view of one name again, after add or remove changed only it (a full
        rebuild per QMP call would make filling a zone quadratic)."""
        into = self.addresses_of(name)
        if into:
            self.merged[name] = into
        else:
            self.merged.pop(name, None)
        if name.startswith("*."):
            self.has_wildcards = any(other.startswith("*.") for other in self.merged)

    def addresses_of(self, name: str) -> list[bytes]:
        """name's addresses in all sources, in source order, each once."""
        into: list[bytes] = []
        for zone in self.sources.values():
            for addr in zone.get(name, ()):
                if addr not in into:
                    into.append(addr)
        return into

    def lookup(self, name: str) -> list[bytes] | None:
        """The addresses of name (lower case, no trailing dot), or None when no zone has it."""
        merged = self.merged
        addrs = merged.get(name)
        if addrs is not None or not self.has_wildcards:
            return addrs
        dot = name.find(".")
        while dot >= 0:
            addrs = merged.get("*" + name[dot:])
            if addrs is not None:
                return addrs
            dot = name.find(".", dot + 1)
        return None

    def entries(self) -> list[tuple[str, str, list[bytes]]]:
        """(source, name, addresses) of every zone entry, sources in the order they came."""
        result: list[tuple[str, str, list[bytes]]] = []
        for source, zone in self.sources.items():
            for name, addrs in zone.items():
                result.append((source, name, list(addrs)))
        return result

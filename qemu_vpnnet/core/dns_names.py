"""Which name a guest last resolved to an address, through our DNS: for the proxy's no_proxy.

The HTTP proxy (io/http_proxy.py) matches no_proxy against the destination's name. A guest
that connects to an address it looked up gets that name from here: DnsServer fills this map
from its answers (host resolver, zones, forwarded answers) while `enabled` is set, which the
shell does only while an upstream proxy with a no_proxy list is configured. Bounded: at most
MAX_NAMES addresses, the oldest forgotten first; one name per address (the latest).
"""

from typing import Final, final

import dpkt

MAX_NAMES: Final = 4096
TYPE_A: Final = 1
TYPE_AAAA: Final = 28


@final
class AnswerNames:
    def __init__(self) -> None:
        self.enabled = False
        self.names: dict[bytes, str] = {}  # address (4 or 16 bytes) -> name, oldest first

    def remember(self, name: str, addresses: list[bytes]) -> None:
        """name (lower case, no trailing dot) resolved to addresses."""
        if not self.enabled or not name:
            return
        names = self.names
        for addr in addresses:
            if addr in names:
                del names[addr]  # to the young end
            elif len(names) >= MAX_NAMES:
                del names[next(iter(names))]
            names[addr] = name

    def learn(self, message: bytes) -> None:
        """The A and AAAA records of a DNS answer message (a forwarded one)."""
        if not self.enabled:
            return
        try:
            answers = dpkt.dns.DNS(message).an
        except Exception:
            return
        for rr in answers:
            if rr.type == TYPE_A or rr.type == TYPE_AAAA:
                self.remember(str(rr.name).lower().rstrip("."), [bytes(rr.ip if rr.type == TYPE_A else rr.ip6)])

    def name_of(self, addr: bytes) -> str:
        """The name last resolved to addr, "" when none."""
        return self.names.get(addr, "")

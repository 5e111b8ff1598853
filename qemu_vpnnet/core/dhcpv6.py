"""DHCPv6 server (RFC 8415): stateless always, stateful addresses (IA_NA) when `config.dhcpv6`.

The Stack hands `handle()` the UDP payload a guest sent to port 547 and sends the reply (if
any) from `config.router_ll` port 547 back to the guest's address, port 546. The Router
Advertisement's O flag (core/ndp.py) makes every guest ask for DNS here; its M flag, set with
`config.dhcpv6`, makes them ask for an address as well.

* Information-request: Reply with the DNS server (option 23, `config.dns_ip6`), the search
  list (24: `config.domain` then `config.search`, when any) and Information Refresh Time.
* Stateful (only with `config.dhcpv6`; without it Solicit and the other address messages get no
  answer): Solicit -> Advertise (Preference 255: no need to wait for other servers), or Reply
  with Rapid Commit when the client asked for it; Request, Renew, Rebind -> Reply with the IA_NA's
  address (IAADDR, preferred = valid = `config.lease_time`, T1 half of it, T2 80 %), and any
  other address the client listed with lifetimes 0; Release frees, Decline takes the address out
  of the pool for DECLINE_HOLD seconds; Confirm -> Success when every address is in the prefix,
  NotOnLink otherwise. IA_TA and IA_PD are answered NoAddrsAvail / NoPrefixAvail.
* Addresses: interface ids POOL_FIRST (0x1000) upward in the /64, never `host_ip6`, `dns_ip6`
  or `reserved` (the Stack's gateway-service addresses); at most `pool_size` (POOL_SIZE), hence
  at most that many leases. A client (DUID + IAID) keeps its address while nobody needs it, and
  its first choice is a hash of its identity, so it usually gets the same address after our
  restart too. A full pool reuses the longest-expired lease; none: NoAddrsAvail.
* Server DUID: DUID-LL (type 3, Ethernet) of `config.gateway_mac`. Messages naming another
  server are ignored (None); so are those a server sends, relay messages and unknown types.
* Limits: messages of at most MAX_MESSAGE bytes, at most MAX_OPTIONS options per level, DUIDs
  of at most 130 bytes. A message that does not parse, or that RFC 8415 16 says to discard
  (no Client Identifier, a Server Identifier where none may be), raises Dhcpv6Error (the Stack
  counts it as drop-bad-dhcpv6).

Events: GUEST_LEASE6 (mac, address, hostname, lease-time, duid, iaid) when a lease is bound to
an address it did not hold, in `events` as DhcpServer's GUEST_LEASE. The hostname is the
Client FQDN option's (39) name, if the client sent one.
"""

import struct
import zlib
from typing import Final, final

from qemu_vpnnet.core.config import NetConfig, ip_str
from qemu_vpnnet.core.dhcp import encode_search_list
from qemu_vpnnet.core.packets import mac_str

DHCPV6_SERVER_PORT: Final = 547
DHCPV6_CLIENT_PORT: Final = 546
ALL_DHCP_AGENTS: Final = b"\xff\x02" + bytes(11) + b"\x01\x00\x02"  # ff02::1:2

MSG_SOLICIT: Final = 1
MSG_ADVERTISE: Final = 2
MSG_REQUEST: Final = 3
MSG_CONFIRM: Final = 4
MSG_RENEW: Final = 5
MSG_REBIND: Final = 6
MSG_REPLY: Final = 7
MSG_RELEASE: Final = 8
MSG_DECLINE: Final = 9
MSG_INFORMATION_REQUEST: Final = 11

OPT_CLIENTID: Final = 1
OPT_SERVERID: Final = 2
OPT_IA_NA: Final = 3
OPT_IA_TA: Final = 4
OPT_IAADDR: Final = 5
OPT_PREFERENCE: Final = 7
OPT_STATUS_CODE: Final = 13
OPT_RAPID_COMMIT: Final = 14
OPT_DNS_SERVERS: Final = 23
OPT_DOMAIN_LIST: Final = 24
OPT_IA_PD: Final = 25
OPT_INFORMATION_REFRESH_TIME: Final = 32
OPT_CLIENT_FQDN: Final = 39

STATUS_SUCCESS: Final = 0
STATUS_NO_ADDRS_AVAIL: Final = 2
STATUS_NO_BINDING: Final = 3
STATUS_NOT_ON_LINK: Final = 4
STATUS_NO_PREFIX_AVAIL: Final = 6

MAX_MESSAGE: Final = 1500  # bytes; a longer one is refused unread
MAX_OPTIONS: Final = 64  # per message, and per IA
MAX_DUID: Final = 130  # RFC 8415 11.1: a 2-byte type and at most 128 bytes
POOL_FIRST: Final = 0x1000  # the first address's interface id (fec0::1000)
POOL_SIZE: Final = 4096
OFFER_HOLD: Final = 60.0  # seconds an Advertised address stays held for its client
DECLINE_HOLD: Final = 3600.0  # seconds a Declined address is out of the pool
INFORMATION_REFRESH: Final = 86400  # seconds

_OPT_HEADER: Final = struct.Struct("!HH")
_IA_NA: Final = struct.Struct("!III")
_IAADDR: Final = struct.Struct("!16sII")


class Dhcpv6Error(ValueError):
    """A message from a guest that does not parse, or that RFC 8415 says to discard."""


@final
class Lease6:
    """One client's IA_NA (its DUID and IAID) and its address; expires 0 when released."""

    def __init__(self, duid: bytes, iaid: int, mac: bytes, addr: bytes, expires: float) -> None:
        self.duid = duid
        self.iaid = iaid
        self.mac = mac
        self.addr = addr
        self.expires = expires
        self.bound = False  # in a Reply, not merely Advertised
        self.hostname = ""


def parse_options(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """The (code, value) options in data[start:end]; Dhcpv6Error when one runs past end or
    there are more than MAX_OPTIONS."""
    options: list[tuple[int, bytes]] = []
    offset = start
    while offset < end:
        if offset + 4 > end:
            raise Dhcpv6Error("truncated option header")
        code, length = _OPT_HEADER.unpack_from(data, offset)
        offset += 4
        if offset + length > end:
            raise Dhcpv6Error(f"option {code} runs past its container")
        if len(options) >= MAX_OPTIONS:
            raise Dhcpv6Error(f"more than {MAX_OPTIONS} options")
        options.append((code, data[offset : offset + length]))
        offset += length
    return options


def option(code: int, value: bytes) -> bytes:
    return _OPT_HEADER.pack(code, len(value)) + value


def status(code: int, text: str) -> bytes:
    """A Status Code option."""
    return option(OPT_STATUS_CODE, struct.pack("!H", code) + text.encode())


def first(options: list[tuple[int, bytes]], code: int) -> bytes | None:
    for kind, value in options:
        if kind == code:
            return value
    return None


def fqdn_name(value: bytes) -> str:
    """The name in a Client FQDN option (RFC 4704: flags, then a possibly partial DNS name); ""
    when it is not a well-formed name."""
    labels: list[str] = []
    offset = 1
    while offset < len(value):
        n = value[offset]
        if n == 0:
            break
        if n > 63 or offset + 1 + n > len(value):
            return ""
        labels.append(value[offset + 1 : offset + 1 + n].decode("ascii", "replace"))
        offset += 1 + n
    return ".".join(labels)[:253]


@final
class IaRequest:
    """One IA_NA of a client's message: its IAID and the addresses it lists."""

    def __init__(self, iaid: int, addresses: list[bytes]) -> None:
        self.iaid = iaid
        self.addresses = addresses


def parse_ia_na(value: bytes) -> IaRequest:
    if len(value) < _IA_NA.size:
        raise Dhcpv6Error("truncated IA_NA")
    iaid = _IA_NA.unpack_from(value, 0)[0]
    addresses: list[bytes] = []
    for code, inner in parse_options(value, _IA_NA.size, len(value)):
        if code == OPT_IAADDR:
            if len(inner) < _IAADDR.size:
                raise Dhcpv6Error("truncated IAADDR")
            parse_options(inner, _IAADDR.size, len(inner))  # only checked: nothing in there is used
            addresses.append(inner[:16])
    return IaRequest(iaid, addresses)


@final
class Dhcpv6Server:
    def __init__(self, config: NetConfig, pool_size: int = POOL_SIZE) -> None:
        self.config = config
        self.pool_size = pool_size
        self.duid = struct.pack("!HH", 3, 1) + config.gateway_mac  # DUID-LL, Ethernet
        self.by_key: dict[tuple[bytes, int], Lease6] = {}  # (DUID, IAID) -> lease
        self.by_addr: dict[bytes, Lease6] = {}
        self.declined: dict[bytes, float] = {}  # address -> until when it stays out of the pool
        self.reserved: dict[bytes, int] = {}  # addresses never handed out (gateway services); the Stack's
        # (event name, data) for the control plane: GUEST_LEASE6 when a lease is bound to a new address
        self.events: list[tuple[str, dict[str, object]]] = []
        self._dns_options = self._fixed_options()

    def _fixed_options(self) -> bytes:
        cfg = self.config
        opts = option(OPT_DNS_SERVERS, cfg.dns_ip6)
        names: list[str] = []
        for name in [cfg.domain, *cfg.search]:
            name = name.strip(".").lower()
            if name and name not in names:
                names.append(name)
        if names:
            opts += option(OPT_DOMAIN_LIST, encode_search_list(names))
        return opts

    def handle(self, payload: bytes, src_mac: bytes, src: bytes, now: float) -> bytes | None:
        """Answer one message a guest at src_mac (address src) sent to port 547: the reply's UDP
        payload, or None when there is nothing to answer. Dhcpv6Error for a malformed message."""
        if len(payload) > MAX_MESSAGE:
            raise Dhcpv6Error(f"message longer than {MAX_MESSAGE} bytes")
        if len(payload) < 4:
            raise Dhcpv6Error("truncated message")
        mtype = payload[0]
        if mtype not in (
            MSG_SOLICIT,
            MSG_REQUEST,
            MSG_CONFIRM,
            MSG_RENEW,
            MSG_REBIND,
            MSG_RELEASE,
            MSG_DECLINE,
            MSG_INFORMATION_REQUEST,
        ):
            return None  # a server's message, a relay's, or one we do not know
        xid = payload[1:4]
        options = parse_options(payload, 4, len(payload))
        client_id = first(options, OPT_CLIENTID)
        server_id = first(options, OPT_SERVERID)
        if client_id is not None and not 2 < len(client_id) <= MAX_DUID:
            raise Dhcpv6Error("bad Client Identifier length")
        if server_id is not None and server_id != self.duid:
            return None  # for another server
        ias: list[IaRequest] = []
        others: list[tuple[int, bytes]] = []  # IA_TA and IA_PD: answered, never served
        for code, value in options:
            if code == OPT_IA_NA:
                ias.append(parse_ia_na(value))
            elif code == OPT_IA_TA or code == OPT_IA_PD:
                if len(value) < 4:
                    raise Dhcpv6Error(f"truncated IA option {code}")
                others.append((code, value[:4]))
        if mtype == MSG_INFORMATION_REQUEST:
            if ias or others:
                raise Dhcpv6Error("Information-request with an IA option")
            reply = self._header(MSG_REPLY, xid, client_id) + self._dns_options
            return reply + option(OPT_INFORMATION_REFRESH_TIME, struct.pack("!I", INFORMATION_REFRESH))
        if client_id is None:
            raise Dhcpv6Error(f"message type {mtype} without a Client Identifier")
        needs_server = mtype in (MSG_REQUEST, MSG_RENEW, MSG_RELEASE, MSG_DECLINE)
        if needs_server and server_id is None:
            raise Dhcpv6Error(f"message type {mtype} without a Server Identifier")
        if not needs_server and server_id is not None:
            raise Dhcpv6Error(f"message type {mtype} with a Server Identifier")
        if not self.config.dhcpv6:
            return None  # stateless only: no addresses here
        hostname = ""
        fqdn = first(options, OPT_CLIENT_FQDN)
        if fqdn is not None:
            hostname = fqdn_name(fqdn)
        if mtype == MSG_SOLICIT:
            if first(options, OPT_RAPID_COMMIT) is not None:
                committed = self._assign(MSG_REPLY, xid, client_id, ias, others, src_mac, hostname, now, True, True)
                if committed is not None:
                    return committed + option(OPT_RAPID_COMMIT, b"")
            return self._assign(MSG_ADVERTISE, xid, client_id, ias, others, src_mac, hostname, now, False, False)
        if mtype == MSG_REQUEST or mtype == MSG_RENEW or mtype == MSG_REBIND:
            return self._assign(MSG_REPLY, xid, client_id, ias, others, src_mac, hostname, now, True, False)
        if mtype == MSG_CONFIRM:
            return self._confirm(xid, client_id, ias)
        return self._release(mtype, xid, client_id, ias, now)

    def _header(self, mtype: int, xid: bytes, client_id: bytes | None) -> bytes:
        out = bytes((mtype,)) + xid + option(OPT_SERVERID, self.duid)
        if client_id is not None:
            out += option(OPT_CLIENTID, client_id)
        return out

    def _assign(
        self,
        mtype: int,
        xid: bytes,
        client_id: bytes,
        ias: list[IaRequest],
        others: list[tuple[int, bytes]],
        mac: bytes,
        hostname: str,
        now: float,
        bind: bool,
        rapid: bool,
    ) -> bytes | None:
        """Advertise (bind False) or Reply (bind True) with an address for each IA_NA. None only
        when a Solicit with Rapid Commit (rapid) gets no address: it is Advertised NoAddrsAvail."""
        cfg = self.config
        lease_time = cfg.lease_time
        body = b""
        assigned = 0
        for ia in ias:
            addr = self._candidate(client_id, ia.iaid, ia.addresses, now)
            if addr is None:
                body += option(OPT_IA_NA, _IA_NA.pack(ia.iaid, 0, 0) + status(STATUS_NO_ADDRS_AVAIL, "pool full"))
                continue
            assigned += 1
            if bind:
                self._bind(client_id, ia.iaid, mac, addr, hostname, now)
            else:
                self._hold(client_id, ia.iaid, mac, addr, now)
            inner = option(OPT_IAADDR, _IAADDR.pack(addr, lease_time, lease_time))
            for listed in ia.addresses:
                if listed != addr:  # not (or no longer) for this client: stop using it
                    inner += option(OPT_IAADDR, _IAADDR.pack(listed, 0, 0))
            body += option(OPT_IA_NA, _IA_NA.pack(ia.iaid, lease_time // 2, lease_time * 4 // 5) + inner)
        for code, head in others:
            if code == OPT_IA_PD:
                body += option(OPT_IA_PD, head + bytes(8) + status(STATUS_NO_PREFIX_AVAIL, "no prefixes"))
            else:
                body += option(OPT_IA_TA, head + status(STATUS_NO_ADDRS_AVAIL, "no temporary addresses"))
        reply = self._header(mtype, xid, client_id)
        if mtype == MSG_ADVERTISE:
            reply += option(OPT_PREFERENCE, b"\xff")
            if not assigned:  # RFC 8415 18.3.9: only the status, the client goes on soliciting
                return reply + status(STATUS_NO_ADDRS_AVAIL, "no addresses available") + self._dns_options
        elif not assigned and mtype == MSG_REPLY and not ias and not others:
            body = status(STATUS_NO_ADDRS_AVAIL, "no IA_NA in the request")
        if rapid and not assigned:
            return None
        return reply + body + self._dns_options

    def _confirm(self, xid: bytes, client_id: bytes, ias: list[IaRequest]) -> bytes | None:
        addresses = [addr for ia in ias for addr in ia.addresses]
        if not addresses:
            return None  # RFC 8415 18.3.3: no Reply to a Confirm without addresses
        if all(self.config.contains6(addr) for addr in addresses):
            result = status(STATUS_SUCCESS, "all addresses on link")
        else:
            result = status(STATUS_NOT_ON_LINK, "not on this link")
        return self._header(MSG_REPLY, xid, client_id) + result

    def _release(self, mtype: int, xid: bytes, client_id: bytes, ias: list[IaRequest], now: float) -> bytes:
        """Release or Decline: each IA's addresses that the client holds are freed (or declined)."""
        body = b""
        for ia in ias:
            lease = self.by_key.get((client_id, ia.iaid))
            if lease is None or lease.addr not in ia.addresses:
                body += option(OPT_IA_NA, _IA_NA.pack(ia.iaid, 0, 0) + status(STATUS_NO_BINDING, "no binding"))
                continue
            if mtype == MSG_DECLINE:
                self.declined[lease.addr] = now + DECLINE_HOLD
                self._forget(lease)
            else:
                lease.expires = now  # kept for this client unless someone else needs it
                lease.bound = False
        done = "released" if mtype == MSG_RELEASE else "declined"
        return self._header(MSG_REPLY, xid, client_id) + status(STATUS_SUCCESS, done) + body

    def _usable(self, addr: bytes, now: float) -> bool:
        cfg = self.config
        if addr == cfg.host_ip6 or addr == cfg.dns_ip6 or addr in self.reserved:
            return False
        until = self.declined.get(addr)
        if until is not None:
            if until > now:
                return False
            del self.declined[addr]
        return True

    def in_pool(self, addr: bytes) -> bool:
        if len(addr) != 16 or addr[:8] != self.config.prefix6:
            return False
        index = int.from_bytes(addr[8:], "big") - POOL_FIRST
        return 0 <= index < self.pool_size

    def pool_address(self, index: int) -> bytes:
        return self.config.prefix6 + (POOL_FIRST + index).to_bytes(8, "big")

    def _candidate(self, duid: bytes, iaid: int, hints: list[bytes], now: float) -> bytes | None:
        """The address for the client's IA: the one it has, else a free one it asks for, else the
        first free one from its hash, else the longest-expired lease's; None when the pool is full."""
        lease = self.by_key.get((duid, iaid))
        if lease is not None and self._usable(lease.addr, now):
            return lease.addr
        for hint in hints:
            if self.in_pool(hint) and self._usable(hint, now):
                owner = self.by_addr.get(hint)
                if owner is None or owner.expires < now:
                    return hint
        size = self.pool_size
        start = zlib.crc32(duid + iaid.to_bytes(4, "big")) % size
        oldest: Lease6 | None = None
        for step in range(size):
            addr = self.pool_address((start + step) % size)
            if not self._usable(addr, now):
                continue
            owner = self.by_addr.get(addr)
            if owner is None:
                return addr
            if owner.expires < now and (oldest is None or owner.expires < oldest.expires):
                oldest = owner
        if oldest is not None:
            return oldest.addr
        return None

    def _forget(self, lease: Lease6) -> None:
        key = (lease.duid, lease.iaid)
        if self.by_key.get(key) is lease:
            del self.by_key[key]
        if self.by_addr.get(lease.addr) is lease:
            del self.by_addr[lease.addr]

    def _place(self, duid: bytes, iaid: int, mac: bytes, addr: bytes, expires: float) -> Lease6:
        """The client's lease, now on addr (whoever held addr before loses it)."""
        lease = self.by_key.get((duid, iaid))
        if lease is not None and lease.addr != addr:
            self._forget(lease)
            lease = None
        if lease is None:
            other = self.by_addr.get(addr)
            if other is not None:
                self._forget(other)
            lease = Lease6(duid, iaid, mac, addr, expires)
            self.by_key[(duid, iaid)] = lease
            self.by_addr[addr] = lease
        lease.mac = mac
        return lease

    def _hold(self, duid: bytes, iaid: int, mac: bytes, addr: bytes, now: float) -> None:
        """An Advertised address: held OFFER_HOLD seconds (a bound lease keeps its expiry)."""
        lease = self.by_key.get((duid, iaid))
        if lease is not None and lease.addr == addr and lease.bound and lease.expires > now:
            return
        lease = self._place(duid, iaid, mac, addr, now + OFFER_HOLD)
        lease.expires = now + OFFER_HOLD
        lease.bound = False

    def _bind(self, duid: bytes, iaid: int, mac: bytes, addr: bytes, hostname: str, now: float) -> None:
        old = self.by_key.get((duid, iaid))
        was_bound = old is not None and old.addr == addr and old.bound and old.expires > now
        lease = self._place(duid, iaid, mac, addr, now)
        lease.expires = now + self.config.lease_time
        lease.bound = True
        if hostname:
            lease.hostname = hostname
        if not was_bound:
            self.events.append(
                (
                    "GUEST_LEASE6",
                    {
                        "mac": mac_str(mac),
                        "address": ip_str(addr),
                        "hostname": lease.hostname,
                        "lease-time": self.config.lease_time,
                        "duid": duid.hex(),
                        "iaid": iaid,
                    },
                )
            )

    def bound_mac(self, addr: bytes, now: float) -> bytes | None:
        """The MAC holding a live bound lease on addr."""
        lease = self.by_addr.get(addr)
        if lease is None or not lease.bound or lease.expires <= now:
            return None
        return lease.mac

    def guest_addresses(self, mac: bytes, now: float) -> list[bytes]:
        """The addresses of mac's live bound leases, oldest lease first."""
        return [x.addr for x in self.by_key.values() if x.mac == mac and x.bound and x.expires > now]

    def guest_address(self, mac: bytes, now: float) -> bytes | None:
        """One address bound to mac (its oldest live lease), if any."""
        for lease in self.by_key.values():
            if lease.mac == mac and lease.bound and lease.expires > now:
                return lease.addr
        return None

    def first_bound(self, now: float, present: dict[bytes, int]) -> Lease6 | None:
        """The earliest-bound live lease of a guest still connected (its MAC in present, the
        switch's table), as DhcpServer.first_bound."""
        for lease in self.by_key.values():
            if lease.bound and lease.expires > now and lease.mac in present:
                return lease
        return None

    def leases(self, now: float) -> list[dict[str, object]]:
        """The bound live leases, for query-leases."""
        out: list[dict[str, object]] = []
        for lease in self.by_key.values():
            if lease.bound and lease.expires > now:
                out.append(
                    {
                        "mac": mac_str(lease.mac),
                        "address": ip_str(lease.addr),
                        "duid": lease.duid.hex(),
                        "iaid": lease.iaid,
                        "expires-in": int(lease.expires - now),
                        "hostname": lease.hostname,
                    }
                )
        return out

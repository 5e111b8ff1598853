"""Neighbor Discovery (RFC 4861) for the virtual router, with RDNSS and DNSSL (RFC 8106).

The gateway is an IPv6 router at `config.router_ll` (fe80::2) and the owner of the virtual
addresses `config.host_ip6` and `config.dns_ip6` (plus `extra_targets`, which the Stack fills
with the gateway services' IPv6 addresses). The Stack hands `received()` every ICMPv6 type
133..136 message a guest sends, its checksum already verified, after its anti-spoofing checks.

* Router Solicitation: answered at once with a Router Advertisement, unicast to the soliciting
  guest's MAC (to its address, or to ff02::1 when it has none yet).
* Router Advertisement: hop limit 64, M = `config.dhcpv6`, O = 1 (DNS from stateless DHCPv6 as
  well), router lifetime ROUTER_LIFETIME, reachable time and retransmit timer unspecified (0);
  options source link-layer address, MTU (omitted when `config.mtu` is below IPv6's 1280),
  the /64 prefix with L and A (SLAAC), RDNSS with `config.dns_ip6` and DNSSL with
  `config.domain` then `config.search` (omitted when there are none; names that do not fit
  MAX_DNSSL_BYTES are left out). Built once; only the checksum is computed per send.
  Unsolicited ones go to ff02::1 once a guest spoke IPv6 (`activate`): the first at once, INITIAL_RAS in all
  INITIAL_RA_INTERVAL apart (RFC 4861 6.2.4), then one every RA_INTERVAL.
* Neighbor Solicitation for one of our addresses: a Neighbor Advertisement with Router and
  Override set and our MAC, unicast to the asker, Solicited set; for a duplicate address
  detection probe (source ::) to ff02::1 with Solicited clear, so that the guest sees the
  address is taken. Solicitations for other targets are ignored: they are for other guests,
  whom the switch floods them to.
* Neighbor Advertisement: a guest's answer; its target (unless it is one of ours) is
  remembered at the guest's MAC (`Output.remember_guest`), as ARP replies are for IPv4.
  Guest Router Advertisements are dropped: the gateway is the only router.
* `solicit(target, now)`: our own Neighbor Solicitation for a guest address whose MAC the Stack
  needs (a port forward toward a guest that has not spoken yet), to the target's
  solicited-node multicast group; at most one per target per SOLICIT_INTERVAL, with a table of
  at most MAX_SOLICIT_TARGETS targets.

Validation as RFC 4861 6.1.1 and 7.1.1-2: hop limit 255, code 0, the minimum length of the
type, every option at least 8 bytes and inside the message, no source link-layer option from
the unspecified address, a DAD probe sent to a solicited-node group, no multicast target.
A failure is dropped (`Output.drop`) with reason "ndp-" and what failed.
Counters: ndp-ra-sent, ndp-na-sent, ndp-ns-sent, ndp-ns-rate-limited.
"""

import struct
from typing import Final, final

from qemu_vpnnet.core.dhcp import encode_search_list
from qemu_vpnnet.core.output import Output
from qemu_vpnnet.core.packets import IPPROTO_ICMPV6, icmpv6_message

INF: Final = float("inf")
ND_ROUTER_SOLICIT: Final = 133
ND_ROUTER_ADVERT: Final = 134
ND_NEIGHBOR_SOLICIT: Final = 135
ND_NEIGHBOR_ADVERT: Final = 136

OPT_SOURCE_LL: Final = 1
OPT_TARGET_LL: Final = 2
OPT_PREFIX: Final = 3
OPT_MTU: Final = 5
OPT_RDNSS: Final = 25
OPT_DNSSL: Final = 31

NA_ROUTER: Final = 0x80000000
NA_SOLICITED: Final = 0x40000000
NA_OVERRIDE: Final = 0x20000000
RA_MANAGED: Final = 0x80
RA_OTHER: Final = 0x40
PREFIX_ON_LINK: Final = 0x80
PREFIX_AUTONOMOUS: Final = 0x40

ND_HOP_LIMIT: Final = 255  # sent and required (RFC 4861: proves the packet was not routed)
CUR_HOP_LIMIT: Final = 64  # the hop limit the RA suggests to guests
# seconds. MaxRtrAdvInterval is 200 s (RFC 4861 allows 4..1800, default 600): a guest that missed
# the solicited RA hears one within that; the router lifetime is 9 of them, and the DNS options'
# lifetime at least 3 x MaxRtrAdvInterval as RFC 8106 5.1 asks
RA_INTERVAL: Final = 200.0
INITIAL_RAS: Final = 3  # MAX_INITIAL_RTR_ADVERTISEMENTS
INITIAL_RA_INTERVAL: Final = 16.0  # MAX_INITIAL_RTR_ADVERT_INTERVAL
ROUTER_LIFETIME: Final = 1800
PREFIX_VALID: Final = 86400
PREFIX_PREFERRED: Final = 14400
DNS_LIFETIME: Final = 3600
IPV6_MIN_MTU: Final = 1280
# the DNSSL option's names: the whole RA then stays below 1280 bytes (IPv6's minimum MTU)
MAX_DNSSL_BYTES: Final = 1024
SOLICIT_INTERVAL: Final = 1.0  # seconds between two of our solicitations for one target
MAX_SOLICIT_TARGETS: Final = 256

ALL_NODES: Final = b"\xff\x02" + bytes(13) + b"\x01"
ALL_NODES_MAC: Final = b"\x33\x33\x00\x00\x00\x01"
UNSPECIFIED: Final = bytes(16)
SOLICITED_NODE_PREFIX: Final = b"\xff\x02" + bytes(9) + b"\x01\xff"  # ff02::1:ff00:0/104

_RA_HEADER: Final = struct.Struct("!BBHII")
_NA_BODY: Final = struct.Struct("!I16s")
_PREFIX: Final = struct.Struct("!BBBBIII16s")


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast address of addr (ff02::1:ffXX:XXXX, RFC 4291 2.7.1)."""
    return SOLICITED_NODE_PREFIX + addr[13:16]


def multicast_mac(addr: bytes) -> bytes:
    """The Ethernet address of an IPv6 multicast group (33:33 and its last 4 bytes, RFC 2464 7)."""
    return b"\x33\x33" + addr[12:16]


def link_layer_option(kind: int, mac: bytes) -> bytes:
    """A source (1) or target (2) link-layer address option for an Ethernet MAC."""
    return bytes((kind, 1)) + mac


def dnssl_option(names: list[str], lifetime: int) -> bytes:
    """The DNSSL option (RFC 8106 5.2) for names, b"" when there are none; names that do not
    fit MAX_DNSSL_BYTES (or that are not valid DNS names) are left out."""
    encoded = b""
    for name in names:
        try:
            one = encode_search_list([name])
        except (ValueError, UnicodeError):
            continue
        if len(one) > 1 and len(encoded) + len(one) <= MAX_DNSSL_BYTES:
            encoded += one
    if not encoded:
        return b""
    body = struct.pack("!HI", 0, lifetime) + encoded
    body += bytes(-(len(body) + 2) % 8)
    return bytes((OPT_DNSSL, (len(body) + 2) // 8)) + body


def parse_options(message: bytes, offset: int) -> dict[int, bytes] | None:
    """The options of an ND message from offset: type -> body of its first occurrence; None when
    an option has length 0 or runs past the end (RFC 4861 4.6: the message is invalid)."""
    options: dict[int, bytes] = {}
    end = len(message)
    while offset < end:
        if offset + 2 > end:
            return None
        length = message[offset + 1] * 8
        if length == 0 or offset + length > end:
            return None
        kind = message[offset]
        if kind not in options:
            options[kind] = message[offset + 2 : offset + length]
        offset += length
    return options


@final
class Ndp:
    """The router side of Neighbor Discovery; frames go out through `out`."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.config = out.config
        cfg = out.config
        # addresses we answer solicitations for besides host_ip6, dns_ip6 and router_ll (the Stack's)
        self.extra_targets: set[bytes] = set()
        self.active = False  # unsolicited RAs start with the first IPv6 frame a guest sends (activate)
        self.next_ra = INF  # deadline of the next unsolicited RA
        self.initial_left = INITIAL_RAS
        self.solicited: dict[bytes, float] = {}  # target -> when we last solicited it, oldest first
        self.ra_body = self._ra_body()
        self.slla = link_layer_option(OPT_SOURCE_LL, cfg.gateway_mac)
        self.tlla = link_layer_option(OPT_TARGET_LL, cfg.gateway_mac)

    def _ra_body(self) -> bytes:
        """The Router Advertisement after its type, code and checksum."""
        cfg = self.config
        flags = RA_OTHER | (RA_MANAGED if cfg.dhcpv6 else 0)
        body = _RA_HEADER.pack(CUR_HOP_LIMIT, flags, ROUTER_LIFETIME, 0, 0)
        body += link_layer_option(OPT_SOURCE_LL, cfg.gateway_mac)
        if cfg.mtu >= IPV6_MIN_MTU:
            body += struct.pack("!BBHI", OPT_MTU, 1, 0, cfg.mtu)
        body += _PREFIX.pack(
            OPT_PREFIX,
            4,
            cfg.prefix6_len,
            PREFIX_ON_LINK | PREFIX_AUTONOMOUS,
            PREFIX_VALID,
            PREFIX_PREFERRED,
            0,
            cfg.prefix6 + bytes(8),
        )
        body += struct.pack("!BBHI16s", OPT_RDNSS, 3, 0, DNS_LIFETIME, cfg.dns_ip6)
        names: list[str] = []
        for name in [cfg.domain, *cfg.search]:
            name = name.strip(".").lower()
            if name and name not in names:
                names.append(name)
        body += dnssl_option(names, DNS_LIFETIME)
        return body

    def is_ours(self, addr: bytes) -> bool:
        cfg = self.config
        return addr == cfg.router_ll or addr == cfg.host_ip6 or addr == cfg.dns_ip6 or addr in self.extra_targets

    def received(self, src_mac: bytes, src: bytes, dst: bytes, hop_limit: int, message: bytes, now: float) -> None:
        """One ND message (ICMPv6 type 133..136, checksum verified) from a guest at src_mac."""
        out = self.out
        if hop_limit != ND_HOP_LIMIT:
            out.drop("ndp-bad-hop-limit")
            return
        if len(message) < 8:
            out.drop("ndp-truncated")
            return
        if message[1] != 0:
            out.drop("ndp-bad-code")
            return
        if src[0] == 0xFF:
            out.drop("ndp-multicast-source")
            return
        kind = message[0]
        if kind == ND_ROUTER_SOLICIT:
            self._router_solicit(src_mac, src, message)
        elif kind == ND_NEIGHBOR_SOLICIT:
            self._neighbor_solicit(src_mac, src, dst, message)
        elif kind == ND_NEIGHBOR_ADVERT:
            self._neighbor_advert(src_mac, dst, message)
        elif kind == ND_ROUTER_ADVERT:
            out.drop("ndp-guest-router-advertisement")
        else:
            out.drop("ndp-unknown-type")

    def _router_solicit(self, src_mac: bytes, src: bytes, message: bytes) -> None:
        options = parse_options(message, 8)
        if options is None:
            self.out.drop("ndp-bad-option")
            return
        if src == UNSPECIFIED:
            if OPT_SOURCE_LL in options:
                self.out.drop("ndp-unspecified-with-lladdr")
                return
            self.send_ra(src_mac, ALL_NODES)
        else:
            self.send_ra(src_mac, src)

    def _neighbor_solicit(self, src_mac: bytes, src: bytes, dst: bytes, message: bytes) -> None:
        out = self.out
        if len(message) < 24:
            out.drop("ndp-truncated")
            return
        target = message[8:24]
        if target[0] == 0xFF:
            out.drop("ndp-multicast-target")
            return
        options = parse_options(message, 24)
        if options is None:
            out.drop("ndp-bad-option")
            return
        dad = src == UNSPECIFIED
        if dad:
            if dst[:13] != SOLICITED_NODE_PREFIX:
                out.drop("ndp-bad-dad-destination")
                return
            if OPT_SOURCE_LL in options:
                out.drop("ndp-unspecified-with-lladdr")
                return
        if not self.is_ours(target):
            return  # another guest's address: it answers for itself
        if dad:  # someone probes for our address: defend it (RFC 4862 5.4.3)
            self.send_na(ALL_NODES_MAC, ALL_NODES, target, NA_ROUTER | NA_OVERRIDE)
        else:
            self.send_na(src_mac, src, target, NA_ROUTER | NA_SOLICITED | NA_OVERRIDE)

    def _neighbor_advert(self, src_mac: bytes, dst: bytes, message: bytes) -> None:
        out = self.out
        if len(message) < 24:
            out.drop("ndp-truncated")
            return
        flags = message[4] << 24
        target = message[8:24]
        if target[0] == 0xFF:
            out.drop("ndp-multicast-target")
            return
        if dst[0] == 0xFF and flags & NA_SOLICITED:
            out.drop("ndp-solicited-to-multicast")
            return
        options = parse_options(message, 24)
        if options is None:
            out.drop("ndp-bad-option")
            return
        if self.is_ours(target):
            out.drop("ndp-advert-for-our-address")
            return
        lladdr = options.get(OPT_TARGET_LL)
        if lladdr is not None and lladdr[:6] != src_mac:
            out.drop("ndp-advert-lladdr-mismatch")  # a proxy or a spoof: not ours to learn
            return
        if target != UNSPECIFIED:
            out.remember_guest(target, src_mac)

    def send_ra(self, dst_mac: bytes, dst: bytes) -> None:
        """Our Router Advertisement to dst (a guest's address or ff02::1) at dst_mac."""
        src = self.config.router_ll
        message = icmpv6_message(src, dst, ND_ROUTER_ADVERT, 0, self.ra_body)
        self.out.send_ip6(dst_mac, src, dst, IPPROTO_ICMPV6, message, ND_HOP_LIMIT)
        self.out.counters.add("ndp-ra-sent")

    def send_na(self, dst_mac: bytes, dst: bytes, target: bytes, flags: int) -> None:
        """A Neighbor Advertisement for our address target (which is also its source address)."""
        message = icmpv6_message(target, dst, ND_NEIGHBOR_ADVERT, 0, _NA_BODY.pack(flags, target) + self.tlla)
        self.out.send_ip6(dst_mac, target, dst, IPPROTO_ICMPV6, message, ND_HOP_LIMIT)
        self.out.counters.add("ndp-na-sent")

    def solicit(self, target: bytes, now: float) -> None:
        """Ask who has target (a guest's unicast address): a Neighbor Solicitation to its
        solicited-node group, at most one per target per SOLICIT_INTERVAL."""
        if len(target) != 16 or target[0] == 0xFF or target == UNSPECIFIED or self.is_ours(target):
            return
        solicited = self.solicited
        last = solicited.get(target)
        if last is not None:
            if now - last < SOLICIT_INTERVAL:
                self.out.counters.add("ndp-ns-rate-limited")
                return
            del solicited[target]  # re-inserted at the young end
        elif len(solicited) >= MAX_SOLICIT_TARGETS:
            for old in [t for t, when in solicited.items() if now - when >= SOLICIT_INTERVAL]:
                del solicited[old]
            if len(solicited) >= MAX_SOLICIT_TARGETS:
                del solicited[next(iter(solicited))]
        solicited[target] = now
        src = self.config.router_ll
        group = solicited_node(target)
        message = icmpv6_message(src, group, ND_NEIGHBOR_SOLICIT, 0, bytes(4) + target + self.slla)
        self.out.send_ip6(multicast_mac(group), src, group, IPPROTO_ICMPV6, message, ND_HOP_LIMIT)
        self.out.counters.add("ndp-ns-sent")

    def activate(self, now: float) -> None:
        """A guest speaks IPv6: unsolicited RAs from now on, the first at the next timer() call
        (until then there is nobody to keep the router and prefix lifetimes fresh for)."""
        if not self.active and self.config.ipv6:
            self.active = True
            self.next_ra = now

    def timer(self, now: float) -> None:
        """Send the unsolicited Router Advertisement when it is due."""
        if not self.config.ipv6 or now < self.next_ra:
            return
        self.send_ra(ALL_NODES_MAC, ALL_NODES)
        if self.initial_left > 1:
            self.initial_left -= 1
            self.next_ra = now + INITIAL_RA_INTERVAL
        else:
            self.initial_left = 0
            self.next_ra = now + RA_INTERVAL

    def next_deadline(self) -> float:
        """When timer() has something to do; inf when never (IPv6 off)."""
        if not self.config.ipv6:
            return float("inf")
        return self.next_ra

"""IPv6 frames from guests: who may send what, extension headers, fragments, then the engines.

Two entry points, both called by the Stack for every IPv6 frame (when IPv6 is on):

* `blocked(src_mac, frame, now)`, before the frame is learned or switched (so also for frames
  between guests). The source address must not be one that another guest present on the
  switch claimed (core/guard.py `claim6`), nor one of the gateway's: the first use of an
  address of the prefix or a link-local one claims it. A guest may not act as a router: Router
  Advertisements, Redirects and DHCPv6 server messages (UDP source port 547) from guests are
  dropped, and so are Neighbor Advertisements for an address another guest (or the gateway)
  owns and Neighbor Discovery messages whose link-layer address option is not the sender's MAC.
  One dict lookup and a few byte compares for an ordinary frame; ND messages behind extension
  headers are found by walking the chain (bounded).
* `received(src_mac, frame, now)`, for frames to the gateway (its MAC, or multicast). The
  payload length is checked against the frame; the extension headers (hop-by-hop, routing,
  destination options, fragment) are walked, at most MAX_EXT_HEADERS, each inside the packet:
  a jumbogram, a routing header with segments left, ESP/AH and anything unknown are dropped
  and counted. Fragments are reassembled (core/fragments.py, the same bounds as IPv4); TCP is
  never fragmented by a sane guest, and non-final fragments shorter than MIN_FRAGMENT (what a
  1280-byte link carries) are dropped, so a train of tiny fragments cannot cost much. Then
  ICMPv6 (echo to the virtual addresses answered here, to the outside through the ping proxy;
  ND to core/ndp.py), UDP (DHCPv6 to core/dhcpv6.py, DNS on the DNS address, else the UDP
  NAT) and TCP (the splice engine) -- the same engines as IPv4.

Sources: only addresses of the prefix may reach the outside; link-local ones (and :: for
duplicate address detection) only the gateway's own services.
"""

from typing import TYPE_CHECKING, Final, final

from qemu_vpnnet.core.dhcpv6 import DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT, Dhcpv6Error
from qemu_vpnnet.core.icmp import ICMP6_ECHO_REPLY, ICMP6_ECHO_REQUEST, icmp6_valid
from qemu_vpnnet.core.packets import (
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_ESP,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_NONE,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
    UDP_HLEN,
    icmpv6_message,
    unpack_udp,
)

if TYPE_CHECKING:
    from qemu_vpnnet.core.stack import Stack

IP6_START: Final = 54  # Ethernet 14 + IPv6 40: where the first header after IPv6's starts
MAX_EXT_HEADERS: Final = 8
MIN_FRAGMENT: Final = 1232  # 1280 - 40 - 8: a non-final fragment shorter than this is no real guest's
ALL_DHCP_AGENTS: Final = bytes.fromhex("ff020000000000000000000000010002")
UNSPECIFIED: Final = bytes(16)
OPT_JUMBO: Final = 0xC2
ND_SOURCE_LL: Final = 1
ND_TARGET_LL: Final = 2
MLD_TYPES: Final = (130, 131, 132, 143)
EXTENSIONS: Final = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT)


def is_link_local(addr: bytes) -> bool:
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def skip_extensions(frame: bytes, nh: int, start: int, end: int) -> tuple[int, int]:
    """(upper-layer protocol, its offset) behind the extension headers; (-1, 0) when the chain is
    malformed or too long, or the packet is a non-first fragment (no upper header to see)."""
    for _ in range(MAX_EXT_HEADERS):
        if nh != IPPROTO_HOPOPTS and nh != IPPROTO_ROUTING and nh != IPPROTO_DSTOPTS and nh != IPPROTO_FRAGMENT:
            return nh, start
        if start + 8 > end:
            return -1, 0
        if nh == IPPROTO_FRAGMENT:
            if ((frame[start + 2] << 8) | frame[start + 3]) & 0xFFF8:
                return -1, 0
            length = 8
        else:
            length = (frame[start + 1] + 1) * 8
        nh = frame[start]
        start += length
        if start > end:
            return -1, 0
    return -1, 0


@final
class Ipv6Input:
    def __init__(self, stack: "Stack") -> None:
        self.stack = stack
        self.out = stack.out
        self.config = stack.config
        self.counters = stack.counters
        self.guard = stack.guard
        self.owners = stack.guard.owners
        cfg = stack.config
        self.prefix6 = cfg.prefix6
        self.local: set[bytes] = {cfg.host_ip6, cfg.dns_ip6, cfg.router_ll}  # echo answered here

    # ---- before switching --------------------------------------------------------------
    def blocked(self, src_mac: bytes, frame: bytes, now: float) -> bool:
        """Whether this IPv6 frame from src_mac must go nowhere (counted as a drop)."""
        if len(frame) < IP6_START + 4:
            return False  # received() drops it as short; no other guest sees it parsed
        src = frame[22:38]
        owner = self.owners.get(src)
        if owner is None:
            if src[:8] == self.prefix6 or is_link_local(src):
                self.guard.claim6(src, src_mac, now)
        elif owner != src_mac:
            reason = self.spoof_reason(src, owner, src_mac, now)
            if reason:
                self.out.drop("ipv6-spoof-" + reason)
                return True
            self.guard.claim6(src, src_mac, now)
        nh = frame[20]
        if nh == IPPROTO_TCP:
            return False
        end = len(frame)
        start = IP6_START
        if nh != IPPROTO_UDP and nh != IPPROTO_ICMPV6:
            if nh not in EXTENSIONS:
                return False
            nh, start = skip_extensions(frame, nh, start, end)
            if nh < 0 or start + 4 > end:
                return False
        if nh == IPPROTO_UDP:
            if frame[start] == 0x02 and frame[start + 1] == 0x23:  # source port 547: a DHCPv6 server
                self.out.drop("dhcpv6-spoof-server")
                return True
            return False
        if nh != IPPROTO_ICMPV6:
            return False
        kind = frame[start]
        if kind == 134:
            self.out.drop("ndp-guest-router-advertisement")
            return True
        if kind == 137:
            self.out.drop("ndp-guest-redirect")
            return True
        if kind == 136 or kind == 135 or kind == 133:
            reason = self.nd_spoofed(src_mac, frame, start, end, kind, now)
            if reason:
                self.out.drop("ndp-spoof-" + reason)
                return True
        return False

    def spoof_reason(self, addr: bytes, owner: bytes, mac: bytes, now: float) -> str:
        """ "" when mac may take addr from its owner (gone from the switch, or addr is mac's DHCPv6
        lease); else why not: gateway (one of the backend's addresses) or address."""
        stack = self.stack
        if owner == self.config.gateway_mac:
            return "gateway"
        if owner not in stack.switch.mac_table:
            return ""
        if stack.dhcpv6.bound_mac(addr, now) == mac:
            return ""
        return "address"

    def nd_spoofed(self, src_mac: bytes, frame: bytes, start: int, end: int, kind: int, now: float) -> str:
        """Why a Neighbor Discovery message from src_mac is a lie, or "": an advertisement for an
        address somebody else owns, or a link-layer address option that is not the sender's."""
        if kind == 136:
            if start + 24 > end:
                return ""
            target = frame[start + 8 : start + 24]
            owner = self.owners.get(target)
            if owner is not None and owner != src_mac and self.spoof_reason(target, owner, src_mac, now):
                return "target"
            at = start + 24
            want = ND_TARGET_LL
        else:
            at = start + (24 if kind == 135 else 8)
            want = ND_SOURCE_LL
        for _ in range(16):  # options: type, length in 8-byte units
            if at + 8 > end:
                break
            length = frame[at + 1] * 8
            if length == 0:
                break
            if frame[at] == want and length == 8 and frame[at + 2 : at + 8] != src_mac:
                return "lladdr"
            at += length
        return ""

    # ---- to the gateway ----------------------------------------------------------------
    def received(self, src_mac: bytes, frame: bytes, now: float) -> None:
        out = self.out
        if len(frame) < IP6_START:
            out.drop("short-ipv6")
            return
        if frame[14] >> 4 != 6:
            out.drop("bad-ipv6-version")
            return
        plen = (frame[18] << 8) | frame[19]
        nh = frame[20]
        if plen == 0:
            out.drop("ipv6-jumbogram" if nh == IPPROTO_HOPOPTS else "bad-ipv6-length")
            return
        end = IP6_START + plen
        if end > len(frame):
            out.drop("bad-ipv6-length")
            return
        src = frame[22:38]
        dst = frame[38:54]
        start = IP6_START
        if not self.stack.ndp.active:
            self.stack.ndp.activate(now)
        if nh != IPPROTO_TCP and nh != IPPROTO_UDP and nh != IPPROTO_ICMPV6:
            walked = self.walk(src_mac, frame, nh, start, end, now)
            if walked is None:
                return
            frame, nh, start, end = walked
        if src[:8] == self.prefix6:
            self.out.remember_guest(src, src_mac)
            if nh == IPPROTO_TCP:
                if dst[0] == 0xFF:
                    out.drop("ipv6-tcp-multicast")
                    return
                self.stack.tcp.segment_received(src_mac, src, dst, frame, start, end, now)
                return
        elif src[0] == 0xFF or (src != UNSPECIFIED and not is_link_local(src)):
            out.drop("ipv6-bad-source")  # a multicast source, or an address of no network here
            return
        elif nh == IPPROTO_TCP:
            out.drop("ipv6-bad-source")  # link-local or unspecified: not to the outside
            return
        elif is_link_local(src):
            self.out.remember_guest(src, src_mac)
        if nh == IPPROTO_ICMPV6:
            self.icmp6_received(src_mac, src, dst, frame[21], frame[start:end], now)
        elif nh == IPPROTO_UDP:
            self.udp6_received(src_mac, src, dst, frame, start, end, now)
        else:
            out.drop("ipv6-protocol")

    def walk(
        self, src_mac: bytes, frame: bytes, nh: int, start: int, end: int, now: float
    ) -> tuple[bytes, int, int, int] | None:
        """Past the extension headers: (frame, upper-layer protocol, its start, end), the frame
        rebuilt around a reassembled packet; None when the packet was dropped or is an incomplete
        fragment."""
        out = self.out
        reassembled = False
        for count in range(MAX_EXT_HEADERS + 1):
            if nh == IPPROTO_TCP or nh == IPPROTO_UDP or nh == IPPROTO_ICMPV6:
                return frame, nh, start, end
            if count == MAX_EXT_HEADERS:
                break
            if nh == IPPROTO_NONE:
                self.counters.add("rx-ipv6-no-next-header")
                return None
            if nh == IPPROTO_ESP or nh == IPPROTO_AH:
                out.drop("ipv6-ipsec")
                return None
            if nh != IPPROTO_HOPOPTS and nh != IPPROTO_ROUTING and nh != IPPROTO_DSTOPTS and nh != IPPROTO_FRAGMENT:
                out.drop("ipv6-protocol")
                return None
            if start + 8 > end:
                out.drop("bad-ipv6-extension")
                return None
            if nh == IPPROTO_FRAGMENT:
                if reassembled:
                    out.drop("bad-ipv6-extension")  # a fragment inside a fragment
                    return None
                field = (frame[start + 2] << 8) | frame[start + 3]
                offset = field & 0xFFF8
                more = field & 1
                upper = frame[start]
                data_start = start + 8
                if not offset and not more:  # an atomic fragment (RFC 6946): the packet is whole
                    nh = upper
                    start = data_start
                    continue
                if upper == IPPROTO_TCP:
                    out.drop("ip-fragment-tcp")
                    return None
                if more and end - data_start < MIN_FRAGMENT:
                    out.drop("ipv6-tiny-fragment")
                    return None
                if not offset and not self.upper_header_complete(frame, upper, data_start, end):
                    out.drop("ipv6-first-fragment-short")  # RFC 7112: the whole header chain comes first
                    return None
                key = frame[22:54] + frame[start + 4 : start + 8] + b"\x06"
                self.counters.add("rx-ip-fragments")
                whole = self.stack.fragments.add(key, b"\x06", offset, bool(more), frame[data_start:end], now, True)
                if whole is None:
                    return None
                self.counters.add("rx-ip-reassembled")
                frame = frame[:IP6_START] + whole
                nh = upper
                start = IP6_START
                end = len(frame)
                reassembled = True
                continue
            length = (frame[start + 1] + 1) * 8
            if start + length > end:
                out.drop("bad-ipv6-extension")
                return None
            if nh == IPPROTO_HOPOPTS:
                if start != IP6_START:
                    out.drop("bad-ipv6-extension")  # hop-by-hop options only right after the header
                    return None
                if self.has_jumbo_option(frame, start + 2, start + length):
                    out.drop("ipv6-jumbogram")
                    return None
            elif nh == IPPROTO_ROUTING and frame[start + 3] != 0:
                out.drop("ipv6-routing-header")  # segments left: we would be a hop of a source route
                return None
            nh = frame[start]
            start += length
        out.drop("ipv6-extension-chain")
        return None

    @staticmethod
    def upper_header_complete(frame: bytes, upper: int, start: int, end: int) -> bool:
        """Whether a first fragment holds the rest of the header chain and the upper-layer
        header (RFC 7112): UDP's 8 bytes, ICMPv6's 4."""
        upper, start = skip_extensions(frame, upper, start, end)
        if upper == IPPROTO_UDP:
            return end - start >= UDP_HLEN
        if upper == IPPROTO_ICMPV6:
            return end - start >= 4
        return upper >= 0

    @staticmethod
    def has_jumbo_option(frame: bytes, at: int, end: int) -> bool:
        while at < end:
            kind = frame[at]
            if kind == 0:  # Pad1
                at += 1
                continue
            if at + 2 > end:
                return False
            if kind == OPT_JUMBO:
                return True
            at += 2 + frame[at + 1]
        return False

    def icmp6_received(
        self, src_mac: bytes, src: bytes, dst: bytes, hop_limit: int, message: bytes, now: float
    ) -> None:
        out = self.out
        if len(message) < 4:
            out.drop("short-icmpv6")
            return
        if not icmp6_valid(src, dst, message):
            out.drop("bad-icmpv6-checksum")
            return
        kind = message[0]
        if 133 <= kind <= 136:
            self.stack.ndp.received(src_mac, src, dst, hop_limit, message, now)
            return
        if kind == ICMP6_ECHO_REQUEST:
            if len(message) < 8:
                out.drop("short-icmpv6")
                return
            if dst in self.local:
                self.counters.add("icmp-echo-local")
                reply = icmpv6_message(dst, src, ICMP6_ECHO_REPLY, 0, message[4:])
                out.send_ip(src_mac, dst, src, IPPROTO_ICMPV6, reply)
                return
            if dst[0] == 0xFF:
                self.counters.add("rx-icmpv6-multicast-echo")
                return
            if src[:8] != self.prefix6:
                out.drop("ipv6-bad-source")
                return
            self.stack.icmp.from_guest(src_mac, src, dst, message, now)
            return
        if kind in MLD_TYPES:
            self.counters.add("rx-mld")  # multicast listener reports: nothing to route here
            return
        self.counters.add("rx-icmpv6-ignored")

    def udp6_received(
        self, src_mac: bytes, src: bytes, dst: bytes, frame: bytes, start: int, end: int, now: float
    ) -> None:
        out = self.out
        if end - start < UDP_HLEN:
            out.drop("short-udp")
            return
        sport, dport, length, csum = unpack_udp(frame, start)
        if length < UDP_HLEN or length > end - start:
            out.drop("bad-udp-length")
            return
        if csum == 0:
            out.drop("udp6-zero-checksum")  # mandatory over IPv6 (RFC 8200 8.1)
            return
        payload = frame[start + UDP_HLEN : start + length]
        cfg = self.config
        if dport == DHCPV6_SERVER_PORT and (dst == ALL_DHCP_AGENTS or dst in self.local):
            self.dhcpv6_received(src_mac, src, sport, payload, now)
            return
        if dst == cfg.dns_ip6 and dport == 53:
            self.stack.dns.from_guest(src_mac, src, dst, sport, payload, now)
            return
        forwards = self.stack.udp_forwards
        if dst == cfg.host_ip6 and forwards.by_key and forwards.from_guest(src, sport, dport, payload, now):
            return  # a reply on a UDP port forward
        if dst[0] == 0xFF:
            self.counters.add("rx-ipv6-multicast-ignored")  # mDNS, LLMNR, SSDP: for other guests
            return
        if src[:8] != self.prefix6:
            out.drop("ipv6-bad-source")
            return
        self.stack.udp.from_guest(src_mac, src, dst, sport, dport, payload, now)

    def dhcpv6_received(self, src_mac: bytes, src: bytes, sport: int, payload: bytes, now: float) -> None:
        out = self.out
        server = self.stack.dhcpv6
        try:
            reply = server.handle(payload, src_mac, src, now)
        except Dhcpv6Error:
            out.drop("bad-dhcpv6")
            return
        if server.events:
            out.events.extend(server.events)
            server.events.clear()
        if reply is None:
            return
        self.counters.add("dhcpv6-replies")
        port = sport if sport else DHCPV6_CLIENT_PORT
        out.send_udp(src_mac, self.config.router_ll, src, DHCPV6_SERVER_PORT, port, reply)

"""Unit tests of Neighbor Discovery: RS/RA with every option, NS/NA, DAD, validation, timers, solicit()."""

import struct

import dpkt

from qemu_vpnnet.core import ndp as N
from qemu_vpnnet.core.config import NetConfig, ip6_bytes
from qemu_vpnnet.core.ndp import Ndp
from qemu_vpnnet.core.output import Output
from tests.guestframes import GUEST_MAC, GW_MAC

GUEST_LL = ip6_bytes("fe80::5054:ff:fe12:3456")
GUEST_GLOBAL = ip6_bytes("fec0::5054:ff:fe12:3456")
ALL_ROUTERS = ip6_bytes("ff02::2")
ALL_NODES = ip6_bytes("ff02::1")
ALL_NODES_MAC = bytes.fromhex("333300000001")
ROUTER_LL = ip6_bytes("fe80::2")
UNSPEC = ip6_bytes("::")


def make(**kwargs: object) -> tuple[Ndp, Output]:
    out = Output(NetConfig(**kwargs))  # type: ignore[arg-type]
    out.switch.attach(1)
    return Ndp(out), out


def take(out: Output) -> list[bytes]:
    frames = out.switch.out[1]
    out.switch.out[1] = []
    return frames


def message(src: bytes, dst: bytes, icmp_type: int, body: bytes, code: int = 0) -> bytes:
    """An ICMPv6 message as a guest would send it, checksum by dpkt."""
    icmp = dpkt.icmp6.ICMP6(type=icmp_type, code=code, data=body)
    pkt = dpkt.ip6.IP6(src=src, dst=dst, nxt=58, hlim=255, data=icmp)
    pkt.plen = len(bytes(icmp))
    return bytes(pkt)[40:]


def slla(mac: bytes = GUEST_MAC) -> bytes:
    return b"\x01\x01" + mac


def rs(src: bytes = GUEST_LL, options: bytes = b"") -> bytes:
    return message(src, ALL_ROUTERS, 133, bytes(4) + options)


def ns(target: bytes, src: bytes = GUEST_LL, dst: bytes | None = None, options: bytes | None = None) -> bytes:
    if dst is None:
        dst = b"\xff\x02" + bytes(9) + b"\x01\xff" + target[13:]
    if options is None:
        options = b"" if src == UNSPEC else slla()
    return message(src, dst, 135, bytes(4) + target + options)


def parse(frame: bytes) -> tuple[dpkt.ethernet.Ethernet, dpkt.ip6.IP6, dpkt.icmp6.ICMP6]:
    """The frame's layers; asserts the ICMPv6 checksum (recomputed by dpkt)."""
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.type == dpkt.ethernet.ETH_TYPE_IP6 and eth.src == GW_MAC
    pkt = eth.data
    assert isinstance(pkt, dpkt.ip6.IP6) and pkt.nxt == 58 and pkt.hlim == 255
    icmp = pkt.data
    assert isinstance(icmp, dpkt.icmp6.ICMP6)
    sent = icmp.sum
    icmp.sum = 0
    bytes(pkt)
    assert icmp.sum == sent
    return eth, pkt, icmp


def options_of(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body after type and length) of each option, checking every length."""
    out: list[tuple[int, bytes]] = []
    while data:
        assert len(data) >= 8 and data[1] > 0 and data[1] * 8 <= len(data)
        out.append((data[0], data[2 : data[1] * 8]))
        data = data[data[1] * 8 :]
    return out


def dns_names(data: bytes) -> list[str]:
    names: list[str] = []
    labels: list[str] = []
    i = 0
    while i < len(data):
        n = data[i]
        if n == 0:
            if not labels:
                break  # padding
            names.append(".".join(labels))
            labels = []
            i += 1
            continue
        labels.append(data[i + 1 : i + 1 + n].decode())
        i += 1 + n
    assert not labels
    return names


def test_router_solicitation_gets_a_unicast_advertisement_with_every_option() -> None:
    ndp, out = make(domain="corp.example", search=["lab.example", "corp.example"], mtu=9000)
    ndp.received(GUEST_MAC, GUEST_LL, ALL_ROUTERS, 255, rs(options=slla()), 0.0)
    [frame] = take(out)
    eth, pkt, icmp = parse(frame)
    assert eth.dst == GUEST_MAC
    assert (pkt.src, pkt.dst) == (ip6_bytes("fe80::2"), GUEST_LL)
    assert (icmp.type, icmp.code) == (134, 0)
    body = bytes(icmp.data)
    hop, flags, lifetime, reachable, retrans = struct.unpack("!BBHII", body[:12])
    assert (hop, flags, lifetime, reachable, retrans) == (64, 0x40, 1800, 0, 0)  # O only: stateless
    opts = dict(options_of(body[12:]))
    assert sorted(opts) == [1, 3, 5, 25, 31]
    assert opts[1] == GW_MAC
    assert struct.unpack("!HI", opts[5]) == (0, 9000)
    plen, pflags, valid, preferred, _, prefix = struct.unpack("!BBIII16s", opts[3])
    assert (plen, pflags, valid, preferred, prefix) == (64, 0xC0, 86400, 14400, ip6_bytes("fec0::"))
    _, dns_lifetime, dns = struct.unpack("!HI16s", opts[25])
    assert (dns_lifetime, dns) == (3600, ip6_bytes("fec0::3"))
    _, search_lifetime = struct.unpack("!HI", opts[31][:6])
    assert search_lifetime == 3600
    assert dns_names(opts[31][6:]) == ["corp.example", "lab.example"]
    assert out.counters.get("ndp-ra-sent") == 1


def test_managed_flag_with_dhcpv6_and_no_dnssl_without_names() -> None:
    ndp, out = make(dhcpv6=True, prefix6="fd00:1:2:3::/64")
    ndp.received(GUEST_MAC, GUEST_LL, ALL_ROUTERS, 255, rs(), 0.0)
    _, _, icmp = parse(take(out)[0])
    body = bytes(icmp.data)
    assert body[1] == 0xC0  # M and O
    opts = dict(options_of(body[12:]))
    assert sorted(opts) == [1, 3, 5, 25]
    assert struct.unpack("!I", opts[5][2:])[0] == 1500
    assert opts[3][-16:] == ip6_bytes("fd00:1:2:3::")
    assert opts[25][-16:] == ip6_bytes("fd00:1:2:3::3")


def test_mtu_option_is_left_out_below_the_ipv6_minimum() -> None:
    ndp, out = make(mtu=1000)
    ndp.received(GUEST_MAC, GUEST_LL, ALL_ROUTERS, 255, rs(), 0.0)
    _, _, icmp = parse(take(out)[0])
    assert 5 not in dict(options_of(bytes(icmp.data)[12:]))


def test_solicitation_from_the_unspecified_address_is_answered_to_all_nodes() -> None:
    ndp, out = make()
    ndp.received(GUEST_MAC, UNSPEC, ALL_ROUTERS, 255, rs(UNSPEC), 0.0)
    eth, pkt, icmp = parse(take(out)[0])
    assert (eth.dst, pkt.dst, icmp.type) == (GUEST_MAC, ALL_NODES, 134)
    # but not when it carries a link-layer address (RFC 4861 6.1.1)
    ndp.received(GUEST_MAC, UNSPEC, ALL_ROUTERS, 255, rs(UNSPEC, slla()), 0.0)
    assert take(out) == []
    assert out.counters.get("drop-ndp-unspecified-with-lladdr") == 1


def test_neighbor_solicitations_for_our_addresses_are_advertised() -> None:
    ndp, out = make()
    extra = ip6_bytes("fec0::4")
    ndp.extra_targets.add(extra)
    for text in ("fec0::2", "fe80::2", "fec0::3", "fec0::4"):
        target = ip6_bytes(text)
        ndp.received(GUEST_MAC, GUEST_LL, b"\xff\x02" + bytes(9) + b"\x01\xff" + target[13:], 255, ns(target), 0.0)
        [frame] = take(out)
        eth, pkt, icmp = parse(frame)
        assert (eth.dst, pkt.src, pkt.dst, icmp.type, icmp.code) == (GUEST_MAC, target, GUEST_LL, 136, 0)
        body = bytes(icmp.data)
        assert body[0] == 0xE0 and body[1:4] == bytes(3)  # Router, Solicited, Override
        assert body[4:20] == target
        assert options_of(body[20:]) == [(2, GW_MAC)]
    # a unicast NUD probe is answered the same way
    ndp.received(GUEST_MAC, GUEST_GLOBAL, ip6_bytes("fec0::2"), 255, ns(ip6_bytes("fec0::2"), GUEST_GLOBAL), 0.0)
    _, pkt, icmp = parse(take(out)[0])
    assert pkt.dst == GUEST_GLOBAL and icmp.type == 136
    assert out.counters.get("ndp-na-sent") == 5


def test_duplicate_address_detection_of_our_address_is_defended_to_all_nodes() -> None:
    ndp, out = make()
    target = ip6_bytes("fec0::2")
    group = ip6_bytes("ff02::1:ff00:2")
    ndp.received(GUEST_MAC, UNSPEC, group, 255, ns(target, UNSPEC, group), 0.0)
    eth, pkt, icmp = parse(take(out)[0])
    assert eth.dst == ALL_NODES_MAC
    assert (pkt.src, pkt.dst) == (target, ALL_NODES)
    body = bytes(icmp.data)
    assert body[0] == 0xA0  # Router, Override, not Solicited
    assert body[4:20] == target and options_of(body[20:]) == [(2, GW_MAC)]


def test_a_dad_probe_must_go_to_a_solicited_node_group_without_lladdr() -> None:
    ndp, out = make()
    target = ip6_bytes("fec0::2")
    ndp.received(GUEST_MAC, UNSPEC, target, 255, ns(target, UNSPEC, target), 0.0)
    group = ip6_bytes("ff02::1:ff00:2")
    ndp.received(GUEST_MAC, UNSPEC, group, 255, ns(target, UNSPEC, group, slla()), 0.0)
    assert take(out) == []
    assert out.counters.get("drop-ndp-bad-dad-destination") == 1
    assert out.counters.get("drop-ndp-unspecified-with-lladdr") == 1


def test_solicitations_for_other_targets_are_left_to_their_owners() -> None:
    ndp, out = make()
    other = ip6_bytes("fec0::1234")
    ndp.received(GUEST_MAC, GUEST_LL, ip6_bytes("ff02::1:ff00:1234"), 255, ns(other), 0.0)
    dad = ip6_bytes("fec0::5054:ff:fe12:3456")
    ndp.received(GUEST_MAC, UNSPEC, ip6_bytes("ff02::1:ff12:3456"), 255, ns(dad, UNSPEC), 0.0)
    assert take(out) == []
    assert out.counters.snapshot() == {}


def test_invalid_messages_are_dropped_with_their_reason() -> None:
    ndp, out = make()
    target = ip6_bytes("fec0::2")
    group = ip6_bytes("ff02::1:ff00:2")
    good = ns(target)
    cases = [
        (254, good, "drop-ndp-bad-hop-limit"),
        (255, rs()[:4], "drop-ndp-truncated"),
        (255, good[:20], "drop-ndp-truncated"),
        (255, message(GUEST_LL, group, 135, bytes(4) + target + slla(), code=1), "drop-ndp-bad-code"),
        (255, message(GUEST_LL, group, 135, bytes(4) + target + b"\x01\x00" + bytes(6)), "drop-ndp-bad-option"),
        (255, message(GUEST_LL, group, 135, bytes(4) + target + b"\x01\x02" + GUEST_MAC), "drop-ndp-bad-option"),
        (255, message(GUEST_LL, group, 135, bytes(4) + target + b"\x01"), "drop-ndp-bad-option"),
        (255, message(GUEST_LL, ALL_ROUTERS, 133, bytes(4) + b"\x01\x00" + bytes(6)), "drop-ndp-bad-option"),
        (255, ns(ip6_bytes("ff02::1")), "drop-ndp-multicast-target"),
        (255, message(GUEST_LL, ALL_NODES, 134, bytes(12)), "drop-ndp-guest-router-advertisement"),
    ]
    for hop_limit, msg, reason in cases:
        before = out.counters.get(reason)
        ndp.received(GUEST_MAC, GUEST_LL, group, hop_limit, msg, 0.0)
        assert out.counters.get(reason) == before + 1, reason
    ndp.received(GUEST_MAC, ip6_bytes("ff02::9"), group, 255, good, 0.0)
    assert out.counters.get("drop-ndp-multicast-source") == 1
    assert take(out) == []
    assert out.counters.get("rx-dropped") == len(cases) + 1


def test_neighbor_advertisements_teach_the_guest_mac() -> None:
    ndp, out = make()
    na = message(GUEST_GLOBAL, ip6_bytes("fe80::2"), 136, b"\x60" + bytes(3) + GUEST_GLOBAL + b"\x02\x01" + GUEST_MAC)
    ndp.received(GUEST_MAC, GUEST_GLOBAL, ip6_bytes("fe80::2"), 255, na, 0.0)
    assert out.mac_of(GUEST_GLOBAL) == GUEST_MAC
    assert take(out) == [] and out.counters.snapshot() == {}
    # solicited to a multicast group, for our address, or naming another MAC: dropped
    solicited_mc = message(GUEST_LL, ALL_NODES, 136, b"\x40" + bytes(3) + GUEST_LL)
    ndp.received(GUEST_MAC, GUEST_LL, ALL_NODES, 255, solicited_mc, 0.0)
    ours = message(GUEST_LL, ALL_NODES, 136, b"\x20" + bytes(3) + ip6_bytes("fec0::2"))
    ndp.received(GUEST_MAC, GUEST_LL, ALL_NODES, 255, ours, 0.0)
    other = ip6_bytes("fec0::99")
    foreign = message(other, ALL_NODES, 136, b"\x20" + bytes(3) + other + b"\x02\x01" + bytes.fromhex("525400999999"))
    ndp.received(GUEST_MAC, other, ALL_NODES, 255, foreign, 0.0)
    assert out.mac_of(GUEST_LL) is None and out.mac_of(other) is None
    assert out.counters.get("drop-ndp-solicited-to-multicast") == 1
    assert out.counters.get("drop-ndp-advert-for-our-address") == 1
    assert out.counters.get("drop-ndp-advert-lladdr-mismatch") == 1


def test_unsolicited_advertisements_follow_the_initial_then_regular_schedule() -> None:
    ndp, out = make()
    times: list[float] = []
    now = 5.0
    assert ndp.next_deadline() == float("inf")  # no guest has spoken IPv6 yet
    ndp.activate(now)
    assert ndp.next_deadline() <= now
    while now < 1000.0:
        ndp.timer(now)
        for frame in take(out):
            eth, pkt, icmp = parse(frame)
            assert (eth.dst, pkt.src, pkt.dst, icmp.type) == (ALL_NODES_MAC, ROUTER_LL, ALL_NODES, 134)
            times.append(now)
        ndp.timer(now)  # nothing more is due at the same time
        assert take(out) == []
        now = ndp.next_deadline()
    assert times == [5.0, 21.0, 37.0, 237.0, 437.0, 637.0, 837.0]
    assert out.counters.get("ndp-ra-sent") == len(times)
    off, _ = make(ipv6=False)
    assert off.next_deadline() == float("inf")


def test_solicit_sends_to_the_solicited_node_group_once_a_second_per_target() -> None:
    ndp, out = make()
    target = ip6_bytes("fec0::5054:ff:fe12:3456")
    ndp.solicit(target, 10.0)
    [frame] = take(out)
    eth, pkt, icmp = parse(frame)
    assert eth.dst == bytes.fromhex("3333ff123456")
    assert (pkt.src, pkt.dst) == (ip6_bytes("fe80::2"), ip6_bytes("ff02::1:ff12:3456"))
    body = bytes(icmp.data)
    assert (icmp.type, icmp.code, body[:4], body[4:20]) == (135, 0, bytes(4), target)
    assert options_of(body[20:]) == [(1, GW_MAC)]
    ndp.solicit(target, 10.5)
    assert take(out) == []
    ndp.solicit(target, 11.0)
    assert len(take(out)) == 1
    # our own addresses and multicast are never solicited
    ndp.solicit(ip6_bytes("fec0::2"), 20.0)
    ndp.solicit(ip6_bytes("ff02::1"), 20.0)
    assert take(out) == []
    assert (out.counters.get("ndp-ns-sent"), out.counters.get("ndp-ns-rate-limited")) == (2, 1)


def test_solicit_table_is_bounded() -> None:
    ndp, out = make()
    for n in range(N.MAX_SOLICIT_TARGETS * 3):
        ndp.solicit(ip6_bytes(f"fec0::1:{n:x}"), 0.5)
        assert len(ndp.solicited) <= N.MAX_SOLICIT_TARGETS
    assert out.counters.get("ndp-ns-sent") == N.MAX_SOLICIT_TARGETS * 3
    # the newest are remembered (and limited), the oldest were forgotten
    ndp.solicit(ip6_bytes(f"fec0::1:{N.MAX_SOLICIT_TARGETS * 3 - 1:x}"), 0.6)
    assert out.counters.get("ndp-ns-rate-limited") == 1
    ndp.solicit(ip6_bytes("fec0::1:0"), 0.6)
    assert out.counters.get("ndp-ns-sent") == N.MAX_SOLICIT_TARGETS * 3 + 1

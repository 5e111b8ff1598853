"""Unit tests of the core's checksum, framing, switch, ARP, gateway ping and DHCP server."""

import os

import dpkt
import pytest

from qemu_vpnnet.core import checksum as ck
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io.framing import FramingError, frame_parts, split_frames
from tests.guestframes import BCAST, GUEST2_MAC, GUEST_MAC, GW_MAC, dhcp_frame, eth, ip, ip_frame, ipv4, parse


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("size", [0, 1, 2, 3, 20, 59, 1500, 9001, 65535])
def test_checksum_matches_rfc1071(size: int) -> None:
    for _ in range(20):
        data = os.urandom(size)
        assert ck.checksum(data) == reference_checksum(data)


def test_checksum_of_checksummed_header_is_zero() -> None:
    hdr = bytearray(os.urandom(20))
    hdr[10:12] = b"\x00\x00"
    value = ck.checksum(bytes(hdr))
    hdr[10:12] = value.to_bytes(2, "big")
    assert ck.checksum(bytes(hdr)) == 0


def test_framing_splits_partial_and_rejects_garbage() -> None:
    stream = b"".join(frame_parts([b"a" * 60, b"b" * 100]))
    frames: list[bytes] = []
    rest = split_frames(bytearray(stream[:-10]), 0, len(stream) - 10, frames)
    assert frames == [b"a" * 60] and rest == 64
    with pytest.raises(FramingError):
        split_frames(bytearray(b"\xff\xff\xff\xff" + b"x" * 10), 0, 14, [])
    with pytest.raises(FramingError):
        split_frames(bytearray(b"\x00\x00\x00\x00"), 0, 4, [])


def make_stack(**kwargs: object) -> Stack:
    stack = Stack(NetConfig(**kwargs))  # type: ignore[arg-type]
    stack.attach_port(1)
    stack.attach_port(2)
    return stack


def take(stack: Stack, port: int) -> list[bytes]:
    frames = stack.switch.out[port]
    stack.switch.out[port] = []
    return frames


def dhcp_reply(frame: bytes) -> tuple[dpkt.dhcp.DHCP, dict[int, bytes]]:
    msg = dpkt.dhcp.DHCP(parse(frame).data.data.data)
    return msg, dict(msg.opts)


def lease(stack: Stack, mac: bytes, port: int, now: float = 0.0) -> str:
    stack.frame_received(port, dhcp_frame(mac, dpkt.dhcp.DHCPDISCOVER), now)
    offer, opts = dhcp_reply(take(stack, port)[-1])
    assert opts[53] == bytes((dpkt.dhcp.DHCPOFFER,))
    addr = ip_str(offer.yiaddr)
    stack.frame_received(port, dhcp_frame(mac, dpkt.dhcp.DHCPREQUEST, requested=addr, server_id="10.0.2.2"), now)
    _ack, opts = dhcp_reply(take(stack, port)[-1])
    assert opts[53] == bytes((dpkt.dhcp.DHCPACK,))
    return addr


def ip_str(value: int) -> str:
    return ".".join(str(b) for b in value.to_bytes(4, "big"))


def test_dhcp_offer_carries_qemu_user_defaults() -> None:
    stack = make_stack(mtu=65520, domain="example.test", search=["a.test", "b.test"])
    stack.frame_received(1, dhcp_frame(GUEST_MAC, dpkt.dhcp.DHCPDISCOVER), 0.0)
    frames = take(stack, 1)
    assert len(frames) == 1
    offer, opts = dhcp_reply(frames[0])
    assert ip_str(offer.yiaddr) == "10.0.2.15"
    assert opts[1] == ip("255.255.255.0")
    assert opts[3] == ip("10.0.2.2")
    assert opts[6] == ip("10.0.2.3")
    assert opts[26] == (65520).to_bytes(2, "big")
    assert opts[51] == (86400).to_bytes(4, "big")
    assert opts[15] == b"example.test"
    assert opts[119] == b"\x01a\x04test\x00\x01b\x04test\x00"
    assert parse(frames[0]).dst == GUEST_MAC


def test_dhcp_stable_per_mac_distinct_between_guests_and_events() -> None:
    stack = make_stack()
    first = lease(stack, GUEST_MAC, 1)
    second = lease(stack, GUEST2_MAC, 2)
    assert (first, second) == ("10.0.2.15", "10.0.2.16")
    assert [e[0] for e in stack.out.events] == ["GUEST_LEASE", "GUEST_LEASE"]
    stack.out.events.clear()
    # renewal (unicast REQUEST with ciaddr) keeps the address and raises no new event
    stack.frame_received(1, dhcp_frame(GUEST_MAC, dpkt.dhcp.DHCPREQUEST, ciaddr=first), 100.0)
    ack, opts = dhcp_reply(take(stack, 1)[-1])
    assert opts[53] == bytes((dpkt.dhcp.DHCPACK,)) and ip_str(ack.yiaddr) == first
    assert stack.out.events == []
    # after a release the same MAC still gets the same address back
    stack.frame_received(1, dhcp_frame(GUEST_MAC, dpkt.dhcp.DHCPRELEASE, ciaddr=first), 200.0)
    assert lease(stack, GUEST_MAC, 1, 300.0) == first


def test_dhcp_nak_for_wrong_address_and_static_lease() -> None:
    stack = make_stack(static_leases={GUEST_MAC: ip("10.0.2.100")})
    stack.frame_received(1, dhcp_frame(GUEST_MAC, dpkt.dhcp.DHCPREQUEST, requested="10.0.2.77"), 0.0)
    _, opts = dhcp_reply(take(stack, 1)[-1])
    assert opts[53] == bytes((dpkt.dhcp.DHCPNAK,))
    assert lease(stack, GUEST_MAC, 1) == "10.0.2.100"


def test_dhcp_inform_and_garbage() -> None:
    stack = make_stack()
    stack.frame_received(1, dhcp_frame(GUEST_MAC, dpkt.dhcp.DHCPINFORM, ciaddr="10.0.2.50"), 0.0)
    msg, opts = dhcp_reply(take(stack, 1)[-1])
    assert opts[53] == bytes((dpkt.dhcp.DHCPACK,)) and msg.yiaddr == 0 and 51 not in opts
    udp = dpkt.udp.UDP(sport=68, dport=67, data=b"\x01garbage")
    udp.ulen = 8 + 8
    stack.frame_received(1, ip_frame(GUEST_MAC, BCAST, ipv4("0.0.0.0", "255.255.255.255", 17, udp)), 0.0)
    assert stack.counters.get("drop-bad-dhcp") == 1


def test_arp_answers_virtual_addresses_only() -> None:
    stack = make_stack()
    for target, answered in (("10.0.2.2", True), ("10.0.2.3", True), ("10.0.2.99", False)):
        req = dpkt.arp.ARP(
            op=dpkt.arp.ARP_OP_REQUEST, sha=GUEST_MAC, spa=ip("10.0.2.15"), tha=b"\0" * 6, tpa=ip(target)
        )
        stack.frame_received(1, eth(BCAST, GUEST_MAC, dpkt.ethernet.ETH_TYPE_ARP, bytes(req)), 0.0)
        frames = take(stack, 1)
        assert bool(frames) == answered
        if answered:
            reply = parse(frames[0]).data
            assert reply.op == dpkt.arp.ARP_OP_REPLY and reply.sha == GW_MAC and reply.spa == ip(target)
    # the broadcast requests were flooded to the other guest
    assert len(take(stack, 2)) == 3


def test_switch_forwards_between_guests_by_learned_mac() -> None:
    stack = make_stack()
    icmp = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1, data=b"x"))
    to_g2 = ip_frame(GUEST_MAC, GUEST2_MAC, ipv4("10.0.2.15", "10.0.2.16", 1, icmp))
    stack.frame_received(1, to_g2, 0.0)  # unknown destination: flooded
    assert take(stack, 2) == [to_g2]
    back = ip_frame(GUEST2_MAC, GUEST_MAC, ipv4("10.0.2.16", "10.0.2.15", 1, icmp))
    stack.frame_received(2, back, 0.0)  # GUEST_MAC learned on port 1
    assert take(stack, 1) == [back] and take(stack, 2) == []
    stack.frame_received(1, to_g2, 0.0)  # now GUEST2_MAC is known on port 2
    assert take(stack, 2) == [to_g2]
    assert take(stack, 1) == []


def test_gateway_answers_ping_and_checksums_are_valid() -> None:
    stack = make_stack()
    icmp = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=7, seq=3, data=b"payload" * 10))
    stack.frame_received(1, ip_frame(GUEST_MAC, GW_MAC, ipv4("10.0.2.15", "10.0.2.2", 1, icmp)), 0.0)
    frames = take(stack, 1)
    assert len(frames) == 1
    reply = parse(frames[0]).data
    assert reply.src == ip("10.0.2.2") and reply.dst == ip("10.0.2.15")
    assert reply.data.type == 0 and reply.data.data.id == 7 and reply.data.data.seq == 3
    assert ck.checksum(bytes(reply.data)) == 0
    assert ck.checksum(frames[0][14:34]) == 0


@pytest.mark.parametrize(
    "frame,reason",
    [
        (b"\x00" * 5, "runt-frame"),
        (eth(GW_MAC, GUEST_MAC, 0x0800, b"\x45\x00"), "short-ip"),
        (GW_MAC + GUEST_MAC + b"\x08\x00\x45\x00\xff\xff" + b"\x00" * 30, "bad-ip-length"),
        (GW_MAC + GUEST_MAC + b"\x08\x00\x4f" + b"\x00" * 40, "bad-ip-length"),
        (GW_MAC + GUEST_MAC + b"\x08\x00\x45\x00\x00\x1c" + b"\x00" * 30, "bad-ip-checksum"),
        (eth(GW_MAC, GUEST_MAC, 0x0806, b"\x00\x01"), "short-arp"),
        (eth(GW_MAC, bytes.fromhex("ffffffffffff"), 0x0800, b"\x00" * 40), "bad-source-mac"),
    ],
)
def test_malformed_frames_are_counted_not_raised(frame: bytes, reason: str) -> None:
    stack = make_stack()
    stack.frame_received(1, frame, 0.0)
    assert stack.counters.get("drop-" + reason) == 1


def test_padded_frames_trust_ip_length() -> None:
    """QEMU's hub pads short frames to 60 bytes: the IP total length is what counts."""
    stack = make_stack()
    icmp = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1, data=b""))
    frame = ip_frame(GUEST_MAC, GW_MAC, ipv4("10.0.2.15", "10.0.2.2", 1, icmp))
    assert len(frame) < 60
    stack.frame_received(1, frame + b"\x00" * (60 - len(frame)), 0.0)
    assert len(take(stack, 1)) == 1


def test_fragmented_udp_from_guest_is_reassembled_and_bounded() -> None:
    stack = make_stack()
    payload = bytes(range(256)) * 12  # 3072 bytes: three fragments at MTU 1500
    udp = dpkt.udp.UDP(sport=5000, dport=9999, data=payload)
    udp.ulen = 8 + len(payload)
    whole = ipv4("10.0.2.15", "198.18.0.9", 17, udp)
    whole.id = 77
    raw = bytes(whole)
    body = raw[20:]
    pieces = [(0, body[:1480], True), (1480, body[1480:2960], True), (2960, body[2960:], False)]
    frames = []
    for offset, data, more in pieces:
        frag = dpkt.ip.IP(
            src=ip("10.0.2.15"),
            dst=ip("198.18.0.9"),
            p=17,
            id=77,
            ttl=64,
            mf=int(more),
            offset=offset // 8,
            data=data,
        )
        frag.len = 20 + len(data)
        frames.append(eth(GW_MAC, GUEST_MAC, dpkt.ethernet.ETH_TYPE_IP, bytes(frag)))
    for frame in (frames[2], frames[0]):  # out of order, one missing: nothing yet
        stack.frame_received(1, frame, 0.0)
    assert not [op for op in stack.out.ops if op.data]
    stack.frame_received(1, frames[1], 0.0)
    sends = [op for op in stack.out.ops if op.data]
    assert len(sends) == 1 and sends[0].data == payload and sends[0].port == 9999
    # a datagram that never completes is dropped after the timeout, counted
    stack.frame_received(1, frames[0], 1.0)
    assert stack.fragments.pending
    stack.timer(100.0)
    assert not stack.fragments.pending
    assert stack.counters.get("drop-ip-fragmented-datagram") == 1


def test_all_checksum_implementations_agree() -> None:
    for size in (0, 1, 2, 3, 5, 31, 33, 1460, 65481):
        data = os.urandom(size)
        want = reference_checksum(data)
        assert ck.finish(ck.sum16_loop(data, 0)) == want
        assert ck.finish(ck._sum16_bigint(data, 0)) in (want, want ^ 0xFFFF if want in (0, 0xFFFF) else want)
        if ck.HAVE_C:
            assert ck.finish(ck.c_sum16(data, 0)) in (want, 0xFFFF if want == 0 else want)

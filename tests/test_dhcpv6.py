"""Unit tests of the DHCPv6 server: stateless replies, the stateful exchange, validation, the pool's bound."""

import ipaddress
import struct

import pytest

from qemu_vpnnet.core import dhcpv6 as D
from qemu_vpnnet.core.config import NetConfig, ip6_bytes
from qemu_vpnnet.core.dhcpv6 import Dhcpv6Error, Dhcpv6Server
from tests.guestframes import GUEST2_MAC, GUEST_MAC, GW_MAC

GUEST_LL = ip6_bytes("fe80::5054:ff:fe12:3456")
CLIENT_DUID = struct.pack("!HHI", 1, 1, 12345) + GUEST_MAC  # DUID-LLT
CLIENT2_DUID = struct.pack("!HH", 3, 1) + GUEST2_MAC  # DUID-LL
SERVER_DUID = struct.pack("!HH", 3, 1) + GW_MAC
XID = b"\x12\x34\x56"


def opt(code: int, value: bytes) -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def ia_na(iaid: int, *addresses: bytes) -> bytes:
    inner = b"".join(opt(5, struct.pack("!16sII", a, 0, 0)) for a in addresses)
    return opt(3, struct.pack("!III", iaid, 0, 0) + inner)


def msg(mtype: int, *options: bytes, duid: bytes | None = CLIENT_DUID, server: bytes | None = None) -> bytes:
    out = bytes((mtype,)) + XID
    if duid is not None:
        out += opt(1, duid)
    if server is not None:
        out += opt(2, server)
    out += opt(8, b"\x00\x00")  # elapsed time, as every client sends
    return out + b"".join(options)


def parse(payload: bytes) -> tuple[int, bytes, dict[int, list[bytes]]]:
    """(type, transaction id, code -> values) of a reply, checking each length."""
    mtype, xid = payload[0], payload[1:4]
    return mtype, xid, options_of(payload[4:])


def options_of(data: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    while data:
        code, length = struct.unpack("!HH", data[:4])
        assert 4 + length <= len(data)
        out.setdefault(code, []).append(data[4 : 4 + length])
        data = data[4 + length :]
    return out


def ia_addresses(ia: bytes) -> tuple[int, int, int, list[tuple[bytes, int, int]], int | None]:
    """(IAID, T1, T2, [(address, preferred, valid)], status code or None) of an IA_NA."""
    iaid, t1, t2 = struct.unpack("!III", ia[:12])
    inner = options_of(ia[12:])
    addrs = [struct.unpack("!16sII", a[:24]) for a in inner.get(5, [])]
    code = struct.unpack("!H", inner[13][0][:2])[0] if 13 in inner else None
    return iaid, t1, t2, addrs, code


def status_of(options: dict[int, list[bytes]]) -> int | None:
    return struct.unpack("!H", options[13][0][:2])[0] if 13 in options else None


def names(data: bytes) -> list[str]:
    found: list[str] = []
    labels: list[str] = []
    while data:
        n, data = data[0], data[1:]
        if n == 0:
            found.append(".".join(labels))
            labels = []
        else:
            labels.append(data[:n].decode())
            data = data[n:]
    return found


def stateful(**kwargs: object) -> Dhcpv6Server:
    return Dhcpv6Server(NetConfig(dhcpv6=True, **kwargs))  # type: ignore[arg-type]


def bind(server: Dhcpv6Server, iaid: int = 1, duid: bytes = CLIENT_DUID, mac: bytes = GUEST_MAC) -> bytes:
    """Solicit then Request; the bound address."""
    reply = server.handle(msg(1, ia_na(iaid), duid=duid), mac, GUEST_LL, 0.0)
    assert reply is not None
    offered = ia_addresses(parse(reply)[2][3][0])[3][0][0]
    reply = server.handle(msg(3, ia_na(iaid, offered), duid=duid, server=SERVER_DUID), mac, GUEST_LL, 1.0)
    assert reply is not None
    assert ia_addresses(parse(reply)[2][3][0])[3][0][0] == offered
    return bytes(offered)


def test_information_request_gets_dns_search_list_and_refresh_time() -> None:
    server = Dhcpv6Server(NetConfig(domain="corp.example", search=["lab.example"]))
    reply = server.handle(msg(11, opt(6, struct.pack("!HH", 23, 24))), GUEST_MAC, GUEST_LL, 0.0)
    assert reply is not None
    mtype, xid, options = parse(reply)
    assert (mtype, xid) == (7, XID)
    assert options[2] == [SERVER_DUID] and options[1] == [CLIENT_DUID]
    assert options[23] == [ip6_bytes("fec0::3")]
    assert names(options[24][0]) == ["corp.example", "lab.example"]
    assert options[32] == [struct.pack("!I", 86400)]
    assert 3 not in options and 13 not in options
    # no client id is fine for an Information-request; no search list without names
    plain = Dhcpv6Server(NetConfig()).handle(msg(11, duid=None), GUEST_MAC, GUEST_LL, 0.0)
    assert plain is not None
    options = parse(plain)[2]
    assert 1 not in options and 24 not in options and options[23] == [ip6_bytes("fec0::3")]


def test_stateless_server_does_not_answer_address_messages() -> None:
    server = Dhcpv6Server(NetConfig())
    assert server.handle(msg(1, ia_na(1)), GUEST_MAC, GUEST_LL, 0.0) is None
    addr = ip6_bytes("fec0::1000")
    assert server.handle(msg(3, ia_na(1, addr), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 0.0) is None
    assert server.handle(msg(6, ia_na(1, addr)), GUEST_MAC, GUEST_LL, 0.0) is None
    assert server.leases(0.0) == [] and server.events == []


def test_solicit_request_renew_release() -> None:
    server = stateful(lease_time=3600)
    reply = server.handle(msg(1, ia_na(7)), GUEST_MAC, GUEST_LL, 0.0)
    assert reply is not None
    mtype, xid, options = parse(reply)
    assert (mtype, xid) == (2, XID)
    assert options[2] == [SERVER_DUID] and options[1] == [CLIENT_DUID]
    assert options[7] == [b"\xff"] and options[23] == [ip6_bytes("fec0::3")]
    iaid, t1, t2, addrs, code = ia_addresses(options[3][0])
    assert (iaid, t1, t2, code) == (7, 1800, 2880, None)
    [(addr, preferred, valid)] = addrs
    assert (preferred, valid) == (3600, 3600)
    interface_id = int.from_bytes(addr[8:], "big")
    assert addr[:8] == ip6_bytes("fec0::")[:8] and D.POOL_FIRST <= interface_id < D.POOL_FIRST + D.POOL_SIZE
    assert server.leases(0.0) == [] and server.events == []  # advertised, not bound
    fqdn = opt(39, b"\x01" + b"\x05guest\x07example\x00")
    request = msg(3, ia_na(7, addr), fqdn, server=SERVER_DUID)
    reply = server.handle(request, GUEST_MAC, GUEST_LL, 1.0)
    assert reply is not None
    mtype, xid, options = parse(reply)
    assert (mtype, xid) == (7, XID)
    assert ia_addresses(options[3][0])[3] == [(addr, 3600, 3600)]
    text = str(ipaddress.IPv6Address(addr))
    assert server.events == [
        (
            "GUEST_LEASE6",
            {
                "mac": "52:54:00:12:34:56",
                "address": text,
                "hostname": "guest.example",
                "lease-time": 3600,
                "duid": CLIENT_DUID.hex(),
                "iaid": 7,
            },
        )
    ]
    assert server.leases(1.0) == [
        {
            "mac": "52:54:00:12:34:56",
            "address": text,
            "duid": CLIENT_DUID.hex(),
            "iaid": 7,
            "expires-in": 3600,
            "hostname": "guest.example",
        }
    ]
    assert server.bound_mac(addr, 2.0) == GUEST_MAC and server.guest_address(GUEST_MAC, 2.0) == addr
    assert server.guest_addresses(GUEST_MAC, 2.0) == [addr]
    # Renew: same address, lease extended, no second event
    reply = server.handle(msg(5, ia_na(7, addr), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 1800.0)
    assert reply is not None and ia_addresses(parse(reply)[2][3][0])[3] == [(addr, 3600, 3600)]
    assert len(server.events) == 1 and server.leases(1800.0)[0]["expires-in"] == 3600
    # Rebind (no server id) works the same
    reply = server.handle(msg(6, ia_na(7, addr)), GUEST_MAC, GUEST_LL, 2000.0)
    assert reply is not None and ia_addresses(parse(reply)[2][3][0])[3] == [(addr, 3600, 3600)]
    assert server.bound_mac(addr, 5000.0) == GUEST_MAC
    assert server.bound_mac(addr, 5600.0) is None  # expired
    # Release
    reply = server.handle(msg(8, ia_na(7, addr), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 2100.0)
    assert reply is not None
    mtype, _, options = parse(reply)
    assert mtype == 7 and status_of(options) == 0
    assert server.leases(2100.0) == [] and server.bound_mac(addr, 2100.0) is None
    # the client gets the same address back afterwards
    reply = server.handle(msg(1, ia_na(7)), GUEST_MAC, GUEST_LL, 2200.0)
    assert reply is not None and ia_addresses(parse(reply)[2][3][0])[3][0][0] == addr


def test_rapid_commit_binds_at_once() -> None:
    server = stateful()
    reply = server.handle(msg(1, ia_na(1), opt(14, b"")), GUEST_MAC, GUEST_LL, 0.0)
    assert reply is not None
    mtype, _, options = parse(reply)
    assert mtype == 7 and options[14] == [b""]
    addr = ia_addresses(options[3][0])[3][0][0]
    assert server.bound_mac(addr, 1.0) == GUEST_MAC
    assert [name for name, _ in server.events] == ["GUEST_LEASE6"]


def test_addresses_are_stable_per_client_and_distinct_between_clients() -> None:
    server = stateful()
    first = bind(server, 1)
    second = bind(server, 2)
    other = bind(server, 1, CLIENT2_DUID, GUEST2_MAC)
    assert len({first, second, other}) == 3
    assert server.guest_addresses(GUEST_MAC, 2.0) == [first, second]
    # a restarted server hands out the same addresses (the first choice is a hash of the client)
    again = stateful()
    assert bind(again, 1, CLIENT2_DUID, GUEST2_MAC) == other
    assert bind(again, 1) == first


def test_an_address_the_client_lists_but_does_not_get_is_returned_with_lifetime_zero() -> None:
    server = stateful()
    addr = bind(server)
    wrong = ip6_bytes("2001:db8::1")
    reply = server.handle(msg(5, ia_na(1, addr, wrong), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 10.0)
    assert reply is not None
    assert ia_addresses(parse(reply)[2][3][0])[3] == [(addr, 86400, 86400), (wrong, 0, 0)]
    # a free pool address it asks for is granted
    hint = ip6_bytes("fec0::1abc")
    reply = server.handle(msg(1, ia_na(9, hint), duid=CLIENT2_DUID), GUEST2_MAC, GUEST_LL, 10.0)
    assert reply is not None and ia_addresses(parse(reply)[2][3][0])[3][0][0] == hint


def test_decline_takes_the_address_out_of_the_pool() -> None:
    server = stateful()
    addr = bind(server)
    reply = server.handle(msg(9, ia_na(1, addr), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 5.0)
    assert reply is not None
    mtype, _, options = parse(reply)
    assert mtype == 7 and status_of(options) == 0
    assert server.bound_mac(addr, 5.0) is None
    reply = server.handle(msg(1, ia_na(1, addr)), GUEST_MAC, GUEST_LL, 6.0)
    assert reply is not None
    new = ia_addresses(parse(reply)[2][3][0])[3]
    assert new[0][0] != addr and new[1] == (addr, 0, 0)
    # a Decline or Release of an address the client does not hold: NoBinding
    reply = server.handle(msg(8, ia_na(3, addr), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 7.0)
    assert reply is not None
    assert ia_addresses(parse(reply)[2][3][0])[4] == 3


def test_confirm_says_whether_the_addresses_are_on_link() -> None:
    server = stateful()
    on_link = server.handle(msg(4, ia_na(1, ip6_bytes("fec0::1234"))), GUEST_MAC, GUEST_LL, 0.0)
    assert on_link is not None
    mtype, _, options = parse(on_link)
    assert mtype == 7 and status_of(options) == 0
    off = server.handle(msg(4, ia_na(1, ip6_bytes("fec0::1"), ip6_bytes("2001:db8::1"))), GUEST_MAC, GUEST_LL, 0.0)
    assert off is not None and status_of(parse(off)[2]) == 4
    assert server.handle(msg(4, ia_na(1)), GUEST_MAC, GUEST_LL, 0.0) is None  # nothing to confirm


def test_messages_for_another_server_and_server_messages_are_ignored() -> None:
    server = stateful()
    foreign = struct.pack("!HH", 3, 1) + bytes.fromhex("020000000001")
    for mtype in (3, 5, 8, 9, 11):
        assert server.handle(msg(mtype, ia_na(1), server=foreign), GUEST_MAC, GUEST_LL, 0.0) is None
    for mtype in (2, 7, 10, 12, 13, 200):
        assert server.handle(msg(mtype, ia_na(1)), GUEST_MAC, GUEST_LL, 0.0) is None
    assert server.leases(0.0) == [] and server.by_key == {}


def test_ia_pd_and_ia_ta_are_refused_politely() -> None:
    server = stateful()
    pd = opt(25, struct.pack("!III", 5, 0, 0))
    reply = server.handle(msg(1, pd), GUEST_MAC, GUEST_LL, 0.0)
    assert reply is not None
    mtype, _, options = parse(reply)
    assert mtype == 2 and status_of(options) == 2  # only the status: the client goes on soliciting
    reply = server.handle(msg(1, ia_na(1), pd, opt(4, struct.pack("!I", 6))), GUEST_MAC, GUEST_LL, 0.0)
    assert reply is not None
    options = parse(reply)[2]
    assert status_of(options) is None and len(ia_addresses(options[3][0])[3]) == 1
    assert struct.unpack("!III", options[25][0][:12]) == (5, 0, 0)
    assert status_of(options_of(options[25][0][12:])) == 6
    assert status_of(options_of(options[4][0][4:])) == 2


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x0b\x00\x00",  # shorter than the header
        b"\x0b" + XID + b"\x00\x17\x00",  # truncated option header
        b"\x0b" + XID + b"\x00\x01\x00\x20abc",  # option past the end
        msg(1, opt(3, b"\x00\x00\x00\x01\x00\x00")),  # truncated IA_NA
        msg(1, opt(3, struct.pack("!III", 1, 0, 0) + opt(5, bytes(10)))),  # truncated IAADDR
        msg(1, opt(3, struct.pack("!III", 1, 0, 0) + b"\x00\x05\x00\x30" + bytes(8))),  # IAADDR past the IA
        msg(1, *[opt(8, b"\x00\x00")] * 70),  # too many options
        msg(1, ia_na(1)) + bytes(1500),  # too long
        msg(1, ia_na(1), duid=None),  # no client id
        msg(1, ia_na(1), duid=b"\x00\x01"),  # client id too short
        msg(1, ia_na(1), duid=bytes(131)),  # client id too long
        msg(3, ia_na(1)),  # Request without a server id
        msg(1, ia_na(1), server=SERVER_DUID),  # Solicit with one
        msg(11, ia_na(1)),  # Information-request with an IA
    ],
)
def test_malformed_messages_raise(payload: bytes) -> None:
    with pytest.raises(Dhcpv6Error):
        stateful().handle(payload, GUEST_MAC, GUEST_LL, 0.0)


def test_client_fqdn_that_is_not_a_name_gives_no_hostname() -> None:
    server = stateful()
    bad = opt(39, b"\x00\x40" + b"x" * 10)
    reply = server.handle(msg(1, ia_na(1), bad, opt(14, b"")), GUEST_MAC, GUEST_LL, 0.0)
    assert reply is not None and server.leases(0.0)[0]["hostname"] == ""
    partial = opt(39, b"\x00\x04host")  # a partial name (no root label) is allowed
    reply = server.handle(msg(1, ia_na(2), partial, opt(14, b"")), GUEST_MAC, GUEST_LL, 0.0)
    assert reply is not None and server.leases(0.0)[1]["hostname"] == "host"


def test_the_pool_does_not_grow_past_its_bound_and_reuses_expired_leases() -> None:
    server = Dhcpv6Server(NetConfig(dhcpv6=True, lease_time=100, host6="fec0::1001"), pool_size=8)
    addresses = set()
    for n in range(7):
        reply = server.handle(msg(1, ia_na(n), opt(14, b"")), GUEST_MAC, GUEST_LL, 0.0)
        assert reply is not None
        addresses.add(ia_addresses(parse(reply)[2][3][0])[3][0][0])
    assert len(addresses) == 7 and ip6_bytes("fec0::1001") not in addresses  # the host's address is skipped
    assert all(server.in_pool(a) for a in addresses)
    # full: the next client gets NoAddrsAvail, Advertised even though it asked for Rapid Commit
    reply = server.handle(msg(1, ia_na(99), opt(14, b"")), GUEST_MAC, GUEST_LL, 50.0)
    assert reply is not None
    mtype, _, options = parse(reply)
    assert mtype == 2 and status_of(options) == 2 and 3 not in options
    reply = server.handle(msg(3, ia_na(99), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 50.0)
    assert reply is not None and ia_addresses(parse(reply)[2][3][0])[4] == 2
    # renew one lease late, so that the others expired first; new clients take the longest-expired
    server.handle(msg(5, ia_na(3), server=SERVER_DUID), GUEST_MAC, GUEST_LL, 90.0)
    for n in range(200, 206):
        reply = server.handle(msg(1, ia_na(n), opt(14, b"")), GUEST_MAC, GUEST_LL, 200.0)
        assert reply is not None and parse(reply)[0] == 7
    assert (CLIENT_DUID, 3) in server.by_key
    for n in range(206, 240):
        server.handle(msg(1, ia_na(n), opt(14, b"")), GUEST_MAC, GUEST_LL, 200.0)
        assert len(server.by_key) <= 7 and len(server.by_addr) <= 7
    assert (CLIENT_DUID, 3) not in server.by_key
    assert len(server.leases(200.0)) == 7

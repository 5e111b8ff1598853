"""Port forwards with IPv6 on either side: QEMU's bracket syntax, which guest address a forward
picks (IPv4 for an empty guest address whatever the host side, an IPv6 literal over IPv6, `[::]`
for the first guest's IPv6 address), and the source address the core is asked to connect from.
The listeners are real (on ::1 and 127.0.0.1); the core is a stand-in that records, and the
host-side TCP handler (which may be compiled) runs on a real Shell with that stand-in's engine."""

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from qemu_vpnnet.core.config import NetConfig, ip6_bytes, ip_bytes
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.hostfwd import HostFwdSyntaxError, parse_hostfwd, parse_hostfwd_remove
from qemu_vpnnet.io.core_calls import TcpCalls
from qemu_vpnnet.io.forwards import Forwarder, ForwardError
from qemu_vpnnet.io.host_tcp import HostTcp
from qemu_vpnnet.io.shell import Shell

MAC1 = bytes.fromhex("525400123456")
MAC2 = bytes.fromhex("525400abcdef")
GUEST4 = ip_bytes("10.0.2.15")
GUEST6 = ip6_bytes("fec0::5054:ff:fe12:3456")
OTHER6 = ip6_bytes("fec0::99")


# ---- syntax -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fields", "rule"),
    [
        ("hostfwd=tcp:[::1]:2222-:22", ("tcp", "::1", 2222, "", 22), "tcp:[::1]:2222-:22"),
        (
            "tcp:[::1]:2222-[fec0::5054:ff:fe12:3456]:22",
            ("tcp", "::1", 2222, "fec0::5054:ff:fe12:3456", 22),
            "tcp:[::1]:2222-[fec0::5054:ff:fe12:3456]:22",
        ),
        ("udp:[::]:0-[::]:53", ("udp", "::", 0, "::", 53), "udp:[::]:0-[::]:53"),
        ("tcp:[0:0::1]:80-[FEC0:0::5]:8080", ("tcp", "::1", 80, "fec0::5", 8080), "tcp:[::1]:80-[fec0::5]:8080"),
        ("tcp::8080-10.0.2.15:80", ("tcp", "127.0.0.1", 8080, "10.0.2.15", 80), "tcp:127.0.0.1:8080-10.0.2.15:80"),
    ],
)
def test_bracketed_ipv6_on_either_side(text: str, fields: tuple[object, ...], rule: str) -> None:
    spec = parse_hostfwd(text)
    assert (spec.protocol, spec.host_addr, spec.host_port, spec.guest_addr, spec.guest_port) == fields
    assert spec.rule() == rule
    assert parse_hostfwd(spec.rule()) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:[::1]:2222-[fec0::zz]:22", "bad guest address 'fec0::zz' (IPv4 or IPv6 expected)"),
        ("tcp:[::1:2222-:22", "bad host address in"),
        ("tcp:[::1]:2222-[::1:22", "bad guest address in"),
        ("tcp:[localhost]:2222-:22", "bad host address 'localhost'"),
    ],
)
def test_bad_ipv6_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(HostFwdSyntaxError, match=re.escape(message)):
        parse_hostfwd(text)


def test_remove_takes_a_bracketed_host_address() -> None:
    assert parse_hostfwd_remove("tcp:[::1]:2222") == ("tcp", "::1", 2222)
    assert parse_hostfwd_remove("udp:[0::1]:53") == ("udp", "::1", 53)


# ---- a Forwarder on a stand-in core -----------------------------------------------------------


class FakeTcp:
    def __init__(self) -> None:
        self.connects: list[tuple[bytes, bytes, int, bytes]] = []
        self.flows: dict[int, object] = {}

    def connect_guest(self, mac: bytes, addr: bytes, port: int, src: bytes, sport: int, now: float) -> int:
        self.connects.append((mac, addr, port, src))
        flow = 100 + len(self.connects)
        self.flows[flow] = object()
        return flow

    def close_flow(self, flow: int) -> None:
        self.flows.pop(flow, None)


class FakeUdpForwards:
    def __init__(self) -> None:
        self.opened: list[tuple[bytes, bytes, int]] = []

    def open(self, mac: bytes, addr: bytes, port: int, now: float) -> int:
        self.opened.append((mac, addr, port))
        return 200 + len(self.opened)

    def to_guest(self, flow: int, data: bytes, now: float) -> bool:
        return True

    def close_flow(self, flow: int) -> None:
        pass


class FakeLease:
    def __init__(self, mac: bytes, addr: bytes) -> None:
        self.mac = mac
        self.addr = addr


class FakeDhcp:
    def __init__(self) -> None:
        self.leases: list[FakeLease] = []

    def first_bound(self, now: float, present: dict[bytes, int]) -> FakeLease | None:
        return next((x for x in self.leases if x.mac in present), None)

    def bound_mac(self, addr: bytes, now: float) -> bytes | None:
        return next((x.mac for x in self.leases if x.addr == addr), None)


class FakeOut:
    def __init__(self) -> None:
        self.guest_macs: dict[bytes, bytes] = {}

    def mac_of(self, addr: bytes) -> bytes | None:
        return self.guest_macs.get(addr)


class FakeNdp:
    def __init__(self) -> None:
        self.solicited: list[bytes] = []

    def solicit(self, addr: bytes, now: float) -> None:
        self.solicited.append(addr)


class FakeSwitch:
    def __init__(self) -> None:
        self.mac_table: dict[bytes, int] = {}


class FakeStack:
    def __init__(self, config: NetConfig) -> None:
        self.config = config
        self.tcp = FakeTcp()
        self.udp_forwards = FakeUdpForwards()
        self.dhcp = FakeDhcp()
        self.out = FakeOut()
        self.ndp = FakeNdp()
        self.switch = FakeSwitch()
        self.v6: dict[bytes, bytes] = {}  # what stack.guest_ipv6 answers

    def guest_ipv6(self, mac: bytes) -> bytes | None:
        return self.v6.get(mac)


class FakeShell:
    def __init__(self, config: NetConfig) -> None:
        self.loop = asyncio.get_running_loop()
        self.stack = FakeStack(config)
        self.op_performers: dict[int, Any] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.dns_upstreams = None
        self.events: list[tuple[str, dict[str, object]]] = []
        self.host_tcp: HostTcp | None = None

    def now(self) -> float:
        return self.loop.time()

    def schedule_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def emit(self, name: str, data: dict[str, object]) -> None:
        self.events.append((name, data))


def run(test: Callable[[FakeShell, Forwarder], Awaitable[None]], config: NetConfig | None = None) -> None:
    async def main() -> None:
        shell = FakeShell(config or NetConfig())
        # HostTcp may be compiled: it runs on a real Shell, calling the stand-in core's TCP engine
        shell.host_tcp = HostTcp(Shell(Stack(shell.stack.config)))
        shell.host_tcp.tcp = cast(TcpCalls, shell.stack.tcp)
        forwarder = Forwarder(cast(Shell, shell))
        try:
            await test(shell, forwarder)
        finally:
            await forwarder.close()

    asyncio.run(main())


def one_guest(shell: FakeShell) -> FakeStack:
    """MAC1 connected, leased GUEST4, seen using GUEST6."""
    stack = shell.stack
    stack.switch.mac_table[MAC1] = 1
    stack.dhcp.leases.append(FakeLease(MAC1, GUEST4))
    stack.out.guest_macs[GUEST6] = MAC1
    stack.v6[MAC1] = GUEST6
    return stack


def test_guest_address_picks_family_and_guest() -> None:
    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        stack = shell.stack
        assert forwarder.guest_for(parse_hostfwd("tcp:[::1]:0-:22")) is None  # nobody yet
        assert forwarder.guest_for(parse_hostfwd("tcp:[::1]:0-[::]:22")) is None
        one_guest(shell)
        assert forwarder.guest_for(parse_hostfwd("tcp:[::1]:0-:22")) == (MAC1, GUEST4)  # IPv4, as QEMU
        assert forwarder.guest_for(parse_hostfwd("tcp::0-[fec0::5054:ff:fe12:3456]:22")) == (MAC1, GUEST6)
        assert forwarder.guest_for(parse_hostfwd("tcp::0-[::]:22")) == (MAC1, GUEST6)
        assert stack.ndp.solicited == []

    run(test)


def test_first_guest_for_ipv6_prefers_the_leased_one_then_any_present() -> None:
    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        stack = shell.stack
        stack.switch.mac_table[MAC2] = 2
        stack.switch.mac_table[MAC1] = 1
        stack.v6[MAC2] = OTHER6
        assert forwarder.guest_for(parse_hostfwd("tcp::0-[::]:22")) == (MAC2, OTHER6)  # no lease: table order
        stack.dhcp.leases.append(FakeLease(MAC1, GUEST4))
        stack.v6[MAC1] = GUEST6
        assert forwarder.guest_for(parse_hostfwd("tcp::0-[::]:22")) == (MAC1, GUEST6)
        del stack.v6[MAC1]  # the leased guest has no IPv6 address: the next one
        assert forwarder.guest_for(parse_hostfwd("tcp::0-[::]:22")) == (MAC2, OTHER6)

    run(test)


def test_unknown_ipv6_guest_is_solicited_and_refused() -> None:
    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        stack = one_guest(shell)
        spec = parse_hostfwd("tcp::0-[fec0::99]:22")
        assert forwarder.guest_for(spec) is None
        assert stack.ndp.solicited == [OTHER6]
        stack.out.guest_macs[OTHER6] = MAC2  # it answered, but from a guest no longer connected
        assert forwarder.guest_for(spec) is None
        assert stack.ndp.solicited == [OTHER6, OTHER6]
        stack.switch.mac_table[MAC2] = 2
        assert forwarder.guest_for(spec) == (MAC2, OTHER6)

    run(test)


def test_guest_addresses_outside_the_networks_are_refused() -> None:
    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        cases = [
            ("tcp::0-[2001:db8::1]:22", "guest address 2001:db8::1 is not a guest address of fec0::/64"),
            ("tcp::0-[fec0::2]:22", "guest address fec0::2 is not a guest address of fec0::/64"),
            ("tcp::0-[fec0::3]:22", "is not a guest address"),
            ("tcp::0-[fec0::]:22", "is not a guest address"),
            ("tcp::0-10.0.2.2:22", "guest address 10.0.2.2 is not a guest address of 10.0.2.0/24"),
        ]
        for rule, message in cases:
            with pytest.raises(ForwardError, match=re.escape(message)):
                await forwarder.add(parse_hostfwd(rule))
        assert forwarder.list() == []

    run(test)


def test_ipv6_guest_addresses_need_ipv6() -> None:
    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        for rule in ("tcp::0-[::]:22", "tcp::0-[fec0::5]:22"):
            with pytest.raises(ForwardError, match=r"IPv6 is off \(--no-ipv6\)"):
                await forwarder.add(parse_hostfwd(rule))
        added = await forwarder.add(parse_hostfwd("tcp:[::1]:0-:22"))  # an IPv6 listener is still fine
        assert added["host-addr"] == "::1"

    run(test, NetConfig(ipv6=False))


async def connect_and_wait(shell: FakeShell, family: int, host: str, port: int, count: int) -> None:
    client = socket.socket(family, socket.SOCK_STREAM)
    client.setblocking(False)
    await shell.loop.sock_connect(client, (host, port))
    try:
        async with asyncio.timeout(5):
            while len(shell.stack.tcp.connects) < count:
                await asyncio.sleep(0.01)
    finally:
        client.close()


def test_connections_on_an_ipv6_listener_go_to_either_family() -> None:
    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        stack = one_guest(shell)
        cfg = stack.config
        to_v4 = await forwarder.add(parse_hostfwd("tcp:[::1]:0-:22"))
        to_v6 = await forwarder.add(parse_hostfwd("tcp:[::1]:0-[fec0::5054:ff:fe12:3456]:22"))
        to_any6 = await forwarder.add(parse_hostfwd("tcp:127.0.0.1:0-[::]:80"))
        assert to_v4["rule"] == f"tcp:[::1]:{to_v4['host-port']}-:22"
        assert to_v6["rule"] == f"tcp:[::1]:{to_v6['host-port']}-[fec0::5054:ff:fe12:3456]:22"
        assert to_any6["rule"] == f"tcp:127.0.0.1:{to_any6['host-port']}-[::]:80"
        await connect_and_wait(shell, socket.AF_INET6, "::1", int(str(to_v4["host-port"])), 1)
        await connect_and_wait(shell, socket.AF_INET6, "::1", int(str(to_v6["host-port"])), 2)
        await connect_and_wait(shell, socket.AF_INET, "127.0.0.1", int(str(to_any6["host-port"])), 3)
        assert stack.tcp.connects == [
            (MAC1, GUEST4, 22, cfg.host_ip),
            (MAC1, GUEST6, 22, cfg.host_ip6),
            (MAC1, GUEST6, 80, cfg.host_ip6),
        ]
        assert [f["accepted"] for f in forwarder.list()] == [1, 1, 1]

    run(test)


def test_udp_forward_to_an_ipv6_guest() -> None:
    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        stack = one_guest(shell)
        added = await forwarder.add(parse_hostfwd("udp:[::1]:0-[::]:53"))
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        client.sendto(b"query", ("::1", int(str(added["host-port"]))))
        try:
            async with asyncio.timeout(5):
                while not stack.udp_forwards.opened:
                    await asyncio.sleep(0.01)
        finally:
            client.close()
        assert stack.udp_forwards.opened == [(MAC1, GUEST6, 53)]

    run(test)


def test_connection_to_an_unknown_ipv6_guest_waits_for_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemu_vpnnet.io import forwards

    monkeypatch.setattr(forwards, "NEIGHBOUR_WAIT", 0.3)

    async def test(shell: FakeShell, forwarder: Forwarder) -> None:
        stack = one_guest(shell)
        stack.switch.mac_table[MAC2] = 2
        added = await forwarder.add(parse_hostfwd("tcp:[::1]:0-[fec0::99]:22"))
        port = int(str(added["host-port"]))
        # the guest answers the solicitation: the held connection goes on
        answering = asyncio.get_running_loop().call_later(0.1, stack.out.guest_macs.__setitem__, OTHER6, MAC2)
        await connect_and_wait(shell, socket.AF_INET6, "::1", port, 1)
        answering.cancel()
        assert stack.ndp.solicited == [OTHER6]
        assert stack.tcp.connects == [(MAC2, OTHER6, 22, stack.config.host_ip6)]
        # nobody answers: refused (reset) after NEIGHBOUR_WAIT
        del stack.out.guest_macs[OTHER6]
        reader, writer = await asyncio.open_connection("::1", port)
        started = shell.loop.time()
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionResetError):
                await reader.read(1)  # an RST, not an EOF, ends it
        assert 0.25 < shell.loop.time() - started < 2.0
        writer.close()
        assert len(stack.tcp.connects) == 1 and stack.ndp.solicited == [OTHER6, OTHER6]
        assert [(f["accepted"], f["refused"]) for f in forwarder.list()] == [(1, 1)]

    run(test)

"""IPv6 and host names in the control plane, through qemu.qmp's QMPClient and `qemu-vpnnet ctl`:
forwards in QEMU's bracket syntax over QMP, HMP and ctl; query-leases with each guest's DHCP host
name and IPv6 addresses; query-neighbours."""

import json
from pathlib import Path
from typing import cast

import dpkt
import pytest

from qemu_vpnnet.core.config import NetConfig, ip6_bytes
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io.qemu_ports import QemuPort
from tests.guestframes import GUEST2_MAC, GUEST_MAC
from tests.test_qmp_ctl import BackendThread, backend, run_ctl  # noqa: F401 (backend: a fixture)
from tests.test_qmp_server import Env, error_of, run

NEIGHBOURS: list[dict[str, object]] = [
    {"address": "fec0::5054:ff:fe12:3456", "mac": "52:54:00:12:34:56", "age": 3.5},
    {"address": "fe80::5054:ff:fe12:3456", "mac": "52:54:00:12:34:56", "age": 0.25},
    {"address": "fec0::99", "mac": "52:54:00:ab:cd:ef", "age": 1.0},
]


def ipv6_port_is_free(port: int) -> bool:
    import socket

    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        probe.bind(("::1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def dhcp_message(mac: bytes, mtype: int, hostname: bytes = b"", requested: bytes = b"") -> bytes:
    opts = [(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes((mtype,)))]
    if requested:
        opts.append((dpkt.dhcp.DHCP_OPT_REQ_IP, requested))
        opts.append((dpkt.dhcp.DHCP_OPT_SERVER_ID, bytes((10, 0, 2, 2))))
    if hostname:
        opts.append((dpkt.dhcp.DHCP_OPT_HOSTNAME, hostname))
    return bytes(dpkt.dhcp.DHCP(chaddr=mac + bytes(10), xid=7, opts=opts))


def bind_lease(stack: Stack, mac: bytes, hostname: bytes, now: float) -> str:
    """DISCOVER then REQUEST (with option 12 when hostname) straight into the DHCP server."""
    offer = stack.dhcp.handle(dhcp_message(mac, dpkt.dhcp.DHCPDISCOVER), mac, now)
    assert offer is not None
    addr = int(dpkt.dhcp.DHCP(offer.payload).yiaddr).to_bytes(4, "big")
    ack = stack.dhcp.handle(dhcp_message(mac, dpkt.dhcp.DHCPREQUEST, hostname, addr), mac, now)
    assert ack is not None
    assert dict(dpkt.dhcp.DHCP(ack.payload).opts)[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes((dpkt.dhcp.DHCPACK,))
    return ".".join(str(b) for b in addr)


def with_neighbours(stack: Stack, now: float) -> None:
    """The core's IPv6 neighbour table as NEIGHBOURS says: each address claimed by its MAC that
    long ago (the core claims them from guest traffic, core/guard.py)."""
    for neighbour in NEIGHBOURS:
        mac = bytes.fromhex(str(neighbour["mac"]).replace(":", ""))
        addr = ip6_bytes(str(neighbour["address"]))
        stack.guard.claim6(addr, mac, now - float(cast(float, neighbour["age"])))


def neighbours_as_given(listed: object) -> bool:
    """Whether query-neighbours listed NEIGHBOURS (ages within a second: time goes on)."""
    assert isinstance(listed, list)
    got = {(n["address"], n["mac"]): float(n["age"]) for n in listed}
    want = {(n["address"], n["mac"]): float(cast(float, n["age"])) for n in NEIGHBOURS}
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1.0 for k in want)


def test_leases_carry_the_host_name_and_ipv6_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(env: Env) -> None:
        stack = env.shell.stack
        now = env.shell.now()
        with_neighbours(stack, now)
        client = await env.client()
        first = bind_lease(stack, GUEST_MAC, b"debian", now)
        second = bind_lease(stack, GUEST2_MAC, b"", now)
        leases = await client.execute("query-leases")
        assert isinstance(leases, list)
        assert [(x["mac"], x["address"], x["hostname"], x["ipv6-addresses"]) for x in leases] == [
            ("52:54:00:12:34:56", first, "debian", ["fe80::5054:ff:fe12:3456", "fec0::5054:ff:fe12:3456"]),
            ("52:54:00:ab:cd:ef", second, "", ["fec0::99"]),
        ]
        assert set(leases[0]) == {"mac", "address", "expires-in", "hostname", "ipv6-addresses"}
        # a renewal without option 12 keeps the name
        addr = bytes(int(p) for p in first.split("."))
        stack.dhcp.handle(dhcp_message(GUEST_MAC, dpkt.dhcp.DHCPREQUEST, b"", addr), GUEST_MAC, now + 10)
        leases = await client.execute("query-leases")
        assert isinstance(leases, list) and leases[0]["hostname"] == "debian"
        assert neighbours_as_given(await client.execute("query-neighbours"))
        shown = await client.execute("human-monitor-command", {"command-line": "info leases"})
        assert isinstance(shown, str)
        first_line = shown.splitlines()[0]
        assert first_line.startswith(f"52:54:00:12:34:56 {first} expires in ")
        assert first_line.endswith(" hostname debian ipv6 fe80::5054:ff:fe12:3456,fec0::5054:ff:fe12:3456")

    run(tmp_path, test)


def test_hostfwd_with_ipv6_over_qmp_and_hmp(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        client = await env.client()
        by_rule = await client.execute("hostfwd-add", {"rule": "tcp:[::1]:0-[fec0::5054:ff:fe12:3456]:22"})
        assert isinstance(by_rule, dict)
        port = by_rule["host-port"]
        assert by_rule["host-addr"] == "::1" and by_rule["guest-addr"] == "fec0::5054:ff:fe12:3456"
        assert by_rule["rule"] == f"tcp:[::1]:{port}-[fec0::5054:ff:fe12:3456]:22"
        assert not ipv6_port_is_free(port)
        structured = await client.execute(
            "hostfwd-add", {"host-addr": "[::1]", "host-port": 0, "guest-addr": "[::]", "guest-port": 80}
        )
        assert isinstance(structured, dict)
        assert structured["host-addr"] == "::1" and structured["guest-addr"] == "::"
        to_v4 = await client.execute("hostfwd-add", {"host-addr": "::1", "host-port": 0, "guest-port": 22})
        assert isinstance(to_v4, dict) and to_v4["rule"] == f"tcp:[::1]:{to_v4['host-port']}-:22"
        klass, desc = await error_of(client, "hostfwd-add", {"rule": "tcp:[::1]:0-[2001:db8::1]:22"})
        assert klass == "GenericError" and "is not a guest address of fec0::/64" in desc
        klass, desc = await error_of(client, "hostfwd-add", {"rule": "tcp:[::1]:0-[fec0::zz]:22"})
        assert "bad guest address 'fec0::zz' (IPv4 or IPv6 expected)" in desc
        await client.execute("hostfwd-remove", {"host-addr": "[::1]", "host-port": port})
        assert ipv6_port_is_free(port)

        async def hmp(line: str) -> object:
            return await client.execute("human-monitor-command", {"command-line": line})

        assert await hmp("hostfwd_add vnet udp:[::1]:0-[::]:53") == ""
        forwards = await client.execute("query-hostfwd")
        assert isinstance(forwards, list)
        udp = [f for f in forwards if f["protocol"] == "udp"]
        assert len(udp) == 1 and udp[0]["rule"] == f"udp:[::1]:{udp[0]['host-port']}-[::]:53"
        removed = await hmp(f"hostfwd_remove udp:[::1]:{udp[0]['host-port']}")
        assert removed == f"host forwarding rule for udp:[::1]:{udp[0]['host-port']} removed\r\n"
        assert await client.execute("query-hostfwd") == [structured, to_v4]

    run(tmp_path, test)


def test_ipv6_guest_addresses_refused_when_ipv6_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.test_qmp_server as server_tests

    monkeypatch.setattr(server_tests, "NetConfig", lambda: NetConfig(ipv6=False))

    async def test(env: Env) -> None:
        client = await env.client()
        _klass, desc = await error_of(client, "hostfwd-add", {"rule": "tcp:[::1]:0-[::]:22"})
        assert "IPv6 is off (--no-ipv6)" in desc

    run(tmp_path, test)


def test_ctl_leases_neighbours_and_ipv6_forwards(
    backend: BackendThread,  # noqa: F811 (the fixture)
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert backend.shell is not None
    stack = backend.shell.stack
    with_neighbours(stack, backend.shell.now())
    bind_lease(stack, GUEST_MAC, b"debian\x1b[2J", backend.shell.now())  # a guest's name with an escape sequence
    assert run_ctl(backend, "leases") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MAC", "ADDRESS", "IPV6", "EXPIRES-IN", "HOSTNAME"]
    cells = lines[1].split()
    assert cells[:3] == ["52:54:00:12:34:56", "10.0.2.15", "fe80::5054:ff:fe12:3456,fec0::5054:ff:fe12:3456"]
    assert cells[4] == "debian?[2J"
    assert run_ctl(backend, "leases", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["hostname"] == "debian\x1b[2J"
    assert run_ctl(backend, "neighbours") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ADDRESS", "MAC", "AGE", "PRESENT"]
    assert lines[1].split() == ["fec0::5054:ff:fe12:3456", "52:54:00:12:34:56", "4s", "no"]
    assert len(lines) == 4

    assert run_ctl(backend, "--json", "hostfwd", "add", "tcp:[::1]:0-[fec0::5]:22") == 0
    added = json.loads(capsys.readouterr().out)[0]
    port = added["host-port"]
    assert run_ctl(backend, "hostfwd", "list") == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == ["tcp", f"[::1]:{port}", "[fec0::5]:22"]
    assert run_ctl(backend, "hostfwd", "remove", f"tcp:[::1]:{port}") == 0
    assert capsys.readouterr().out == f"removed tcp:[::1]:{port}-[fec0::5]:22\n"
    assert ipv6_port_is_free(port)


# ---- with the real core: what a guest's own IPv6 traffic teaches ------------------------------


def guest_ns_frame(src: bytes, target: bytes) -> bytes:
    """A neighbor solicitation for target from the guest at src (its MAC in the source option)."""
    body = bytes(4) + target + b"\x01\x01" + GUEST_MAC
    dst = b"\xff\x02" + bytes(9) + b"\x01\xff" + target[13:]
    icmp = dpkt.icmp6.ICMP6(type=135, code=0, data=body)
    pkt = dpkt.ip6.IP6(src=src, dst=dst, nxt=58, hlim=255, data=icmp)
    pkt.plen = len(bytes(icmp))
    mcast = b"\x33\x33" + dst[12:]
    return bytes(dpkt.ethernet.Ethernet(dst=mcast, src=GUEST_MAC, type=dpkt.ethernet.ETH_TYPE_IP6, data=bytes(pkt)))


class FramePort(QemuPort):
    """A QEMU port that keeps what it is sent."""

    def __init__(self) -> None:
        self.id = 1
        self.description = "frames kept by the test"
        self.frames: list[bytes] = []

    def send_frames(self, frames: list[bytes]) -> int:
        self.frames.extend(frames)
        return 0

    def close(self) -> None:
        pass


def test_real_core_neighbours_leases_and_a_forward_to_the_guests_ipv6_address(tmp_path: Path) -> None:
    import asyncio
    import socket

    from qemu_vpnnet.core.config import ip6_bytes

    guest6 = ip6_bytes("fec0::5054:ff:fe12:3456")

    async def test(env: Env) -> None:
        stack = env.shell.stack
        if not hasattr(stack, "guest_ipv6"):
            pytest.skip("the core has no IPv6 neighbour table yet")
        client = await env.client()
        port = FramePort()
        stack.attach_port(1)
        env.shell.ports[1] = port
        now = env.shell.now()
        bind_lease(stack, GUEST_MAC, b"debian", now)
        stack.frame_received(1, guest_ns_frame(guest6, stack.config.host_ip6), now)
        neighbours = await client.execute("query-neighbours")
        assert isinstance(neighbours, list)
        assert [(n["address"], n["mac"]) for n in neighbours] == [("fec0::5054:ff:fe12:3456", "52:54:00:12:34:56")]
        leases = await client.execute("query-leases")
        assert isinstance(leases, list) and leases[0]["ipv6-addresses"] == ["fec0::5054:ff:fe12:3456"]
        assert leases[0]["hostname"] == "debian"

        added = await client.execute("hostfwd-add", {"rule": "tcp:[::1]:0-[::]:22"})
        assert isinstance(added, dict)
        port.frames.clear()
        _reader, writer = await asyncio.open_connection("::1", added["host-port"], family=socket.AF_INET6)
        try:
            syn = None
            async with asyncio.timeout(5):
                while syn is None:
                    await asyncio.sleep(0.01)
                    for frame in port.frames:
                        eth = dpkt.ethernet.Ethernet(frame)
                        if isinstance(eth.data, dpkt.ip6.IP6) and isinstance(eth.data.data, dpkt.tcp.TCP):
                            syn = eth
            ip6 = syn.data
            assert syn.dst == GUEST_MAC
            assert (ip6.src, ip6.dst, ip6.data.dport) == (stack.config.host_ip6, guest6, 22)
            assert ip6.data.flags & dpkt.tcp.TH_SYN
        finally:
            writer.close()

    run(tmp_path, test)

"""The host-side sockets of the UDP NAT, the ping proxy and the TCP connector, on real sockets over
loopback (127.0.0.1 and ::1) and a real Shell, with a recording stand-in for the core engines (the
host-side classes call them as io/core_calls.py describes): what the core is told about replies
and ICMP/ICMPv6 errors, for both families. Compiled or not, the same classes run.

Ping sockets and "no route" failures need a network namespace of our own (the ping sysctl is per
namespace, and this host may have IPv6 routes): those checks run in `unshare -n` when the kernel
lets us, and are skipped otherwise.
"""

import asyncio
import dataclasses
import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from qemu_vpnnet.core.actions import OP_PING_SEND, OP_UDP_CLOSE, OP_UDP_OPEN, OP_UDP_SEND, HostOp
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io import host_tcp as host_tcp_module
from qemu_vpnnet.io.core_calls import IcmpCalls, TcpCalls, UdpCalls
from qemu_vpnnet.io.host_ping import HostPing
from qemu_vpnnet.io.host_tcp import HostTcp, peer_closed
from qemu_vpnnet.io.host_udp import HostUdp, icmp6_as_icmp4
from qemu_vpnnet.io.shell import Shell

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0
Call = tuple[Any, ...]


class Recorder:
    """Any core method: records (name, *args) and wakes whoever waits for calls."""

    def __init__(self, log: list[Call], event: asyncio.Event) -> None:
        self._log = log
        self._event = event
        self.flows: dict[int, object] = {}  # TcpEngine.flows: HostTcp.opened() checks membership
        self.on_call: Callable[[str], None] | None = None  # told each call's name, after recording

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            if args and isinstance(args[-1], float):
                args = args[:-1]  # now
            self._log.append((name, *args))
            self._event.set()
            if self.on_call is not None:
                self.on_call(name)

        return record


class HostSide:
    """The host-side handlers on a real Shell (its loop, op performers and counters), with one
    Recorder in place of the core engines they call."""

    def __init__(self) -> None:
        self.shell = Shell(Stack(NetConfig()))
        self.loop = self.shell.loop
        self.calls: list[Call] = []
        self.called = asyncio.Event()
        self.core = Recorder(self.calls, self.called)
        self.op_performers = self.shell.op_performers
        self.counters = self.shell.stack.counters

    def host_tcp(self) -> HostTcp:
        host = HostTcp(self.shell)
        host.tcp = cast(TcpCalls, self.core)
        return host

    def host_udp(self) -> HostUdp:
        host = HostUdp(self.shell)
        host.udp = cast(UdpCalls, self.core)
        return host

    def host_ping(self) -> HostPing:
        host = HostPing(self.shell)
        host.icmp = cast(IcmpCalls, self.core)
        return host

    def perform(self, *ops: HostOp) -> None:
        """One batch of ops, as Shell.flush performs them."""
        for op in ops:
            self.op_performers[op.kind](op)
        for done in self.shell.ops_done:
            done()

    async def call(self, name: str) -> Call:
        """The first recorded call to core method name (waiting for it)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for call in self.calls:
                    if call[0] == name:
                        return call
                self.called.clear()
                await self.called.wait()


def run(test: Callable[[HostSide], Awaitable[None]], loop: str = "asyncio") -> None:
    """test on a fresh HostSide, on asyncio's own event loop or on uvloop's."""

    async def main() -> None:
        await test(HostSide())

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


# ---- the ICMPv6 -> ICMPv4 table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("icmp6", "icmp4"),
    [
        ((1, 0), (3, 0)),  # no route to destination -> network unreachable
        ((1, 1), (3, 13)),  # administratively prohibited
        ((1, 2), (3, 1)),  # beyond scope -> host unreachable
        ((1, 3), (3, 1)),  # address unreachable -> host unreachable
        ((1, 4), (3, 3)),  # port unreachable
        ((1, 5), (3, 1)),
        ((1, 6), (3, 1)),
        ((2, 0), (3, 4)),  # packet too big -> fragmentation needed
        ((3, 0), (11, 0)),  # hop limit exceeded
        ((3, 1), (11, 1)),  # reassembly time exceeded
        ((4, 1), (12, 0)),  # parameter problem
    ],
)
def test_icmp6_errors_read_as_their_icmp4_meaning(icmp6: tuple[int, int], icmp4: tuple[int, int]) -> None:
    assert icmp6_as_icmp4(*icmp6) == icmp4


# ---- UDP NAT ----------------------------------------------------------------------------------


def echo_server(family: int, host: str) -> socket.socket:
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    server.setblocking(False)
    return server


async def udp_roundtrip(side: HostSide, family: int, host: str, open_addr: str) -> None:
    host_udp = side.host_udp()
    host_udp.install()
    server = echo_server(family, host)
    port = server.getsockname()[1]
    try:
        side.perform(HostOp(OP_UDP_OPEN, 7, addr=open_addr))
        sock = host_udp.sockets[7]
        assert sock.family == family
        side.perform(HostOp(OP_UDP_SEND, 7, addr=host, port=port, data=b"ping"))
        data, peer = await side.loop.sock_recvfrom(server, 100)
        assert data == b"ping"
        await side.loop.sock_sendto(server, b"pong", peer)
        call = await side.call("host_datagram")
        assert call == ("host_datagram", 7, b"pong", host, port)
        side.perform(HostOp(OP_UDP_CLOSE, 7))
        assert not host_udp.sockets
    finally:
        server.close()
        host_udp.close_all()


def test_ipv4_flow_gets_an_ipv4_socket_and_its_replies() -> None:
    run(lambda side: udp_roundtrip(side, socket.AF_INET, "127.0.0.1", ""))


@needs_ipv6
def test_ipv6_flow_gets_a_v6only_socket_and_its_replies() -> None:
    async def test(side: HostSide) -> None:
        await udp_roundtrip(side, socket.AF_INET6, "::1", "::")

    run(test)


@needs_ipv6
def test_ipv6_socket_is_bound_to_any_and_v6_only() -> None:
    async def test(side: HostSide) -> None:
        host_udp = side.host_udp()
        host_udp.open(HostOp(OP_UDP_OPEN, 1, addr="::"))
        sock = host_udp.sockets[1]
        assert sock.getsockname()[0] == "::" and sock.getsockname()[1] > 0
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockopt(41, 25) == 1  # IPV6_RECVERR
        host_udp.close_all()

    run(test)


def closed_port(family: int, host: str) -> int:
    probe = socket.socket(family, socket.SOCK_DGRAM)
    probe.bind((host, 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


async def port_unreachable(side: HostSide, family: int, host: str, open_addr: str) -> None:
    host_udp = side.host_udp()
    host_udp.install()
    port = closed_port(family, host)
    try:
        side.perform(HostOp(OP_UDP_OPEN, 3, addr=open_addr), HostOp(OP_UDP_SEND, 3, addr=host, port=port, data=b"x"))
        call = await side.call("host_error")
        assert call == ("host_error", 3, host, port, 3, 3, 0)  # ICMPv4 port unreachable, either family
        assert not [c for c in side.calls if c[0] == "host_refused"]
    finally:
        host_udp.close_all()


def test_ipv4_port_unreachable_reaches_the_core_with_its_destination() -> None:
    run(lambda side: port_unreachable(side, socket.AF_INET, "127.0.0.1", ""))


@needs_ipv6
def test_icmpv6_port_unreachable_reaches_the_core_as_icmpv4() -> None:
    run(lambda side: port_unreachable(side, socket.AF_INET6, "::1", "::"))


async def receive_all(server: socket.socket, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        while len(got) < count:
            data, _peer = await asyncio.get_running_loop().sock_recvfrom(server, 70000)
            got.append(data)
    return got


@pytest.mark.parametrize("batching", [True, False], ids=["sendmmsg", "sendto"])
@pytest.mark.parametrize(
    ("family", "host", "open_addr"), [(socket.AF_INET, "127.0.0.1", ""), (socket.AF_INET6, "::1", "::")]
)
def test_a_batch_of_datagrams_arrives_whole_and_in_order(
    batching: bool, family: int, host: str, open_addr: str
) -> None:
    """300 datagrams of one batch (sendmmsg: 64 per call), a refused one in the middle (too big
    for UDP: EMSGSIZE) sent alone and counted; a close in the same batch sends what was queued
    first; a second flow's datagrams are not mixed in."""
    if family == socket.AF_INET6 and not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback")

    async def test(side: HostSide) -> None:
        host_udp = side.host_udp()
        if not batching:
            host_udp.batching = False
        elif not host_udp.batching:
            pytest.skip("built without io/_batch_send.c")
        host_udp.install()
        server, other = echo_server(family, host), echo_server(family, host)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        port, other_port = server.getsockname()[1], other.getsockname()[1]
        try:
            sends = [HostOp(OP_UDP_SEND, 1, addr=host, port=port, data=b"%d" % i) for i in range(300)]
            sends.insert(150, HostOp(OP_UDP_SEND, 1, addr=host, port=port, data=bytes(70000)))
            sends.insert(10, HostOp(OP_UDP_SEND, 2, addr=host, port=other_port, data=b"other"))
            side.perform(HostOp(OP_UDP_OPEN, 1, addr=open_addr), HostOp(OP_UDP_OPEN, 2, addr=open_addr), *sends)
            assert await receive_all(server, 300) == [b"%d" % i for i in range(300)]
            assert await receive_all(other, 1) == [b"other"]
            assert side.counters.values == {"udp-host-send-errors": 1}
            closing = [HostOp(OP_UDP_SEND, 1, addr=host, port=port, data=b"last %d" % i) for i in range(3)]
            side.perform(*closing, HostOp(OP_UDP_CLOSE, 1))
            assert await receive_all(server, 3) == [b"last 0", b"last 1", b"last 2"]
            assert list(host_udp.sockets) == [2] and not host_udp.queued
        finally:
            server.close()
            other.close()
            host_udp.close_all()

    run(test)


def test_runs_of_equal_datagrams_go_out_segmented_and_arrive_as_they_were_sent() -> None:
    """UDP GSO (gso_max): runs of one size, a shorter one closing a run, a run to another
    address, a datagram above gso_max: every datagram arrives with its own boundaries, in order.
    A socket whose path refuses segmented sends (SO_NO_CHECK: the kernel's EINVAL for GSO) says
    so with gso_refused, and HostUdp sends that flow one by one from then on."""
    batch_send = pytest.importorskip("qemu_vpnnet.io._batch_send")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        echo_server(socket.AF_INET, "127.0.0.1") as server,
        echo_server(socket.AF_INET, "127.0.0.1") as other,
    ):
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        port, other_port = server.getsockname()[1], other.getsockname()[1]
        sizes = [1000] * 70 + [500] + [1000] * 5 + [2000, 2000, 1200, 1000, 0, 0, 1]
        ops = [
            HostOp(OP_UDP_SEND, 1, addr="127.0.0.1", port=port, data=bytes([i % 256]) * n) for i, n in enumerate(sizes)
        ]
        ops.insert(40, HostOp(OP_UDP_SEND, 1, addr="127.0.0.1", port=other_port, data=b"x" * 1000))
        assert batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops, 0, 1500) == (len(ops), 0, 0)
        got = [server.recv(70000) for _ in sizes]
        assert got == [bytes([i % 256]) * n for i, n in enumerate(sizes)]
        assert other.recv(70000) == b"x" * 1000
        sock.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK: the kernel refuses UDP GSO on it
        sent, error, refused = batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops[:10], 0, 1500)
        assert (sent, refused) == (0, 1) and error == errno.EINVAL
        assert batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops[:10], 0, 0) == (10, 0, 0)
        assert [server.recv(70000) for _ in range(10)] == [bytes([i % 256]) * 1000 for i in range(10)]

    async def test(side: HostSide) -> None:
        host_udp = side.host_udp()
        host_udp.install()
        server = echo_server(socket.AF_INET, "127.0.0.1")
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        port = server.getsockname()[1]
        try:
            side.perform(HostOp(OP_UDP_OPEN, 1))
            host_udp.sockets[1].setsockopt(socket.SOL_SOCKET, 11, 1)
            side.perform(*(HostOp(OP_UDP_SEND, 1, addr="127.0.0.1", port=port, data=b"%03d" % i) for i in range(200)))
            assert await receive_all(server, 200) == [b"%03d" % i for i in range(200)]
            assert host_udp.no_gso == {1} and not side.counters.values
            side.perform(HostOp(OP_UDP_CLOSE, 1))
            assert not host_udp.no_gso
        finally:
            server.close()
            host_udp.close_all()

    run(test)


def test_a_flood_to_a_closed_port_is_reported_and_the_open_peer_still_gets_its_datagrams() -> None:
    """A hostile guest's flood from one flow: batches of 100 to a closed port (each ICMP error
    fails the next send: the failing datagram is resent alone and the error goes to the core),
    interleaved with datagrams to an open peer, which all arrive in order; nothing is left
    queued and no send counts as an error of ours."""
    pytest.importorskip("qemu_vpnnet.io._batch_send")

    async def test(side: HostSide) -> None:
        host_udp = side.host_udp()
        host_udp.install()
        server = echo_server(socket.AF_INET, "127.0.0.1")
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        port, closed = server.getsockname()[1], closed_port(socket.AF_INET, "127.0.0.1")
        try:
            side.perform(HostOp(OP_UDP_OPEN, 1))
            expected = []
            for batch in range(5):
                ops = []
                for i in range(100):
                    ops.append(HostOp(OP_UDP_SEND, 1, addr="127.0.0.1", port=closed, data=b"flood"))
                    if i % 10 == 0:
                        data = b"ok %d %d" % (batch, i)
                        ops.append(HostOp(OP_UDP_SEND, 1, addr="127.0.0.1", port=port, data=data))
                        expected.append(data)
                side.perform(*ops)
                await asyncio.sleep(0.01)  # the ICMP errors come back between batches
            assert await receive_all(server, len(expected)) == expected
            await side.call("host_error")
            errors = [c for c in side.calls if c[0] == "host_error"]
            assert errors and all(c[1:4] == (1, "127.0.0.1", closed) for c in errors), errors[:3]
            assert not host_udp.queued and "udp-host-send-errors" not in side.counters.values
        finally:
            server.close()
            host_udp.close_all()

    run(test)


@dataclasses.dataclass
class Shaped:
    addr: object
    port: object
    data: object


def test_batch_send_checks_what_it_is_given() -> None:
    """io/_batch_send.c: a name that is not a numeric address stops the batch before it (EINVAL,
    for sendto() to explain); a port out of range too; objects of the wrong shape raise."""
    batch_send = pytest.importorskip("qemu_vpnnet.io._batch_send")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, echo_server(socket.AF_INET, "127.0.0.1") as server:
        port = server.getsockname()[1]
        ops = [
            HostOp(OP_UDP_SEND, 1, addr="127.0.0.1", port=port, data=b"a"),
            HostOp(OP_UDP_SEND, 1, addr="localhost", port=port, data=b"b"),
        ]
        assert batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops, 0) == (1, errno.EINVAL, 0)
        assert server.recv(10) == b"a"
        ops[1].addr, ops[1].port = "127.0.0.1", 70000
        assert batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops, 1) == (0, errno.EINVAL, 0)
        assert batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops, 2) == (0, 0, 0)
        ops[1].addr = "::1"  # an IPv6 address on an IPv4 socket: not numeric for AF_INET
        assert batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops, 1) == (0, errno.EINVAL, 0)
        with pytest.raises(IndexError):
            batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops, 3)
        with pytest.raises(ValueError):
            batch_send.send_datagrams(sock.fileno(), socket.AF_UNIX, ops, 0)
        with pytest.raises((TypeError, AttributeError)):
            batch_send.send_datagrams(sock.fileno(), socket.AF_INET, [object()], 0)
        with pytest.raises(TypeError):
            batch_send.send_datagrams(sock.fileno(), socket.AF_INET, [Shaped("127.0.0.1", port, 5)], 0)
        with pytest.raises(TypeError):
            batch_send.send_datagrams(sock.fileno(), socket.AF_INET, [Shaped(b"127.0.0.1", port, b"")], 0)
        assert batch_send.send_datagrams(-1, socket.AF_INET, ops, 0)[1] == errno.EBADF


# ---- TCP connector ----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_spliced_host_socket_has_no_nagle_delay(loop: str) -> None:
    """tune_stream leaves TCP_NODELAY to the event loop's TCP transports: both loops set it."""

    async def test(side: HostSide) -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host_tcp = side.host_tcp()
        side.core.flows[5] = object()
        try:
            await host_tcp.connect(5, "127.0.0.1", port)
            transport = host_tcp.conns[5].transport
            assert transport is not None
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            host_tcp.close_all()
            server.close()

    run(test, loop)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): a connected TCP pair on 127.0.0.1, ours non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    ours.setblocking(False)
    return ours, theirs


def settle(sock: socket.socket) -> None:
    """Until what the peer sent has reached sock (loopback: at once, but in softirq time)."""
    select.select([sock], [], [], TIMEOUT)
    time.sleep(0.01)


@pytest.mark.parametrize("built", [True, False], ids=["c", "python"])
def test_peer_closed_sees_only_a_fin_with_nothing_before_it(built: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """peer_closed (io/_tcp_state.c, or its Python fallback) asks, taking nothing: the data
    before the FIN stays readable, and a reset's error stays for the read."""
    if built:
        pytest.importorskip("qemu_vpnnet.io._tcp_state")
    monkeypatch.setattr(host_tcp_module, "HAVE_TCP_STATE", built)
    ours, theirs = tcp_pair()
    try:
        assert not peer_closed(ours.fileno())  # nothing yet
        theirs.sendall(b"answer")
        theirs.shutdown(socket.SHUT_WR)
        settle(ours)
        assert not peer_closed(ours.fileno())  # data first
        assert ours.recv(100) == b"answer"
        assert peer_closed(ours.fileno())
        assert peer_closed(ours.fileno())  # still: asking takes nothing
        assert ours.recv(100) == b""
    finally:
        ours.close()
        theirs.close()
    ours, theirs = tcp_pair()
    try:
        theirs.sendall(b"partial")
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()  # a reset
        settle(ours)
        assert not peer_closed(ours.fileno())
        assert ours.recv(100) == b"partial"
        assert not peer_closed(ours.fileno())  # a reset is no FIN
        with pytest.raises(ConnectionResetError):  # and its error is still there for the read
            ours.recv(100)
    finally:
        ours.close()
    a, b = socket.socketpair()  # a Unix stream socket (unix: and cmd: forwards) the same way
    b.sendall(b"x")
    b.shutdown(socket.SHUT_WR)
    assert not peer_closed(a.fileno())
    assert a.recv(10) == b"x"
    assert peer_closed(a.fileno())
    a.close()
    b.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("closes", [True, False], ids=["answer-and-close", "answer-only"])
def test_an_answer_and_the_fin_behind_it_reach_the_core_in_one_read(loop: str, closes: bool) -> None:
    """A server that answers and closes: the core is told of the data and the FIN in the same
    callback (peer_closed after the short read), not a turn of the loop apart, and only once."""

    async def test(side: HostSide) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        host_tcp = side.host_tcp()
        side.core.flows[5] = object()
        seen_next_turn: list[list[str]] = []

        def told() -> list[str]:  # host_read_buffer is asked before each read: not news
            return [c[0] for c in side.calls if c[0] != "host_read_buffer"]

        def on_call(name: str) -> None:
            if name == "host_data":  # what the core was told by the start of the next turn
                side.loop.call_soon(lambda: seen_next_turn.append(told()))

        side.core.on_call = on_call
        try:
            await host_tcp.connect(5, "127.0.0.1", listener.getsockname()[1])
            server, _ = listener.accept()
            server.sendall(b"answer")  # both before the loop runs again: one read sees both
            if closes:
                server.shutdown(socket.SHUT_WR)
            await side.call("host_data")
            await asyncio.sleep(0.1)
            names = told()
            if closes:
                assert seen_next_turn[0] == ["host_connected", "host_data", "host_eof"]
                assert names == ["host_connected", "host_data", "host_eof"]  # the loop's own EOF: not again
            else:
                assert names == ["host_connected", "host_data"]
                server.shutdown(socket.SHUT_WR)  # a FIN on its own: the loop's eof_received
                await side.call("host_eof")
            server.close()
        finally:
            host_tcp.close_all()
            listener.close()

    run(test, loop)


@needs_ipv6
def test_tcp_connect_to_an_ipv6_address() -> None:
    async def test(side: HostSide) -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "::1", 0)
        port = server.sockets[0].getsockname()[1]
        host_tcp = side.host_tcp()
        side.core.flows[5] = object()
        try:
            await host_tcp.connect(5, "::1", port)
            assert side.calls[0] == ("host_connected", 5)
            assert 5 in host_tcp.conns
        finally:
            host_tcp.close_all()
            server.close()

    run(test)


@needs_ipv6
def test_tcp_connect_to_a_closed_ipv6_port_is_refused() -> None:
    async def test(side: HostSide) -> None:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
        probe.close()
        host_tcp = side.host_tcp()
        await host_tcp.connect(5, "::1", port)
        assert side.calls == [("host_refused", 5, errno.ECONNREFUSED)]

    run(test)


# ---- in a network namespace of our own: ping sockets, and no IPv6 route at all ------------------


def in_namespace() -> None:
    """Run inside `unshare -n` (lo brought up, ping sockets allowed): prints what failed, if anything."""
    import uvloop

    async def checks(side: HostSide) -> None:
        # a ping socket per family: the echo reply (type 0 / 129) reaches the core as the kernel gives it
        host_ping = side.host_ping()
        host_ping.install()
        echo4 = bytes((8, 0, 0, 0, 0, 0, 0, 1)) + b"abc"
        echo6 = bytes((128, 0, 0, 0, 0, 0, 0, 1)) + b"abc"
        side.op_performers[OP_PING_SEND](HostOp(OP_PING_SEND, 1, addr="127.0.0.1", data=echo4))
        side.op_performers[OP_PING_SEND](HostOp(OP_PING_SEND, 2, addr="::1", data=echo6))
        assert host_ping.sockets[1].family == socket.AF_INET
        assert host_ping.sockets[2].family == socket.AF_INET6
        async with asyncio.timeout(TIMEOUT):
            while len([c for c in side.calls if c[0] == "host_reply"]) < 2:
                side.called.clear()
                await side.called.wait()
        replies = {c[1]: c for c in side.calls if c[0] == "host_reply"}
        assert replies[1][2][0] == 0 and replies[1][3] == "127.0.0.1", replies
        assert replies[2][2][0] == 129 and replies[2][2][8:] == b"abc" and replies[2][3] == "::1", replies
        # no IPv6 route: ping, UDP and TCP fail at once, as network unreachable
        side.calls.clear()
        side.op_performers[OP_PING_SEND](HostOp(OP_PING_SEND, 3, addr="2001:db8::1", data=echo6))
        assert side.calls == [("host_error", 3, "2001:db8::1", 3, 0, 0, echo6)], side.calls
        host_ping.close_all()
        side.calls.clear()
        host_udp = side.host_udp()
        host_udp.install()
        side.perform(HostOp(OP_UDP_OPEN, 4, addr="::"), HostOp(OP_UDP_SEND, 4, addr="2001:db8::1", port=53, data=b"q"))
        assert side.calls == [("host_error", 4, "2001:db8::1", 53, 3, 0, 0)], side.calls
        host_udp.close_all()
        side.calls.clear()
        host_tcp = side.host_tcp()
        started = side.loop.time()
        host_tcp.op_connect(HostOp(1, 5, addr="2001:db8::1", port=443))
        await side.call("host_refused")
        assert side.calls == [("host_refused", 5, errno.ENETUNREACH)], side.calls
        assert side.loop.time() - started < 1.0

    async def main() -> None:
        await checks(HostSide())

    asyncio.run(main())
    uvloop.run(main())  # the backend's loop: its create_connection must keep the errno too
    print("namespace checks passed")


def test_ping_sockets_and_no_route_in_a_namespace_of_our_own() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare(1) and ip(8)")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a network namespace here")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = (
        "ip link set lo up && echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range && "
        f"exec {sys.executable} -c 'from tests.test_host_sockets import in_namespace; in_namespace()'"
    )
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "namespace checks passed" in result.stdout


def test_batch_send_reuses_a_parsed_address_only_for_the_same_text_and_port() -> None:
    """io/_batch_send.c parses an address once per run of ops sharing its text object and port: a
    new port or a new text is parsed again, and no reference to the text is kept after the call."""
    batch_send = pytest.importorskip("qemu_vpnnet.io._batch_send")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        echo_server(socket.AF_INET, "127.0.0.1") as first,
        echo_server(socket.AF_INET, "127.0.0.1") as second,
    ):
        text = "".join(["127.0.0.", "1"])  # a str object of its own
        ports = [first.getsockname()[1], second.getsockname()[1]]
        order = [0, 0, 1, 1, 0, 1]
        ops = [HostOp(OP_UDP_SEND, 1, addr=text, port=ports[k], data=b"%d" % i) for i, k in enumerate(order)]
        ops.append(HostOp(OP_UDP_SEND, 1, addr="127.0.0.2", port=ports[0], data=b"elsewhere"))
        ops.append(HostOp(OP_UDP_SEND, 1, addr=text, port=70000, data=b"bad port"))
        before = sys.getrefcount(text)
        assert batch_send.send_datagrams(sock.fileno(), socket.AF_INET, ops, 0) == (7, errno.EINVAL, 0)
        assert sys.getrefcount(text) == before
        assert [first.recv(100) for _ in range(3)] == [b"0", b"1", b"4"]
        assert [second.recv(100) for _ in range(3)] == [b"2", b"3", b"5"]
        first.setblocking(False)
        with pytest.raises(BlockingIOError):  # "elsewhere" went to 127.0.0.2, not to the address before it
            first.recv(100)

"""Port forwarding from host to guest: listeners on the host, connections opened toward a guest.

A TCP connection accepted on a forward's listener becomes a TCP connection that the core opens
toward the guest: SYN from the gateway address (config.host_ip) and a source port of our own, so
a guest server sees every forwarded client as coming from the gateway (as with QEMU's slirp).
The host socket is not read until the guest accepted; a guest RST closes it at once (the host
client sees a reset), and a guest that does not answer times out.

Forwards without a guest address go to the guest holding the first live lease at the time of
each connection, so they follow a guest whose address changes; while no guest has a lease,
connections are refused (reset) right away. That is the guest's IPv4 address whatever the host
side listens on (as in QEMU: `tcp:[::1]:2222-:22` reaches the guest's IPv4 port 22).

A forward to a guest IPv6 address goes over IPv6, from the gateway's IPv6 address
(config.host_ip6), to the guest whose MAC the core saw use that address. While that is unknown
the core sends a neighbor solicitation for it; a TCP connection waits up to NEIGHBOUR_WAIT for
the answer and is refused after that (a UDP datagram is dropped: the client's retry finds the
guest); a guest that has just configured its SLAAC address may have sent nothing from it yet.
The guest address `[::]` means the IPv6 address the first guest (by lease, then by the switch's
table) was last seen using in the prefix.
"""

import asyncio
import builtins
import errno
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any, Final, cast

from qemu_vpnnet.core.actions import OP_UDP_FWD_CLOSE, OP_UDP_FWD_REPLY, HostOp
from qemu_vpnnet.core.config import any_ip_bytes, ip_str
from qemu_vpnnet.hostfwd import (
    GUEST_IPV6_ANY,
    ForwardSpec,
    HostFwdSyntaxError,
    check_guest_addr,
    check_host_addr,
    check_protocol,
)
from qemu_vpnnet.io import ratelog
from qemu_vpnnet.io.host_tcp import HostConnection, HostTcp
from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.hostfwd")

SOURCE_PORT_FIRST: Final = 49152
PeerAddr = tuple[Any, ...]  # a host peer's socket address
MAX_FORWARDS: Final = 1024
NEIGHBOUR_WAIT: Final = 1.0  # seconds a forwarded connection waits for an unknown IPv6 guest to answer
NEIGHBOUR_POLL: Final = 0.02  # how often it looks meanwhile (a neighbor advertisement takes < 1 ms)


class ForwardError(Exception):
    """A forward cannot be added or removed; the message is for the user."""


class Forward:
    """One active forward: its listener and the flows it opened."""

    def __init__(self, spec: ForwardSpec, bound_port: int) -> None:
        self.spec = spec
        self.bound_port = bound_port
        self.server: asyncio.AbstractServer | None = None
        self.udp: UdpForward | None = None
        self.flows: set[int] = set()
        self.accepted = 0
        self.refused = 0

    def key(self) -> tuple[str, str, int]:
        return (self.spec.protocol, self.spec.host_addr, self.bound_port)

    def describe(self) -> dict[str, object]:
        spec = self.spec
        return {
            "protocol": spec.protocol,
            "host-addr": spec.host_addr,
            "host-port": self.bound_port,
            "guest-addr": spec.guest_addr,
            "guest-port": spec.guest_port,
            "rule": spec.rule(self.bound_port),
            "connections": len(self.flows),
            "accepted": self.accepted,
            "refused": self.refused,
        }


class Forwarder:
    """The forward table: add, remove, list; persisted to a state file when one is given."""

    def __init__(self, shell: Shell, state_file: str | None = None) -> None:
        self.shell = shell
        self.state_file = state_file
        self.forwards: dict[tuple[str, str, int], Forward] = {}
        self.next_source_port = SOURCE_PORT_FIRST
        self.udp_peers: dict[int, tuple[UdpForward, PeerAddr]] = {}  # UDP forward flow -> (socket, peer)
        # more sections of the state file (the policy's gateway services and run-time rules)
        self.extra_state: Callable[[], dict[str, object]] | None = None
        self.privilege_note = ""  # after --user: why binding a low port fails (cli.lock_down)
        shell.op_performers[OP_UDP_FWD_REPLY] = self.op_udp_reply
        shell.op_performers[OP_UDP_FWD_CLOSE] = self.op_udp_close

    @property
    def host_tcp(self) -> HostTcp:
        if self.shell.host_tcp is None:
            raise ForwardError("TCP forwarding is not available (no host TCP handler)")
        return self.shell.host_tcp

    # ---- table -------------------------------------------------------------------------
    async def add(self, spec: ForwardSpec, persist: bool = True) -> dict[str, object]:
        if len(self.forwards) >= MAX_FORWARDS:
            raise ForwardError(f"too many forwards (at most {MAX_FORWARDS})")
        if spec.host_port and (spec.protocol, spec.host_addr, spec.host_port) in self.forwards:
            raise ForwardError(f"a {spec.protocol} forward from {spec.host_addr}:{spec.host_port} exists already")
        self.check_guest(spec.guest_addr)
        family = socket.AF_INET6 if ":" in spec.host_addr else socket.AF_INET
        try:
            if spec.protocol == "tcp":
                forward = await self._listen_tcp(spec, family)
            else:
                forward = await self._listen_udp(spec, family)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            if exc.errno == errno.EACCES and self.privilege_note:
                reason += f" ({self.privilege_note})"
            raise ForwardError(f"cannot listen on {spec.protocol} {spec.host_addr}:{spec.host_port}: {reason}") from exc
        self.forwards[forward.key()] = forward
        info = forward.describe()
        log.info("forward added: %s", info["rule"])
        self.shell.emit("HOSTFWD_ADDED", info)
        if persist:
            self.save()
        return info

    def check_guest(self, guest_addr: str) -> None:
        """ForwardError unless guest_addr ("" or "::" aside) can be a guest's address."""
        if not guest_addr:
            return
        cfg = self.shell.stack.config
        addr = any_ip_bytes(guest_addr)
        if len(addr) == 16:
            if not cfg.ipv6:
                raise ForwardError(f"guest address {guest_addr}: IPv6 is off (--no-ipv6)")
            if guest_addr == GUEST_IPV6_ANY:
                return
            if not cfg.contains6(addr) or addr in (cfg.host_ip6, cfg.dns_ip6) or addr[8:] == bytes(8):
                raise ForwardError(f"guest address {guest_addr} is not a guest address of {cfg.network6}")
        elif not cfg.contains(addr) or addr in (cfg.host_ip, cfg.dns_ip, cfg.net_addr, cfg.broadcast):
            raise ForwardError(f"guest address {guest_addr} is not a guest address of {cfg.network}")

    async def _listen_tcp(self, spec: ForwardSpec, family: int) -> Forward:
        forward = Forward(spec, spec.host_port)
        server = await self.shell.loop.create_server(
            lambda: HostConnection(self.host_tcp, -1, lambda conn: self.accepted(forward, conn)),
            spec.host_addr,
            spec.host_port,
            family=family,
            reuse_address=True,
        )
        forward.server = server
        forward.bound_port = server.sockets[0].getsockname()[1]
        return forward

    async def _listen_udp(self, spec: ForwardSpec, family: int) -> Forward:
        forward = Forward(spec, spec.host_port)
        transport, protocol = await self.shell.loop.create_datagram_endpoint(
            lambda: UdpForward(self, forward), local_addr=(spec.host_addr, spec.host_port), family=family
        )
        forward.udp = protocol
        forward.bound_port = transport.get_extra_info("sockname")[1]
        return forward

    async def remove(
        self, protocol: str, host_addr: str, host_port: int, close_connections: bool = False, persist: bool = True
    ) -> dict[str, object]:
        try:
            key = (check_protocol(protocol), check_host_addr(host_addr), host_port)
        except HostFwdSyntaxError as exc:
            raise ForwardError(str(exc)) from exc
        forward = self.forwards.pop(key, None)
        if forward is None:
            raise ForwardError(f"no {key[0]} forward from {key[1]}:{key[2]}")
        if forward.server is not None:
            forward.server.close()  # the port is free again at once: the listening socket is closed now
        if forward.udp is not None:
            await forward.udp.close()
        if close_connections:
            self.close_flows(forward)
        info = forward.describe()
        log.info("forward removed: %s", info["rule"])
        self.shell.emit("HOSTFWD_REMOVED", info)
        if persist:
            self.save()
        return info

    def close_flows(self, forward: Forward) -> None:
        tcp = self.shell.stack.tcp
        host_tcp = self.shell.host_tcp
        for flow in list(forward.flows):
            tcp.close_flow(flow)
            if host_tcp is not None:
                conn = host_tcp.conns.pop(flow, None)
                if conn is not None:
                    conn.abort_with_rst()
        forward.flows.clear()
        self.shell.schedule_flush()

    def list(self) -> list[dict[str, object]]:
        self.prune()
        return [forward.describe() for forward in self.forwards.values()]

    def prune(self) -> None:
        flows = self.shell.stack.tcp.flows
        for forward in self.forwards.values():
            forward.flows.intersection_update(flows)

    async def close(self) -> None:
        for forward in list(self.forwards.values()):
            if forward.server is not None:
                forward.server.close()
            if forward.udp is not None:
                await forward.udp.close()
            self.close_flows(forward)
        self.forwards.clear()

    def op_udp_reply(self, op: HostOp) -> None:
        peer = self.udp_peers.get(op.flow)
        if peer is not None:
            peer[0].reply(peer[1], op.data)

    def op_udp_close(self, op: HostOp) -> None:
        peer = self.udp_peers.pop(op.flow, None)
        if peer is not None:
            peer[0].peer_flows.pop(peer[1], None)

    # ---- connections -------------------------------------------------------------------
    def guest_for(self, spec: ForwardSpec, quiet: bool = False) -> tuple[bytes, bytes] | None:
        """(guest MAC, guest address of 4 or 16 bytes) for a new forwarded connection, or None if
        no guest is there (logged, rate-limited per rule and reason: io/ratelog.py; with quiet,
        an unknown IPv6 guest is solicited but not logged).

        Only guests whose QEMU is still connected count: a lease outlives its guest.
        """
        stack = self.shell.stack
        now = self.shell.now()
        present = stack.switch.mac_table
        rule = spec.rule()
        if spec.guest_addr == GUEST_IPV6_ANY:
            lease = stack.dhcp.first_bound(now, present)
            candidates = ([lease.mac] if lease is not None else []) + list(present)
            for candidate in candidates:
                found = stack.guest_ipv6(candidate)
                if found is not None:
                    return candidate, found
            ratelog.info(log, f"no-v6 {rule}", "forward %s: no guest has an IPv6 address yet; connection refused", rule)
            return None
        if spec.guest_addr:
            addr = any_ip_bytes(spec.guest_addr)
            if len(addr) == 16:
                mac = stack.out.mac_of(addr)
                if mac is None or mac not in present:
                    stack.ndp.solicit(addr, now)
                    self.shell.schedule_flush()
                    if not quiet:
                        self.log_no_neighbour(spec)
                    return None
                return mac, addr
            mac = stack.dhcp.bound_mac(addr, now) or stack.out.mac_of(addr)
            if mac is None or mac not in present:
                ratelog.info(
                    log, f"no-guest {rule}", "forward %s: no guest at %s; connection refused", rule, spec.guest_addr
                )
                return None
            return mac, addr
        lease = stack.dhcp.first_bound(now, present)
        if lease is None:
            ratelog.info(log, f"no-lease {rule}", "forward %s: no guest has a lease yet; connection refused", rule)
            return None
        return lease.mac, lease.addr

    @staticmethod
    def log_no_neighbour(spec: ForwardSpec) -> None:
        rule = spec.rule()
        ratelog.info(
            log,
            f"no-neighbour {rule}",
            "forward %s: no guest answers at %s (neighbor solicitation sent); refused",
            rule,
            spec.guest_addr,
        )

    def accepted(self, forward: Forward, conn: HostConnection) -> None:
        transport = conn.transport
        assert transport is not None
        transport.pause_reading()  # read only once the guest accepted
        spec = forward.spec
        guest = self.guest_for(spec, quiet=True)
        if guest is None and ":" in spec.guest_addr and spec.guest_addr != GUEST_IPV6_ANY:
            task = self.shell.loop.create_task(self.await_neighbour(forward, conn))
            self.shell.tasks.add(task)
            task.add_done_callback(self.shell.tasks.discard)
            return
        if guest is None:
            forward.refused += 1
            conn.abort_with_rst()
            return
        self.open_to_guest(forward, conn, guest)

    async def await_neighbour(self, forward: Forward, conn: HostConnection) -> None:
        """Hold a connection for an IPv6 guest being solicited: open it once the core knows the
        guest's MAC, refuse it after NEIGHBOUR_WAIT."""
        spec = forward.spec
        deadline = self.shell.now() + NEIGHBOUR_WAIT
        while self.shell.now() < deadline:
            await asyncio.sleep(NEIGHBOUR_POLL)
            transport = conn.transport
            if conn.gone or transport is None or transport.is_closing():
                return  # the host client gave up
            stack = self.shell.stack
            addr = any_ip_bytes(spec.guest_addr)
            mac = stack.out.mac_of(addr)
            if mac is not None and mac in stack.switch.mac_table:
                self.open_to_guest(forward, conn, (mac, addr))
                return
        forward.refused += 1
        self.log_no_neighbour(spec)
        conn.abort_with_rst()

    def open_to_guest(self, forward: Forward, conn: HostConnection, guest: tuple[bytes, bytes]) -> None:
        """The core opens the accepted connection toward the guest, from the gateway address of
        the guest address's family."""
        mac, addr = guest
        stack = self.shell.stack
        source = stack.config.host_ip6 if len(addr) == 16 else stack.config.host_ip
        flow = -1
        for _attempt in range(64):
            port = self.next_source_port
            self.next_source_port = port + 1 if port < 65535 else SOURCE_PORT_FIRST
            flow = stack.tcp.connect_guest(mac, addr, forward.spec.guest_port, source, port, self.shell.now())
            if flow >= 0:
                break
        if flow < 0:
            forward.refused += 1
            rule = forward.spec.rule()
            ratelog.warning(log, f"no-slot {rule}", "forward %s: no connection slot free; refused", rule)
            conn.abort_with_rst()
            return
        forward.accepted += 1
        conn.flow = flow
        self.host_tcp.adopt(flow, conn)
        forward.flows.add(flow)
        if len(forward.flows) > 4096:
            self.prune()
        log.debug("forward %s: flow %d to %s:%d", forward.spec.rule(), flow, ip_str(addr), forward.spec.guest_port)
        self.shell.schedule_flush()

    # ---- persistence -------------------------------------------------------------------
    def save(self) -> None:
        """Write the table atomically (temporary file, fsync, rename)."""
        if not self.state_file:
            return
        rules = [
            {
                "protocol": f.spec.protocol,
                "host-addr": f.spec.host_addr,
                "host-port": f.bound_port,
                "guest-addr": f.spec.guest_addr,
                "guest-port": f.spec.guest_port,
            }
            for f in self.forwards.values()
        ]
        directory = os.path.dirname(os.path.abspath(self.state_file))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".vpnnet-state-", dir=directory)
            state: dict[str, object] = {"version": 1, "hostfwd": rules}
            if self.extra_state is not None:
                state.update(self.extra_state())
            with os.fdopen(fd, "w") as stream:
                json.dump(state, stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.error("cannot write state file %s: %s", self.state_file, exc)

    def load_state_data(self) -> dict[str, Any]:
        """The state file's JSON object ({} if there is none); ForwardError if unreadable."""
        if not self.state_file or not os.path.exists(self.state_file):
            return {}
        try:
            with open(self.state_file) as stream:
                data = json.load(stream)
        except (OSError, ValueError) as exc:
            raise ForwardError(f"state file {self.state_file} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise ForwardError(f"state file {self.state_file} is unreadable: not a JSON object")
        return data

    def load_state(self) -> builtins.list[ForwardSpec]:
        """The forwards in the state file (none if it does not exist); ForwardError if unreadable."""
        data = self.load_state_data()
        try:
            specs = []
            for rule in data.get("hostfwd", []):
                specs.append(
                    ForwardSpec(
                        check_protocol(str(rule["protocol"])),
                        check_host_addr(str(rule["host-addr"])),
                        int(rule["host-port"]),
                        check_guest_addr(str(rule.get("guest-addr", ""))),
                        int(rule["guest-port"]),
                    )
                )
            return specs
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ForwardError(f"state file {self.state_file} is unreadable: {exc}") from exc


class UdpForward(asyncio.DatagramProtocol):
    """The host socket of a UDP forward: each host peer address is one flow toward the guest."""

    MAX_PEERS: Final = 4096

    def __init__(self, forwarder: Forwarder, forward: Forward) -> None:
        self.forwarder = forwarder
        self.forward = forward
        self.transport: asyncio.DatagramTransport | None = None
        self.peer_flows: dict[PeerAddr, int] = {}  # host peer address -> flow
        self.socket_closed = asyncio.Event()  # set once the transport has closed its socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: PeerAddr) -> None:
        forwarder = self.forwarder
        stack = forwarder.shell.stack
        now = forwarder.shell.now()
        flow = self.peer_flows.get(addr)
        if flow is not None and not stack.udp_forwards.to_guest(flow, data, now):
            forwarder.udp_peers.pop(flow, None)
            del self.peer_flows[addr]
            flow = None
        if flow is None:
            guest = forwarder.guest_for(self.forward.spec)
            if guest is None:
                self.forward.refused += 1
                return  # no guest with a lease yet: dropped, as a datagram to nobody
            if len(self.peer_flows) >= self.MAX_PEERS:
                oldest_addr, oldest_flow = next(iter(self.peer_flows.items()))
                del self.peer_flows[oldest_addr]
                forwarder.udp_peers.pop(oldest_flow, None)
                stack.udp_forwards.close_flow(oldest_flow)
            mac, guest_ip = guest
            flow = stack.udp_forwards.open(mac, guest_ip, self.forward.spec.guest_port, now)
            self.peer_flows[addr] = flow
            forwarder.udp_peers[flow] = (self, addr)
            self.forward.accepted += 1
            stack.udp_forwards.to_guest(flow, data, now)
        forwarder.shell.schedule_flush()

    def reply(self, addr: PeerAddr, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp forward %s: %s", self.forward.spec.rule(), exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.socket_closed.set()

    async def close(self) -> None:
        """Close, and return once the port is free: the transport closes its socket in a later
        callback, so a QMP reply sent right after transport.close() could reach a client that
        then finds the port still bound."""
        stack = self.forwarder.shell.stack
        for flow in self.peer_flows.values():
            self.forwarder.udp_peers.pop(flow, None)
            stack.udp_forwards.close_flow(flow)
        self.peer_flows.clear()
        if self.transport is not None:
            self.transport.close()
            try:
                await asyncio.wait_for(self.socket_closed.wait(), 1.0)
            except TimeoutError:
                log.warning("udp forward %s: socket not closed after 1 s", self.forward.spec.rule())

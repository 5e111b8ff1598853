"""Host UDP sockets of the UDP NAT: performs OP_UDP_OPEN/SEND/CLOSE, feeds replies to the core.

The datagrams a batch of guest frames sends on one socket go out in one sendmmsg (the C helper
io/_batch_send.c, when built): the shell calls flush_sends after each batch of ops. A run of
equal-sized datagrams to one address is one message with UDP GSO (UDP_SEGMENT), unless the path
refused that once (then that flow sends one by one). A datagram the kernel does not take is
sent again alone, on the path that reports its error.

One non-blocking socket per flow, bound to an ephemeral port of 0.0.0.0 (an IPv4 flow, op.addr
"") or of :: with IPV6_V6ONLY (an IPv6 flow, op.addr "::"), connected to nothing (so replies
from any peer are accepted) and read with loop.add_reader. IP_RECVERR (IPV6_RECVERR) is set so
that the kernel reports ICMP errors (port unreachable, ...) on an unconnected socket: reading
then fails with ECONNREFUSED (or another errno) and the details -- which destination, which
ICMP type and code -- wait on the socket's error queue, read with MSG_ERRQUEUE.

The core speaks ICMPv4 to the shell for both families: an ICMPv6 error is handed over as the
ICMPv4 type and code that mean the same (icmp6_as_icmp4), and the core translates back toward
an IPv6 guest. A send that fails at once for want of a route (ENETUNREACH, EHOSTUNREACH: a host
without IPv6 connectivity) is reported as network or host unreachable, so that the guest learns
it at once instead of waiting for a reply.
"""

import errno
import logging
import os
import socket
import struct
from typing import Final

from qemu_vpnnet.core.actions import OP_UDP_CLOSE, OP_UDP_OPEN, OP_UDP_SEND, HostOp
from qemu_vpnnet.io.core_calls import UdpCalls
from qemu_vpnnet.io.shell import Shell

try:  # a socket's datagrams of one batch in one sendmmsg (io/_batch_send.c); optional
    from qemu_vpnnet.io._batch_send import send_datagrams

    HAVE_BATCH_SEND = True
except ImportError:  # the package was built without it: one sendto() per datagram
    HAVE_BATCH_SEND = False

log = logging.getLogger("qemu_vpnnet.udp")

SOL_IP: Final = 0
IP_RECVERR: Final = 11  # linux/in.h; not exported by Python's socket module
SO_EE_ORIGIN_ICMP: Final = 2
SOL_IPV6: Final = 41
IPV6_RECVERR: Final = 25  # linux/in6.h
SO_EE_ORIGIN_ICMP6: Final = 3
MSG_ERRQUEUE: Final = 0x2000
EXTENDED_ERR: Final = struct.Struct("=IBBBBII")  # struct sock_extended_err
READS_PER_WAKEUP: Final = 64
GSO_MAX: Final = 65507  # the largest segment a run of equal datagrams is sent with (UDP GSO)
ERRORS_PER_WAKEUP: Final = 16

# ICMPv4 as the core takes it (RFC 792)
ICMP_DEST_UNREACH: Final = 3
ICMP_TIME_EXCEEDED: Final = 11
ICMP_PARAMETER_PROBLEM: Final = 12
UNREACH_NET: Final = 0
UNREACH_HOST: Final = 1
UNREACH_PORT: Final = 3
UNREACH_FRAG_NEEDED: Final = 4
UNREACH_ADMIN: Final = 13
# ICMPv6 destination unreachable codes (RFC 4443 3.1) and their ICMPv4 meaning; the other codes
# (beyond scope, failed ingress policy, reject route) are "host unreachable"
ICMP6_UNREACH_CODES: Final = {0: UNREACH_NET, 1: UNREACH_ADMIN, 3: UNREACH_HOST, 4: UNREACH_PORT}
# a send refused by the routing table at once: what the guest is told
UNREACH_ERRNOS: Final = {errno.ENETUNREACH: UNREACH_NET, errno.EHOSTUNREACH: UNREACH_HOST}

HostError = tuple[str, int, int, int, int, bytes]  # address, port, ICMPv4 type, code, info, original payload


def icmp6_as_icmp4(icmp_type: int, code: int) -> tuple[int, int]:
    """The ICMPv4 (type, code) meaning the same as an ICMPv6 error (RFC 4443).

    Destination unreachable keeps its sense (no route: net; administratively prohibited: admin;
    address: host; port: port); packet too big is "fragmentation needed" (the MTU stays in the
    error's info); time exceeded keeps its code (hop limit, reassembly); parameter problem is
    ICMPv4's pointer-indicates-the-error. Anything else reads as host unreachable.
    """
    if icmp_type == 1:
        return ICMP_DEST_UNREACH, ICMP6_UNREACH_CODES.get(code, UNREACH_HOST)
    if icmp_type == 2:
        return ICMP_DEST_UNREACH, UNREACH_FRAG_NEEDED
    if icmp_type == 3:
        return ICMP_TIME_EXCEEDED, code
    if icmp_type == 4:
        return ICMP_PARAMETER_PROBLEM, 0
    return ICMP_DEST_UNREACH, UNREACH_HOST


def peer_text(address: object) -> tuple[str, int]:
    """(address, port) of a socket address of either family: an IPv6 one without its %scope."""
    if not isinstance(address, tuple) or len(address) < 2:
        return "", 0
    return str(address[0]).partition("%")[0], int(address[1])


def open_recverr_socket(proto: int, family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking datagram socket (UDP, or ICMP/ICMPv6 for ping) with IP(V6)_RECVERR on; an
    AF_INET6 one is IPv6 only."""
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(SOL_IP, IP_RECVERR, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def read_error_queue(sock: socket.socket) -> list[HostError]:
    """Drain (some of) the socket's error queue.

    Returns (destination address, destination port, ICMP type, ICMP code, info, original
    payload) for each ICMP or ICMPv6 error, the latter as ICMPv4 (icmp6_as_icmp4); local errors
    are skipped.
    """
    errors: list[HostError] = []
    for _ in range(ERRORS_PER_WAKEUP):
        try:
            data, ancdata, _flags, address = sock.recvmsg(2048, 512, MSG_ERRQUEUE)
        except OSError:
            break
        addr, port = peer_text(address)
        if not addr:
            continue
        for level, kind, raw in ancdata:
            if len(raw) < EXTENDED_ERR.size:
                continue
            _errno, origin, icmp_type, code, _pad, info, _data = EXTENDED_ERR.unpack_from(raw)
            if level == SOL_IP and kind == IP_RECVERR and origin == SO_EE_ORIGIN_ICMP:
                errors.append((addr, port, icmp_type, code, info, data))
            elif level == SOL_IPV6 and kind == IPV6_RECVERR and origin == SO_EE_ORIGIN_ICMP6:
                icmp_type, code = icmp6_as_icmp4(icmp_type, code)
                errors.append((addr, port, icmp_type, code, info, data))
    return errors


class HostUdp:
    """The host sockets of every UDP flow, by flow number."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.loop = shell.loop
        self.udp: UdpCalls = shell.stack.udp  # core/udp.py UdpNat (a test may record its calls)
        self.sockets: dict[int, socket.socket] = {}
        # each socket's address family as a plain int: socket.family builds an enum member at
        # every call (measured: 2 % of the backend's CPU on a UDP stream)
        self.families: dict[int, int] = {}
        self.open_errors = 0
        self.batching = HAVE_BATCH_SEND
        self.queued: dict[int, list[HostOp]] = {}  # flow -> its sends of this batch of ops
        self.no_gso: set[int] = set()  # flows whose path refused a segmented (UDP GSO) send

    def install(self) -> None:
        self.shell.op_performers[OP_UDP_OPEN] = self.open
        self.shell.op_performers[OP_UDP_SEND] = self.queue if self.batching else self.send
        self.shell.op_performers[OP_UDP_CLOSE] = self.close
        self.shell.ops_done.append(self.flush_sends)

    def open(self, op: HostOp) -> None:
        ipv6 = op.addr == "::"
        try:
            sock = open_recverr_socket(socket.IPPROTO_UDP, socket.AF_INET6 if ipv6 else socket.AF_INET)
            try:
                sock.bind(("::" if ipv6 else "0.0.0.0", 0))
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            self.open_errors += 1
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.shell.out_of_descriptors("UDP socket", exc)
            elif self.open_errors <= 10 or self.open_errors % 1000 == 0:
                log.warning("cannot open a UDP socket for flow %d: %s (%d failures)", op.flow, exc, self.open_errors)
            self.udp.host_failed(op.flow, self.loop.time())
            self.shell.schedule_flush()
            return
        self.sockets[op.flow] = sock
        self.families[op.flow] = socket.AF_INET6 if ipv6 else socket.AF_INET
        self.loop.add_reader(sock.fileno(), self.readable, op.flow, sock)

    def queue(self, op: HostOp) -> None:
        """OP_UDP_SEND, batched: sent by flush_sends once the batch of ops is done."""
        if op.flow not in self.sockets:
            return
        sends = self.queued.get(op.flow)
        if sends is None:
            self.queued[op.flow] = [op]
        else:
            sends.append(op)

    def flush_sends(self) -> None:
        """Send what queue() collected, one sendmmsg per socket and batch of 64."""
        if not self.queued:
            return
        queued = self.queued
        self.queued = {}
        for flow, sends in queued.items():
            self.send_queued(flow, sends)

    def send_queued(self, flow: int, sends: list[HostOp]) -> None:
        sock = self.sockets.get(flow)
        if sock is None:
            return
        start = 0
        while start < len(sends):
            gso_max = 0 if flow in self.no_gso else GSO_MAX
            sent, error, gso_refused = send_datagrams(sock.fileno(), self.families[flow], sends, start, gso_max)
            start += sent
            if start >= len(sends):
                return
            if gso_refused:  # this path takes no segmented sends: this flow sends one by one
                self.no_gso.add(flow)
                log.debug(
                    "UDP flow %d: segmented send refused (%s); sending datagrams one by one", flow, os.strerror(error)
                )
                continue
            if error in (errno.EAGAIN, errno.EWOULDBLOCK):  # the socket's buffer is full: as send() does
                self.shell.stack.counters.add("udp-host-send-dropped", len(sends) - start)
                return
            self.send(sends[start])  # it fails again there (or not), with its error handled
            start += 1

    def send(self, op: HostOp) -> None:
        sock = self.sockets.get(op.flow)
        if sock is None:
            return
        counters = self.shell.stack.counters
        for _attempt in range(2):
            try:
                sock.sendto(op.data, (op.addr, op.port))
                return
            except BlockingIOError:
                counters.add("udp-host-send-dropped")
                return
            except OSError as exc:
                # An ICMP error reported earlier (IP_RECVERR) fails the next send once; its
                # details are on the error queue. Pass them on and send again.
                reported = self.report_errors(op.flow, sock)
                if isinstance(exc, ConnectionRefusedError) and not reported:
                    self.udp.host_refused(op.flow, self.loop.time())
                    self.shell.schedule_flush()
                    reported = True
                if reported:
                    continue
                unreach = UNREACH_ERRNOS.get(exc.errno or 0)
                if unreach is not None:  # no route there: the guest hears it now, not after a timeout
                    counters.add("udp-host-unreachable")
                    self.udp.host_error(op.flow, op.addr, op.port, ICMP_DEST_UNREACH, unreach, 0, self.loop.time())
                    self.shell.schedule_flush()
                    return
                counters.add("udp-host-send-errors")
                log.debug("UDP flow %d: send to %s:%d failed: %s", op.flow, op.addr, op.port, exc)
                return

    def close(self, op: HostOp) -> None:
        sends = self.queued.pop(op.flow, None)
        if sends:
            self.send_queued(op.flow, sends)
        self.no_gso.discard(op.flow)
        sock = self.sockets.pop(op.flow, None)
        self.families.pop(op.flow, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def readable(self, flow: int, sock: socket.socket) -> None:
        udp = self.udp
        now = self.loop.time()
        received = 0
        refused = False
        for _ in range(READS_PER_WAKEUP):
            try:
                data, address = sock.recvfrom(65536)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                refused = True
                continue
            except OSError:
                continue
            received += 1
            addr, port = peer_text(address)
            udp.host_datagram(flow, data, addr, port, now)
        if not received or refused:
            if not self.report_errors(flow, sock) and refused:
                udp.host_refused(flow, now)
        self.shell.schedule_flush()

    def report_errors(self, flow: int, sock: socket.socket) -> bool:
        """Pass the ICMP errors waiting on sock's error queue to the core; False when none."""
        errors = read_error_queue(sock)
        if not errors:
            return False
        now = self.loop.time()
        udp = self.udp
        for addr, port, icmp_type, code, info, _original in errors:
            udp.host_error(flow, addr, port, icmp_type, code, info, now)
        self.shell.schedule_flush()
        return True

    def close_all(self) -> None:
        for flow in list(self.sockets):
            self.close(HostOp(OP_UDP_CLOSE, flow))


def install_host_udp(shell: Shell) -> HostUdp:
    host_udp = HostUdp(shell)
    host_udp.install()
    return host_udp

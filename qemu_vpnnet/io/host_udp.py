"""Host UDP sockets of the UDP NAT: performs OP_UDP_OPEN/SEND/CLOSE, feeds replies to the core.

One non-blocking socket per flow, bound to 0.0.0.0 on an ephemeral port, connected to nothing
(so replies from any peer are accepted) and read with loop.add_reader. IP_RECVERR is set so
that the kernel reports ICMP errors (port unreachable, ...) on an unconnected socket: reading
then fails with ECONNREFUSED (or another errno) and the details -- which destination, which
ICMP type and code -- wait on the socket's error queue, read with MSG_ERRQUEUE.
"""

import errno
import logging
import socket
import struct
from typing import Final

from qemu_vpnnet.core.actions import OP_UDP_CLOSE, OP_UDP_OPEN, OP_UDP_SEND, HostOp
from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.udp")

SOL_IP: Final = 0
IP_RECVERR: Final = 11  # linux/in.h; not exported by Python's socket module
SO_EE_ORIGIN_ICMP: Final = 2
MSG_ERRQUEUE: Final = 0x2000
EXTENDED_ERR: Final = struct.Struct("=IBBBBII")  # struct sock_extended_err
READS_PER_WAKEUP: Final = 64
ERRORS_PER_WAKEUP: Final = 16


def open_recverr_socket(proto: int) -> socket.socket:
    """A non-blocking AF_INET datagram socket (UDP, or ICMP for ping) with IP_RECVERR on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, proto)
    try:
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def read_error_queue(sock: socket.socket) -> list[tuple[str, int, int, int, int, bytes]]:
    """Drain (some of) the socket's error queue.

    Returns (destination address, destination port, ICMP type, ICMP code, info, original
    payload) for each ICMP error; local errors are skipped.
    """
    errors: list[tuple[str, int, int, int, int, bytes]] = []
    for _ in range(ERRORS_PER_WAKEUP):
        try:
            data, ancdata, _flags, address = sock.recvmsg(2048, 512, MSG_ERRQUEUE)
        except OSError:
            break
        for level, kind, raw in ancdata:
            if level != SOL_IP or kind != IP_RECVERR or len(raw) < EXTENDED_ERR.size:
                continue
            _errno, origin, icmp_type, code, _pad, info, _data = EXTENDED_ERR.unpack_from(raw)
            if origin == SO_EE_ORIGIN_ICMP and isinstance(address, tuple):
                errors.append((str(address[0]), int(address[1]), icmp_type, code, info, data))
    return errors


class HostUdp:
    """The host sockets of every UDP flow, by flow number."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.loop = shell.loop
        self.sockets: dict[int, socket.socket] = {}
        self.open_errors = 0

    def install(self) -> None:
        self.shell.op_performers[OP_UDP_OPEN] = self.open
        self.shell.op_performers[OP_UDP_SEND] = self.send
        self.shell.op_performers[OP_UDP_CLOSE] = self.close

    def open(self, op: HostOp) -> None:
        try:
            sock = open_recverr_socket(socket.IPPROTO_UDP)
            try:
                sock.bind(("0.0.0.0", 0))
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            self.open_errors += 1
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.shell.out_of_descriptors("UDP socket", exc)
            elif self.open_errors <= 10 or self.open_errors % 1000 == 0:
                log.warning("cannot open a UDP socket for flow %d: %s (%d failures)", op.flow, exc, self.open_errors)
            self.shell.stack.udp.host_failed(op.flow, self.loop.time())
            self.shell.schedule_flush()
            return
        self.sockets[op.flow] = sock
        self.loop.add_reader(sock.fileno(), self.readable, op.flow, sock)

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
                    self.shell.stack.udp.host_refused(op.flow, self.loop.time())
                    self.shell.schedule_flush()
                    reported = True
                if reported:
                    continue
                counters.add("udp-host-send-errors")
                log.debug("UDP flow %d: send to %s:%d failed: %s", op.flow, op.addr, op.port, exc)
                return

    def close(self, op: HostOp) -> None:
        sock = self.sockets.pop(op.flow, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def readable(self, flow: int, sock: socket.socket) -> None:
        udp = self.shell.stack.udp
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
            udp.host_datagram(flow, data, address[0], address[1], now)
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
        udp = self.shell.stack.udp
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

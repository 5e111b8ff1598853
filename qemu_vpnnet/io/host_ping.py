"""Host ping sockets of the ICMP echo proxy: performs OP_PING_SEND/OP_PING_CLOSE.

Unprivileged ping sockets (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`, and for an op.addr with
a ":" `socket(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6)`, opened on a flow's first echo) need the
process's group inside net.ipv4.ping_group_range (a per-network-namespace sysctl that gates
both families; "1 0", no group, is the kernel default). An IPv6 flow sends and reads ICMPv6
echo messages (types 128 and 129) unchanged; its errors reach the core as ICMPv4 types and
codes (host_udp.icmp6_as_icmp4), as the UDP NAT's do.

When the kernel refuses ping sockets this is logged once, with the fix, and the core stops
trying for a while (echo to the gateway and DNS addresses still works: the core answers those
itself). A send refused at once for want of a route (ENETUNREACH, EHOSTUNREACH) is reported to
the core as network or host unreachable.
"""

import errno
import logging
import os
import socket

from qemu_vpnnet.core.actions import OP_PING_CLOSE, OP_PING_SEND, HostOp
from qemu_vpnnet.io.core_calls import IcmpCalls
from qemu_vpnnet.io.host_udp import (
    ICMP_DEST_UNREACH,
    READS_PER_WAKEUP,
    UNREACH_ERRNOS,
    open_recverr_socket,
    peer_text,
    read_error_queue,
)
from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.ping")

PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"
REFUSED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT)


def ping_group_range() -> str:
    try:
        with open(PING_GROUP_RANGE, encoding="ascii") as f:
            return " ".join(f.read().split())
    except OSError:
        return "unknown"


class HostPing:
    """The ping sockets of every ICMP echo flow, by flow number."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.loop = shell.loop
        self.icmp: IcmpCalls = shell.stack.icmp  # core/icmp.py IcmpProxy (a test may record its calls)
        self.sockets: dict[int, socket.socket] = {}
        self.refused_logged = False
        self.open_errors = 0

    def install(self) -> None:
        self.shell.op_performers[OP_PING_SEND] = self.send
        self.shell.op_performers[OP_PING_CLOSE] = self.close

    def open(self, flow: int, ipv6: bool = False) -> socket.socket | None:
        icmp = self.icmp
        try:
            if ipv6:
                sock = open_recverr_socket(socket.IPPROTO_ICMPV6, socket.AF_INET6)
            else:
                sock = open_recverr_socket(socket.IPPROTO_ICMP)
        except OSError as exc:
            if exc.errno in REFUSED_ERRNOS:
                if not self.refused_logged:
                    self.refused_logged = True
                    log.warning(
                        "ping to the outside is off: the kernel refuses unprivileged ICMP sockets (%s; "
                        "net.ipv4.ping_group_range is %r, group ids %s). Guests can still ping the gateway. "
                        "To allow it (for IPv4 and IPv6): sysctl -w net.ipv4.ping_group_range='0 2147483647'",
                        exc.strerror,
                        ping_group_range(),
                        sorted({os.getegid(), *os.getgroups()}),
                    )
                icmp.unavailable(self.loop.time())
            else:
                self.open_errors += 1
                if self.open_errors <= 10 or self.open_errors % 1000 == 0:
                    log.warning("cannot open a ping socket: %s (%d failures)", exc, self.open_errors)
                icmp.host_failed(flow, self.loop.time())
            self.shell.schedule_flush()
            return None
        if self.refused_logged:
            log.info("ping sockets work again")
            self.refused_logged = False
        self.sockets[flow] = sock
        self.loop.add_reader(sock.fileno(), self.readable, flow, sock)
        return sock

    def send(self, op: HostOp) -> None:
        sock = self.sockets.get(op.flow)
        if sock is None:
            sock = self.open(op.flow, ":" in op.addr)
            if sock is None:
                return
        for _attempt in range(2):
            try:
                sock.sendto(op.data, (op.addr, 0))
                return
            except BlockingIOError:
                break
            except OSError as exc:
                if self.report_errors(op.flow, sock):
                    continue
                unreach = UNREACH_ERRNOS.get(exc.errno or 0)
                if unreach is not None:  # no route there: the guest hears it now
                    self.icmp.host_error(op.flow, op.addr, ICMP_DEST_UNREACH, unreach, 0, op.data, self.loop.time())
                    self.shell.schedule_flush()
                    return
                log.debug("ping flow %d: send to %s failed: %s", op.flow, op.addr, exc)
                break
        self.shell.stack.counters.add("icmp-host-send-errors")

    def close(self, op: HostOp) -> None:
        sock = self.sockets.pop(op.flow, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def readable(self, flow: int, sock: socket.socket) -> None:
        icmp = self.icmp
        now = self.loop.time()
        received = 0
        failed = False
        for _ in range(READS_PER_WAKEUP):
            try:
                data, address = sock.recvfrom(65536)
            except BlockingIOError:
                break
            except OSError:
                failed = True
                continue
            received += 1
            icmp.host_reply(flow, data, peer_text(address)[0], now)
        if not received or failed:
            self.report_errors(flow, sock)
        self.shell.schedule_flush()

    def report_errors(self, flow: int, sock: socket.socket) -> bool:
        errors = read_error_queue(sock)
        now = self.loop.time()
        for addr, _port, icmp_type, code, info, original in errors:
            self.icmp.host_error(flow, addr, icmp_type, code, info, original, now)
        if errors:
            self.shell.schedule_flush()
        return bool(errors)

    def close_all(self) -> None:
        for flow in list(self.sockets):
            self.close(HostOp(OP_PING_CLOSE, flow))


def install_host_ping(shell: Shell) -> HostPing:
    host_ping = HostPing(shell)
    host_ping.install()
    return host_ping

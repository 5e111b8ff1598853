"""The TCP splice engine: every guest TCP connection is joined to one host socket.

Toward the guest this module is a real TCP endpoint (RFC 9293): handshake, MSS and window
scaling, sequence and acknowledgement tracking, retransmission, out-of-order segments kept in a
bounded queue, half-close both ways, RST both ways. Toward the host it asks the shell for socket
operations (connect, send, shutdown, close, abort, pause/resume reading).

A guest SYN becomes a host connect(); the guest sees SYN-ACK only once the host connect
succeeded, and RST (or an ICMP error) when it failed. Forwarded host connections go the other
way (connect_guest): SYN toward the guest, and the host socket is read only once it answered.

Sequence numbers are kept unwrapped as Python ints (64-bit in practice); only the wire sees 32.
Memory per connection is bounded: at most SND_BUF_LIMIT bytes waiting for the guest (host
reading is paused above it) and at most RCV_WINDOW bytes out of order; the window we advertise
stops moving while the host socket cannot take more.
"""

import errno
import heapq
from typing import Final, final

from qemu_vpnnet.core.actions import (
    OP_PAUSE_READING,
    OP_RESUME_READING,
    OP_TCP_ABORT,
    OP_TCP_ACCEPTED,
    OP_TCP_CLOSE,
    OP_TCP_CONNECT,
    OP_TCP_SEND,
    OP_TCP_SHUTDOWN,
    HostOp,
)
from qemu_vpnnet.core.config import ip_str
from qemu_vpnnet.core.fwd import DIRECT, DIRECT_ROUTE, FORWARD, PROTO_TCP, PROXY, REFUSE, REPLY_DROP, REPLY_ICMP, Route
from qemu_vpnnet.core.guard import GuestUsage
from qemu_vpnnet.core.output import Output
from qemu_vpnnet.core.packets import ETH_HLEN, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN
from qemu_vpnnet.core.switch import TSO_V4, TSO_V6
from qemu_vpnnet.core.tcp_wire import (
    MAX_SACK_BLOCKS,
    OPT_SACK,
    address_sums,
    build_tcp_frame,
    build_tcp_frame_with,
    header_template,
    parse_syn_options,
    sack_option,
    syn_options,
    tcp_options,
    tcp_segments,
    unpack_tcp_header,
    unwrap,
)

# States, named as in RFC 9293; CONNECTING is SYN received from the guest, host connect pending.
CLOSED: Final = 0
SYN_SENT: Final = 1
SYN_RECEIVED: Final = 2
ESTABLISHED: Final = 3
FIN_WAIT_1: Final = 4
FIN_WAIT_2: Final = 5
CLOSE_WAIT: Final = 6
CLOSING: Final = 7
LAST_ACK: Final = 8
TIME_WAIT: Final = 9
CONNECTING: Final = 10
STATE_NAMES: Final = (
    "CLOSED",
    "SYN-SENT",
    "SYN-RECEIVED",
    "ESTABLISHED",
    "FIN-WAIT-1",
    "FIN-WAIT-2",
    "CLOSE-WAIT",
    "CLOSING",
    "LAST-ACK",
    "TIME-WAIT",
    "CONNECTING",
)

RCV_WINDOW: Final = 1 << 20  # what we let the guest have in flight toward us
RCV_WSCALE: Final = 5
SND_BUF_LIMIT: Final = 1 << 20  # bytes from the host waiting for the guest before we stop reading
READ_ROOM: Final = 256 << 10  # the most room one host read is given at the send buffer's end
READ_ROOM_MIN: Final = 16 << 10  # ... and the least, also past SND_BUF_LIMIT (reading pauses there)
SND_BUF_MAX: Final = 2 * (SND_BUF_LIMIT + READ_ROOM)  # the largest a send buffer grows
SND_BUF_KEEP: Final = 1.0  # seconds an emptied send buffer waits for the host's next read
OOO_LIMIT: Final = RCV_WINDOW
# Segments held out of order, and ranges on the SACK scoreboard: a guest sending tiny segments or
# SACK blocks must not make either grow past these (CPU and memory stay bounded per connection)
OOO_MAX_SEGMENTS: Final = 4096
SCOREBOARD_MAX: Final = 256
DUP_THRESH: Final = 3  # duplicate ACKs that mean a segment was lost
# payload of one TCP segment toward a guest whose NIC takes large segments (vhost-user GUEST_TSO):
# within IPv4's total length and IPv6's payload length, and the C segment loop's limit
TSO_PAYLOAD: Final = 0xFFFF - 60
REXMIT_BURST: Final = 256  # segments one ACK may make us resend (the holes SACK reported)
LOST_REXMIT_MIN: Final = 0.001  # a hole resent longer ago than this and twice the RTT: resend again
RECOVERY_PROBES: Final = 4  # recovery timer firings before the retransmission timeout takes over
# A host that does not answer a connect: the guest gets RST after this long and the socket is
# closed. Within the SYN budget of a Linux host (tcp_syn_retries 6: 1+2+4+8+16+32+64 = 127 s),
# and after the guest's own kernel sent its fifth SYN (31 s), so a slow host still gets through.
CONNECT_TIMEOUT: Final = 60.0
FD_RETRIES: Final = 2  # connects retried after EMFILE/ENFILE (each after freeing a socket)
TIME_WAIT_TIME: Final = 2.0
RTO_INITIAL: Final = 1.0
RTO_MIN: Final = 0.2
RTO_MAX: Final = 30.0
MAX_RETRIES: Final = 12
SYN_RETRIES: Final = 4
# Delayed ACKs toward the guest (RFC 9293 3.8.6.3): a bulk sender's full-sized segments are
# acknowledged every ACK_EVERY bytes or after DELAYED_ACK_TIME, which saves frames for QEMU and the
# guest's kernel to carry; segments with PSH, short ones and the first QUICKACK_BYTES of a
# connection (its slow start) are acknowledged at once.
ACK_EVERY: Final = 64 << 10
DELAYED_ACK_TIME: Final = 0.001
QUICKACK_BYTES: Final = 256 << 10
INF: Final = float("inf")
TIMERS_MIN: Final = 4096  # the timer heap is never compacted below this many entries


def add_range(ranges: list[tuple[int, int]], left: int, right: int) -> None:
    """Add [left, right) to sorted, disjoint ranges, merging what it touches.

    Searches from the end: segments mostly arrive in order, extending the last range.
    """
    i = len(ranges)
    while i > 0 and ranges[i - 1][0] > left:
        i -= 1
    if i > 0 and ranges[i - 1][1] >= left:  # touches the range before it
        i -= 1
        left = ranges[i][0]
        if ranges[i][1] > right:
            right = ranges[i][1]
        del ranges[i]
    while i < len(ranges) and ranges[i][0] <= right:  # swallows the ranges after it
        if ranges[i][1] > right:
            right = ranges[i][1]
        del ranges[i]
    ranges.insert(i, (left, right))


def trim_ranges(ranges: list[tuple[int, int]], edge: int) -> None:
    """Drop what lies below edge from sorted, disjoint ranges (acknowledged or delivered)."""
    while ranges and ranges[0][1] <= edge:
        del ranges[0]
    if ranges and ranges[0][0] < edge:
        ranges[0] = (edge, ranges[0][1])


def mss_limit(mtu: int, addr: bytes) -> int:
    """The largest segment a guest link of this MTU carries: less 40 header bytes for IPv4,
    60 for IPv6 (4- or 16-byte addr)."""
    return mtu - 60 if len(addr) == 16 else mtu - 40


def endpoint_text(addr: bytes, port: int) -> str:
    """10.0.2.15:80, or [fec0::15]:80."""
    if len(addr) == 16:
        return f"[{ip_str(addr)}]:{port}"
    return f"{ip_str(addr)}:{port}"


def lost_rexmit_wait(conn: "TcpConn") -> float:
    """How long a resent hole may stay missing before its retransmission counts as lost too."""
    wait = 2 * conn.srtt
    return wait if wait > LOST_REXMIT_MIN else LOST_REXMIT_MIN


def make_room(conn: "TcpConn", room: int) -> None:
    """At least room bytes free past conn.snd_end, without resizing the buffer in place (a host
    read may hold a view of it). The acknowledged front is cut off when that moves no more bytes
    than were acknowledged since the last cut; otherwise the data moves to a buffer twice as
    large, up to SND_BUF_MAX, where cutting always pays (what the guest has not acknowledged
    stays under SND_BUF_LIMIT + READ_ROOM). Each byte is moved a bounded number of times."""
    buf = conn.snd_buf
    end = conn.snd_end
    if len(buf) - end >= room:
        return
    off = conn.snd_off
    live = end - off
    if off > 0 and len(buf) - live >= room and (off >= live or len(buf) >= SND_BUF_MAX):
        view = memoryview(buf)
        view[:live] = view[off:end]
        view.release()
    else:
        size = 2 * len(buf)
        if size > SND_BUF_MAX:
            size = SND_BUF_MAX
        if size < live + room:
            size = live + room
        grown = bytearray(size)
        if live:
            grown[:live] = memoryview(buf)[off:end]
        conn.snd_buf = grown
    conn.snd_off = 0
    conn.snd_end = live
    conn.read_at = -1  # room handed out before points elsewhere now


def release_send_buffer(conn: "TcpConn") -> None:
    """The connection holds no send buffer any more (nothing in it is still wanted)."""
    conn.snd_buf = bytearray()
    conn.snd_off = 0
    conn.snd_end = 0
    conn.read_at = -1


@final
class TcpConn:
    """One spliced connection: the guest-facing TCP state plus its host socket's flags."""

    def __init__(
        self,
        flow: int,
        key: bytes,
        guest_mac: bytes,
        guest_ip: bytes,
        guest_port: int,
        remote_ip: bytes,
        remote_port: int,
        now: float,
    ) -> None:
        self.flow = flow
        self.key = key
        self.guest_mac = guest_mac
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.state = CLOSED
        self.created = now
        self.outbound = True  # opened by the guest (False: a forwarded host connection)
        self.host_addr = ""
        self.route: Route = DIRECT_ROUTE  # decided at the guest's SYN (core/fwd.py), kept for life
        self.host_port = remote_port  # where the host connect goes (a forward's target port)
        self.usage: GuestUsage | None = None  # the guest that opened it (core/guard.py); None: forwarded
        self.fd_retries = 0
        # send side (host -> guest)
        self.iss = 0
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        # from the host, not yet acknowledged by the guest: snd_buf[snd_off:snd_end]. Past
        # snd_end is room the host socket reads into (host_read_buffer): the bytearray is never
        # resized in place, a read may hold a view of it. The acknowledged front is cut off in
        # large steps (make_room): cutting at every ACK moves the whole buffer each time.
        self.snd_buf = bytearray()
        self.snd_off = 0
        self.snd_end = 0
        self.read_at = -1  # snd_end when host_read_buffer handed out room there (-1: none since)
        self.emptied_at = 0.0  # when the guest last acknowledged all of snd_buf
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.snd_wscale = 0
        self.mss = 536
        self.fin_queued = False  # the host sent EOF: FIN follows the buffered data
        self.fin_seq = -1  # sequence number of our FIN once sent
        self.reading_paused = False
        # receive side (guest -> host)
        self.rcv_nxt = 0
        self.rcv_adv = 0
        self.rcv_wscale = 0
        self.fin_received = False
        self.ooo: dict[int, bytes] = {}
        self.ooo_bytes = 0
        self.ooo_fin = -1
        # SACK (RFC 2018) toward the guest, when its SYN offered it: the ranges held in ooo
        # (sorted, disjoint), the start of the latest segment queued there, and a duplicate to
        # report once as D-SACK (RFC 2883)
        self.sack_ok = False
        self.sack_ranges: list[tuple[int, int]] = []
        self.ooo_last = -1
        self.dsack: tuple[int, int] | None = None
        self.host_write_paused = False
        self.pending_send: list[bytes] = []
        self.shutdown_pending = False
        self.ack_needed = False
        self.acked_to = 0  # the rcv_nxt our last segment acknowledged
        # timers and retransmission
        self.rto = RTO_INITIAL
        self.srtt = 0.0
        self.rttvar = 0.0
        self.rtt_seq = -1
        self.rtt_time = 0.0
        self.retries = 0
        self.dupacks = 0
        # loss recovery (RFC 6582 NewReno, RFC 6675 with SACK): recovery lasts until snd_una
        # reaches recovery_end; rexmit_to is where this recovery's retransmissions got to;
        # sacked holds the ranges the guest's SACK blocks reported, above snd_una
        self.recovery_end = 0
        self.rexmit_to = 0
        self.rexmit_at = 0.0
        self.recovery_probes = 0  # times the recovery timer resent the holes
        self.sacked: list[tuple[int, int]] = []
        self.deadline = INF
        self.queued_at = INF
        self.syn_quote = b""  # the guest SYN's IP header + 8 bytes, for ICMP errors
        # partial checksums of the fixed header fields of frames toward the guest
        self.ip_base, self.tcp_base = address_sums(remote_ip, guest_ip, remote_port, guest_port)
        self.header = b""  # header_template() for data segments, built for header_mac
        self.header_mac = b""
        # accounting
        self.bytes_to_host = 0
        self.bytes_to_guest = 0


@final
class TcpEngine:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.config = out.config
        self.counters = out.counters
        self.flows: dict[int, TcpConn] = {}
        self.by_key: dict[bytes, TcpConn] = {}
        self.dirty: dict[int, TcpConn] = {}
        # (when, flow), a heap; an entry is live while it is its connection's queued_at, and the
        # heap is rebuilt from the live ones when it outgrows timers_limit (below)
        self.timers: list[tuple[float, int]] = []
        self.timers_limit = TIMERS_MIN
        self.delayed_acks: dict[int, TcpConn] = {}
        self.delayed_ack_at = INF
        # connections whose send buffer the guest acknowledged in full: kept SND_BUF_KEEP for the
        # next host read (a download empties it often, and regrowing it copies at every step),
        # then released at the sweep, so an idle connection holds nothing
        self.emptied: dict[int, TcpConn] = {}
        self.sweep_at = INF
        self.next_flow = 0
        self.iss_seed = 0x5EED1234

    # ---- bookkeeping -------------------------------------------------------------------
    def new_flow_id(self) -> int:
        self.next_flow += 1
        return self.next_flow

    def make_iss(self, now: float, flow: int) -> int:
        self.iss_seed = (self.iss_seed * 1103515245 + 12345 + flow + int(now * 1e6)) & 0xFFFFFFFF
        return self.iss_seed

    def set_deadline(self, conn: TcpConn, when: float) -> None:
        conn.deadline = when
        if when < conn.queued_at:
            conn.queued_at = when
            timers = self.timers
            heapq.heappush(timers, (when, conn.flow))
            if len(timers) > self.timers_limit:
                self.compact_timers()

    def compact_timers(self) -> None:
        """The timer heap from its live entries only. Superseded entries (a connection's connect
        timeout after it was established, a gone connection's) would otherwise stay until their
        time: under connection churn a heap of hundreds of thousands, every push and pop paying
        for its depth. Rebuilt when it doubles, so the cost per entry stays constant."""
        live = [(conn.queued_at, flow) for flow, conn in self.flows.items() if conn.queued_at != INF]
        heapq.heapify(live)
        self.timers = live
        self.timers_limit = max(TIMERS_MIN, 2 * len(live))

    def release_socket(self, conn: TcpConn) -> None:
        """The flow's host socket is closed: it no longer counts against the host-socket budget,
        nor against its guest's connections. Every flow in the table holds one but a flow in
        TIME_WAIT (at wrk's 8,000 connections per second its two seconds would otherwise be
        16,000 connections): called on entering TIME_WAIT, or on removal from any other state."""
        guard = self.out.guard
        guard.sockets -= 1
        if conn.usage is not None:
            guard.tcp_closed(conn.usage, conn.flow)

    def remove(self, conn: TcpConn) -> None:
        held = conn.state != TIME_WAIT
        conn.state = CLOSED
        if self.flows.pop(conn.flow, None) is not None and held:
            self.release_socket(conn)
        if self.by_key.get(conn.key) is conn:
            del self.by_key[conn.key]
        self.dirty.pop(conn.flow, None)
        self.emptied.pop(conn.flow, None)
        release_send_buffer(conn)
        conn.ooo.clear()
        conn.sack_ranges.clear()

    def host_op(self, conn: TcpConn, kind: int) -> None:
        """A socket op for the host side, after any guest data still waiting to be sent."""
        self.flush_conn(conn)
        self.out.op(HostOp(kind, conn.flow))

    # ---- emitting segments -------------------------------------------------------------
    def advertised_window(self, conn: TcpConn) -> int:
        """The window field for a segment (scaled), moving the right edge only when we may."""
        limit = min(RCV_WINDOW, 65535 << conn.rcv_wscale)
        if conn.host_write_paused:
            win = max(0, conn.rcv_adv - conn.rcv_nxt)
        else:
            win = limit - conn.ooo_bytes
            if conn.rcv_nxt + win > conn.rcv_adv:
                conn.rcv_adv = conn.rcv_nxt + win
            else:
                win = conn.rcv_adv - conn.rcv_nxt
        return min(win >> conn.rcv_wscale, 65535)

    def emit(self, conn: TcpConn, seq: int, flags: int, payload: bytes, options: bytes = b"") -> None:
        out = self.out
        window = self.advertised_window(conn) if not flags & TCP_SYN else min(RCV_WINDOW, 65535)
        if conn.sack_ok and not payload and not flags & (TCP_SYN | TCP_RST) and (conn.sack_ranges or conn.dsack):
            options = sack_option(self.sack_blocks(conn))
        frame = build_tcp_frame_with(
            conn.guest_mac,
            self.config.gateway_mac,
            conn.remote_ip,
            conn.guest_ip,
            conn.remote_port,
            conn.guest_port,
            seq,
            conn.rcv_nxt,
            flags,
            window,
            options,
            payload,
            out.next_ident(),
            conn.ip_base,
            conn.tcp_base,
        )
        out.send_frame(conn.guest_mac, frame)
        conn.ack_needed = False
        conn.acked_to = conn.rcv_nxt

    def sack_blocks(self, conn: TcpConn) -> list[tuple[int, int]]:
        """SACK blocks for the next ACK: a D-SACK first, then the range holding the latest
        out-of-order arrival (RFC 2018 4), then the others from the lowest up."""
        blocks: list[tuple[int, int]] = []
        if conn.dsack is not None:
            blocks.append(conn.dsack)
            conn.dsack = None
        latest = conn.ooo_last
        for block in conn.sack_ranges:
            if block[0] <= latest < block[1]:
                blocks.append(block)
                break
        for block in conn.sack_ranges:
            if len(blocks) >= MAX_SACK_BLOCKS:
                break
            if not block[0] <= latest < block[1]:
                blocks.append(block)
        return blocks

    def send_ack(self, conn: TcpConn) -> None:
        self.emit(conn, conn.snd_nxt, TCP_ACK, b"")

    def send_rst(self, conn: TcpConn) -> None:
        self.counters.add("tcp-rst-to-guest")
        self.emit(conn, conn.snd_nxt, TCP_RST | TCP_ACK, b"")

    def reset_unknown(
        self,
        src_mac: bytes,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        seg_len: int,
    ) -> None:
        """RST for a segment that belongs to no connection (RFC 9293 3.10.7.1)."""
        if flags & TCP_RST:
            return
        if flags & TCP_ACK:
            rst_seq, rst_ack, rst_flags = ack, 0, TCP_RST
        else:
            extra = (1 if flags & TCP_SYN else 0) + (1 if flags & TCP_FIN else 0)
            rst_seq, rst_ack, rst_flags = 0, seq + seg_len + extra, TCP_RST | TCP_ACK
        self.counters.add("tcp-rst-to-guest")
        out = self.out
        frame = build_tcp_frame(
            src_mac,
            self.config.gateway_mac,
            dst,
            src,
            dport,
            sport,
            rst_seq,
            rst_ack,
            rst_flags,
            0,
            b"",
            b"",
            out.next_ident(),
        )
        out.send_frame(src_mac, frame)

    def mss_toward(self, frame: bytes, v6: bool, start: int) -> int:
        """The MSS of the connection a TCP frame toward a guest belongs to (the gso_size of a large
        segment for its NIC); the MSS the MTU allows when the connection is gone."""
        if v6:
            key = frame[ETH_HLEN + 24 : ETH_HLEN + 40] + frame[ETH_HLEN + 8 : ETH_HLEN + 24]
        else:
            key = frame[ETH_HLEN + 16 : ETH_HLEN + 20] + frame[ETH_HLEN + 12 : ETH_HLEN + 16]
        key += frame[start + 2 : start + 4] + frame[start : start + 2]
        conn = self.by_key.get(key)
        if conn is not None:
            return conn.mss
        return mss_limit(self.config.mtu, b"\x00" * (16 if v6 else 4))

    def send_data(self, conn: TcpConn, buf_end: int, win_end: int, now: float) -> bool:
        """Segments of new (or rewound) data up to the window: the hot path toward the guest.

        All segments of one call are built by tcp_segments() (in C when built) from the
        connection's header template, each payload copied once from the send buffer, and
        queued for the guest's port in one go.
        """
        start = conn.snd_nxt
        limit = buf_end if buf_end < win_end else win_end
        if start >= limit:
            return False
        out = self.out
        if conn.header_mac != conn.guest_mac:
            conn.header = header_template(
                conn.guest_mac,
                self.config.gateway_mac,
                conn.remote_ip,
                conn.guest_ip,
                conn.remote_port,
                conn.guest_port,
            )
            conn.header_mac = conn.guest_mac
        switch = out.switch
        queue = switch.queue_for(conn.guest_mac)
        frames: list[bytes] = queue if queue is not None else []
        segment = conn.mss
        # a guest NIC that takes large segments takes partial checksums too (GUEST_TSO needs
        # GUEST_CSUM): core/vhost_net.py completes the pseudo-header part as it fills the buffer
        tso = bool(switch.tso_ports) and switch.takes_tso(
            conn.guest_mac, TSO_V6 if len(conn.guest_ip) == 16 else TSO_V4
        )
        window = self.advertised_window(conn)
        base = conn.snd_off - conn.snd_una  # sequence number + base: its index in snd_buf
        first = start  # the first byte not written straight into the guest's RX buffers
        count = 0
        if tso:
            segment = (TSO_PAYLOAD // segment) * segment  # whole MSS pieces, for the guest's NIC to cut
            device = switch.direct_for(conn.guest_mac)
            if device is not None:
                # straight from the send buffer into the guest's buffers, no frame in between
                count = device.direct_segments(
                    conn.header,
                    conn.snd_buf,
                    start + base,
                    limit + base,
                    buf_end + base,
                    segment,
                    conn.mss,
                    start,
                    conn.rcv_nxt,
                    window,
                    out.ip_ident + 1,
                    conn.ip_base,
                )
                if count:
                    out.counters.tx_direct += count
                    first = start + count * segment
                    if first > limit:
                        first = limit
        if first < limit:
            count += tcp_segments(
                frames,
                conn.header,
                conn.snd_buf,
                first + base,
                limit + base,
                buf_end + base,
                segment,
                first,
                conn.rcv_nxt,
                window,
                out.ip_ident + 1 + count,
                conn.ip_base,
                conn.tcp_base,
                not tso,
            )
        out.ip_ident = (out.ip_ident + count) & 0xFFFF
        if queue is not None:
            out.counters.tx_frames += count
            out.counters.tx_bytes += count * len(conn.header) + (limit - start)
        else:
            for frame in frames:
                out.send_frame(conn.guest_mac, frame)
        # accounting and the RTT sample (Karn: none from retransmitted data)
        snd_max = conn.snd_max
        if start < snd_max:
            conn.rtt_seq = -1
        if limit > snd_max:
            conn.bytes_to_guest += limit - (start if start > snd_max else snd_max)
            if conn.rtt_seq < 0:
                first_new = (
                    start + ((snd_max - start) // conn.mss + 1) * conn.mss if start < snd_max else start + conn.mss
                )
                conn.rtt_seq = first_new if first_new < limit else limit
                conn.rtt_time = now
        conn.snd_nxt = limit
        conn.ack_needed = False
        conn.acked_to = conn.rcv_nxt
        return True

    def transmit(self, conn: TcpConn, now: float) -> None:
        """Send whatever the guest's window allows, then a FIN if one is due.

        Nothing before the handshake is complete: a host server that speaks first (a banner)
        has its data kept until the guest acknowledged our SYN-ACK.
        """
        if conn.state == CONNECTING or conn.state == SYN_RECEIVED or conn.state == SYN_SENT:
            return
        buf_len = conn.snd_end - conn.snd_off
        buf_end = conn.snd_una + buf_len
        win_end = conn.snd_una + conn.snd_wnd
        sent = False
        if conn.snd_nxt < buf_end and conn.snd_nxt < win_end:
            if self.out.switch.congested and self.out.switch.is_congested(conn.guest_mac):
                return  # QEMU is behind: the data waits here (bounded), port_resumed sends it
            sent = self.send_data(conn, buf_end, win_end, now)
        if conn.fin_queued and conn.snd_nxt == buf_end and conn.state in (ESTABLISHED, CLOSE_WAIT, SYN_RECEIVED):
            if conn.state != SYN_RECEIVED:
                conn.fin_seq = buf_end
                self.emit(conn, buf_end, TCP_FIN | TCP_ACK, b"")
                conn.snd_nxt = buf_end + 1
                conn.state = FIN_WAIT_1 if conn.state == ESTABLISHED else LAST_ACK
                sent = True
        elif conn.fin_seq >= 0 and conn.snd_nxt == conn.fin_seq:  # FIN retransmission after a rewind
            self.emit(conn, conn.fin_seq, TCP_FIN | TCP_ACK, b"")
            conn.snd_nxt = conn.fin_seq + 1
            sent = True
        if conn.snd_nxt > conn.snd_max:
            conn.snd_max = conn.snd_nxt
        if sent and conn.deadline == INF:
            self.set_deadline(conn, now + conn.rto)
        elif conn.snd_wnd == 0 and conn.snd_nxt < buf_end and conn.deadline == INF:
            self.set_deadline(conn, now + conn.rto)  # persist timer: probe the zero window

    # ---- guest segments ----------------------------------------------------------------
    def segment_received(
        self, src_mac: bytes, src: bytes, dst: bytes, frame: bytes, start: int, end: int, now: float
    ) -> None:
        if end - start < 20:
            self.out.drop("short-tcp")
            return
        sport, dport, seq, ack, doff_byte, flags, window, _csum, _urg = unpack_tcp_header(frame, start)
        hlen = (doff_byte >> 4) * 4
        if hlen < 20 or start + hlen > end:
            self.out.drop("bad-tcp-header")
            return
        if sport == 0 or dport == 0 or (flags & TCP_SYN and flags & (TCP_FIN | TCP_RST)):
            self.out.drop("bad-tcp-flags")
            return
        if len(src) == 4:
            key = frame[ETH_HLEN + 12 : ETH_HLEN + 20] + frame[start : start + 4]  # addresses, then ports
        else:
            key = src + dst + frame[start : start + 4]
        conn = self.by_key.get(key)
        seg_len = end - start - hlen
        if conn is None or (conn.state == TIME_WAIT and flags & TCP_SYN and not flags & TCP_ACK):
            if conn is not None:
                self.remove(conn)
            if flags & TCP_SYN and not flags & TCP_ACK:
                self.guest_syn(src_mac, src, dst, sport, dport, seq, window, frame, start, hlen, key, now)
            else:
                self.counters.add("tcp-segment-no-connection")
                self.reset_unknown(src_mac, src, dst, sport, dport, seq, ack, flags, seg_len)
            return
        if conn.guest_mac != src_mac:
            conn.guest_mac = src_mac
        state = conn.state
        if flags & TCP_RST:
            self.guest_rst(conn, seq, ack, flags)
            return
        if state == CONNECTING:
            return  # a repeated SYN while the host connect is pending: absorbed
        if state == SYN_SENT:
            self.syn_sent_segment(conn, seq, ack, flags, window, frame, start, hlen, now)
            return
        if flags & TCP_SYN:
            if state == SYN_RECEIVED:
                self.send_syn_ack(conn)
            else:
                self.send_ack(conn)  # challenge ACK (RFC 5961)
            return
        if not flags & TCP_ACK:
            return
        ack64 = unwrap(ack, conn.snd_una)
        if state == SYN_RECEIVED:
            if ack64 != conn.iss + 1:
                self.reset_unknown(src_mac, src, dst, sport, dport, seq, ack, flags, seg_len)
                return
            conn.state = ESTABLISHED
            conn.snd_una = conn.iss + 1  # our SYN is acknowledged: it is not data to drop
            self.counters.add("tcp-established")
            conn.snd_wnd = window << conn.snd_wscale
            conn.snd_wl1 = unwrap(seq, conn.rcv_nxt)
            conn.snd_wl2 = ack64
        if hlen > 20 and conn.sack_ok and conn.snd_max > conn.snd_una:
            self.take_sack(conn, frame, start + 20, start + hlen)
        self.process_ack(conn, seq, ack64, window, seg_len, flags, now)
        if conn.state == CLOSED:
            return
        if seg_len or flags & TCP_FIN:
            self.process_data(conn, seq, frame, end - seg_len, end, flags, now)

    def guest_syn(
        self,
        src_mac: bytes,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        seq: int,
        window: int,
        frame: bytes,
        start: int,
        hlen: int,
        key: bytes,
        now: float,
    ) -> None:
        cfg = self.config
        guard = self.out.guard
        usage = guard.usage(src_mac, now)
        # the cheap per-guest limits first: a SYN flood is refused before it costs a route decision
        if usage.pending >= cfg.guest_max_pending:
            self.refuse_over_limit("tcp-refused-guest-pending", usage, src_mac, src, dst, sport, dport, seq, now)
            return
        if len(usage.tcp) >= cfg.guest_max_tcp:
            self.refuse_over_limit("tcp-refused-guest-connections", usage, src_mac, src, dst, sport, dport, seq, now)
            return
        route = self.out.fwd.route_from_guest(PROTO_TCP, dst, dport)
        kind = route.kind
        if kind == REFUSE:
            self.refuse_syn(src_mac, src, dst, sport, dport, seq, frame, start, route)
            return
        host_port = dport
        if kind == DIRECT or kind == PROXY:  # a proxied flow's shell needs the destination too
            host_addr = cfg.host_side_address(dst)
        elif kind == FORWARD:
            host_addr = route.addr  # "" for unix and cmd targets
            host_port = route.port
        else:
            host_addr = ""
        if len(self.flows) >= cfg.max_tcp_flows:
            self.counters.add("tcp-refused-flow-limit")
            self.reset_unknown(src_mac, src, dst, sport, dport, seq, 0, TCP_SYN, 0)
            return
        if not guard.allow_new_flow(usage, now):
            self.refuse_over_limit("tcp-refused-guest-rate", usage, src_mac, src, dst, sport, dport, seq, now)
            return
        if not guard.need_socket(usage, now):
            self.refuse_over_limit("tcp-refused-no-fds", usage, src_mac, src, dst, sport, dport, seq, now)
            return
        try:
            mss, wscale, sack = parse_syn_options(frame[start + 20 : start + hlen])
        except ValueError:
            self.out.drop("bad-tcp-options")
            return
        conn = TcpConn(self.new_flow_id(), key, src_mac, src, sport, dst, dport, now)
        conn.sack_ok = sack
        conn.state = CONNECTING
        conn.host_addr = host_addr
        conn.host_port = host_port
        conn.route = route
        conn.usage = usage
        guard.sockets += 1
        guard.tcp_opened(usage, conn.flow)
        conn.rcv_nxt = seq + 1
        conn.rcv_adv = conn.rcv_nxt
        conn.snd_wnd = window
        conn.mss = max(64, min(mss, mss_limit(cfg.mtu, src)))
        if wscale >= 0:
            conn.snd_wscale = wscale
            conn.rcv_wscale = RCV_WSCALE
        conn.syn_quote = frame[ETH_HLEN : start + 8]
        self.flows[conn.flow] = conn
        self.by_key[key] = conn
        self.counters.add("tcp-connects")
        self.set_deadline(conn, now + CONNECT_TIMEOUT)
        self.out.op(HostOp(OP_TCP_CONNECT, conn.flow, host_addr, host_port, b"", route))

    def refuse_over_limit(
        self,
        reason: str,
        usage: GuestUsage,
        src_mac: bytes,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        seq: int,
        now: float,
    ) -> None:
        """A SYN past one of its guest's limits (core/guard.py): RST at once, within the guest's
        RST rate; past that the SYN is dropped unanswered (its retransmission may get one)."""
        guard = self.out.guard
        guard.refuse(reason, src_mac, now)
        if guard.allow_refusal_rst(usage, now):
            self.reset_unknown(src_mac, src, dst, sport, dport, seq, 0, TCP_SYN, 0)
        else:
            self.counters.add("tcp-refused-quietly")

    def refuse_syn(
        self,
        src_mac: bytes,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        seq: int,
        frame: bytes,
        start: int,
        route: Route,
    ) -> None:
        """A guest SYN that its route refuses: RST, ICMP administratively prohibited, or nothing."""
        counters = self.counters
        if route.rule == "virtual":
            counters.add("tcp-refused-virtual")
        else:
            counters.add("tcp-refused-policy")
        if route.reply == REPLY_ICMP:
            self.out.send_icmp_error(src_mac, src, dst, 3, 13, frame[ETH_HLEN : start + 8])
        elif route.reply != REPLY_DROP:
            self.reset_unknown(src_mac, src, dst, sport, dport, seq, 0, TCP_SYN, 0)

    def send_syn_ack(self, conn: TcpConn) -> None:
        mss = mss_limit(self.config.mtu, conn.guest_ip)
        opts = syn_options(mss, conn.rcv_wscale if conn.rcv_wscale else -1, conn.sack_ok)
        self.emit(conn, conn.iss, TCP_SYN | TCP_ACK, b"", opts)

    def syn_sent_segment(
        self,
        conn: TcpConn,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        frame: bytes,
        start: int,
        hlen: int,
        now: float,
    ) -> None:
        """The guest's answer to our SYN (a forwarded host connection)."""
        if not flags & TCP_SYN or not flags & TCP_ACK or ack != (conn.iss + 1) & 0xFFFFFFFF:
            return
        try:
            mss, wscale, sack = parse_syn_options(frame[start + 20 : start + hlen])
        except ValueError:
            self.out.drop("bad-tcp-options")
            return
        conn.sack_ok = sack
        conn.mss = max(64, min(mss, mss_limit(self.config.mtu, conn.guest_ip)))
        if wscale >= 0:
            conn.snd_wscale = wscale
        else:
            conn.rcv_wscale = 0
        conn.rcv_nxt = seq + 1
        conn.rcv_adv = conn.rcv_nxt
        conn.snd_una = conn.snd_nxt = conn.snd_max = conn.iss + 1
        conn.snd_wnd = window
        conn.snd_wl1 = conn.rcv_nxt
        conn.snd_wl2 = conn.snd_una
        conn.state = ESTABLISHED
        conn.retries = 0
        conn.deadline = INF
        self.counters.add("tcp-established")
        self.send_ack(conn)
        self.out.op(HostOp(OP_TCP_ACCEPTED, conn.flow))
        self.transmit(conn, now)

    def guest_rst(self, conn: TcpConn, seq: int, ack: int, flags: int) -> None:
        if conn.state == SYN_SENT:
            if flags & TCP_ACK and ack == (conn.iss + 1) & 0xFFFFFFFF:
                self.counters.add("tcp-forward-refused")
                self.out.op(HostOp(OP_TCP_ABORT, conn.flow))
                self.remove(conn)
            return
        seq64 = unwrap(seq, conn.rcv_nxt)
        if seq64 < conn.rcv_nxt - 1 or seq64 > conn.rcv_nxt + RCV_WINDOW:
            return
        self.counters.add("tcp-rst-from-guest")
        if conn.state != TIME_WAIT:
            self.out.op(HostOp(OP_TCP_ABORT, conn.flow))
        self.remove(conn)

    def process_ack(
        self, conn: TcpConn, seq: int, ack64: int, window: int, seg_len: int, flags: int, now: float
    ) -> None:
        if ack64 > conn.snd_max:
            conn.ack_needed = True  # acknowledges something never sent
            self.dirty[conn.flow] = conn
            return
        seq64 = unwrap(seq, conn.rcv_nxt)
        if seq64 > conn.snd_wl1 or (seq64 == conn.snd_wl1 and ack64 >= conn.snd_wl2):
            new_wnd = window << conn.snd_wscale
            window_changed = new_wnd != conn.snd_wnd
            conn.snd_wnd = new_wnd
            conn.snd_wl1 = seq64
            conn.snd_wl2 = ack64
        else:
            window_changed = False
        if ack64 > conn.snd_una:
            acked = ack64 - conn.snd_una
            buffered = conn.snd_end - conn.snd_off
            data_acked = acked if acked <= buffered else buffered
            if data_acked:
                conn.snd_off += data_acked
                if conn.snd_off == conn.snd_end:  # all acknowledged: the buffer waits for more
                    conn.snd_off = 0
                    conn.snd_end = 0
                    conn.read_at = -1
                    conn.emptied_at = now
                    self.emptied[conn.flow] = conn
                    if self.sweep_at == INF:
                        self.sweep_at = now + SND_BUF_KEEP
            conn.snd_una = ack64
            if conn.snd_nxt < ack64:
                conn.snd_nxt = ack64
            conn.dupacks = 0
            conn.retries = 0
            conn.recovery_probes = 0
            trim_ranges(conn.sacked, ack64)
            if conn.recovery_end > ack64:  # a partial ACK: the next hole was lost too (NewReno)
                self.retransmit_holes(conn, now, not conn.sack_ok)
            if conn.rtt_seq >= 0 and ack64 >= conn.rtt_seq:
                self.rtt_sample(conn, now - conn.rtt_time)
                conn.rtt_seq = -1
            if conn.snd_nxt > conn.snd_una:
                conn.deadline = now + conn.rto
                self.set_deadline(conn, conn.deadline)
            else:
                conn.deadline = INF
            if conn.reading_paused and conn.snd_end - conn.snd_off < SND_BUF_LIMIT // 2:
                conn.reading_paused = False
                self.out.op(HostOp(OP_RESUME_READING, conn.flow))
            if conn.fin_seq >= 0 and ack64 > conn.fin_seq:
                self.our_fin_acked(conn, now)
                if conn.state == CLOSED:
                    return
        elif ack64 == conn.snd_una and seg_len == 0 and not flags & TCP_FIN and conn.snd_nxt > conn.snd_una:
            if not window_changed:
                conn.dupacks += 1
                if conn.recovery_end > conn.snd_una:
                    if now - conn.rexmit_at > lost_rexmit_wait(conn):
                        # the guest still misses the first hole well after we resent it: that
                        # retransmission was lost too, resend the holes from the start
                        self.counters.add("tcp-lost-retransmit")
                        conn.rexmit_to = conn.snd_una
                        self.retransmit_holes(conn, now, True)
                    elif conn.sacked:  # more of what the guest holds: resend the holes below it
                        self.retransmit_holes(conn, now, False)
                elif conn.dupacks >= DUP_THRESH:
                    self.counters.add("tcp-fast-retransmit")
                    conn.recovery_end = conn.snd_max
                    conn.recovery_probes = 0
                    conn.rexmit_to = conn.snd_una
                    self.retransmit_holes(conn, now, True)
        self.transmit(conn, now)

    def rtt_sample(self, conn: TcpConn, rtt: float) -> None:
        if conn.srtt == 0.0:
            conn.srtt = rtt
            conn.rttvar = rtt / 2
        else:
            conn.rttvar = 0.75 * conn.rttvar + 0.25 * abs(conn.srtt - rtt)
            conn.srtt = 0.875 * conn.srtt + 0.125 * rtt
        conn.rto = min(RTO_MAX, max(RTO_MIN, conn.srtt + 4 * conn.rttvar))

    def take_sack(self, conn: TcpConn, frame: bytes, start: int, end: int) -> None:
        """Add the SACK blocks among a guest ACK's options to the scoreboard (conn.sacked)."""
        try:
            options = tcp_options(frame, start, end)
        except ValueError:
            return  # malformed: ignore the options, the ACK itself still counts
        for kind, at, size in options:
            if kind != OPT_SACK:
                continue
            for b in range(at, at + size - 7, 8):
                left = unwrap(int.from_bytes(frame[b : b + 4], "big"), conn.snd_una)
                right = unwrap(int.from_bytes(frame[b + 4 : b + 8], "big"), conn.snd_una)
                if conn.snd_una < left < right <= conn.snd_max and len(conn.sacked) < SCOREBOARD_MAX:
                    add_range(conn.sacked, left, right)  # D-SACKs, stale blocks, and past the cap: ignored

    def retransmit_holes(self, conn: TcpConn, now: float, first_lost: bool) -> None:
        """Resend what the guest is missing: the first unacknowledged segment when first_lost
        (duplicate ACKs, a partial ACK without SACK, the recovery timer), and with SACK every hole
        not yet resent in this recovery that has DUP_THRESH segments' worth of SACKed data above
        it (RFC 6675 IsLost: a hole with less may just be reordering)."""
        sacked = conn.sacked
        seq = conn.rexmit_to if sacked and conn.rexmit_to > conn.snd_una else conn.snd_una
        limit = conn.snd_una + conn.mss if first_lost and seq == conn.snd_una else seq
        above = 0
        for k in range(len(sacked) - 1, -1, -1):
            above += sacked[k][1] - sacked[k][0]
            if above >= DUP_THRESH * conn.mss:
                if sacked[k][0] > limit:
                    limit = sacked[k][0]
                break
        buf_end = conn.snd_una + conn.snd_end - conn.snd_off
        if limit > buf_end:
            limit = buf_end
        if limit > conn.snd_nxt:
            limit = conn.snd_nxt
        i = 0
        sent = 0
        while seq < limit and sent < REXMIT_BURST:
            while i < len(sacked) and sacked[i][1] <= seq:
                i += 1
            if i < len(sacked) and sacked[i][0] <= seq:
                seq = sacked[i][1]  # the guest has this range
                continue
            hole_end = sacked[i][0] if i < len(sacked) and sacked[i][0] < limit else limit
            n = hole_end - seq if hole_end - seq < conn.mss else conn.mss
            off = seq - conn.snd_una + conn.snd_off
            self.emit(conn, seq, TCP_ACK, bytes(conn.snd_buf[off : off + n]))
            seq += n
            sent += 1
        if sent:
            self.counters.add("tcp-retransmitted-segments", sent)
            conn.rexmit_at = now
            if seq > conn.rexmit_to:
                conn.rexmit_to = seq
            # the recovery timer: when nothing more arrives from the guest (our window is full,
            # or a retransmission was lost too) resend the holes long before the RTO would
            when = now + lost_rexmit_wait(conn)
            if when < conn.deadline:
                self.set_deadline(conn, when)
        elif conn.fin_seq >= 0 and conn.snd_una == conn.fin_seq:
            self.emit(conn, conn.fin_seq, TCP_FIN | TCP_ACK, b"")
        conn.rtt_seq = -1  # Karn: no RTT sample across a retransmission

    def our_fin_acked(self, conn: TcpConn, now: float) -> None:
        state = conn.state
        if state == FIN_WAIT_1:
            conn.state = FIN_WAIT_2
        elif state == CLOSING:
            self.enter_time_wait(conn, now)
        elif state == LAST_ACK:
            self.host_op(conn, OP_TCP_CLOSE)
            self.remove(conn)

    def enter_time_wait(self, conn: TcpConn, now: float) -> None:
        self.host_op(conn, OP_TCP_CLOSE)
        self.release_socket(conn)
        conn.state = TIME_WAIT
        release_send_buffer(conn)
        conn.deadline = now + TIME_WAIT_TIME
        self.set_deadline(conn, conn.deadline)

    def process_data(self, conn: TcpConn, seq: int, frame: bytes, start: int, end: int, flags: int, now: float) -> None:
        seq64 = unwrap(seq, conn.rcv_nxt)
        fin = flags & TCP_FIN != 0
        if conn.state in (CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT):
            # the guest already sent FIN: anything more is a retransmission
            conn.ack_needed = True
            self.dirty[conn.flow] = conn
            return
        seg_len = end - start
        if seq64 > conn.rcv_nxt:
            # out of order: keep it (bounded), and tell the guest what we miss
            self.counters.add("tcp-out-of-order")
            if seg_len and seq64 in conn.ooo:
                conn.dsack = (seq64, seq64 + seg_len)  # a duplicate of what we hold
            elif seg_len and seq64 + seg_len <= conn.rcv_nxt + RCV_WINDOW:
                if conn.ooo_bytes + seg_len <= OOO_LIMIT and len(conn.ooo) < OOO_MAX_SEGMENTS:
                    conn.ooo[seq64] = frame[start:end]
                    conn.ooo_bytes += seg_len
                    conn.ooo_last = seq64
                    add_range(conn.sack_ranges, seq64, seq64 + seg_len)
            if fin:
                conn.ooo_fin = seq64 + seg_len
            self.send_ack(conn)
            return
        if seq64 < conn.rcv_nxt:
            overlap = conn.rcv_nxt - seq64
            if overlap >= seg_len:
                if not (fin and seq64 + seg_len == conn.rcv_nxt and not conn.fin_received):
                    conn.ack_needed = True  # a duplicate or keep-alive probe
                    if seg_len > 1:  # a duplicate (a keep-alive probe carries one byte): D-SACK
                        conn.dsack = (seq64, seq64 + seg_len)
                    self.dirty[conn.flow] = conn
                    return
                seg_len = 0
                start = end
            else:
                start += overlap
                seg_len -= overlap
        filled_hole = False
        if seg_len:
            if conn.host_write_paused and conn.rcv_nxt + seg_len > conn.rcv_adv:
                allowed = max(0, conn.rcv_adv - conn.rcv_nxt)  # beyond our window: keep what fits
                end = start + allowed
                seg_len = allowed
                fin = False
            if seg_len:
                conn.pending_send.append(frame[start:end])
                conn.rcv_nxt += seg_len
                conn.bytes_to_host += seg_len
            filled_hole = bool(conn.ooo)
            if filled_hole:
                self.drain_ooo(conn)
        self.dirty[conn.flow] = conn
        if fin or (conn.ooo_fin >= 0 and conn.ooo_fin == conn.rcv_nxt):
            self.guest_fin(conn, now)  # ACKs at once, data and FIN together
        elif (
            flags & TCP_PSH
            or seg_len < conn.mss
            or filled_hole
            or conn.rcv_nxt - conn.acked_to >= ACK_EVERY
            or conn.bytes_to_host <= QUICKACK_BYTES
            or conn.host_write_paused
        ):
            conn.ack_needed = True
        else:
            self.delay_ack(conn, now)

    def delay_ack(self, conn: TcpConn, now: float) -> None:
        self.delayed_acks[conn.flow] = conn
        if self.delayed_ack_at == INF:
            self.delayed_ack_at = now + DELAYED_ACK_TIME

    def send_delayed_acks(self) -> None:
        """The delayed-ACK timer: acknowledge what no segment has acknowledged since."""
        delayed = self.delayed_acks
        self.delayed_acks = {}
        self.delayed_ack_at = INF
        for conn in delayed.values():
            if conn.state != CLOSED and conn.rcv_nxt != conn.acked_to:
                self.send_ack(conn)

    def drain_ooo(self, conn: TcpConn) -> None:
        """Deliver the queued segments that now follow rcv_nxt without a gap."""
        ooo = conn.ooo
        ranges = conn.sack_ranges
        while ooo:
            data = ooo.pop(conn.rcv_nxt, None)
            if data is not None:  # the usual case: segment boundaries as first sent
                conn.ooo_bytes -= len(data)
                conn.pending_send.append(data)
                conn.rcv_nxt += len(data)
                conn.bytes_to_host += len(data)
                continue
            trim_ranges(ranges, conn.rcv_nxt)
            if not ranges or ranges[0][0] > conn.rcv_nxt:
                break  # a gap before the next queued byte
            # queued segments that start inside what we have (resent with other boundaries)
            popped = False
            for seq64 in sorted(ooo):
                if seq64 > conn.rcv_nxt:
                    break
                data = ooo.pop(seq64)
                popped = True
                conn.ooo_bytes -= len(data)
                skip = conn.rcv_nxt - seq64
                if skip < len(data):
                    conn.pending_send.append(data[skip:])
                    conn.rcv_nxt += len(data) - skip
                    conn.bytes_to_host += len(data) - skip
            if not popped:
                break
        trim_ranges(ranges, conn.rcv_nxt)

    def guest_fin(self, conn: TcpConn, now: float) -> None:
        conn.rcv_nxt += 1
        conn.fin_received = True
        conn.ooo_fin = -1
        conn.ooo.clear()
        conn.ooo_bytes = 0
        conn.sack_ranges.clear()
        conn.shutdown_pending = True
        state = conn.state
        if state == ESTABLISHED:
            conn.state = CLOSE_WAIT
        elif state == FIN_WAIT_1:
            conn.state = CLOSING
        elif state == FIN_WAIT_2:
            self.enter_time_wait(conn, now)
        self.send_ack(conn)

    # ---- end of a batch of events ------------------------------------------------------
    def flush_conn(self, conn: TcpConn) -> None:
        if conn.pending_send:
            data = conn.pending_send[0] if len(conn.pending_send) == 1 else b"".join(conn.pending_send)
            conn.pending_send.clear()
            self.out.op(HostOp(OP_TCP_SEND, conn.flow, "", 0, data))
        if conn.shutdown_pending:
            conn.shutdown_pending = False
            self.out.op(HostOp(OP_TCP_SHUTDOWN, conn.flow))

    def flush(self, now: float) -> None:
        """Hand joined guest data to the host and send one ACK per connection that needs it."""
        if not self.dirty:
            return
        dirty = self.dirty
        self.dirty = {}
        for conn in dirty.values():
            if conn.state == CLOSED:
                continue
            self.flush_conn(conn)
            if conn.ack_needed:
                self.send_ack(conn)

    # ---- host events -------------------------------------------------------------------
    def host_connected(self, flow: int, now: float) -> None:
        conn = self.flows.get(flow)
        if conn is None or conn.state != CONNECTING:
            return
        conn.iss = self.make_iss(now, flow)
        conn.snd_una = conn.iss
        conn.snd_nxt = conn.snd_max = conn.iss + 1
        conn.state = SYN_RECEIVED
        conn.syn_quote = b""
        if conn.usage is not None:
            self.out.guard.tcp_connected(conn.usage, flow)
        conn.deadline = INF
        conn.queued_at = INF
        self.set_deadline(conn, now + conn.rto)
        self.send_syn_ack(conn)

    def host_refused(self, flow: int, err: int, now: float) -> None:
        """The host connect failed with errno err: RST, or ICMP unreachable for routing errors."""
        conn = self.flows.get(flow)
        if conn is None or conn.state != CONNECTING:
            return
        if (err == errno.EMFILE or err == errno.ENFILE) and self.retry_connect(conn, now):
            return
        self.counters.add("tcp-connect-failed")
        if conn.usage is not None:
            self.out.guard.failed_connect(conn.usage)
        if err in (errno.ENETUNREACH, errno.EHOSTUNREACH) and conn.syn_quote:
            code = 0 if err == errno.ENETUNREACH else 1
            self.out.send_icmp_error(conn.guest_mac, conn.guest_ip, conn.remote_ip, 3, code, conn.syn_quote)
        else:
            self.send_rst(conn)
        self.remove(conn)

    def retry_connect(self, conn: TcpConn, now: float) -> bool:
        """The host connect failed for want of file descriptors: free one from the guest
        holding the most and connect again (FD_RETRIES times). False: refuse it."""
        self.counters.add("tcp-connect-no-fds")
        self.out.guard.out_of_descriptors(now)
        usage = conn.usage
        if usage is None or conn.fd_retries >= FD_RETRIES:
            return False
        conn.fd_retries += 1
        if not self.out.guard.take_from_heaviest(usage, now):
            return False
        self.out.op(HostOp(OP_TCP_CONNECT, conn.flow, conn.host_addr, conn.host_port, b"", conn.route))
        return True

    def host_data(self, flow: int, data: bytes | memoryview, now: float) -> None:
        conn = self.flows.get(flow)
        if conn is None or conn.fin_queued or conn.state == CLOSED:
            return
        n = len(data)
        make_room(conn, n)
        end = conn.snd_end
        conn.snd_buf[end : end + n] = data  # same length: a copy, no resize
        conn.snd_end = end + n
        self.buffered(conn, now)

    def host_read_buffer(self, flow: int) -> memoryview | None:
        """Room at the end of flow's send buffer for the host socket's next read to fill (then
        host_data_read), so that a bulk download is not copied once more on its way in; None when
        the flow is gone or has no buffer (the read goes through host_data: an idle connection
        keeps none)."""
        conn = self.flows.get(flow)
        if conn is None or conn.fin_queued or conn.state == CLOSED or not conn.snd_buf:
            return None
        # as much room as it holds already, or has free at its end (a buffer grows in steps, not
        # at once for a 1 KiB reply), short of the limit where reading pauses
        live = conn.snd_end - conn.snd_off
        room = len(conn.snd_buf) - conn.snd_end
        if room < live:
            room = live
        if room > SND_BUF_LIMIT - live:
            room = SND_BUF_LIMIT - live
        if room > READ_ROOM:
            room = READ_ROOM
        elif room < READ_ROOM_MIN:
            room = READ_ROOM_MIN
        make_room(conn, room)
        conn.read_at = conn.snd_end
        return memoryview(conn.snd_buf)[conn.snd_end : conn.snd_end + room]

    def host_data_read(self, flow: int, nbytes: int, now: float) -> None:
        """The host socket's read put nbytes where host_read_buffer said."""
        conn = self.flows.get(flow)
        if conn is None or conn.fin_queued or conn.state == CLOSED:
            return
        if conn.read_at != conn.snd_end or nbytes < 0 or conn.snd_end + nbytes > len(conn.snd_buf):
            # not where the room was handed out (nothing should move it meanwhile): the stream
            # toward the guest would have a hole, so the connection is reset instead
            self.counters.add("tcp-read-misplaced")
            self.send_rst(conn)
            self.out.op(HostOp(OP_TCP_ABORT, flow))
            self.remove(conn)
            return
        conn.read_at = -1
        conn.snd_end += nbytes
        self.buffered(conn, now)

    def buffered(self, conn: TcpConn, now: float) -> None:
        if conn.snd_end - conn.snd_off >= SND_BUF_LIMIT and not conn.reading_paused:
            conn.reading_paused = True
            self.out.op(HostOp(OP_PAUSE_READING, conn.flow))
        self.transmit(conn, now)

    def host_eof(self, flow: int, now: float) -> None:
        conn = self.flows.get(flow)
        if conn is None or conn.fin_queued:
            return
        conn.fin_queued = True
        self.transmit(conn, now)

    def host_reset(self, flow: int, now: float) -> None:
        """The host socket failed or was reset: reset the guest side too."""
        conn = self.flows.get(flow)
        if conn is None:
            return
        self.counters.add("tcp-host-reset")
        if conn.state not in (CONNECTING, TIME_WAIT, SYN_SENT):
            self.send_rst(conn)
        self.remove(conn)

    def host_write_paused(self, flow: int) -> None:
        conn = self.flows.get(flow)
        if conn is not None:
            conn.host_write_paused = True

    def host_write_resumed(self, flow: int) -> None:
        conn = self.flows.get(flow)
        if conn is not None and conn.host_write_paused:
            conn.host_write_paused = False
            if conn.state != CLOSED:
                conn.ack_needed = True  # window update
                self.dirty[flow] = conn

    def port_resumed(self, port: int, now: float) -> None:
        """QEMU on port caught up: send what waited for it."""
        mac_table = self.out.switch.mac_table
        for conn in list(self.flows.values()):
            if conn.state != CLOSED and mac_table.get(conn.guest_mac) == port:
                self.transmit(conn, now)

    # ---- forwarded host connections ----------------------------------------------------
    def connect_guest(
        self, guest_mac: bytes, guest_ip: bytes, guest_port: int, src_ip: bytes, src_port: int, now: float
    ) -> int:
        """Open a connection toward a guest for a forwarded host connection; the flow id, or -1.

        The host socket must not be read until OP_TCP_ACCEPTED comes for the flow; OP_TCP_ABORT
        means the guest refused or did not answer.
        """
        key = guest_ip + src_ip + guest_port.to_bytes(2, "big") + src_port.to_bytes(2, "big")
        if key in self.by_key or len(self.flows) >= self.config.max_tcp_flows:
            return -1
        conn = TcpConn(self.new_flow_id(), key, guest_mac, guest_ip, guest_port, src_ip, src_port, now)
        conn.outbound = False
        conn.state = SYN_SENT
        conn.iss = self.make_iss(now, conn.flow)
        conn.snd_una = conn.iss
        conn.snd_nxt = conn.snd_max = conn.iss + 1
        conn.rcv_wscale = RCV_WSCALE
        self.flows[conn.flow] = conn
        self.by_key[key] = conn
        self.out.guard.sockets += 1
        self.send_syn(conn)
        self.set_deadline(conn, now + conn.rto)
        return conn.flow

    def send_syn(self, conn: TcpConn) -> None:
        mss = mss_limit(self.config.mtu, conn.guest_ip)
        self.emit(conn, conn.iss, TCP_SYN, b"", syn_options(mss, RCV_WSCALE, True))

    def close_flow(self, flow: int) -> None:
        """The shell's socket for flow is gone for good (e.g. a forward was removed): reset."""
        conn = self.flows.get(flow)
        if conn is None:
            return
        if conn.state not in (CONNECTING, TIME_WAIT):
            self.send_rst(conn)
        self.remove(conn)

    def abort_flow(self, flow: int, reason: str) -> bool:
        """Reset a flow both ways (RST to the guest, abort the host socket); counted as reason."""
        conn = self.flows.get(flow)
        if conn is None:
            return False
        self.counters.add(reason)
        if conn.state != TIME_WAIT:
            self.send_rst(conn)
        self.out.op(HostOp(OP_TCP_ABORT, flow))
        self.remove(conn)
        return True

    def close_guests(self, macs: set[bytes]) -> int:
        """The guests with these MACs are gone: abort their connections' host sockets (both
        directions of flow); no RST toward guests that are not there. How many were closed."""
        closed = 0
        for conn in list(self.flows.values()):
            if conn.guest_mac in macs:
                self.out.op(HostOp(OP_TCP_ABORT, conn.flow))
                self.remove(conn)
                closed += 1
        return closed

    # ---- time --------------------------------------------------------------------------
    def timer(self, now: float) -> None:
        if self.delayed_ack_at <= now:
            self.send_delayed_acks()
        if self.sweep_at <= now:
            self.release_emptied(now)
        timers = self.timers
        while timers and timers[0][0] <= now:
            when, flow = heapq.heappop(timers)
            conn = self.flows.get(flow)
            if conn is None or when != conn.queued_at:
                continue
            conn.queued_at = INF
            if conn.deadline <= now:
                conn.deadline = INF
                self.expired(conn, now)
            elif conn.deadline != INF:
                self.set_deadline(conn, conn.deadline)

    def expired(self, conn: TcpConn, now: float) -> None:
        state = conn.state
        if state == CONNECTING:
            self.counters.add("tcp-connect-timeout")
            if conn.usage is not None:
                self.out.guard.failed_connect(conn.usage)
            self.send_rst(conn)
            self.out.op(HostOp(OP_TCP_ABORT, conn.flow))
            self.remove(conn)
            return
        if state == TIME_WAIT:
            self.remove(conn)
            return
        if state in (SYN_SENT, SYN_RECEIVED):
            conn.retries += 1
            if conn.retries > SYN_RETRIES:
                self.counters.add("tcp-handshake-timeout")
                self.out.op(HostOp(OP_TCP_ABORT, conn.flow))
                if state == SYN_RECEIVED:
                    self.send_rst(conn)
                self.remove(conn)
                return
            conn.rto = min(RTO_MAX, conn.rto * 2)
            if state == SYN_SENT:
                self.send_syn(conn)
            else:
                self.send_syn_ack(conn)
            self.set_deadline(conn, now + conn.rto)
            return
        buf_end = conn.snd_una + conn.snd_end - conn.snd_off
        if conn.recovery_end > conn.snd_una and conn.recovery_probes < RECOVERY_PROBES:
            conn.recovery_probes += 1
            self.counters.add("tcp-recovery-timer")
            conn.rexmit_to = conn.snd_una
            self.retransmit_holes(conn, now, True)
            if conn.deadline == INF:
                self.set_deadline(conn, now + conn.rto)
            return
        if conn.snd_nxt > conn.snd_una:
            conn.retries += 1
            if conn.retries > MAX_RETRIES:
                self.counters.add("tcp-retransmit-timeout")
                self.send_rst(conn)
                self.out.op(HostOp(OP_TCP_ABORT, conn.flow))
                self.remove(conn)
                return
            self.counters.add("tcp-retransmit")
            conn.rto = min(RTO_MAX, conn.rto * 2)
            conn.recovery_end = 0
            conn.sacked.clear()
            conn.snd_nxt = conn.snd_una  # go back N
            conn.rtt_seq = -1
            self.transmit(conn, now)
            if conn.deadline == INF:
                self.set_deadline(conn, now + conn.rto)
        elif conn.snd_wnd == 0 and conn.snd_nxt < buf_end:
            # zero-window probe: one byte past the window makes the guest tell us its window
            self.counters.add("tcp-window-probe")
            off = conn.snd_nxt - conn.snd_una + conn.snd_off
            self.emit(conn, conn.snd_nxt, TCP_ACK, bytes(conn.snd_buf[off : off + 1]))
            conn.snd_nxt += 1
            if conn.snd_nxt > conn.snd_max:
                conn.snd_max = conn.snd_nxt
            conn.rto = min(RTO_MAX, conn.rto * 2)
            self.set_deadline(conn, now + conn.rto)

    def release_emptied(self, now: float) -> None:
        """Release the send buffers left empty for SND_BUF_KEEP; forget those filled again."""
        emptied = self.emptied
        for flow in list(emptied):
            conn = emptied[flow]
            if conn.snd_end != conn.snd_off:
                del emptied[flow]  # in use again: listed anew when next emptied
            elif now - conn.emptied_at >= SND_BUF_KEEP:
                release_send_buffer(conn)
                del emptied[flow]
        self.sweep_at = now + SND_BUF_KEEP if emptied else INF

    def next_deadline(self) -> float:
        first = self.timers[0][0] if self.timers else INF
        if self.sweep_at < first:
            first = self.sweep_at
        return first if first < self.delayed_ack_at else self.delayed_ack_at

    # ---- introspection -----------------------------------------------------------------
    def connections(self, now: float) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for conn in self.flows.values():
            out.append(
                {
                    "protocol": "tcp",
                    "flow": conn.flow,
                    "direction": "outbound" if conn.outbound else "forwarded",
                    "guest": endpoint_text(conn.guest_ip, conn.guest_port),
                    "remote": endpoint_text(conn.remote_ip, conn.remote_port),
                    "state": STATE_NAMES[conn.state],
                    "route": conn.route.describe() if conn.outbound else "hostfwd",
                    "rule": conn.route.rule,
                    "bytes-to-host": conn.bytes_to_host,
                    "bytes-to-guest": conn.bytes_to_guest,
                    "guest-window": conn.snd_wnd,
                    "in-flight": conn.snd_nxt - conn.snd_una,
                    "buffered-to-guest": conn.snd_end - conn.snd_off,
                    "host-reading-paused": conn.reading_paused,
                    "host-writing-blocked": conn.host_write_paused,
                    "age": round(now - conn.created, 3),
                }
            )
        return out

"""What the core asks the shell to do on host sockets, and the counters it keeps.

The core appends HostOp records to a list; the shell drains the list after every event and
performs each operation on the socket that the flow number names.
"""

from typing import Final, final

from qemu_vpnnet.core.fwd import Route

OP_TCP_CONNECT: Final = 1  # open flow's host side by its route: direct/forward tcp to addr:port, unix, cmd, local
OP_TCP_SEND: Final = 2  # write data to the flow's socket
OP_TCP_SHUTDOWN: Final = 3  # half-close: no more data to the host (after pending writes)
OP_TCP_CLOSE: Final = 4  # close the socket after pending writes; the flow is gone
OP_TCP_ABORT: Final = 5  # close at once with RST; the flow is gone
OP_PAUSE_READING: Final = 6  # stop reading the flow's socket (guest window is full)
OP_RESUME_READING: Final = 7  # read the flow's socket again
OP_UDP_OPEN: Final = 8  # open a UDP socket for flow (connected to nothing)
OP_UDP_SEND: Final = 9  # send data to addr:port from the flow's UDP socket
OP_UDP_CLOSE: Final = 10  # close the flow's UDP socket
OP_PING_SEND: Final = 11  # send an ICMP echo (data is the ICMP message) to addr from flow's ping socket
OP_PING_CLOSE: Final = 12  # close the flow's ping socket
OP_DNS_QUERY: Final = 13  # forward data (a DNS query) upstream; addr:port one server, addr "" the default ones
OP_TCP_ACCEPTED: Final = 14  # a forwarded host connection for flow is now open to the guest
OP_UDP_FWD_REPLY: Final = 15  # a guest's reply on a UDP forward: send data to the flow's host peer
OP_UDP_FWD_CLOSE: Final = 16  # a UDP forward flow timed out: forget its host peer
OP_DNS_RESOLVE: Final = 17  # look up name addr (port: type A or AAAA) with the host resolver, for query flow

OP_NAMES: Final = {
    OP_TCP_CONNECT: "tcp-connect",
    OP_TCP_SEND: "tcp-send",
    OP_TCP_SHUTDOWN: "tcp-shutdown",
    OP_TCP_CLOSE: "tcp-close",
    OP_TCP_ABORT: "tcp-abort",
    OP_PAUSE_READING: "pause-reading",
    OP_RESUME_READING: "resume-reading",
    OP_UDP_OPEN: "udp-open",
    OP_UDP_SEND: "udp-send",
    OP_UDP_CLOSE: "udp-close",
    OP_PING_SEND: "ping-send",
    OP_PING_CLOSE: "ping-close",
    OP_DNS_QUERY: "dns-query",
    OP_TCP_ACCEPTED: "tcp-accepted",
    OP_UDP_FWD_REPLY: "udp-fwd-reply",
    OP_UDP_FWD_CLOSE: "udp-fwd-close",
    OP_DNS_RESOLVE: "dns-resolve",
}


@final
class HostOp:
    """One socket operation for the shell to perform."""

    __slots__ = ("addr", "data", "flow", "kind", "port", "route")

    def __init__(
        self, kind: int, flow: int, addr: str = "", port: int = 0, data: bytes = b"", route: Route | None = None
    ) -> None:
        self.kind = kind
        self.flow = flow
        self.addr = addr
        self.port = port
        self.data = data
        self.route = route  # OP_TCP_CONNECT: the flow's route (core/fwd.py)

    def __repr__(self) -> str:
        name = OP_NAMES.get(self.kind, str(self.kind))
        return f"HostOp({name}, flow={self.flow}, addr={self.addr!r}, port={self.port}, data={len(self.data)}B)"


@final
class Counters:
    """Named event counters (frames, bytes, drops by reason, connects, ...)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        # the per-frame ones are plain attributes: a dict update per frame costs too much
        self.rx_frames = 0
        self.rx_bytes = 0
        self.tx_frames = 0
        self.tx_bytes = 0
        self.tx_direct = 0  # TCP segments written straight into a vhost-user guest's RX buffers

    def add(self, name: str, amount: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + amount

    def get(self, name: str) -> int:
        return self.snapshot().get(name, 0)

    def snapshot(self) -> dict[str, int]:
        values = dict(self.values)
        if self.rx_frames:
            values["rx-frames"] = self.rx_frames
            values["rx-bytes"] = self.rx_bytes
        if self.tx_frames:
            values["tx-frames"] = self.tx_frames
            values["tx-bytes"] = self.tx_bytes
        if self.tx_direct:
            values["tx-direct-segments"] = self.tx_direct
        return values

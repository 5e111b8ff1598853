"""IPv4 reassembly of fragmented datagrams from guests (RFC 791), bounded.

A guest sends fragments when a UDP or ICMP datagram is larger than its MTU. They are gathered
per (source, destination, protocol, identification); the whole datagram goes on once every
byte from 0 to the end of the last fragment is there. At most MAX_DATAGRAMS are pending at once
(the oldest is dropped to make room), each at most 65535 bytes, each for at most TIMEOUT
seconds, with at most MAX_PARTS fragments each. Overlapping IPv4 fragments are accepted, with
the first copy of a byte winning; for IPv6 (`add(..., strict=True)`) an overlap discards the
whole datagram (RFC 5722), and so does a fragment whose copy differs from one already held.
"""

from typing import Final, final

from qemu_vpnnet.core.actions import Counters

MAX_DATAGRAMS: Final = 64
MAX_SIZE: Final = 65535
TIMEOUT: Final = 30.0
MAX_PARTS: Final = 256  # a 65535-byte datagram in 576-byte IPv4 fragments is 118


@final
class Pending:
    def __init__(self, now: float) -> None:
        self.parts: dict[int, bytes] = {}  # offset -> data
        self.size = -1  # total payload length, known once the last fragment came
        self.header = b""  # IP header of the first fragment (offset 0)
        self.expires = now + TIMEOUT
        self.stored = 0


@final
class Reassembler:
    def __init__(self, counters: Counters) -> None:
        self.pending: dict[bytes, Pending] = {}
        self.counters = counters

    def add(
        self, key: bytes, header: bytes, offset: int, more: bool, data: bytes, now: float, strict: bool = False
    ) -> bytes | None:
        """Store one fragment; the whole IP payload once complete (header: the first fragment's).

        strict (IPv6): a fragment overlapping another drops the datagram (RFC 5722)."""
        if offset + len(data) > MAX_SIZE or (more and len(data) % 8):
            self.counters.add("drop-ip-fragmented-datagram")
            self.pending.pop(key, None)
            return None
        entry = self.pending.get(key)
        if entry is None:
            if len(self.pending) >= MAX_DATAGRAMS:
                oldest = min(self.pending, key=lambda k: self.pending[k].expires)
                del self.pending[oldest]
                self.counters.add("drop-ip-fragmented-datagram")
            entry = Pending(now)
            self.pending[key] = entry
        if strict and entry.parts and self.overlaps(entry, offset, offset + len(data)):
            del self.pending[key]
            self.counters.add("rx-dropped")
            self.counters.add("drop-ip-fragment-overlap")
            return None
        if len(entry.parts) >= MAX_PARTS and offset not in entry.parts:
            del self.pending[key]
            self.counters.add("drop-ip-fragmented-datagram")
            return None
        if offset == 0:
            entry.header = header
        if not more:
            entry.size = offset + len(data)
        if offset not in entry.parts or len(entry.parts[offset]) < len(data):
            entry.stored += len(data)
            entry.parts[offset] = data
        if entry.size < 0 or not entry.header or entry.stored < entry.size:
            return None
        payload = bytearray(entry.size)
        covered = 0
        for start in sorted(entry.parts):
            part = entry.parts[start]
            if start > covered:
                return None  # a hole remains
            end = start + len(part)
            if end > covered:
                payload[covered:end] = part[covered - start :]
                covered = end
        if covered < entry.size:
            return None
        del self.pending[key]
        return bytes(payload[: entry.size])

    @staticmethod
    def overlaps(entry: Pending, start: int, end: int) -> bool:
        """Whether [start, end) overlaps a held fragment (an exact repeat of one does not)."""
        for at, part in entry.parts.items():
            if at == start and len(part) == end - start:
                continue
            if at < end and start < at + len(part):
                return True
        return False

    def expire(self, now: float) -> None:
        for key in [k for k, e in self.pending.items() if e.expires <= now]:
            del self.pending[key]
            self.counters.add("drop-ip-fragmented-datagram")

    def next_deadline(self) -> float:
        if not self.pending:
            return float("inf")
        return min(e.expires for e in self.pending.values())

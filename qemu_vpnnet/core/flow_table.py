"""A table of idle-expiring flows (UDP NAT, ping): by key, least recently used first, by id, and
by guest (the MAC that opened it, oldest first).

Each flow closes (its host socket too, through close_op) after the UDP idle timeout; when the
table is full, the least recently used flow is closed to make room; when the guest that opens
a flow holds `per_guest` of them already, its oldest is closed first. Each flow holds one host
socket, counted in the guard (core/guard.py) for the host-socket budget.
"""

from typing import Final, final

from qemu_vpnnet.core.actions import HostOp
from qemu_vpnnet.core.output import Output

INF: Final = float("inf")
KEY_V6: Final = 1 << 160  # set in the flow keys of IPv6 guests (address << 16 | identifier)


def flow_key(addr: bytes, ident: int) -> int:
    """One table key per (guest address, identifier or port), apart for the two families."""
    if len(addr) == 4:  # by index: compiled, this is a few native operations, not a call
        return (addr[0] << 40) | (addr[1] << 32) | (addr[2] << 24) | (addr[3] << 16) | ident
    key = (int.from_bytes(addr, "big") << 16) | ident
    return key | KEY_V6 if len(addr) == 16 else key


class IdleFlow:
    """What the table needs of a flow; UdpFlow and PingFlow extend it."""

    def __init__(self, flow_id: int, key: int, now: float, owner: bytes = b"") -> None:
        self.id = flow_id
        self.key = key
        self.created = now
        self.last_active = now
        self.owner = owner  # MAC of the guest that opened it (the flow's guest_mac may change)


@final
class IdleFlows:
    def __init__(self, out: Output, close_op: int, name: str, capacity: int, per_guest: int = 0) -> None:
        self.out = out
        self.close_op = close_op
        self.name = name  # counter prefix: NAME-flows-opened, -evicted, -expired, -evicted-guest-limit
        self.capacity = max(1, capacity)
        self.per_guest = per_guest if per_guest > 0 else capacity
        self.by_key: dict[int, IdleFlow] = {}  # least recently used first
        self.by_id: dict[int, IdleFlow] = {}
        self.by_guest: dict[bytes, dict[int, IdleFlow]] = {}  # owner MAC -> its flows by id, oldest first
        self.next_id = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def insert(self, flow: IdleFlow) -> None:
        """A new flow; its guest's oldest is closed first if that guest is at its limit, the
        least recently used one if the table is full."""
        owner = flow.owner
        mine = self.by_guest.get(owner)
        if mine is not None and len(mine) >= self.per_guest:
            self.close(next(iter(mine.values())))
            self.out.counters.add(self.name + "-flows-evicted-guest-limit")
        if len(self.by_key) >= self.capacity:
            self.close(next(iter(self.by_key.values())))
            self.out.counters.add(self.name + "-flows-evicted")
        self.by_key[flow.key] = flow
        self.by_id[flow.id] = flow
        mine = self.by_guest.get(owner)
        if mine is None:
            mine = {}
            self.by_guest[owner] = mine
        mine[flow.id] = flow
        guard = self.out.guard
        guard.sockets += 1
        guard.usage(owner, flow.created).datagram += 1
        self.out.counters.add(self.name + "-flows-opened")

    def touch(self, flow: IdleFlow, now: float) -> None:
        """The flow was used: it moves to the most recently used end."""
        flow.last_active = now
        del self.by_key[flow.key]
        self.by_key[flow.key] = flow

    def forget(self, flow: IdleFlow) -> None:
        """Drop the flow without closing its socket (the shell has none, or closed it)."""
        if self.by_id.pop(flow.id, None) is None:
            return
        if self.by_key.get(flow.key) is flow:
            del self.by_key[flow.key]
        mine = self.by_guest.get(flow.owner)
        if mine is not None:
            mine.pop(flow.id, None)
            if not mine:
                del self.by_guest[flow.owner]
        guard = self.out.guard
        guard.sockets -= 1
        usage = guard.guests.get(flow.owner)
        if usage is not None and usage.datagram > 0:
            usage.datagram -= 1

    def close(self, flow: IdleFlow) -> None:
        self.forget(flow)
        self.out.op(HostOp(self.close_op, flow.id))

    def evict_oldest_of(self, owner: bytes) -> bool:
        """Close the oldest flow of the guest with MAC owner; False when it has none."""
        mine = self.by_guest.get(owner)
        if not mine:
            return False
        self.close(next(iter(mine.values())))
        self.out.counters.add(self.name + "-flows-reclaimed")
        return True

    def close_guests(self, owners: set[bytes]) -> int:
        """Close every flow of these guests (they are gone); how many."""
        closed = 0
        for owner in owners:
            mine = self.by_guest.get(owner)
            if mine:
                for flow in list(mine.values()):
                    self.close(flow)
                    closed += 1
        return closed

    def expire(self, now: float) -> None:
        timeout = self.out.config.udp_idle_timeout
        while self.by_key:
            flow = next(iter(self.by_key.values()))
            if flow.last_active + timeout > now:
                break
            self.close(flow)
            self.out.counters.add(self.name + "-flows-expired")

    def next_deadline(self) -> float:
        if not self.by_key:
            return INF
        return next(iter(self.by_key.values())).last_active + self.out.config.udp_idle_timeout

"""A table of idle-expiring flows (UDP NAT, ping): by key, least recently used first, and by id.

Each flow closes (its host socket too, through close_op) after the UDP idle timeout; when the
table is full, the least recently used flow is closed to make room.
"""

from typing import Final, final

from qemu_vpnnet.core.actions import HostOp
from qemu_vpnnet.core.output import Output

INF: Final = float("inf")


class IdleFlow:
    """What the table needs of a flow; UdpFlow and PingFlow extend it."""

    def __init__(self, flow_id: int, key: int, now: float) -> None:
        self.id = flow_id
        self.key = key
        self.created = now
        self.last_active = now


@final
class IdleFlows:
    def __init__(self, out: Output, close_op: int, name: str, capacity: int) -> None:
        self.out = out
        self.close_op = close_op
        self.name = name  # counter prefix: NAME-flows-opened, -evicted, -expired
        self.capacity = max(1, capacity)
        self.by_key: dict[int, IdleFlow] = {}  # least recently used first
        self.by_id: dict[int, IdleFlow] = {}
        self.next_id = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def insert(self, flow: IdleFlow) -> None:
        """A new flow; the least recently used one is closed first if the table is full."""
        if len(self.by_key) >= self.capacity:
            self.close(next(iter(self.by_key.values())))
            self.out.counters.add(self.name + "-flows-evicted")
        self.by_key[flow.key] = flow
        self.by_id[flow.id] = flow
        self.out.counters.add(self.name + "-flows-opened")

    def touch(self, flow: IdleFlow, now: float) -> None:
        """The flow was used: it moves to the most recently used end."""
        flow.last_active = now
        del self.by_key[flow.key]
        self.by_key[flow.key] = flow

    def forget(self, flow: IdleFlow) -> None:
        """Drop the flow without closing its socket (the shell has none, or closed it)."""
        self.by_key.pop(flow.key, None)
        self.by_id.pop(flow.id, None)

    def close(self, flow: IdleFlow) -> None:
        self.forget(flow)
        self.out.op(HostOp(self.close_op, flow.id))

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

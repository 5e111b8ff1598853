"""UDP port forwards, the guest side: one flow per host peer of a forward.

Datagrams from a host peer reach the guest from the gateway address (fec0::2 toward a guest's
IPv6 address) and a source port of the flow's own; the guest's replies to that address and
port go back to that peer. Flows expire after the UDP idle timeout; their number is capped
(oldest evicted).
"""

import heapq
from typing import Final, final

from qemu_vpnnet.core.actions import OP_UDP_FWD_CLOSE, OP_UDP_FWD_REPLY, HostOp
from qemu_vpnnet.core.config import ip_str
from qemu_vpnnet.core.output import Output

SOURCE_PORT_FIRST: Final = 49152
INF: Final = float("inf")


@final
class UdpForwardFlow:
    def __init__(self, flow: int, key: bytes, guest_mac: bytes, guest_ip: bytes, guest_port: int, port: int) -> None:
        self.flow = flow
        self.key = key
        self.guest_mac = guest_mac
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.port = port  # our source port toward the guest
        self.created = 0.0
        self.last_used = 0.0
        self.bytes_to_guest = 0
        self.bytes_to_host = 0


@final
class UdpForwards:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.config = out.config
        self.by_flow: dict[int, UdpForwardFlow] = {}
        self.by_key: dict[bytes, UdpForwardFlow] = {}
        self.next_flow = 1 << 40  # apart from the NAT's flow numbers
        self.next_port = SOURCE_PORT_FIRST
        self.timers: list[tuple[float, int]] = []

    @staticmethod
    def make_key(guest_ip: bytes, guest_port: int, port: int) -> bytes:
        return guest_ip + guest_port.to_bytes(2, "big") + port.to_bytes(2, "big")

    def open(self, guest_mac: bytes, guest_ip: bytes, guest_port: int, now: float) -> int:
        """A new flow toward guest_ip:guest_port for one host peer; its flow number."""
        if len(self.by_flow) >= self.config.max_udp_flows:
            oldest = min(self.by_flow.values(), key=lambda f: f.last_used)
            self.close(oldest)
        for _attempt in range(16384):
            port = self.next_port
            self.next_port = port + 1 if port < 65535 else SOURCE_PORT_FIRST
            key = self.make_key(guest_ip, guest_port, port)
            if key not in self.by_key:
                break
        self.next_flow += 1
        flow = UdpForwardFlow(self.next_flow, key, guest_mac, guest_ip, guest_port, port)
        flow.created = flow.last_used = now
        self.by_flow[flow.flow] = flow
        self.by_key[key] = flow
        heapq.heappush(self.timers, (now + self.config.udp_idle_timeout, flow.flow))
        return flow.flow

    def to_guest(self, flow_id: int, data: bytes, now: float) -> bool:
        """A datagram from the flow's host peer; False when the flow is gone."""
        flow = self.by_flow.get(flow_id)
        if flow is None:
            return False
        flow.last_used = now
        flow.bytes_to_guest += len(data)
        self.out.send_udp(flow.guest_mac, self.gateway_of(flow), flow.guest_ip, flow.port, flow.guest_port, data)
        return True

    def gateway_of(self, flow: UdpForwardFlow) -> bytes:
        """The gateway address of the flow's family: where the guest sees its datagrams come from."""
        return self.config.host_ip6 if len(flow.guest_ip) == 16 else self.config.host_ip

    def from_guest(self, src: bytes, sport: int, dport: int, payload: bytes, now: float) -> bool:
        """A guest datagram to the gateway address (of either family): True when it answers a
        forward flow."""
        flow = self.by_key.get(self.make_key(src, sport, dport))
        if flow is None:
            return False
        flow.last_used = now
        flow.bytes_to_host += len(payload)
        self.out.op(HostOp(OP_UDP_FWD_REPLY, flow.flow, "", 0, payload))
        return True

    def close(self, flow: UdpForwardFlow) -> None:
        self.by_flow.pop(flow.flow, None)
        self.by_key.pop(flow.key, None)
        self.out.op(HostOp(OP_UDP_FWD_CLOSE, flow.flow))

    def close_guests(self, macs: set[bytes]) -> int:
        """The guests with these MACs are gone: close their forward flows; how many."""
        gone = [flow for flow in self.by_flow.values() if flow.guest_mac in macs]
        for flow in gone:
            self.close(flow)
        return len(gone)

    def close_flow(self, flow_id: int) -> None:
        flow = self.by_flow.get(flow_id)
        if flow is not None:
            self.close(flow)

    def timer(self, now: float) -> None:
        timeout = self.config.udp_idle_timeout
        while self.timers and self.timers[0][0] <= now:
            _when, flow_id = heapq.heappop(self.timers)
            flow = self.by_flow.get(flow_id)
            if flow is None:
                continue
            if flow.last_used + timeout <= now:
                self.close(flow)
            else:
                heapq.heappush(self.timers, (flow.last_used + timeout, flow_id))

    def next_deadline(self) -> float:
        return self.timers[0][0] if self.timers else INF

    def flows(self, now: float) -> list[dict[str, object]]:
        """The UDP forward flows, for query-connections (shaped as the NAT's UDP flows)."""
        return [
            {
                "protocol": "udp",
                "direction": "forwarded",
                "route": "hostfwd",
                "guest-address": ip_str(flow.guest_ip),
                "guest-port": flow.guest_port,
                "remote-address": ip_str(self.gateway_of(flow)),
                "remote-port": flow.port,
                "bytes-out": flow.bytes_to_host,
                "bytes-in": flow.bytes_to_guest,
                "age": now - flow.created,
                "idle": now - flow.last_used,
            }
            for flow in self.by_flow.values()
        ]

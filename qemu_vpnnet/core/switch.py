"""A learning Ethernet switch joining every connected QEMU (port) and the virtual gateway.

Frames queue per port in `out`; the shell drains the queues after each batch of events and
writes each port's frames in one call.
"""

from typing import Final, final

from qemu_vpnnet.core.actions import Counters
from qemu_vpnnet.core.vhost_net import NetDevice

MAX_MACS: Final = 4096


TSO_V4: Final = 1
TSO_V6: Final = 2


@final
class Switch:
    def __init__(self, gateway_mac: bytes, counters: Counters) -> None:
        self.gateway_mac = gateway_mac
        self.counters = counters
        self.ports: list[int] = []
        self.mac_table: dict[bytes, int] = {}
        self.out: dict[int, list[bytes]] = {}
        self.congested: set[int] = set()  # ports whose QEMU is behind: no new TCP data for them
        # ports whose guest takes TCP segments of up to 64 KiB (vhost-user with GUEST_TSO4/6):
        # port -> TSO_V4 | TSO_V6
        self.tso_ports: dict[int, int] = {}
        # ports whose TCP segments may be written straight into the guest's RX ring (vhost-user,
        # core/vhost_net.py direct_segments); direct_off: every frame must pass through out (a
        # capture watches)
        self.direct: dict[int, NetDevice] = {}
        self.direct_off = False

    def attach(self, port: int) -> None:
        if port not in self.out:
            self.ports.append(port)
            self.out[port] = []

    def detach(self, port: int) -> None:
        if port in self.out:
            self.ports.remove(port)
            del self.out[port]
            self.congested.discard(port)
            self.tso_ports.pop(port, None)
            self.direct.pop(port, None)
            for mac in [m for m, p in self.mac_table.items() if p == port]:
                del self.mac_table[mac]

    def learn(self, mac: bytes, port: int) -> None:
        """Remember which port a source MAC address lives on (not multicast sources)."""
        if mac[0] & 1:
            return
        if self.mac_table.get(mac) != port:
            if len(self.mac_table) >= MAX_MACS and mac not in self.mac_table:
                del self.mac_table[next(iter(self.mac_table))]
            self.mac_table[mac] = port

    def forward(self, in_port: int, dst_mac: bytes, frame: bytes) -> bool:
        """Pass a guest's frame on to other guests; True when the gateway must see it too."""
        if dst_mac == self.gateway_mac:
            return True
        if dst_mac[0] & 1:  # broadcast or multicast: every other port, and the gateway
            for port in self.ports:
                if port != in_port:
                    self.out[port].append(frame)
            return True
        known = self.mac_table.get(dst_mac)
        if known is None:
            for other in self.ports:
                if other != in_port:
                    self.out[other].append(frame)
        elif known != in_port:
            self.out[known].append(frame)
        return False

    def is_congested(self, dst_mac: bytes) -> bool:
        port = self.mac_table.get(dst_mac)
        return port is not None and port in self.congested

    def set_tso(self, port: int, flags: int) -> None:
        """Whether port's guest takes large TCP segments (TSO_V4, TSO_V6), as its NIC negotiated."""
        if flags:
            self.tso_ports[port] = flags
        else:
            self.tso_ports.pop(port, None)

    def takes_tso(self, dst_mac: bytes, flag: int) -> bool:
        """Whether the port where dst_mac lives takes large TCP segments of that family."""
        port = self.mac_table.get(dst_mac)
        return port is not None and bool(self.tso_ports.get(port, 0) & flag)

    def set_direct(self, port: int, device: NetDevice) -> None:
        """port's TCP segments may go straight into device's RX ring (while it says it can)."""
        if port in self.out:
            self.direct[port] = device

    def direct_for(self, dst_mac: bytes) -> NetDevice | None:
        """The device to write dst_mac's TCP segments into directly: its port's, when nothing is
        queued for that port (a segment must not overtake a frame) and no capture watches."""
        port = self.mac_table.get(dst_mac)
        if port is None or self.direct_off or self.out[port]:
            return None
        return self.direct.get(port)

    def queue_for(self, dst_mac: bytes) -> list[bytes] | None:
        """The queue of the port where dst_mac lives; None when unknown (frames must flood)."""
        port = self.mac_table.get(dst_mac)
        return None if port is None else self.out[port]

    def send(self, dst_mac: bytes, frame: bytes) -> None:
        """Send a frame from the gateway toward a guest MAC (flooded when unknown)."""
        port = self.mac_table.get(dst_mac)
        if port is not None:
            self.out[port].append(frame)
            return
        for other in self.ports:
            self.out[other].append(frame)

    def pending(self) -> bool:
        for frames in self.out.values():
            if frames:
                return True
        return False

"""The virtual network as one sans-IO object: frames and host events in, frames and ops out.

Inputs: frame_received(port, frame, now), the host_* events of the protocol engines, timer(now).
Outputs: `switch.out` (frames per port), `ops` (HostOp socket operations), `events` (for the
control plane), and next_deadline().
"""

from typing import Final, final

from qemu_vpnnet.core.actions import Counters, HostOp
from qemu_vpnnet.core.checksum import checksum
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.dhcp import DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpServer
from qemu_vpnnet.core.packets import (
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IP_HLEN,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    UDP_HLEN,
    arp_packet,
    build_ipv4_frame,
    eth_header,
    icmp_message,
    udp_segment,
    unpack_arp,
    unpack_ipv4,
    unpack_udp,
)
from qemu_vpnnet.core.switch import Switch

MAX_GUEST_HOSTS: Final = 4096
NO_DEADLINE: Final = float("inf")


@final
class Stack:
    def __init__(self, config: NetConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.switch = Switch(config.gateway_mac, self.counters)
        self.ops: list[HostOp] = []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.dhcp = DhcpServer(config)
        self.guest_macs: dict[bytes, bytes] = {}  # guest IPv4 address -> MAC, learned from traffic
        self.ip_ident = 0

    # ---- ports -------------------------------------------------------------------------
    def attach_port(self, port: int) -> None:
        self.switch.attach(port)

    def detach_port(self, port: int) -> None:
        self.switch.detach(port)

    # ---- output helpers used by the protocol modules -------------------------------------
    def next_ident(self) -> int:
        self.ip_ident = (self.ip_ident + 1) & 0xFFFF
        return self.ip_ident

    def send_ip(self, dst_mac: bytes, src: bytes, dst: bytes, proto: int, l4: bytes) -> None:
        frame = build_ipv4_frame(dst_mac, self.config.gateway_mac, src, dst, proto, l4, self.next_ident())
        self.counters.add("tx-frames")
        self.counters.add("tx-bytes", len(frame))
        self.switch.send(dst_mac, frame)

    def send_udp(self, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> None:
        self.send_ip(dst_mac, src, dst, IPPROTO_UDP, udp_segment(src, dst, sport, dport, payload))

    def mac_of(self, guest_ip: bytes) -> bytes | None:
        return self.guest_macs.get(guest_ip)

    def drop(self, reason: str) -> None:
        self.counters.add("rx-dropped")
        self.counters.add("drop-" + reason)

    # ---- input -------------------------------------------------------------------------
    def frame_received(self, port: int, frame: bytes, now: float) -> None:
        """One Ethernet frame from a guest on port."""
        self.counters.add("rx-frames")
        self.counters.add("rx-bytes", len(frame))
        if len(frame) < ETH_HLEN:
            self.drop("runt-frame")
            return
        dst_mac = frame[0:6]
        src_mac = frame[6:12]
        if src_mac[0] & 1 or src_mac == self.config.gateway_mac:
            self.drop("bad-source-mac")
            return
        self.switch.learn(src_mac, port)
        if not self.switch.forward(port, dst_mac, frame):
            return
        ethertype = (frame[12] << 8) | frame[13]
        if ethertype == ETH_P_IP:
            self.ipv4_received(src_mac, frame, now)
        elif ethertype == ETH_P_ARP:
            self.arp_received(src_mac, frame)
        elif ethertype == ETH_P_IPV6:
            self.counters.add("rx-ipv6-ignored")
        else:
            self.counters.add("rx-other-ethertype")

    def arp_received(self, src_mac: bytes, frame: bytes) -> None:
        if len(frame) < ETH_HLEN + 28:
            self.drop("short-arp")
            return
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = unpack_arp(frame, ETH_HLEN)
        if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
            self.drop("bad-arp")
            return
        if self.config.contains(spa) and spa != b"\x00\x00\x00\x00" and not sha[0] & 1:
            self.remember_guest(spa, sha)
        if op != 1:
            return
        cfg = self.config
        if tpa == cfg.host_ip or tpa == cfg.dns_ip:
            reply = arp_packet(2, cfg.gateway_mac, tpa, sha, spa)
            self.counters.add("tx-frames")
            self.switch.send(src_mac, eth_header(src_mac, cfg.gateway_mac, ETH_P_ARP) + reply)

    def remember_guest(self, addr: bytes, mac: bytes) -> None:
        if self.guest_macs.get(addr) != mac:
            if len(self.guest_macs) >= MAX_GUEST_HOSTS and addr not in self.guest_macs:
                del self.guest_macs[next(iter(self.guest_macs))]
            self.guest_macs[addr] = mac

    def ipv4_received(self, src_mac: bytes, frame: bytes, now: float) -> None:
        if len(frame) < ETH_HLEN + IP_HLEN:
            self.drop("short-ip")
            return
        ver_ihl, _tos, total_len, _ident, frag, _ttl, proto, _csum, src, dst = unpack_ipv4(frame, ETH_HLEN)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < IP_HLEN or total_len < ihl or ETH_HLEN + total_len > len(frame):
            self.drop("bad-ip-length")
            return
        if checksum(frame[ETH_HLEN : ETH_HLEN + ihl]) != 0:
            self.drop("bad-ip-checksum")
            return
        if frag & 0x3FFF:
            self.drop("ip-fragment")
            return
        cfg = self.config
        if src != b"\x00\x00\x00\x00" and cfg.contains(src):
            self.remember_guest(src, src_mac)
        start = ETH_HLEN + ihl
        end = ETH_HLEN + total_len
        if proto == IPPROTO_UDP:
            self.udp_received(src_mac, src, dst, frame, start, end, now)
        elif proto == IPPROTO_ICMP:
            self.icmp_received(src_mac, src, dst, frame[start:end], now)
        elif proto == IPPROTO_TCP:
            self.tcp_received(src_mac, src, dst, frame, start, end, now)
        else:
            self.drop("ip-protocol")

    def udp_received(
        self, src_mac: bytes, src: bytes, dst: bytes, frame: bytes, start: int, end: int, now: float
    ) -> None:
        if end - start < UDP_HLEN:
            self.drop("short-udp")
            return
        _sport, dport, length, _csum = unpack_udp(frame, start)
        if length < UDP_HLEN or length > end - start:
            self.drop("bad-udp-length")
            return
        payload = frame[start + UDP_HLEN : start + length]
        cfg = self.config
        if dport == DHCP_SERVER_PORT and (dst == cfg.host_ip or dst == b"\xff\xff\xff\xff"):
            self.dhcp_received(src_mac, payload, now)
            return
        self.drop("udp-unhandled")

    def dhcp_received(self, src_mac: bytes, payload: bytes, now: float) -> None:
        try:
            reply = self.dhcp.handle(payload, src_mac, now)
        except ValueError:
            self.drop("bad-dhcp")
            return
        if self.dhcp.events:
            self.events.extend(self.dhcp.events)
            self.dhcp.events.clear()
        if reply is None:
            return
        self.counters.add("dhcp-replies")
        # Ethernet unicast to the client's hardware address works for every client, even one
        # asking for a broadcast reply; other guests on the segment need not see it.
        self.send_udp(
            reply.dst_mac, self.config.host_ip, reply.dst_ip, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, reply.payload
        )

    def icmp_received(self, src_mac: bytes, src: bytes, dst: bytes, message: bytes, now: float) -> None:
        if len(message) < 8:
            self.drop("short-icmp")
            return
        cfg = self.config
        if dst == cfg.host_ip or dst == cfg.dns_ip:
            if message[0] == 8:  # echo request to a virtual address: answer it ourselves
                if checksum(message) != 0:
                    self.drop("bad-icmp-checksum")
                    return
                self.counters.add("icmp-echo-local")
                self.send_ip(src_mac, dst, src, IPPROTO_ICMP, icmp_message(0, 0, message[4:]))
            return
        self.drop("icmp-unhandled")

    def tcp_received(
        self, src_mac: bytes, src: bytes, dst: bytes, frame: bytes, start: int, end: int, now: float
    ) -> None:
        self.drop("tcp-unhandled")

    # ---- time --------------------------------------------------------------------------
    def timer(self, now: float) -> None:
        """Run everything whose deadline has passed."""

    def next_deadline(self) -> float:
        return NO_DEADLINE

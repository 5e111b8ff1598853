"""The virtual network as one sans-IO object: frames and host events in, frames and ops out.

Inputs: frame_received(port, frame, now), the host_* events of the protocol engines, timer(now).
Outputs: `switch.out` (frames per port), `ops` (HostOp socket operations), `events` (for the
control plane), and next_deadline().
"""

from typing import Final, final

from qemu_vpnnet.core.checksum import checksum, finish
from qemu_vpnnet.core.config import NetConfig, ip_str
from qemu_vpnnet.core.dhcp import DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpServer
from qemu_vpnnet.core.dhcpv6 import Dhcpv6Server
from qemu_vpnnet.core.dns import DnsServer
from qemu_vpnnet.core.fragments import Reassembler
from qemu_vpnnet.core.icmp import IcmpProxy
from qemu_vpnnet.core.ipv6_input import Ipv6Input
from qemu_vpnnet.core.ndp import Ndp
from qemu_vpnnet.core.output import Output
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
    eth_header,
    icmp_message,
    mac_str,
    unpack_arp,
)
from qemu_vpnnet.core.tcp import TcpEngine
from qemu_vpnnet.core.udp import UdpNat
from qemu_vpnnet.core.udp_forward import UdpForwards

NO_DEADLINE: Final = float("inf")


@final
class Stack:
    def __init__(self, config: NetConfig) -> None:
        self.config = config
        out = Output(config)
        self.out = out
        self.counters = out.counters
        self.switch = out.switch
        self.fwd = out.fwd  # the route of every new flow, its rules and gateway services
        self.dhcp = DhcpServer(config)
        self.dhcp.reserved = out.fwd.service_addrs
        self.udp = UdpNat(out)
        self.icmp = IcmpProxy(out)
        self.dns = DnsServer(out)
        self.udp.local_services["dns"] = self.dns.from_guest
        self.tcp = TcpEngine(out)
        self.udp_forwards = UdpForwards(out)
        self.fragments = Reassembler(self.counters)
        self.guard = out.guard  # who may use which address, per-guest limits (core/guard.py)
        self.owners = out.guard.owners
        self.guard.reclaim = self.reclaim
        self.ndp = Ndp(out)  # router and neighbour advertisements (core/ndp.py)
        self.dhcpv6 = Dhcpv6Server(config)
        self.ipv6 = Ipv6Input(self)  # IPv6 frames from guests (core/ipv6_input.py)

    # ---- ports -------------------------------------------------------------------------
    def attach_port(self, port: int) -> None:
        self.switch.attach(port)

    def detach_port(self, port: int) -> dict[str, int]:
        """QEMU on port went away: forget its MACs, and close the flows of the guests that lived
        only there (their host peers see a reset). Returns what was closed, by kind."""
        gone = {mac for mac, where in self.switch.mac_table.items() if where == port}
        self.switch.detach(port)
        self.guard.release6(gone)
        return self.close_guests(gone)

    def close_guests(self, macs: set[bytes]) -> dict[str, int]:
        """Close every flow of the guests with these MACs: TCP (outbound and forwarded) aborted
        toward the host, UDP, ping and UDP-forward flows closed. Counted as guest-gone-*."""
        closed = {
            "tcp": self.tcp.close_guests(macs),
            "udp": self.udp.table.close_guests(macs),
            "icmp": self.icmp.table.close_guests(macs),
            "udp-forward": self.udp_forwards.close_guests(macs),
        }
        for kind, count in closed.items():
            if count:
                self.counters.add(f"guest-gone-{kind}-closed", count)
        return closed

    def reclaim(self, mac: bytes, now: float) -> bool:
        """Free one host socket of the guest with this MAC (it holds the most and the budget is
        spent): its oldest pending connect, else its oldest UDP or ping flow, else its oldest
        connection. True when one was freed."""
        usage = self.guard.guests.get(mac)
        if usage is None:
            return False
        victim = -1
        for flow, pending in usage.tcp.items():
            if pending:
                victim = flow
                break
        if victim < 0:
            if self.udp.table.evict_oldest_of(mac) or self.icmp.table.evict_oldest_of(mac):
                return True
            for flow in usage.tcp:
                victim = flow
                break
        if victim < 0:
            return False
        return self.tcp.abort_flow(victim, "tcp-reclaimed")

    def port_congested(self, port: int, congested: bool, now: float) -> None:
        """The shell's write buffer toward port's QEMU went above (or back below) its limit."""
        if congested:
            self.switch.congested.add(port)
            self.counters.add("port-congested")
        else:
            self.switch.congested.discard(port)
            self.tcp.port_resumed(port, now)

    # ---- input -------------------------------------------------------------------------
    def frame_received(self, port: int, frame: bytes, now: float) -> None:
        """One Ethernet frame from a guest on port."""
        counters = self.counters
        counters.rx_frames += 1
        counters.rx_bytes += len(frame)
        if len(frame) < ETH_HLEN:
            self.out.drop("runt-frame")
            return
        dst_mac = frame[0:6]
        src_mac = frame[6:12]
        if src_mac[0] & 1 or src_mac == self.config.gateway_mac:
            self.out.drop("bad-source-mac")
            return
        ethertype = (frame[12] << 8) | frame[13]
        # A claim to an address that is not the sender's is neither learned nor switched. IPv4
        # to the gateway is checked in ipv4_received, where the source address is at hand; here
        # only what the switch passes to other guests (and broadcasts, checked twice).
        if ethertype == ETH_P_IP:
            if dst_mac != self.config.gateway_mac:
                src = frame[26:30]  # short frames: no match
                owner = self.owners.get(src)
                if owner is not None and owner != src_mac and self.spoofed("ip", src, src_mac, src_mac, now):
                    return
        elif ethertype == ETH_P_ARP and len(frame) >= ETH_HLEN + 28:
            spa = frame[28:32]
            if spa in self.owners and self.spoofed("arp", spa, src_mac, frame[22:28], now):
                return
        elif ethertype == ETH_P_IPV6 and self.config.ipv6 and self.ipv6.blocked(src_mac, frame, now):
            return  # a forged source or neighbour claim, or a router's message from a guest
        self.switch.learn(src_mac, port)
        if not self.switch.forward(port, dst_mac, frame):
            return
        if ethertype == ETH_P_IP:
            self.ipv4_received(src_mac, frame, now)
        elif ethertype == ETH_P_ARP:
            self.arp_received(src_mac, frame)
        elif ethertype == ETH_P_IPV6:
            if self.config.ipv6:
                self.ipv6.received(src_mac, frame, now)
            else:
                self.counters.add("rx-ipv6-ignored")
        else:
            self.counters.add("rx-other-ethertype")

    def spoofed(self, what: str, addr: bytes, src_mac: bytes, claimed_mac: bytes, now: float) -> bool:
        """Whether a frame from src_mac claiming addr (for ARP: at claimed_mac, its sender
        hardware address) claims an address owned by someone else; counted as a drop."""
        reason = self.spoof_reason(addr, src_mac, now)
        if not reason and claimed_mac != src_mac:
            reason = self.spoof_reason(addr, claimed_mac, now)
        if not reason:
            return False
        self.out.drop(f"{what}-spoof-{reason}")
        return True

    def spoof_reason(self, addr: bytes, mac: bytes, now: float) -> str:
        """ "" when mac may use addr; else why not: gateway, dns, service (the backend's own
        addresses) or lease (a live DHCP lease of another MAC). Forgets expired leases."""
        owners = self.owners
        owner = owners.get(addr)
        if owner is None or owner == mac:
            return ""
        cfg = self.config
        if owner == cfg.gateway_mac:
            if addr == cfg.host_ip:
                return "gateway"
            return "dns" if addr == cfg.dns_ip else "service"
        live = self.dhcp.bound_mac(addr, now)
        if live is None:
            del owners[addr]  # the lease ran out or was released: free for anyone again
            return ""
        if live != owner:
            owners[addr] = live
        return "" if live == mac else "lease"

    def arp_received(self, src_mac: bytes, frame: bytes) -> None:
        if len(frame) < ETH_HLEN + 28:
            self.out.drop("short-arp")
            return
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = unpack_arp(frame, ETH_HLEN)
        if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
            self.out.drop("bad-arp")
            return
        if self.config.contains(spa) and spa != b"\x00\x00\x00\x00" and not sha[0] & 1:
            self.out.remember_guest(spa, sha)
        if op != 1:
            return
        cfg = self.config
        if tpa == cfg.host_ip or tpa == cfg.dns_ip or tpa in self.fwd.service_addrs:
            reply = arp_packet(2, cfg.gateway_mac, tpa, sha, spa)
            self.out.send_frame(src_mac, eth_header(src_mac, cfg.gateway_mac, ETH_P_ARP) + reply)

    def ipv4_received(self, src_mac: bytes, frame: bytes, now: float) -> None:
        if len(frame) < ETH_HLEN + IP_HLEN:
            self.out.drop("short-ip")
            return
        # the header's fields read by index: compiled, no tuple and no struct call per frame
        ver_ihl = frame[14]
        tos = frame[15]
        total_len = (frame[16] << 8) | frame[17]
        ident = (frame[18] << 8) | frame[19]
        frag = (frame[20] << 8) | frame[21]
        ttl = frame[22]
        proto = frame[23]
        csum = (frame[24] << 8) | frame[25]
        src = frame[26:30]
        dst = frame[30:34]
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < IP_HLEN or total_len < ihl or ETH_HLEN + total_len > len(frame):
            self.out.drop("bad-ip-length")
            return
        if ihl == IP_HLEN:  # the usual header: sum the fields already unpacked
            total = ((ver_ihl << 8) | tos) + total_len + ident + frag + ((ttl << 8) | proto) + csum
            total += (
                ((src[0] << 8) | src[1])
                + ((src[2] << 8) | src[3])
                + ((dst[0] << 8) | dst[1])
                + ((dst[2] << 8) | dst[3])
            )
            valid = finish(total) == 0
        else:
            valid = checksum(frame[ETH_HLEN : ETH_HLEN + ihl]) == 0
        if not valid:
            self.out.drop("bad-ip-checksum")
            return
        cfg = self.config
        if src != b"\x00\x00\x00\x00" and cfg.contains(src):
            # every protected address is one of the guest network (the lookup reuses src's hash)
            owner = self.owners.get(src)
            if owner is not None and owner != src_mac and self.spoofed("ip", src, src_mac, src_mac, now):
                return
            self.out.remember_guest(src, src_mac)
        start = ETH_HLEN + ihl
        end = ETH_HLEN + total_len
        if frag & 0x3FFF:
            if proto == IPPROTO_TCP:
                self.out.drop("ip-fragment-tcp")  # TCP is never fragmented by a sane guest (DF, MSS)
                return
            key = frame[ETH_HLEN + 12 : ETH_HLEN + 20] + bytes((proto,)) + frame[ETH_HLEN + 4 : ETH_HLEN + 6]
            header = frame[ETH_HLEN:start]
            whole = self.fragments.add(key, header, (frag & 0x1FFF) * 8, bool(frag & 0x2000), frame[start:end], now)
            self.counters.add("rx-ip-fragments")
            if whole is None:
                return
            self.counters.add("rx-ip-reassembled")
            frame = frame[:ETH_HLEN] + header + whole
            end = start + len(whole)
        if proto == IPPROTO_UDP:
            self.udp_received(src_mac, src, dst, frame, start, end, now)
        elif proto == IPPROTO_ICMP:
            self.icmp_received(src_mac, src, dst, frame[start:end], now)
        elif proto == IPPROTO_TCP:
            self.tcp_received(src_mac, src, dst, frame, start, end, now)
        else:
            self.out.drop("ip-protocol")

    def udp_received(
        self, src_mac: bytes, src: bytes, dst: bytes, frame: bytes, start: int, end: int, now: float
    ) -> None:
        if end - start < UDP_HLEN:
            self.out.drop("short-udp")
            return
        sport = (frame[start] << 8) | frame[start + 1]
        dport = (frame[start + 2] << 8) | frame[start + 3]
        length = (frame[start + 4] << 8) | frame[start + 5]
        if length < UDP_HLEN or length > end - start:
            self.out.drop("bad-udp-length")
            return
        payload = frame[start + UDP_HLEN : start + length]
        cfg = self.config
        if dport == DHCP_SERVER_PORT and (dst == cfg.host_ip or dst == b"\xff\xff\xff\xff"):
            self.dhcp_received(src_mac, payload, now)
            return
        if (
            dst == cfg.host_ip
            and self.udp_forwards.by_key
            and self.udp_forwards.from_guest(src, sport, dport, payload, now)
        ):
            return
        if dst == cfg.dns_ip and dport == 53:
            self.dns.from_guest(src_mac, src, dst, sport, payload, now)
            return
        self.udp.from_guest(src_mac, src, dst, sport, dport, payload, now)

    def dhcp_received(self, src_mac: bytes, payload: bytes, now: float) -> None:
        if len(payload) >= 34 and payload[28:34] != src_mac:
            self.out.drop("dhcp-spoof-chaddr")  # a lease (or its release) asked for another MAC
            return
        try:
            reply = self.dhcp.handle(payload, src_mac, now)
        except ValueError:
            self.out.drop("bad-dhcp")
            return
        lease = self.dhcp.by_mac.get(src_mac)
        if lease is not None and lease.bound and lease.expires > now:
            self.guard.leased(lease.addr, src_mac)
        if self.dhcp.events:
            self.out.events.extend(self.dhcp.events)
            self.dhcp.events.clear()
        if reply is None:
            return
        self.counters.add("dhcp-replies")
        # Ethernet unicast to the client's hardware address works for every client, even one
        # asking for a broadcast reply; other guests on the segment need not see it.
        self.out.send_udp(
            reply.dst_mac, self.config.host_ip, reply.dst_ip, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, reply.payload
        )

    def icmp_received(self, src_mac: bytes, src: bytes, dst: bytes, message: bytes, now: float) -> None:
        if len(message) < 8:
            self.out.drop("short-icmp")
            return
        cfg = self.config
        if dst == cfg.host_ip or dst == cfg.dns_ip or dst in self.fwd.service_addrs:
            if message[0] == 8:  # echo request to a virtual address: answer it ourselves
                if checksum(message) != 0:
                    self.out.drop("bad-icmp-checksum")
                    return
                self.counters.add("icmp-echo-local")
                self.out.send_ip(src_mac, dst, src, IPPROTO_ICMP, icmp_message(0, 0, message[4:]))
            return
        self.icmp.from_guest(src_mac, src, dst, message, now)

    def tcp_received(
        self, src_mac: bytes, src: bytes, dst: bytes, frame: bytes, start: int, end: int, now: float
    ) -> None:
        self.tcp.segment_received(src_mac, src, dst, frame, start, end, now)

    def flush(self, now: float) -> None:
        """End of a batch of events: hand on joined data and coalesced ACKs."""
        self.tcp.flush(now)

    # ---- time --------------------------------------------------------------------------
    def timer(self, now: float) -> None:
        """Run everything whose deadline has passed."""
        self.tcp.timer(now)
        self.udp.timer(now)
        self.icmp.timer(now)
        self.dns.timer(now)
        self.udp_forwards.timer(now)
        if self.config.ipv6:
            self.ndp.timer(now)
        if self.fragments.pending:
            self.fragments.expire(now)

    def next_deadline(self) -> float:
        return min(
            self.tcp.next_deadline(),
            self.udp.next_deadline(),
            self.icmp.next_deadline(),
            self.dns.next_deadline(),
            self.udp_forwards.next_deadline(),
            self.fragments.next_deadline(),
            self.ndp.next_deadline() if self.config.ipv6 else NO_DEADLINE,
        )

    # ---- IPv6 neighbours ---------------------------------------------------------------
    def ipv6_neighbours(self, now: float) -> list[dict[str, object]]:
        """The guests' IPv6 addresses seen on the network (claimed by their MAC), for QMP."""
        present = self.switch.mac_table
        return [
            {"address": ip_str(addr), "mac": mac_str(mac), "age": round(now - since, 3), "present": mac in present}
            for addr, (mac, since) in self.guard.claims6.items()
        ]

    def guest_ipv6(self, mac: bytes) -> bytes | None:
        """The guest's most recently claimed IPv6 address in the prefix, or None."""
        cfg = self.config
        for addr in reversed(self.guard.addresses6(mac)):
            if addr[:8] == cfg.prefix6:
                return addr
        return None

"""DHCP server (RFC 2131): DISCOVER/OFFER, REQUEST/ACK/NAK, RELEASE, DECLINE, INFORM.

Addresses are stable per MAC address: a guest that comes back gets the address it had, as long
as nobody else needed it meanwhile. Static leases (MAC -> address) always win.
"""

from typing import Final, final

import dpkt

from qemu_vpnnet.core.config import NetConfig, int_ip, ip_int, ip_str
from qemu_vpnnet.core.packets import mac_str

DHCP_SERVER_PORT: Final = 67
DHCP_CLIENT_PORT: Final = 68
_MAX_LEASES: Final = 4096

_OPT_SUBNET: Final = 1
_OPT_ROUTER: Final = 3
_OPT_DNS: Final = 6
_OPT_DOMAIN: Final = 15
_OPT_MTU: Final = 26
_OPT_BROADCAST: Final = 28
_OPT_REQ_IP: Final = 50
_OPT_LEASE: Final = 51
_OPT_MSGTYPE: Final = 53
_OPT_SERVER_ID: Final = 54
_OPT_T1: Final = 58
_OPT_T2: Final = 59
_OPT_SEARCH: Final = 119


def encode_search_list(domains: list[str]) -> bytes:
    """RFC 3397 domain search option payload (RFC 1035 names, no compression)."""
    out = b""
    for domain in domains:
        for label in domain.strip(".").split("."):
            raw = label.encode("idna")
            if not 0 < len(raw) < 64:
                raise ValueError(f"bad label in search domain {domain!r}")
            out += bytes((len(raw),)) + raw
        out += b"\x00"
    return out


@final
class Lease:
    """One guest's address and when it runs out (0: offered, not yet bound)."""

    def __init__(self, mac: bytes, addr: bytes, expires: float) -> None:
        self.mac = mac
        self.addr = addr
        self.expires = expires
        self.bound = False  # ACKed, not merely offered
        self.hostname = ""  # DHCP option 12 of the guest's REQUESTs (for query-leases)


@final
class DhcpReply:
    """A reply to send: UDP payload, destination address and MAC."""

    def __init__(self, payload: bytes, dst_ip: bytes, dst_mac: bytes) -> None:
        self.payload = payload
        self.dst_ip = dst_ip
        self.dst_mac = dst_mac


@final
class DhcpServer:
    def __init__(self, config: NetConfig) -> None:
        self.config = config
        self.by_mac: dict[bytes, Lease] = {}
        self.by_addr: dict[bytes, Lease] = {}
        self.declined: set[bytes] = set()
        self.reserved: dict[bytes, int] = {}  # addresses never handed out (gateway services); Stack shares fwd's
        # (event name, data) for the control plane: GUEST_LEASE when a lease is bound or changes
        self.events: list[tuple[str, dict[str, object]]] = []
        self._options = self._fixed_options()

    def _fixed_options(self) -> list[tuple[int, bytes]]:
        cfg = self.config
        opts: list[tuple[int, bytes]] = [
            (_OPT_SERVER_ID, cfg.host_ip),
            (_OPT_SUBNET, cfg.netmask),
            (_OPT_ROUTER, cfg.host_ip),
            (_OPT_DNS, cfg.dns_ip),
            (_OPT_BROADCAST, cfg.broadcast),
            (_OPT_MTU, cfg.mtu.to_bytes(2, "big")),
        ]
        if cfg.domain:
            opts.append((_OPT_DOMAIN, cfg.domain.encode("idna")))
        if cfg.search:
            opts.append((_OPT_SEARCH, encode_search_list(cfg.search)))
        return opts

    def lease_of(self, mac: bytes) -> Lease | None:
        return self.by_mac.get(mac)

    def guest_address(self, mac: bytes, now: float) -> bytes | None:
        """The address currently bound to mac, if its lease is live."""
        lease = self.by_mac.get(mac)
        if lease is None or lease.expires < now:
            return None
        return lease.addr

    def _candidate(self, mac: bytes, now: float) -> bytes | None:
        cfg = self.config
        static = cfg.static_leases.get(mac)
        if static is not None:
            return static
        lease = self.by_mac.get(mac)
        if lease is not None:
            return lease.addr
        reserved = set(cfg.static_leases.values()) | {cfg.host_ip, cfg.dns_ip}
        start = ip_int(cfg.dhcp_start)
        last = ip_int(cfg.broadcast) - 1
        oldest: Lease | None = None
        for value in range(start, last + 1):
            addr = int_ip(value)
            if addr in reserved or addr in self.reserved or addr in self.declined:
                continue
            owner = self.by_addr.get(addr)
            if owner is None:
                return addr
            if owner.expires < now and (oldest is None or owner.expires < oldest.expires):
                oldest = owner
        if oldest is not None:
            self._forget(oldest)
            return oldest.addr
        return None

    def _forget(self, lease: Lease) -> None:
        self.by_mac.pop(lease.mac, None)
        if self.by_addr.get(lease.addr) is lease:
            del self.by_addr[lease.addr]

    def _assign(self, mac: bytes, addr: bytes, expires: float) -> Lease:
        lease = self.by_mac.get(mac)
        if lease is not None and lease.addr != addr:
            self._forget(lease)
            lease = None
        if lease is None:
            if len(self.by_mac) >= _MAX_LEASES:
                expired = [x for x in self.by_mac.values() if x.expires < expires - self.config.lease_time]
                for old in expired[: max(1, len(expired))]:
                    self._forget(old)
            other = self.by_addr.get(addr)
            if other is not None:
                self._forget(other)
            lease = Lease(mac, addr, expires)
            self.by_mac[mac] = lease
            self.by_addr[addr] = lease
        else:
            lease.expires = expires
        return lease

    def handle(self, payload: bytes, src_mac: bytes, now: float) -> DhcpReply | None:
        """Answer one DHCP message from a guest; None when it asks for no answer.

        Raises ValueError for a message that cannot be parsed (the caller counts the drop).
        """
        try:
            msg = dpkt.dhcp.DHCP(payload)
        except (dpkt.UnpackError, IndexError, ValueError) as exc:
            raise ValueError(f"malformed DHCP message: {exc}") from exc
        if msg.op != dpkt.dhcp.DHCP_OP_REQUEST:
            return None
        opts = dict(msg.opts)
        mtype_raw = opts.get(_OPT_MSGTYPE, b"")
        if len(mtype_raw) != 1:
            raise ValueError("DHCP message without a message type")
        mtype = mtype_raw[0]
        mac = bytes(msg.chaddr[:6])
        server_id = opts.get(_OPT_SERVER_ID)
        cfg = self.config
        if mtype == dpkt.dhcp.DHCPDISCOVER:
            addr = self._candidate(mac, now)
            if addr is None:
                return None
            lease = self.by_mac.get(mac)
            if lease is None or lease.addr != addr:
                self._assign(mac, addr, now + 60.0)
            return self._reply(msg, dpkt.dhcp.DHCPOFFER, addr, mac, True)
        if mtype == dpkt.dhcp.DHCPREQUEST:
            if server_id is not None and server_id != cfg.host_ip:
                lease = self.by_mac.get(mac)  # the guest chose another server
                if lease is not None and lease.expires <= now + 60.0:
                    self._forget(lease)
                return None
            requested = opts.get(_OPT_REQ_IP)
            if requested is None or len(requested) != 4:
                requested = int_ip(msg.ciaddr)
            wanted = self._candidate(mac, now)
            if wanted is None or requested != wanted:
                return self._nak(msg, mac)
            old = self.by_mac.get(mac)
            was_bound = old is not None and old.addr == wanted and old.expires > now and old.bound
            lease = self._assign(mac, wanted, now + cfg.lease_time)
            lease.bound = True
            hostname = opts.get(12, b"")
            if hostname:  # a renewal without it keeps the name
                lease.hostname = hostname.decode("utf-8", "replace")
            if not was_bound:
                self.events.append(
                    (
                        "GUEST_LEASE",
                        {
                            "mac": mac_str(mac),
                            "address": ip_str(wanted),
                            "hostname": lease.hostname,
                            "lease-time": cfg.lease_time,
                        },
                    )
                )
            return self._reply(msg, dpkt.dhcp.DHCPACK, wanted, mac, True)
        if mtype == dpkt.dhcp.DHCPRELEASE:
            lease = self.by_mac.get(mac)
            if lease is not None and lease.addr == int_ip(msg.ciaddr):
                lease.expires = now  # keep it for this MAC unless someone else needs it
                lease.bound = False
            return None
        if mtype == dpkt.dhcp.DHCPDECLINE:
            requested = opts.get(_OPT_REQ_IP)
            if requested is not None and len(requested) == 4:
                self.declined.add(requested)
                lease = self.by_addr.get(requested)
                if lease is not None:
                    self._forget(lease)
            return None
        if mtype == dpkt.dhcp.DHCPINFORM:
            return self._reply(msg, dpkt.dhcp.DHCPACK, b"\x00\x00\x00\x00", mac, False)
        return None

    def _reply(self, req: "dpkt.dhcp.DHCP", mtype: int, addr: bytes, mac: bytes, with_lease: bool) -> DhcpReply:
        cfg = self.config
        opts: list[tuple[int, bytes]] = [(_OPT_MSGTYPE, bytes((mtype,)))]
        opts.extend(self._options)
        if with_lease:
            t = cfg.lease_time
            opts.append((_OPT_LEASE, t.to_bytes(4, "big")))
            opts.append((_OPT_T1, (t // 2).to_bytes(4, "big")))
            opts.append((_OPT_T2, (t * 7 // 8).to_bytes(4, "big")))
        reply = dpkt.dhcp.DHCP(
            op=dpkt.dhcp.DHCP_OP_REPLY,
            xid=req.xid,
            flags=req.flags,
            ciaddr=req.ciaddr,
            yiaddr=ip_int(addr),
            siaddr=ip_int(cfg.host_ip),
            giaddr=req.giaddr,
            chaddr=req.chaddr,
            opts=opts,
        )
        if req.ciaddr and mtype == dpkt.dhcp.DHCPACK:
            dst = int_ip(req.ciaddr)
        elif req.flags & 0x8000 or not with_lease:
            dst = b"\xff\xff\xff\xff" if not req.ciaddr else int_ip(req.ciaddr)
        else:
            dst = addr
        return DhcpReply(bytes(reply), dst, mac)

    def _nak(self, req: "dpkt.dhcp.DHCP", mac: bytes) -> DhcpReply:
        reply = dpkt.dhcp.DHCP(
            op=dpkt.dhcp.DHCP_OP_REPLY,
            xid=req.xid,
            flags=req.flags,
            chaddr=req.chaddr,
            opts=[(_OPT_MSGTYPE, bytes((dpkt.dhcp.DHCPNAK,))), (_OPT_SERVER_ID, self.config.host_ip)],
        )
        return DhcpReply(bytes(reply), b"\xff\xff\xff\xff", mac)

    def first_bound(self, now: float, present: dict[bytes, int]) -> Lease | None:
        """The earliest-bound live lease of a guest still connected (its MAC in present, the
        switch's table): where a forward without a guest address goes."""
        for lease in self.by_mac.values():
            if lease.bound and lease.expires > now and lease.mac in present:
                return lease
        return None

    def bound_mac(self, addr: bytes, now: float) -> bytes | None:
        """The MAC holding a live lease on addr."""
        lease = self.by_addr.get(addr)
        if lease is None or not lease.bound or lease.expires <= now:
            return None
        return lease.mac

    def leases(self, now: float) -> list[dict[str, object]]:
        """The bound leases, for query-leases."""
        out: list[dict[str, object]] = []
        for lease in self.by_mac.values():
            if lease.expires > now and lease.bound:
                out.append(
                    {
                        "mac": mac_str(lease.mac),
                        "address": ip_str(lease.addr),
                        "expires-in": int(lease.expires - now),
                        "hostname": lease.hostname,
                    }
                )
        return out

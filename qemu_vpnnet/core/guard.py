"""One guest cannot hurt another: address ownership, per-guest limits, the host-socket budget.

Theory of operation.

* Ownership (anti-spoofing). `owners` maps each address a guest must not claim to the MAC
  that may: the gateway, DNS and gateway-service addresses map to the gateway's own MAC (no
  guest may use them), an address with a bound DHCP lease to its guest's MAC. Stack checks
  every IPv4 frame's source address and every ARP sender address against it before the frame
  is learned or switched, with one dict lookup; only a mismatch takes the slow path
  (`spoof_reason`), which checks that the lease is still live (an expired one is forgotten) and
  names the reason: gateway, dns, service or lease.
* IPv6 ownership. IPv6 guests configure themselves (SLAAC), so there is no lease to go by: the
  first MAC that sends from an address of the prefix or a link-local one claims it
  (`claim6`), and another MAC using it is spoofing while the claimant is still on the switch.
  A guest that left (its port closed, or its MAC aged out of the switch) frees its claims; a
  guest holding MAX_V6_PER_GUEST addresses frees its oldest claim for a new one, and the table
  holds at most MAX_V6_CLAIMS (the oldest go first).
* Per-guest limits, by the guest's MAC address (the identity of the switch and of DHCP; a
  flood with random source addresses still comes from one MAC): TCP connections it opened,
  those of them still connecting (SYN received, host connect pending), UDP and ping flows,
  and new flows per second (a token bucket holding two seconds' worth). The engines ask
  before they open a host socket; over a limit a TCP SYN is answered with RST at once and a
  new UDP flow evicts that guest's oldest.
* The host-socket budget. The shell sets `fd_budget` from RLIMIT_NOFILE less a reserve (for
  QEMU connections, listeners, DNS, the log). `sockets` counts the host sockets the flows hold.
  A new flow past the budget takes a socket from the guest holding the most (its oldest
  pending connect first, then its oldest UDP flow, then its oldest connection), never from a
  guest holding fewer than the one asking; when the asking guest is itself the heaviest, its
  flow is refused. EMFILE/ENFILE from the kernel (descriptors held elsewhere) is handled the
  same way, once more per connect, and lowers the budget to the sockets held then (for
  BUDGET_HOLD seconds), so that the next flows are decided by the budget, not by the kernel.

Each refusal is counted, and announced (event GUEST_LIMIT, which the shell logs) at most once
per LOG_INTERVAL per reason.
"""

from collections.abc import Callable
from typing import Final, final

from qemu_vpnnet.core.actions import Counters
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.packets import mac_str

LOG_INTERVAL: Final = 10.0  # seconds between two GUEST_LIMIT events of one reason
BUDGET_HOLD: Final = 30.0  # seconds a budget lowered by EMFILE holds before the configured one is back
MAX_GUESTS: Final = 4096  # usage records kept (those holding nothing are dropped first)
MAX_V6_CLAIMS: Final = 8192  # IPv6 addresses (global and link-local) owned by guests, at most
MAX_V6_PER_GUEST: Final = 32  # ... per guest: SLAAC, privacy and link-local addresses come and go
NO_BUDGET: Final = 1 << 40
# RSTs for refused SYNs per second and guest: a flood past its limits gets this many answers,
# the rest are dropped unanswered (counted tcp-refused-quietly), so that refusing costs less
# than accepting and the flooding guest's own QEMU carries no RST storm
REFUSAL_RSTS: Final = 1000.0
# A connect the host refused (or that timed out) costs its guest this many more new-flow
# tokens: a flood toward closed ports churns a socket per SYN, and is slowed to a fifth of the
# rate of connects that succeed (an nmap -sT scan of closed ports: 1,000 ports/s by default)
FAILED_CONNECT_TOKENS: Final = 4.0
# A new UDP flow costs this many: a datagram to a new port is all it takes to open one (no
# handshake, no pending cap), so a flood of them toward random ports is a socket opened and one
# evicted per datagram; at the default rate that is 5,000 flows per second, the rate at which a
# second guest's download kept its speed under such a flood (1.8x its time alone; at 20,000
# per second, 4.9x)
DATAGRAM_FLOW_TOKENS: Final = 4.0


@final
class GuestUsage:
    """What one guest (MAC) holds: its TCP flows, its datagram flows, its new-flow tokens."""

    def __init__(self, mac: bytes, tokens: float, now: float) -> None:
        self.mac = mac
        self.tcp: dict[int, bool] = {}  # its TCP flow ids, oldest first -> still connecting
        self.pending = 0  # of those, connecting
        self.datagram = 0  # UDP and ping flows
        self.tokens = tokens
        self.refilled = now
        self.rst_tokens = REFUSAL_RSTS
        self.rst_refilled = now

    def load(self) -> int:
        """Host sockets it holds."""
        return len(self.tcp) + self.datagram


@final
class Guard:
    def __init__(self, config: NetConfig, counters: Counters, events: list[tuple[str, dict[str, object]]]) -> None:
        self.config = config
        self.counters = counters
        self.events = events
        self.owners: dict[bytes, bytes] = {}  # address -> the only MAC that may use it as a source
        gateway = config.gateway_mac
        self.owners[config.host_ip] = gateway
        self.owners[config.dns_ip] = gateway
        if config.ipv6:
            self.owners[config.host_ip6] = gateway
            self.owners[config.dns_ip6] = gateway
            self.owners[config.router_ll] = gateway
        self.claims6: dict[bytes, tuple[bytes, float]] = {}  # IPv6 address -> (MAC, claimed at), oldest first
        self.claims6_of: dict[bytes, list[bytes]] = {}  # MAC -> its claimed IPv6 addresses, oldest first
        self.guests: dict[bytes, GuestUsage] = {}
        self.sockets = 0  # host sockets the flows hold (TCP, UDP, ping)
        self.fd_budget = NO_BUDGET
        self.fd_budget_set = NO_BUDGET  # what the shell set; fd_budget is lower for a while after EMFILE
        self.budget_restore_at = 0.0
        self.logged: dict[str, float] = {}
        self.batch_refusals = 0  # refusals since the shell last looked (it does after each read)
        # frees one host socket of the guest with this MAC (Stack sets it); True when it did
        self.reclaim: Callable[[bytes, float], bool] = no_reclaim

    # ---- ownership (RouteTable adds and removes the gateway services' addresses) ----------
    def leased(self, addr: bytes, mac: bytes) -> None:
        """A DHCP lease on addr was bound to mac."""
        if self.owners.get(addr) != self.config.gateway_mac:
            if len(self.owners) >= MAX_GUESTS * 2 and addr not in self.owners:
                return  # the slow path still finds live leases through DhcpServer
            self.owners[addr] = mac

    def claim6(self, addr: bytes, mac: bytes, now: float) -> None:
        """mac sends from IPv6 addr, which nobody owns (or whose owner left): it is mac's now."""
        claims = self.claims6
        old = claims.get(addr)
        if old is not None:
            self.release6_one(addr, old[0])
        elif len(claims) >= MAX_V6_CLAIMS:
            oldest = next(iter(claims))
            self.release6_one(oldest, claims[oldest][0])
        mine = self.claims6_of.get(mac)
        if mine is None:
            mine = []
            self.claims6_of[mac] = mine
        elif len(mine) >= MAX_V6_PER_GUEST:
            self.release6_one(mine[0], mac)
            self.counters.add("ipv6-claims-recycled")
        claims[addr] = (mac, now)
        mine.append(addr)
        self.owners[addr] = mac

    def release6_one(self, addr: bytes, mac: bytes) -> None:
        self.claims6.pop(addr, None)
        if self.owners.get(addr) == mac:
            del self.owners[addr]
        mine = self.claims6_of.get(mac)
        if mine is not None:
            if addr in mine:
                mine.remove(addr)
            if not mine:
                del self.claims6_of[mac]

    def release6(self, macs: set[bytes]) -> None:
        """These guests are gone: their IPv6 addresses are free."""
        for mac in macs:
            for addr in list(self.claims6_of.get(mac, ())):
                self.release6_one(addr, mac)

    def addresses6(self, mac: bytes) -> list[bytes]:
        """The IPv6 addresses mac claimed, oldest first."""
        return list(self.claims6_of.get(mac, ()))

    # ---- limits ------------------------------------------------------------------------
    def usage(self, mac: bytes, now: float) -> GuestUsage:
        usage = self.guests.get(mac)
        if usage is None:
            guests = self.guests
            if len(guests) >= MAX_GUESTS:
                idle = [m for m, u in guests.items() if not u.tcp and not u.datagram]
                for old in idle[: max(1, len(idle) // 2)]:
                    del guests[old]
            usage = GuestUsage(mac, 2.0 * self.config.guest_new_flows, now)
            guests[mac] = usage
        return usage

    def allow_new_flow(self, usage: GuestUsage, now: float, cost: float = 1.0) -> bool:
        """Take cost tokens of the guest's new-flow bucket (rate guest_new_flows per second,
        bursts of twice that): one for a TCP connection, DATAGRAM_FLOW_TOKENS for a UDP flow."""
        rate = float(self.config.guest_new_flows)
        if rate <= 0.0:
            return True
        tokens = usage.tokens + (now - usage.refilled) * rate
        if tokens > 2.0 * rate:
            tokens = 2.0 * rate
        usage.refilled = now
        if tokens < cost:
            usage.tokens = tokens
            return False
        usage.tokens = tokens - cost
        return True

    def failed_connect(self, usage: GuestUsage) -> None:
        """One of the guest's connects failed: charge its new-flow bucket (FAILED_CONNECT_TOKENS)."""
        rate = float(self.config.guest_new_flows)
        if rate > 0.0:
            tokens = usage.tokens - FAILED_CONNECT_TOKENS
            usage.tokens = tokens if tokens > -rate else -rate

    def allow_refusal_rst(self, usage: GuestUsage, now: float) -> bool:
        """Whether a refused SYN of this guest gets its RST (REFUSAL_RSTS per second)."""
        tokens = usage.rst_tokens + (now - usage.rst_refilled) * REFUSAL_RSTS
        if tokens > REFUSAL_RSTS:
            tokens = REFUSAL_RSTS
        usage.rst_refilled = now
        if tokens < 1.0:
            usage.rst_tokens = tokens
            return False
        usage.rst_tokens = tokens - 1.0
        return True

    def need_socket(self, usage: GuestUsage, now: float) -> bool:
        """Room for one more host socket for this guest: within the budget, or taken from a
        guest that holds more. False when this guest is the one holding the most."""
        if self.sockets < self.fd_budget:
            return True
        if self.fd_budget < self.fd_budget_set and now >= self.budget_restore_at:
            self.fd_budget = self.fd_budget_set
            if self.sockets < self.fd_budget:
                return True
        return self.take_from_heaviest(usage, now)

    def set_budget(self, budget: int) -> None:
        """The shell's budget: host sockets the flows may hold (from RLIMIT_NOFILE)."""
        self.fd_budget = self.fd_budget_set = budget

    def out_of_descriptors(self, now: float) -> None:
        """The kernel said EMFILE/ENFILE: hold the budget at what the flows hold now for a while."""
        if self.sockets - 1 < self.fd_budget:
            self.fd_budget = max(16, self.sockets - 1)
        self.budget_restore_at = now + BUDGET_HOLD

    def take_from_heaviest(self, usage: GuestUsage, now: float) -> bool:
        victim = self.heaviest(usage)
        if victim is None:
            return False
        if self.reclaim(victim.mac, now):
            self.counters.add("fd-reclaimed")
            self.note("fd-reclaimed", victim.mac, now)
            return True
        return False

    def heaviest(self, usage: GuestUsage) -> GuestUsage | None:
        """The guest holding the most host sockets, if it holds more than usage's guest + 1."""
        best: GuestUsage | None = None
        best_load = usage.load() + 1
        for other in self.guests.values():
            load = other.load()
            if load > best_load and other is not usage:
                best = other
                best_load = load
        return best

    # ---- TCP accounting ----------------------------------------------------------------
    def tcp_opened(self, usage: GuestUsage, flow: int) -> None:
        usage.tcp[flow] = True
        usage.pending += 1

    def tcp_connected(self, usage: GuestUsage, flow: int) -> None:
        if usage.tcp.get(flow):
            usage.tcp[flow] = False
            usage.pending -= 1

    def tcp_closed(self, usage: GuestUsage, flow: int) -> None:
        pending = usage.tcp.pop(flow, None)
        if pending:
            usage.pending -= 1

    # ---- reporting ---------------------------------------------------------------------
    def refuse(self, reason: str, mac: bytes, now: float) -> None:
        """Count a refusal (counter REASON) and announce it at most once per LOG_INTERVAL."""
        self.counters.add(reason)
        self.batch_refusals += 1
        self.note(reason, mac, now)

    def note(self, reason: str, mac: bytes, now: float) -> None:
        last = self.logged.get(reason)
        if last is not None and now - last < LOG_INTERVAL:
            return
        self.logged[reason] = now
        usage = self.guests.get(mac)
        self.events.append(
            (
                "GUEST_LIMIT",
                {
                    "reason": reason,
                    "mac": mac_str(mac),
                    "count": self.counters.values.get(reason, 0),
                    "tcp": len(usage.tcp) if usage is not None else 0,
                    "pending": usage.pending if usage is not None else 0,
                    "datagram-flows": usage.datagram if usage is not None else 0,
                    "host-sockets": self.sockets,
                    "budget": self.fd_budget if self.fd_budget != NO_BUDGET else -1,
                },
            )
        )

    def describe(self) -> list[dict[str, object]]:
        """Per-guest usage, for query-stats style introspection."""
        return [
            {"mac": mac_str(u.mac), "tcp": len(u.tcp), "pending": u.pending, "datagram-flows": u.datagram}
            for u in self.guests.values()
            if u.tcp or u.datagram
        ]


def no_reclaim(mac: bytes, now: float) -> bool:
    return False

"""The per-frame work of one vhost-user virtio-net device, sans-IO and compiled with the core.

`NetDevice` turns the guest's TX chains into Ethernet frames for the switch and puts the
switch's frames into the guest's RX buffers, over core/virtqueue.py's SplitQueues and with
core/virtio_net.py's header rules. The shell (io/vhost_user_port.py) owns the sockets, eventfds
and mappings, calls `take_tx` when the guest kicked TX and `fill_rx` when frames wait or the
guest kicked RX, and signals the guest when they say so. The TCP engine may also write its
segments straight into the RX ring (`direct_segments`, through the switch), skipping the frame
in between; the shell then signals the guest once per batch (`take_direct_mark`). A RingError (or a ValueError from the
queue: a used element that must not be written) means: drop the device.
"""

from collections import deque
from collections.abc import Callable
from typing import Final, final

from qemu_vpnnet.core import virtio_net as vnet
from qemu_vpnnet.core.actions import Counters
from qemu_vpnnet.core.packets import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP
from qemu_vpnnet.core.vhost_user import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
)
from qemu_vpnnet.core.virtqueue import Chain, SplitQueue

# the largest frame a guest may send: Ethernet, IPv6 header and a 64 KiB TSO payload (a longer
# chain is handed back unread: copying a driver's 4 GiB chain would exhaust our memory)
MAX_TX_FRAME: Final = ETH_HLEN + 40 + 0xFFFF
TX_NOTIFY: Final = 1  # take_tx: signal the guest's TX call eventfd
TX_MORE: Final = 2  # take_tx: the budget ran out with chains left: call again on the next turn

MssOf = Callable[[bytes, bool, int], int]


def tcp_or_udp(frame: bytes) -> bool:
    """Whether the frame carries TCP or UDP right after its IP header (the engine ignores their checksums)."""
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == ETH_P_IP and len(frame) > ETH_HLEN + 9:
        return frame[ETH_HLEN + 9] in (IPPROTO_TCP, IPPROTO_UDP)
    if ethertype == ETH_P_IPV6 and len(frame) > ETH_HLEN + 6:
        return frame[ETH_HLEN + 6] in (IPPROTO_TCP, IPPROTO_UDP)
    return False


@final
class NetDevice:
    """TX chains to frames and frames to RX buffers, for the features QEMU negotiated."""

    def __init__(self, gateway_mac: bytes, mtu: int, counters: Counters, mss_of: MssOf) -> None:
        self.gateway_mac = gateway_mac
        self.mtu = mtu
        self.counters = counters
        self.mss_of = mss_of  # the TCP engine's MSS of a frame toward the guest (its gso_size)
        self.hdr_len = vnet.HEADER_LEN
        self.mrg_rxbuf = False
        self.event_idx = False
        self.guest_csum = False
        self.guest_tso4 = False
        self.guest_tso6 = False
        self.host_offloads = False
        self.last_error = ""  # why the latest frame was dropped (for the shell's log)
        # direct RX: the ring while TCP segments may go straight in (the port keeps it: None while
        # the ring does not run), the frames waiting for RX buffers (the port's queue: nothing may
        # overtake them), and the used index before the first segments written since the shell
        # last signalled (-1: none)
        self.rx_queue: SplitQueue | None = None
        self.rx_pending: deque[bytes] = deque()
        self.rx_mark = -1

    def negotiate(self, features: int) -> None:
        self.mrg_rxbuf = bool(features & VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = vnet.header_len(bool(features & VIRTIO_F_VERSION_1), self.mrg_rxbuf)
        self.event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
        self.guest_csum = bool(features & VIRTIO_NET_F_GUEST_CSUM)
        self.guest_tso4 = self.guest_csum and bool(features & VIRTIO_NET_F_GUEST_TSO4)
        self.guest_tso6 = self.guest_csum and bool(features & VIRTIO_NET_F_GUEST_TSO6)
        self.host_offloads = bool(features & VIRTIO_NET_F_CSUM)  # HOST_TSO4/6 need CSUM

    # ---- guest to us -------------------------------------------------------------------
    def take_tx(self, queue: SplitQueue, enabled: bool, frames: list[bytes], budget: int) -> int:
        """Pop up to budget TX chains, append their frames (none while the ring is disabled), hand
        the chains back; TX_NOTIFY and TX_MORE flags."""
        used: list[int] = []
        old = queue.used_idx
        limit = 2 * min(budget, queue.num)
        more = 0
        hdr = self.hdr_len
        while True:
            chain = queue.pop()
            if chain is None:
                if self.event_idx and queue.arm_kick():
                    continue
                break
            used.append(chain.head)
            used.append(0)
            if chain.readable_bytes > hdr + MAX_TX_FRAME:
                self.counters.add("drop-vhost-tx-too-big")  # never copied
            elif enabled:
                self.tx_frame(queue.read(chain), frames)
            if len(used) >= limit:
                more = TX_MORE
                break
        queue.push_batch(used)
        return more | (TX_NOTIFY if queue.needs_notify(old) else 0)

    def tx_frame(self, data: bytes, frames: list[bytes]) -> None:
        """One TX buffer (header and frame): its frame(s) appended, or counted as dropped."""
        hdr = self.hdr_len
        if len(data) < hdr + ETH_HLEN:
            self.counters.add("drop-vhost-short-tx")
            return
        if not self.host_offloads or (data[0] == 0 and data[1] == 0):
            frames.append(data[hdr:])
            return
        try:
            flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = vnet.parse_header(data, hdr)
            frame = data[hdr:]
            gso = gso_type & ~vnet.GSO_ECN
            to_gateway = frame[0:6] == self.gateway_mac
            if gso != vnet.GSO_NONE:
                if gso != vnet.GSO_TCPV4 and gso != vnet.GSO_TCPV6:
                    raise vnet.VirtioNetError(f"gso_type {gso_type} was not offered")
                if to_gateway:
                    vnet.tcp_offsets(frame)  # the TCP engine takes the whole segment
                    frames.append(frame)
                else:  # another guest's link may be a 1500-byte stream socket: cut as the NIC would
                    frames.extend(vnet.segment_tcp(frame, gso_size))
                return
            if flags & vnet.F_NEEDS_CSUM and not (to_gateway and tcp_or_udp(frame)):
                whole = bytearray(frame)
                vnet.complete_checksum(whole, csum_start, csum_offset)
                frame = bytes(whole)
            frames.append(frame)
        except vnet.VirtioNetError as exc:
            self.counters.add("drop-vhost-bad-header")
            self.last_error = str(exc)

    # ---- us to the guest ---------------------------------------------------------------
    def rx_offload(self, frame: bytes, num_buffers: int) -> tuple[bytes, int, int]:
        """The header for one frame toward the guest, and where to patch the frame: (header, offset
        of its TCP checksum field or -1, the value to write there).

        When the guest takes partial checksums (GUEST_CSUM), our own TCP frames go as NEEDS_CSUM:
        the field holds the pseudo-header's sum, which the guest's stack takes as verified (and
        completes should it forward the frame), so the TCP engine need not sum the payload. A TCP
        segment larger than the MTU also gets gso_type/gso_size (GUEST_TSO4/6). Our other frames
        are DATA_VALID; another guest's frames, and any frame of a guest without GUEST_CSUM, go
        unmarked."""
        if not self.guest_csum or frame[6:12] != self.gateway_mac:
            return vnet.rx_header(0, vnet.GSO_NONE, 0, 0, num_buffers), -1, 0
        ethertype = (frame[12] << 8) | frame[13]
        if not (
            (ethertype == ETH_P_IP and len(frame) > ETH_HLEN + 9 and frame[ETH_HLEN + 9] == IPPROTO_TCP)
            or (ethertype == ETH_P_IPV6 and len(frame) > ETH_HLEN + 6 and frame[ETH_HLEN + 6] == IPPROTO_TCP)
        ):
            return vnet.rx_header(vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, num_buffers), -1, 0
        try:
            v6, start, hlen = vnet.tcp_offsets(frame)
        except vnet.VirtioNetError:
            return vnet.rx_header(vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, num_buffers), -1, 0
        gso = vnet.GSO_NONE
        gso_size = 0
        head_len = 0
        if len(frame) > ETH_HLEN + self.mtu and (self.guest_tso6 if v6 else self.guest_tso4):
            gso = vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4
            gso_size = self.mss_of(frame, v6, start)
            head_len = start + hlen
        header = vnet.rx_header(
            vnet.F_NEEDS_CSUM, gso, head_len, gso_size, num_buffers, start, vnet.TCP_CHECKSUM_OFFSET
        )
        return header, start + vnet.TCP_CHECKSUM_OFFSET, vnet.partial_tcp_checksum(frame, v6, start)

    def direct_segments(
        self,
        header: bytes,
        buf: bytearray,
        off: int,
        end: int,
        psh_end: int,
        segment: int,
        mss: int,
        seq: int,
        ack: int,
        window: int,
        ident: int,
        ip_base: int,
    ) -> int:
        """TCP segments of buf[off:end] (each segment bytes, the guest's MSS as gso_size) straight
        into the guest's RX buffers, as NEEDS_CSUM frames like rx_offload marks them: the
        number of segments written, from the first on (0 when none could be: the caller sends
        them, or the rest, as frames). Only for a guest taking partial checksums, while its RX
        ring runs with no frame waiting for buffers (else a segment would overtake it)."""
        queue = self.rx_queue
        if queue is None or self.rx_pending or not self.guest_csum or queue.broken:
            return 0
        used: list[int] = []
        old = queue.used_idx
        count = queue.write_segments(
            self.hdr_len,
            self.mrg_rxbuf,
            used,
            header,
            buf,
            off,
            end,
            psh_end,
            segment,
            mss,
            seq,
            ack,
            window,
            ident,
            ip_base,
            self.mtu,
        )
        if count:
            queue.push_batch(used)
            if self.rx_mark < 0:
                self.rx_mark = old
        return count

    def take_direct_mark(self) -> int:
        """The used index before the segments written straight in since the last call (for
        needs_notify), or -1 when there were none."""
        mark = self.rx_mark
        self.rx_mark = -1
        return mark

    def fill_rx(self, queue: SplitQueue, pending: deque[bytes]) -> tuple[int, bool]:
        """Move frames from the front of pending into the guest's RX buffers while they fit: (the
        bytes of frames taken from pending, delivered or dropped; whether to signal the guest)."""
        old = queue.used_idx
        taken = self.fill_pass(queue, pending)
        # frames wait for buffers: ask for a kick at the next one, and fill what came meanwhile
        while pending and self.event_idx and queue.arm_kick():
            taken += self.fill_pass(queue, pending)
        return taken, queue.needs_notify(old)

    def fill_pass(self, queue: SplitQueue, pending: deque[bytes]) -> int:
        """fill_rx's work over the buffers there now: the bytes of frames taken from pending."""
        hdr = self.hdr_len
        used: list[int] = []
        chains: list[Chain] = []
        taken = 0
        mrg = self.mrg_rxbuf
        nb_at = vnet.NUM_BUFFERS_AT if hdr == vnet.HEADER_LEN else -1
        while pending:
            frame = pending[0]
            limit = queue.num - len(used) // 2  # push_batch takes at most num at once
            header, patch_at, patch = self.rx_offload(frame, 0)
            if queue.write_frame(header[:hdr], nb_at, frame, patch_at, patch, mrg, limit, used):
                taken += len(pending.popleft())
                continue
            need = hdr + len(frame)
            chains.clear()
            room = 0
            while room < need and len(chains) < limit:
                chain = queue.pop()
                if chain is None:
                    break
                chains.append(chain)
                room += chain.writable_bytes
                if not mrg:
                    break
            if room < need:
                if chains and not mrg:
                    # its one buffer is too small for this frame: the guest gets it back empty
                    used.append(chains[0].head)
                    used.append(0)
                    taken += len(pending.popleft())
                    self.counters.add("drop-vhost-rx-too-big")
                    continue
                queue.give_back(chains)  # unused: the next pops return them
                if used:
                    queue.push_batch(used)  # then try again with the whole ring
                    used = []
                    continue
                if len(chains) >= queue.num:
                    taken += len(pending.popleft())  # the whole ring cannot hold it
                    self.counters.add("drop-vhost-rx-too-big")
                    continue
                break  # wait for the guest to give more buffers (it kicks RX)
            if nb_at >= 0:  # the header as rx_offload made it above, with the chains counted
                header = header[:nb_at] + len(chains).to_bytes(2, "little") + header[nb_at + 2 :]
            if patch_at >= 0:
                patched = bytearray(frame)
                patched[patch_at] = patch >> 8
                patched[patch_at + 1] = patch & 0xFF
                scatter(queue, chains, header[:hdr], patched, used)
            else:
                scatter(queue, chains, header[:hdr], frame, used)
            taken += len(pending.popleft())
        if used:
            queue.push_batch(used)
        return taken


def scatter(queue: SplitQueue, chains: list[Chain], header: bytes, frame: bytes | bytearray, used: list[int]) -> None:
    """Write header then frame across the chains, appending (head, bytes written) of each to used."""
    hdr = len(header)
    total = hdr + len(frame)
    pos = 0
    head_view = memoryview(header)
    frame_view = memoryview(frame)
    for chain in chains:
        written = 0
        if pos < hdr:
            written = queue.write(chain, head_view[pos:], 0)
            pos += written
        if pos >= hdr and pos < total and written < chain.writable_bytes:
            n = queue.write(chain, frame_view[pos - hdr :], written)
            written += n
            pos += n
        used.append(chain.head)
        used.append(written)

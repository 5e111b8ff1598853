"""vhost-user: QEMU's virtio-net device served from this process, the guest's RAM shared with us.

`VhostUserListener` listens on a Unix socket (`--vhost-user PATH`); QEMU connects to it
(`-chardev socket,path=PATH -netdev vhost-user,chardev=...`, with the guest's RAM in shared memory:
`-object memory-backend-memfd,share=on`). Each accepted connection is one `VhostUserPort`, one port
of the switch like a stream socket: its control messages go through core/vhost_user.py, its rings
through core/virtqueue.py, its virtio-net headers through core/virtio_net.py. Frames then pass
between the guest's memory and the core without QEMU's thread: the guest kicks an eventfd that we
watch when it has sent, and we signal its call eventfd when we have used its buffers.

A device that misbehaves — a malformed message, a ring pointing outside its memory, a memory
region its file cannot back — is dropped with a log line: its connection closed, its mappings
and descriptors released; the listener and every other guest go on. QEMU with `reconnect=N`
comes back on a new connection and sets the device up afresh.

Shared memory is the front-end's file: a region is mapped only when the file holds all of it
and is sealed against shrinking (F_SEAL_SHRINK), since touching a page beyond a file's end kills
a process with SIGBUS, and a front-end that shrank its file would take every guest down with us.
QEMU's memory-backend-memfd seals its files (seal=on, the default); memory-backend-file cannot be
sealed, and is taken only with --vhost-user-unsealed-memory (trusting the front-end). A guest can
never shrink the file; only the local front-end could. Kick, call and error descriptors must be
eventfds (a pipe at end of file would spin the loop, a full blocking one would stop it).
"""

import array
import asyncio
import collections
import fcntl
import logging
import mmap
import os
import socket
import stat
from typing import TYPE_CHECKING, Final

from qemu_vpnnet.core import vhost_user as vu
from qemu_vpnnet.core import virtio_net as vnet
from qemu_vpnnet.core.packets import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP
from qemu_vpnnet.core.virtqueue import Chain, MemoryRegion, MemoryTable, RingError, SplitQueue
from qemu_vpnnet.io import ratelog
from qemu_vpnnet.io.qemu_ports import WRITE_HARD_LIMIT, WRITE_HIGH_WATER, WRITE_LOW_WATER, PortIds, QemuPort

if TYPE_CHECKING:
    from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.vhost_user")

MAX_CONNECTIONS: Final = 4  # per socket: one VM, and room for a reconnect overlapping the old one
TX_BUDGET: Final = 256
# the largest frame a guest may send: Ethernet, IPv6 header and a 64 KiB TSO payload (a longer
# chain is handed back unread: copying a driver's 4 GiB chain would exhaust our memory)
MAX_TX_FRAME: Final = ETH_HLEN + 40 + 0xFFFF  # chains taken from the TX ring per turn of the loop (fairness)
CONTROL_READ: Final = 4096
F_GET_SEALS: Final = 1034  # Linux fcntl
F_SEAL_SHRINK: Final = 0x0002
_EVENTFD_ONE: Final = (1).to_bytes(8, "little")
_FD_SIZE: Final = array.array("i").itemsize


def _offloads(features: bool) -> int:
    return vu.DEFAULT_FEATURES | (vu.OFFLOAD_FEATURES if features else 0)


class VhostUserPort(QemuPort):
    """One vhost-user connection: one virtio-net device of one VM."""

    def __init__(
        self, shell: "Shell", port_id: int, sock: socket.socket, path: str, offloads: bool, unsealed_ok: bool = False
    ) -> None:
        self.shell = shell
        self.id = port_id
        self.description = f"vhost-user {path}"
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.backend = vu.VhostUserBackend(_offloads(offloads))
        self.unsealed_ok = unsealed_ok  # map memory files that are not sealed against shrinking
        self.decoder = vu.MessageDecoder()
        self.maps: dict[int, mmap.mmap] = {}  # id(region) -> its mapping
        self.memory: MemoryTable | None = None
        self.queues: list[SplitQueue | None] = [None, None]
        self.kick_watch: list[int] = [-1, -1]  # the fd each ring's kick is watched on
        self.pending: collections.deque[bytes] = collections.deque()  # frames waiting for RX buffers
        self.pending_bytes = 0
        self.congested = False
        self.closed = False
        self.dropping = False  # drop() was called: closed on the next turn of the loop
        self.tx_scheduled = False
        self.held = False
        self.gateway_mac = shell.stack.config.gateway_mac
        self.hdr_len = vnet.HEADER_LEN
        self.mrg_rxbuf = False
        self.guest_csum = False
        self.guest_tso4 = False
        self.guest_tso6 = False
        self.host_offloads = False
        self.event_idx = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._control_readable)
        self.shell.port_opened(self)

    @property
    def inactive(self) -> bool:
        """Closed, or being dropped: touch neither its rings nor its socket."""
        return self.closed or self.dropping

    # ---- the control channel -----------------------------------------------------------
    def _control_readable(self) -> None:
        if self.inactive:
            return
        try:
            data, ancdata, msg_flags, _ = self.sock.recvmsg(CONTROL_READ, socket.CMSG_SPACE(vu.MAX_FDS * _FD_SIZE))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close_device(f"control socket: {exc}")
            return
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if msg_flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            self.drop("vhost-user: more descriptors than a message may carry")
            return
        if not data:
            _close_fds(fds)
            self.close_device("QEMU closed the vhost-user socket")
            return
        try:
            messages = self.decoder.feed(data, fds)
        except vu.VhostUserError as exc:
            _close_fds(exc.fds)
            self.drop(str(exc))
            return
        for message in messages:
            if self.inactive:
                _close_fds(message.fds)
                continue
            self._handle(message)

    def _handle(self, message: vu.Message) -> None:
        if message.request in (vu.SET_VRING_KICK, vu.SET_VRING_CALL, vu.SET_VRING_ERR):
            for fd in message.fds:
                problem = _not_an_eventfd(fd)
                if problem:
                    _close_fds(message.fds)
                    self.drop(f"vhost-user {vu.request_name(message.request)}: {problem}")
                    return
        backend = self.backend
        for index, queue in enumerate(self.queues):  # GET_VRING_BASE answers where the ring stands
            if queue is not None:
                backend.set_last_avail_idx(index, queue.last_avail_idx)
        try:
            reply = backend.handle(message)
        except vu.VhostUserError as exc:
            _close_fds(exc.fds)
            self.drop(str(exc))
            return
        log.debug("port %d: %r -> %r", self.id, message, reply)
        if message.request == vu.SET_FEATURES:
            self._features_set()
        if not self._perform(backend.take_effects()):
            return
        if reply is not None:
            try:
                self.sock.send(reply.to_bytes())
            except OSError as exc:
                self.close_device(f"cannot answer QEMU: {exc}")

    def _features_set(self) -> None:
        features = self.backend.features
        self.mrg_rxbuf = bool(features & vu.VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = vnet.header_len(bool(features & vu.VIRTIO_F_VERSION_1), self.mrg_rxbuf)
        self.event_idx = bool(features & vu.VIRTIO_RING_F_EVENT_IDX)
        self.guest_csum = bool(features & vu.VIRTIO_NET_F_GUEST_CSUM)
        self.guest_tso4 = self.guest_csum and bool(features & vu.VIRTIO_NET_F_GUEST_TSO4)
        self.guest_tso6 = self.guest_csum and bool(features & vu.VIRTIO_NET_F_GUEST_TSO6)
        self.host_offloads = bool(features & vu.VIRTIO_NET_F_CSUM)  # HOST_TSO4/6 need CSUM
        self.shell.port_offloads(self, self.guest_tso4, self.guest_tso6)

    def _perform(self, effects: list[vu.Effect]) -> bool:
        """Carry out the back-end's effects; False when the device had to be dropped."""
        remap = any(e.kind == vu.EFFECT_MMAP or e.kind == vu.EFFECT_UNMAP for e in effects)
        if remap:
            self._release_memory()
        try:
            for effect in effects:
                kind = effect.kind
                if kind == vu.EFFECT_MMAP:
                    assert effect.region is not None
                    self._map(effect.region)
                elif kind == vu.EFFECT_UNMAP:
                    assert effect.region is not None
                    mapping = self.maps.pop(id(effect.region), None)
                    if mapping is not None:
                        mapping.close()
                elif kind == vu.EFFECT_CLOSE_FD:
                    self._unwatch_fd(effect.fd)
                    _close_fds([effect.fd])
                elif kind == vu.EFFECT_WATCH_KICK:
                    self._watch_kick(effect.ring, effect.fd)
                elif kind == vu.EFFECT_START:
                    pass  # the queue is built below, once the memory is in place
                elif kind == vu.EFFECT_STOP:
                    self.queues[effect.ring] = None
                    self._watch_kick(effect.ring, -1)
            if remap:
                self._build_memory()
            for index, ring in enumerate(self.backend.rings):
                if ring.started and self.queues[index] is None:
                    self._build_queue(index)
        except (RingError, OSError, ValueError) as exc:
            self.drop(f"vhost-user: {exc}")
            return False
        if any(e.kind in (vu.EFFECT_START, vu.EFFECT_ENABLE) for e in effects):
            self._schedule_tx()
            self._fill_rx()
        return True

    def _map(self, region: vu.Region) -> None:
        length = region.mmap_offset + region.size
        st = os.fstat(region.fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"memory region fd {region.fd} is not a regular file (memfd or shared file)")
        if st.st_size < length:
            raise OSError(f"memory region {region!r} needs {length} bytes of a {st.st_size}-byte file")
        try:
            seals = fcntl.fcntl(region.fd, F_GET_SEALS)
        except OSError:
            seals = 0  # a file that cannot be sealed (memory-backend-file, hugetlbfs)
        if not seals & F_SEAL_SHRINK:
            if not self.unsealed_ok:
                raise OSError(
                    f"memory region {region!r}: its file is not sealed against shrinking, and a front-end "
                    "that shrank it would kill this process (SIGBUS); use memory-backend-memfd (sealed by "
                    "default), or start qemu-vpnnet with --vhost-user-unsealed-memory to trust the front-end"
                )
            ratelog.warning(
                log,
                "vhost-user-unsealed",
                "%s: guest memory in an unsealed file (--vhost-user-unsealed-memory): the front-end could "
                "shrink it under us",
                self.description,
            )
        self.maps[id(region)] = mmap.mmap(region.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _release_memory(self) -> None:
        self.queues = [None, None]
        if self.memory is not None:
            self.memory.release()
            self.memory = None

    def _build_memory(self) -> None:
        regions = [
            MemoryRegion(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset, self.maps[id(r)])
            for r in self.backend.regions
        ]
        self.memory = MemoryTable(regions) if regions else None

    def _build_queue(self, index: int) -> None:
        ring = self.backend.rings[index]
        if self.memory is None:
            raise RingError(f"ring {index} started with no memory table")
        self.queues[index] = SplitQueue(
            self.memory, ring.num, ring.desc_addr, ring.avail_addr, ring.used_addr, self.event_idx, ring.base
        )

    def _watch_kick(self, index: int, fd: int) -> None:
        old = self.kick_watch[index]
        if old >= 0:
            self.loop.remove_reader(old)
        self.kick_watch[index] = fd
        if fd >= 0:
            self.loop.add_reader(fd, self._kicked, index)

    def _unwatch_fd(self, fd: int) -> None:
        for index, watched in enumerate(self.kick_watch):
            if watched == fd:
                self.loop.remove_reader(fd)
                self.kick_watch[index] = -1

    def _kicked(self, index: int) -> None:
        if self.inactive:
            return
        fd = self.kick_watch[index]
        try:
            if not os.read(fd, 8):
                self.drop(f"kick descriptor of ring {index} is at end of file")
                return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self.drop(f"kick descriptor of ring {index}: {exc}")
            return
        started = self.backend.kicked(index)
        if not self._perform(self.backend.take_effects()) or not started:
            return
        if index == vu.TX:
            self._process_tx()
        else:
            self._fill_rx()

    def _signal(self, index: int) -> None:
        fd = self.backend.rings[index].call_fd
        if fd < 0:
            return
        try:
            os.write(fd, _EVENTFD_ONE)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            ratelog.warning(log, f"vhost-call-{self.id}", "%s: call descriptor: %s", self.description, exc)

    # ---- guest to us: the TX ring ------------------------------------------------------
    def _schedule_tx(self) -> None:
        if not self.tx_scheduled and not self.inactive:
            self.tx_scheduled = True
            self.loop.call_soon(self._process_tx)

    def _process_tx(self) -> None:
        self.tx_scheduled = False
        queue = self.queues[vu.TX]
        if queue is None or self.inactive or self.held:
            return
        enabled = self.backend.rings[vu.TX].enabled
        frames: list[bytes] = []
        used: list[int] = []
        old = queue.used_idx
        more = False
        try:
            while True:
                chain = queue.pop()
                if chain is None:
                    if self.event_idx:
                        queue.set_avail_event()
                        if queue.available():
                            continue
                    break
                used.append(chain.head)
                used.append(0)
                if chain.readable_bytes > self.hdr_len + MAX_TX_FRAME:
                    self.shell.stack.counters.add("drop-vhost-tx-too-big")  # never copied
                elif enabled:
                    self._tx_frame(queue.read(chain), frames)
                if len(used) >= 2 * TX_BUDGET or len(used) >= 2 * queue.num:
                    more = True
                    break
            queue.push_batch(used)
            notify = queue.needs_notify(old)
        except (RingError, ValueError) as exc:  # ValueError: a used element we must not write
            self.drop(f"TX ring: {exc}")
            return
        if notify:
            self._signal(vu.TX)
        if frames:
            self.shell.frames_received(self, frames)
        if more:
            self._schedule_tx()

    def _tx_frame(self, data: bytes, frames: list[bytes]) -> None:
        hdr = self.hdr_len
        if len(data) < hdr + ETH_HLEN:
            self.shell.stack.counters.add("drop-vhost-short-tx")
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
                else:
                    frames.extend(vnet.segment_tcp(frame, gso_size))
                return
            if flags & vnet.F_NEEDS_CSUM and not (to_gateway and _tcp_or_udp(frame)):
                whole = bytearray(frame)
                vnet.complete_checksum(whole, csum_start, csum_offset)
                frame = bytes(whole)
            frames.append(frame)
        except vnet.VirtioNetError as exc:
            self.shell.stack.counters.add("drop-vhost-bad-header")
            ratelog.warning(log, f"vhost-header-{self.id}", "%s: frame dropped: %s", self.description, exc)

    def hold_reading(self, seconds: float) -> None:
        if self.held or self.inactive:
            return
        self.held = True
        self.loop.call_later(seconds, self._release_hold)

    def _release_hold(self) -> None:
        self.held = False
        self._schedule_tx()

    # ---- us to the guest: the RX ring --------------------------------------------------
    def send_frames(self, frames: list[bytes]) -> int:
        if self.inactive:
            return len(frames)
        dropped = 0
        for frame in frames:
            if self.pending_bytes > WRITE_HARD_LIMIT:
                dropped += 1
                continue
            self.pending.append(frame)
            self.pending_bytes += len(frame)
        self._fill_rx()
        return dropped

    def _rx_header(self, frame: bytes, num_buffers: int) -> bytes:
        if not self.guest_csum or frame[6:12] != self.gateway_mac:
            return vnet.rx_header(0, vnet.GSO_NONE, 0, 0, num_buffers)
        ethertype = (frame[12] << 8) | frame[13]
        if len(frame) > ETH_HLEN + self.shell.stack.config.mtu and (
            (ethertype == ETH_P_IP and self.guest_tso4) or (ethertype == ETH_P_IPV6 and self.guest_tso6)
        ):
            try:
                v6, start, hlen = vnet.tcp_offsets(frame)
            except vnet.VirtioNetError:
                return vnet.rx_header(vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, num_buffers)
            mss = self.shell.stack.tcp.mss_toward(frame, v6, start)
            gso = vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4
            return vnet.rx_header(vnet.F_DATA_VALID, gso, start + hlen, mss, num_buffers)
        return vnet.rx_header(vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, num_buffers)

    def _fill_rx(self) -> None:
        queue = self.queues[vu.RX]
        if queue is None or self.inactive or not self.pending:
            self._update_congestion()
            return
        if not self.backend.rings[vu.RX].enabled:
            return  # frames wait (bounded) until QEMU enables the ring
        hdr = self.hdr_len
        pending = self.pending
        old = queue.used_idx
        used: list[int] = []
        chains: list[Chain] = []
        try:
            while pending:
                frame = pending[0]
                need = hdr + len(frame)
                chains.clear()
                room = 0
                limit = queue.num - len(used) // 2  # push_batch takes at most num at once
                while room < need and len(chains) < limit:
                    chain = queue.pop()
                    if chain is None:
                        break
                    chains.append(chain)
                    room += chain.writable_bytes
                    if not self.mrg_rxbuf:
                        break
                if room < need:
                    if chains and not self.mrg_rxbuf:
                        # its one buffer is too small for this frame: the guest gets it back empty
                        used.append(chains[0].head)
                        used.append(0)
                        self._drop_pending("drop-vhost-rx-too-big")
                        continue
                    queue.give_back(chains)  # unused: the next pops return them
                    if used:
                        queue.push_batch(used)  # then try again with the whole ring
                        used = []
                        continue
                    if len(chains) >= queue.num:
                        self._drop_pending("drop-vhost-rx-too-big")  # the whole ring cannot hold it
                        continue
                    break  # wait for the guest to give more buffers (it kicks RX)
                self._scatter(queue, chains, self._rx_header(frame, len(chains)), frame, used)
                pending.popleft()
                self.pending_bytes -= len(frame)
            if used:
                queue.push_batch(used)
            if pending and self.event_idx:
                queue.set_avail_event()
            notify = queue.needs_notify(old)
        except (RingError, ValueError) as exc:
            self.drop(f"RX ring: {exc}")
            return
        if notify:
            self._signal(vu.RX)
        self._update_congestion()

    def _drop_pending(self, counter: str) -> None:
        frame = self.pending.popleft()
        self.pending_bytes -= len(frame)
        self.shell.stack.counters.add(counter)

    @staticmethod
    def _scatter(queue: SplitQueue, chains: list[Chain], header: bytes, frame: bytes, used: list[int]) -> None:
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

    def _update_congestion(self) -> None:
        if not self.congested and self.pending_bytes > WRITE_HIGH_WATER:
            self.congested = True
            self.shell.port_congested(self, True)
        elif self.congested and self.pending_bytes < WRITE_LOW_WATER:
            self.congested = False
            self.shell.port_congested(self, False)

    # ---- the end -----------------------------------------------------------------------
    def drop(self, reason: str) -> None:
        """The front-end or the guest broke the protocol: this device goes, the rest stays.

        It stops at once (nothing more is read from it or written to it); it leaves the switch on
        the next turn of the loop, as this may run while the shell walks the switch's queues."""
        if self.closed or self.dropping:
            return
        self.dropping = True
        self.shell.stack.counters.add("vhost-user-dropped")
        log.error("%s (port %d): %s; dropping this device", self.description, self.id, reason)
        self.loop.call_soon(self.close_device, reason)

    def close_device(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.dropping = False
        self.loop.remove_reader(self.sock.fileno())
        for index in range(vu.NUM_RINGS):
            self._watch_kick(index, -1)
        effects = self.backend.shutdown()
        self._release_memory()
        for effect in effects:
            if effect.kind == vu.EFFECT_CLOSE_FD:
                _close_fds([effect.fd])
        for mapping in self.maps.values():
            mapping.close()
        self.maps.clear()
        _close_fds(self.decoder.take_fds())
        self.sock.close()
        self.pending.clear()
        self.pending_bytes = 0
        self.shell.port_closed(self, reason)

    def close(self) -> None:
        self.close_device("backend shutting down")


def _tcp_or_udp(frame: bytes) -> bool:
    """Whether the frame carries TCP or UDP right after its IP header (the engine ignores their checksums)."""
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == ETH_P_IP and len(frame) > ETH_HLEN + 9:
        return frame[ETH_HLEN + 9] in (IPPROTO_TCP, IPPROTO_UDP)
    if ethertype == ETH_P_IPV6 and len(frame) > ETH_HLEN + 6:
        return frame[ETH_HLEN + 6] in (IPPROTO_TCP, IPPROTO_UDP)
    return False


def _not_an_eventfd(fd: int) -> str:
    """Why fd cannot be a kick, call or error descriptor ("" if it is an eventfd, now non-blocking).

    QEMU hands over eventfds. Anything else could hang the loop: a pipe at end of file is readable
    for ever, and a full blocking pipe stops a write."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"descriptor {fd}: {exc.strerror or exc}"
    if stat.S_IFMT(mode):  # anonymous inodes (eventfd among them) have no file type
        return f"descriptor {fd} is not an eventfd (file type {stat.S_IFMT(mode):#o})"
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = "anon_inode:[eventfd]"  # /proc hidden (a sandbox): the file type check stands
    if target != "anon_inode:[eventfd]":
        return f"descriptor {fd} is {target}, not an eventfd"
    try:
        os.set_blocking(fd, False)
    except OSError as exc:
        return f"descriptor {fd}: {exc.strerror or exc}"
    return ""


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserListener:
    """The Unix socket QEMU's vhost-user netdev connects to."""

    def __init__(
        self, shell: "Shell", ids: PortIds, path: str, offloads: bool = True, unsealed_ok: bool = False
    ) -> None:
        self.shell = shell
        self.unsealed_ok = unsealed_ok
        self.ids = ids
        self.path = path
        self.offloads = offloads
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ports: list[VhostUserPort] = []

    def start(self) -> None:
        self.sock.bind(self.path)
        self.sock.listen(MAX_CONNECTIONS)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            ratelog.warning(log, f"vhost-accept-{self.path}", "vhost-user %s: accept: %s", self.path, exc)
            return
        self.ports = [p for p in self.ports if not p.closed]
        if len(self.ports) >= MAX_CONNECTIONS:
            # a QEMU reconnecting must not be locked out by idle connections: the oldest one
            # with no running ring makes room, else the new one is refused
            idle = [p for p in self.ports if not any(r.started for r in p.backend.rings)]
            if not idle:
                log.error("vhost-user %s: already %d running devices; refusing another", self.path, len(self.ports))
                conn.close()
                return
            idle[0].close_device("another connection needs its place")
            self.ports.remove(idle[0])
        self.ports.append(VhostUserPort(self.shell, self.ids.take(), conn, self.path, self.offloads, self.unsealed_ok))

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for port in self.ports:
            port.close()
        self.ports.clear()

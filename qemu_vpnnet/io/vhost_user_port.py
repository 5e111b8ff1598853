"""vhost-user: QEMU's virtio-net device served from this process, the guest's RAM shared with us.

`VhostUserListener` listens on a Unix socket (`--vhost-user PATH`); QEMU connects to it
(`-chardev socket,path=PATH -netdev vhost-user,chardev=...`, with the guest's RAM in shared memory:
`-object memory-backend-memfd,share=on`). Each accepted connection is one `VhostUserPort`, one port
of the switch like a stream socket: its control messages go through core/vhost_user.py, its rings
through core/virtqueue.py, and the per-frame work (TX chains to frames, frames to RX buffers,
virtio-net headers) through core/vhost_net.py, compiled with the core. Frames then pass
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
from qemu_vpnnet.core.vhost_net import TX_MORE, TX_NOTIFY, NetDevice
from qemu_vpnnet.core.virtqueue import MemoryRegion, MemoryTable, RingError, SplitQueue
from qemu_vpnnet.io import ratelog
from qemu_vpnnet.io.qemu_ports import WRITE_HARD_LIMIT, WRITE_HIGH_WATER, WRITE_LOW_WATER, PortIds, QemuPort

if TYPE_CHECKING:
    from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.vhost_user")

MAX_CONNECTIONS: Final = 4  # per socket: one VM, and room for a reconnect overlapping the old one
TX_BUDGET: Final = 256  # chains taken from the TX ring per turn of the loop (fairness)
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
        self.pending_bytes = 0
        self.congested = False
        self.closed = False
        self.dropping = False  # drop() was called: closed on the next turn of the loop
        self.tx_scheduled = False
        self.held = False
        stack = shell.stack
        self.device = NetDevice(stack.config.gateway_mac, stack.config.mtu, stack.counters, stack.tcp.mss_toward)
        # frames waiting for RX buffers; the device's own list, so that no direct write overtakes them
        self.pending: collections.deque[bytes] = self.device.rx_pending
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._control_readable)
        self.shell.port_opened(self)
        self.shell.port_direct(self, self.device)

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
        performed = self._perform(backend.take_effects())
        self._sync_direct()
        if not performed:
            return
        if reply is not None:
            try:
                self.sock.send(reply.to_bytes())
            except OSError as exc:
                self.close_device(f"cannot answer QEMU: {exc}")

    def _features_set(self) -> None:
        device = self.device
        device.negotiate(self.backend.features)
        self.shell.port_offloads(self, device.guest_tso4, device.guest_tso6)

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
        self.device.rx_queue = None
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
            self.memory, ring.num, ring.desc_addr, ring.avail_addr, ring.used_addr, self.device.event_idx, ring.base
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
        backend = self.backend
        started = backend.kicked(index)
        # effects only on a ring's first kick: the others take no list and walk none
        if backend.effects:
            performed = self._perform(backend.take_effects())
            self._sync_direct()
            if not performed:
                return
        if not started:
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
        frames: list[bytes] = []
        try:
            status = self.device.take_tx(queue, self.backend.rings[vu.TX].enabled, frames, TX_BUDGET)
        except (RingError, ValueError) as exc:  # ValueError: a used element we must not write
            self.drop(f"TX ring: {exc}")
            return
        if self.device.last_error:
            ratelog.warning(
                log, f"vhost-header-{self.id}", "%s: frame dropped: %s", self.description, self.device.last_error
            )
            self.device.last_error = ""
        if frames:  # first: a reply to the guest (its RX interrupt) need not wait for our TX signal
            self.shell.frames_received(self, frames)
        if status & TX_NOTIFY and not self.inactive:
            self._signal(vu.TX)
        if status & TX_MORE:
            self._schedule_tx()

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
        if self.inactive or self.queues[vu.RX] is None or not self.backend.rings[vu.RX].enabled:
            return len(frames)  # the guest's RX ring does not run: its link is down, nothing queues
        dropped = 0
        for frame in frames:
            if self.pending_bytes > WRITE_HARD_LIMIT:
                dropped += 1
                continue
            self.pending.append(frame)
            self.pending_bytes += len(frame)
        self._fill_rx()
        return dropped

    def _fill_rx(self) -> None:
        queue = self.queues[vu.RX]
        if queue is None or self.inactive or not self.pending:
            self._update_congestion()
            return
        if not self.backend.rings[vu.RX].enabled:
            return  # frames wait (bounded) until QEMU enables the ring
        try:
            taken, notify = self.device.fill_rx(queue, self.pending)
        except (RingError, ValueError) as exc:
            self.drop(f"RX ring: {exc}")
            return
        self.pending_bytes -= taken
        if notify:
            self._signal(vu.RX)
        self._update_congestion()

    def _sync_direct(self) -> None:
        """Let the TCP engine write into the RX ring directly while it runs and is enabled."""
        queue = self.queues[vu.RX]
        runs = queue is not None and not self.inactive and self.backend.rings[vu.RX].enabled
        self.device.rx_queue = queue if runs else None

    def direct_written(self) -> None:
        mark = self.device.take_direct_mark()
        queue = self.queues[vu.RX]
        if mark < 0 or queue is None or self.inactive:
            return
        try:
            notify = queue.needs_notify(mark)
        except (RingError, ValueError) as exc:
            self.drop(f"RX ring: {exc}")
            return
        if notify:
            self._signal(vu.RX)

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
        self.device.rx_queue = None
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

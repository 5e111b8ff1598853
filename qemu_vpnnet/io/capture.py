"""Packet capture: the frames of the virtual switch to a pcap file (tcpdump, Wireshark).

What is captured: every frame a QEMU port delivers (``frames_in``, before the core sees it) and
every frame the shell writes to a port (``frames_out``, as it leaves). Without a port filter a
frame one guest sends to another is written once, when it comes in, and a frame the gateway
floods to several ports once; with ``port`` the capture is that port's two directions as its
QEMU sees them. Timestamps are wall-clock: the time of the read from QEMU, or of the flush.

The cost when no capture runs is one ``None`` check per batch of frames in ``Shell`` (not per
frame). While one runs, the event loop only filters, truncates and frames the records (dpkt's
pcap ``Writer``) and hands each batch to a writer thread, which owns the file: writes, rotation
(FILE, FILE.1, ... FILE.N-1) and errors. At most ``MAX_QUEUED`` bytes wait for that thread: when
the disk is slower than the traffic the newest frames are dropped and counted, and a write error
(ENOSPC, EIO) is logged once, its frames counted as dropped, the file cut back to its last whole
record, and writing tried again with the next batch.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import dpkt

if TYPE_CHECKING:
    from qemu_vpnnet.io.shell import Shell

log = logging.getLogger("qemu_vpnnet.capture")

DEFAULT_SNAPLEN: Final = 65535  # holds a whole frame at MTU 65520
DEFAULT_MAX_SIZE: Final = 64 << 20
DEFAULT_FILES: Final = 2
MAX_FILES: Final = 1000
MIN_MAX_SIZE: Final = 4096
MAX_QUEUED: Final = 16 << 20  # bytes of records waiting for the writer thread
FILE_MODE: Final = 0o600  # captures hold the guests' traffic

PROTOCOLS: Final = {"arp": -1, "ip": 0, "icmp": 1, "tcp": 6, "udp": 17}
ETH_P_IP: Final = b"\x08\x00"
ETH_P_ARP: Final = b"\x08\x06"


class CaptureError(Exception):
    """A capture cannot be started (the message says why)."""


def parse_size(text: str) -> int:
    """A byte count: 1000, 64k, 64M, 1G (powers of 1024); ValueError when malformed."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    body = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = 1
    if body and body[-1] in units:
        scale = units[body[-1]]
        body = body[:-1]
    if not body.isdigit():
        raise ValueError(f"expected a size such as 1048576, 512k, 64M or 1G, got {text!r}")
    return int(body) * scale


@dataclass(frozen=True)
class CaptureFilter:
    """Which frames to keep: a guest MAC (source or destination), a protocol, an IPv4 address
    (source or destination), a TCP/UDP port (source or destination). Empty keeps everything."""

    mac: bytes | None = None
    protocol: str | None = None
    host: bytes | None = None
    l4_port: int | None = None

    def empty(self) -> bool:
        return self.mac is None and self.protocol is None and self.host is None and self.l4_port is None

    def matches(self, frame: bytes) -> bool:
        mac = self.mac
        if mac is not None and frame[0:6] != mac and frame[6:12] != mac:
            return False
        protocol = self.protocol
        if protocol is None and self.host is None and self.l4_port is None:
            return True
        ethertype = frame[12:14]
        if protocol == "arp":
            return ethertype == ETH_P_ARP and self.host is None and self.l4_port is None
        if ethertype != ETH_P_IP or len(frame) < 34:
            return False
        ip_proto = frame[23]
        if protocol is not None and protocol != "ip" and ip_proto != PROTOCOLS[protocol]:
            return False
        host = self.host
        if host is not None and frame[26:30] != host and frame[30:34] != host:
            return False
        port = self.l4_port
        if port is not None:
            if ip_proto not in (6, 17) or (frame[20] & 0x1F) or frame[21]:  # fragments after the first
                return False
            start = 14 + (frame[14] & 0x0F) * 4
            ports = frame[start : start + 4]
            if len(ports) < 4 or (
                int.from_bytes(ports[0:2], "big") != port and int.from_bytes(ports[2:4], "big") != port
            ):
                return False
        return True

    def describe(self) -> str:
        words: list[str] = []
        if self.protocol is not None:
            words.append(self.protocol)
        if self.host is not None:
            words += ["host", socket.inet_ntoa(self.host)]
        if self.l4_port is not None:
            words += ["port", str(self.l4_port)]
        return " ".join(words)


def parse_filter(text: str, mac: bytes | None = None) -> CaptureFilter:
    """``[PROTO] [host ADDR] [port N]`` (tcpdump's words, in any order, optionally joined by
    ``and``); PROTO is arp, ip, icmp, tcp or udp. ValueError says what is wrong."""
    protocol: str | None = None
    host: bytes | None = None
    port: int | None = None
    words = [w for w in text.lower().split() if w != "and"]
    i = 0
    while i < len(words):
        word = words[i]
        if word in PROTOCOLS:
            if protocol is not None:
                raise ValueError(f"filter {text!r}: one protocol at most")
            protocol = word
            i += 1
            continue
        if word in ("host", "port"):
            if i + 1 >= len(words):
                raise ValueError(f"filter {text!r}: '{word}' needs a value")
            value = words[i + 1]
            if word == "host":
                try:
                    host = socket.inet_aton(value) if value.count(".") == 3 else None
                except OSError:
                    host = None
                if host is None:
                    raise ValueError(f"filter {text!r}: bad IPv4 address {value!r}")
            else:
                if not value.isdigit() or not 0 < int(value) <= 65535:
                    raise ValueError(f"filter {text!r}: bad port {value!r}")
                port = int(value)
            i += 2
            continue
        raise ValueError(
            f"filter {text!r}: unknown word {word!r} (expected arp, ip, icmp, tcp, udp, host ADDR, port N)"
        )
    if protocol == "arp" and (host is not None or port is not None):
        raise ValueError(f"filter {text!r}: arp has no host or port")
    if protocol in ("icmp", "arp") and port is not None:
        raise ValueError(f"filter {text!r}: {protocol} has no ports")
    return CaptureFilter(mac, protocol, host, port)


@dataclass(frozen=True)
class CaptureOptions:
    path: str
    snaplen: int = DEFAULT_SNAPLEN
    max_size: int = DEFAULT_MAX_SIZE
    files: int = DEFAULT_FILES
    port: int | None = None  # a QEMU port number (GUEST_CONNECTED's "port")
    filter: CaptureFilter = CaptureFilter()

    def check(self) -> None:
        """CaptureError when a value is out of range."""
        if not 64 <= self.snaplen <= 262144:
            raise CaptureError(f"snaplen {self.snaplen}: must be 64..262144 bytes")
        if self.max_size and self.max_size < MIN_MAX_SIZE:
            raise CaptureError(f"max-size {self.max_size}: must be 0 (no limit) or at least {MIN_MAX_SIZE} bytes")
        if not 1 <= self.files <= MAX_FILES:
            raise CaptureError(f"files {self.files}: must be 1..{MAX_FILES}")


class _Spool:
    """The file object dpkt's Writer writes to: each write() is one record (or the file header)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(data)
        return len(data)

    def close(self) -> None:
        pass


class RecordWriter(dpkt.pcap.Writer):  # type: ignore[misc]
    """dpkt's pcap Writer, truncating frames to snaplen with the original length in the header
    (dpkt's writepkt writes caplen = len)."""

    def __init__(self, spool: _Spool, snaplen: int) -> None:
        super().__init__(spool, snaplen=snaplen, linktype=dpkt.pcap.DLT_EN10MB)
        self.spool = spool
        self.snaplen = snaplen

    def record(self, frame: bytes, ts: float) -> bytes:
        """One record (header + captured bytes) for frame at wall-clock time ts."""
        length = len(frame)
        data = frame if length <= self.snaplen else frame[: self.snaplen]
        sec = int(ts)
        usec = int((ts - sec) * 1_000_000)
        header: bytes = self._pack_hdr(sec, usec, len(data), length)
        return header + data


class PcapFile:
    """The writer thread's side: one pcap file with rotation. Opened by the constructor (errors
    reach the caller); every other method runs in the writer thread."""

    def __init__(self, path: str, header: bytes, max_size: int, files: int) -> None:
        self.path = path
        self.header = header
        self.max_size = max_size
        self.files = files
        self.size = 0
        self.rotations = 0
        self.bytes_written = 0
        self.fd = self.open()

    def open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.path, flags, FILE_MODE)
        try:
            self.write_all(fd, self.header)
        except OSError:
            os.close(fd)
            raise
        self.size = len(self.header)
        return fd

    @staticmethod
    def write_all(fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.N-1 (the oldest is dropped); a fresh FILE."""
        os.close(self.fd)
        self.fd = -1
        for i in range(self.files - 1, 0, -1):
            older = self.path if i == 1 else f"{self.path}.{i - 1}"
            try:
                os.replace(older, f"{self.path}.{i}")
            except FileNotFoundError:
                pass
        self.rotations += 1
        self.fd = self.open()

    def write_batch(self, records: list[bytes]) -> None:
        """Write records, rotating before one that would take the file past max_size; OSError
        after the file was cut back to its last whole record."""
        pending: list[bytes] = []
        size = self.size
        for rec in records:
            if self.max_size and size + len(rec) > self.max_size and size > len(self.header):
                self.flush(pending)
                pending = []
                self.rotate()
                size = self.size
            pending.append(rec)
            size += len(rec)
        self.flush(pending)

    def flush(self, pending: list[bytes]) -> None:
        if not pending:
            return
        data = b"".join(pending)
        try:
            self.write_all(self.fd, data)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            raise
        self.size += len(data)
        self.bytes_written += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Capture:
    """One running capture: filters and frames records on the event loop, writes in a thread."""

    def __init__(self, options: CaptureOptions, gateway_mac: bytes) -> None:
        options.check()
        self.options = options
        self.gateway_mac = gateway_mac
        self.filter = options.filter
        spool = _Spool()
        self.writer = RecordWriter(spool, options.snaplen)
        header = b"".join(spool.chunks)
        spool.chunks.clear()
        try:
            self.file = PcapFile(options.path, header, options.max_size, options.files)
        except OSError as exc:
            raise CaptureError(f"cannot open {options.path}: {exc.strerror or exc}") from exc
        self.started = time.time()
        self.frames = 0  # records handed to the writer thread
        self.dropped = 0  # frames not written: the writer was behind, or a write failed
        self.write_errors = 0
        self.last_error = ""
        self.lock = threading.Lock()
        self.queue: collections.deque[list[bytes]] = collections.deque()
        self.queued = 0  # bytes in queue (under lock)
        self.wake = threading.Condition(self.lock)
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="vpnnet-capture", daemon=True)
        self.thread.start()

    # ---- event loop side ----------------------------------------------------------------
    def frames_in(self, port_id: int, frames: list[bytes]) -> None:
        """A batch of frames QEMU port port_id delivered."""
        port = self.options.port
        if port is not None and port != port_id:
            return
        self.record(frames, time.time())

    def frames_out(self, out: dict[int, list[bytes]]) -> None:
        """The frames queued for each port, about to be written (before the queues are swapped)."""
        port = self.options.port
        ts = time.time()
        if port is not None:
            frames = out.get(port)
            if frames:
                self.record(frames, ts)
            return
        gateway = self.gateway_mac
        seen: set[int] = set()
        mine: list[bytes] = []
        for frames in out.values():
            for frame in frames:
                # other guests' frames were captured as they came in; a flooded frame is one object
                if frame[6:12] == gateway and id(frame) not in seen:
                    seen.add(id(frame))
                    mine.append(frame)
        if mine:
            self.record(mine, ts)

    def record(self, frames: list[bytes], ts: float) -> None:
        flt = self.filter
        make = self.writer.record
        if flt.empty():
            records = [make(frame, ts) for frame in frames]
        else:
            records = [make(frame, ts) for frame in frames if flt.matches(frame)]
        if not records:
            return
        size = sum(len(r) for r in records)
        with self.lock:
            if self.stopping:
                return
            if self.queued + size > MAX_QUEUED:
                self.dropped += len(records)
                return
            self.queue.append(records)
            self.queued += size
            self.frames += len(records)
            self.wake.notify()

    def stop(self) -> None:
        """Ask the thread to write what is queued and close the file; join() waits for it."""
        with self.lock:
            self.stopping = True
            self.wake.notify()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def describe(self) -> dict[str, object]:
        opts = self.options
        with self.lock:
            queued = self.queued
            dropped = self.dropped
        result: dict[str, object] = {
            "active": self.thread.is_alive() and not self.stopping,
            "file": opts.path,
            "snaplen": opts.snaplen,
            "max-size": opts.max_size,
            "files": opts.files,
            "filter": opts.filter.describe(),
            "frames": self.frames,
            "bytes-written": self.file.bytes_written,
            "queued-bytes": queued,
            "dropped": dropped,
            "rotations": self.file.rotations,
            "write-errors": self.write_errors,
            "started": round(self.started, 3),
        }
        if opts.port is not None:
            result["port"] = opts.port
        if opts.filter.mac is not None:
            result["mac"] = ":".join(f"{b:02x}" for b in opts.filter.mac)
        if self.last_error:
            result["last-error"] = self.last_error
        return result

    # ---- writer thread --------------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self.queue and not self.stopping:
                        self.wake.wait()
                    batches = list(self.queue)
                    self.queue.clear()
                    done = self.stopping
                records = [rec for batch in batches for rec in batch]
                if records:
                    self.write(records)
                    with self.lock:
                        self.queued -= sum(len(r) for r in records)
                if done:
                    with self.lock:
                        if not self.queue:
                            break
        finally:
            self.file.close()

    def write(self, records: list[bytes]) -> None:
        try:
            self.file.write_batch(records)
        except OSError as exc:
            with self.lock:
                self.dropped += len(records)
                self.frames -= len(records)
            self.write_errors += 1
            reason = exc.strerror or str(exc)
            if reason != self.last_error:
                hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
                log.error(
                    "capture %s: write failed: %s%s; dropping frames while it fails", self.options.path, reason, hint
                )
            self.last_error = reason
            if self.file.fd < 0:  # a rotation failed half-way: try to reopen the file
                try:
                    self.file.fd = self.file.open()
                except OSError:
                    pass
        else:
            if self.last_error:
                log.info("capture %s: writing again", self.options.path)
                self.last_error = ""


def start_capture(shell: Shell, options: CaptureOptions) -> Capture:
    """Start a capture on shell (CaptureError when one runs already or the file cannot be opened)."""
    running = shell.capture
    if running is not None:
        raise CaptureError(f"a capture to {running.options.path} is running already; stop it first")
    if options.port is not None and options.port not in shell.ports:
        raise CaptureError(f"no QEMU port {options.port} (query-stats counts the guests; GUEST_CONNECTED names ports)")
    capture = Capture(options, shell.stack.config.gateway_mac)
    shell.capture = capture
    shell.stack.out.switch.direct_off = True  # every frame through the switch's queues, where it sees them
    what = [options.filter.describe()]
    if options.filter.mac is not None:
        what.append("mac " + ":".join(f"{b:02x}" for b in options.filter.mac))
    if options.port is not None:
        what.append(f"port {options.port}")
    what_text = ", ".join(w for w in what if w)
    log.info("capture started: %s%s", options.path, f" ({what_text})" if what_text else "")
    return capture


async def stop_capture(shell: Shell, timeout: float = 5.0) -> dict[str, object] | None:
    """Stop the running capture (None when none runs); its final numbers once the file is closed."""
    import asyncio

    capture = shell.capture
    if capture is None:
        return None
    shell.capture = None
    shell.stack.out.switch.direct_off = False
    capture.stop()
    if not await asyncio.to_thread(capture.join, timeout):
        log.warning("capture %s: the writer did not finish within %.0f s", capture.options.path, timeout)
    result = capture.describe()
    log.info(
        "capture stopped: %s, %d frames, %d bytes, %d dropped",
        capture.options.path,
        capture.frames,
        capture.file.bytes_written,
        capture.dropped,
    )
    return result

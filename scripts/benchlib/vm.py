"""The bench's real-VM table: the tiny TCG guest (vm-images) at MTU 1500 over QEMU's libslirp,
over qemu-vpnnet's stream socket and over its vhost-user transport, side by side in one run; and
the stream socket once more with the guest at MTU 65520 (``stream-65520``), the stream path at
its fastest, which the issue measures vhost-user's backend CPU per GiB against.

Each transport boots one VM (512 MB RAM, so the file fits in the guest's tmpfs). Its script
(busybox sh, on the kernel command line) downloads the host's file N times into /dev/null,
timing each with /proc/uptime (busybox ``date`` has no %N), then once into /tmp, and serves
/tmp with busybox httpd on port 8080; the host then fetches the file back through a
``hostfwd`` forward to that port (the upload) N times and checks it byte for byte.

CPU seconds per GiB over exactly each transfer window, from /proc/PID/task/*/stat: QEMU's vCPU
threads (``CPU 0/TCG``: the guest's own kernel and its virtio-net driver), QEMU's other threads
(the main loop: libslirp, the stream socket's framing, or for vhost-user only kicks and
interrupts) and the backend process. A download window runs from the HTTP request reaching the
host's server to the guest's console line saying wget ended; an upload window from the host's
connect to the last byte.

Under TCG the guest's emulated CPU is the limit, so these rates say how much guest and QEMU
work each transport costs, not how fast a KVM guest would be.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from integration.common import with_pdeathsig
from integration.vmguest import GuestError, VmGuest, default_accel, ensure_vm_image

REPO = Path(__file__).resolve().parent.parent.parent
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
CLK_TCK = os.sysconf("SC_CLK_TCK")
GUEST_PORT = 8080
MIB = 1 << 20
GIB = 1 << 30

#: transport name -> (backend options, or None for QEMU's libslirp; how QEMU reaches it)
TRANSPORTS: dict[str, tuple[list[str] | None, str]] = {
    "slirp": (None, "user"),
    "stream": (["--socket", "{sock}"], "stream"),
    # the stream socket at its fastest: the guest takes MTU 65520 from the lease (the issue's
    # yardstick for the backend's CPU per GiB on vhost-user, measured here in the same run)
    "stream-65520": (["--socket", "{sock}", "--mtu", "65520"], "stream"),
    "vhost-user": (["--vhost-user", "{sock}"], "vhost-user"),
    "vhost-user-no-offloads": (["--vhost-user", "{sock}", "--no-offloads"], "vhost-user"),
}
DEFAULT_TRANSPORTS = "slirp,stream,stream-65520,vhost-user,vhost-user-no-offloads"
PINGS = 100  # ICMP echo to the gateway address, 50 ms apart, before the transfers: the transport's latency
# then new connections to a host HTTP server (benchlib/hostservers.py), one request each, this many in
# flight, for this long (the guest's vm-images/connloop.c; the namespace rows run wrk with 32)
CONN_SECONDS = 5
CONN_CONCURRENCY = 16

GUEST_SCRIPT = """\
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo "BENCH-MTU $(cat /sys/class/net/eth0/mtu)"
ping -c {pings} -i 0.05 10.0.2.2 | sed -n 's/.*time=\\([0-9.]*\\) ms.*/BENCH-RTT \\1/p'
echo BENCH-RTT-DONE
if command -v connloop >/dev/null; then connloop 10.0.2.2 {conn_port} {conn_seconds} {conn_concurrency}; fi
echo BENCH-CONN-DONE
i=1
while [ $i -le {rounds} ]; do
  t0=$(up); timeout 300 wget -q -O /dev/null http://10.0.2.2:{port}/down$i; rc=$?; t1=$(up)
  echo "BENCH-DOWN $i $rc $t0 $t1"
  i=$((i + 1))
done
t0=$(up); timeout 300 wget -q -O /tmp/big.bin http://10.0.2.2:{port}/tmp; rc=$?; t1=$(up)
echo "BENCH-TMP $rc $t0 $t1 $(wc -c </tmp/big.bin)"
httpd -p {guest_port} -h /tmp && echo BENCH-UP-READY
sleep 3600
"""
_DOWN_RE = r"^BENCH-DOWN {round} (\d+) ([\d.]+) ([\d.]+)\n"
_TMP_RE = re.compile(r"^BENCH-TMP (\d+) ([\d.]+) ([\d.]+) (\d+)\n", re.MULTILINE)
#: console lines of the guest's own protocol, its DHCP client, the firmware and a kernel warning
#: every boot of this guest prints: anything else (a virtio_net error...) is reported
_EXPECTED_LINE = re.compile(
    r"^\s*(VPNNET-|BENCH-|udhcpc: |Sending |Lease of |Performing |SeaBIOS |iPXE |Press Ctrl-B |Booting from |$)"
    r"|^\[ *[\d.]+\] acpi PNP0A03:00: fail to add MMCONFIG information"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("real-VM table (the tiny TCG guest at MTU 1500)")
    group.add_argument(
        "--vm", action="store_true", help="also the real-VM table (about 3 minutes with the defaults below)"
    )
    group.add_argument("--vm-only", action="store_true", help="only the real-VM table")
    group.add_argument("--vm-mb", type=int, default=200, help="MiB each way per transfer (default 200)")
    group.add_argument("--vm-rounds", type=int, help="transfers each way per transport (default 2; with --quick 1)")
    group.add_argument(
        "--vm-transports", default=DEFAULT_TRANSPORTS, help=f"comma-separated (default {DEFAULT_TRANSPORTS})"
    )


# ---- CPU accounting -------------------------------------------------------------------------
@dataclass(frozen=True)
class Cpu:
    """CPU seconds used so far: QEMU's vCPU threads, QEMU's other threads, the backend (user and
    system; and user alone, which the namespace rows' "backend user CPU s/GiB" count)."""

    vcpu: float
    qemu_other: float
    backend: float
    backend_user: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.vcpu - other.vcpu,
            self.qemu_other - other.qemu_other,
            self.backend - other.backend,
            self.backend_user - other.backend_user,
        )


def _stat(path: str) -> tuple[str, float, float]:
    """(comm, utime, stime), in seconds, of a /proc/.../stat file; ("", 0, 0) when it is gone."""
    try:
        text = Path(path).read_text()
    except OSError:
        return "", 0.0, 0.0
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_now(qemu_pid: int, backend_pid: int | None) -> Cpu:
    """The process totals include threads that already ended; "other" is QEMU's total less its
    vCPU threads (named "CPU 0/TCG", "CPU 0/KVM" under ``-name debug-threads=on``)."""
    _comm, user, system = _stat(f"/proc/{qemu_pid}/stat")
    qemu_total = user + system
    vcpu = 0.0
    try:
        tasks = os.listdir(f"/proc/{qemu_pid}/task")
    except OSError:
        tasks = []
    for tid in tasks:
        comm, user, system = _stat(f"/proc/{qemu_pid}/task/{tid}/stat")
        if re.match(r"CPU \d+/", comm):
            vcpu += user + system
    _comm, user, system = _stat(f"/proc/{backend_pid}/stat") if backend_pid is not None else ("", 0.0, 0.0)
    return Cpu(vcpu, qemu_total - vcpu, user + system, user)


# ---- the host's side ------------------------------------------------------------------------
class FileServer:
    """HTTP/1.0 on 127.0.0.1: any GET gets the one file, by sendfile. ``on_request(path)`` runs
    when a request has arrived, before the first byte of the reply; :attr:`sent` has the bytes
    sent per path once the reply is out."""

    def __init__(self, path: Path, on_request: Callable[[str], None]) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.on_request = on_request
        self.sent: dict[str, int] = {}
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                words = head.split(b"\r\n", 1)[0].split()
                target = words[1].decode(errors="replace") if len(words) > 1 else "/"
                outer.on_request(target)
                conn.sendall(
                    b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % outer.size
                )
                with open(outer.path, "rb") as f:
                    outer.sent[target] = conn.sendfile(f)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="vm-bench-http")
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_file(path: Path, size: int) -> str:
    """``size`` bytes of random data (every MiB different); returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, MIB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def fetch(port: int, size: int, buf: bytearray) -> tuple[float, bytes]:
    """GET /big.bin from 127.0.0.1:port into ``buf``: (seconds from connect to the last byte,
    the body)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
        conn.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
        view = memoryview(buf)
        got = 0
        while True:
            n = conn.recv_into(view[got:])
            if not n:
                break
            got += n
            if got == len(buf):
                raise RuntimeError("upload: more bytes than expected")
    seconds = time.monotonic() - started
    data = bytes(view[:got])
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"upload: bad reply {head[:200]!r}")
    return seconds, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_backend(options: list[str], sock: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """The installed (compiled) qemu-vpnnet, as the namespace rows run it; returns once its
    socket exists."""
    cmd = [
        VENV_PYTHON,
        "-P",
        "-m",
        "qemu_vpnnet",
        *options,
        "--dns-upstream",
        "127.0.0.1:9",
        "--log-level",
        "warning",
        *shlex.split(os.environ.get("VPNNET_BENCH_ARGS", "")),
    ]
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(with_pdeathsig(cmd), stdout=log, stderr=subprocess.STDOUT, cwd="/")
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"backend did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- one transport --------------------------------------------------------------------------
class Transport:
    def __init__(self, name: str, workdir: Path, big: Path, sha256: str, rounds: int) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.big = big
        self.size = big.stat().st_size
        self.sha256 = sha256
        self.rounds = rounds
        self.backend: subprocess.Popen[bytes] | None = None
        self.vm: VmGuest | None = None
        self.at_request: dict[str, Cpu] = {}
        self.requested_at: dict[str, float] = {}
        self.figures: dict[str, list[float]] = {}

    def add(self, metric: str, value: float) -> None:
        self.figures.setdefault(metric, []).append(value)

    def cpu(self) -> Cpu:
        assert self.vm is not None and self.vm.process is not None
        return cpu_now(self.vm.process.pid, self.backend.pid if self.backend is not None else None)

    def on_request(self, target: str) -> None:
        if self.vm is not None and self.vm.process is not None:
            self.at_request[target] = self.cpu()
            self.requested_at[target] = time.monotonic()

    def add_cpu(self, direction: str, used: Cpu) -> None:
        gib = self.size / GIB
        self.add(f"{direction} QEMU vCPU CPU s/GiB", used.vcpu / gib)
        self.add(f"{direction} QEMU other threads CPU s/GiB", used.qemu_other / gib)
        if self.backend is not None:
            self.add(f"{direction} backend CPU s/GiB", used.backend / gib)
            self.add(f"{direction} backend user CPU s/GiB", used.backend_user / gib)

    def run(self, server: FileServer, http_port: int) -> dict[str, list[float]]:
        options, kind = TRANSPORTS[self.name]
        fwd = free_port()
        sock = self.dir / "net.sock"
        script = GUEST_SCRIPT.format(
            rounds=self.rounds,
            port=server.port,
            guest_port=GUEST_PORT,
            pings=PINGS,
            conn_port=http_port,
            conn_seconds=CONN_SECONDS,
            conn_concurrency=CONN_CONCURRENCY,
        )
        size_mib = -(-self.size // MIB)
        # the guest's tmpfs holds half the RAM its kernel sees (less than -m): 1000 MiB did not fit in 2064
        memory_mb = max(512, 2 * size_mib + 256)
        common = {
            "image": ensure_vm_image(rebuild_if_stale=False),
            "dhcp": "once",
            "memory_mb": memory_mb,
            "append": "loglevel=5",  # after "quiet": kernel warnings too reach the console (and the report)
            "qemu_args": ["-name", f"vpnnet-bench-{self.name},debug-threads=on"],  # names the vCPU threads
        }
        log = self.dir / "console.log"
        if options is None:
            self.vm = VmGuest(script, netdev=f"user,hostfwd=tcp:127.0.0.1:{fwd}-:{GUEST_PORT}", log_path=log, **common)
        else:
            args = [o.format(sock=sock) for o in options] + ["--hostfwd", f"tcp:127.0.0.1:{fwd}-:{GUEST_PORT}"]
            self.backend = start_backend(args, sock, self.dir / "backend.log")
            if kind == "stream":
                self.vm = VmGuest(script, socket_path=sock, log_path=log, **common)
            else:
                self.vm = VmGuest(script, vhost_user_path=sock, log_path=log, **common)
        self.vm.start()
        self.vm.wait_for(r"^VPNNET-SCRIPT-START\n", 120)
        self.add("boot to script s", self.vm.elapsed)
        mtu = self.vm.wait_for(r"^BENCH-MTU (\d+)\n", 30).group(1)
        want = "65520" if "--mtu" in (options or []) else "1500"
        if mtu != want:
            raise RuntimeError(f"the guest's MTU is {mtu}, not {want}")
        done = self.vm.wait_for(r"^BENCH-RTT-DONE\n", 60)
        console = self.vm.console_text()[: done.end()]
        rtts = sorted(float(t) for t in re.findall(r"^BENCH-RTT ([\d.]+)\n", console, re.MULTILINE))
        if len(rtts) < PINGS // 2:
            raise RuntimeError(f"only {len(rtts)} of {PINGS} pings to the gateway answered")
        self.add("ping gateway RTT median ms", statistics.median(rtts))
        self.add("ping gateway RTT p99 ms", rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))])
        before = self.cpu()
        conn_done = self.vm.wait_for(r"^BENCH-CONN-DONE\n", CONN_SECONDS + 60, pos=done.end())
        used = self.cpu() - before
        conn = re.search(r"^BENCH-CONN (\d+) (\d+) ([\d.]+)\n", self.vm.console_text()[: conn_done.end()], re.MULTILINE)
        if conn is None:
            print(f"  vm {self.name}: the guest has no connloop (no gcc when its image was built)", file=sys.stderr)
        else:
            completed, failed, seconds = int(conn.group(1)), int(conn.group(2)), float(conn.group(3))
            if failed > completed // 100:
                raise RuntimeError(f"connections: {failed} failed, {completed} completed")
            self.add("connections/s", completed / seconds)
            if self.backend is not None and completed:
                self.add("connections backend CPU us each", used.backend / completed * 1e6)
            self.add("connections QEMU CPU us each", (used.vcpu + used.qemu_other) / max(completed, 1) * 1e6)
        for r in range(1, self.rounds + 1):
            m = self.vm.wait_for(_DOWN_RE.format(round=r), 320)
            used = self.cpu() - self.at_request[f"/down{r}"]
            host_seconds = time.monotonic() - self.requested_at[f"/down{r}"]
            rc, t0, t1 = int(m.group(1)), float(m.group(2)), float(m.group(3))
            if rc != 0 or server.sent.get(f"/down{r}") != self.size:
                raise RuntimeError(f"download {r}: wget rc={rc}, sent {server.sent.get(f'/down{r}')} bytes")
            self.add("download Mbit/s", self.size * 8 / (t1 - t0) / 1e6)
            # the CPU window's length: from the request's arrival to the console line (JSON only)
            self.add("download host-timed Mbit/s", self.size * 8 / host_seconds / 1e6)
            self.add_cpu("download", used)
        m = self.vm.wait_for(_TMP_RE, 320)
        rc, t0, t1, got = int(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4))
        if rc != 0 or got != self.size:
            raise RuntimeError(f"download into /tmp: wget rc={rc}, {got} bytes")
        self.add("download into tmpfs Mbit/s", self.size * 8 / (t1 - t0) / 1e6)
        self.vm.wait_for(r"^BENCH-UP-READY\n", 30)
        buf = bytearray(self.size + 65536)
        for r in range(1, self.rounds + 1):
            before = self.cpu()
            seconds, body = fetch(fwd, self.size, buf)
            used = self.cpu() - before
            if len(body) != self.size or (r == 1 and hashlib.sha256(body).hexdigest() != self.sha256):
                raise RuntimeError(f"upload {r}: {len(body)} bytes, not the file the guest downloaded")
            self.add("upload Mbit/s", self.size * 8 / seconds / 1e6)
            self.add_cpu("upload", used)
            del body
        return self.figures

    def console_oddities(self) -> list[str]:
        if self.vm is None:
            return []
        return [line for line in self.vm.console_text().splitlines() if not _EXPECTED_LINE.match(line)]

    def stop(self) -> None:
        if self.vm is not None:
            self.vm.kill()
        if self.backend is not None:
            stop(self.backend)


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[str]]]:
    """{transport: {metric: samples}}, {transport: odd console lines (kernel errors...)}."""
    names = [n for n in args.vm_transports.split(",") if n]
    unknown = [n for n in names if n not in TRANSPORTS]
    if unknown:
        raise SystemExit(f"--vm-transports: unknown {', '.join(unknown)} (known: {', '.join(TRANSPORTS)})")
    workdir = workdir / "vm"
    workdir.mkdir(parents=True, exist_ok=True)
    big = workdir / "big.bin"
    sha256 = make_file(big, args.vm_mb * MIB)
    results: dict[str, dict[str, list[float]]] = {}
    oddities: dict[str, list[str]] = {}
    current: list[Transport] = []
    server = FileServer(big, lambda target: current[-1].on_request(target) if current else None)
    http_port = free_port()
    http = subprocess.Popen(
        with_pdeathsig([VENV_PYTHON, str(Path(__file__).resolve().parent / "hostservers.py"), "http", str(http_port)]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        for name in names:
            print(f"vm: {name}, {args.vm_rounds} x {args.vm_mb} MiB each way", file=sys.stderr, flush=True)
            transport = Transport(name, workdir, big, sha256, args.vm_rounds)
            current.append(transport)
            try:
                transport.run(server, http_port)
            except (GuestError, RuntimeError, OSError) as exc:  # one failed transport must not lose the others
                print(f"  vm {name}: {exc}", file=sys.stderr)
            finally:
                transport.stop()
                odd = transport.console_oddities()
                if odd:
                    oddities[name] = odd
                    print(f"  vm {name}: guest console says:", *odd, sep="\n    ", file=sys.stderr)
            results[name] = transport.figures
    finally:
        server.stop()
        stop(http)
        big.unlink(missing_ok=True)
    return results, oddities


# ---- the table ------------------------------------------------------------------------------
ROWS = [
    "ping gateway RTT median ms",
    "ping gateway RTT p99 ms",
    "connections/s",
    "connections backend CPU us each",
    "connections QEMU CPU us each",
    "download Mbit/s",
    "upload Mbit/s",
    "download QEMU vCPU CPU s/GiB",
    "download QEMU other threads CPU s/GiB",
    "download backend CPU s/GiB",
    "download backend user CPU s/GiB",
    "upload QEMU vCPU CPU s/GiB",
    "upload QEMU other threads CPU s/GiB",
    "upload backend CPU s/GiB",
    "upload backend user CPU s/GiB",
    "download into tmpfs Mbit/s",
    "boot to script s",
]


def _median(results: dict[str, dict[str, list[float]]], name: str, metric: str) -> float | None:
    values = results.get(name, {}).get(metric)
    return statistics.median(values) if values else None


def table(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    names = [n for n in args.vm_transports.split(",") if n in results]
    pairs = (("vhost-user", "stream"), ("vhost-user", "stream-65520"), ("vhost-user", "slirp"), ("stream", "slirp"))
    ratios = [(a, b) for a, b in pairs if a in names and b in names]
    lines = [
        f"\n### real VM (tiny guest, {default_accel().split(',')[0].upper()}, MTU 1500; stream-65520 at 65520): "
        f"{args.vm_mb} MiB each way, median of {args.vm_rounds}\n",
        "download: guest wget from a host HTTP server into /dev/null, timed in the guest; upload: the host "
        "fetches the file from the guest's busybox httpd (tmpfs) through a hostfwd forward. "
        "CPU s/GiB over each transfer window; QEMU other threads = its main loop and helpers; backend = user "
        "+ system, backend user = its own code (as the namespace rows' backend user CPU s/GiB).\n",
    ]
    header = ["metric", *names, *(f"{a}/{b}" for a, b in ratios)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for metric in ROWS:
        row = [metric]
        values = {n: _median(results, n, metric) for n in names}
        if all(v is None for v in values.values()):
            continue
        for n in names:
            v = values[n]
            if v is not None and abs(v) < 1e-9:
                v = 0.0  # (a difference of CPU times that rounds to nothing, not -9e-15)
            row.append("—" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.3g}")
        for a, b in ratios:
            va, vb = values[a], values[b]
            row.append(f"{va / vb:.2f}×" if va is not None and vb else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

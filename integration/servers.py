"""Test servers and guest-side clients of the TCP integration tests.

A standalone script (standard library only): the tests run it with this machine's python3 on the
host, inside an NsHost namespace, or inside a namespace guest (``ip netns exec`` keeps the
machine's file system), and import it for :func:`pattern_sha256` and :class:`Servers`.

Servers (``python3 servers.py MODE ADDR PORT ...``; port 0 takes a free one) print
``READY PORT`` once listening, then serve until killed:

- ``sink ADDR PORT [--pause S]``: per connection, read until EOF (after ``S`` seconds of not
  reading at all), then answer one JSON line ``{"bytes", "sha256"}`` and close.
- ``source ADDR PORT SIZE``: per connection, send :func:`pattern` of ``SIZE`` bytes, then close.
- ``echo ADDR PORT``: asyncio echo server (backlog 4096).
- ``reply-after-eof ADDR PORT``: read until EOF, then answer ``got N bytes sha256 HEX`` and close.
- ``close-first ADDR PORT``: read the client's first line, send ``server-greeting\\n``, shut down
  writing, read the rest until EOF and print ``RESULT {"bytes", "sha256"}`` on stdout.
- ``banner ADDR PORT``: send ``server-banner\\n`` at once (before reading anything), shut down
  writing, read until EOF.
- ``reset ADDR PORT SIZE``: send ``SIZE`` bytes, then close with SO_LINGER 0 (an RST) and print
  ``RESET``.
- ``http ADDR PORT --dir DIR``: an HTTP server of the files in ``DIR``.

Clients (run in the guest) print one JSON object on stdout:

- ``send ADDR PORT SIZE``: send the pattern, shut down writing, read the answer until EOF.
- ``recv ADDR PORT [--delay S]``: connect, do not read for ``S`` seconds, then read until EOF.
- ``many ADDR PORT N``: N connections at once to an echo server, all open before any sends.
- ``half-close ADDR PORT``: send a request, shut down writing, read the answer until EOF.
- ``after-peer-eof ADDR PORT SIZE``: send a line, read until the server's EOF, then send ``SIZE``
  bytes.
- ``greetings ADDR PORT N``: N connections one after the other, each reading until the server's
  EOF; how often each distinct greeting arrived.
- ``connect-time ADDR PORT``: how long connect() takes and how it ends.
- ``read-until-error ADDR PORT [--delay S]``: read until EOF, an error or 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

    from integration.netns import Netns

SCRIPT = Path(__file__).resolve()

CHUNK = 1 << 20
SEED = 20261127


@lru_cache(maxsize=1)
def _base_block() -> bytes:
    return random.Random(SEED).randbytes(CHUNK)


def pattern(size: int) -> Iterator[bytes]:
    """``size`` deterministic bytes in 1 MiB chunks; each chunk starts with its own index, so a
    lost, repeated or reordered chunk changes the digest."""
    base = _base_block()
    index = 0
    left = size
    while left > 0:
        chunk = index.to_bytes(8, "big") + base[8:]
        if left < CHUNK:
            chunk = chunk[:left]
        yield chunk
        left -= len(chunk)
        index += 1


@lru_cache(maxsize=8)
def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern(size):
        digest.update(chunk)
    return digest.hexdigest()


def read_all(conn: socket.socket) -> tuple[int, str]:
    """Read until EOF; return the byte count and sha256."""
    digest = hashlib.sha256()
    total = 0
    while True:
        data = conn.recv(CHUNK)
        if not data:
            return total, digest.hexdigest()
        digest.update(data)
        total += len(data)


def send_pattern(conn: socket.socket, size: int) -> None:
    for chunk in pattern(size):
        conn.sendall(chunk)


def http_fetch_sha256(host: str, port: int, path: str, timeout: float = 60.0) -> tuple[int, str]:
    """GET path over HTTP/1.0 from host:port (a guest's busybox httpd through a forward): the
    body's byte count and sha256, read to EOF; AssertionError unless the status is 200."""
    digest = hashlib.sha256()
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            assert chunk, f"connection closed before the headers: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        assert b" 200 " in head.split(b"\r\n")[0], head
        size = len(body)
        digest.update(body)
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# ---- servers ---------------------------------------------------------------------------------


def listener(addr: str, port: int, backlog: int = 128) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(backlog)
    return s


def ready(s: socket.socket) -> None:
    print(f"READY {s.getsockname()[1]}", flush=True)


def serve_threads(s: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    ready(s)

    def run(conn: socket.socket) -> None:
        with conn:
            try:
                handle(conn)
            except OSError as e:
                print(f"ERROR {e!r}", flush=True)

    while True:
        conn, _ = s.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def sink(conn: socket.socket, pause: float) -> None:
    time.sleep(pause)
    total, sha = read_all(conn)
    conn.sendall(json.dumps({"bytes": total, "sha256": sha}).encode() + b"\n")


def source(conn: socket.socket, size: int) -> None:
    send_pattern(conn, size)
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(20)
    conn.recv(1)  # the client's EOF: close only then, so that nothing unread makes an RST


def reply_after_eof(conn: socket.socket) -> None:
    total, sha = read_all(conn)
    conn.sendall(f"got {total} bytes sha256 {sha}".encode())


def read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(1)
        if not data:
            break
        line += data
    return line


def close_first(conn: socket.socket) -> None:
    read_line(conn)
    conn.sendall(b"server-greeting\n")
    conn.shutdown(socket.SHUT_WR)
    total, sha = read_all(conn)
    print("RESULT " + json.dumps({"bytes": total, "sha256": sha}), flush=True)


def banner(conn: socket.socket) -> None:
    conn.sendall(b"server-banner\n")
    conn.shutdown(socket.SHUT_WR)
    read_all(conn)


def reset(conn: socket.socket, size: int) -> None:
    send_pattern(conn, size)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    print("RESET", flush=True)


def http_server(addr: str, port: int, directory: str) -> None:
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    server = http.server.ThreadingHTTPServer((addr, port), handler)
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


async def echo_server(addr: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, addr, port, backlog=4096, reuse_address=True)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


# ---- clients ---------------------------------------------------------------------------------


def connect(addr: str, port: int, timeout: float = 60.0) -> socket.socket:
    conn = socket.create_connection((addr, port), timeout=timeout)
    conn.settimeout(timeout)
    return conn


def client_send(addr: str, port: int, size: int) -> dict[str, object]:
    start = time.monotonic()
    with connect(addr, port) as conn:
        send_pattern(conn, size)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while data := conn.recv(65536):
            reply += data
    seconds = time.monotonic() - start
    return {"sent": size, "sha256": pattern_sha256(size), "reply": json.loads(reply), "seconds": seconds}


def client_recv(addr: str, port: int, delay: float) -> dict[str, object]:
    start = time.monotonic()
    with connect(addr, port) as conn:
        time.sleep(delay)
        total, sha = read_all(conn)
    return {"bytes": total, "sha256": sha, "seconds": time.monotonic() - start}


async def _many(addr: str, port: int, count: int) -> dict[str, object]:
    all_open = asyncio.Event()
    opened = 0
    errors: list[str] = []

    async def one(i: int) -> bool:
        nonlocal opened
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 30)
        except (OSError, TimeoutError) as e:
            errors.append(f"connect {i}: {e!r}")
            opened += 1
            if opened == count:
                all_open.set()
            return False
        opened += 1
        if opened == count:
            all_open.set()
        try:
            await asyncio.wait_for(all_open.wait(), 30)
            message = f"connection {i} ".encode() * 50
            writer.write(message)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readexactly(len(message)), 30)
            if answer != message:
                errors.append(f"connection {i}: wrong echo")
                return False
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), 30)
            if rest:
                errors.append(f"connection {i}: {len(rest)} bytes after the echo")
                return False
            return True
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            errors.append(f"connection {i}: {e!r}")
            return False
        finally:
            writer.close()

    start = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    return {"ok": sum(results), "errors": errors[:10], "seconds": time.monotonic() - start}


def client_half_close(addr: str, port: int) -> dict[str, object]:
    with connect(addr, port, 20) as conn:
        conn.sendall(b"request " * 1000)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while data := conn.recv(65536):
            reply += data
    return {"reply": reply.decode()}


def client_after_peer_eof(addr: str, port: int, size: int) -> dict[str, object]:
    with connect(addr, port, 20) as conn:
        conn.sendall(b"hello\n")
        greeting = b""
        while data := conn.recv(65536):
            greeting += data
        send_pattern(conn, size)  # after the server's FIN
    return {"greeting": greeting.decode(), "sent": size, "sha256": pattern_sha256(size)}


def client_greetings(addr: str, port: int, count: int) -> dict[str, object]:
    seen: dict[str, int] = {}
    for _ in range(count):
        with connect(addr, port, 20) as conn:
            greeting = b""
            while data := conn.recv(65536):
                greeting += data
        text = greeting.decode(errors="replace")
        seen[text] = seen.get(text, 0) + 1
    return {"greetings": seen}


def client_ping_pong(addr: str, port: int, rounds: int) -> dict[str, object]:
    """Round trips of one 32-byte message through an echo server; the median time in microseconds."""
    with socket.create_connection((addr, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(rounds):
            message = f"{i:031d}\n".encode()
            start = time.perf_counter()
            s.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = s.recv(64)
                if not chunk:
                    raise ConnectionError("echo server closed")
                got += chunk
            times.append(time.perf_counter() - start)
            if got != message:
                raise ValueError(f"echo mismatch: {got!r} != {message!r}")
    times.sort()
    return {"rounds": rounds, "median_us": round(times[len(times) // 2] * 1e6, 1)}


def client_connect_time(addr: str, port: int) -> dict[str, object]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    start = time.monotonic()
    try:
        s.connect((addr, port))
        result = "connected"
    except OSError as e:
        result = errno.errorcode.get(e.errno or 0, repr(e)) if e.errno else type(e).__name__
    finally:
        s.close()
    return {"result": result, "ms": (time.monotonic() - start) * 1000}


def client_read_until_error(addr: str, port: int, delay: float) -> dict[str, object]:
    start = time.monotonic()
    total = 0
    error = None
    with connect(addr, port, 20) as conn:
        time.sleep(delay)
        try:
            while data := conn.recv(65536):
                total += len(data)
        except OSError as e:
            error = errno.errorcode.get(e.errno or 0) if e.errno else type(e).__name__
    return {"bytes": total, "error": error, "seconds": time.monotonic() - start}


# ---- harness side (imported by the tests) ------------------------------------------------------


class Server:
    """A server process; its stdout lines are collected by a thread."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True, name=f"server-{name}").start()
        self.port = int(self.wait_line("READY ").split()[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        stream: IO[bytes] = self.proc.stdout
        for raw in stream:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str:
        """The first stdout line starting with ``prefix``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    raise AssertionError(
                        f"server {self.name} did not print {prefix!r} (exit status {self.proc.poll()}); "
                        f"output: {self.lines!r}"
                    )
                self._cond.wait(remaining)

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class Servers:
    """Starts this script's servers on the host (``ns=None``) or in a namespace; :meth:`close`
    stops them all (the tests call it at teardown)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, mode: str, addr: str, *args: str | int, port: int = 0, ns: Netns | None = None) -> Server:
        import subprocess

        from integration.common import with_pdeathsig

        cmd = [sys.executable, str(SCRIPT), mode, addr, str(port), *(str(a) for a in args)]
        if ns is None:
            proc = subprocess.Popen(with_pdeathsig(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        else:
            proc = ns.popen(cmd, stdout=subprocess.PIPE)
        self.procs.append(proc)
        return Server(proc, f"{mode}@{addr}")

    def start_command(self, cmd: Sequence[str], *, ns: Netns | None = None) -> subprocess.Popen[bytes]:
        """Any other server (iperf3 -s ...), output discarded; stopped at :meth:`close`."""
        import subprocess

        from integration.common import with_pdeathsig

        if ns is None:
            proc = subprocess.Popen(with_pdeathsig(list(cmd)), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        else:
            proc = ns.popen(cmd, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        from integration.common import stop_process

        for proc in self.procs:
            stop_process(proc, 3.0)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("size", type=int, nargs="?", default=0)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--dir", default=".")
    a = p.parse_args(argv)
    mode = a.mode
    if mode == "echo":
        asyncio.run(echo_server(a.addr, a.port))
    elif mode == "http":
        http_server(a.addr, a.port, a.dir)
    elif mode in ("sink", "source", "reply-after-eof", "close-first", "banner", "reset"):
        handlers: dict[str, Callable[[socket.socket], None]] = {
            "sink": lambda c: sink(c, a.pause),
            "source": lambda c: source(c, a.size),
            "reply-after-eof": reply_after_eof,
            "close-first": close_first,
            "banner": banner,
            "reset": lambda c: reset(c, a.size),
        }
        serve_threads(listener(a.addr, a.port), handlers[mode])
    else:
        clients: dict[str, Callable[[], dict[str, object]]] = {
            "send": lambda: client_send(a.addr, a.port, a.size),
            "recv": lambda: client_recv(a.addr, a.port, a.delay),
            "many": lambda: asyncio.run(_many(a.addr, a.port, a.size)),
            "half-close": lambda: client_half_close(a.addr, a.port),
            "after-peer-eof": lambda: client_after_peer_eof(a.addr, a.port, a.size),
            "greetings": lambda: client_greetings(a.addr, a.port, a.size),
            "connect-time": lambda: client_connect_time(a.addr, a.port),
            "ping-pong": lambda: client_ping_pong(a.addr, a.port, a.size),
            "read-until-error": lambda: client_read_until_error(a.addr, a.port, a.delay),
        }
        print(json.dumps(clients[mode]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Servers and the guest-side client of the outbound policy tests (integration/test_policy.py).

A standalone script (standard library only), run with this machine's python3 in an NsHost
namespace (the servers) or in a namespace guest (the client).

Server: ``python3 policy_peers.py serve ADDR [tcp:PORT,PORT...] [udp:PORT,...] [unix:PATH]...``
listens on every TCP port (an echo server), every UDP port (echoes each datagram) and every Unix
stream socket path (an echo server, prefixing its answer with ``unix:``), prints one line per
connection or datagram it gets -- ``TCP PORT PEER``, ``UDP PORT LENGTH PEER``, ``UNIX PATH`` --
and ``READY 0`` once all are listening. The test reads those lines: a destination the policy
refuses must never show up.

Client (prints one JSON object ``{"result": "ok"|ERRNO-NAME|"timeout", ...}``):

- ``tcp ADDR PORT TEXT``: connect, send TEXT, shut down writing, read the answer until EOF.
- ``udp ADDR PORT SIZE``: a connected UDP socket without DF (IP_PMTUDISC_DONT, so a datagram
  larger than the MTU leaves in fragments) sends SIZE bytes and waits 3 s for the echo; an ICMP
  error of the destination surfaces as the socket's error.
- ``ping ADDR``: one ICMP echo request (raw socket); ``reply``, ``unreachable`` (with the ICMP
  ``type`` and ``code`` of the error quoting the request) or ``timeout``.
- ``hold ADDR PORT``: connect, print ``{"result": "open"}``, then for each line of stdin send it
  and print the echo (``{"echo": TEXT}``) until stdin ends.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import threading
import time

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)

_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def echo_stream(conn: socket.socket, prefix: bytes = b"") -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(prefix + data)
        except OSError:
            pass


def serve_tcp(addr: str, port: int, ready: threading.Semaphore) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    ready.release()
    while True:
        conn, peer = s.accept()
        say(f"TCP {port} {peer[0]}:{peer[1]}")
        threading.Thread(target=echo_stream, args=(conn,), daemon=True).start()


def serve_udp(addr: str, port: int, ready: threading.Semaphore) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    ready.release()
    while True:
        data, peer = s.recvfrom(65535)
        say(f"UDP {port} {len(data)} {peer[0]}:{peer[1]}")
        s.sendto(data, peer)


def serve_unix(path: str, ready: threading.Semaphore) -> None:
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    ready.release()
    while True:
        conn, _ = s.accept()
        say(f"UNIX {path}")
        threading.Thread(target=echo_stream, args=(conn, b"unix:"), daemon=True).start()


def serve(addr: str, specs: list[str]) -> None:
    ready = threading.Semaphore(0)
    jobs: list[tuple[object, tuple[object, ...]]] = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind == "unix":
            jobs.append((serve_unix, (rest, ready)))
        else:
            fn = serve_tcp if kind == "tcp" else serve_udp
            jobs.extend((fn, (addr, int(port), ready)) for port in rest.split(","))
    for fn, args in jobs:
        threading.Thread(target=fn, args=args, daemon=True).start()  # type: ignore[arg-type]
    for _ in jobs:
        ready.acquire()
    say("READY 0")
    threading.Event().wait()


def error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, repr(exc)) if exc.errno else type(exc).__name__


def client_tcp(addr: str, port: int, text: str) -> dict[str, object]:
    start = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((addr, port))
        s.sendall(text.encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return {"result": "ok", "data": data.decode(errors="replace"), "ms": (time.monotonic() - start) * 1000}
    except TimeoutError:
        return {"result": "timeout", "ms": (time.monotonic() - start) * 1000}
    except OSError as exc:
        return {"result": error_name(exc), "ms": (time.monotonic() - start) * 1000}
    finally:
        s.close()


def client_udp(addr: str, port: int, size: int) -> dict[str, object]:
    start = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    s.settimeout(3)
    try:
        s.connect((addr, port))
        s.send(b"u" * size)
        data = s.recv(65535)
        return {"result": "ok", "bytes": len(data), "ms": (time.monotonic() - start) * 1000}
    except TimeoutError:
        return {"result": "timeout", "ms": (time.monotonic() - start) * 1000}
    except OSError as exc:
        return {"result": error_name(exc), "ms": (time.monotonic() - start) * 1000}
    finally:
        s.close()


def client_ping(addr: str) -> dict[str, object]:
    """One ICMP echo request on a raw socket; the first answer about it: an echo reply or an ICMP
    error (type, code) quoting our request."""
    start = time.monotonic()
    ident = os.getpid() & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(3)
    body = b"policy-ping!"  # an even length (the checksum sums 16-bit words)
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    total = sum(struct.unpack(f"!{len(header + body) // 2}H", header + body))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    packet = struct.pack("!BBHHH", 8, 0, ~total & 0xFFFF, ident, 1) + body
    try:
        s.sendto(packet, (addr, 0))
        while True:
            data, peer = s.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            icmp_type, code = data[ihl], data[ihl + 1]
            if icmp_type == 0 and struct.unpack("!H", data[ihl + 4 : ihl + 6])[0] == ident:
                return {"result": "reply", "from": peer[0], "ms": (time.monotonic() - start) * 1000}
            if icmp_type == 3:
                inner = data[ihl + 8 :]
                inner_ihl = (inner[0] & 0x0F) * 4
                if socket.inet_ntoa(inner[16:20]) == addr and inner[inner_ihl] == 8:
                    return {
                        "result": "unreachable",
                        "type": icmp_type,
                        "code": code,
                        "from": peer[0],
                        "ms": (time.monotonic() - start) * 1000,
                    }
    except TimeoutError:
        return {"result": "timeout", "ms": (time.monotonic() - start) * 1000}
    finally:
        s.close()


def client_hold(addr: str, port: int) -> None:
    with socket.create_connection((addr, port), timeout=10) as s:
        print(json.dumps({"result": "open", "local": s.getsockname()[1]}), flush=True)
        for line in sys.stdin:
            s.sendall(line.encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            print(json.dumps({"echo": data.decode(errors="replace")}), flush=True)


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "serve":
        serve(argv[1], argv[2:])
    elif mode == "tcp":
        print(json.dumps(client_tcp(argv[1], int(argv[2]), argv[3] if len(argv) > 3 else "hello\n")))
    elif mode == "udp":
        print(json.dumps(client_udp(argv[1], int(argv[2]), int(argv[3]))))
    elif mode == "ping":
        print(json.dumps(client_ping(argv[1])))
    elif mode == "hold":
        client_hold(argv[1], int(argv[2]))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

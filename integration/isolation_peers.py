"""Peers of the isolation tests (integration/test_isolation.py) and of the bench's flood rows.

A standalone script (standard library only), run with this machine's python3 on the host or
inside a namespace guest. Servers print ``READY PORT`` once listening:

- ``hold-server ADDR PORT``: accept connections and keep them; print ``HELD N`` when N are open
  and ``RESETS N`` when N of them have been reset by their peer (or closed).
- ``no-accept ADDR PORT``: listen with a backlog of 1 and never accept: once the queue is full
  the kernel drops the SYNs, so connects to it hang (a host that does not answer).
- ``source ADDR PORT SIZE``: send SIZE bytes on each connection, then close.
- ``udp-no-read ADDR PORT``: a bound UDP socket that is never read (its queue fills, the rest
  is dropped).

Clients (in a guest):

- ``hold ADDR PORT N``: open N connections, print ``HELD N``, keep them until killed.
- ``flood-connect ADDR PORT N``: start N non-blocking connects at once, keep them, print
  ``STARTED N``, then ``DONE {json}`` with how many connected, were refused or still pend after 5 s.
- ``download ADDR PORT``: connect, read until EOF; print ``{"bytes", "seconds"}``.
- ``connects ADDR PORT N``: N connections one after another, each reading a source's first bytes
  (5 s timeout each); print ``{"ok", "errors"}``.
- ``arp-spoof IFACE ADDR COUNT``: send COUNT gratuitous ARP requests and replies claiming ADDR is
  at IFACE's MAC (to the broadcast address).
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import threading
import time


def listener(addr: str, port: int, backlog: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(backlog)
    print(f"READY {s.getsockname()[1]}", flush=True)
    return s


def hold_server(addr: str, port: int) -> None:
    s = listener(addr, port, 4096)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    held = resets = 0
    while True:
        for key, _ in sel.select():
            if key.fileobj is s:
                conn, _ = s.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                held += 1
                print(f"HELD {held}", flush=True)
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                conn.close()
                resets += 1
                print(f"RESETS {resets}", flush=True)


def no_accept(addr: str, port: int) -> None:
    s = listener(addr, port, 1)
    while s.fileno() >= 0:
        time.sleep(3600)


def udp_no_read(addr: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print(f"READY {s.getsockname()[1]}", flush=True)
    while s.fileno() >= 0:
        time.sleep(3600)


def source(addr: str, port: int, size: int) -> None:
    s = listener(addr, port, 128)
    block = b"x" * (1 << 20)

    def send(conn: socket.socket) -> None:
        with conn:
            left = size
            try:
                while left > 0:
                    n = conn.send(block[: min(left, len(block))])
                    left -= n
            except OSError:
                pass

    while True:
        conn, _ = s.accept()
        threading.Thread(target=send, args=(conn,), daemon=True).start()


def hold(addr: str, port: int, count: int) -> None:
    socks = [socket.create_connection((addr, port), timeout=10) for _ in range(count)]
    print(f"HELD {len(socks)}", flush=True)
    while True:
        time.sleep(3600)


def flood_connect(addr: str, port: int, count: int) -> None:
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((addr, port))
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    print(f"STARTED {count}", flush=True)
    connected = refused = 0
    deadline = time.monotonic() + 5.0
    while connected + refused < count and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            sel.unregister(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
            else:
                refused += 1
    done = {"connected": connected, "refused": refused, "pending": count - connected - refused}
    print(f"DONE {json.dumps(done)}", flush=True)
    while True:
        time.sleep(3600)


def download(addr: str, port: int) -> dict[str, object]:
    start = time.monotonic()
    total = 0
    with socket.create_connection((addr, port), timeout=30) as s:
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            total += len(data)
    return {"bytes": total, "seconds": time.monotonic() - start}


def connects(addr: str, port: int, count: int) -> dict[str, object]:
    ok = 0
    errors: list[str] = []
    for _ in range(count):
        try:
            with socket.create_connection((addr, port), timeout=5) as s:
                if s.recv(1):
                    ok += 1
                else:
                    errors.append("eof")
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
    return {"ok": ok, "errors": errors}


def arp_spoof(iface: str, addr: str, count: int) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    mac = s.getsockname()[4]
    spa = socket.inet_aton(addr)
    for _ in range(count):
        for op, tha in ((1, b"\x00" * 6), (2, b"\xff" * 6)):
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, spa, tha, spa)
            s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
        time.sleep(0.05)
    s.close()


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "hold-server":
        hold_server(args[0], int(args[1]))
    elif mode == "no-accept":
        no_accept(args[0], int(args[1]))
    elif mode == "udp-no-read":
        udp_no_read(args[0], int(args[1]))
    elif mode == "source":
        source(args[0], int(args[1]), int(args[2]))
    elif mode == "hold":
        hold(args[0], int(args[1]), int(args[2]))
    elif mode == "flood-connect":
        flood_connect(args[0], int(args[1]), int(args[2]))
    elif mode == "download":
        print(json.dumps(download(args[0], int(args[1]))), flush=True)
    elif mode == "connects":
        print(json.dumps(connects(args[0], int(args[1]), int(args[2]))), flush=True)
    elif mode == "arp-spoof":
        arp_spoof(args[0], args[1], int(args[2]))
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

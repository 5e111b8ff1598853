"""Servers for the port-forwarding tests, run inside a guest namespace (plain python3, stdlib only).

``python3 fwd_peer.py READY_FILE NAME SPEC...`` starts one listener per SPEC on all addresses,
then writes ``READY`` to READY_FILE and serves until killed. SPEC is ``KIND:PORT``:

- ``echo``: TCP; sends back what it receives; at the client's EOF shuts down its side and closes.
- ``sink``: TCP; reads to EOF, then replies ``SHA256HEX COUNT\\n`` and closes (half-close test).
- ``source``: TCP; reads one line ``SIZE\\n``, sends SIZE random bytes, then the 64 hex digits
  of their sha256, and closes.
- ``hello``: TCP; sends ``NAME PEERADDR\\n`` and closes (which guest, seen from where).
- ``reset``: TCP; sends ``partial\\n``, waits for the client's ``ok``, then closes with an RST
  (SO_LINGER 0).
- ``udpecho``: UDP; answers each datagram with ``DATA|PEERADDR:PEERPORT``, except one that starts
  with ``len?``, which gets ``LENGTH|PEERADDR:PEERPORT`` (a large datagram, a small answer).

Each connection has its own thread (hundreds at once are fine); the listen backlog is 1024.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
import threading

CHUNK = 1 << 20


def serve_tcp(listener: socket.socket, handler: object, name: str) -> None:
    assert callable(handler)
    while True:
        conn, peer = listener.accept()
        threading.Thread(target=handler, args=(conn, peer, name), daemon=True).start()


def echo(conn: socket.socket, peer: tuple[str, int], name: str) -> None:
    with conn:
        while data := conn.recv(CHUNK):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def sink(conn: socket.socket, peer: tuple[str, int], name: str) -> None:
    digest = hashlib.sha256()
    count = 0
    with conn:
        while data := conn.recv(CHUNK):
            digest.update(data)
            count += len(data)
        conn.sendall(f"{digest.hexdigest()} {count}\n".encode())


def source(conn: socket.socket, peer: tuple[str, int], name: str) -> None:
    with conn:
        size = int(conn.makefile("rb").readline())
        digest = hashlib.sha256()
        sent = 0
        while sent < size:
            data = os.urandom(min(CHUNK, size - sent))
            digest.update(data)
            conn.sendall(data)
            sent += len(data)
        conn.sendall(digest.hexdigest().encode())


def hello(conn: socket.socket, peer: tuple[str, int], name: str) -> None:
    with conn:
        conn.sendall(f"{name} {peer[0]}\n".encode())


def reset(conn: socket.socket, peer: tuple[str, int], name: str) -> None:
    conn.sendall(b"partial\n")
    conn.recv(2)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def udp_echo(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        answer = str(len(data)).encode() if data.startswith(b"len?") else data
        sock.sendto(answer + f"|{peer[0]}:{peer[1]}".encode(), peer)


HANDLERS = {"echo": echo, "sink": sink, "source": source, "hello": hello, "reset": reset}


def main(argv: list[str]) -> None:
    ready_file, name, specs = argv[0], argv[1], argv[2:]
    threads = []
    for spec in specs:
        kind, port = spec.split(":")
        if kind == "udpecho":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", int(port)))
            threads.append(threading.Thread(target=udp_echo, args=(sock,), daemon=True))
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", int(port)))
            listener.listen(1024)
            threads.append(threading.Thread(target=serve_tcp, args=(listener, HANDLERS[kind], name), daemon=True))
    for thread in threads:
        thread.start()
    with open(ready_file, "w") as ready:
        ready.write("READY\n")
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])

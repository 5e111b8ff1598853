"""Origin servers of integration/test_proxy.py, run in the outside namespace (and a guest-side client).

``python3 proxy_servers.py origin ADDR PORT [CERT KEY]`` serves HTTP/1.1 (HTTPS with CERT and KEY)
on ADDR:PORT (an IPv4 or an IPv6 address) with keep-alive, one thread per connection, and prints
``REQ METHOD PATH HOST`` for every request it gets (so a test sees that a request arrived, and
with which Host):

- ``GET /hello``: ``hello HOST PATH`` (text);
- ``GET /big?size=N``: N bytes of integration/servers.py's pattern (its sha256 is known);
- ``POST /upload`` (Content-Length or chunked body, Expect: 100-continue honoured): JSON with the
  body's length and sha256, and the request headers;
- ``GET /upgrade`` with ``Upgrade: echo``: 101, then every byte is echoed back.

``python3 proxy_servers.py raw HOST PORT HEXDATA|@FILE WAIT`` (in a guest): connects, sends the bytes,
then reads until EOF, a reset or WAIT seconds; prints JSON ``{"reply": ..., "reset": bool,
"eof": bool, "seconds": ...}``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from integration.servers import pattern


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def note(self) -> None:
        print(f"REQ {self.command} {self.path} {self.headers.get('Host', '-')}", flush=True)

    def reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.note()
        url = urlsplit(self.path)
        if url.path == "/hello":
            self.reply(200, f"hello {self.headers.get('Host', '-')} {self.path}\n".encode())
        elif url.path == "/big":
            size = int(parse_qs(url.query)["size"][0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for chunk in pattern(size):
                self.wfile.write(chunk)
        elif url.path == "/upgrade" and self.headers.get("Upgrade", "").lower() == "echo":
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            conn = self.connection
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            self.close_connection = True
        else:
            self.reply(404, b"not found\n")

    def do_POST(self) -> None:
        self.note()
        digest = hashlib.sha256()
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    digest.update(data)
                    total += len(data)
                    left -= len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                digest.update(data)
                total += len(data)
                left -= len(data)
        headers = {name.lower(): value for name, value in self.headers.items()}
        body = json.dumps({"length": total, "sha256": digest.hexdigest(), "headers": headers}).encode()
        self.reply(200, body, "application/json")


def origin(addr: str, port: int, cert: str = "", key: str = "") -> None:
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    server_class = ThreadingHTTPServer
    if ":" in addr:  # an IPv6 origin (test_proxy.py's ipv6 world)

        class Server6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_class = Server6
    server = server_class((addr, port), Handler)
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"READY {port}", flush=True)
    server.serve_forever()


def raw(host: str, port: int, hexdata: str, wait: float) -> None:
    start = time.monotonic()
    reply = b""
    reset = eof = False
    with socket.create_connection((host, port), timeout=wait) as conn:
        if hexdata.startswith("@"):  # the bytes of a file
            with open(hexdata[1:], "rb") as f:
                conn.sendall(f.read())
        elif hexdata:
            conn.sendall(bytes.fromhex(hexdata))
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    eof = True
                    break
                reply += data
        except ConnectionResetError:
            reset = True
        except TimeoutError:
            pass
    print(
        json.dumps(
            {
                "reply": reply.decode("latin-1"),
                "reset": reset,
                "eof": eof,
                "seconds": round(time.monotonic() - start, 2),
            }
        )
    )


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "origin":
        origin(argv[1], int(argv[2]), *argv[3:5])
    elif mode == "raw":
        raw(argv[1], int(argv[2]), argv[3], float(argv[4]))
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Servers the benchmark runs on the host's loopback: HTTP (close after each reply) and a sink
that holds idle connections. Run as `python hostservers.py http PORT` or `... hold PORT`."""

import asyncio
import resource
import sys

import uvloop

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nhello, world\n"


class Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.seen = b""

    def data_received(self, data: bytes) -> None:
        self.seen += data
        if b"\r\n\r\n" in self.seen:
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]
            self.transport.close()


class Hold(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def main(kind: str, port: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    factory = Http if kind == "http" else Hold
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))

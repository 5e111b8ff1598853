"""A tiny Ethernet hub on QEMU's stream protocol, for the harness's own tests.

``python -m integration.l2switch --socket PATH`` listens on a Unix socket like
the backend does; every frame (4-byte big-endian length + Ethernet frame) that
one client sends is forwarded to all other clients. It lets the harness test
its guests and the :class:`~integration.backend.Backend` wrapper without the
backend under development: two guests on one hub see each other as on a LAN.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import struct

log = logging.getLogger("l2switch")


class Hub:
    def __init__(self) -> None:
        self.ports: dict[int, asyncio.StreamWriter] = {}
        self.next_port = 1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = self.next_port
        self.next_port += 1
        self.ports[port] = writer
        log.info("port %d connected", port)
        try:
            while True:
                header = await reader.readexactly(4)
                (length,) = struct.unpack("!I", header)
                frame = await reader.readexactly(length)
                for other, out in list(self.ports.items()):
                    if other != port and not out.is_closing():
                        out.write(header + frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            del self.ports[port]
            writer.close()
            log.info("port %d disconnected", port)


async def serve(path: str) -> None:
    hub = Hub()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(hub.handle, path)
    log.info("listening on %s", path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.info("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="l2switch: %(message)s")
    asyncio.run(serve(args.socket))


if __name__ == "__main__":
    main()

"""Runs inside the guest namespace: open N TCP connections to HOST:PORT, print the time it took,
hold them until stdin closes. `python guest_idle.py HOST PORT N`."""

import resource
import selectors
import socket
import sys
import time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
socks = []
start = time.monotonic()
pending = 0
opened = 0
failed = 0
deadline = start + 120
while (opened + failed < count) and time.monotonic() < deadline:
    while pending < 256 and len(socks) < count:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
        pending += 1
    for key, _ in sel.select(timeout=1.0):
        s = key.fileobj
        sel.unregister(s)
        pending -= 1
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            opened += 1
        else:
            failed += 1
print(f"opened={opened} failed={failed} seconds={time.monotonic() - start:.3f}", flush=True)
sys.stdin.read()

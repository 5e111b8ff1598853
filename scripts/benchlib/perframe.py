"""The core's own cost per frame on the IPv4 TCP data path, without QEMU, sockets or a guest.

For comparing two builds of the core (run it in each one's worktree, several times, alternating):
the Stack of the installed package takes a guest's full-sized data segments (guest->host,
with the ACKs they cause), then host data in 256 KiB writes that it cuts into segments toward
the guest, acknowledged by the guest (host->guest). Prints microseconds per frame, the median of
--runs runs. It complements scripts/bench, whose figures include QEMU and the kernel and vary
by 10-30 % from run to run on this machine.
"""

import argparse
import socket
import statistics
import struct
import time

import dpkt

from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack

GUEST_MAC = bytes.fromhex("525400123456")
GATEWAY_MAC = bytes.fromhex("52550a000202")


def guest_segment(seq: int, ack: int, flags: int, data: bytes = b"", opts: bytes = b"") -> bytes:
    tcp = dpkt.tcp.TCP(
        sport=40000,
        dport=5201,
        seq=seq & 0xFFFFFFFF,
        ack=ack & 0xFFFFFFFF,
        flags=flags,
        win=65535,
        opts=opts,
        data=data,
    )
    tcp.off = (20 + len(opts)) // 4
    pkt = dpkt.ip.IP(src=socket.inet_aton("10.0.2.15"), dst=socket.inet_aton("10.0.2.2"), p=6, ttl=64, data=tcp)
    pkt.len = 20 + len(bytes(tcp))
    return bytes(dpkt.ethernet.Ethernet(dst=GATEWAY_MAC, src=GUEST_MAC, type=0x800, data=bytes(pkt)))


def one_run(mtu: int) -> tuple[float, float]:
    stack = Stack(NetConfig(mtu=mtu))
    stack.attach_port(1)
    mss = struct.pack("!H", mtu - 40)
    stack.frame_received(1, guest_segment(1000, 0, 0x02, opts=b"\x02\x04" + mss + b"\x01\x03\x03\x07"), 0.0)
    flow = stack.out.ops[0].flow
    stack.out.ops.clear()
    stack.tcp.host_connected(flow, 0.0)
    iss = struct.unpack("!I", stack.switch.out[1].pop()[38:42])[0]
    stack.frame_received(1, guest_segment(1001, iss + 1, 0x10), 0.0)
    size = mtu - 40
    payload = bytes(size)
    seq, now, spent, count = 1001, 0.0, 0.0, 0
    for _chunk in range(40 if mtu <= 9000 else 4):
        frames = [guest_segment(seq + i * size, iss + 1, 0x10, payload) for i in range(500)]
        seq += 500 * size
        start = time.perf_counter()
        for i, frame in enumerate(frames):
            now += 1e-5
            stack.frame_received(1, frame, now)
            if i % 8 == 7:  # a batch of frames per event loop turn, as the shell reads them
                stack.flush(now)
                stack.timer(now)
                stack.next_deadline()
                stack.out.ops.clear()
                stack.switch.out[1].clear()
        spent += time.perf_counter() - start
        count += len(frames)
    to_host = spent / count * 1e6
    snd, spent, count = iss + 1, 0.0, 0
    for _write in range(400):
        data = bytes(256 << 10)
        start = time.perf_counter()
        stack.tcp.host_data(flow, data, now)
        stack.flush(now)
        spent += time.perf_counter() - start
        count += len(stack.switch.out[1])
        stack.switch.out[1].clear()
        stack.out.ops.clear()
        snd += len(data)
        ack = guest_segment(seq, snd, 0x10)
        start = time.perf_counter()
        stack.frame_received(1, ack, now)
        stack.flush(now)
        spent += time.perf_counter() - start
        stack.switch.out[1].clear()
        stack.out.ops.clear()
        now += 1e-3
    return to_host, spent / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mtu", default="1500,65520")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| MTU | guest->host us/frame | host->guest us/frame |")
    print("|---|---|---|")
    for mtu in (int(m) for m in args.mtu.split(",")):
        runs = [one_run(mtu) for _ in range(args.runs)]
        to_host = statistics.median(r[0] for r in runs)
        to_guest = statistics.median(r[1] for r in runs)
        print(f"| {mtu} | {to_host:.2f} | {to_guest:.2f} |")


if __name__ == "__main__":
    main()

"""QEMU's stream framing: a 4-byte big-endian length, then the Ethernet frame."""

from typing import Final

try:  # the C loop (core/_fastpath.c): one copy per frame instead of two; optional
    from qemu_vpnnet.core._fastpath import split_frames as c_split_frames

    HAVE_C: Final = True
except ImportError:
    HAVE_C = False  # type: ignore[misc]

MAX_FRAME: Final = 65536 + 4096  # QEMU reads at most NET_BUFSIZE (4096 + 65536) bytes a frame
MIN_FRAME: Final = 14


class FramingError(Exception):
    """The byte stream from QEMU cannot be split into frames any more."""


def split_frames(buf: bytearray | memoryview, start: int, end: int, frames: list[bytes]) -> int:
    """Append every whole frame in buf[start:end] to frames; return where the remainder starts.

    Raises FramingError for a length prefix outside 1..MAX_FRAME (the stream is out of sync).
    Frames shorter than an Ethernet header are still returned: the core counts them.
    """
    if HAVE_C:
        pos = c_split_frames(buf, start, end, frames, MAX_FRAME)
        if pos < 0:
            pos = -1 - pos
            length = int.from_bytes(buf[pos : pos + 4], "big")
            raise FramingError(f"bad frame length prefix {length} (stream out of sync)")
        return pos
    return split_frames_loop(buf, start, end, frames)


def split_frames_loop(buf: bytearray | memoryview, start: int, end: int, frames: list[bytes]) -> int:
    """split_frames in Python: the fallback without the C helper, and what tests compare it with."""
    pos = start
    while end - pos >= 4:
        length = (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]
        if length == 0 or length > MAX_FRAME:
            raise FramingError(f"bad frame length prefix {length} (stream out of sync)")
        if end - pos - 4 < length:
            break
        frames.append(bytes(buf[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return pos


def frame_parts(frames: list[bytes]) -> list[bytes]:
    """Length prefixes and frames, interleaved, for a scatter write."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(len(frame).to_bytes(4, "big"))
        parts.append(frame)
    return parts

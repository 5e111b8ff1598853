def sum16(data: bytes | bytearray | memoryview, start: int = 0, /) -> int: ...
def tcp_segments(
    frames: list[bytes],
    header: bytes,
    buf: bytes | bytearray | memoryview,
    off: int,
    end: int,
    psh_end: int,
    mss: int,
    seq: int,
    ack: int,
    window: int,
    ident: int,
    ip_base: int,
    tcp_base: int,
    checksum: bool = True,
    /,
) -> int: ...
def fence() -> None: ...
def split_frames(
    buf: bytes | bytearray | memoryview, start: int, end: int, frames: list[bytes], max_frame: int, /
) -> int: ...

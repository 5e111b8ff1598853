from collections.abc import Sequence
from typing import Protocol

class Datagram(Protocol):
    data: bytes
    addr: str
    port: int

def send_datagrams(
    fd: int, family: int, ops: Sequence[Datagram], start: int, gso_max: int = 0, /
) -> tuple[int, int, int]: ...

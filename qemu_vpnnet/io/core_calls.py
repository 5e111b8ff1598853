"""What the host-side sockets tell the core: the calls of io/host_tcp.py, host_udp.py and
host_ping.py into core/tcp.py, udp.py and icmp.py, as protocols.

The host-side classes hold their engine under one of these types rather than the engine's own
class. Compiled with mypyc, a protocol is a plain Python object at run time: the engine's methods
are called as any Python method, and a test may put a recorder of those calls in the engine's
place (tests/test_host_sockets.py) while the shell, its loop and its performers stay real.
"""

from collections.abc import Mapping
from typing import Protocol


class TcpCalls(Protocol):
    """core/tcp.py TcpEngine, as io/host_tcp.py (and the proxy and DNS sessions) use it."""

    @property
    def flows(self) -> Mapping[int, object]: ...

    def host_connected(self, flow: int, now: float) -> None: ...

    def host_refused(self, flow: int, err: int, now: float) -> None: ...

    def host_data(self, flow: int, data: bytes | memoryview, now: float) -> None: ...

    def host_read_buffer(self, flow: int) -> memoryview | None: ...

    def host_data_read(self, flow: int, nbytes: int, now: float) -> None: ...

    def host_eof(self, flow: int, now: float) -> None: ...

    def host_reset(self, flow: int, now: float) -> None: ...

    def host_write_paused(self, flow: int) -> None: ...

    def host_write_resumed(self, flow: int) -> None: ...


class UdpCalls(Protocol):
    """core/udp.py UdpNat, as io/host_udp.py uses it."""

    def host_datagram(self, flow_id: int, data: bytes, addr: str, port: int, now: float) -> None: ...

    def host_error(
        self, flow_id: int, addr: str, port: int, icmp_type: int, code: int, info: int, now: float
    ) -> None: ...

    def host_refused(self, flow_id: int, now: float) -> None: ...

    def host_failed(self, flow_id: int, now: float) -> None: ...


class IcmpCalls(Protocol):
    """core/icmp.py IcmpProxy, as io/host_ping.py uses it."""

    def host_reply(self, flow_id: int, data: bytes, addr: str, now: float) -> None: ...

    def host_error(
        self, flow_id: int, addr: str, icmp_type: int, code: int, info: int, original: bytes, now: float
    ) -> None: ...

    def host_failed(self, flow_id: int, now: float) -> None: ...

    def unavailable(self, now: float) -> None: ...

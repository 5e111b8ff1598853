"""Types of the fixture factories in integration/conftest.py, for annotations::

from integration.fixtures import StartBackend, VmGuestFactory

def test_x(start_backend: StartBackend, vm_guest: VmGuestFactory) -> None: ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from .backend import Backend
from .nsguest import NsGuest
from .nshost import NsHost
from .vmguest import DEFAULT_MAC, VmGuest

__all__ = ["BOTH_TRANSPORTS", "DEFAULT_MAC", "NsGuestFactory", "NsHostFactory", "StartBackend", "VmGuestFactory"]


#: Run a VM test once over the stream socket and once over vhost-user (the ``vm_transport``
#: fixture: its backends also serve --vhost-user, and ``vm_guest(backend=...)`` uses it).
BOTH_TRANSPORTS = pytest.mark.parametrize("vm_transport", ["stream", "vhost-user"], indirect=True)


class StartBackend(Protocol):
    def __call__(
        self,
        *args: str,
        netns: str | None = None,
        socket_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        module: str = "qemu_vpnnet",
        dns_guard: bool = True,
    ) -> Backend: ...


class VmGuestFactory(Protocol):
    def __call__(
        self,
        script: str | None = None,
        *,
        backend: Backend | None = None,
        socket_path: Path | str | None = None,
        netdev: str | None = None,
        mac: str = DEFAULT_MAC,
        dhcp: str = "bg",
        append: str = "",
        qemu_args: Sequence[str] = (),
        qmp: bool = False,
        memory_mb: int = 256,
        env: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> VmGuest: ...


class NsGuestFactory(Protocol):
    def __call__(
        self,
        *,
        backend: Backend | None = None,
        socket_path: Path | str | None = None,
        netdev: str | None = None,
        mtu: int = 1500,
        mac: str | None = None,
        ipv6: bool = True,
        qemu_args: Sequence[str] = (),
        qemu_env: Mapping[str, str] | None = None,
    ) -> NsGuest: ...


class NsHostFactory(Protocol):
    def __call__(
        self,
        *,
        host_addr: str = "198.18.0.1/24",
        outside_addr: str = "198.18.0.2/24",
        host_addr6: str | None = "2001:2::1/64",
        outside_addr6: str | None = "2001:2::2/64",
        default_route: bool = True,
        resolv_conf: str | None = None,
        hosts: str | None = None,
        mtu: int = 1500,
    ) -> NsHost: ...

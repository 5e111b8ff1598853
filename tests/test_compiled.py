"""The installed package's core is compiled by mypyc (checked when VPNNET_EXPECT_COMPILED=1)."""

import importlib
import os
import pkgutil

import pytest

import qemu_vpnnet.core


def core_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(qemu_vpnnet.core.__path__) if m.name != "__init__"]


@pytest.mark.skipif(os.environ.get("VPNNET_EXPECT_COMPILED") != "1", reason="checking the uncompiled sources")
def test_core_modules_are_compiled_extensions() -> None:
    modules = core_modules()
    assert "tcp" in modules and "checksum" in modules
    for name in modules:
        module = importlib.import_module(f"qemu_vpnnet.core.{name}")
        assert module.__file__ is not None and module.__file__.endswith(".so"), (
            f"{name} is not compiled: {module.__file__}"
        )
    from qemu_vpnnet.core import checksum

    assert checksum.COMPILED


#: the shell's modules on the per-frame path and the host sockets', compiled too (setup.py)
SHELL_PER_FRAME = ("framing", "shell", "qemu_ports", "vhost_user_port", "host_tcp", "host_udp", "host_ping")


@pytest.mark.skipif(os.environ.get("VPNNET_EXPECT_COMPILED") != "1", reason="checking the uncompiled sources")
def test_the_shells_per_frame_modules_are_compiled_extensions() -> None:
    for name in SHELL_PER_FRAME:
        module = importlib.import_module(f"qemu_vpnnet.io.{name}")
        assert module.__file__ is not None and module.__file__.endswith(".so"), (
            f"io.{name} is not compiled: {module.__file__}"
        )


def test_checksum_implementation_matches_build() -> None:
    from qemu_vpnnet.core import checksum

    assert checksum.COMPILED == (checksum.__file__ or "").endswith(".so")


#: the optional C helpers (setup.py): a build that failed one quietly would run the slower fallback
C_HELPERS = ("core._fastpath", "core._vring", "io._batch_send", "io._tcp_state")


@pytest.mark.skipif(os.environ.get("VPNNET_EXPECT_COMPILED") != "1", reason="checking the uncompiled sources")
def test_the_optional_c_helpers_were_built() -> None:
    for name in C_HELPERS:
        importlib.import_module(f"qemu_vpnnet.{name}")
    from qemu_vpnnet.io import host_tcp, host_udp

    assert host_tcp.HAVE_TCP_STATE and host_udp.HAVE_BATCH_SEND

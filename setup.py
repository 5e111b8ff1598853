"""Build qemu-vpnnet; the sans-IO core is compiled with mypyc when it is available.

Set QEMU_VPNNET_PURE=1 to install the plain Python sources only.
"""

import glob
import os

from setuptools import Extension, find_packages, setup

ext_modules = []
SEGMENT_H = "qemu_vpnnet/core/_tcp_segment.h"  # the TCP header filling both C files share
if os.environ.get("QEMU_VPNNET_PURE") != "1":
    # checksums and TCP segments in C: optional, the core falls back to its Python without it
    ext_modules.append(
        Extension("qemu_vpnnet.core._fastpath", ["qemu_vpnnet/core/_fastpath.c"], depends=[SEGMENT_H], optional=True)
    )
    # one frame into a vhost-user guest's RX ring: optional, the core's Python does it without
    ext_modules.append(
        Extension("qemu_vpnnet.core._vring", ["qemu_vpnnet/core/_vring.c"], depends=[SEGMENT_H], optional=True)
    )
    # a host UDP socket's datagrams of one turn in one sendmmsg: optional, sendto() each without it
    ext_modules.append(Extension("qemu_vpnnet.io._batch_send", ["qemu_vpnnet/io/_batch_send.c"], optional=True))
    # whether a host stream socket has only its peer's FIN left to read: optional, a socket object asks without
    ext_modules.append(Extension("qemu_vpnnet.io._tcp_state", ["qemu_vpnnet/io/_tcp_state.c"], optional=True))
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("qemu-vpnnet: mypyc not available, installing the uncompiled core")
    else:
        core = sorted(p for p in glob.glob("qemu_vpnnet/core/*.py") if not p.endswith("__init__.py"))
        # the shell's modules every frame crosses, and the host sockets' (tests/test_compiled.py
        # lists them too)
        shell = ("framing", "shell", "qemu_ports", "vhost_user_port", "host_tcp", "host_udp", "host_ping")
        core += [f"qemu_vpnnet/io/{m}.py" for m in shell]
        ext_modules += mypycify(["--ignore-missing-imports", *core], opt_level="3")

setup(
    name="qemu-vpnnet",
    version="0.1.0",
    description="User-mode network backend for QEMU: guest traffic leaves as ordinary host sockets",
    long_description=open("README.rst", encoding="utf-8").read() if os.path.exists("README.rst") else "",
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["qemu_vpnnet", "qemu_vpnnet.*"]),
    install_requires=[
        "qemu.qmp>=0.0.3",
        "pyroute2>=0.7",
        "dpkt>=1.9.8",
        "uvloop>=0.19",
        "mypy-extensions>=1.0",
        "h11>=0.14",  # HTTP/1.1 parsing of the proxy (io/http_proxy.py)
        "pyseccomp>=0.1.2",  # ctypes bindings over Debian's libseccomp2: the --sandbox filter (sandbox.py)
    ],
    extras_require={"test": ["pytest>=7", "mypy>=1.8", "ruff>=0.4", "hypothesis>=6"]},
    ext_modules=ext_modules,
    entry_points={"console_scripts": ["qemu-vpnnet = qemu_vpnnet.cli:main"]},
    zip_safe=False,
)

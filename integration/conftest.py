"""Fixtures of the qemu-vpnnet integration tests (real QEMU, namespaces).

Factories (each call starts one more; all are stopped at the test's teardown,
whether it passed or not):

- ``start_backend(*args, netns=None, socket_path=None, env=None, timeout=10.0,
  module="qemu_vpnnet", dns_guard=True) -> Backend`` (see its DNS guard)
- ``vm_guest(script=None, *, backend=None, socket_path=None, netdev=None,
  mac=..., dhcp="bg", append="", qemu_args=(), qmp=False, memory_mb=256,
  env=None, start=True) -> VmGuest``
- ``ns_guest(*, backend=None, socket_path=None, netdev=None, mtu=1500,
  mac=None, ipv6=True, qemu_args=(), qemu_env=None) -> NsGuest``
- ``ns_host(*, host_addr=..., outside_addr=..., ..., resolv_conf=None, hosts=None) -> NsHost``

Plus ``vm_image`` (session: builds vm-images/build/ once if needed) and
``vpnnet_run_dir`` (session: a short /tmp folder for Unix sockets, whose paths
are limited to 108 bytes). Logs go to the test's ``tmp_path`` and are attached
to the report of a failing test.

Markers, added automatically from the fixtures a test uses: ``vm`` (boots a
TCG VM, seconds), ``netns`` (creates namespaces), ``root`` and ``qemu``. Tests
whose needs are missing are skipped — or fail, with ``--vpnnet-strict`` or when
``CI`` or ``VPNNET_TEST_STRICT`` is set (the suite runs as root in CI).
Options: ``--vpnnet-accel=tcg|kvm`` (default ``$VPNNET_TEST_ACCEL`` or tcg),
``--vpnnet-skip-vm``.

Harness objects are named ``vpnt-PID-...`` (namespaces) and ``vpntPID...``
(links); at session start and end a sweep removes those of dead test processes
and of this one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from .backend import Backend, dns_guarded, sandboxed
from .fixtures import NsGuestFactory, NsHostFactory, StartBackend, VmGuestFactory
from .netns import sweep
from .nsguest import NsGuest
from .nshost import NsHost
from .vmguest import DEFAULT_MAC, GuestError, VmGuest, VmImage, ensure_vm_image

HERE = Path(__file__).resolve().parent

MARKERS = {
    "vm": "boots the tiny QEMU guest (TCG: seconds per boot)",
    "netns": "creates network namespaces (needs root)",
    "root": "needs root",
    "qemu": "needs qemu-system-x86_64",
}
FIXTURE_MARKERS = {
    "vm_guest": ("vm", "qemu"),
    "vm_image": ("vm",),
    "ns_guest": ("netns", "root", "qemu"),
    "ns_host": ("netns", "root"),
}

LogSources = list[tuple[str, Callable[[], str]]]
LOG_SOURCES = pytest.StashKey[LogSources]()
_serial = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vpnnet", "qemu-vpnnet integration tests")
    group.addoption(
        "--vpnnet-accel", default=None, help="QEMU accelerator for VM guests (default: $VPNNET_TEST_ACCEL or tcg)"
    )
    group.addoption("--vpnnet-skip-vm", action="store_true", help="skip the tests that boot a VM")
    group.addoption(
        "--vpnnet-strict",
        action="store_true",
        help="fail instead of skipping when root or QEMU is missing (also when CI or VPNNET_TEST_STRICT is set)",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    accel = config.getoption("--vpnnet-accel", default=None)
    if accel:
        os.environ["VPNNET_TEST_ACCEL"] = accel


def _strict(config: pytest.Config) -> bool:
    return bool(
        config.getoption("--vpnnet-strict", default=False)
        or os.environ.get("CI")
        or os.environ.get("VPNNET_TEST_STRICT")
    )


def _missing(marker: str) -> str | None:
    if marker in ("root", "netns") and os.geteuid() != 0:
        return "needs root"
    if marker == "qemu" and shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86_64"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    strict = _strict(config)
    skip_vm = config.getoption("--vpnnet-skip-vm", default=False)
    for item in items:
        if HERE not in item.path.parents:
            continue
        for fixture, names in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for name in names:
                    item.add_marker(name)
        marks = {m.name for m in item.iter_markers()}
        if skip_vm and "vm" in marks:
            item.add_marker(pytest.mark.skip(reason="--vpnnet-skip-vm"))
            continue
        if not strict:
            for name in sorted(marks & MARKERS.keys()):
                reason = _missing(name)
                if reason:
                    item.add_marker(pytest.mark.skip(reason=reason))
                    break


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of a failing test's guests and backends to its report."""
    report = yield
    if report.failed:
        for title, source in item.stash.get(LOG_SOURCES, []):
            try:
                text = source()
            except Exception as e:
                text = f"<unreadable: {e}>"
            lines = text.splitlines()
            if len(lines) > 200:
                text = "\n".join(["[...]", *lines[-200:]])
            report.sections.append((f"{title} ({report.when})", text))
    return report


def _close_all(closers: list[Callable[[], object]]) -> None:
    """Call every closer, even when one raises; then raise the first error."""
    first: BaseException | None = None
    for close in reversed(closers):
        try:
            close()
        except BaseException as e:
            first = first or e
    if first is not None:
        raise first


def _add_log(request: pytest.FixtureRequest, title: str, source: Callable[[], str]) -> None:
    request.node.stash.setdefault(LOG_SOURCES, []).append((title, source))


# --- session ----------------------------------------------------------------


def _sweep(include_own: bool) -> None:
    if os.geteuid() == 0:
        sweep(include_own=include_own)


@pytest.fixture(scope="session", autouse=True)
def vpnnet_sweep() -> Iterator[None]:
    """Remove harness leftovers of dead test sessions before, and of this one
    after, the integration tests."""
    _sweep(include_own=False)
    yield
    _sweep(include_own=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _sweep(include_own=True)


@pytest.fixture(autouse=True)
def vpnnet_sandbox_tmp(request: pytest.FixtureRequest) -> None:
    """Under VPNNET_TEST_SANDBOX the backends run as nobody: the test's tmp_path (where tests put
    zone, policy and state files) is made sticky and world-writable, and its parents (pytest
    makes them 0700) traversable, as docs/security.rst asks of a deployment."""
    if not sandboxed() or "tmp_path" not in request.fixturenames:
        return
    path: Path = request.getfixturevalue("tmp_path")
    path.chmod(0o1777)
    for parent in path.parents:
        if parent == Path("/tmp") or parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode & 0o7777 | 0o111)


@pytest.fixture(scope="session")
def vpnnet_run_dir() -> Iterator[Path]:
    """A short-named folder for Unix sockets (at most 108 bytes a path)."""
    path = Path(tempfile.mkdtemp(prefix=f"vpnt-{os.getpid()}-", dir="/tmp"))
    # sticky and world-writable under VPNNET_TEST_SANDBOX: a backend that dropped to nobody
    # must remove its own sockets at exit
    path.chmod(0o1777 if sandboxed() else 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vm_image(request: pytest.FixtureRequest) -> VmImage:
    """The tiny guest, built by vm-images/build.sh once per session if needed."""
    try:
        return ensure_vm_image()
    except GuestError as e:
        if _strict(request.config):
            raise
        pytest.skip(f"cannot build the VM image: {e}")


# --- backend ----------------------------------------------------------------


@pytest.fixture
def vm_transport(request: pytest.FixtureRequest) -> str:
    """How ``vm_guest`` attaches a VM to a backend: ``stream`` (the default) or ``vhost-user``;
    tests run over both with ``@BOTH_TRANSPORTS`` (integration/fixtures.py). With vhost-user
    every qemu_vpnnet backend the test starts also serves ``--vhost-user`` next to its socket."""
    transport = str(getattr(request, "param", "stream"))
    if transport not in ("stream", "vhost-user"):
        raise ValueError(f"unknown VM transport {transport!r}")
    return transport


@pytest.fixture
def start_backend(
    request: pytest.FixtureRequest, tmp_path: Path, vpnnet_run_dir: Path, vm_transport: str
) -> Iterator[StartBackend]:
    """Factory: start ``python -m qemu_vpnnet --socket PATH *args``; returns
    once the socket exists. Every backend is stopped at teardown.

    DNS guard: the machine's own resolver (its /etc/resolv.conf, and getaddrinfo
    in --dns-mode host) must never get test traffic, so a backend started in the
    root namespace gets ``--dns-mode forward`` and, without a plain
    ``--dns-upstream IP``, ``--dns-upstream 127.0.0.1:9`` (nothing answers);
    ``--dns-mode host`` there is refused (integration/backend.py dns_guarded).
    Run it in an :class:`NsHost` namespace (``hosts=`` and ``resolv_conf=``
    written by the test), or pass ``--dns-upstream`` to a DNS server the test
    runs, to test DNS; ``dns_guard=False`` turns this off."""
    backends: list[Backend] = []

    def start(
        *args: str,
        netns: str | None = None,
        socket_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        module: str = "qemu_vpnnet",
        dns_guard: bool = True,
    ) -> Backend:
        if dns_guard:
            args = dns_guarded(args, netns=netns, module=module)
        n = next(_serial)
        path = Path(socket_path) if socket_path is not None else vpnnet_run_dir / f"b{n}.sock"
        if vm_transport == "vhost-user" and module == "qemu_vpnnet" and "--vhost-user" not in args:
            args = (*args, "--vhost-user", str(path.with_name(path.stem + ".vu")))
        backend = Backend(
            *args, socket_path=path, log_path=tmp_path / f"backend{n}.log", netns=netns, env=env, module=module
        )
        backends.append(backend)
        _add_log(request, f"backend {n} log", backend.log_text)
        return backend.start(timeout)

    yield start
    _close_all([b.stop for b in backends])


# --- guests -----------------------------------------------------------------


def _socket_of(backend: Backend | None, socket_path: Path | str | None) -> Path | str | None:
    if backend is not None:
        if socket_path is not None:
            raise ValueError("give backend or socket_path, not both")
        return backend.socket_path
    return socket_path


@pytest.fixture
def vm_guest(
    request: pytest.FixtureRequest, tmp_path: Path, vpnnet_run_dir: Path, vm_image: VmImage, vm_transport: str
) -> Iterator[VmGuestFactory]:
    """Factory: boot the tiny VM (started unless ``start=False``). Killed at
    teardown. With a ``backend``, the VM's NIC uses the test's ``vm_transport``."""
    guests: list[VmGuest] = []

    def make(
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
    ) -> VmGuest:
        n = next(_serial)
        vhost_user_path = None
        if backend is not None and vm_transport == "vhost-user":
            vhost_user_path = backend.vhost_user_path
            if vhost_user_path is None:
                raise ValueError("this backend serves no --vhost-user socket")
            backend = None
        guest = VmGuest(
            script,
            socket_path=_socket_of(backend, socket_path),
            netdev=netdev,
            vhost_user_path=vhost_user_path,
            mac=mac,
            image=vm_image,
            dhcp=dhcp,
            append=append,
            qemu_args=qemu_args,
            qmp=qmp,
            memory_mb=memory_mb,
            env=env,
            log_path=tmp_path / f"vm{n}.console.log",
            run_dir=vpnnet_run_dir,
        )
        guests.append(guest)
        _add_log(request, f"vm {n} console", guest.console_text)
        _add_log(request, f"vm {n} qemu stderr", guest.stderr_text)
        return guest.start() if start else guest

    yield make
    _close_all([g.kill for g in guests])


@pytest.fixture
def ns_guest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NsGuestFactory]:
    """Factory: a namespace guest bridged by QEMU's hub to a backend socket or
    to any netdev (``netdev="user"``: libslirp). Deleted at teardown."""
    guests: list[NsGuest] = []

    def make(
        *,
        backend: Backend | None = None,
        socket_path: Path | str | None = None,
        netdev: str | None = None,
        mtu: int = 1500,
        mac: str | None = None,
        ipv6: bool = True,
        qemu_args: Sequence[str] = (),
        qemu_env: Mapping[str, str] | None = None,
    ) -> NsGuest:
        n = next(_serial)
        guest = NsGuest(
            socket_path=_socket_of(backend, socket_path),
            netdev=netdev,
            mtu=mtu,
            mac=mac,
            ipv6=ipv6,
            qemu_args=qemu_args,
            qemu_env=qemu_env,
            log_path=tmp_path / f"nsguest{n}.qemu.log",
        )
        guests.append(guest)
        _add_log(request, f"ns guest {n} ({guest.name}) qemu log", guest.qemu_log_text)
        return guest.start()

    yield make
    _close_all([g.close for g in guests])


@pytest.fixture
def ns_host() -> Iterator[NsHostFactory]:
    """Factory: a host namespace with a veth to an outside namespace."""
    made: list[NsHost] = []

    def make(
        *,
        host_addr: str = "198.18.0.1/24",
        outside_addr: str = "198.18.0.2/24",
        host_addr6: str | None = "2001:2::1/64",
        outside_addr6: str | None = "2001:2::2/64",
        default_route: bool = True,
        resolv_conf: str | None = None,
        hosts: str | None = None,
        mtu: int = 1500,
    ) -> NsHost:
        host = NsHost(
            host_addr=host_addr,
            outside_addr=outside_addr,
            host_addr6=host_addr6,
            outside_addr6=outside_addr6,
            default_route=default_route,
            resolv_conf=resolv_conf,
            hosts=hosts,
            mtu=mtu,
        )
        made.append(host)
        return host.start()

    yield make
    _close_all([h.close for h in made])

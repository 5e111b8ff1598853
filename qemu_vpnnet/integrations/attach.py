"""`qemu-vpnnet attach` and `qemu-vpnnet detach`: hot-plug a NIC on the backend into a running QEMU.

attach, over the QEMU's own QMP monitor (qemu.qmp's QMPClient):
  1. checks that the backend socket is listening (QEMU 7.2 only tries to connect once);
  2. checks `query-version` >= 7.2 (the `stream` netdev appeared in QEMU 7.2);
  3. `netdev_add {"type": "stream", "id": ID, "server": false, "addr": {"type": "unix", "path": SOCK}}`
     and waits for QEMU's NETDEV_STREAM_CONNECTED event;
  4. `device_add {"driver": "virtio-net-pci", "netdev": ID, "id": ID-nic, "mac": MAC}`; when it
     fails the netdev is removed again.
detach: `device_del ID-nic`, waits for DEVICE_DELETED (the guest must release the device), then
`netdev_del ID`.

Errors (QEMU's own, e.g. a duplicate id or no free PCI slot) are printed as one line and exit 1.
"""

import argparse
import asyncio
import logging
import os
import random
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from qemu_vpnnet.integrations.procutil import IntegrationError, check_unix_listener

log = logging.getLogger("qemu_vpnnet.attach")

MIN_QEMU = (7, 2)
DEFAULT_ID = "vpnnet0"
NIC_SUFFIX = "-nic"
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")

QmpAddress = str | tuple[str, int]


def parse_qmp_address(text: str) -> QmpAddress:
    """`unix:PATH` (or a bare path) to PATH, `tcp:HOST:PORT` to (HOST, PORT)."""
    if text.startswith("tcp:"):
        host, sep, port = text[4:].rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
            raise IntegrationError(f"expected tcp:HOST:PORT, got {text!r}")
        return (host.strip("[]") or "127.0.0.1", int(port))
    if text.startswith("unix:"):
        text = text[5:]
        # QEMU's own syntax allows options after the path (unix:PATH,server=on): drop them.
        text = text.split(",", 1)[0]
    if not text:
        raise IntegrationError("expected unix:PATH or tcp:HOST:PORT")
    return text


def describe(address: QmpAddress) -> str:
    return f"tcp:{address[0]}:{address[1]}" if isinstance(address, tuple) else f"unix:{address}"


def random_mac() -> str:
    """A random MAC in QEMU's 52:54:00 range."""
    rest = [random.randrange(256) for _ in range(3)]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in rest)


def check_id(text: str) -> str:
    if not _ID_RE.match(text):
        raise argparse.ArgumentTypeError(f"bad id {text!r}: a letter, then letters, digits, '.', '_' or '-'")
    return text


def check_mac(text: str) -> str:
    if not _MAC_RE.match(text):
        raise argparse.ArgumentTypeError(f"bad MAC address {text!r} (expected 52:54:00:xx:xx:xx)")
    if int(text[:2], 16) & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address")
    return text.lower()


def qemu_version(reply: object) -> tuple[int, int, int]:
    """(major, minor, micro) from a `query-version` reply."""
    if isinstance(reply, dict):
        q = reply.get("qemu")
        if isinstance(q, dict):
            try:
                return int(q["major"]), int(q["minor"]), int(q["micro"])
            except (KeyError, TypeError, ValueError):
                pass
    raise IntegrationError(f"unexpected query-version reply: {reply!r}")


def check_version(version: tuple[int, int, int]) -> None:
    if version[:2] < MIN_QEMU:
        raise IntegrationError(
            f"QEMU {'.'.join(map(str, version))} is too old: the stream netdev needs QEMU "
            f"{MIN_QEMU[0]}.{MIN_QEMU[1]} or newer (use `qemu-vpnnet --listen-tcp` with "
            "-netdev socket,connect=HOST:PORT instead)"
        )


class Monitor:
    """A connected QMPClient with one-line error reporting."""

    def __init__(self, address: QmpAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.client = QMPClient("qemu-vpnnet")

    async def __aenter__(self) -> "Monitor":
        try:
            await asyncio.wait_for(self.client.connect(self.address), self.timeout)
        except TimeoutError:
            raise IntegrationError(
                f"QEMU monitor {describe(self.address)}: no QMP greeting within "
                f"{self.timeout:g} s (is it -qmp, not -monitor? is another QMP client connected?)"
            ) from None
        except QMPError as exc:
            cause = exc.__cause__ or exc
            text = getattr(cause, "strerror", None) or str(cause)
            raise IntegrationError(f"cannot connect to the QEMU monitor {describe(self.address)}: {text}") from None
        except OSError as exc:
            raise IntegrationError(
                f"cannot connect to the QEMU monitor {describe(self.address)}: {exc.strerror or exc}"
            ) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.client.disconnect()
        except Exception:
            pass

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> object:
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), self.timeout)
        except ExecuteError as exc:
            raise IntegrationError(f"{command}: {exc}") from None
        except TimeoutError:
            raise IntegrationError(f"{command}: no reply from QEMU within {self.timeout:g} s") from None
        except QMPError as exc:
            raise IntegrationError(f"{command}: {exc}") from None

    @contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        listener = EventListener(names)
        with self.client.listen(listener):
            yield listener


async def wait_event(
    listener: EventListener, key: str, value: str, timeout: float, client: QMPClient | None = None
) -> dict[str, Any] | None:
    """The first event on `listener` whose data[key] == value, or None after `timeout` seconds.

    IntegrationError when `client` loses its connection meanwhile (QEMU exited)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        if client is not None and client.runstate != Runstate.RUNNING:
            raise IntegrationError("QEMU closed the monitor connection (did it exit?)")
        try:
            event = await asyncio.wait_for(listener.get(), min(remaining, 0.25))
        except TimeoutError:
            continue
        data = event.get("data") or {}
        if isinstance(data, dict) and data.get(key) == value:
            return {"event": event["event"], **data}


async def netdev_connection_info(monitor: Monitor, netdev_id: str) -> str:
    """What `info network` says about the netdev (e.g. "unix:/path" or "connection error")."""
    try:
        text = await monitor.execute("human-monitor-command", {"command-line": "info network"})
    except IntegrationError:
        return ""
    for line in str(text).splitlines():
        line = line.strip(" \\\r")
        if line.startswith(f"{netdev_id}:"):
            return line.split(",")[-1]
    return ""


async def attach(
    address: QmpAddress,
    socket_path: str,
    netdev_id: str = DEFAULT_ID,
    mac: str | None = None,
    driver: str = "virtio-net-pci",
    extra: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> dict[str, str]:
    """Hot-plug a NIC whose netdev is a client of the backend at `socket_path`; returns what was added."""
    socket_path = os.path.abspath(socket_path)
    check_unix_listener(socket_path)
    mac = mac or random_mac()
    nic_id = netdev_id + NIC_SUFFIX
    async with Monitor(address, timeout) as monitor:
        check_version(qemu_version(await monitor.execute("query-version")))
        with monitor.listen("NETDEV_STREAM_CONNECTED", "NETDEV_STREAM_DISCONNECTED") as events:
            await monitor.execute(
                "netdev_add",
                {"type": "stream", "id": netdev_id, "server": False, "addr": {"type": "unix", "path": socket_path}},
            )
            connected = await wait_event(events, "netdev-id", netdev_id, min(timeout, 5.0), monitor.client)
        if connected is None or connected["event"] != "NETDEV_STREAM_CONNECTED":
            info = await netdev_connection_info(monitor, netdev_id)
            await rollback_netdev(monitor, netdev_id)
            raise IntegrationError(
                f"QEMU could not connect to {socket_path} ({info or 'no NETDEV_STREAM_CONNECTED event'}); "
                "is the socket reachable by the user QEMU runs as?"
            )
        device: dict[str, Any] = {"driver": driver, "netdev": netdev_id, "id": nic_id, "mac": mac}
        device.update(extra or {})
        try:
            await monitor.execute("device_add", device)
        except IntegrationError:
            await rollback_netdev(monitor, netdev_id)
            raise
    return {"netdev": netdev_id, "device": nic_id, "mac": mac, "socket": socket_path}


async def rollback_netdev(monitor: Monitor, netdev_id: str) -> None:
    try:
        await monitor.execute("netdev_del", {"id": netdev_id})
    except IntegrationError as exc:
        log.warning("rolling back: %s", exc)


async def detach(address: QmpAddress, netdev_id: str = DEFAULT_ID, timeout: float = 10.0) -> list[str]:
    """Unplug the NIC and remove its netdev; returns what was removed."""
    nic_id = netdev_id + NIC_SUFFIX
    removed: list[str] = []
    async with Monitor(address, timeout) as monitor:
        device_error: IntegrationError | None = None
        with monitor.listen("DEVICE_DELETED") as events:
            try:
                await monitor.execute("device_del", {"id": nic_id})
            except IntegrationError as exc:
                device_error = exc
            else:
                if await wait_event(events, "device", nic_id, timeout, monitor.client) is None:
                    raise IntegrationError(
                        f"device_del {nic_id}: the guest did not release the device within {timeout:g} s "
                        "(is it still booting? does it support PCI hot-unplug, e.g. ACPI?); "
                        "run detach again later to finish"
                    )
                removed.append(nic_id)
        try:
            await monitor.execute("netdev_del", {"id": netdev_id})
        except IntegrationError:
            if device_error is not None:
                raise device_error from None
            raise
        removed.append(netdev_id)
    return removed


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"qemu-vpnnet {command}")
    p.add_argument(
        "--qemu-qmp",
        required=True,
        metavar="unix:PATH|tcp:HOST:PORT",
        help="QMP monitor of the running QEMU (-qmp unix:PATH,server=on,wait=off)",
    )
    p.add_argument(
        "--id", type=check_id, default=DEFAULT_ID, help=f"netdev id (default {DEFAULT_ID}); the NIC is ID-nic"
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per step (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="show qemu.qmp's log")
    if command == "attach":
        p.add_argument(
            "--socket", required=True, metavar="PATH", help="the backend's Unix socket (qemu-vpnnet --socket)"
        )
        p.add_argument("--mac", type=check_mac, help="MAC address of the new NIC (default: random 52:54:00:xx:xx:xx)")
        p.add_argument("--driver", default="virtio-net-pci", help="NIC device (default virtio-net-pci)")
        p.add_argument(
            "--device-opt",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="extra device_add property, e.g. bus=pcie.1 (repeatable)",
        )
    return p


def main(argv: list[str]) -> int:
    command = argv[0] if argv and argv[0] in ("attach", "detach") else "attach"
    args = build_parser(command).parse_args(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="qemu-vpnnet %(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        address = parse_qmp_address(args.qemu_qmp)
        if command == "attach":
            extra: dict[str, str] = {}
            for opt in args.device_opt:
                key, sep, value = opt.partition("=")
                if not sep or not key:
                    raise IntegrationError(f"--device-opt: expected KEY=VALUE, got {opt!r}")
                extra[key] = value
            added = asyncio.run(attach(address, args.socket, args.id, args.mac, args.driver, extra, args.timeout))
            print(f"attached {added['device']} (mac {added['mac']}) on netdev {added['netdev']} -> {added['socket']}")
        else:
            removed = asyncio.run(detach(address, args.id, args.timeout))
            print("detached " + ", ".join(removed))
    except IntegrationError as exc:
        print(f"qemu-vpnnet {command}: {exc}", file=sys.stderr)
        return 1
    return 0

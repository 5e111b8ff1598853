"""QMP commands of packet capture: capture-start, capture-stop, query-capture (io/capture.py).
Reference: docs/qmp.rst."""

import os

from qemu_vpnnet.control.qmp_commands import Command, Context, Param, QmpError
from qemu_vpnnet.core.packets import parse_mac
from qemu_vpnnet.io.capture import (
    DEFAULT_FILES,
    DEFAULT_MAX_SIZE,
    DEFAULT_SNAPLEN,
    MAX_FILES,
    CaptureError,
    CaptureOptions,
    parse_filter,
    start_capture,
    stop_capture,
)

MAX_SIZE_LIMIT = 1 << 40


def options_from_arguments(args: dict[str, object]) -> CaptureOptions:
    path = args["file"]
    assert isinstance(path, str)
    if not path:
        raise QmpError("Parameter 'file' expects a file name")
    mac: bytes | None = None
    mac_text = args.get("mac")
    if mac_text is not None:
        assert isinstance(mac_text, str)
        try:
            mac = parse_mac(mac_text)
        except ValueError:
            raise QmpError(
                f"Parameter 'mac' expects a MAC address such as 52:54:00:12:34:56, not '{mac_text}'"
            ) from None
    text = args.get("filter", "")
    assert isinstance(text, str)
    try:
        flt = parse_filter(text, mac)
    except ValueError as exc:
        raise QmpError(str(exc)) from exc
    port = args.get("port")
    snaplen = args.get("snaplen", DEFAULT_SNAPLEN)
    max_size = args.get("max-size", DEFAULT_MAX_SIZE)
    files = args.get("files", DEFAULT_FILES)
    assert port is None or isinstance(port, int)
    assert isinstance(snaplen, int) and isinstance(max_size, int) and isinstance(files, int)
    return CaptureOptions(os.path.abspath(path), snaplen, max_size, files, port, flt)


async def cmd_capture_start(ctx: Context, args: dict[str, object]) -> object:
    options = options_from_arguments(args)
    try:
        return start_capture(ctx.shell, options).describe()
    except CaptureError as exc:
        raise QmpError(str(exc)) from exc


async def cmd_capture_stop(ctx: Context, args: dict[str, object]) -> object:
    result = await stop_capture(ctx.shell)
    if result is None:
        raise QmpError("no capture is running")
    return result


async def cmd_query_capture(ctx: Context, args: dict[str, object]) -> object:
    capture = ctx.shell.capture
    if capture is None:
        return {"active": False}
    return capture.describe()


def capture_commands() -> list[Command]:
    return [
        Command(
            "capture-start",
            (
                Param("file", str, True),
                Param("port", int, False, 1, 1 << 31, "a QEMU port number (GUEST_CONNECTED's 'port')"),
                Param("mac", str),
                Param("filter", str),
                Param("snaplen", int, False, 64, 262144, "a snap length between 64 and 262144 bytes"),
                Param("max-size", int, False, 0, MAX_SIZE_LIMIT, "0 (no limit) or a size in bytes"),
                Param("files", int, False, 1, MAX_FILES, f"a number of files between 1 and {MAX_FILES}"),
            ),
            cmd_capture_start,
        ),
        Command("capture-stop", (), cmd_capture_stop),
        Command("query-capture", (), cmd_query_capture),
    ]

"""Packet capture (io/capture.py): the filter, the pcap records, rotation, bounds and errors, and the
shell's two capture points, read back with dpkt's pcap Reader."""

import os
from pathlib import Path

import dpkt
import pytest
import uvloop

from qemu_vpnnet.cli import build_parser
from qemu_vpnnet.core.config import NetConfig
from qemu_vpnnet.core.stack import Stack
from qemu_vpnnet.io import capture as C
from qemu_vpnnet.io.qemu_ports import QemuPort
from qemu_vpnnet.io.shell import Shell
from tests.guestframes import BCAST, GUEST2_MAC, GUEST_MAC, GW_MAC, eth, ip, ip_frame, ipv4, tcp_frame


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        return list(reader)


def arp_request(src_mac: bytes, src: str, target: str) -> bytes:
    arp = dpkt.arp.ARP(sha=src_mac, spa=ip(src), tha=b"\x00" * 6, tpa=ip(target), op=dpkt.arp.ARP_OP_REQUEST)
    return eth(BCAST, src_mac, dpkt.ethernet.ETH_TYPE_ARP, bytes(arp))


def udp_frame(src: str, dst: str, sport: int, dport: int, mac: bytes = GUEST_MAC) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=b"hello")
    udp.ulen = 13
    return ip_frame(mac, GW_MAC, ipv4(src, dst, dpkt.ip.IP_PROTO_UDP, udp))


def icmp_frame(src: str, dst: str) -> bytes:
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1, data=b"ping"))
    return ip_frame(GUEST_MAC, GW_MAC, ipv4(src, dst, dpkt.ip.IP_PROTO_ICMP, echo))


TCP80 = tcp_frame("10.0.2.15", "93.184.216.34", 40000, 80, 1, 0, dpkt.tcp.TH_SYN)
UDP53 = udp_frame("10.0.2.15", "10.0.2.3", 5000, 53)
PING = icmp_frame("10.0.2.15", "10.0.2.2")
ARP = arp_request(GUEST_MAC, "10.0.2.15", "10.0.2.2")


# ---- the filter -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("", {"tcp", "udp", "icmp", "arp"}),
        ("tcp", {"tcp"}),
        ("udp port 53", {"udp"}),
        ("port 80", {"tcp"}),
        ("icmp and host 10.0.2.2", {"icmp"}),
        ("host 10.0.2.3", {"udp"}),
        ("host 10.0.2.15", {"tcp", "udp", "icmp"}),
        ("arp", {"arp"}),
        ("ip", {"tcp", "udp", "icmp"}),
        ("tcp port 53", set()),
    ],
)
def test_a_filter_keeps_the_frames_its_words_name(text: str, kept: set[str]) -> None:
    flt = C.parse_filter(text)
    frames = {"tcp": TCP80, "udp": UDP53, "icmp": PING, "arp": ARP}
    assert {name for name, frame in frames.items() if flt.matches(frame)} == kept


def test_a_mac_filter_keeps_frames_from_and_to_that_guest() -> None:
    flt = C.parse_filter("", GUEST_MAC)
    assert flt.matches(TCP80)
    assert flt.matches(eth(GUEST_MAC, GW_MAC, dpkt.ethernet.ETH_TYPE_IP, bytes(20)))
    assert not flt.matches(udp_frame("10.0.2.16", "10.0.2.3", 5000, 53, mac=GUEST2_MAC))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tcp udp", "one protocol at most"),
        ("host", "'host' needs a value"),
        ("host 10.0.2", "bad IPv4 address"),
        ("port 70000", "bad port"),
        ("sctp", "unknown word 'sctp'"),
        ("arp host 10.0.2.2", "arp has no host or port"),
        ("icmp port 1", "icmp has no ports"),
    ],
)
def test_a_bad_filter_says_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        C.parse_filter(text)


def test_sizes_take_k_m_g() -> None:
    assert C.parse_size("4096") == 4096
    assert C.parse_size("64M") == 64 << 20
    assert C.parse_size("512k") == 512 << 10
    assert C.parse_size("1GiB") == 1 << 30
    with pytest.raises(ValueError, match="expected a size"):
        C.parse_size("lots")


# ---- the file -------------------------------------------------------------------------------


def wait_written(capture: C.Capture) -> None:
    capture.stop()
    assert capture.join(5.0)


def test_records_carry_time_and_length_and_are_cut_to_the_snap_length(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    capture = C.Capture(C.CaptureOptions(str(path), snaplen=64), GW_MAC)
    big = tcp_frame("10.0.2.15", "93.184.216.34", 40000, 80, 1, 0, dpkt.tcp.TH_ACK, b"x" * 1000)
    capture.record([TCP80, big], 1_700_000_000.25)
    wait_written(capture)
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.snaplen == 64
        records = list(reader)
    assert [ts for ts, _ in records] == [1_700_000_000.25] * 2
    assert records[0][1] == TCP80
    assert records[1][1] == big[:64]
    # the original length is kept in the record header (dpkt's Reader shows only caplen)
    raw = path.read_bytes()
    second = 24 + 16 + len(TCP80)
    assert int.from_bytes(raw[second + 8 : second + 12], "little") == 64
    assert int.from_bytes(raw[second + 12 : second + 16], "little") == len(big)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert capture.describe()["frames"] == 2


def test_rotation_keeps_files_whole_and_at_most_n(tmp_path: Path) -> None:
    path = tmp_path / "r.pcap"
    capture = C.Capture(C.CaptureOptions(str(path), max_size=4096, files=3), GW_MAC)
    frame = tcp_frame("10.0.2.15", "93.184.216.34", 40000, 80, 1, 0, dpkt.tcp.TH_ACK, b"y" * 946)  # 1000 bytes
    for i in range(20):
        capture.record([frame], 1_700_000_000 + i)
    wait_written(capture)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["r.pcap", "r.pcap.1", "r.pcap.2"]
    seen: list[float] = []
    for name in ("r.pcap.2", "r.pcap.1", "r.pcap"):
        assert (tmp_path / name).stat().st_size <= 4096
        records = read_pcap(tmp_path / name)
        assert records and all(data == frame for _, data in records)
        seen += [ts for ts, _ in records]
    assert seen == sorted(seen) and seen[-1] == 1_700_000_019  # the newest frames, in order
    assert capture.file.rotations >= 4


def test_one_file_only_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "one.pcap"
    capture = C.Capture(C.CaptureOptions(str(path), max_size=4096, files=1), GW_MAC)
    frame = udp_frame("10.0.2.15", "10.0.2.3", 5000, 53) + b"z" * 900
    for i in range(10):
        capture.record([frame], 1_700_000_000 + i)
    wait_written(capture)
    assert [p.name for p in tmp_path.iterdir()] == ["one.pcap"]
    assert read_pcap(path)[-1][0] == 1_700_000_009


def test_a_full_disk_is_logged_once_and_the_frames_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    capture = C.Capture(C.CaptureOptions(str(tmp_path / "full.pcap")), GW_MAC)
    full = os.open("/dev/full", os.O_WRONLY)  # takes no bytes: every write fails with ENOSPC
    os.dup2(full, capture.file.fd)
    os.close(full)
    for i in range(5):
        capture.record([TCP80], 1_700_000_000 + i)
    wait_written(capture)
    info = capture.describe()
    assert info["dropped"] == 5 and info["frames"] == 0
    assert info["last-error"] == "No space left on device"
    errors = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(errors) == 1 and "the disk is full" in errors[0].getMessage()


def test_a_writer_that_falls_behind_drops_frames_instead_of_growing(tmp_path: Path) -> None:
    capture = C.Capture(C.CaptureOptions(str(tmp_path / "slow.pcap")), GW_MAC)
    capture.queued = C.MAX_QUEUED - 10  # as if the disk had not taken the last 16 MiB yet
    capture.record([TCP80], 1.0)
    assert capture.dropped == 1 and capture.frames == 0
    capture.queued = 0
    wait_written(capture)
    assert read_pcap(tmp_path / "slow.pcap") == []


def test_bad_options_and_unwritable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(C.CaptureError, match="snaplen 10"):
        C.Capture(C.CaptureOptions(str(tmp_path / "x"), snaplen=10), GW_MAC)
    with pytest.raises(C.CaptureError, match="max-size 100"):
        C.Capture(C.CaptureOptions(str(tmp_path / "x"), max_size=100), GW_MAC)
    with pytest.raises(C.CaptureError, match=r"cannot open .*No such file or directory"):
        C.Capture(C.CaptureOptions(str(tmp_path / "missing" / "x")), GW_MAC)
    os.symlink("/etc/passwd", tmp_path / "link")
    with pytest.raises(C.CaptureError, match="cannot open"):  # O_NOFOLLOW: never through a symlink
        C.Capture(C.CaptureOptions(str(tmp_path / "link")), GW_MAC)


# ---- in the shell ---------------------------------------------------------------------------


class FakePort(QemuPort):
    def __init__(self, port_id: int) -> None:
        self.id = port_id
        self.description = f"fake {port_id}"
        self.sent: list[bytes] = []

    def send_frames(self, frames: list[bytes]) -> int:
        self.sent += frames
        return 0

    def close(self) -> None:
        pass


def run_shell(tmp_path: Path, port: int | None) -> list[tuple[float, bytes]]:
    async def scenario() -> None:
        shell = Shell(Stack(NetConfig()))
        a, b = FakePort(1), FakePort(2)
        shell.port_opened(a)
        shell.port_opened(b)
        shell.frames_received(b, [arp_request(GUEST2_MAC, "10.0.2.16", "10.0.2.2")])  # the switch learns b
        C.start_capture(shell, C.CaptureOptions(str(tmp_path / "s.pcap"), port=port))
        shell.frames_received(a, [ARP])  # broadcast: to b, and answered by the gateway
        to_b = ip_frame(GUEST_MAC, GUEST2_MAC, ipv4("10.0.2.15", "10.0.2.16", 17, dpkt.udp.UDP(data=b"hi")))
        shell.frames_received(a, [to_b])
        assert a.sent and b.sent
        assert shell.capture is not None
        info = await C.stop_capture(shell)
        assert info is not None and shell.capture is None
        await shell.close()

    uvloop.run(scenario())
    return read_pcap(tmp_path / "s.pcap")


def test_the_shell_captures_both_directions_and_each_frame_once(tmp_path: Path) -> None:
    frames = [data for _, data in run_shell(tmp_path, None)]
    kinds = [(data[6:12], data[0:6], data[12:14]) for data in frames]
    assert kinds == [
        (GUEST_MAC, BCAST, b"\x08\x06"),  # the guest's ARP request, once (not again on its way to b)
        (GW_MAC, GUEST_MAC, b"\x08\x06"),  # the gateway's reply
        (GUEST_MAC, GUEST2_MAC, b"\x08\x00"),  # guest to guest, once
    ]


def test_a_port_capture_is_what_that_qemu_sees(tmp_path: Path) -> None:
    frames = [data for _, data in run_shell(tmp_path, 2)]
    assert [(data[6:12], data[0:6]) for data in frames] == [(GUEST_MAC, BCAST), (GUEST_MAC, GUEST2_MAC)]


def test_the_command_line_options_and_their_defaults() -> None:
    args = build_parser().parse_args(["--socket", "x", "--pcap", "/tmp/x.pcap", "--pcap-max-size", "1M"])
    assert (args.pcap, args.pcap_max_size, args.pcap_files, args.pcap_snaplen) == ("/tmp/x.pcap", 1 << 20, 2, 65535)
    assert build_parser().parse_args(["--socket", "x"]).pcap_max_size == 64 << 20


# ---- over QMP (in-process; integration/test_capture.py drives the real process) -----------------


def test_capture_commands_over_qmp(tmp_path: Path) -> None:
    from tests.test_qmp_server import Env, error_of, run

    async def test(env: Env) -> None:
        client = await env.client()
        assert await client.execute("query-capture") == {"active": False}
        path = tmp_path / "q.pcap"
        started = await client.execute("capture-start", {"file": str(path), "filter": "arp", "files": 3})
        assert isinstance(started, dict)
        assert (started["active"], started["file"], started["filter"], started["files"]) == (True, str(path), "arp", 3)
        assert (await error_of(client, "capture-start", {"file": str(tmp_path / "other")}))[1] == (
            f"a capture to {path} is running already; stop it first"
        )
        env.shell.frames_received(FakePort(9), [ARP])  # a port the shell does not know: captured all the same
        stopped = await client.execute("capture-stop")
        assert isinstance(stopped, dict) and stopped["active"] is False and stopped["frames"] == 1
        assert (await error_of(client, "capture-stop"))[1] == "no capture is running"
        assert [data for _, data in read_pcap(path)] == [ARP]
        for args, error in [
            ({"file": str(path), "filter": "tcp tcp"}, "filter 'tcp tcp': one protocol at most"),
            ({"file": str(path), "mac": "nope"}, "Parameter 'mac' expects a MAC address"),
            ({"file": str(path), "port": 5}, "no QEMU port 5"),
            ({"file": str(path), "snaplen": 10}, "Parameter 'snaplen' expects a snap length between 64 and 262144"),
            ({"file": str(tmp_path / "no" / "x")}, "cannot open"),
        ]:
            assert error in (await error_of(client, "capture-start", args))[1]
        assert await client.execute("query-capture") == {"active": False}

    run(tmp_path, test)

"""The IPv6 options on the command line: what reaches NetConfig, the "serving" line, and bad values
ending the start with a message naming the option (exit 2) before any socket is opened."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemu_vpnnet.cli import build_parser, check_ipv6_options, config_from, ipv6_summary
from qemu_vpnnet.core.config import NetConfig, ip6_bytes
from tests.test_policy_cli import start

REPO = Path(__file__).resolve().parent.parent


def config_of(*args: str) -> tuple[str | None, NetConfig]:
    parsed = build_parser().parse_args(["--socket", "x", *args])
    return check_ipv6_options(parsed), config_from(parsed)


def test_defaults_are_qemus() -> None:
    problem, config = config_of()
    assert problem is None
    assert ipv6_summary(config) == "ipv6=fec0::/64 gateway6=fec0::2 dns6=fec0::3 dhcpv6=stateless"


def test_options_reach_the_config() -> None:
    problem, config = config_of(
        "--ipv6-prefix",
        "fd12:3456:789a:1::/64",
        "--ipv6-host",
        "[fd12:3456:789a:1::1]",
        "--ipv6-dns",
        "fd12:3456:789a:1::53",
        "--dhcpv6",
    )
    assert problem is None
    assert config.ipv6 and config.dhcpv6
    assert config.prefix6 == ip6_bytes("fd12:3456:789a:1::")[:8]
    assert config.host_ip6 == ip6_bytes("fd12:3456:789a:1::1")
    assert config.dns_ip6 == ip6_bytes("fd12:3456:789a:1::53")
    assert ipv6_summary(config) == (
        "ipv6=fd12:3456:789a:1::/64 gateway6=fd12:3456:789a:1::1 dns6=fd12:3456:789a:1::53 dhcpv6=stateful"
    )
    _problem, defaults_in_prefix = config_of("--ipv6-prefix", "2001:db8:1:2:abcd::/64")
    assert defaults_in_prefix.host_ip6 == ip6_bytes("2001:db8:1:2::2")


def test_no_ipv6() -> None:
    problem, config = config_of("--no-ipv6")
    assert problem is None and not config.ipv6
    assert ipv6_summary(config) == "ipv6=off"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ipv6-prefix", "fec0::/48"), "--ipv6-prefix fec0::/48: must be a /64"),
        (("--ipv6-prefix", "fec0::zz/64"), "--ipv6-prefix 'fec0::zz/64': not an IPv6 network (ADDRESS/64)"),
        (("--ipv6-prefix", "10.0.2.0/24"), "--ipv6-prefix '10.0.2.0/24': not an IPv6 network"),
        (("--ipv6-prefix", "fe80::/64"), "--ipv6-prefix fe80::/64: not a unicast prefix a guest can use"),
        (("--ipv6-prefix", "ff02::/64"), "--ipv6-prefix ff02::/64: not a unicast prefix"),
        (("--ipv6-host", "fec0::g"), "--ipv6-host 'fec0::g': not an IPv6 address"),
        (("--ipv6-host", "10.0.2.2"), "--ipv6-host '10.0.2.2': not an IPv6 address"),
        (("--ipv6-dns", "fec1::3"), "--ipv6-dns fec1::3: not a host address of --ipv6-prefix fec0::/64"),
        (("--ipv6-host", "fec0::"), "--ipv6-host fec0::: not a host address of --ipv6-prefix fec0::/64"),
        (("--ipv6-dns", "fec0::2"), "--ipv6-dns fec0::2: the gateway (--ipv6-host) has that address"),
        (("--no-ipv6", "--dhcpv6"), "--dhcpv6: IPv6 is off (--no-ipv6)"),
    ],
)
def test_bad_ipv6_options_exit_with_a_message(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = start(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "b.sock").exists()


def test_serving_line_names_the_ipv6_settings(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    sock = tmp_path / "b.sock"
    cmd = [sys.executable, "-m", "qemu_vpnnet", "--socket", str(sock), "--dns-mode", "forward"]
    cmd += ["--dns-upstream", "127.0.0.1:9", "--no-sandbox", "--ipv6-prefix", "fd00:aa::/64", "--dhcpv6"]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert process.stderr is not None
    try:
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if "serving net=" in line or not line:
                break
        assert "serving net=10.0.2.0/24 " in line, line
        assert line.rstrip().endswith(
            "mtu=1500 ipv6=fd00:aa::/64 gateway6=fd00:aa::2 dns6=fd00:aa::3 dhcpv6=stateful"
        ), line
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)

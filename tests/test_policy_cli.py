"""The policy's command line as a user meets it: bad rules, specs and files end the start with a
message naming them (exit 2), before any socket is opened."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if os.environ.get("VPNNET_TEST_INSTALLED", "") in ("", "0"):
        env["PYTHONPATH"] = str(REPO)
    sock = tmp_path / "b.sock"
    cmd = [sys.executable, "-m", "qemu_vpnnet", "--socket", str(sock), "--dns-mode", "forward"]
    cmd += ["--dns-upstream", "127.0.0.1:9", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rule", "block 10.0.0.0/8"), "--rule 'block 10.0.0.0/8': unknown action 'block'"),
        (("--deny", "10.0.0.0/33"), "--deny '10.0.0.0/33': bad destination"),
        (("--allow", "10.0.0.0/8:0"), "--allow '10.0.0.0/8:0': bad port range"),
        (("--rule", "deny * id=a", "--rule", "deny 1.2.3.4 id=a"), "rule id 'a' is used twice"),
        (("--guestfwd", "tcp:10.0.2.100:80"), "--guestfwd 'tcp:10.0.2.100:80': missing '-TARGET'"),
        (("--guestfwd", "tcp:10.0.2.3:80-cmd:cat"), "10.0.2.3 is not a free address of 10.0.2.0/24"),
        (("--policy", "/nonexistent/policy"), "--policy /nonexistent/policy: No such file or directory"),
    ],
)
def test_bad_policy_options_exit_with_a_message(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = start(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "b.sock").exists()


def test_bad_policy_file_line_is_named(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.write_text("# corporate\nrefuse tcp 10.0.0.0/8:22\nforward tcp *:80\n")
    result = start(tmp_path, "--policy", str(policy))
    assert result.returncode == 2
    assert f"--policy {policy}: line 3: forward needs a target" in result.stderr

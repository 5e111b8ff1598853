"""Unit tests of `qemu-vpnnet run`'s argument rewriting (no process is started)."""

import json

import pytest

from qemu_vpnnet.integrations.launcher import (
    RewriteError,
    default_nic_model,
    join_opts,
    normalize_net,
    rewrite_qemu_args,
    split_argv,
    split_opts,
)

SOCK = "/tmp/qemu-vpnnet-x/net.sock"
STREAM = f"stream,id={{}},server=off,addr.type=unix,addr.path={SOCK}"
QEMU = "qemu-system-x86_64"


def stream(netdev_id: str) -> str:
    return STREAM.format(netdev_id)


def test_split_and_join_opts_with_escaped_commas() -> None:
    assert split_opts("user,id=n0,hostfwd=tcp::1-:2") == ["user", "id=n0", "hostfwd=tcp::1-:2"]
    assert split_opts("a,,b,c") == ["a,b", "c"]
    assert join_opts(["a,b", "c"]) == "a,,b,c"
    assert split_opts("") == [""]


def test_no_user_network_adds_ours() -> None:
    r = rewrite_qemu_args([QEMU, "-m", "256", "-nographic", "-kernel", "k"], SOCK)
    assert r.qemu_args == [
        QEMU, "-m", "256", "-nographic", "-kernel", "k",
        "-netdev", stream("vpnnet0"), "-device", "virtio-net-pci,netdev=vpnnet0",
    ]  # fmt: skip
    assert r.backend_args == []
    assert r.replaced == ""
    assert r.netdev_id == "vpnnet0"


def test_nic_user_is_replaced_keeping_model_mac_and_translating_options() -> None:
    r = rewrite_qemu_args(
        [
            QEMU, "-nic",
            "user,model=virtio-net-pci,mac=52:54:00:12:34:99,hostfwd=tcp::8080-:80,"
            "hostfwd=udp:127.0.0.1:5353-:53,net=192.168.76.0/24,host=192.168.76.1,dns=192.168.76.3,"
            "dhcpstart=192.168.76.50,domainname=example.test,dnssearch=a.test,dnssearch=b.test",
            "-no-reboot",
        ],
        SOCK,
    )  # fmt: skip
    assert r.qemu_args == [
        QEMU, "-netdev", stream("vpnnet0"), "-device", "virtio-net-pci,netdev=vpnnet0,mac=52:54:00:12:34:99",
        "-no-reboot",
    ]  # fmt: skip
    assert r.backend_args == [
        "--hostfwd", "tcp::8080-:80",
        "--hostfwd", "udp:127.0.0.1:5353-:53",
        "--net", "192.168.76.0/24",
        "--host", "192.168.76.1",
        "--dns", "192.168.76.3",
        "--dhcp-start", "192.168.76.50",
        "--domain", "example.test",
        "--dns-search", "a.test",
        "--dns-search", "b.test",
    ]  # fmt: skip
    assert r.replaced == "-nic user"


def test_nic_user_model_alias_and_machine_default_models() -> None:
    r = rewrite_qemu_args([QEMU, "-nic", "user,model=virtio"], SOCK)
    assert r.qemu_args[-1] == "virtio-net-pci,netdev=vpnnet0"
    r = rewrite_qemu_args([QEMU, "-M", "q35", "--nic", "user"], SOCK)
    assert r.qemu_args[-1] == "e1000e,netdev=vpnnet0"
    r = rewrite_qemu_args([QEMU, "-nic", "user"], SOCK)
    assert r.qemu_args[-1] == "e1000,netdev=vpnnet0"
    assert default_nic_model(["qemu-system-aarch64", "-M", "virt"]) == "virtio-net-pci"
    assert default_nic_model([QEMU, "-machine", "type=pc-q35-7.2,accel=tcg"]) == "e1000e"


def test_nic_user_keeps_its_id() -> None:
    r = rewrite_qemu_args([QEMU, "-nic", "user,id=mynet,model=e1000"], SOCK)
    assert r.qemu_args == [QEMU, "-netdev", stream("mynet"), "-device", "e1000,netdev=mynet"]
    assert r.netdev_id == "mynet"


def test_netdev_user_is_replaced_and_the_users_device_stays() -> None:
    r = rewrite_qemu_args(
        [QEMU, "-netdev", "user,id=n1,hostfwd=tcp::2222-:22,net=10.9.0.0/255.255.0.0",
         "-device", "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:01"],
        SOCK,
    )  # fmt: skip
    assert r.qemu_args == [QEMU, "-netdev", stream("n1"), "-device", "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:01"]
    assert r.backend_args == ["--hostfwd", "tcp::2222-:22", "--net", "10.9.0.0/16"]
    assert r.replaced == "-netdev user"
    assert r.netdev_id == "n1"


def test_netdev_user_with_type_key_and_json_form() -> None:
    r = rewrite_qemu_args([QEMU, "-netdev", "type=user,id=n2"], SOCK)
    assert r.qemu_args == [QEMU, "-netdev", stream("n2")]
    spec = {"type": "user", "id": "j0", "hostfwd": [{"str": "tcp::2222-:22"}], "ipv6": False}
    r = rewrite_qemu_args([QEMU, "-netdev", json.dumps(spec)], SOCK)
    assert json.loads(r.qemu_args[2]) == {
        "type": "stream", "id": "j0", "server": False, "addr": {"type": "unix", "path": SOCK},
    }  # fmt: skip
    assert r.backend_args == ["--hostfwd", "tcp::2222-:22"]
    assert r.warnings == ["-netdev j0: ipv6= is not supported by qemu-vpnnet; ignored"]


def test_other_netdevs_and_option_values_are_left_alone() -> None:
    args = [
        QEMU, "-netdev", "tap,id=t0,ifname=tap0", "-device", "e1000,netdev=t0",
        "-append", "-nic user", "-S", "-name", "-netdev",
    ]  # fmt: skip
    r = rewrite_qemu_args(args, SOCK)
    assert r.qemu_args[: len(args)] == args
    assert r.qemu_args[len(args) :] == ["-netdev", stream("vpnnet0"), "-device", "virtio-net-pci,netdev=vpnnet0"]


def test_socket_path_with_comma_is_escaped() -> None:
    r = rewrite_qemu_args([QEMU], "/tmp/a,b/net.sock")
    assert "addr.path=/tmp/a,,b/net.sock" in r.qemu_args[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([QEMU, "-net", "nic", "-net", "user"], "legacy -net option"),
        ([QEMU, "-nic", "user", "-nic", "user"], "more than one"),
        ([QEMU, "-netdev", "user"], "id= is missing"),
        ([QEMU, "-nic", "user,guestfwd=tcp:10.0.2.100:1234-cmd:cat"], "guestfwd"),
        ([QEMU, "-nic", "user,restrict=on"], "restrict=on"),
        ([QEMU, "-nic", "user,restrict"], "restrict=on"),
        ([QEMU, "-nic", "user,hostfwd=tcp::99999-:22"], "hostfwd=tcp::99999-:22"),
        ([QEMU, "-nic", "user,bogus=1"], "unknown option bogus="),
        ([QEMU, "-nic", "user,net=10.0.2.300/24"], "net=10.0.2.300/24"),
        ([], "no QEMU command"),
    ],
)
def test_rewrite_errors(args: list[str], message: str) -> None:
    with pytest.raises(RewriteError, match=message):
        rewrite_qemu_args(args, SOCK)


def test_restrict_off_and_ignored_options() -> None:
    r = rewrite_qemu_args([QEMU, "-nic", "user,restrict=off,ipv4=on,hostname=vm1,tftp=/srv"], SOCK)
    assert r.backend_args == []
    assert len(r.warnings) == 2


def test_normalize_net() -> None:
    assert normalize_net("10.0.2.0/24") == "10.0.2.0/24"
    assert normalize_net("10.0.2.0") == "10.0.2.0/24"
    assert normalize_net("10.0.2.7/255.255.255.0") == "10.0.2.0/24"


def test_split_argv() -> None:
    assert split_argv(["--mtu", "65520", "--backend-log", "/tmp/b.log", "--", QEMU, "-m", "64"]) == (
        ["--mtu", "65520"],
        "/tmp/b.log",
        [QEMU, "-m", "64"],
    )
    assert split_argv(["--backend-log=x", "--", QEMU]) == ([], "x", [QEMU])
    with pytest.raises(RewriteError, match="missing '--'"):
        split_argv([QEMU])
    with pytest.raises(RewriteError, match="no QEMU command"):
        split_argv(["--"])

"""Unit tests of `qemu-vpnnet run`'s argument rewriting (no process is started)."""

import json

import pytest

from qemu_vpnnet.integrations.launcher import (
    RewriteError,
    RunArgs,
    accelerators,
    default_nic_model,
    join_opts,
    memory_size,
    normalize_net,
    parse_size,
    rewrite_qemu_args,
    runs_under_tcg,
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
    assert split_argv(["--mtu", "65520", "--backend-log", "/tmp/b.log", "--", QEMU, "-m", "64"]) == RunArgs(
        ["--mtu", "65520"], "/tmp/b.log", [QEMU, "-m", "64"], "stream"
    )
    assert split_argv(["--backend-log=x", "--", QEMU]) == RunArgs([], "x", [QEMU])
    assert split_argv(["--transport", "vhost-user", "--no-offloads", "--", QEMU]) == RunArgs(
        ["--no-offloads"], None, [QEMU], "vhost-user"
    )
    assert split_argv(["--transport=stream", "--", QEMU]).transport == "stream"
    with pytest.raises(RewriteError, match="missing '--'"):
        split_argv([QEMU])
    with pytest.raises(RewriteError, match="no QEMU command"):
        split_argv(["--"])
    with pytest.raises(RewriteError, match="--transport tap: expected one of stream, vhost-user"):
        split_argv(["--transport", "tap", "--", QEMU])
    with pytest.raises(RewriteError, match="--transport needs"):
        split_argv(["--transport", "--", QEMU])


# ---- vhost-user ---------------------------------------------------------------------------------

VU_SOCK = "/tmp/qemu-vpnnet-x/vhost-user.sock"


def vhost(netdev_id: str) -> list[str]:
    return [
        "-chardev", f"socket,id={netdev_id}-vu,path={VU_SOCK},reconnect=1",
        "-netdev", f"vhost-user,id={netdev_id},chardev={netdev_id}-vu",
    ]  # fmt: skip


def memfd(size: str) -> list[str]:
    return ["-object", f"memory-backend-memfd,id=vpnnet-mem,size={size},share=on", "-numa", "node,memdev=vpnnet-mem"]


def test_vhost_user_without_user_network_adds_nic_and_shared_memory_of_m_size() -> None:
    r = rewrite_qemu_args([QEMU, "-accel", "tcg", "-m", "256"], VU_SOCK, "vhost-user")
    assert r.qemu_args == [
        QEMU, "-accel", "tcg", "-m", "256",
        *vhost("vpnnet0"), "-device", "virtio-net-pci,netdev=vpnnet0,vectors=0",
        *memfd("256M"),
    ]  # fmt: skip
    assert r.backend_args == []


def test_vhost_user_under_kvm_keeps_msix() -> None:
    """vectors=0 is the TCG workaround only (QEMU 7.2's msix_set_vector_notifiers segfault)."""
    for accel in (["-enable-kvm"], ["-accel", "kvm"], ["-machine", "q35,accel=kvm"], ["-M", "accel=kvm:tcg"]):
        r = rewrite_qemu_args([QEMU, *accel, "-m", "1G"], VU_SOCK, "vhost-user", kvm=True)
        assert r.qemu_args[-5] == "virtio-net-pci,netdev=vpnnet0", accel
        assert r.qemu_args[-4:] == memfd("1024M")
    # kvm:tcg where KVM cannot open falls back to TCG, and so gets the workaround.
    r = rewrite_qemu_args([QEMU, "-M", "accel=kvm:tcg"], VU_SOCK, "vhost-user", kvm=False)
    assert "virtio-net-pci,netdev=vpnnet0,vectors=0" in r.qemu_args


def test_accelerator_detection() -> None:
    assert accelerators([QEMU]) == ["tcg", "kvm"]
    assert accelerators(["/usr/bin/qemu-kvm"]) == ["kvm", "tcg"]
    assert accelerators([QEMU, "-accel", "kvm", "-accel", "tcg,thread=single"]) == ["kvm", "tcg"]
    assert accelerators([QEMU, "-machine", "pc,accel=tcg"]) == ["tcg"]
    assert accelerators([QEMU, "-append", "-enable-kvm", "-S"]) == ["tcg", "kvm"]  # an option's value
    assert runs_under_tcg([QEMU]) and not runs_under_tcg([QEMU, "-enable-kvm"], kvm=False)
    assert runs_under_tcg(["qemu-kvm"], kvm=False) and not runs_under_tcg(["qemu-kvm"], kvm=True)


def test_vhost_user_replaces_nic_user_with_a_virtio_nic() -> None:
    r = rewrite_qemu_args(
        [QEMU, "-m", "size=2G,slots=2,maxmem=4G", "-nic", "user,mac=52:54:00:12:34:99,hostfwd=tcp::8080-:80"],
        VU_SOCK,
        "vhost-user",
        kvm=True,
    )
    assert r.qemu_args == [
        QEMU, "-m", "size=2G,slots=2,maxmem=4G",
        *vhost("vpnnet0"), "-device", "virtio-net-pci,netdev=vpnnet0,mac=52:54:00:12:34:99,vectors=0",
        *memfd("2048M"),
    ]  # fmt: skip
    assert r.backend_args == ["--hostfwd", "tcp::8080-:80"]
    assert r.replaced == "-nic user"
    r = rewrite_qemu_args([QEMU, "-M", "microvm", "-nic", "user,model=virtio"], VU_SOCK, "vhost-user")
    assert r.qemu_args[r.qemu_args.index("-device") + 1] == "virtio-net-pci,netdev=vpnnet0,vectors=0"
    r = rewrite_qemu_args([QEMU, "-M", "microvm", "-nic", "user"], VU_SOCK, "vhost-user")
    assert r.qemu_args[r.qemu_args.index("-device") + 1] == "virtio-net-device,netdev=vpnnet0"
    with pytest.raises(RewriteError, match="model=e1000: vhost-user serves virtio-net NICs only"):
        rewrite_qemu_args([QEMU, "-nic", "user,model=e1000"], VU_SOCK, "vhost-user")


def test_vhost_user_replaces_netdev_user_and_adapts_the_users_device() -> None:
    r = rewrite_qemu_args(
        [QEMU, "-device", "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:01", "-m", "512M",
         "-netdev", "user,id=n1,net=10.9.0.0/16", "-device", "virtio-net-pci,netdev=other"],
        VU_SOCK,
        "vhost-user",
    )  # fmt: skip
    assert r.qemu_args == [
        QEMU, "-device", "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:01,vectors=0", "-m", "512M",
        *vhost("n1"), "-device", "virtio-net-pci,netdev=other",
        *memfd("512M"),
    ]  # fmt: skip
    assert r.backend_args == ["--net", "10.9.0.0/16"]
    r = rewrite_qemu_args(
        [QEMU, "-netdev", "user,id=n1", "-device", "driver=virtio-net-pci,netdev=n1,vectors=3"], VU_SOCK, "vhost-user"
    )
    assert "driver=virtio-net-pci,netdev=n1,vectors=3" in r.qemu_args  # the user's own vectors= stays
    spec = {"type": "user", "id": "j0"}
    device = {"driver": "virtio-net-pci", "netdev": "j0"}
    r = rewrite_qemu_args([QEMU, "-netdev", json.dumps(spec), "-device", json.dumps(device)], VU_SOCK, "vhost-user")
    assert r.qemu_args[1:3] == ["-chardev", f"socket,id=j0-vu,path={VU_SOCK},reconnect=1"]
    assert json.loads(r.qemu_args[4]) == {"type": "vhost-user", "id": "j0", "chardev": "j0-vu"}
    assert json.loads(r.qemu_args[6]) == {"driver": "virtio-net-pci", "netdev": "j0", "vectors": 0}
    assert r.qemu_args[7:] == ["-m", "128M", *memfd("128M")]  # QEMU's x86 default, made explicit
    with pytest.raises(RewriteError, match="vhost-user serves virtio-net NICs only"):
        rewrite_qemu_args([QEMU, "-netdev", "user,id=n1", "-device", "e1000,netdev=n1"], VU_SOCK, "vhost-user")


def test_vhost_user_keeps_memory_the_command_line_places_itself() -> None:
    own = [
        "-m", "1G", "-object", "memory-backend-memfd,id=m0,size=1G",
        "-numa", "node,memdev=m0", "-numa", "cpu,node-id=0,socket-id=0",
    ]  # fmt: skip
    r = rewrite_qemu_args([QEMU, *own], VU_SOCK, "vhost-user")
    assert r.qemu_args[: len(own) + 1] == [QEMU, *own]
    assert "vpnnet-mem" not in " ".join(r.qemu_args)
    shared_file = ["-object", "memory-backend-file,id=m1,size=1G,mem-path=/dev/hugepages,share=on"]
    r = rewrite_qemu_args([QEMU, *shared_file, "-machine", "memory-backend=m1"], VU_SOCK, "vhost-user")
    assert "vpnnet-mem" not in " ".join(r.qemu_args)
    for bad in (
        ["-object", "memory-backend-ram,id=m0,size=1G", "-numa", "node,memdev=m0"],
        ["-object", "memory-backend-memfd,id=m0,size=1G,share=off", "-M", "memory-backend=m0"],
        ["-object", "memory-backend-file,id=m0,size=1G,mem-path=/tmp/x", "-numa", "node,memdev=m0"],
    ):
        with pytest.raises(RewriteError, match="memory backend 'm0': vhost-user needs the guest's RAM shared"):
            rewrite_qemu_args([QEMU, *bad], VU_SOCK, "vhost-user")
    with pytest.raises(RewriteError, match="give every -numa node a memdev="):
        rewrite_qemu_args([QEMU, "-numa", "node,cpus=0"], VU_SOCK, "vhost-user")


def test_memory_sizes() -> None:
    assert parse_size("256", "-m") == 256 << 20
    assert parse_size("1.5G", "-m") == 1536 << 20
    assert parse_size("2g", "-m") == 2 << 30
    assert parse_size("1048576b", "-m") == 1 << 20
    for bad in ("", "x", "-1", "1.5b", "1Q"):
        with pytest.raises(RewriteError, match="bad size"):
            parse_size(bad, "-m")
    assert memory_size([QEMU]) is None
    assert memory_size([QEMU, "-m", "64", "-m", "size=3G"]) == 3 << 30  # the last one counts


def test_stream_stays_the_default_and_vhost_user_escapes_commas() -> None:
    assert rewrite_qemu_args([QEMU], SOCK).qemu_args == rewrite_qemu_args([QEMU], SOCK, "stream").qemu_args
    r = rewrite_qemu_args([QEMU, "-m", "64"], "/tmp/a,b/vu.sock", "vhost-user")
    assert "socket,id=vpnnet0-vu,path=/tmp/a,,b/vu.sock,reconnect=1" in r.qemu_args
    with pytest.raises(RewriteError, match="unknown transport"):
        rewrite_qemu_args([QEMU], SOCK, "tap")

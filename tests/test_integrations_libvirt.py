"""Unit tests of the libvirt integration: metadata parsing, generated XML, the hook script, run dirs."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qemu_vpnnet.integrations import libvirt as lv
from qemu_vpnnet.integrations.procutil import IntegrationError, pid_alive, proc_cmdline, terminate_pid

DOMAIN = """\
<domain type='qemu'>
  <name>web1</name>
  <metadata>
    <other:thing xmlns:other="https://example.invalid/other"/>
    <vpnnet:net xmlns:vpnnet="https://qemu-vpnnet.invalid/xmlns/1">
      <vpnnet:listen-tcp address="127.0.0.1" port="5558"/>
      <vpnnet:hostfwd rule="tcp::2222-:22"/>
      <vpnnet:hostfwd rule="udp:127.0.0.1:5353-:53"/>
      <vpnnet:option name="mtu" value="65520"/>
      <vpnnet:option name="no-host-loopback"/>
    </vpnnet:net>
  </metadata>
  <devices/>
</domain>
"""


def domain_with(net: str) -> str:
    return f"<domain><name>d</name><metadata><vpnnet:net xmlns:vpnnet='{lv.NS}'>{net}</vpnnet:net></metadata></domain>"


def test_parse_metadata_tcp() -> None:
    name, config = lv.parse_domain_xml(DOMAIN)
    assert name == "web1"
    assert config is not None
    assert config.listen_tcp == ("127.0.0.1", 5558)
    assert config.socket is None
    assert config.hostfwd == ["tcp::2222-:22", "udp:127.0.0.1:5353-:53"]
    assert config.options == [("mtu", "65520"), ("no-host-loopback", "")]
    assert lv.backend_args(config, "/run/qemu-vpnnet/web1") == [
        "--listen-tcp", "127.0.0.1:5558",
        "--hostfwd", "tcp::2222-:22",
        "--hostfwd", "udp:127.0.0.1:5353-:53",
        "--mtu", "65520",
        "--no-host-loopback",
        "--qmp", "unix:/run/qemu-vpnnet/web1/qmp.sock",
        "--state", "/run/qemu-vpnnet/web1/state.json",
    ]  # fmt: skip


def test_parse_metadata_socket_default_and_explicit_path() -> None:
    _, config = lv.parse_domain_xml(domain_with("<vpnnet:socket/>"))
    assert config is not None
    assert config.socket_path("/r/d") == "/r/d/net.sock"
    assert lv.backend_args(config, "/r/d")[:2] == ["--socket", "/r/d/net.sock"]
    _, config = lv.parse_domain_xml(domain_with("<vpnnet:socket path='/tmp/x.sock'/>"))
    assert config is not None
    assert config.socket_path("/r/d") == "/tmp/x.sock"


def test_listen_tcp_ipv6_and_default_address() -> None:
    _, config = lv.parse_domain_xml(domain_with("<vpnnet:listen-tcp address='::1' port='1'/>"))
    assert config is not None
    assert lv.backend_args(config, "/r/d")[:2] == ["--listen-tcp", "[::1]:1"]
    _, config = lv.parse_domain_xml(domain_with("<vpnnet:listen-tcp port='7'/>"))
    assert config is not None and config.listen_tcp == ("127.0.0.1", 7)


VHOST_DOMAIN = f"""\
<domain type='qemu'>
  <name>vu1</name>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <metadata>
    <vpnnet:net xmlns:vpnnet="{lv.NS}">
      <vpnnet:vhost-user/>
      <vpnnet:option name="no-offloads"/>
    </vpnnet:net>
  </metadata>
  <devices>
    <interface type='vhostuser'>
      <source type='unix' path='/run/qemu-vpnnet/vu1/vhost-user.sock' mode='client'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"""


def test_parse_metadata_vhost_user_and_its_backend_arguments() -> None:
    name, config = lv.parse_domain_xml(VHOST_DOMAIN)
    assert name == "vu1" and config is not None
    assert config.vhost_user == "" and config.socket is None and config.listen_tcp is None
    assert lv.backend_args(config, "/run/qemu-vpnnet/vu1") == [
        "--vhost-user", "/run/qemu-vpnnet/vu1/vhost-user.sock",
        "--no-offloads",
        "--qmp", "unix:/run/qemu-vpnnet/vu1/qmp.sock",
        "--state", "/run/qemu-vpnnet/vu1/state.json",
    ]  # fmt: skip
    assert config.unix_paths("/run/qemu-vpnnet/vu1") == ["/run/qemu-vpnnet/vu1/vhost-user.sock"]
    lv.check_vhost_user_domain(VHOST_DOMAIN, "/run/qemu-vpnnet/vu1/vhost-user.sock")
    _, config = lv.parse_domain_xml(domain_with("<vpnnet:vhost-user path='/tmp/vu.sock'/>"))
    assert config is not None and config.vhost_user_path("/r/d") == "/tmp/vu.sock"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("type='vhostuser'", "type='network'", "has no <interface type='vhostuser'><source type='unix' path="),
        ("vu1/vhost-user.sock", "other.sock", "has no <interface type='vhostuser'>"),
        ("mode='client'", "mode='server'", 'has mode="server": the backend listens, so QEMU must connect'),
        ("<access mode='shared'/>", "", "needs the guest's memory shared"),
        ("<access mode='shared'/>", "<access mode='private'/>", "needs the guest's memory shared"),
    ],
)
def test_vhost_user_domain_must_connect_to_the_socket_and_share_its_memory(old: str, new: str, message: str) -> None:
    with pytest.raises(lv.MetadataError, match=message):
        lv.check_vhost_user_domain(VHOST_DOMAIN.replace(old, new), "/run/qemu-vpnnet/vu1/vhost-user.sock")


def test_vhost_user_memory_shared_by_numa_cells() -> None:
    cells = "<cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB' memAccess='shared'/></numa></cpu>"
    xml = VHOST_DOMAIN.replace("<access mode='shared'/>", "").replace("<metadata>", cells + "<metadata>")
    lv.check_vhost_user_domain(xml, "/run/qemu-vpnnet/vu1/vhost-user.sock")
    private = VHOST_DOMAIN.replace("<metadata>", cells.replace("shared", "private") + "<metadata>")
    with pytest.raises(lv.MetadataError, match="shared"):
        lv.check_vhost_user_domain(private, "/run/qemu-vpnnet/vu1/vhost-user.sock")


def test_hook_refuses_a_vhost_user_domain_without_shared_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = VHOST_DOMAIN.replace("/run/qemu-vpnnet", str(tmp_path)).replace("<access mode='shared'/>", "")
    assert lv.hook_run(["vu1", "prepare", "begin", "-"], xml, str(tmp_path)) == 1
    assert "needs the guest's memory shared" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no backend started


def test_domain_without_metadata() -> None:
    assert lv.parse_domain_xml("<domain><name>plain</name><metadata/></domain>") == ("plain", None)
    assert lv.parse_domain_xml("<domain><name>plain</name></domain>") == ("plain", None)


@pytest.mark.parametrize(
    ("net", "message"),
    [
        ("", "needs <vpnnet:listen-tcp"),
        ("<vpnnet:listen-tcp address='127.0.0.1'/>", "port= is missing"),
        ("<vpnnet:listen-tcp address='127.0.0.1' port='70000'/>", "bad port"),
        ("<vpnnet:listen-tcp address='localhost' port='1'/>", "bad address"),
        ("<vpnnet:listen-tcp port='1'/><vpnnet:socket/>", "only one"),
        ("<vpnnet:socket/><vpnnet:vhost-user/>", "only one"),
        ("<vpnnet:vhost-user/><vpnnet:listen-tcp port='1'/>", "only one"),
        ("<vpnnet:vhost-user path='rel.sock'/>", "absolute"),
        ("<vpnnet:socket path='rel.sock'/>", "absolute"),
        ("<vpnnet:socket/><vpnnet:hostfwd rule='tcp:x'/>", "hostfwd"),
        ("<vpnnet:socket/><vpnnet:option name='socket' value='/x'/>", "not allowed"),
        ("<vpnnet:socket/><vpnnet:option name='mtu'/>", "needs value="),
        ("<vpnnet:socket/><vpnnet:bogus/>", "unknown element"),
        ("<vpnnet:socket/><x/>", "unexpected element"),
    ],
)
def test_bad_metadata(net: str, message: str) -> None:
    with pytest.raises(lv.MetadataError, match=message):
        lv.parse_domain_xml(domain_with(net))


def test_bad_xml() -> None:
    with pytest.raises(lv.MetadataError, match="cannot parse"):
        lv.parse_domain_xml("<domain>")


def test_generated_metadata_round_trips() -> None:
    config = lv.DomainNet(listen_tcp=("127.0.0.1", 5600), hostfwd=["tcp::8080-:80"], options=[("mtu", "9000")])
    xml = f"<domain><name>g</name>{lv.metadata_xml(config)}</domain>"
    assert lv.parse_domain_xml(xml) == ("g", config)
    config = lv.DomainNet(socket="/tmp/a&b.sock")
    xml = f"<domain><name>g</name>{lv.metadata_xml(config)}</domain>"
    assert lv.parse_domain_xml(xml) == ("g", config)
    for vhost_user in ("", "/tmp/vu.sock"):
        config = lv.DomainNet(vhost_user=vhost_user, options=[("no-offloads", "")])
        xml = f"<domain><name>g</name>{lv.metadata_xml(config)}</domain>"
        assert lv.parse_domain_xml(xml) == ("g", config)


def vhost_user_domain(domain_type: str) -> str:
    """The `libvirt xml --vhost-user` snippet put into a domain, as its comment tells."""
    out = run_cli(
        "libvirt", "xml", "--vhost-user", "--domain", "vu1", "--domain-type", domain_type,
        "--mac", "52:54:00:00:00:07", "--hostfwd", "tcp::2222-:22", "--run-dir", "/run/qemu-vpnnet",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    body = out.stdout.split("-->", 1)[1]
    metadata, rest = body.split("</metadata>", 1)
    backing, rest = rest.split("</memoryBacking>", 1)
    interface, override = rest.split("</interface>", 1)
    ns = f" xmlns:qemu='{lv.QEMU_NS}'" if domain_type == "qemu" else ""
    return (
        f"<domain type='{domain_type}'{ns}><name>vu1</name>{metadata}</metadata>{backing}</memoryBacking>"
        f"<devices>{interface}</interface></devices>{override}</domain>"
    )


def test_vhost_user_xml_for_a_tcg_domain_overrides_vectors() -> None:
    xml = vhost_user_domain("qemu")
    root = ET.fromstring(xml)
    iface = root.find("devices/interface")
    assert iface is not None and iface.get("type") == "vhostuser"
    source = iface.find("source")
    assert source is not None and source.attrib == {
        "type": "unix", "path": "/run/qemu-vpnnet/vu1/vhost-user.sock", "mode": "client",
    }  # fmt: skip
    reconnect = source.find("reconnect")
    assert reconnect is not None and reconnect.attrib == {"enabled": "yes", "timeout": "1"}
    assert [(e.tag, e.attrib) for e in iface if e.tag != "source"] == [
        ("mac", {"address": "52:54:00:00:00:07"}),
        ("model", {"type": "virtio"}),
        ("alias", {"name": "ua-vpnnet0"}),
    ]
    backing = root.find("memoryBacking")
    assert backing is not None and [(e.tag, e.attrib) for e in backing] == [
        ("source", {"type": "memfd"}), ("access", {"mode": "shared"}),
    ]  # fmt: skip
    q = f"{{{lv.QEMU_NS}}}"
    prop = root.find(f"{q}override/{q}device/{q}frontend/{q}property")
    assert prop is not None and prop.attrib == {"name": "vectors", "type": "unsigned", "value": "0"}
    device = root.find(f"{q}override/{q}device")
    assert device is not None and device.get("alias") == "ua-vpnnet0"
    # What the hook makes of it: the backend on that socket, after the domain passed its checks.
    _, config = lv.parse_domain_xml(xml)
    assert config == lv.DomainNet(vhost_user="", hostfwd=["tcp::2222-:22"])
    lv.check_vhost_user_domain(xml, "/run/qemu-vpnnet/vu1/vhost-user.sock")
    assert lv.backend_args(config, "/run/qemu-vpnnet/vu1")[:4] == [
        "--vhost-user", "/run/qemu-vpnnet/vu1/vhost-user.sock", "--hostfwd", "tcp::2222-:22",
    ]  # fmt: skip


def test_vhost_user_xml_for_a_kvm_domain_is_clean() -> None:
    xml = vhost_user_domain("kvm")
    assert "qemu:" not in xml and "vectors" not in xml
    root = ET.fromstring(xml)
    assert root.find("devices/interface[@type='vhostuser']") is not None
    assert root.find("memoryBacking/access[@mode='shared']") is not None
    path = run_cli("libvirt", "xml", "--vhost-user", "/tmp/v u.sock").stdout
    assert "path='/tmp/v u.sock'" in path.replace('"', "'") and "<qemu:override>" not in path


def test_interface_and_commandline_xml_are_well_formed() -> None:
    iface = ET.fromstring(lv.interface_xml("127.0.0.1", 5558, "52:54:00:00:00:01"))
    assert iface.get("type") == "client"
    source = iface.find("source")
    assert source is not None and source.get("address") == "127.0.0.1" and source.get("port") == "5558"
    assert iface.find("model") is not None and iface.find("mac") is not None
    wrapped = f"<domain xmlns:qemu='{lv.QEMU_NS}'>{lv.commandline_xml('/run/a,b/net.sock', None)}</domain>"
    args = [a.get("value") for a in ET.fromstring(wrapped).iter(f"{{{lv.QEMU_NS}}}arg")]
    assert args == [
        "-netdev",
        "stream,id=vpnnet0,server=off,addr.type=unix,addr.path=/run/a,,b/net.sock",
        "-device",
        "virtio-net-pci,netdev=vpnnet0",
    ]


def run_cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    full_env = dict(os.environ, PYTHONPATH=str(root), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "qemu_vpnnet", *args], input=stdin, capture_output=True, text=True, env=full_env
    )


def test_xml_command_prints_both_ways() -> None:
    out = run_cli("libvirt", "xml", "--domain", "web1", "--hostfwd", "tcp::2222-:22").stdout
    assert "<interface type='client'>" in out
    assert '<vpnnet:listen-tcp address="127.0.0.1" port="5558"/>' in out
    assert "addr.path=/run/qemu-vpnnet/web1/net.sock" in out
    assert out.count('<vpnnet:hostfwd rule="tcp::2222-:22"/>') == 2
    tcp_only = run_cli("libvirt", "xml", "--tcp", "127.0.0.1:6000").stdout
    assert "qemu:commandline" not in tcp_only and 'port="6000"' in tcp_only
    sock_only = run_cli("libvirt", "xml", "--socket", "/tmp/v.sock").stdout
    assert "interface" not in sock_only and "addr.path=/tmp/v.sock" in sock_only
    bad = run_cli("libvirt", "xml", "--hostfwd", "tcp:1")
    assert bad.returncode == 1 and "--hostfwd tcp:1" in bad.stderr


def test_hook_script_filters_operations(tmp_path: Path) -> None:
    script = lv.hook_script("/usr/bin/python3", "/run/x y", {"PYTHONPATH": "/src"})
    assert script.startswith("#!/bin/sh\n" + lv.HOOK_MARKER)
    assert "VPNNET_LIBVIRT_RUN_DIR='/run/x y'" in script
    assert "PYTHONPATH=/src" in script
    # Run it with a fake python that prints its arguments.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$VPNNET_LIBVIRT_RUN_DIR|$*"\n')
    fake.chmod(0o755)
    hook = tmp_path / "hook"
    hook.write_text(lv.hook_script(str(fake), "/run/v", {}))
    hook.chmod(0o755)
    out = subprocess.run([str(hook), "dom", "prepare", "begin", "-"], input="<x/>", capture_output=True, text=True)
    assert out.stdout == "/run/v|-m qemu_vpnnet libvirt hook-run dom prepare begin -\n"
    out = subprocess.run([str(hook), "dom", "started", "begin", "-"], input="<x/>", capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == ""


def test_install_and_uninstall_hook(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    done = lv.install_hook(str(hooks), str(tmp_path / "run"), reload=False)
    path = hooks / "qemu.d" / "qemu-vpnnet"
    assert done == [f"installed {path}"]
    assert os.access(path, os.X_OK)
    assert sys.executable in path.read_text()
    lv.install_hook(str(hooks), str(tmp_path / "run"), reload=False)  # again: replaces our own
    assert lv.uninstall_hook(str(hooks), reload=False) == [f"removed {path}"]
    assert not (hooks / "qemu.d").exists()
    assert lv.uninstall_hook(str(hooks), reload=False) == [f"{path} was not installed"]
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n# someone else's\n")
    with pytest.raises(IntegrationError, match="not ours"):
        lv.install_hook(str(hooks), str(tmp_path / "run"), reload=False)
    with pytest.raises(IntegrationError, match="not ours"):
        lv.uninstall_hook(str(hooks), reload=False)
    lv.install_hook(str(hooks), str(tmp_path / "run"), force=True, reload=False)
    assert lv.HOOK_MARKER in path.read_text()


def test_hook_run_ignores_domains_without_metadata_and_other_operations(tmp_path: Path) -> None:
    plain = "<domain><name>plain</name></domain>"
    assert lv.hook_run(["plain", "prepare", "begin", "-"], plain, str(tmp_path)) == 0
    assert lv.hook_run(["web1", "started", "begin", "-"], DOMAIN, str(tmp_path)) == 0
    assert lv.hook_run(["web1", "release", "end", "-"], DOMAIN, str(tmp_path)) == 0
    assert list(tmp_path.iterdir()) == []


def test_hook_run_rejects_bad_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert lv.hook_run(["d", "prepare", "begin", "-"], domain_with(""), str(tmp_path)) == 1
    assert "needs <vpnnet:listen-tcp" in capsys.readouterr().err


def test_hook_starts_and_stops_a_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    xml = domain_with("<vpnnet:socket/><vpnnet:option name='dns-upstream' value='127.0.0.1:9'/>")
    env = {lv.QEMU_USER_ENV: ""}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert lv.hook_run(["d", "prepare", "begin", "-"], xml, str(run_dir)) == 0, capsys.readouterr().err
        pid = int((run_dir / "d" / "backend.pid").read_text())
        assert (run_dir / "d" / "net.sock").is_socket()
        assert "qemu_vpnnet" in " ".join(proc_cmdline(pid))
        # A second prepare (libvirtd restarted, say) replaces a stale backend.
        assert lv.hook_run(["d", "prepare", "begin", "-"], xml, str(run_dir)) == 0
        pid2 = int((run_dir / "d" / "backend.pid").read_text())
        assert pid2 != pid and not pid_alive(pid)
        assert lv.hook_run(["d", "release", "end", "-"], xml, str(run_dir)) == 0
        assert not pid_alive(pid2)
        assert not (run_dir / "d").exists()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p in (run_dir / "d" / "backend.pid",):
            if p.exists():
                terminate_pid(int(p.read_text()))


def test_hook_reports_a_backend_that_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xml = domain_with("<vpnnet:socket/><vpnnet:option name='mtu' value='5'/>")
    assert lv.hook_run(["d", "prepare", "begin", "-"], xml, str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "exited with status 2" in err and "mtu" in err.lower()
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", " x"])
def test_bad_domain_names(name: str) -> None:
    with pytest.raises(IntegrationError, match="unusable domain name"):
        lv.check_domain_name(name)

"""Self-tests of the integration harness; none of them needs qemu_vpnnet.

Baselines use QEMU's libslirp (``-netdev user``); the stream path is tested
through integration/l2switch.py, a tiny hub standing in for the backend.
"""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.backend import BackendError, dns_guarded
from integration.common import HarnessError, parse_lease_line
from integration.fixtures import NsGuestFactory, NsHostFactory, StartBackend, VmGuestFactory
from integration.netns import Netns, sweep
from integration.nsguest import NsGuest

HUB = "integration.l2switch"


def test_parse_lease_line() -> None:
    lease = parse_lease_line(
        "VPNNET-LEASE ip=10.0.2.15 mask=24 router=10.0.2.2 dns=10.0.2.3,10.0.2.4 mtu= "
        "lease=86400 domain=example.test iface=eth0 event=bound"
    )
    assert lease["ip"] == "10.0.2.15"
    assert lease["dns"] == "10.0.2.3,10.0.2.4"
    assert lease["mtu"] == ""
    assert lease["event"] == "bound"


def test_vm_guest_on_libslirp(vm_guest: VmGuestFactory, record_property: Callable[[str, object], None]) -> None:
    vm = vm_guest("echo script-says-hello\nip -4 addr show eth0\nexit 7\n", netdev="user")
    lease = vm.lease(timeout=60)
    assert lease["ip"] == "10.0.2.15"
    assert lease["mask"] == "24"
    assert lease["router"] == "10.0.2.2"
    assert lease["dns"] == "10.0.2.3"
    assert lease["event"] == "bound"
    assert vm.wait_exit(60) == 7
    assert vm.qemu_returncode == 0
    assert "script-says-hello" in vm.console_text()
    assert "inet 10.0.2.15/24" in vm.console_text()
    record_property("vm_boot_to_poweroff_seconds", round(vm.elapsed, 2))
    print(f"VM boot to poweroff: {vm.elapsed:.2f} s")


def test_vm_guest_long_script_is_compressed(vm_guest: VmGuestFactory) -> None:
    # 3 KiB of script: too long as base64 for the 2048-byte command line.
    script = "".join(f"echo line-{i:04d} >/dev/null\n" for i in range(120)) + "echo end-ok\n"
    vm = vm_guest(script, netdev="user", dhcp="off", start=False)
    assert "vpnnet.cmdz=" in vm.kernel_cmdline()
    vm.start()
    assert vm.wait_exit(60) == 0
    assert "end-ok" in vm.console_text()
    assert "VPNNET-LEASE" not in vm.console_text()


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_ns_guest_on_libslirp(ns_guest: NsGuestFactory, mtu: int) -> None:
    machine_resolv = Path("/etc/resolv.conf").read_bytes()
    guest = ns_guest(netdev="user", mtu=mtu)
    lease = guest.dhcp()
    assert lease["ip"] == "10.0.2.15"
    assert lease["mask"] == "24"
    assert lease["router"] == "10.0.2.2"
    assert lease["dns"] == "10.0.2.3"
    ping = guest.ping("10.0.2.2")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    addr = guest.run(["ip", "-4", "addr", "show", "dev", guest.ifname]).stdout
    assert "inet 10.0.2.15/24" in addr
    link = guest.run(["ip", "link", "show", "dev", guest.ifname]).stdout
    assert f"mtu {lease['mtu'] or mtu} " in link
    # The lease's DNS went to the namespace's resolv.conf, not the machine's.
    assert "nameserver 10.0.2.3" in guest.run(["cat", "/etc/resolv.conf"]).stdout
    assert "nameserver 10.0.2.3" in guest.resolv_conf()
    assert Path("/etc/resolv.conf").read_bytes() == machine_resolv


def test_ns_host_veth(ns_host: NsHostFactory) -> None:
    host = ns_host()
    ping = host.host.ping(host.outside_ip)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert host.outside_ip6 is not None
    ping6 = host.host.ping(host.outside_ip6)
    assert ping6.returncode == 0, ping6.stdout + ping6.stderr
    # An "internet" address behind the outside namespace, via the default route.
    far = host.add_outside_address("198.19.7.1/32")
    ping = host.host.ping(far)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # resolv.conf of the host namespace, settable.
    assert host.host.run(["cat", "/etc/resolv.conf"]).stdout == "nameserver 198.18.0.2\n"
    host.set_resolv_conf("nameserver 198.19.7.1\nsearch corp.test\n")
    assert host.host.run(["cat", "/etc/resolv.conf"]).stdout == ("nameserver 198.19.7.1\nsearch corp.test\n")
    # The outside cannot reach the machine's own networks: it has no route.
    route = host.outside.run(["ip", "route", "get", "192.0.2.1"])
    assert route.returncode != 0


def test_backend_wrapper_and_two_ns_guests_on_a_hub(start_backend: StartBackend, ns_guest: NsGuestFactory) -> None:
    hub = start_backend(module=HUB)
    assert hub.is_running()
    a = ns_guest(backend=hub, ipv6=False)
    b = ns_guest(backend=hub, ipv6=False, mtu=65520)
    a.run(["ip", "addr", "add", "10.77.0.1/24", "dev", a.ifname], check=True)
    b.run(["ip", "link", "set", b.ifname, "mtu", "1500"], check=True)
    b.run(["ip", "addr", "add", "10.77.0.2/24", "dev", b.ifname], check=True)
    ping = a.ping("10.77.0.2", count=2)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    hub.wait_for_log(r"port 2 connected")
    assert hub.stop() == 0
    assert "stopped" in hub.log_text()


def test_backend_in_a_host_namespace(
    start_backend: StartBackend, ns_host: NsHostFactory, ns_guest: NsGuestFactory
) -> None:
    host = ns_host()
    hub = start_backend(module=HUB, netns=host.host.name)
    assert hub.pid in host.host.pids()
    ns_guest(backend=hub)  # QEMU (root namespace) reaches it through the socket file
    hub.wait_for_log(r"port 1 connected")


def test_backend_dns_guard() -> None:
    guarded = dns_guarded(("--mtu", "65520"), netns=None)
    assert guarded == ("--mtu", "65520", "--dns-upstream", "127.0.0.1:9", "--dns-mode", "forward")
    forward = ("--dns-mode", "forward")
    assert dns_guarded(("--dns-upstream", "198.18.0.2"), netns=None) == ("--dns-upstream", "198.18.0.2", *forward)
    assert dns_guarded(("--dns-upstream=198.18.0.2",), netns=None) == ("--dns-upstream=198.18.0.2", *forward)
    # a split upstream covers one domain only: the rest still needs the guard
    split = ("--dns-upstream", "corp.test=198.18.0.2")
    assert dns_guarded(split, netns=None) == (*split, "--dns-upstream", "127.0.0.1:9", *forward)
    assert dns_guarded(("--dns-mode=forward",), netns=None) == ("--dns-mode=forward", "--dns-upstream", "127.0.0.1:9")
    with pytest.raises(HarnessError, match="root namespace"):
        dns_guarded(("--dns-upstream", "198.18.0.2", "--dns-mode", "host"), netns=None)
    assert dns_guarded((), netns="vpnt-1-h1") == ()
    assert dns_guarded((), netns=None, module=HUB) == ()


def test_vm_guest_demo_mode(vm_guest: VmGuestFactory) -> None:
    """No script: the guest serves HTTP on 80 and TCP echo on 7 until killed."""
    http, echo = free_port(), free_port()
    vm = vm_guest(netdev=f"user,hostfwd=tcp:127.0.0.1:{http}-:80,hostfwd=tcp:127.0.0.1:{echo}-:7")
    vm.wait_for(r"^VPNNET-READY http=80 echo=7\n", 60)
    assert "VPNNET-ERROR" not in vm.console_text()  # both services were seen listening (IPv4 or IPv6)
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/", timeout=10) as response:
        assert "hello from qemu-vpnnet guest" in response.read().decode()
    with socket.create_connection(("127.0.0.1", echo), timeout=10) as conn:
        conn.sendall(b"ping-pong\n")
        assert conn.recv(100) == b"ping-pong\n"
    vm.kill()
    assert vm.qemu_returncode is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_backend_start_failure_shows_its_output(start_backend: StartBackend) -> None:
    with pytest.raises(BackendError, match="No module named"):
        start_backend(module="integration.no_such_module")


UDHCPD_CONF = """\
start 10.77.0.100
end 10.77.0.150
max_leases 51
interface {ifname}
lease_file {dir}/udhcpd.leases
pidfile {dir}/udhcpd.pid
option subnet 255.255.255.0
option router 10.77.0.1
option dns 10.77.0.1
option domain example.test
option mtu 1400
option lease 600
"""

VM_FETCH = """\
cat /etc/resolv.conf
ip link show eth0
timeout 10 wget -q -O- http://10.77.0.1:8080/hello.txt
"""


def test_vm_guest_on_stream_socket(
    start_backend: StartBackend, ns_guest: NsGuestFactory, vm_guest: VmGuestFactory, tmp_path: Path
) -> None:
    """A VM on the hub gets its lease from busybox udhcpd in a namespace guest
    and fetches a page from it: the VM's -netdev stream path end to end."""
    hub = start_backend(module=HUB)
    server = ns_guest(backend=hub, ipv6=False)
    server.run(["ip", "addr", "add", "10.77.0.1/24", "dev", server.ifname], check=True)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello-over-the-hub\n")
    conf = tmp_path / "udhcpd.conf"
    conf.write_text(UDHCPD_CONF.format(ifname=server.ifname, dir=tmp_path))
    (tmp_path / "udhcpd.leases").touch()
    server.popen(["busybox", "udhcpd", "-f", str(conf)], stdout=subprocess.DEVNULL)
    server.popen(["busybox", "httpd", "-f", "-p", "8080", "-h", str(tmp_path / "www")])
    vm = vm_guest(VM_FETCH, backend=hub, mac="52:54:00:12:34:57")
    lease = vm.lease(timeout=60)
    assert lease["ip"].startswith("10.77.0.")
    assert lease["router"] == "10.77.0.1"
    assert lease["dns"] == "10.77.0.1"
    assert lease["domain"] == "example.test"
    assert lease["mtu"] == "1400"
    assert lease["lease"] == "600"
    assert vm.wait_exit(60) == 0
    console = vm.console_text()
    assert "hello-over-the-hub" in console
    assert "nameserver 10.77.0.1" in console
    assert "mtu 1400" in console


@pytest.mark.root
def test_sweep_removes_leftovers_of_dead_sessions() -> None:
    dead = Netns("vpnt-99999999-x1").create()  # no process has that PID
    try:
        assert f"netns {dead.name}" in sweep(include_own=False)
        assert not dead.etc_dir.exists()
        assert dead.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        dead.close()


@pytest.mark.root
def test_ns_guest_cleanup_after_failed_start(tmp_path: Path) -> None:
    guest = NsGuest(socket_path=tmp_path / "nobody-listens.sock", log_path=tmp_path / "q.log")
    with pytest.raises(AssertionError, match="no backend socket"):
        guest.start()
    guest.close()
    assert not guest.etc_dir.exists()

"""`qemu-vpnnet attach/detach` on a real QEMU, and what a guest sees when one side restarts.

- hot-plug into a running VM (QMP over a Unix socket), lease, hot-unplug (QMP over TCP);
- QEMU as the client (`-netdev stream,server=off`): QEMU 7.2 does not reconnect when the backend
  restarts; `detach` + `attach` bring the guest back;
- QEMU as the server (`-netdev stream,server=on`) and the backend with `--connect`: the backend
  reconnects to a restarted QEMU, and a restarted backend reconnects to QEMU, the guest keeping
  its address.

Recovery times are printed and recorded as test properties (`record_property`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from integration.common import REPO_ROOT, parse_leases
from integration.fixtures import StartBackend, VmGuestFactory
from integration.vmguest import VmGuest

# No test traffic may reach the machine's own resolver: the backends get a loopback upstream.
NO_DNS = ("--dns-upstream", "127.0.0.1:9")

ATTACH_SCRIPT = """\
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -e /sys/class/net/eth0 ] || { echo NO-ETH0; exit 3; }
echo "ETH0-APPEARED $(cat /sys/class/net/eth0/address)"
ip link set eth0 up
udhcpc -i eth0 -s /udhcpc.script -q -n -t 5 -T 2 || exit 4
ping -c 1 -W 5 10.0.2.2 >/dev/null && echo GATEWAY-PING-OK
echo WAITING-FOR-DETACH
i=0
while [ -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -e /sys/class/net/eth0 ] && exit 5
echo ETH0-GONE
sleep 2  # let QEMU finish the unplug (the ACPI eject follows the driver's removal) before poweroff
exit 0
"""

# Watches the network forever: (re)runs DHCP whenever eth0 (re)appears without an address, and
# says every 0.2 s whether the gateway answers a ping.
WATCH_SCRIPT = """\
n=0
while [ $n -lt 3000 ]; do
  n=$((n+1))
  if [ ! -e /sys/class/net/eth0 ]; then echo "NET-NOETH $n"; sleep 0.2; continue; fi
  if ! ip -4 addr show dev eth0 | grep -q inet; then
    ip link set eth0 up
    udhcpc -i eth0 -s /udhcpc.script -q -n -t 3 -T 1 >/dev/null 2>&1 || { echo "NET-NOLEASE $n"; continue; }
    echo "NET-LEASE $(ip -4 addr show dev eth0 | grep -o 'inet [0-9.]*')"
  fi
  if ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; then echo "NET-UP $n"; sleep 0.2; else echo "NET-DOWN $n"; fi
done
"""


def vpnnet(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "qemu_vpnnet", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_qmp(vm: VmGuest, timeout: float = 10.0) -> str:
    assert vm.qmp_path is not None
    deadline = time.monotonic() + timeout
    while not vm.qmp_path.exists():
        assert time.monotonic() < deadline, f"no QMP socket at {vm.qmp_path}"
        time.sleep(0.05)
    return f"unix:{vm.qmp_path}"


def test_attach_and_detach_on_a_running_vm(
    start_backend: StartBackend, vm_guest: VmGuestFactory, record_property: Callable[[str, object], None]
) -> None:
    backend = start_backend(*NO_DNS)
    qmp_port = free_tcp_port()
    vm = vm_guest(
        ATTACH_SCRIPT, dhcp="off", qmp=True, qemu_args=["-qmp", f"tcp:127.0.0.1:{qmp_port},server=on,wait=off"]
    )
    qmp = wait_for_qmp(vm)
    vm.wait_for(r"VPNNET-BOOTED\n", 60)

    # Errors first: nobody listening, and a QEMU monitor that is not there.
    bad = vpnnet("attach", "--qemu-qmp", qmp, "--socket", str(backend.socket_path) + ".none")
    assert bad.returncode == 1 and "no backend socket at" in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1

    started = time.monotonic()
    out = vpnnet("attach", "--qemu-qmp", qmp, "--socket", str(backend.socket_path), "--id", "net1",
                 "--mac", "52:54:00:aa:00:01")  # fmt: skip
    attach_seconds = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert "attached net1-nic (mac 52:54:00:aa:00:01) on netdev net1" in out.stdout

    dup = vpnnet("attach", "--qemu-qmp", qmp, "--socket", str(backend.socket_path), "--id", "net1")
    assert dup.returncode == 1
    assert dup.stderr.strip() == "qemu-vpnnet attach: netdev_add: Duplicate ID 'net1'", dup.stderr

    vm.wait_for(r"ETH0-APPEARED 52:54:00:aa:00:01\n", 30)
    lease = vm.lease(60)
    lease_seconds = time.monotonic() - started
    assert lease["ip"] == "10.0.2.15" and lease["router"] == "10.0.2.2"
    vm.wait_for(r"GATEWAY-PING-OK\n", 30)
    vm.wait_for(r"WAITING-FOR-DETACH\n", 30)

    started = time.monotonic()
    out = vpnnet("detach", "--qemu-qmp", f"tcp:127.0.0.1:{qmp_port}", "--id", "net1")
    detach_seconds = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "detached net1-nic, net1"
    vm.wait_for(r"ETH0-GONE\n", 30)
    assert vm.wait_exit(60) == 0
    backend.wait_for_log(r"guest disconnected", 10)

    again = vpnnet("detach", "--qemu-qmp", "unix:/nonexistent/qmp.sock", "--id", "net1")
    assert again.returncode == 1 and "cannot connect to the QEMU monitor" in again.stderr
    for name, value in (("attach", attach_seconds), ("lease_after_attach", lease_seconds),
                        ("detach", detach_seconds)):  # fmt: skip
        record_property(f"{name}_seconds", round(value, 2))
    print(f"attach {attach_seconds:.2f} s, lease {lease_seconds:.2f} s after attach, detach {detach_seconds:.2f} s")


def wait_console(vm: VmGuest, pattern: str, timeout: float) -> float:
    """Wait for `pattern` in console output that arrives from now on; return the seconds it took."""
    started = time.monotonic()
    vm.wait_for(pattern, timeout, pos=len(vm.console_text()))
    return time.monotonic() - started


def test_backend_restart_with_qemu_as_client_needs_reattach(
    start_backend: StartBackend,
    vm_guest: VmGuestFactory,
    vpnnet_run_dir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    sock = vpnnet_run_dir / f"client-{os.getpid()}.sock"
    backend = start_backend(*NO_DNS, socket_path=sock)
    vm = vm_guest(WATCH_SCRIPT, dhcp="off", qmp=True)
    qmp = wait_for_qmp(vm)
    vm.wait_for(r"VPNNET-BOOTED\n", 60)
    out = vpnnet("attach", "--qemu-qmp", qmp, "--socket", str(sock), "--id", "net1")
    assert out.returncode == 0, out.stderr
    wait_console(vm, r"^NET-UP \d+\n", 60)

    # The backend restarts on the same socket. QEMU 7.2 (server=off) has no reconnect= option
    # and stays disconnected: the guest keeps eth0 and its address, but nothing answers.
    backend.stop()
    start_backend(*NO_DNS, socket_path=sock)
    wait_console(vm, r"^NET-DOWN \d+\n", 10)
    time.sleep(2)
    text = vm.console_text()
    assert "NET-UP" not in text[text.rindex("NET-DOWN") :], "QEMU 7.2 reconnected by itself?"

    # Recovery: unplug and plug the NIC again; the guest sees a new eth0 and runs DHCP.
    started = time.monotonic()
    out = vpnnet("detach", "--qemu-qmp", qmp, "--id", "net1")
    assert out.returncode == 0, out.stderr
    out = vpnnet("attach", "--qemu-qmp", qmp, "--socket", str(sock), "--id", "net1")
    assert out.returncode == 0, out.stderr
    vm.wait_for(r"^NET-UP \d+\n", 60, pos=len(text))
    recovery = time.monotonic() - started
    record_property("reattach_recovery_seconds", round(recovery, 2))
    print(f"QEMU as client: backend restarted; detach + attach + DHCP + first ping: {recovery:.2f} s")


def test_backend_connects_to_a_listening_qemu_and_both_may_restart(
    start_backend: StartBackend,
    vm_guest: VmGuestFactory,
    vpnnet_run_dir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    qemu_sock = vpnnet_run_dir / f"qemu-listens-{os.getpid()}.sock"
    netdev = f"stream,server=on,addr.type=unix,addr.path={qemu_sock}"
    vm = vm_guest(WATCH_SCRIPT, netdev=netdev, dhcp="off")
    deadline = time.monotonic() + 10
    while not qemu_sock.exists():
        assert time.monotonic() < deadline, "QEMU did not create its listening socket"
        time.sleep(0.05)
    backend = start_backend(*NO_DNS, "--connect", str(qemu_sock))
    backend.wait_for_log(r"guest connected: port=\d+ stream connect=", 10)
    lease_line = vm.wait_for(r"^NET-LEASE inet (\S+)\n", 60)
    wait_console(vm, r"^NET-UP \d+\n", 30)

    # 1. The backend restarts: it connects to QEMU again at once, QEMU accepts again, the guest
    # keeps its address and its traffic flows again.
    backend.stop()
    wait_console(vm, r"^NET-DOWN \d+\n", 10)
    started = time.monotonic()
    backend = start_backend(*NO_DNS, "--connect", str(qemu_sock))
    vm.wait_for(r"^NET-UP \d+\n", 30, pos=len(vm.console_text()))
    backend_restart = time.monotonic() - started
    assert "NET-LEASE" not in vm.console_text()[lease_line.end() :], "the guest lost its address"

    # 2. QEMU restarts (a new VM on the same socket): the backend, still running, reconnects
    # within its 1 s retry period and the new guest gets a lease.
    vm.kill()
    backend.wait_for_log(r"guest disconnected", 10)
    started = time.monotonic()
    vm2 = vm_guest(WATCH_SCRIPT, netdev=netdev, dhcp="off")
    connects = backend.log_text().count("guest connected")
    deadline = time.monotonic() + 20
    while backend.log_text().count("guest connected") == connects:
        assert time.monotonic() < deadline, "the backend did not reconnect to the new QEMU"
        time.sleep(0.05)
    reconnect = time.monotonic() - started
    vm2.wait_for(r"^NET-UP \d+\n", 60)
    assert parse_leases(vm2.console_text()) or "NET-LEASE" in vm2.console_text()
    qemu_restart = time.monotonic() - started

    record_property("backend_restart_to_traffic_seconds", round(backend_restart, 2))
    record_property("qemu_restart_to_reconnect_seconds", round(reconnect, 2))
    record_property("qemu_restart_to_guest_traffic_seconds", round(qemu_restart, 2))
    print(
        f"QEMU as server: backend restart -> guest traffic {backend_restart:.2f} s; "
        f"QEMU restart -> backend reconnected {reconnect:.2f} s, -> new guest's traffic {qemu_restart:.2f} s"
    )

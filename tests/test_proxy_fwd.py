"""The proxy in the route table (core/fwd.py): the explicit proxy as a gateway service, and the
checks that keep the explicit proxy's direct connections inside the policy."""

import pytest

from qemu_vpnnet.core import fwd as F
from qemu_vpnnet.io.http_proxy import add_explicit_proxy
from tests.test_fwd import decide, table


def test_the_explicit_proxy_is_a_gateway_service_even_under_restrict() -> None:
    t = table("deny tcp 10.0.2.2", restrict=True)
    add_explicit_proxy(t, 3128)
    assert decide(t, "tcp", "10.0.2.2", 3128) == "local http-proxy [http-proxy]"
    assert decide(t, "tcp", "10.0.2.2", 3129) == "refuse [r1]"
    assert decide(t, "udp", "10.0.2.2", 3128) == "refuse [restrict]"  # TCP only
    assert decide(t, "tcp", "10.0.2.3", 3128) == "refuse [virtual]"  # the gateway's address only
    described = t.describe()[0]
    assert (described["id"], described["origin"], described["service"]) == ("http-proxy", "builtin", "http-proxy")


def test_the_explicit_proxy_port_can_be_taken_only_once() -> None:
    t = table()
    add_explicit_proxy(t, 3128)
    with pytest.raises(ValueError, match="exists already"):
        add_explicit_proxy(t, 3128)
    t.remove_guestfwd(F.PROTO_TCP, t.config.host_ip, 3128)
    assert decide(t, "tcp", "10.0.2.2", 3128) == "direct"  # the host's own 127.0.0.1:3128 again


# what the explicit proxy's check (HttpProxy.checked_address) sees for a destination: only DIRECT
# and PROXY may be connected to
EXPLICIT_CASES = [
    ("198.51.100.7", 80, "direct"),
    ("127.0.0.1", 8080, "refuse [virtual]"),  # the backend's own loopback, by its address: never
    ("10.0.2.2", 8080, "direct"),  # the gateway (the host's 127.0.0.1): as the policy says
    ("10.0.2.2", 3128, "local http-proxy [http-proxy]"),  # itself: refused by the check
    ("10.0.2.3", 53, "local dns [dns]"),
    ("192.0.2.1", 80, "refuse [r1]"),
    ("203.0.113.9", 443, "proxy https [proxy-https]"),  # a proxied port: allowed
]


@pytest.mark.parametrize(("dst", "port", "want"), EXPLICIT_CASES)
def test_what_the_explicit_proxy_may_connect_to(dst: str, port: int, want: str) -> None:
    t = table("deny tcp 192.0.2.0/24")
    add_explicit_proxy(t, 3128)
    t.proxy_https_ports = {443}
    assert decide(t, "tcp", dst, port) == want


def test_no_host_loopback_keeps_the_explicit_proxy_from_the_host() -> None:
    t = table(host_loopback=False)
    add_explicit_proxy(t, 3128)
    assert decide(t, "tcp", "10.0.2.2", 8080) == "refuse [virtual]"
    assert decide(t, "tcp", "10.0.2.2", 3128) == "local http-proxy [http-proxy]"

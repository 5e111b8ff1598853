"""Request rewriting of the HTTP proxy (io/http_proxy.py): absolute form, hop-by-hop headers."""

import h11
import pytest

from qemu_vpnnet.io.http_proxy import absolute_target, authority_text, forward_headers, split_url
from qemu_vpnnet.io.proxy_config import ProxyConfigError


@pytest.mark.parametrize(
    ("target", "host", "dst", "port", "want"),
    [
        (b"/a?b=1", b"www.test", "198.19.1.1", 80, (b"http://www.test/a?b=1", "www.test", 80)),
        (b"/", b"www.test:8080", "198.19.1.1", 80, (b"http://www.test:8080/", "www.test", 8080)),
        (b"/", b"www.test", "198.19.1.1", 8080, (b"http://www.test:8080/", "www.test", 8080)),  # port from the flow
        (b"/x", b"", "198.19.1.1", 80, (b"http://198.19.1.1/x", "198.19.1.1", 80)),  # no Host: the address
        (b"/x", b"[2001:db8::1]:81", "198.19.1.1", 80, (b"http://[2001:db8::1]:81/x", "2001:db8::1", 81)),
        (b"http://other.test/y", b"www.test", "198.19.1.1", 80, (b"http://other.test/y", "other.test", 80)),
        (b"*", b"www.test", "198.19.1.1", 80, (b"http://www.test/", "www.test", 80)),
    ],
)
def test_transparent_requests_in_absolute_form(
    target: bytes, host: bytes, dst: str, port: int, want: tuple[bytes, str, int]
) -> None:
    assert absolute_target(target, host, dst, port) == want


def test_a_bad_host_header_is_an_error() -> None:
    with pytest.raises(ProxyConfigError):
        absolute_target(b"/", b"www.test:http", "198.19.1.1", 80)


def test_explicit_urls() -> None:
    assert split_url(b"http://www.test/a/b?c") == ("www.test", 80, b"/a/b?c")
    assert split_url(b"HTTP://www.test:8080") == ("www.test", 8080, b"/")
    assert split_url(b"http://www.test?q=1") == ("www.test", 80, b"/?q=1")
    for bad in (b"/relative", b"https://www.test/", b"http:///path"):
        with pytest.raises(ProxyConfigError):
            split_url(bad)


def test_ipv6_literals_in_explicit_urls_and_what_is_shown_of_them() -> None:
    host, port, path = split_url(b"http://[2001:db8:19::1]:8080/a")
    assert (host, port, path) == ("2001:db8:19::1", 8080, b"/a")
    assert authority_text(host, port) == "[2001:db8:19::1]:8080"  # not 2001:db8:19::1:8080
    assert authority_text("www.test", 80) == "www.test:80"


def request_headers(raw: bytes) -> h11.Request:
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + raw + b"\r\n")
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


def test_hop_by_hop_headers_and_the_guests_proxy_authorization_are_dropped() -> None:
    event = request_headers(
        b"Connection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\nProxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic Z3Vlc3Q=\r\nX-Secret: 1\r\nTE: trailers\r\nAccept: */*\r\nX-Case: Kept\r\n"
    )
    assert forward_headers(event.headers, keep_upgrade=True) == [
        (b"Host", b"a"),
        (b"Accept", b"*/*"),
        (b"X-Case", b"Kept"),
    ]


def test_an_upgrade_keeps_its_headers() -> None:
    event = request_headers(b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n")
    headers = forward_headers(event.headers, keep_upgrade=True)
    assert (b"Upgrade", b"websocket") in headers and (b"Connection", b"upgrade") in headers
    assert (b"Upgrade", b"websocket") not in forward_headers(event.headers, keep_upgrade=False)


def test_the_size_of_a_complete_head_is_measured() -> None:
    from qemu_vpnnet.io.http_proxy import MAX_HEAD, head_size

    small = request_headers(b"Accept: */*\r\n")
    assert head_size(small) < 100
    big = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    big.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")  # all at once
    event = big.next_event()
    assert isinstance(event, h11.Request) and head_size(event) > MAX_HEAD

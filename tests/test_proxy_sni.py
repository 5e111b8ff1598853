"""The TLS ClientHello SNI parser (io/tls_sni.py), fed real ClientHellos from Python's ssl module."""

import ssl

import pytest

from qemu_vpnnet.io.tls_sni import FOUND, NEED_MORE, NOT_TLS, parse_client_hello


def client_hello(server_name: str | None, **options: object) -> bytes:
    """The first flight of a TLS client (ssl with a MemoryBIO): its ClientHello records."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, value in options.items():
        setattr(context, name, value)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_server_name_of_a_real_client_hello() -> None:
    hello = client_hello("secure.Example.test")
    assert parse_client_hello(hello) == (FOUND, "secure.example.test")


def test_tls12_only_client_hello() -> None:
    hello = client_hello("old.example.test", maximum_version=ssl.TLSVersion.TLSv1_2)
    assert parse_client_hello(hello) == (FOUND, "old.example.test")


def test_no_sni_for_an_address() -> None:
    hello = client_hello(None)
    assert parse_client_hello(hello) == (FOUND, "")


def test_every_prefix_of_a_hello_needs_more() -> None:
    hello = client_hello("www.example.test")
    for end in range(len(hello)):
        assert parse_client_hello(hello[:end])[0] == NEED_MORE, end
    assert parse_client_hello(hello + b"more bytes after it") == (FOUND, "www.example.test")


def test_a_hello_split_over_several_records() -> None:
    hello = client_hello("split.example.test")
    body = hello[5:]
    records = b""
    for start in range(0, len(body), 100):
        piece = body[start : start + 100]
        records += bytes((22, 3, 1)) + len(piece).to_bytes(2, "big") + piece
    assert parse_client_hello(records) == (FOUND, "split.example.test")
    assert parse_client_hello(records[:-1])[0] == NEED_MORE


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x02\x00\x00\x10" + b"\x01" * 16,  # not TLS 1.x
        b"\x17\x03\x03\x00\x05hello",  # application data first
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x50\x00",  # a record longer than 2^14
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a hello longer than MAX_HELLO
    ],
)
def test_what_is_not_a_client_hello(data: bytes) -> None:
    assert parse_client_hello(data)[0] == NOT_TLS


def test_malformed_lengths_inside_a_hello_are_not_tls() -> None:
    hello = bytearray(client_hello("bad.example.test"))
    # the session id's length byte (after 5 record + 4 handshake + 2 version + 32 random) too large
    broken = bytearray(hello)
    broken[5 + 4 + 2 + 32] = 0xFF
    assert parse_client_hello(bytes(broken)) == (NOT_TLS, "")
    # the server name's own length too large: the extension is malformed
    at = bytes(hello).find(b"bad.example.test")
    broken = bytearray(hello)
    broken[at - 2 : at] = (0xFFFF).to_bytes(2, "big")
    assert parse_client_hello(bytes(broken)) == (NOT_TLS, "")
    # a name that is not a DNS name is ignored (CONNECT by address then)
    broken = bytearray(hello)
    broken[at : at + 3] = b"b\x00d"
    assert parse_client_hello(bytes(broken)) == (FOUND, "")

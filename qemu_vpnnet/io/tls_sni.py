"""The server name (SNI) of a TLS ClientHello: read from the first bytes a guest sends, never decrypted.

A bounded parser of RFC 8446 section 4.1.2 (and RFC 6066 section 3, server_name) over the TLS
records that carry the ClientHello (content type 22, handshake; the message may be split over
several records). `parse_client_hello(data)` looks at the bytes received so far and answers:

- `NEED_MORE`: a valid beginning, not complete yet (the caller waits, up to a time limit);
- `NOT_TLS`: not a TLS ClientHello (garbage, another protocol, a malformed or oversized one);
- `FOUND`: complete; `name` is the host_name of the server_name extension ("" when there is
  none, or when it is not a plausible DNS name).

Bounds: the ClientHello may be at most MAX_HELLO bytes; nothing past it is read.
"""

from typing import Final

NEED_MORE: Final = 0
NOT_TLS: Final = 1
FOUND: Final = 2

MAX_HELLO: Final = 65536  # handshake message bytes (a post-quantum key share is ~1.2 KiB; 64 KiB is plenty)
RECORD_HEADER: Final = 5
MAX_RECORD: Final = 16384 + 256  # TLSPlaintext.length may not exceed 2^14 (a little slack, as OpenSSL allows)
CONTENT_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1
EXT_SERVER_NAME: Final = 0
NAME_TYPE_HOST: Final = 0
MAX_NAME: Final = 253
NAME_CHARS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


def handshake_bytes(data: bytes) -> tuple[int, bytes]:
    """The handshake bytes carried by the records at the start of data: (status, bytes),
    status NEED_MORE while the ClientHello's length is not covered yet."""
    out = bytearray()
    offset = 0
    while True:
        if len(data) - offset < RECORD_HEADER:
            return NEED_MORE, bytes(out)
        ctype = data[offset]
        major = data[offset + 1]
        length = (data[offset + 3] << 8) | data[offset + 4]
        if ctype != CONTENT_HANDSHAKE or major != 3 or length == 0 or length > MAX_RECORD:
            return NOT_TLS, b""
        end = offset + RECORD_HEADER + length
        out += data[offset + RECORD_HEADER : min(end, len(data))]
        if len(out) >= 4:
            if out[0] != HANDSHAKE_CLIENT_HELLO:
                return NOT_TLS, b""
            wanted = 4 + ((out[1] << 16) | (out[2] << 8) | out[3])
            if wanted > MAX_HELLO + 4:
                return NOT_TLS, b""
            if len(out) >= wanted:
                return FOUND, bytes(out[:wanted])
        if end > len(data):
            return NEED_MORE, bytes(out)
        offset = end


def parse_client_hello(data: bytes) -> tuple[int, str]:
    """(NEED_MORE | NOT_TLS | FOUND, server name) for the first bytes of a connection."""
    status, message = handshake_bytes(data)
    if status != FOUND:
        return status, ""
    try:
        return FOUND, server_name(message)
    except IndexError:
        return NOT_TLS, ""


def server_name(message: bytes) -> str:
    """The host_name in a complete ClientHello handshake message; IndexError when malformed."""
    end = len(message)
    pos = 4 + 2 + 32  # handshake header, legacy_version, random
    pos = skip_vector(message, pos, 1, end)  # legacy_session_id
    pos = skip_vector(message, pos, 2, end)  # cipher_suites
    pos = skip_vector(message, pos, 1, end)  # legacy_compression_methods
    if pos == end:
        return ""  # no extensions (SSL 3.0-style hello)
    ext_end = pos + 2 + read_int(message, pos, 2, end)
    if ext_end != end:
        raise IndexError("extensions do not end with the message")
    pos += 2
    while pos < ext_end:
        ext_type = read_int(message, pos, 2, ext_end)
        ext_len = read_int(message, pos + 2, 2, ext_end)
        body = pos + 4
        pos = body + ext_len
        if pos > ext_end:
            raise IndexError("extension runs past the extensions")
        if ext_type == EXT_SERVER_NAME:
            return host_name(message, body, pos)
    return ""


def host_name(message: bytes, pos: int, end: int) -> str:
    """The host_name entry of a server_name extension body at message[pos:end]."""
    list_end = pos + 2 + read_int(message, pos, 2, end)
    if list_end > end:
        raise IndexError("server name list runs past its extension")
    pos += 2
    while pos < list_end:
        name_type = message[pos]
        length = read_int(message, pos + 1, 2, list_end)
        start = pos + 3
        pos = start + length
        if pos > list_end:
            raise IndexError("server name runs past its list")
        if name_type == NAME_TYPE_HOST:
            raw = message[start:pos]
            if not 0 < len(raw) <= MAX_NAME or not NAME_CHARS.issuperset(raw):
                return ""
            return raw.decode("ascii").lower().rstrip(".")
    return ""


def read_int(data: bytes, pos: int, size: int, end: int) -> int:
    if pos + size > end:
        raise IndexError("field runs past its end")
    return int.from_bytes(data[pos : pos + size], "big")


def skip_vector(data: bytes, pos: int, size: int, end: int) -> int:
    """Past a vector with a size-byte length prefix at pos."""
    after = pos + size + read_int(data, pos, size, end)
    if after > end:
        raise IndexError("vector runs past the message")
    return after

"""The QMP input framing: JSON values split out of a byte stream, bounded, with QEMU-like errors."""

from qemu_vpnnet.control.qmp_json import JsonParseError, JsonStreamer, JsonTooLong, JsonValue, Parsed


def values(items: list[Parsed]) -> list[object]:
    return [item.value if isinstance(item, JsonValue) else item for item in items]


def test_one_object_per_line() -> None:
    s = JsonStreamer()
    assert values(s.feed(b'{"execute": "quit"}\r\n')) == [{"execute": "quit"}]
    assert s.pending() == 0


def test_objects_need_no_newline_and_may_span_lines_and_reads() -> None:
    s = JsonStreamer()
    assert values(s.feed(b'{"a": 1}{"b": [2, {}]} {"c"')) == [{"a": 1}, {"b": [2, {}]}]
    assert values(s.feed(b":\n 3}")) == [{"c": 3}]


def test_braces_and_escapes_inside_strings_do_not_count() -> None:
    s = JsonStreamer()
    assert values(s.feed(b'{"x": "}{][\\"\\\\", "y": "\\')) == []
    assert values(s.feed(b'u00e9"}')) == [{"x": '}{]["\\', "y": "é"}]


def test_scalars_and_garbage_at_top_level() -> None:
    s = JsonStreamer()
    out = s.feed(b'42 "text" foo }\n')
    assert out[:2] == [JsonValue(42), JsonValue("text")]
    assert out[2] == JsonParseError("JSON parse error, invalid keyword 'foo'")
    assert isinstance(out[3], JsonParseError)
    assert values(s.feed(b'{"ok": true}\n')) == [{"ok": True}]


def test_malformed_object_is_one_error_then_parsing_goes_on() -> None:
    s = JsonStreamer()
    out = s.feed(b'{"execute": quit}\n{"execute": "quit"}\n')
    assert isinstance(out[0], JsonParseError) and out[0].message.startswith("JSON parse error, ")
    assert out[1] == JsonValue({"execute": "quit"})


def test_what_python_accepts_but_qemu_does_not() -> None:
    s = JsonStreamer()
    assert s.feed(b'{"a": NaN}') == [JsonParseError("JSON parse error, invalid keyword 'NaN'")]
    assert s.feed(b'{"a": 1, "a": 2}') == [JsonParseError("JSON parse error, duplicate key 'a'")]
    assert s.feed(b'"\xff"\n') == [JsonParseError("JSON parse error, invalid UTF-8 sequence")]


def test_raw_newline_in_a_string_ends_the_message_with_an_error() -> None:
    s = JsonStreamer()
    out = s.feed(b'{"execute": "qu\n')
    assert len(out) == 1 and isinstance(out[0], JsonParseError)
    assert values(s.feed(b'{"execute": "quit"}\n')) == [{"execute": "quit"}]


def test_too_long_message_is_dropped_up_to_the_next_newline() -> None:
    s = JsonStreamer(limit=1000)
    out: list[Parsed] = []
    for _ in range(100):  # 100 KB without a newline, in 1 KB reads
        out += s.feed(b'{"x": "' + b"a" * 1024)
        assert s.pending() <= 1000 + 1024
    assert out == [JsonTooLong("JSON parse error, message longer than 1000 bytes")]
    assert s.feed(b'aaa"}{"still": "discarded"}\n{"next": 1}\n') == [JsonValue({"next": 1})]


def test_too_long_bare_word_is_bounded_too() -> None:
    s = JsonStreamer(limit=100)
    out = s.feed(b"x" * 150)
    assert len(out) == 1 and isinstance(out[0], JsonTooLong)
    assert s.pending() == 0
    assert values(s.feed(b"xxx\n[1]\n")) == [[1]]


def test_nesting_is_bounded() -> None:
    s = JsonStreamer(max_depth=32)
    out = s.feed(b"[" * 33 + b"\n[[1]]\n")
    assert isinstance(out[0], JsonTooLong)
    assert values(out[1:]) == [[[1]]]

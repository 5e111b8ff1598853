"""Proxy settings (io/proxy_config.py): proxy URLs, curl's no_proxy, ports, the environment, the options."""

import argparse

import pytest

from qemu_vpnnet.io.proxy_config import (
    NoProxy,
    ProxyConfigError,
    ProxySettings,
    ProxyUrl,
    add_proxy_options,
    parse_ports,
    safe_text,
    settings_from_args,
    settings_from_env,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("http://proxy.corp:3128", ProxyUrl("proxy.corp", 3128)),
        ("proxy.corp:8080", ProxyUrl("proxy.corp", 8080)),
        ("proxy.corp", ProxyUrl("proxy.corp", 1080)),  # curl's default port
        ("HTTP://u:p@10.0.0.1:3128/", ProxyUrl("10.0.0.1", 3128, "u", "p")),
        ("http://dom%5Cuser:p%40ss:w@proxy:1", ProxyUrl("proxy", 1, "dom\\user", "p@ss:w")),
        ("http://[2001:db8::1]:3128", ProxyUrl("2001:db8::1", 3128)),
        ("http://user@proxy:3128", ProxyUrl("proxy", 3128, "user", "")),
    ],
)
def test_proxy_urls(text: str, want: ProxyUrl) -> None:
    assert ProxyUrl.parse(text) == want


@pytest.mark.parametrize(
    "text", ["", "https://proxy:443", "socks5://proxy:1080", "http://:3128", "proxy:0", "proxy:99999", "proxy:x"]
)
def test_bad_proxy_urls(text: str) -> None:
    with pytest.raises(ProxyConfigError):
        ProxyUrl.parse(text)


def test_credentials_become_basic_and_never_show() -> None:
    url = ProxyUrl.parse("http://alice:s3cret@proxy:3128")
    assert url.authorization() == b"Basic YWxpY2U6czNjcmV0"
    assert url.text() == "http://alice@proxy:3128"
    assert ProxyUrl.parse("proxy:3128").authorization() == b""
    assert safe_text("http://alice:s3cret@proxy:3128") == "http://alice:***@proxy:3128"
    with pytest.raises(ProxyConfigError) as info:
        ProxyUrl.parse("http://alice:s3cret@:3128")
    assert "s3cret" not in str(info.value)


NO_PROXY = NoProxy.parse("example.com, .corp.test,10.0.0.0/8 192.0.2.7,[2001:db8::/32],intranet:8080,*.wild.test")


@pytest.mark.parametrize(
    ("names", "addr", "port", "want"),
    [
        (["example.com"], "", 80, True),
        (["www.Example.COM."], "", 80, True),  # case and a trailing dot do not matter
        (["badexample.com"], "", 80, False),  # a suffix only at a dot
        (["a.b.corp.test"], "", 443, True),
        (["corp.test"], "", 443, True),  # a leading dot changes nothing (curl)
        (["x.wild.test"], "", 80, True),
        ([], "10.1.2.3", 80, True),  # CIDR
        ([], "192.0.2.7", 80, True),
        ([], "192.0.2.8", 80, False),
        (["10.9.9.9"], "", 80, True),  # an address as a Host name counts as an address
        ([], "2001:db8::5", 443, True),
        (["intranet"], "", 8080, True),  # a port names only that port
        (["intranet"], "", 80, False),
        (["other.test", "example.com"], "198.51.100.1", 80, True),  # any of the names
        (["other.test"], "198.51.100.1", 80, False),
    ],
)
def test_no_proxy_matches_like_curl(names: list[str], addr: str, port: int, want: bool) -> None:
    assert NO_PROXY.matches(names, addr, port) is want


def test_no_proxy_star_and_empty() -> None:
    assert NoProxy.parse("*").matches(["anything"], "", 1)
    assert not NoProxy.parse("").matches(["anything"], "1.2.3.4", 80)
    assert not NoProxy.parse("")
    assert NoProxy.parse("a.test, 10.0.0.0/8").text() == "a.test,10.0.0.0/8"


@pytest.mark.parametrize("text", ["a*b.test", "[::1", "host:port", "1.2.3.4/40:80", "x:70000"])
def test_bad_no_proxy_entries(text: str) -> None:
    with pytest.raises(ProxyConfigError):
        NoProxy.parse(text)


def test_ports() -> None:
    assert parse_ports("80,8080, 80", "x") == (80, 8080)
    assert parse_ports("", "x") == ()
    for bad in ("0", "65536", "http"):
        with pytest.raises(ProxyConfigError):
            parse_ports(bad, "x")


def test_environment_lower_case_first_and_options_win() -> None:
    env = {
        "HTTP_PROXY": "http://upper:1",
        "http_proxy": "http://lower:2",
        "HTTPS_PROXY": "secure:3",
        "NO_PROXY": "a.test",
    }
    settings = settings_from_env(ProxySettings(), env)
    assert settings.http == ProxyUrl("lower", 2)
    assert settings.https == ProxyUrl("secure", 3)
    assert settings.no_proxy.text() == "a.test"
    given = settings_from_env(ProxySettings(http=ProxyUrl("cli", 9)), env)
    assert given.http == ProxyUrl("cli", 9)
    with pytest.raises(ProxyConfigError, match="environment"):
        settings_from_env(ProxySettings(), {"http_proxy": "socks5://x:1"})


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_proxy_options(parser)
    return parser.parse_args(argv)


def test_options_and_their_defaults() -> None:
    settings = settings_from_args(parse(), {})
    assert (settings.http, settings.https, settings.http_ports, settings.https_ports, settings.explicit_port) == (
        None,
        None,
        (80,),
        (443,),
        3128,
    )
    settings = settings_from_args(
        parse("--http-proxy", "u:p@proxy:3128", "--transparent-http-ports", "80,8080", "--no-explicit-proxy"), {}
    )
    assert settings.http == ProxyUrl("proxy", 3128, "u", "p")
    assert settings.http_ports == (80, 8080)
    assert settings.explicit_port == 0
    from_env = settings_from_args(parse("--proxy-env"), {"https_proxy": "p:1", "no_proxy": "x.test"})
    assert from_env.https == ProxyUrl("p", 1) and from_env.http is None
    described = settings_from_args(parse("--http-proxy", "http://u:secret@p:1"), {}).describe()
    assert described["http-proxy"] == "http://u@p:1" and "secret" not in str(described)


@pytest.mark.parametrize("argv", [["--http-proxy", "ftp://x"], ["--no-proxy", "a*b"], ["--explicit-proxy-port", "-1"]])
def test_bad_options_are_parse_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)

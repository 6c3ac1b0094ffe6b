"""Tests for postcopy.transport.uri: QEMU-style tcp:/unix: URIs, canonical text, loopback."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.transport import Uri, UriError, parse_uri


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:4444", Uri("tcp", "127.0.0.1", 4444)),
        ("tcp:localhost:0", Uri("tcp", "localhost", 0)),
        ("tcp:Dest-Host.example.org:65535", Uri("tcp", "dest-host.example.org", 65535)),
        ("tcp:[::1]:4444", Uri("tcp", "::1", 4444)),
        ("tcp:[0:0:0:0:0:0:0:1]:4444", Uri("tcp", "::1", 4444)),
        ("tcp:[fe80::1%eth0]:5", Uri("tcp", "fe80::1%eth0", 5)),
        ("tcp::4444", Uri("tcp", "", 4444)),
        ("unix:/run/postcopy/migrate.sock", Uri("unix", path="/run/postcopy/migrate.sock")),
        ("unix:relative.sock", Uri("unix", path="relative.sock")),
        ("unix:/with:colon", Uri("unix", path="/with:colon")),
    ],
)
def test_parse_accepts_qemu_forms(text: str, expected: Uri) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("tcp:127.0.0.1:4444", "tcp:127.0.0.1:4444"),
        ("tcp:[0:0::1]:4444", "tcp:[::1]:4444"),
        ("tcp:LOCALHOST:1", "tcp:localhost:1"),
        ("tcp::80", "tcp::80"),
        ("unix:/tmp/a b", "unix:/tmp/a b"),
    ],
)
def test_str_gives_canonical_form(text: str, canonical: str) -> None:
    uri = parse_uri(text)
    assert str(uri) == canonical
    assert parse_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no scheme"),
        ("localhost4444", "no scheme"),
        ("exec:cat", "not supported"),
        ("rdma:host:1", "not supported"),
        ("http:host:1", "unknown scheme"),
        ("tcp://host:1", "without '//'"),
        ("tcp:host", "no port"),
        ("tcp:host:", "no port"),
        ("tcp:host:http", "not a number"),
        ("tcp:host:-1", "not a number"),
        ("tcp:host:65536", "outside 0..65535"),
        ("tcp:host:" + "9" * 5000, "outside 0..65535"),  # beyond int()'s digit limit
        ("tcp:::1:4444", "needs brackets"),
        ("tcp:[::1:4444", "closing ']'"),
        ("tcp:[::1]4444", "':PORT'"),
        ("tcp:[127.0.0.1]:1", "not an IPv6 address"),
        ("tcp:300.1.1.1:1", "not a valid IPv4"),
        ("tcp:bad_host:1", "not a valid hostname"),
        ("tcp:-bad.example:1", "not a valid hostname"),
        ("tcp:host:1,ipv4=on", "options"),
        ("unix:", "empty socket path"),
        ("unix:/a\0b", "NUL"),
        ("unix:/" + "x" * 200, "the kernel allows 107"),
    ],
)
def test_parse_rejects_bad_forms_naming_text_and_problem(text: str, complaint: str) -> None:
    with pytest.raises(UriError) as info:
        parse_uri(text)
    message = str(info.value)
    assert complaint in message
    assert repr(text) in message
    assert isinstance(info.value, ValueError)


def test_non_text_is_rejected() -> None:
    with pytest.raises(UriError, match="must be text"):
        parse_uri(4444)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("tcp:127.0.0.1:1", True),
        ("tcp:127.255.0.9:1", True),
        ("tcp:[::1]:1", True),
        ("tcp:[::ffff:127.0.0.1]:1", True),
        ("tcp:localhost:1", True),
        ("unix:/tmp/s", True),
        ("tcp:0.0.0.0:1", False),
        ("tcp:[::]:1", False),
        ("tcp::1", False),
        ("tcp:10.0.0.1:1", False),
        ("tcp:[fe80::1]:1", False),
        ("tcp:myhost:1", False),
        ("tcp:localhost.example.org:1", False),
    ],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert parse_uri(text).is_loopback is loopback


def test_uri_is_frozen_and_hashable() -> None:
    uri = parse_uri("tcp:127.0.0.1:1")
    with pytest.raises(AttributeError):
        uri.port = 2  # type: ignore[misc]
    assert {uri, parse_uri("tcp:127.0.0.1:1")} == {uri}


def test_constructors_and_with_port() -> None:
    assert Uri.tcp("::1", 0).with_port(4444) == parse_uri("tcp:[::1]:4444")
    assert Uri.unix("/tmp/x") == parse_uri("unix:/tmp/x")
    with pytest.raises(UriError):
        Uri.unix("/tmp/x").with_port(1)
    with pytest.raises(UriError):
        Uri.tcp("127.0.0.1", 70000)


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(min_value=0, max_value=65535),
)
def test_tcp_round_trip_for_any_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    uri = Uri.tcp(str(address), port)
    assert parse_uri(str(uri)) == uri
    assert uri.host == str(address)
    assert uri.is_loopback == address.is_loopback or (
        isinstance(address, ipaddress.IPv6Address)
        and address.ipv4_mapped is not None
        and address.ipv4_mapped.is_loopback
    )

"""Migration URIs in QEMU's forms: `tcp:HOST:PORT` and `unix:PATH`.

`parse_uri` turns text into a `Uri`; `str(uri)` gives the canonical text back, so
`parse_uri(str(u)) == u`. Hosts may be IPv4 addresses, hostnames, or IPv6 addresses in
brackets (`tcp:[::1]:4444`); an empty host (`tcp::4444`, as in QEMU) means "every
address" and is only useful for listening. Port 0 asks the kernel for a free port when
listening; the listener then reports the port it got.

No name resolution happens here: `is_loopback` is decided from the text alone (a
hostname other than `localhost` is not known to be local, so it counts as remote).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from postcopy.transport.errors import UriError

__all__ = ["Uri", "UriError", "parse_uri"]

Scheme = Literal["tcp", "unix"]

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_FORMS = "expected tcp:HOST:PORT (IPv6 as tcp:[ADDR]:PORT) or unix:PATH"


@dataclass(frozen=True)
class Uri:
    """One endpoint: `scheme` "tcp" with `host` and `port`, or "unix" with `path`."""

    scheme: Scheme
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def tcp(cls, host: str, port: int) -> Uri:
        """A TCP endpoint; `host` is checked and canonicalised like parsed text."""
        return cls("tcp", _canonical_host(host, f"tcp:{host}:{port}"), _check_port(port, ""))

    @classmethod
    def unix(cls, path: str) -> Uri:
        """A Unix stream socket endpoint at `path`."""
        return cls("unix", path=_check_unix_path(path, f"unix:{path}"))

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        return f"tcp:{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets, `localhost`, 127.0.0.0/8 and ::1 (also IPv4-mapped)."""
        if self.scheme == "unix":
            return True
        host = self.host or ""
        if host.lower() in ("localhost", "localhost."):
            return True
        address = _ip_address(host)
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback

    def with_port(self, port: int) -> Uri:
        """The same TCP endpoint with another port (a listener reports its real port so)."""
        if self.scheme != "tcp":
            raise UriError(f"{self}: only tcp URIs have a port")
        return Uri("tcp", self.host, _check_port(port, str(self)))


def parse_uri(text: str) -> Uri:
    """Parse QEMU-style migration URI text; raises `UriError` naming what is wrong."""
    if not isinstance(text, str):
        raise UriError(f"migration URI must be text, not {type(text).__name__}: {text!r}")
    scheme, colon, rest = text.partition(":")
    if not colon:
        raise UriError(f"{text!r}: no scheme; {_FORMS}")
    if scheme == "unix":
        return Uri("unix", path=_check_unix_path(rest, text))
    if scheme != "tcp":
        if scheme in ("exec", "fd", "file", "rdma", "vsock", "channel-type"):
            raise UriError(f"{text!r}: scheme {scheme!r} is not supported; {_FORMS}")
        raise UriError(f"{text!r}: unknown scheme {scheme!r}; {_FORMS}")
    if rest.startswith("//"):
        raise UriError(f"{text!r}: write tcp:HOST:PORT, without '//'")
    if "," in rest:
        raise UriError(f"{text!r}: QEMU socket options (',...') are not supported")
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise UriError(f"{text!r}: '[' without a closing ']' around the IPv6 address")
        host_text, after = rest[1:close], rest[close + 1 :]
        if not after.startswith(":"):
            raise UriError(f"{text!r}: expected ':PORT' after the bracketed address")
        address = _ip_address(host_text)
        if not isinstance(address, ipaddress.IPv6Address):
            raise UriError(f"{text!r}: {host_text!r} in brackets is not an IPv6 address")
        port_text = after[1:]
    else:
        host_text, colon, port_text = rest.rpartition(":")
        if not colon:
            raise UriError(f"{text!r}: no port; write tcp:HOST:PORT")
        if ":" in host_text:
            raise UriError(
                f"{text!r}: an IPv6 address needs brackets, e.g. tcp:[{host_text}]:{port_text}"
            )
    return Uri("tcp", _canonical_host(host_text, text), _parse_port(port_text, text))


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _canonical_host(host: str, text: str) -> str:
    if host == "":
        return ""
    address = _ip_address(host)
    if address is not None:
        return str(address)
    if re.fullmatch(r"[0-9.]+", host):
        raise UriError(f"{text!r}: {host!r} is not a valid IPv4 address")
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in name.split(".")):
        raise UriError(f"{text!r}: {host!r} is not a valid hostname or address")
    return host.lower()


def _parse_port(port_text: str, text: str) -> int:
    if port_text == "":
        raise UriError(f"{text!r}: no port after ':'")
    if not port_text.isdigit() or not port_text.isascii():
        raise UriError(
            f"{text!r}: port {port_text!r} is not a number (service names are not supported)"
        )
    if len(port_text.lstrip("0")) > 5:  # int() of thousands of digits is slow, then refused
        shown = port_text if len(port_text) <= 12 else port_text[:12] + "..."
        raise UriError(f"{text!r}: port {shown!r} is outside 0..65535")
    return _check_port(int(port_text), text)


def _check_port(port: int, text: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UriError(f"{text!r}: port {port!r} is outside 0..65535")
    return port


def _check_unix_path(path: str, text: str) -> str:
    if path == "":
        raise UriError(f"{text!r}: empty socket path; write unix:PATH")
    if "\0" in path:
        raise UriError(f"{text!r}: socket path contains a NUL byte")
    encoded = len(path.encode("utf-8", "surrogateescape"))
    if encoded > UNIX_PATH_MAX:
        raise UriError(
            f"{text!r}: socket path is {encoded} bytes, the kernel allows {UNIX_PATH_MAX}; "
            "use a shorter path"
        )
    return path

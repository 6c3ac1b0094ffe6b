"""Listening and connecting sockets for `unix:` and `tcp:` service addresses (non-blocking
once set up). The migration's transport does more (authentication, TLS, channels); the
service front and its clients need only plain stream sockets on one host."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from postcopy.transport.uri import Uri, parse_uri


def _family(uri: Uri) -> socket.AddressFamily:
    if uri.scheme == "unix":
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in (uri.host or "") else socket.AF_INET


def listen(address: str | Uri, backlog: int = 128) -> tuple[socket.socket, Uri]:
    """A non-blocking listening socket and the URI it really listens on (port 0 filled in).
    A Unix socket path that exists already is refused, not replaced."""
    uri = parse_uri(address) if isinstance(address, str) else address
    sock = socket.socket(_family(uri), socket.SOCK_STREAM)
    try:
        if uri.scheme == "unix":
            assert uri.path is not None
            sock.bind(uri.path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((uri.host or "", uri.port))
            uri = Uri.tcp(uri.host or "0.0.0.0", sock.getsockname()[1])
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, uri


def connect(address: str | Uri, timeout: float = 5.0) -> socket.socket:
    """A connected, non-blocking stream socket (TCP_NODELAY on TCP)."""
    uri = parse_uri(address) if isinstance(address, str) else address
    sock = socket.socket(_family(uri), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        target: Any = uri.path if uri.scheme == "unix" else (uri.host, uri.port)
        sock.connect(target)
        sock.setblocking(False)
        if uri.scheme == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def remove_unix_socket(uri: Uri) -> None:
    if uri.scheme == "unix" and uri.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uri.path)

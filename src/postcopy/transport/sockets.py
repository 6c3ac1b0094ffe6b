"""Plain sockets for the stream: open (connect), bind and listen, tune, name the peer.

What `connection` does before any handshake: resolving and connecting a `tcp:` or `unix:`
endpoint, binding a listener (dual-stack TCP; a Unix socket whose stale file is removed
only when nobody listens there), the socket options every stream socket gets, and the
peer's name for messages. Errors are `ConnectError` and `ListenError` naming the endpoint.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
from collections.abc import Iterator
from typing import Any

from postcopy.transport.errors import ConnectError, ListenError
from postcopy.transport.uri import Uri


def tune(sock: socket.socket, socket_buffer: int | None) -> None:
    """The options of every stream socket: no Nagle on TCP, the buffer size if one is asked."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # The stream interleaves small commands and page requests with bulk data:
        # never let Nagle hold a page request back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if socket_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)


def open_socket(
    endpoint: Uri, timeout: float, socket_buffer: int | None
) -> tuple[socket.socket, str]:
    """A socket connected to endpoint within timeout, and the peer's name for messages."""
    if endpoint.scheme == "unix":
        assert endpoint.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tune(sock, socket_buffer)
        sock.settimeout(timeout)
        try:
            sock.connect(endpoint.path)
        except OSError as error:
            sock.close()
            hint = (
                " (is the destination listening?)"
                if isinstance(error, FileNotFoundError | ConnectionRefusedError)
                else ""
            )
            raise ConnectError(
                f"cannot connect to {endpoint}: {error.strerror or error}{hint}"
            ) from error
        return sock, str(endpoint)

    if not endpoint.host:
        raise ConnectError(f"cannot connect to {endpoint}: no host given")
    deadline = time.monotonic() + timeout
    try:
        addresses = socket.getaddrinfo(
            endpoint.host, endpoint.port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )
    except socket.gaierror as error:
        raise ConnectError(f"cannot resolve {endpoint.host}: {error.strerror}") from error
    last_error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            tune(sock, socket_buffer)  # before connect, so the window scale fits the buffer
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(address)
        except OSError as error:
            sock.close()
            last_error = error
            continue
        host, port = sock.getpeername()[:2]
        return sock, str(Uri("tcp", host, port))
    assert last_error is not None
    reason = (
        "timed out"
        if isinstance(last_error, TimeoutError)
        else (last_error.strerror or str(last_error))
    )
    hint = (
        " (is the destination listening?)" if isinstance(last_error, ConnectionRefusedError) else ""
    )
    raise ConnectError(f"cannot connect to {endpoint}: {reason}{hint}") from last_error


def bind_tcp(endpoint: Uri, backlog: int, socket_buffer: int | None) -> socket.socket:
    """A listening TCP socket; an empty host listens on every address, IPv6 and IPv4."""
    candidates: list[tuple[socket.AddressFamily, Any]]
    if endpoint.host == "":
        if socket.has_dualstack_ipv6():
            candidates = [(socket.AF_INET6, ("::", endpoint.port))]
        else:
            candidates = [(socket.AF_INET, ("0.0.0.0", endpoint.port))]
    else:
        try:
            infos = socket.getaddrinfo(
                endpoint.host,
                endpoint.port,
                socket.AF_UNSPEC,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                socket.AI_PASSIVE,
            )
        except socket.gaierror as error:
            raise ListenError(
                f"cannot listen on {endpoint}: cannot resolve {endpoint.host}: {error.strerror}"
            ) from error
        candidates = [(info[0], info[4]) for info in infos]
    family, address = candidates[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    with _listen_errors(endpoint, sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if endpoint.host == "" and family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tune(sock, socket_buffer)  # accepted sockets inherit the options
        sock.bind(address)
        sock.listen(backlog)
    return sock


def bind_unix(
    endpoint: Uri, backlog: int, socket_buffer: int | None
) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket and the (device, inode) of its file, to remove only ours."""
    path = endpoint.path
    assert path is not None
    _remove_stale_socket(endpoint, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _listen_errors(endpoint, sock):
        tune(sock, socket_buffer)
        sock.bind(path)
        info = os.lstat(path)
        sock.listen(backlog)
    return sock, (info.st_dev, info.st_ino)


@contextlib.contextmanager
def _listen_errors(endpoint: Uri, sock: socket.socket) -> Iterator[None]:
    """Close sock and raise ListenError naming the endpoint if setting it up fails."""
    try:
        yield
    except OSError as error:
        sock.close()
        raise ListenError(
            error.errno, f"cannot listen on {endpoint}: {error.strerror or error}"
        ) from error


def _remove_stale_socket(endpoint: Uri, path: str) -> None:
    """Remove a socket file left by a dead listener; refuse to touch anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(
            errno.EEXIST, f"cannot listen on {endpoint}: {path} exists and is not a socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover from a process that died
        return
    except OSError:
        return  # let bind report the real problem
    finally:
        probe.close()
    raise ListenError(
        errno.EADDRINUSE, f"cannot listen on {endpoint}: another process is listening there"
    )


def describe_peer(sock: socket.socket, listen_uri: Uri, address: object) -> str:
    """An accepted peer's name for messages: its tcp: address, or the socket and its pid."""
    if sock.family == socket.AF_UNIX:
        try:
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid = int.from_bytes(credentials[:4], "little")
            return f"{listen_uri} (pid {pid})"
        except OSError:
            return str(listen_uri)
    if isinstance(address, tuple) and len(address) >= 2:
        return str(Uri("tcp", str(address[0]), int(address[1])))
    return str(address)

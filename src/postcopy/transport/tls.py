"""Optional TLS for migration connections, with the standard library's `ssl`.

TLS wraps the socket first; the authentication hello of `postcopy.transport.auth` then
runs inside the TLS session. The client verifies the destination's certificate by
default (against `cafile`, or the system's CAs when `cafile` is None) and checks its
name against `server_hostname` or the host of the URI. The destination can also demand
a client certificate (`verify_client=True`), which counts as authentication of the
source just like a shared key. TLS 1.2 is the oldest version accepted.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass

from postcopy.transport.errors import TlsConfigError, TlsError

__all__ = [
    "TlsClientConfig",
    "TlsServerConfig",
    "describe_error",
    "wrap_client",
    "wrap_server",
]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TlsServerConfig:
    """The destination's certificate and key; with `verify_client`, the CA for sources."""

    certfile: PathLike
    keyfile: PathLike
    cafile: PathLike | None = None
    verify_client: bool = False

    def __post_init__(self) -> None:
        if self.verify_client and self.cafile is None:
            raise TlsConfigError(
                "verify_client needs cafile: the CA that signs the sources' certificates"
            )

    def context(self) -> ssl.SSLContext:
        """A server context with the files loaded (errors name the file at fault)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(context, self.certfile, self.keyfile)
        if self.cafile is not None:
            _load_ca(context, self.cafile)
        context.verify_mode = ssl.CERT_REQUIRED if self.verify_client else ssl.CERT_NONE
        return context


@dataclass(frozen=True)
class TlsClientConfig:
    """The CA that signed the destination's certificate; optionally our own certificate."""

    cafile: PathLike | None
    certfile: PathLike | None = None
    keyfile: PathLike | None = None
    server_hostname: str | None = None

    def __post_init__(self) -> None:
        if self.keyfile is not None and self.certfile is None:
            raise TlsConfigError("a TLS client keyfile needs its certfile")

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the server's certificate and name."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cafile is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            _load_ca(context, self.cafile)
        if self.certfile is not None:
            _load_chain(context, self.certfile, self.keyfile)
        return context


def wrap_server(sock: socket.socket, context: ssl.SSLContext, peer: str) -> ssl.SSLSocket:
    """Run the server side of the TLS handshake on an accepted socket."""
    try:
        tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (ssl.SSLError, OSError) as error:
        raise TlsError(f"cannot start TLS with {peer}: {describe_error(error)}") from error
    try:
        tls_sock.do_handshake()
    except TimeoutError as error:
        raise TlsError(f"TLS handshake with {peer} timed out") from error
    except (ssl.SSLError, OSError) as error:
        raise TlsError(
            f"TLS handshake with source {peer} failed: {describe_error(error)}"
            + _hint(error, server_side=True)
        ) from error
    return tls_sock


def wrap_client(
    sock: socket.socket, context: ssl.SSLContext, server_hostname: str, peer: str
) -> ssl.SSLSocket:
    """Run the client side of the TLS handshake; the certificate must match `server_hostname`."""
    try:
        tls_sock = context.wrap_socket(
            sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        tls_sock.do_handshake()
    except TimeoutError as error:
        raise TlsError(f"TLS handshake with {peer} timed out") from error
    except (ssl.SSLError, OSError, ValueError) as error:
        raise TlsError(
            f"TLS handshake with destination {peer} failed: {describe_error(error)}"
            + _hint(error, server_side=False)
        ) from error
    return tls_sock


def describe_error(error: BaseException) -> str:
    """A short human reading of an ssl or socket error."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.replace("_", " ").lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _hint(error: BaseException, *, server_side: bool) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            " (is the CA file the one that signed the peer's certificate, and does the "
            "certificate name the host you connect to?)"
        )
    if isinstance(error, ssl.SSLError) and error.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST"):
        return " (the peer does not speak TLS: configure TLS on both sides, or on neither)"
    if isinstance(error, ConnectionError | ssl.SSLEOFError):
        side = "source" if server_side else "destination"
        return f" (the {side} closed the connection: is TLS configured on both sides?)"
    return ""


def _load_chain(context: ssl.SSLContext, certfile: PathLike, keyfile: PathLike | None) -> None:
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as error:
        raise TlsConfigError(
            f"cannot load TLS certificate {os.fspath(certfile)} "
            f"with key {os.fspath(keyfile) if keyfile is not None else '(in the same file)'}: "
            f"{describe_error(error)}"
        ) from error


def _load_ca(context: ssl.SSLContext, cafile: PathLike) -> None:
    try:
        context.load_verify_locations(cafile=cafile)
    except (ssl.SSLError, OSError) as error:
        raise TlsConfigError(
            f"cannot load TLS CA file {os.fspath(cafile)}: {describe_error(error)}"
        ) from error

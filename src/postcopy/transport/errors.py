"""Errors raised by the transport layer, in one place so every module can share them.

Every error derives from `TransportError`. A peer refused during the pre-stream handshake
raises a `HandshakeError` (its subclasses say why: `AuthenticationError`, `TlsError`);
callers that only want "the other side is not acceptable" catch `HandshakeError`.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error this layer raises on purpose."""


class UriError(TransportError, ValueError):
    """A migration URI is malformed; the message names the text and what is wrong."""


class InsecureListenError(TransportError):
    """Refusing to listen on a network address with neither a key nor TLS client checks."""


class KeyFileError(TransportError, ValueError):
    """A key file cannot be used (missing, empty, readable by others)."""


class TlsConfigError(TransportError, ValueError):
    """A TLS certificate, key or CA file cannot be loaded."""


class ListenError(TransportError, OSError):
    """Listening on an address failed (in use, not permitted, a non-socket file in the way)."""


class ConnectError(TransportError, ConnectionError):
    """Opening a connection to the destination failed (refused, unreachable, timed out)."""


class ConnectionClosed(TransportError, ConnectionError):
    """The peer closed the connection before the expected bytes arrived."""


class HandshakeError(TransportError):
    """The pre-stream handshake failed: the peer is not acceptable or not a postcopy peer."""


class AuthenticationError(HandshakeError):
    """Keys are missing on one side or differ: the peer proved nothing, or proved wrongly."""


class TlsError(HandshakeError):
    """The TLS handshake failed (certificate not trusted, TLS on one side only, ...)."""

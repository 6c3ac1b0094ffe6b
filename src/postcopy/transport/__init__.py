"""Connections that carry the migration stream: TCP, Unix, TLS, authentication.

Layer 4. It moves bytes and knows no message types. Typical use:

    destination:  listener = listen("tcp:0.0.0.0:4444", auth=AuthConfig.from_file(key))
                  main = listener.accept()
                  preempt = listener.accept_channel(main.session, "preempt", timeout=10)
    source:       main = connect("tcp:dest:4444", auth=AuthConfig.from_file(key))
                  preempt = connect("tcp:dest:4444", auth=..., channel="preempt",
                                    session=main.session)
"""

from postcopy.transport.auth import (
    MAIN_CHANNEL,
    PREEMPT_CHANNEL,
    AuthConfig,
    new_session,
)
from postcopy.transport.connection import (
    Connection,
    Listener,
    check_listen_security,
    connect,
    listen,
)
from postcopy.transport.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    HandshakeError,
    InsecureListenError,
    KeyFileError,
    ListenError,
    TlsConfigError,
    TlsError,
    TransportError,
    UriError,
)
from postcopy.transport.tls import TlsClientConfig, TlsServerConfig
from postcopy.transport.uri import Uri, parse_uri

__all__ = [
    "MAIN_CHANNEL",
    "PREEMPT_CHANNEL",
    "AuthConfig",
    "AuthenticationError",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "HandshakeError",
    "InsecureListenError",
    "KeyFileError",
    "ListenError",
    "Listener",
    "TlsClientConfig",
    "TlsConfigError",
    "TlsError",
    "TlsServerConfig",
    "TransportError",
    "Uri",
    "UriError",
    "check_listen_security",
    "connect",
    "listen",
    "new_session",
    "parse_uri",
]

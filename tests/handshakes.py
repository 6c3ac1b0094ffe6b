"""One handshake run on both ends at once, for the transport tests (auth, TLS)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

from postcopy.transport import (
    AuthConfig,
    Connection,
    Listener,
    TlsClientConfig,
    TlsServerConfig,
    connect,
    listen,
)

Closing = list[Connection | Listener | socket.socket]
"""What the `closing` fixture (conftest.py) closes at the end of a test."""

Outcome = Connection | BaseException


def handshake_both_ends(
    pool: ThreadPoolExecutor,
    closing: Closing,
    uri: str = "tcp:127.0.0.1:0",
    *,
    destination_auth: AuthConfig | None,
    source_auth: AuthConfig | None,
    server_tls: TlsServerConfig | None = None,
    client_tls: TlsClientConfig | None = None,
) -> tuple[Outcome, Outcome]:
    """Listen, connect and accept; each side's connection or the exception it raised."""
    listener = listen(uri, auth=destination_auth, tls=server_tls)
    closing.append(listener)
    accepted = pool.submit(listener.accept, 10)
    source: Outcome
    try:
        source = connect(listener.uri, auth=source_auth, tls=client_tls, timeout=10)
        closing.append(source)
    except Exception as error:
        source = error
    destination = accepted.exception(10) or accepted.result()
    if isinstance(destination, Connection):
        closing.append(destination)
    return source, destination

"""Tests for TLS connections: certificates from a throwaway CA made with the openssl CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from postcopy.transport import (
    AuthConfig,
    AuthenticationError,
    Connection,
    HandshakeError,
    TlsClientConfig,
    TlsConfigError,
    TlsError,
    TlsServerConfig,
    connect,
    listen,
)
from tests.handshakes import Closing, handshake_both_ends

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        shutil.which("openssl") is None,
        reason="the openssl command is needed to make test certificates",
    ),
]

MiB = 1 << 20


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def new_key_request(name: str) -> tuple[str, ...]:
    """openssl req arguments: a new P-256 key in name.key, unencrypted, subject CN=name."""
    return (
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-subj",
        f"/CN={name}",
    )


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    openssl(
        *new_key_request(name),
        "-x509",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return directory / f"{name}.pem", directory / f"{name}.key"


def make_leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> None:
    openssl(*new_key_request(name), "-out", f"{name}.csr", cwd=directory)
    (directory / f"{name}.ext").write_text(
        extensions + "\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=directory,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "test-ca")
    other_ca = make_ca(directory, "other-ca")
    make_leaf(
        directory,
        "server",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth",
    )
    make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth")
    return Pki(
        ca[0],
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
        other_ca[0],
    )


def attempt(
    uri: str,
    pool: ThreadPoolExecutor,
    closing: Closing,
    *,
    server_tls: TlsServerConfig | None,
    client_tls: TlsClientConfig | None,
    auth: AuthConfig | None = None,
) -> tuple[Connection | BaseException, Connection | BaseException]:
    return handshake_both_ends(
        pool,
        closing,
        uri,
        destination_auth=auth,
        source_auth=auth,
        server_tls=server_tls,
        client_tls=client_tls,
    )


def server(pki: Pki, **options: object) -> TlsServerConfig:
    return TlsServerConfig(pki.server_cert, pki.server_key, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:0", "tcp:localhost:0"])
def test_tls_with_the_right_ca_carries_data(
    uri: str, pki: Pki, pool: ThreadPoolExecutor, closing: Closing
) -> None:
    source, destination = attempt(
        uri, pool, closing, server_tls=server(pki), client_tls=TlsClientConfig(pki.ca)
    )
    assert isinstance(source, Connection) and isinstance(destination, Connection)
    assert source.tls and destination.tls
    assert not destination.authenticated  # TLS alone proves the server, not the source
    payload = np.random.default_rng(5).integers(0, 256, 8 * MiB, dtype=np.uint8)
    # Pages (joined into larger TLS writes), one as bytes, then whole MiB written directly.
    data = payload.data
    pieces: list[memoryview | bytes] = [data[i : i + 4096] for i in range(0, 4 * MiB, 4096)]
    pieces[10] = bytes(pieces[10])
    pieces += [data[i : i + MiB] for i in range(4 * MiB, 8 * MiB, MiB)]
    sending = pool.submit(source.send_all, pieces)
    received = np.zeros_like(payload)
    destination.recv_exact_into(received.data)
    assert sending.result(30) == 8 * MiB
    assert np.array_equal(received, payload)


def test_tls_with_the_wrong_ca_is_refused(
    pki: Pki, pool: ThreadPoolExecutor, closing: Closing
) -> None:
    source, destination = attempt(
        "tcp:127.0.0.1:0",
        pool,
        closing,
        server_tls=server(pki),
        client_tls=TlsClientConfig(pki.other_ca),
    )
    assert isinstance(source, TlsError), source
    assert "certificate verify failed" in str(source)
    assert isinstance(destination, TlsError), destination


def test_tls_checks_the_host_name(pki: Pki, pool: ThreadPoolExecutor, closing: Closing) -> None:
    source, destination = attempt(
        "tcp:127.0.0.1:0",
        pool,
        closing,
        server_tls=server(pki),
        client_tls=TlsClientConfig(pki.ca, server_hostname="migration.example.org"),
    )
    assert isinstance(source, TlsError) and "certificate verify failed" in str(source)
    assert isinstance(destination, TlsError)


def test_plain_source_is_told_that_tls_is_required(
    pki: Pki, pool: ThreadPoolExecutor, closing: Closing
) -> None:
    source, destination = attempt(
        "tcp:127.0.0.1:0", pool, closing, server_tls=server(pki), client_tls=None
    )
    assert isinstance(source, TlsError) and "destination requires TLS" in str(source)
    assert isinstance(destination, TlsError) and "destination requires TLS" in str(destination)


def test_tls_source_to_plain_destination_fails_on_both_ends(
    pki: Pki, pool: ThreadPoolExecutor, closing: Closing
) -> None:
    source, destination = attempt(
        "tcp:127.0.0.1:0", pool, closing, server_tls=None, client_tls=TlsClientConfig(pki.ca)
    )
    assert isinstance(source, TlsError), source
    assert isinstance(destination, TlsError), destination
    assert "not configured for TLS" in str(destination)


def test_client_certificate_verification(
    pki: Pki, pool: ThreadPoolExecutor, closing: Closing
) -> None:
    verifying = server(pki, cafile=pki.ca, verify_client=True)
    source, destination = attempt(
        "tcp:127.0.0.1:0",
        pool,
        closing,
        server_tls=verifying,
        client_tls=TlsClientConfig(pki.ca, certfile=pki.client_cert, keyfile=pki.client_key),
    )
    assert isinstance(source, Connection) and isinstance(destination, Connection)
    assert destination.authenticated

    source, destination = attempt(
        "tcp:127.0.0.1:0", pool, closing, server_tls=verifying, client_tls=TlsClientConfig(pki.ca)
    )
    assert isinstance(source, TlsError), source
    assert isinstance(destination, TlsError), destination


def test_verified_clients_allow_listening_without_a_key(pki: Pki) -> None:
    # The check happens before binding, so nothing listens on a network address here.
    from postcopy.transport import InsecureListenError

    with pytest.raises(InsecureListenError):
        listen("tcp:0.0.0.0:0", auth=None, tls=server(pki))
    with pytest.raises(TlsConfigError, match="verify_client needs cafile"):
        server(pki, verify_client=True)


def test_tls_and_key_together(pki: Pki, pool: ThreadPoolExecutor, closing: Closing) -> None:
    key = AuthConfig.generate()
    source, destination = attempt(
        "tcp:127.0.0.1:0",
        pool,
        closing,
        server_tls=server(pki),
        client_tls=TlsClientConfig(pki.ca),
        auth=key,
    )
    assert isinstance(source, Connection) and isinstance(destination, Connection)
    assert source.tls and source.authenticated and destination.authenticated

    listener = listen("tcp:127.0.0.1:0", auth=key, tls=server(pki))
    closing.append(listener)
    refused = pool.submit(listener.accept, 10)
    with pytest.raises(AuthenticationError, match="wrong key"):
        connect(listener.uri, auth=AuthConfig.generate(), tls=TlsClientConfig(pki.ca))
    assert isinstance(refused.exception(10), AuthenticationError)


def test_tls_over_unix_socket_needs_a_server_name(
    pki: Pki, tmp_path: Path, pool: ThreadPoolExecutor, closing: Closing
) -> None:
    uri = f"unix:{os.path.relpath(tmp_path / 't.sock')}"
    with pytest.raises(TlsConfigError, match="server_hostname"):
        connect(uri, tls=TlsClientConfig(pki.ca))
    source, destination = attempt(
        uri,
        pool,
        closing,
        server_tls=server(pki),
        client_tls=TlsClientConfig(pki.ca, server_hostname="localhost"),
    )
    assert isinstance(source, Connection) and isinstance(destination, Connection)
    source.send_all([b"over unix"])
    assert destination.recv_exact(9) == b"over unix"


def test_bad_tls_files_name_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsConfigError, match=r"missing\.pem"):
        TlsServerConfig(missing, pki.server_key).context()
    with pytest.raises(TlsConfigError, match="cannot load TLS CA file"):
        TlsClientConfig(missing).context()
    with pytest.raises(TlsConfigError):
        TlsServerConfig(pki.server_cert, pki.client_key).context()  # key of another cert
    assert issubclass(TlsError, HandshakeError)


def test_a_shutdown_never_hands_ciphertext_to_a_reader(
    pki: Pki, pool: ThreadPoolExecutor, closing: Closing
) -> None:
    """Pausing a migration shuts down a connection that another thread is reading. The
    reader must see the end of the stream, not the TLS records still in the kernel's
    buffer as raw bytes (ssl.SSLSocket.shutdown drops the TLS state first: a recovery
    test found such bytes placed in guest RAM as pages)."""
    source, destination = attempt(
        "tcp:127.0.0.1:0",
        pool,
        closing,
        server_tls=server(pki),
        client_tls=TlsClientConfig(pki.ca),
    )
    assert isinstance(source, Connection) and isinstance(destination, Connection)
    source.send_all([bytes(MiB)])  # zeros: any other byte read below is not our data
    first = np.ones(4096, dtype=np.uint8)
    destination.recv_exact_into(first.data)
    assert not first.any()
    destination.shutdown()
    rest = np.zeros(MiB, dtype=np.uint8)
    view = memoryview(rest.data).cast("B")
    read = 0
    with contextlib.suppress(OSError):  # ConnectionClosed, or the TLS layer's own error
        while read < MiB:
            count = destination.recv_into(view[read:])
            if count == 0:
                break
            read += count
    assert not rest.any(), f"{np.count_nonzero(rest)} non-zero bytes after the shutdown"

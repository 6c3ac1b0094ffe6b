"""Shared-key authentication and the pre-stream hello that every connection starts with.

Before any byte of the migration stream, the two ends exchange a fixed-size hello and,
when they share a key, prove it to each other with HMAC-SHA256 challenge-response. The
`Connection` objects of `postcopy.transport.connection` are only handed out after this
handshake succeeded, so no RAM byte can cross an unauthenticated link.

Wire format (all integers big-endian; "source" is the connecting side, "destination"
the listening side; with TLS all of it runs inside the TLS session):

Hello, 76 bytes, sent once by each side, the source first:

    offset size field
         0    8 magic    b"POSTCOPY"
         8    2 version  1
        10    2 flags    bit 0 KEY: this side has a key and requires authentication
                         bit 1 TLS: this side runs the connection inside TLS
                         bit 2 DESTINATION: set by the listening side only
                         other bits zero (a receiver refuses unknown bits)
        12   16 channel  ASCII name, NUL-padded: "main", or "preempt" for the second
                         channel that carries urgent pages
        28   16 session  random id chosen by the source for its main connection and
                         repeated on its preempt connection, so the destination can pair them
        44   32 nonce    fresh random bytes (secrets.token_bytes(32))

The destination's hello repeats the source's channel and session. After the two hellos,
frames: u8 kind, u16 payload length, payload.

    kind 1 PROOF   32 bytes: HMAC-SHA256(key, label || source hello || destination hello)
                   label b"postcopy-auth-v1 source proof\\0" or "... destination proof\\0"
    kind 2 ACCEPT  empty: the handshake is complete, the migration stream follows
    kind 3 REFUSE  u8 reason (1 authentication, 2 protocol, 3 TLS) then a UTF-8 message
                   for a human (at most 1024 bytes); the sender closes the connection

Sequence:

    source -> destination  HELLO
    destination -> source  HELLO, then
                           REFUSE  if it cannot accept the source's hello, or exactly
                                   one side has a key
                           ACCEPT  if neither side has a key (done)
                           PROOF   if both have keys
    source -> destination  PROOF   if the destination's proof is right,
                           REFUSE  "authentication failed: wrong key" if not
    destination -> source  ACCEPT  if the source's proof is right,
                           REFUSE  "authentication failed: wrong key" if not

Each proof covers both hellos, hence both nonces, the channel, the session, the flags and
the role, under a label that differs per role: a recorded handshake cannot be replayed to
a destination (its new nonce changes what the source must prove), a proof cannot be
reflected back to its sender, and the channel or session of a connection cannot be
changed by a man in the middle without breaking the proofs. Comparisons use
`hmac.compare_digest`. The key never crosses the link.

Key files: `AuthConfig.from_file` strips trailing newlines, refuses an empty key and,
like ssh with private keys, refuses a file that its group or other users may access
(fix with `chmod 600 FILE`). Keys should be random (`AuthConfig.generate()` or
`head -c 32 /dev/urandom`); a short passphrase is open to offline guessing by anyone
who records a handshake, so keys shorter than 16 bytes draw a warning.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import os
import re
import secrets
import stat
import struct
import warnings
from dataclasses import dataclass, field
from typing import Protocol

from postcopy.transport.errors import (
    AuthenticationError,
    ConnectionClosed,
    HandshakeError,
    KeyFileError,
    TlsError,
)

__all__ = [
    "HELLO_SIZE",
    "MAGIC",
    "MAIN_CHANNEL",
    "NONCE_SIZE",
    "PREEMPT_CHANNEL",
    "PROTOCOL_VERSION",
    "SESSION_SIZE",
    "AuthConfig",
    "HandshakeResult",
    "Hello",
    "RefuseReason",
    "client_handshake",
    "new_session",
    "server_handshake",
]

MAGIC = b"POSTCOPY"
PROTOCOL_VERSION = 1
NONCE_SIZE = 32
SESSION_SIZE = 16
CHANNEL_SIZE = 16
MAIN_CHANNEL = "main"
PREEMPT_CHANNEL = "preempt"
MIN_RECOMMENDED_KEY_SIZE = 16
MAX_REFUSE_MESSAGE = 1024

FLAG_KEY = 0x1
FLAG_TLS = 0x2
FLAG_DESTINATION = 0x4
_KNOWN_FLAGS = FLAG_KEY | FLAG_TLS | FLAG_DESTINATION

_HELLO = struct.Struct(f">8sHH{CHANNEL_SIZE}s{SESSION_SIZE}s{NONCE_SIZE}s")
HELLO_SIZE = _HELLO.size
_FRAME_HEADER = struct.Struct(">BH")
_PROOF_SIZE = hashlib.sha256().digest_size
_CHANNEL_NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")
_SOURCE_LABEL = b"postcopy-auth-v1 source proof\0"
_DESTINATION_LABEL = b"postcopy-auth-v1 destination proof\0"

WRONG_KEY = "authentication failed: wrong key"
DESTINATION_NEEDS_KEY = "destination requires authentication: give --key FILE"
SOURCE_NEEDS_KEY = (
    "the source has a key but the destination has none: give the destination the same "
    "--key FILE (or drop --key on the source)"
)


class _FrameKind(enum.IntEnum):
    PROOF = 1
    ACCEPT = 2
    REFUSE = 3


class RefuseReason(enum.IntEnum):
    """Why a REFUSE frame was sent; picks the exception class on the receiving side."""

    AUTHENTICATION = 1
    PROTOCOL = 2
    TLS = 3


_FRAME_KINDS = frozenset(int(kind) for kind in _FrameKind)


_REFUSE_ERRORS: dict[int, type[HandshakeError]] = {
    RefuseReason.AUTHENTICATION: AuthenticationError,
    RefuseReason.PROTOCOL: HandshakeError,
    RefuseReason.TLS: TlsError,
}


class Stream(Protocol):
    """What the handshake needs of a socket (plain or TLS)."""

    def sendall(self, data: bytes, /) -> None: ...

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...


MAX_KEY_FILE_BYTES = 64 * 1024


@dataclass(frozen=True, eq=False)
class AuthConfig:
    """A shared secret key; both ends of a migration must hold the same one."""

    key: bytes = field(repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuthConfig):
            return NotImplemented
        return hmac.compare_digest(self.key, other.key)

    def __hash__(self) -> int:
        return hash((AuthConfig, hashlib.sha256(self.key).digest()))

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes):
            raise KeyFileError(f"key must be bytes, not {type(self.key).__name__}")
        if not self.key:
            raise KeyFileError("empty key: a key must contain at least one byte")
        if len(self.key) < MIN_RECOMMENDED_KEY_SIZE:
            warnings.warn(
                f"key is only {len(self.key)} bytes; use at least {MIN_RECOMMENDED_KEY_SIZE} "
                "random bytes (e.g. head -c 32 /dev/urandom > FILE)",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, check_permissions: bool = True
    ) -> AuthConfig:
        """Read a key file: trailing newlines stripped, empty or group/other-accessible refused."""
        name = os.fspath(path)
        if "\0" in name:
            raise KeyFileError(f"cannot read key file {name!r}: the name contains a NUL byte")
        try:
            # O_NONBLOCK: a FIFO must not hang us; only a regular file of sane size is read
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                mode = os.fstat(fd).st_mode
                if not stat.S_ISREG(mode):
                    raise KeyFileError(f"key file {name} is not a regular file")
                key = os.read(fd, MAX_KEY_FILE_BYTES + 1)
            finally:
                os.close(fd)
        except OSError as error:
            raise KeyFileError(f"cannot read key file {name}: {error.strerror or error}") from error
        if len(key) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(
                f"key file {name} is larger than {MAX_KEY_FILE_BYTES} bytes: is it a key?"
            )
        if check_permissions and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {name} is accessible by group or other users "
                f"(mode {stat.S_IMODE(mode):04o}): run chmod 600 {name}"
            )
        key = key.rstrip(b"\r\n")
        if not key:
            raise KeyFileError(
                f"key file {name} is empty: put random bytes in it "
                f"(e.g. head -c 32 /dev/urandom > {name})"
            )
        return cls(key)

    @classmethod
    def generate(cls, size: int = 32) -> AuthConfig:
        """A fresh random key."""
        return cls(secrets.token_bytes(size))

    def write(self, path: str | os.PathLike[str]) -> None:
        """Store the key in a new file readable by its owner only (refuses to overwrite)."""
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(self.key)

    def proof(self, label: bytes, transcript: bytes) -> bytes:
        """HMAC-SHA256 of `label || transcript` under this key."""
        return hmac.new(self.key, label + transcript, hashlib.sha256).digest()


@dataclass(frozen=True)
class Hello:
    """One side's hello: see the module docstring for the layout."""

    flags: int
    channel: str
    session: bytes
    nonce: bytes
    version: int = PROTOCOL_VERSION

    def pack(self) -> bytes:
        return _HELLO.pack(
            MAGIC,
            self.version,
            self.flags,
            self.channel.encode("ascii"),
            self.session,
            self.nonce,
        )

    @classmethod
    def unpack(cls, data: bytes, peer: str) -> Hello:
        """Decode a hello; raises `HandshakeError` for a peer that is not speaking postcopy."""
        check_magic(data, peer)
        _, version, flags, channel, session, nonce = _HELLO.unpack(data)
        name = channel.rstrip(b"\0").decode("ascii", "replace")
        return cls(flags, name, session, nonce, version)

    @property
    def has_key(self) -> bool:
        return bool(self.flags & FLAG_KEY)


@dataclass(frozen=True)
class HandshakeResult:
    """What a completed handshake established."""

    channel: str
    session: bytes
    authenticated: bool
    peer_tls: bool


def new_session() -> bytes:
    """A fresh random session id for a main connection."""
    return secrets.token_bytes(SESSION_SIZE)


def check_channel(channel: str, session: bytes) -> None:
    """Validate a channel name and session id before they go on the wire."""
    if not isinstance(channel, str) or not _CHANNEL_NAME.fullmatch(channel):
        raise ValueError(
            f"channel name {channel!r} must be 1-16 characters of a-z, 0-9, '-', "
            f"starting with a letter (e.g. {MAIN_CHANNEL!r} or {PREEMPT_CHANNEL!r})"
        )
    if not isinstance(session, bytes) or len(session) != SESSION_SIZE:
        raise ValueError(f"session id must be {SESSION_SIZE} bytes, got {session!r}")


def client_handshake(
    stream: Stream,
    auth: AuthConfig | None,
    *,
    channel: str,
    session: bytes,
    tls: bool,
    peer: str,
) -> HandshakeResult:
    """Run the source's side of the handshake; returns only when the destination accepted."""
    check_channel(channel, session)
    flags = (FLAG_KEY if auth else 0) | (FLAG_TLS if tls else 0)
    own = Hello(flags, channel, session, secrets.token_bytes(NONCE_SIZE)).pack()
    stream.sendall(own)
    raw = _recv_hello(stream, "the destination's hello", peer)
    theirs = Hello.unpack(raw, peer)
    if theirs.version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"destination {peer} speaks handshake version {theirs.version}, "
            f"this source speaks {PROTOCOL_VERSION}"
        )
    if not theirs.flags & FLAG_DESTINATION:
        raise HandshakeError(f"{peer} answered like a source, not a destination")
    if (theirs.channel, theirs.session) != (channel, session):
        raise HandshakeError(f"destination {peer} did not echo the channel and session")

    kind, payload = _recv_frame(stream, peer)
    if kind == _FrameKind.REFUSE:
        raise _refusal_error(payload, f"destination {peer}")
    if kind == _FrameKind.ACCEPT:
        if auth is not None:
            # An honest destination without a key refuses us itself; one that accepts
            # without proving the key could be anybody.
            _send_refuse(stream, RefuseReason.AUTHENTICATION, SOURCE_NEEDS_KEY)
            raise AuthenticationError(f"{SOURCE_NEEDS_KEY} (destination {peer})")
        return HandshakeResult(channel, session, authenticated=False, peer_tls=_tls_flag(theirs))
    if kind != _FrameKind.PROOF or auth is None:
        raise HandshakeError(f"destination {peer} sent an unexpected frame {kind}")

    transcript = own + raw
    if not hmac.compare_digest(payload, auth.proof(_DESTINATION_LABEL, transcript)):
        _send_refuse(stream, RefuseReason.AUTHENTICATION, WRONG_KEY)
        raise AuthenticationError(f"{WRONG_KEY} (destination {peer} proved a different key)")
    _send_frame(stream, _FrameKind.PROOF, auth.proof(_SOURCE_LABEL, transcript))
    kind, payload = _recv_frame(stream, peer)
    if kind == _FrameKind.REFUSE:
        raise _refusal_error(payload, f"destination {peer}")
    if kind != _FrameKind.ACCEPT:
        raise HandshakeError(f"destination {peer} sent an unexpected frame {kind}")
    return HandshakeResult(channel, session, authenticated=True, peer_tls=_tls_flag(theirs))


def server_handshake(
    stream: Stream,
    auth: AuthConfig | None,
    *,
    tls: bool,
    peer: str,
    refuse: tuple[RefuseReason, str] | None = None,
) -> HandshakeResult:
    """Run the destination's side; returns only when the source is accepted.

    `refuse` makes the destination answer the hello and then refuse with that reason
    (used to tell a plain-text source that TLS is required, in words it can read).
    """
    raw = _recv_hello(stream, "the source's hello", peer)
    theirs = Hello.unpack(raw, peer)
    flags = FLAG_DESTINATION | (FLAG_KEY if auth else 0) | (FLAG_TLS if tls else 0)
    echo_channel = theirs.channel if _CHANNEL_NAME.fullmatch(theirs.channel) else MAIN_CHANNEL
    own = Hello(flags, echo_channel, theirs.session, secrets.token_bytes(NONCE_SIZE)).pack()
    stream.sendall(own)

    def refuse_with(reason: RefuseReason, to_peer: str, here: str) -> HandshakeError:
        _send_refuse(stream, reason, to_peer)
        return _REFUSE_ERRORS[reason](here)

    if refuse is not None:
        raise refuse_with(refuse[0], refuse[1], f"{refuse[1]} (refused source {peer})")
    if theirs.version != PROTOCOL_VERSION:
        text = (
            f"destination speaks handshake version {PROTOCOL_VERSION}, "
            f"source sent version {theirs.version}"
        )
        raise refuse_with(RefuseReason.PROTOCOL, text, f"{text} (source {peer})")
    if theirs.flags & ~_KNOWN_FLAGS or theirs.flags & FLAG_DESTINATION:
        text = f"unexpected hello flags {theirs.flags:#06x} from the source"
        raise refuse_with(RefuseReason.PROTOCOL, text, f"{text} ({peer})")
    if echo_channel != theirs.channel:
        text = f"invalid channel name {theirs.channel!r}"
        raise refuse_with(RefuseReason.PROTOCOL, text, f"{text} from source {peer}")
    if auth is not None and not theirs.has_key:
        raise refuse_with(
            RefuseReason.AUTHENTICATION,
            DESTINATION_NEEDS_KEY,
            f"{DESTINATION_NEEDS_KEY} (source {peer} connected without a key)",
        )
    if auth is None and theirs.has_key:
        raise refuse_with(
            RefuseReason.AUTHENTICATION, SOURCE_NEEDS_KEY, f"{SOURCE_NEEDS_KEY} (source {peer})"
        )
    result = HandshakeResult(theirs.channel, theirs.session, auth is not None, _tls_flag(theirs))
    if auth is None:
        _send_frame(stream, _FrameKind.ACCEPT, b"")
        return result

    transcript = raw + own
    _send_frame(stream, _FrameKind.PROOF, auth.proof(_DESTINATION_LABEL, transcript))
    kind, payload = _recv_frame(stream, peer)
    if kind == _FrameKind.REFUSE:
        raise _refusal_error(payload, f"source {peer}")
    if kind != _FrameKind.PROOF:
        text = f"expected the source's proof, got frame {kind}"
        raise refuse_with(RefuseReason.PROTOCOL, text, f"{text} ({peer})")
    if not hmac.compare_digest(payload, auth.proof(_SOURCE_LABEL, transcript)):
        raise refuse_with(
            RefuseReason.AUTHENTICATION,
            WRONG_KEY,
            f"{WRONG_KEY} (source {peer} proved a different key, or replayed an old handshake)",
        )
    _send_frame(stream, _FrameKind.ACCEPT, b"")
    return result


def check_magic(data: bytes, peer: str) -> None:
    """Raise `HandshakeError` unless `data` starts with the hello's magic: a stranger (a
    port scan's probe, an HTTP health check, an SSH client, a TLS client hello) is named
    as soon as its first bytes arrive."""
    if data[: len(MAGIC)] == MAGIC:
        return
    if data[:1] == b"\x16" and data[1:2] == b"\x03":
        raise TlsError(
            f"{peer} started a TLS handshake but this side is not configured for TLS "
            "(give TLS certificate options on both sides, or on neither)"
        )
    raise HandshakeError(
        f"{peer} is not a postcopy peer: its first bytes are {describe_bytes(data[:16])}, "
        f'expected "{MAGIC.decode()}"'
    )


def describe_bytes(data: bytes) -> str:
    """Bytes from a peer in the user's terms: quoted text if they are printable ASCII (an
    HTTP request, an SSH banner), else hex."""
    if data and all(0x20 <= byte < 0x7F for byte in data):
        return f'"{data.decode("ascii")}" (text)'
    return f"{data.hex(' ')} (hex)"


def _recv_hello(stream: Stream, what: str, peer: str) -> bytes:
    """A peer's hello, its magic checked before the rest is awaited: a stranger that sent
    fewer bytes than a hello (an SSH banner) is named for what it is at once."""
    magic = _recv_exact(stream, len(MAGIC), what, peer, whole=HELLO_SIZE)
    check_magic(magic, peer)
    rest = _recv_exact(stream, HELLO_SIZE - len(MAGIC), what, peer, len(MAGIC), HELLO_SIZE)
    return magic + rest


def _tls_flag(hello: Hello) -> bool:
    return bool(hello.flags & FLAG_TLS)


def _recv_exact(
    stream: Stream, size: int, what: str, peer: str, done: int = 0, whole: int | None = None
) -> bytes:
    """`size` bytes of `what`, which is `whole` bytes long of which `done` came before."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = stream.recv_into(view[received:])
        if count == 0:
            raise ConnectionClosed(
                f"{peer} closed the connection during the handshake after "
                f"{done + received} of {whole or size} bytes of {what}"
            )
        received += count
    return bytes(buffer)


def _send_frame(stream: Stream, kind: _FrameKind, payload: bytes) -> None:
    stream.sendall(_FRAME_HEADER.pack(kind, len(payload)) + payload)


def _send_refuse(stream: Stream, reason: RefuseReason, message: str) -> None:
    text = message.encode("utf-8")[:MAX_REFUSE_MESSAGE]
    # The peer may already be gone; our own error is raised either way.
    with contextlib.suppress(OSError):
        _send_frame(stream, _FrameKind.REFUSE, bytes([reason]) + text)


def _recv_frame(stream: Stream, peer: str) -> tuple[int, bytes]:
    kind, length = _FRAME_HEADER.unpack(_recv_exact(stream, _FRAME_HEADER.size, "a frame", peer))
    if kind not in _FRAME_KINDS:
        raise HandshakeError(f"{peer} sent an unknown handshake frame kind {kind}")
    limit = _PROOF_SIZE if kind == _FrameKind.PROOF else MAX_REFUSE_MESSAGE + 1
    if (
        (kind == _FrameKind.PROOF and length != _PROOF_SIZE)
        or length > limit
        or (kind == _FrameKind.ACCEPT and length)
    ):
        raise HandshakeError(
            f"{peer} sent a malformed handshake frame (kind {kind}, {length} bytes)"
        )
    return kind, _recv_exact(stream, length, "a frame", peer) if length else b""


def _refusal_error(payload: bytes, peer: str) -> HandshakeError:
    if not payload:
        return HandshakeError(f"{peer} refused the connection without a reason")
    error_class = _REFUSE_ERRORS.get(payload[0], HandshakeError)
    message = payload[1:].decode("utf-8", "replace")
    return error_class(f"{message} (refused by {peer})")

"""The messages of the migration stream, as frozen dataclasses, and the protocol's limits.

Each message checks its own fields when constructed (types, ranges, sizes that need no
context), so an invalid message cannot exist: a decoder cannot yield one and an encoder is
never handed one. Checks that need the declared RAM blocks (block index in range, pages
inside the block, data length against the block's page size) live in `checks`.

Main stream (source -> destination): Handshake, Advise, RamRun, EndOfRound, DeviceState,
PrecopyComplete, Discard, Listen, Run, Package, PostcopyComplete, ResumeRequest,
RecvBitmapRequest, PostcopyResume, Ping.
Return path (destination -> source): ReqPages, Shut, Pong, RecvBitmap, ResumeAck.
The byte layout of each is in docs/PROTOCOL.md.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from postcopy.wire.errors import ProtocolError

# -- limits (every one is also stated in docs/PROTOCOL.md) ----------------------------------

MAX_PAYLOAD: Final = 1 << 20
"""Largest payload of any frame, in bytes (RAM_RUN page data comes after and is separate)."""
MAX_RUN_PAGES: Final = 512
"""Most pages in one RamRun (for small pages; see `max_run_pages`)."""
MAX_RUN_BYTES: Final = 16 << 20
"""Most page bytes one RamRun may cover, unless a single page is bigger (1 GiB pages)."""
MAX_DISCARD_RANGES: Final = 12
"""Most ranges in one Discard, as QEMU's MAX_DISCARDS_PER_COMMAND."""
MAX_BLOCKS: Final = 64
MAX_BLOCK_NAME_BYTES: Final = 255
MAX_BLOCK_LENGTH: Final = 1 << 48
"""A block may not exceed the x86-64 virtual address space (256 TiB)."""
MIN_PAGE_SIZE: Final = 4096
MAX_PAGE_SIZE: Final = 1 << 30
MAX_VCPUS: Final = 1024
MAX_CAPABILITIES: Final = 64
MAX_CAPABILITY_NAME_BYTES: Final = 64
MAX_BACKEND_NAME_BYTES: Final = 32
MAX_GUEST_BYTES: Final = 255
MAX_SHUT_REASON_BYTES: Final = 1024
MIGRATION_ID_BYTES: Final = 16
"""ResumeRequest's migration id: the transport session id of the first main connection."""
U16_MAX: Final = (1 << 16) - 1
U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1

FRAME_HEADER_SIZE: Final = 8
RAM_RUN_FIXED_PAYLOAD: Final = 14
"""u16 block + u64 first_page + u32 page_count, before the zero bitmap."""
RECV_BITMAP_FIXED_PAYLOAD: Final = 10
"""u16 block + u64 page_count, before the packed bitmap."""
MAX_RECV_BITMAP_PAGES: Final = (MAX_PAYLOAD - RECV_BITMAP_FIXED_PAYLOAD) * 8
"""A RecvBitmap must fit one payload: blocks up to ~32 GiB of 4 KiB pages."""

_CAPABILITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_BACKEND_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\Z")


def max_run_pages(page_size: int) -> int:
    """Most pages one RamRun may carry for a block with this page size.

    512 for 4 KiB pages (2 MiB of data), 8 for 2 MiB huge pages (16 MiB), 1 for 1 GiB pages.
    """
    return max(1, min(MAX_RUN_PAGES, MAX_RUN_BYTES // page_size))


def is_page_size(value: int) -> bool:
    """True for a power of two in [MIN_PAGE_SIZE, MAX_PAGE_SIZE]."""
    return MIN_PAGE_SIZE <= value <= MAX_PAGE_SIZE and value & (value - 1) == 0


# -- field checks shared by the constructors --------------------------------------------------


def _integer(owner: str, name: str, value: object, low: int, high: int) -> int:
    """Return value as a plain int (numpy ints are accepted) if low <= value <= high."""
    field = f"{owner}.{name}"
    if isinstance(value, bool):
        raise ProtocolError(field, value, "is a bool, not an integer")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ProtocolError(field, value, "is not an integer") from None
    if not low <= number <= high:
        raise ProtocolError(field, number, f"out of range [{low}, {high}]")
    return number


def _page_size(owner: str, name: str, value: object) -> int:
    number = _integer(owner, name, value, 0, U64_MAX)
    if not is_page_size(number):
        raise ProtocolError(
            f"{owner}.{name}",
            number,
            f"is not a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]",
        )
    return number


def _bool_vector(
    owner: str, name: str, value: object, low: int, high: int
) -> npt.NDArray[np.bool_]:
    field = f"{owner}.{name}"
    if not isinstance(value, np.ndarray):
        raise ProtocolError(field, type(value).__name__, "is not a numpy array")
    if value.dtype != np.bool_ or value.ndim != 1:
        raise ProtocolError(
            field, f"{value.dtype}[{value.shape}]", "must be a one-dimensional bool array"
        )
    if not low <= value.shape[0] <= high:
        raise ProtocolError(f"{field}.length", value.shape[0], f"out of range [{low}, {high}]")
    return value


def _byte_length(owner: str, name: str, value: object) -> int:
    """Length in bytes of a bytes-like field; refuses anything else."""
    field = f"{owner}.{name}"
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, memoryview):
        if not value.contiguous:
            raise ProtocolError(field, "memoryview", "is not contiguous")
        return value.nbytes
    raise ProtocolError(field, type(value).__name__, "is not bytes or a memoryview")


def _same_bytes(
    left: bytes | bytearray | memoryview, right: bytes | bytearray | memoryview
) -> bool:
    if isinstance(left, bytes) and isinstance(right, bytes):
        return left == right
    # memoryview == memoryview compares element by element in Python: numpy is ~100x faster
    a = np.frombuffer(left, dtype=np.uint8)
    b = np.frombuffer(right, dtype=np.uint8)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _set(obj: object, name: str, value: object) -> None:
    # Frozen dataclasses normalise fields (numpy ints -> int, lists -> tuples) this way.
    object.__setattr__(obj, name, value)


# -- main stream: configuration ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One RAM block as declared in the Handshake: its name, size and page size in bytes,
    and (optionally, "" if not declared) the memory backend it is made of (ram, memfd,
    memfd-hugetlb, file), which both ends must agree on."""

    name: str
    length: int
    page_size: int
    backend: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ProtocolError("BlockInfo.name", self.name, "is not a str")
        try:
            encoded = self.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("BlockInfo.name", self.name, "is not valid UTF-8") from None
        if not 1 <= len(encoded) <= MAX_BLOCK_NAME_BYTES:
            raise ProtocolError(
                "BlockInfo.name", self.name, f"must be 1 to {MAX_BLOCK_NAME_BYTES} bytes of UTF-8"
            )
        page_size = _page_size("BlockInfo", "page_size", self.page_size)
        length = _integer("BlockInfo", "length", self.length, 1, MAX_BLOCK_LENGTH)
        if length % page_size:
            raise ProtocolError(
                "BlockInfo.length",
                length,
                f"is not a multiple of block {self.name!r}'s page size {page_size}",
            )
        _set(self, "page_size", page_size)
        _set(self, "length", length)
        backend = self.backend
        if not isinstance(backend, str) or (
            backend
            and (
                len(backend) > MAX_BACKEND_NAME_BYTES
                or not backend.isascii()
                or _BACKEND_NAME.match(backend) is None
            )
        ):
            raise ProtocolError(
                "BlockInfo.backend",
                backend,
                f"is not a backend name (up to {MAX_BACKEND_NAME_BYTES} ASCII lowercase "
                "letters, digits and '-')",
            )

    @property
    def pages(self) -> int:
        """Number of pages of page_size in the block."""
        return self.length // self.page_size

    def describe(self) -> str:
        """Short form for error messages: name:length@page_size[/backend]."""
        text = f"{self.name}:{self.length}@{self.page_size}"
        return f"{text}/{self.backend}" if self.backend else text


@dataclass(frozen=True, slots=True)
class Handshake:
    """First frame of the main stream: capabilities and the VM configuration to expect.

    `guest` names what runs in the VM (e.g. "memtouch(passes=0)"; "" when not known), so
    that a destination expecting another guest refuses the stream before any RAM moves."""

    capabilities: frozenset[str]
    blocks: tuple[BlockInfo, ...]
    vcpus: int
    target_page_size: int = 4096
    guest: str = ""

    def __post_init__(self) -> None:
        capabilities = self.capabilities
        if isinstance(capabilities, str) or not isinstance(capabilities, Iterable):
            raise ProtocolError(
                "Handshake.capabilities", capabilities, "is not a collection of names"
            )
        capabilities = frozenset(capabilities)
        if len(capabilities) > MAX_CAPABILITIES:
            raise ProtocolError(
                "Handshake.capabilities", len(capabilities), f"more than {MAX_CAPABILITIES}"
            )
        for name in capabilities:
            if (
                not isinstance(name, str)
                or not name.isascii()
                or not 1 <= len(name) <= MAX_CAPABILITY_NAME_BYTES
                or _CAPABILITY_NAME.match(name) is None
            ):
                raise ProtocolError(
                    "Handshake.capabilities",
                    name,
                    f"is not a capability name (1 to {MAX_CAPABILITY_NAME_BYTES} ASCII "
                    "letters, digits, '.', '_', '-')",
                )
        _set(self, "capabilities", capabilities)
        blocks = self.blocks
        if not isinstance(blocks, Iterable):
            raise ProtocolError("Handshake.blocks", blocks, "is not a sequence of BlockInfo")
        blocks = tuple(blocks)
        if not 1 <= len(blocks) <= MAX_BLOCKS:
            raise ProtocolError("Handshake.blocks", len(blocks), f"must be 1 to {MAX_BLOCKS}")
        if not all(isinstance(block, BlockInfo) for block in blocks):
            raise ProtocolError("Handshake.blocks", blocks, "holds something not a BlockInfo")
        names = [block.name for block in blocks]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise ProtocolError("Handshake.blocks", duplicate, "is declared twice")
        _set(self, "blocks", blocks)
        _set(self, "vcpus", _integer("Handshake", "vcpus", self.vcpus, 1, MAX_VCPUS))
        guest = self.guest
        if not isinstance(guest, str) or not guest.isprintable():
            raise ProtocolError("Handshake.guest", guest, "is not printable text")
        if len(guest.encode()) > MAX_GUEST_BYTES:
            raise ProtocolError(
                "Handshake.guest", guest, f"is longer than {MAX_GUEST_BYTES} bytes of UTF-8"
            )
        target = _page_size("Handshake", "target_page_size", self.target_page_size)
        _set(self, "target_page_size", target)
        for block in blocks:
            if block.page_size < target:
                raise ProtocolError(
                    "Handshake.target_page_size",
                    target,
                    f"is larger than block {block.name!r}'s page size {block.page_size}",
                )


@dataclass(frozen=True, slots=True)
class Advise:
    """QEMU's ADVISE: postcopy may follow; the destination checks support and empties RAM."""

    page_size_summary: int
    target_page_size: int

    def __post_init__(self) -> None:
        summary = _integer("Advise", "page_size_summary", self.page_size_summary, 1, U64_MAX)
        if summary & (MIN_PAGE_SIZE - 1) or summary >> 31:
            # The OR of powers of two in [4 KiB, 1 GiB] has bits 12..30 only.
            raise ProtocolError(
                "Advise.page_size_summary",
                summary,
                "has bits outside the page sizes 4 KiB .. 1 GiB",
            )
        _set(self, "page_size_summary", summary)
        _set(
            self,
            "target_page_size",
            _page_size("Advise", "target_page_size", self.target_page_size),
        )


# -- main stream: RAM -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class RamRun:
    """Consecutive pages of one block: zero pages as bitmap entries, normal pages as data.

    ``zero[i]`` is True when page ``first_page + i`` is all zeros (it carries no data);
    ``data`` holds the other pages' contents, contiguous and in order, each page_size bytes.
    Two RamRuns are equal when their fields, arrays and bytes are equal.
    """

    block: int
    first_page: int
    zero: npt.NDArray[np.bool_]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _set(self, "block", _integer("RamRun", "block", self.block, 0, MAX_BLOCKS - 1))
        _set(self, "first_page", _integer("RamRun", "first_page", self.first_page, 0, U64_MAX))
        zero = _bool_vector("RamRun", "zero", self.zero, 1, MAX_RUN_PAGES)
        data_length = _byte_length("RamRun", "data", self.data)
        normal = zero.shape[0] - int(np.count_nonzero(zero))
        if normal == 0:
            if data_length:
                raise ProtocolError(
                    "RamRun.data", data_length, "bytes, but every page is marked zero"
                )
        elif data_length % normal or not is_page_size(data_length // normal):
            raise ProtocolError(
                "RamRun.data",
                data_length,
                f"bytes is not {normal} normal pages of a valid page size",
            )

    @property
    def page_count(self) -> int:
        return int(self.zero.shape[0])

    @property
    def normal_pages(self) -> int:
        """Pages that carry data (not zero)."""
        return self.page_count - int(np.count_nonzero(self.zero))

    @property
    def data_length(self) -> int:
        return _byte_length("RamRun", "data", self.data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamRun):
            return NotImplemented
        return (
            self.block == other.block
            and self.first_page == other.first_page
            and np.array_equal(self.zero, other.zero)
            and _same_bytes(self.data, other.data)
        )

    __hash__ = None  # type: ignore[assignment]


class RamRunHeader(NamedTuple):
    """A checked RAM_RUN frame whose page data has not been read yet.

    The receiver reads ``data_length`` bytes itself (e.g. ``recv_into`` a staging buffer):
    every bound was checked against the declared block before this was returned.
    """

    block: int
    first_page: int
    zero: npt.NDArray[np.bool_]
    data_length: int

    def with_data(self, data: bytes | memoryview) -> RamRun:
        """The complete message, once the data has been read."""
        return RamRun(self.block, self.first_page, self.zero, data)


@dataclass(frozen=True, slots=True)
class EndOfRound:
    """The end of one precopy round (numbered by the source)."""

    round: int

    def __post_init__(self) -> None:
        _set(self, "round", _integer("EndOfRound", "round", self.round, 0, U32_MAX))


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Opaque device and vCPU state, loaded by the destination before it runs the guest."""

    data: bytes

    def __post_init__(self) -> None:
        length = _byte_length("DeviceState", "data", self.data)
        if length > MAX_PAYLOAD:
            raise ProtocolError("DeviceState.data", length, f"bytes exceeds {MAX_PAYLOAD}")
        if not isinstance(self.data, bytes):
            _set(self, "data", bytes(self.data))


@dataclass(frozen=True, slots=True)
class PrecopyComplete:
    """Precopy-only switchover is done: the destination loads the state and runs."""


@dataclass(frozen=True, slots=True)
class Discard:
    """Pages sent in precopy and dirtied since: the destination drops them (start, count)."""

    block: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        _set(self, "block", _integer("Discard", "block", self.block, 0, MAX_BLOCKS - 1))
        if not isinstance(self.ranges, Iterable):
            raise ProtocolError("Discard.ranges", self.ranges, "is not a sequence of pairs")
        ranges = tuple(self.ranges)
        if not 1 <= len(ranges) <= MAX_DISCARD_RANGES:
            raise ProtocolError(
                "Discard.ranges", len(ranges), f"ranges; must be 1 to {MAX_DISCARD_RANGES}"
            )
        normalised = []
        for pair in ranges:
            try:
                start, count = pair
            except (TypeError, ValueError):
                raise ProtocolError(
                    "Discard.ranges", pair, "is not a (start, count) pair"
                ) from None
            normalised.append(
                (
                    _integer("Discard", "ranges.start", start, 0, U64_MAX),
                    _integer("Discard", "ranges.count", count, 1, U64_MAX),
                )
            )
        _set(self, "ranges", tuple(normalised))

    @classmethod
    def from_wire(cls, block: int, ranges: tuple[tuple[int, int], ...]) -> Discard:
        """A Discard from what the reader unpacked: u64 pairs (plain ints, in range by
        construction), 1 to MAX_DISCARD_RANGES of them. Checks only what the wire leaves
        open (the block index, a count of 0) and skips the constructor's per-pair checks:
        thousands of these frames may arrive inside the downtime."""
        if not 0 <= block < MAX_BLOCKS:
            raise ProtocolError("Discard.block", block, f"out of range [0, {MAX_BLOCKS - 1}]")
        if not 1 <= len(ranges) <= MAX_DISCARD_RANGES:
            raise ProtocolError(
                "Discard.ranges", len(ranges), f"ranges; must be 1 to {MAX_DISCARD_RANGES}"
            )
        for _, count in ranges:
            if count < 1:
                raise ProtocolError("Discard.ranges.count", count, f"out of range [1, {U64_MAX}]")
        message = object.__new__(cls)
        _set(message, "block", block)
        _set(message, "ranges", ranges)
        return message


@dataclass(frozen=True, slots=True)
class Listen:
    """The destination registers its RAM on userfaultfd and starts its fault thread."""


@dataclass(frozen=True, slots=True)
class Run:
    """The destination starts the guest (in postcopy, inside the Package)."""


@dataclass(frozen=True, slots=True)
class Package:
    """A bounded sub-stream delivered as one frame: DeviceState frames, then Run.

    Carrying the device state and RUN together means the destination never starts loading
    a state it cannot finish while the main stream is busy with pages.
    """

    messages: tuple[Message, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.messages, Iterable):
            raise ProtocolError("Package.messages", self.messages, "is not a sequence")
        messages = tuple(self.messages)
        if not messages or not isinstance(messages[-1], Run):
            raise ProtocolError(
                "Package.messages",
                [type(m).__name__ for m in messages],
                "must end with Run",
            )
        for message in messages[:-1]:
            if not isinstance(message, DeviceState):
                raise ProtocolError(
                    "Package.messages",
                    type(message).__name__,
                    "is not allowed in a Package (only DeviceState..., then Run)",
                )
        size = package_payload_length(messages)
        if size > MAX_PAYLOAD:
            raise ProtocolError("Package.messages", size, f"bytes exceeds {MAX_PAYLOAD}")
        _set(self, "messages", messages)


def package_payload_length(messages: tuple[Message, ...]) -> int:
    """Bytes the Package's inner frames take: a frame header each plus DeviceState data."""
    return sum(
        FRAME_HEADER_SIZE + (len(m.data) if isinstance(m, DeviceState) else 0) for m in messages
    )


@dataclass(frozen=True, slots=True)
class PostcopyComplete:
    """The source has sent every page: the destination finishes and cleans up."""


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """Recovery: after a reconnect, the source asks to resume a paused postcopy.

    `migration_id` names the migration (the session id of its first main connection) and
    `epoch` counts the source's reconnects (1, 2, ...): the destination takes only its own
    migration's, and only an epoch above every earlier one (a late stale attempt cannot
    take over a newer one)."""

    migration_id: bytes
    epoch: int

    def __post_init__(self) -> None:
        if not isinstance(self.migration_id, bytes):
            raise ProtocolError(
                "ResumeRequest.migration_id", type(self.migration_id).__name__, "is not bytes"
            )
        if len(self.migration_id) != MIGRATION_ID_BYTES:
            raise ProtocolError(
                "ResumeRequest.migration_id",
                len(self.migration_id),
                f"bytes; a migration id is {MIGRATION_ID_BYTES}",
            )
        _set(self, "epoch", _integer("ResumeRequest", "epoch", self.epoch, 1, U32_MAX))


@dataclass(frozen=True, slots=True)
class RecvBitmapRequest:
    """Recovery: the source asks which pages of a block the destination has received."""

    block: int

    def __post_init__(self) -> None:
        _set(self, "block", _integer("RecvBitmapRequest", "block", self.block, 0, MAX_BLOCKS - 1))


@dataclass(frozen=True, slots=True)
class PostcopyResume:
    """Recovery: the source resumes sending pages."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Main-stream probe (QEMU's MIG_CMD_PING); the destination answers Pong(value) on the
    return path once it has processed everything before it."""

    value: int

    def __post_init__(self) -> None:
        _set(self, "value", _integer("Ping", "value", self.value, 0, U32_MAX))


# -- return path ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReqPages:
    """The destination needs these pages now (a vCPU is waiting on them)."""

    block: int
    first_page: int
    page_count: int

    def __post_init__(self) -> None:
        block, first, count = self.block, self.first_page, self.page_count
        if (  # plain ints in range, as both ends make them: a page request's hot path
            type(block) is int
            and type(first) is int
            and type(count) is int
            and 0 <= block < MAX_BLOCKS
            and 0 <= first <= U64_MAX
            and 1 <= count <= U32_MAX
        ):
            return
        _set(self, "block", _integer("ReqPages", "block", self.block, 0, MAX_BLOCKS - 1))
        _set(self, "first_page", _integer("ReqPages", "first_page", self.first_page, 0, U64_MAX))
        _set(self, "page_count", _integer("ReqPages", "page_count", self.page_count, 1, U32_MAX))


@dataclass(frozen=True, slots=True)
class Shut:
    """The destination is done (error=False) or gives up (error=True, with a reason)."""

    error: bool
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.error, bool):
            raise ProtocolError("Shut.error", self.error, "is not a bool")
        if not isinstance(self.reason, str):
            raise ProtocolError("Shut.reason", self.reason, "is not a str")
        try:
            length = len(self.reason.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError("Shut.reason", self.reason, "is not valid UTF-8") from None
        if length > MAX_SHUT_REASON_BYTES:
            raise ProtocolError(
                "Shut.reason", length, f"bytes of UTF-8 exceeds {MAX_SHUT_REASON_BYTES}"
            )


@dataclass(frozen=True, slots=True)
class Pong:
    """The destination's answer to a Ping (return path)."""

    value: int

    def __post_init__(self) -> None:
        _set(self, "value", _integer("Pong", "value", self.value, 0, U32_MAX))


@dataclass(frozen=True, slots=True, eq=False)
class RecvBitmap:
    """Recovery: which pages of a block the destination holds (one entry per page)."""

    block: int
    bitmap: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        _set(self, "block", _integer("RecvBitmap", "block", self.block, 0, MAX_BLOCKS - 1))
        _bool_vector("RecvBitmap", "bitmap", self.bitmap, 1, MAX_RECV_BITMAP_PAGES)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecvBitmap):
            return NotImplemented
        return self.block == other.block and np.array_equal(self.bitmap, other.bitmap)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class ResumeAck:
    """Recovery: the destination is ready to resume (echoes the source's value)."""

    value: int

    def __post_init__(self) -> None:
        _set(self, "value", _integer("ResumeAck", "value", self.value, 0, U32_MAX))


MainMessage: TypeAlias = (
    Handshake
    | Advise
    | RamRun
    | EndOfRound
    | DeviceState
    | PrecopyComplete
    | Discard
    | Listen
    | Run
    | Package
    | PostcopyComplete
    | ResumeRequest
    | RecvBitmapRequest
    | PostcopyResume
    | Ping
)
ReturnMessage: TypeAlias = ReqPages | Shut | Pong | RecvBitmap | ResumeAck
Message: TypeAlias = MainMessage | ReturnMessage

MAIN_MESSAGES: Final[tuple[type, ...]] = (
    Handshake,
    Advise,
    RamRun,
    EndOfRound,
    DeviceState,
    PrecopyComplete,
    Discard,
    Listen,
    Run,
    Package,
    PostcopyComplete,
    ResumeRequest,
    RecvBitmapRequest,
    PostcopyResume,
    Ping,
)
RETURN_MESSAGES: Final[tuple[type, ...]] = (ReqPages, Shut, Pong, RecvBitmap, ResumeAck)

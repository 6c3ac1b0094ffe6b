"""Context checks: a message against the declared configuration, shared by both directions.

The message constructors check every field on its own (`messages`); what needs the stream's
context is here: a block index against the declared blocks, pages against the block's
length, a RamRun's data against its block's page size, an Advise against the Handshake. The
Encoder runs them before it writes, the receiver after it reads (RAM_RUN while its header is
read: the hot path). `CONTEXT_CHECKS` holds one entry per message type that has any.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from postcopy.wire.errors import ProtocolError
from postcopy.wire.messages import (
    Advise,
    BlockInfo,
    Discard,
    Handshake,
    RamRun,
    RecvBitmap,
    RecvBitmapRequest,
    ReqPages,
    max_run_pages,
)

Blocks = tuple[BlockInfo, ...] | None
"""The declared blocks, or None while they are unknown (no Handshake and none configured)."""

BLOCK_MESSAGES: Final = frozenset({RamRun, Discard, ReqPages, RecvBitmapRequest, RecvBitmap})
"""The messages that refer to a block: a receiver refuses them before blocks are declared."""


def own_blocks(blocks: Sequence[BlockInfo] | None) -> Blocks:
    """Validate a configuration given by the local side (same rules as a Handshake's)."""
    if blocks is None:
        return None
    try:
        return _validated_blocks(tuple(blocks))
    except TypeError:  # unhashable, so not BlockInfos: let the Handshake say what is wrong
        return Handshake(frozenset(), tuple(blocks), 1).blocks


@functools.lru_cache(maxsize=16)
def _validated_blocks(blocks: tuple[BlockInfo, ...]) -> tuple[BlockInfo, ...]:
    # A process opens many streams with the same configuration (one per connection).
    return Handshake(frozenset(), blocks, 1).blocks


def _describe_blocks(blocks: Sequence[BlockInfo]) -> str:
    return "[" + ", ".join(block.describe() for block in blocks) + "]"


def _lookup_block(owner: str, blocks: Blocks, index: int) -> BlockInfo | None:
    """The declared block at index; None if blocks are unknown (encoder without config)."""
    if blocks is None:
        return None
    if index >= len(blocks):
        raise ProtocolError(
            f"{owner}.block", index, f"out of range: {len(blocks)} blocks are declared"
        )
    return blocks[index]


def _check_pages(owner: str, block: BlockInfo, first_page: int, count: int) -> None:
    pages = block.pages
    if first_page >= pages:
        raise ProtocolError(
            f"{owner}.first_page",
            first_page,
            f"out of range for block {block.name!r} ({pages} pages)",
        )
    if first_page + count > pages:
        raise ProtocolError(
            f"{owner}.page_count",
            count,
            f"pages from page {first_page} run past the end of block {block.name!r} "
            f"({pages} pages)",
        )


def check_ram_run(
    blocks: Blocks, block_index: int, first_page: int, count: int
) -> BlockInfo | None:
    """Check a RAM run's block and pages; its block, or None if blocks are unknown."""
    block = _lookup_block("RamRun", blocks, block_index)
    if block is None:
        return None
    limit = max_run_pages(block.page_size)
    if count > limit:
        raise ProtocolError(
            "RamRun.page_count",
            count,
            f"exceeds {limit} pages per run for block {block.name!r} (page size {block.page_size})",
        )
    _check_pages("RamRun", block, first_page, count)
    return block


def _check_ram_run_message(message: RamRun, blocks: Blocks, target_page_size: int | None) -> None:
    block = check_ram_run(blocks, message.block, message.first_page, message.page_count)
    if block is not None:
        expected = message.normal_pages * block.page_size
        if message.data_length != expected:
            raise ProtocolError(
                "RamRun.data",
                message.data_length,
                f"bytes; {message.normal_pages} normal pages of block {block.name!r} "
                f"need {expected}",
            )


def _check_discard(message: Discard, blocks: Blocks, target_page_size: int | None) -> None:
    block = _lookup_block("Discard", blocks, message.block)
    if block is not None:
        pages = block.pages
        for start, count in message.ranges:
            if start >= pages or start + count > pages:  # the common case costs no call
                _check_pages("Discard", block, start, count)


def check_discard_runs(
    blocks: Blocks, block_index: int, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
) -> None:
    """Check many discard ranges at once (the encoder's bulk path): each at least one page,
    inside the block; the first bad one is named as `Discard(...)` would name it."""
    bad = np.flatnonzero(starts < 0)  # int64: never above U64_MAX
    if bad.size:
        raise ProtocolError("Discard.ranges.start", int(starts[bad[0]]), "is negative")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        raise ProtocolError("Discard.ranges.count", int(lengths[bad[0]]), "is below 1")
    block = _lookup_block("Discard", blocks, block_index)
    if block is not None:
        bad = np.flatnonzero((starts >= block.pages) | (starts + lengths > block.pages))
        if bad.size:
            _check_pages("Discard", block, int(starts[bad[0]]), int(lengths[bad[0]]))


def _check_req_pages(message: ReqPages, blocks: Blocks, target_page_size: int | None) -> None:
    block = _lookup_block("ReqPages", blocks, message.block)
    if block is not None:
        _check_pages("ReqPages", block, message.first_page, message.page_count)


def _check_recv_bitmap_request(
    message: RecvBitmapRequest, blocks: Blocks, target_page_size: int | None
) -> None:
    _lookup_block("RecvBitmapRequest", blocks, message.block)


def _check_recv_bitmap(message: RecvBitmap, blocks: Blocks, target_page_size: int | None) -> None:
    block = _lookup_block("RecvBitmap", blocks, message.block)
    if block is not None and message.bitmap.shape[0] != block.pages:
        raise ProtocolError(
            "RecvBitmap.bitmap.length",
            message.bitmap.shape[0],
            f"entries; block {block.name!r} has {block.pages} pages",
        )


def _check_advise(message: Advise, blocks: Blocks, target_page_size: int | None) -> None:
    if blocks is not None:
        summary = 0
        for block in blocks:
            summary |= block.page_size
        if message.page_size_summary != summary:
            raise ProtocolError(
                "Advise.page_size_summary",
                message.page_size_summary,
                f"differs from the declared blocks' page sizes (OR = {summary})",
            )
    if target_page_size is not None and message.target_page_size != target_page_size:
        raise ProtocolError(
            "Advise.target_page_size",
            message.target_page_size,
            f"differs from the Handshake's {target_page_size}",
        )


def _describe_backend(block: BlockInfo) -> str:
    size = block.page_size
    pages = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
    return f"{block.backend or 'an undeclared backend'} with {pages} pages"


def _same_block(peer: BlockInfo, own: BlockInfo) -> bool:
    """Equal, a backend left undeclared by either side matching any."""
    return (peer.name, peer.length, peer.page_size) == (own.name, own.length, own.page_size) and (
        not peer.backend or not own.backend or peer.backend == own.backend
    )


def backend_mismatch(peer: Sequence[BlockInfo], own: Sequence[BlockInfo]) -> str | None:
    """The one line that says the blocks are the same but made of different memory (backend
    or page size), or None if they differ otherwise or not at all."""
    if [(b.name, b.length) for b in peer] != [(b.name, b.length) for b in own]:
        return None
    for theirs, ours in zip(peer, own, strict=True):
        if not _same_block(theirs, ours):
            return (
                f"RAM backend mismatch: block {ours.name!r} is {_describe_backend(theirs)} "
                f"on the peer but {_describe_backend(ours)} here (start both sides with the "
                "same --memory-backend)"
            )
    return None


def _check_handshake(message: Handshake, blocks: Blocks, target_page_size: int | None) -> None:
    if blocks is None or (
        len(message.blocks) == len(blocks)
        and all(_same_block(p, o) for p, o in zip(message.blocks, blocks, strict=True))
    ):
        return
    mismatch = backend_mismatch(message.blocks, blocks)
    if mismatch is not None:
        # same blocks, made of different memory: say so in the user's terms
        raise ProtocolError(
            "Handshake.blocks",
            _describe_blocks(message.blocks),
            "differ in memory backend",
            message=mismatch,
        )
    raise ProtocolError(
        "Handshake.blocks",
        _describe_blocks(message.blocks),
        f"differ from this side's configuration {_describe_blocks(blocks)}",
        message=(
            "Handshake.blocks: the peer declares "
            f"{_describe_blocks(message.blocks)} but this side is configured with "
            f"{_describe_blocks(blocks)}"
        ),
    )


Check = Callable[[Any, Blocks, "int | None"], None]
"""check(message, declared blocks, the Handshake's target page size): raise ProtocolError."""

CONTEXT_CHECKS: Final[dict[type, Check]] = {
    RamRun: _check_ram_run_message,
    Discard: _check_discard,
    ReqPages: _check_req_pages,
    RecvBitmapRequest: _check_recv_bitmap_request,
    RecvBitmap: _check_recv_bitmap,
    Advise: _check_advise,
    Handshake: _check_handshake,
}
assert set(CONTEXT_CHECKS) >= BLOCK_MESSAGES


def check_context(message: object, blocks: Blocks, target_page_size: int | None) -> None:
    """Check a message against the declared configuration, as far as it is known."""
    check = CONTEXT_CHECKS.get(type(message))
    if check is not None:
        check(message, blocks, target_page_size)

"""RAM blocks, the RAM list, their backends and page bitmaps (numpy)."""

from postcopy.ram.backend import BackendError, MemoryBackend, discard_range
from postcopy.ram.bitmap import (
    Bitmap,
    all_set,
    clear_range,
    clear_runs,
    fold,
    new_bitmap,
    pages_after,
    runs,
    set_range,
    set_runs,
    split_runs,
    unfold,
    zero_pages,
    zero_rows,
)
from postcopy.ram.block import RamBlock, RamList

__all__ = [
    "BackendError",
    "Bitmap",
    "MemoryBackend",
    "RamBlock",
    "RamList",
    "all_set",
    "clear_range",
    "clear_runs",
    "discard_range",
    "fold",
    "new_bitmap",
    "pages_after",
    "runs",
    "set_range",
    "set_runs",
    "split_runs",
    "unfold",
    "zero_pages",
    "zero_rows",
]

"""RAM blocks, the RAM list and page bitmaps (numpy)."""

from postcopy.ram.bitmap import (
    Bitmap,
    all_set,
    clear_range,
    new_bitmap,
    runs,
    set_range,
    split_runs,
    zero_pages,
)
from postcopy.ram.block import RamBlock, RamList

__all__ = [
    "Bitmap",
    "RamBlock",
    "RamList",
    "all_set",
    "clear_range",
    "new_bitmap",
    "runs",
    "set_range",
    "split_runs",
    "zero_pages",
]

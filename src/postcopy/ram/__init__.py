"""RAM blocks, the RAM list and page bitmaps (numpy)."""

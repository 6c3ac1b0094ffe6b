"""Thin, complete bindings to the kernel interfaces postcopy uses.

One module per interface, no policy."""

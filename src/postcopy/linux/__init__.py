"""Thin, complete bindings to the kernel interfaces postcopy uses: one module per interface, no policy."""

"""Connections that carry the migration stream: TCP, Unix, TLS, authentication."""

"""The `postcopy` command line."""

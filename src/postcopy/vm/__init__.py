"""The KVM micro-VM that is migrated, and its built-in guests."""

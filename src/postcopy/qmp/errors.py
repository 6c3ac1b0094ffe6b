"""Errors a QMP command handler raises to answer a client with a clean QMP error.

QMP error responses carry a class from QEMU's fixed ``QapiErrorClass`` enumeration and a
human-readable description. Management tools branch on the class, so a handler may only
pick one of the five classes QEMU defines; almost everything is ``GenericError``.
"""

from __future__ import annotations

import enum

__all__ = ["ErrorClass", "QmpError"]


class ErrorClass(enum.StrEnum):
    """The error classes QEMU defines (qapi/error.json); clients know no others."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(Exception):
    """Raised by a command handler to reply ``{"error": {"class": ..., "desc": ...}}``.

    ``desc`` is shown to the user as is (QEMU style: no trailing period, no class name).
    ``error_class`` must be one of QEMU's classes; an unknown one is a programming error
    and raises ValueError at once rather than confusing a client later.
    """

    def __init__(self, desc: str, error_class: ErrorClass | str = ErrorClass.GENERIC_ERROR):
        super().__init__(desc)
        try:
            self.error_class = ErrorClass(error_class)
        except ValueError:
            known = ", ".join(c.value for c in ErrorClass)
            raise ValueError(
                f"unknown QMP error class {error_class!r} (QEMU knows: {known})"
            ) from None
        self.desc = desc

    def to_json(self) -> dict[str, str]:
        """The value of the ``error`` member of a QMP response."""
        return {"class": self.error_class.value, "desc": self.desc}

    def __repr__(self) -> str:
        return f"QmpError({self.desc!r}, error_class={self.error_class.value!r})"

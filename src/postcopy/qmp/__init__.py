"""The QMP server: QEMU's control protocol over a Unix socket.

``QmpServer`` is the protocol engine and the generic commands; the commands that drive the
VM and the migration are registered on it by their own layers (see server.py's docstring
for the registration API and the threading model).
"""

from postcopy.qmp.errors import ErrorClass, QmpError
from postcopy.qmp.server import (
    DEFAULT_QEMU_VERSION,
    FrameError,
    Handler,
    JsonStreamSplitter,
    QmpServer,
    compile_arguments,
)

__all__ = [
    "DEFAULT_QEMU_VERSION",
    "ErrorClass",
    "FrameError",
    "Handler",
    "JsonStreamSplitter",
    "QmpError",
    "QmpServer",
    "compile_arguments",
]

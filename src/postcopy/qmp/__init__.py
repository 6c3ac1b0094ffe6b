"""The QMP server: QEMU's control protocol over a Unix socket.

``QmpServer`` (`server`) is the protocol engine and the generic commands; the commands that
drive the VM and the migration are registered on it by their own layers (see server.py's
docstring for the registration API and the threading model). `framing` cuts the input
into JSON texts the way QEMU does, `schema` checks a command's arguments against its QAPI
``data``, `monitor` holds the VM's own commands.
"""

from postcopy.qmp.errors import ErrorClass, QmpError
from postcopy.qmp.framing import FrameError, JsonStreamSplitter
from postcopy.qmp.schema import compile_arguments
from postcopy.qmp.server import DEFAULT_QEMU_VERSION, Handler, QmpServer

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

"""How a migration's failures are told to the user: the wording, in one place.

Both ends and the command line take their texts from here, so that a message says what
really happened (the peer's own verdict, or what our socket saw) and what it means for
the guest, and so that this stays true in one place when the behaviour changes (postcopy
recovery: a broken link pauses instead of failing, and then the guest is not lost).
"""

from __future__ import annotations

import errno

from postcopy.transport import ConnectionClosed, HandshakeError
from postcopy.wire import ProtocolError

MiB = 1 << 20


def destination_gave_up(reason: str) -> str:
    """The destination sent SHUT with an error: its own words."""
    return f"destination gave up: {reason}"


def link_error(error: BaseException, peer: str = "destination") -> str:
    """What our end of the connection to `peer` saw, in the user's terms."""
    text = str(error) or type(error).__name__
    if isinstance(error, ProtocolError):
        return f"the {peer} sent something that breaks the protocol: {text}"
    if isinstance(error, ConnectionClosed):
        return f"the {peer} closed the connection without saying why (did its process exit?)"
    if isinstance(error, HandshakeError):
        return text
    if isinstance(error, TimeoutError):
        return f"the connection to the {peer} timed out: {text}"
    if isinstance(error, OSError) and error.errno == errno.ECONNRESET:
        return (
            f"the connection to the {peer} was reset (ECONNRESET): its process died, or "
            "something on the way (a firewall, a proxy, the network) dropped the connection"
        )
    if isinstance(error, OSError) and error.errno == errno.ECONNABORTED:
        return (
            f"the connection to the {peer} was aborted on this host (ECONNABORTED): "
            "something here closed it (ss -K, a firewall rule, the kernel)"
        )
    if isinstance(error, OSError) and error.errno == errno.EPIPE:
        return f"the connection to the {peer} is broken (EPIPE): it is gone"
    if isinstance(error, OSError) and error.strerror:
        name = errno.errorcode.get(error.errno or 0, "")
        return f"the connection to the {peer} failed: {error.strerror}" + (
            f" ({name})" if name else ""
        )
    return text


def return_path_broken(error: BaseException) -> str:
    """The source's return path ended without the destination's SHUT."""
    return f"return path: {link_error(error, 'destination')}"


def _amount(pages: int, size: int) -> str:
    shown = f"{size / MiB:.1f} MiB" if size >= MiB else f"{size // 1024} KiB"
    return f"{pages} pages ({shown})"


def guest_lost_on_destination(missing_pages: int, missing_bytes: int) -> str:
    """The destination failed in postcopy: the guest ran here, part of its RAM is not."""
    if missing_pages <= 0:
        return "the guest is stopped here"
    return (
        f"{_amount(missing_pages, missing_bytes)} of the guest's RAM never arrived from the "
        "source: the guest cannot go on, it is stopped here and lost"
    )


def destination_terminated_in_postcopy(missing_pages: int, missing_bytes: int) -> str:
    """The destination is told to exit while the guest runs here in postcopy."""
    if missing_pages <= 0:
        return (
            "terminated in postcopy: every page had arrived, but the source had not been "
            "told so; the guest ends with this process"
        )
    return (
        "terminated in postcopy: the guest ran here and "
        f"{_amount(missing_pages, missing_bytes)} of its RAM had not yet arrived: the "
        "guest is lost (the source's copy is older than the one that ran here)"
    )


def destination_lost_in_postcopy() -> str:
    """The source's postcopy failed: the guest ran on the destination since the switchover."""
    return (
        "the failure came in postcopy: the guest ran on the destination since the "
        "switchover, and what it did there is lost; it is kept here stopped, as it was at "
        "the switchover (cont would run that older state)"
    )


def source_terminated_in_postcopy(pending_pages: int, pending_bytes: int) -> str:
    """The source is told to exit while the guest runs on the destination."""
    if pending_pages <= 0:
        return (
            "terminated in postcopy: every page had been sent, but the destination had "
            "not confirmed it had them all; the guest there may be lost"
        )
    return (
        "terminated in postcopy: the guest runs on the destination and "
        f"{_amount(pending_pages, pending_bytes)} of its RAM were still only here: the "
        "guest there is lost"
    )

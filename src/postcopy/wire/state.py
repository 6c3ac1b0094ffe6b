"""The incoming (destination) postcopy state machine, with its transitions as a table.

The shape is h11's ``_state.py``: the legal transitions are data (`TRANSITIONS`, from state
and message type to the next state), and a message that is illegal in the current state
raises a `ProtocolError` naming the event, the role and the state. The states are QEMU's
PostcopyState names. The Decoder of the main stream drives this machine, so an illegal
command is refused when it is decoded, before the migration code acts on it.

The Handshake is not in the table: it must be the first message of the main stream and may
not appear again (a reconnect during recovery keeps the machine and sends no Handshake).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from postcopy.wire.errors import ProtocolError
from postcopy.wire.messages import (
    Advise,
    DeviceState,
    Discard,
    EndOfRound,
    Handshake,
    Listen,
    Message,
    Package,
    Ping,
    PostcopyComplete,
    PostcopyResume,
    PrecopyComplete,
    RamRun,
    RamRunHeader,
    RecvBitmapRequest,
    ResumeRequest,
    Run,
)

ROLE: Final = "incoming"


class IncomingState(enum.Enum):
    """Where the destination is in a migration (QEMU's PostcopyState)."""

    NONE = "none"
    """Nothing decided yet: precopy pages and device state may arrive."""
    ADVISE = "advise"
    """Postcopy may follow: RAM was emptied; precopy continues."""
    DISCARD = "discard"
    """Switchover: pages dirtied since they were sent are being discarded."""
    LISTENING = "listening"
    """RAM is registered on userfaultfd; pages arrive; the guest is not running yet."""
    RUNNING = "running"
    """The guest runs on the destination; missing pages are requested and pushed."""
    END = "end"
    """The migration is over (postcopy complete, or precopy-only switchover done)."""


TRANSITIONS: Final[Mapping[IncomingState, Mapping[type, IncomingState]]] = MappingProxyType(
    {
        IncomingState.NONE: {
            RamRun: IncomingState.NONE,
            EndOfRound: IncomingState.NONE,
            DeviceState: IncomingState.NONE,
            PrecopyComplete: IncomingState.END,
            Advise: IncomingState.ADVISE,
            Ping: IncomingState.NONE,
        },
        IncomingState.ADVISE: {
            RamRun: IncomingState.ADVISE,
            EndOfRound: IncomingState.ADVISE,
            DeviceState: IncomingState.ADVISE,
            PrecopyComplete: IncomingState.END,
            Discard: IncomingState.DISCARD,
            Listen: IncomingState.LISTENING,
            Ping: IncomingState.ADVISE,
        },
        IncomingState.DISCARD: {
            Discard: IncomingState.DISCARD,
            Listen: IncomingState.LISTENING,
            Ping: IncomingState.DISCARD,
        },
        IncomingState.LISTENING: {
            RamRun: IncomingState.LISTENING,
            Package: IncomingState.RUNNING,
            Run: IncomingState.RUNNING,
            Ping: IncomingState.LISTENING,
        },
        IncomingState.RUNNING: {
            RamRun: IncomingState.RUNNING,
            PostcopyComplete: IncomingState.END,
            # Recovery after a broken connection: the source reconnects and these arrive
            # while the guest keeps running on the destination (QEMU's postcopy-paused is a
            # migration status, not a PostcopyState). Their order is the migration's concern.
            ResumeRequest: IncomingState.RUNNING,
            RecvBitmapRequest: IncomingState.RUNNING,
            PostcopyResume: IncomingState.RUNNING,
            Ping: IncomingState.RUNNING,
        },
        IncomingState.END: {},
    }
)
"""(state, message type) -> next state. A pair not listed is a protocol error.

Ping (a probe answered by Pong on the return path) is legal in every live state and changes
nothing; after END the stream is over.
"""


def allowed_in(event: type) -> list[IncomingState]:
    """The states in which a message of this type is legal (for error messages and docs)."""
    return [state for state, row in TRANSITIONS.items() if event in row]


def _event_type(message: object) -> type:
    # The zero-copy receive path feeds the RAM_RUN header before its data is read.
    return RamRun if isinstance(message, RamRunHeader) else type(message)


class IncomingStateMachine:
    """The destination's PostcopyState, advanced by every main-stream message it receives."""

    def __init__(self, *, resumed: bool = False) -> None:
        """`resumed`: the machine of a recovery connection, which carries on a stream whose
        guest runs: it starts in RUNNING, its Handshake long seen (docs/PROTOCOL.md §4.11)."""
        self._state = IncomingState.RUNNING if resumed else IncomingState.NONE
        self._handshake_seen = resumed

    @property
    def state(self) -> IncomingState:
        return self._state

    @property
    def handshake_seen(self) -> bool:
        return self._handshake_seen

    def process(self, message: Message | RamRunHeader) -> IncomingState:
        """Apply one received message; return the new state or raise ProtocolError."""
        event = _event_type(message)
        name = event.__name__
        if event is Handshake:
            if self._handshake_seen:
                raise ProtocolError(
                    "event",
                    name,
                    message=f"{name} is illegal for role {ROLE} in state {self._state.name}: "
                    "a stream has one Handshake, as its first message",
                )
            self._handshake_seen = True
            return self._state
        if not self._handshake_seen:
            raise ProtocolError(
                "event",
                name,
                message=f"{name} is illegal for role {ROLE} in state {self._state.name}: "
                "the stream must begin with a Handshake",
            )
        next_state = TRANSITIONS[self._state].get(event)
        if next_state is None:
            legal = ", ".join(state.name for state in allowed_in(event)) or "no state"
            raise ProtocolError(
                "event",
                name,
                message=f"{name} is illegal for role {ROLE} in state {self._state.name} "
                f"(legal in: {legal})",
            )
        self._state = next_state
        return next_state

    def __repr__(self) -> str:
        return f"<IncomingStateMachine {self._state.name}>"

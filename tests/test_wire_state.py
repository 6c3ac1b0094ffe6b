"""The incoming state machine: the table is the specification, checked pair by pair."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from postcopy.wire import (
    TRANSITIONS,
    Advise,
    BlockInfo,
    DeviceState,
    Discard,
    EndOfRound,
    Handshake,
    IncomingState,
    IncomingStateMachine,
    Listen,
    Message,
    Package,
    Ping,
    PostcopyComplete,
    PostcopyResume,
    PrecopyComplete,
    ProtocolError,
    RamRun,
    RamRunHeader,
    RecvBitmapRequest,
    ResumeRequest,
    Run,
)
from postcopy.wire.messages import MAIN_MESSAGES

HANDSHAKE = Handshake(frozenset(), (BlockInfo("ram", 1 << 20, 4096),), 1)

SAMPLES: dict[type, Message] = {
    Handshake: HANDSHAKE,
    Advise: Advise(4096, 4096),
    RamRun: RamRun(0, 0, np.ones(1, dtype=bool), b""),
    EndOfRound: EndOfRound(1),
    DeviceState: DeviceState(b"{}"),
    PrecopyComplete: PrecopyComplete(),
    Discard: Discard(0, ((0, 1),)),
    Listen: Listen(),
    Run: Run(),
    Package: Package((DeviceState(b"{}"), Run())),
    PostcopyComplete: PostcopyComplete(),
    ResumeRequest: ResumeRequest(bytes(16), 1),
    RecvBitmapRequest: RecvBitmapRequest(0),
    PostcopyResume: PostcopyResume(),
    Ping: Ping(7),
}

PATHS: dict[IncomingState, tuple[type, ...]] = {
    IncomingState.NONE: (),
    IncomingState.ADVISE: (Advise,),
    IncomingState.DISCARD: (Advise, Discard),
    IncomingState.LISTENING: (Advise, Listen),
    IncomingState.RUNNING: (Advise, Listen, Run),
    IncomingState.END: (Advise, Listen, Run, PostcopyComplete),
}

# The specification, written independently of the table in state.py.
LIVE = (
    IncomingState.NONE,
    IncomingState.ADVISE,
    IncomingState.DISCARD,
    IncomingState.LISTENING,
    IncomingState.RUNNING,
)
SPEC: dict[type, dict[IncomingState, IncomingState]] = {
    RamRun: {
        IncomingState.NONE: IncomingState.NONE,
        IncomingState.ADVISE: IncomingState.ADVISE,
        IncomingState.LISTENING: IncomingState.LISTENING,
        IncomingState.RUNNING: IncomingState.RUNNING,
    },
    EndOfRound: {
        IncomingState.NONE: IncomingState.NONE,
        IncomingState.ADVISE: IncomingState.ADVISE,
    },
    DeviceState: {
        IncomingState.NONE: IncomingState.NONE,
        IncomingState.ADVISE: IncomingState.ADVISE,
    },
    PrecopyComplete: {
        IncomingState.NONE: IncomingState.END,
        IncomingState.ADVISE: IncomingState.END,
    },
    Advise: {IncomingState.NONE: IncomingState.ADVISE},
    Discard: {
        IncomingState.ADVISE: IncomingState.DISCARD,
        IncomingState.DISCARD: IncomingState.DISCARD,
    },
    Listen: {
        IncomingState.ADVISE: IncomingState.LISTENING,
        IncomingState.DISCARD: IncomingState.LISTENING,
    },
    Package: {IncomingState.LISTENING: IncomingState.RUNNING},
    Run: {IncomingState.LISTENING: IncomingState.RUNNING},
    PostcopyComplete: {IncomingState.RUNNING: IncomingState.END},
    ResumeRequest: {IncomingState.RUNNING: IncomingState.RUNNING},
    RecvBitmapRequest: {IncomingState.RUNNING: IncomingState.RUNNING},
    PostcopyResume: {IncomingState.RUNNING: IncomingState.RUNNING},
    Ping: {state: state for state in LIVE},
}


def machine_in(state: IncomingState) -> IncomingStateMachine:
    machine = IncomingStateMachine()
    machine.process(HANDSHAKE)
    for event in PATHS[state]:
        machine.process(SAMPLES[event])
    assert machine.state is state
    return machine


def test_samples_cover_every_main_stream_message() -> None:
    assert set(SAMPLES) == set(MAIN_MESSAGES)


def test_table_is_the_specification() -> None:
    table = {
        event: {state: row[event] for state, row in TRANSITIONS.items() if event in row}
        for event in SPEC
    }
    assert table == SPEC
    assert set(TRANSITIONS) == set(IncomingState)
    assert TRANSITIONS[IncomingState.END] == {}


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(IncomingState, sorted(SPEC, key=str)))
)
def test_every_state_and_event(state: IncomingState, event: type) -> None:
    machine = machine_in(state)
    expected = SPEC[event].get(state)
    if expected is not None:
        assert machine.process(SAMPLES[event]) is expected
        assert machine.state is expected
        return
    with pytest.raises(ProtocolError) as error:
        machine.process(SAMPLES[event])
    text = str(error.value)
    assert text.startswith(f"{event.__name__} is illegal for role incoming in state {state.name}")
    assert (error.value.field, error.value.value) == ("event", event.__name__)
    assert machine.state is state  # an illegal event changes nothing


def test_error_lists_the_states_where_the_event_is_legal() -> None:
    with pytest.raises(ProtocolError, match=r"\(legal in: ADVISE, DISCARD\)$"):
        machine_in(IncomingState.NONE).process(SAMPLES[Discard])
    with pytest.raises(ProtocolError, match=r"\(legal in: no state\)$"):
        machine_in(IncomingState.NONE).process(RunLike())  # type: ignore[arg-type]


class RunLike:
    """An object the table does not know."""


def test_handshake_only_first() -> None:
    machine = IncomingStateMachine()
    assert not machine.handshake_seen
    with pytest.raises(ProtocolError, match="must begin with a Handshake"):
        machine.process(SAMPLES[RamRun])
    assert machine.process(HANDSHAKE) is IncomingState.NONE
    assert machine.handshake_seen
    for state in IncomingState:
        with pytest.raises(ProtocolError, match=r"^Handshake is illegal .* one Handshake"):
            machine_in(state).process(HANDSHAKE)


def test_ram_run_header_counts_as_ram_run() -> None:
    header = RamRunHeader(0, 0, np.ones(1, dtype=bool), 0)
    assert machine_in(IncomingState.LISTENING).process(header) is IncomingState.LISTENING
    with pytest.raises(ProtocolError, match=r"^RamRun is illegal"):
        machine_in(IncomingState.DISCARD).process(header)


def test_full_paths() -> None:
    precopy = IncomingStateMachine()
    for message in (HANDSHAKE, SAMPLES[RamRun], EndOfRound(1), DeviceState(b""), PrecopyComplete()):
        precopy.process(message)
    assert precopy.state is IncomingState.END
    hybrid = IncomingStateMachine()
    path: list[Message] = [
        HANDSHAKE,
        Advise(4096, 4096),
        SAMPLES[RamRun],
        EndOfRound(1),
        Discard(0, ((0, 1),)),
        Discard(0, ((3, 1),)),
        Listen(),
        SAMPLES[RamRun],
        SAMPLES[Package],
        SAMPLES[RamRun],
        ResumeRequest(bytes(16), 2),
        RecvBitmapRequest(0),
        PostcopyResume(),
        SAMPLES[RamRun],
        PostcopyComplete(),
    ]
    states = [hybrid.process(message) for message in path]
    assert states[-1] is IncomingState.END
    assert (
        IncomingState.DISCARD in states
        and IncomingState.LISTENING in states
        and IncomingState.RUNNING in states
    )
    assert repr(hybrid) == "<IncomingStateMachine END>"

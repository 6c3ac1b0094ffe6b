"""The trace-point catalogue (postcopy/migration/trace_points.py) against the code: every
`_trace(...)` the migration makes is in it with its fields and side, every entry is made
somewhere, and the readers (report, plot, bench) name trace points only through the
catalogue, so renaming a step cannot silently empty a plot or a figure."""

from __future__ import annotations

import ast
from pathlib import Path

from postcopy.migration import trace_points as tp

SRC = Path(__file__).resolve().parent.parent / "src" / "postcopy"
# the modules that read timeline entries by name, and the reader label each one carries
READERS = {
    "tools/runfile.py": tp.RUNFILE,
    "tools/plot.py": tp.PLOT,
    "bench/analysis.py": tp.BENCH,
}
CONSTANTS = {name: value for name, value in vars(tp).items() if isinstance(value, tp.TracePoint)}


def _trace_calls() -> list[tuple[Path, ast.Call]]:
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_trace"
            ):
                found.append((path, node))
    return found


def _side_of(path: Path) -> str:
    relative = path.relative_to(SRC / "migration").as_posix()
    if relative.startswith("outgoing/"):
        return tp.SOURCE
    if relative.startswith("incoming/"):
        return tp.DESTINATION
    return tp.BOTH


def test_every_trace_point_made_is_catalogued_with_its_fields_and_side() -> None:
    calls = _trace_calls()
    assert len(calls) >= len(tp.TRACE_POINTS)
    for path, call in calls:
        where = f"{path.relative_to(SRC)}:{call.lineno}"
        assert call.args and isinstance(call.args[0], ast.Constant), (
            f"{where}: the trace point's name must be a literal, for this check"
        )
        name = call.args[0].value
        assert name in tp.CATALOGUE, f"{where}: trace point {name!r} is not in the catalogue"
        point = tp.CATALOGUE[name]
        fields = {keyword.arg for keyword in call.keywords}
        assert fields <= set(point.fields), (
            f"{where}: {name} has fields {fields - set(point.fields)} the catalogue does not list"
        )
        assert fields == set(point.fields), f"{where}: {name} lacks {set(point.fields) - fields}"
        assert point.side == _side_of(path), f"{where}: {name} is made on {_side_of(path)}"


def test_every_catalogued_trace_point_is_made_somewhere() -> None:
    made = {
        call.args[0].value
        for _, call in _trace_calls()
        if call.args and isinstance(call.args[0], ast.Constant)
    }
    assert set(tp.CATALOGUE) - made == set(), "catalogue entries nothing makes"


def test_names_are_unique_and_the_constants_are_the_table() -> None:
    assert len(tp.CATALOGUE) == len(tp.TRACE_POINTS)
    assert set(CONSTANTS.values()) == set(tp.TRACE_POINTS)
    for point in tp.TRACE_POINTS:
        assert not set(point.fields) & set(tp.COMMON_FIELDS)
        assert point.doc and point.side in (tp.SOURCE, tp.DESTINATION, tp.BOTH)


def _constants_used(tree: ast.AST) -> set[str]:
    """Catalogue constants a module names: tp.ROUND_END, trace_points.ROUND_END, ROUND_END."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in CONSTANTS:
            used.add(node.attr)
        elif isinstance(node, ast.Name) and node.id in CONSTANTS:
            used.add(node.id)
    return used


def test_each_reader_uses_the_trace_points_it_is_listed_for() -> None:
    for module, label in READERS.items():
        tree = ast.parse((SRC / module).read_text())
        used = _constants_used(tree)
        listed = {name for name, point in CONSTANTS.items() if label in point.readers}
        missing = listed - used
        assert not missing, f"{module} is listed as reading {missing} but does not"
    readers = {label for point in tp.TRACE_POINTS for label in point.readers}
    assert readers <= set(READERS.values())


def test_readers_never_spell_a_trace_point_name() -> None:
    """A literal name in a reader is a rename waiting to break it: they use the constants.
    Also any comparison of an entry's "event" with a literal must name a record kind."""
    from postcopy.tools.runfile import RECORD_KINDS

    names = set(tp.CATALOGUE)
    for module in [*READERS, "cli/report.py", "bench/plot.py", "bench/table.py"]:
        tree = ast.parse((SRC / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                mentions_event = any(
                    isinstance(sub, ast.Constant) and sub.value == "event"
                    for operand in operands
                    for sub in ast.walk(operand)
                )
                literals = [
                    o.value
                    for o in operands
                    if isinstance(o, ast.Constant) and isinstance(o.value, str)
                ]
                if mentions_event:
                    for literal in literals:
                        assert literal in RECORD_KINDS, (
                            f"{module}:{node.lineno}: compares an entry's event with "
                            f"{literal!r}: use the trace_points constant"
                        )
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names - {"status", "completed", "run", "stop"}, (
                    f"{module}:{node.lineno}: spells the trace point {node.value!r}"
                )

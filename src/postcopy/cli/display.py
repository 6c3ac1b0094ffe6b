"""The live migration display shared by `postcopy migrate` and `postcopy demo` (rich).

`ProgressView` turns progress samples (dicts as `postcopy migrate --json` prints them) into
one renderable: a phase line, a bar of how much of the guest's RAM is still to move, and a
table of the figures that matter while it moves. `LiveProgress` shows it in place on a
terminal and, elsewhere, prints nothing until the end (so logs stay readable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from postcopy.tools.watch import FINAL_STATUSES
from postcopy.units import format_bytes

PHASE_TEXT = {
    "none": "not started",
    "setup": "setup: connecting, checking the destination",
    "active": "precopy: copying RAM while the guest runs",
    "device": "stop-and-copy: guest stopped, sending the last dirty pages",
    "postcopy-active": "postcopy: the guest runs on the destination, pages follow on demand",
    "postcopy-paused": "postcopy paused: the link broke; both sides keep every page",
    "postcopy-recover-setup": "postcopy recovering: reconnecting to the destination",
    "postcopy-recover": "postcopy recovering: resuming from the destination's received pages",
    "cancelling": "cancelling",
    "cancelled": "cancelled: the source VM keeps running",
    "completed": "completed",
    "failed": "failed",
}
PHASE_STYLE = {
    "active": "blue",
    "device": "yellow",
    "postcopy-active": "green",
    "postcopy-paused": "bold yellow",
    "postcopy-recover-setup": "yellow",
    "postcopy-recover": "yellow",
    "completed": "bold green",
    "failed": "bold red",
    "cancelled": "bold red",
}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def format_rate(bytes_per_second: float | None) -> str:
    """A rate as the summary gives it: MB/s and Mbit/s (powers of ten, as links are sold)."""
    if bytes_per_second is None:
        return "-"
    return f"{bytes_per_second / 1e6:,.0f} MB/s ({bytes_per_second * 8 / 1e6:,.0f} Mbit/s)"


class ProgressView:
    """Renders the latest sample; `extra_rows` adds rows (e.g. the demo's guest passes)."""

    def __init__(
        self, title: str, *, extra_rows: Callable[[], list[tuple[str, str]]] | None = None
    ) -> None:
        self.title = title
        self.extra_rows = extra_rows
        self.sample: dict[str, Any] | None = None
        self.switched_at: float | None = None
        self.note: str | None = None

    def update(self, sample: dict[str, Any]) -> None:
        if sample.get("status") == "postcopy-active" and self.switched_at is None:
            self.switched_at = float(sample["t"])
        self.sample = sample

    def render(self) -> RenderableType:
        sample = self.sample
        if sample is None:
            return Text(f"{self.title}: starting")
        status = str(sample.get("status", "none"))
        phase = Text.assemble(
            (f"{self.title}  ", "bold"),
            (PHASE_TEXT.get(status, status), PHASE_STYLE.get(status, "")),
        )
        total = int(sample.get("total") or 0)
        remaining = int(sample.get("remaining") or 0)
        done = max(total - remaining, 0) if status not in ("setup", "none") else 0
        if status == "completed":
            done = total
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(total, 1), completed=done, width=50),
            Text(f"{format_bytes(remaining)} of {format_bytes(total)} still to move"),
        )
        table = Table.grid(padding=(0, 2))
        table.add_column(style="dim")
        table.add_column()
        elapsed = float(sample.get("t") or 0.0)
        sent = int(sample.get("transferred") or 0)
        table.add_row("elapsed", format_duration(elapsed))
        table.add_row("sent", format_bytes(sent))
        if status not in FINAL_STATUSES:  # at the end the summary gives the average
            table.add_row("live rate (last second)", format_rate(sample.get("rate")))
        table.add_row("remaining", format_bytes(remaining))
        page_size = int(sample.get("page-size") or 4096)
        dirty = int(sample.get("dirty-pages-rate") or 0)
        table.add_row("dirty rate", f"{dirty:,} pages/s ({format_bytes(dirty * page_size)}/s)")
        table.add_row("precopy rounds", str(sample.get("rounds", 0)))
        if self.switched_at is not None:
            table.add_row("switched to postcopy", f"at {self.switched_at:.2f} s")
        table.add_row("postcopy requests", f"{int(sample.get('postcopy-requests') or 0):,}")
        if sample.get("pauses"):
            paused = format_duration(int(sample.get("paused-ms") or 0) / 1000)
            table.add_row(
                "link broken",
                f"{sample['pauses']} time(s), {paused} paused, "
                f"{int(sample.get('recoveries') or 0)} recovered",
            )
            if status.startswith("postcopy-") and status != "postcopy-active":
                table.add_row("why", str(sample.get("error") or "-"))
        if sample.get("expected-downtime") is not None and status == "active":
            table.add_row("expected downtime", f"{sample['expected-downtime']} ms")
        if status not in FINAL_STATUSES:
            table.add_row("ETA", format_duration(sample.get("eta")))
        if self.extra_rows is not None:
            for label, value in self.extra_rows():
                table.add_row(label, value)
        parts: list[RenderableType] = [phase, bar, table]
        if self.note:
            parts.append(Text(self.note, style="yellow"))
        return Group(*parts)


class LiveProgress:
    """A ProgressView shown in place while a migration runs (a context manager)."""

    def __init__(self, view: ProgressView, console: Console | None = None) -> None:
        self.view = view
        self.console = console or Console()
        self._live = Live(
            view.render(),
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def __enter__(self) -> LiveProgress:
        if self.console.is_terminal:
            self._live.start()
        return self

    def update(self, sample: dict[str, Any]) -> None:
        self.view.update(sample)
        if self.console.is_terminal:
            self._live.update(self.view.render(), refresh=True)

    def refresh(self) -> None:
        if self.console.is_terminal:
            self._live.update(self.view.render(), refresh=True)

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self._live.update(self.view.render(), refresh=True)
            self._live.stop()
        elif self.view.sample is not None and self.view.sample.get("transferred"):
            # not a terminal: the final state once, for the log (nothing if nothing moved,
            # so that a failure to start stays the one line on stderr)
            self.console.print(self.view.render())

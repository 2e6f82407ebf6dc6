"""What ``deepercluster run`` and ``stage`` show while they work: a live view on a terminal (the run, one line per
stage with units done/total, rate and time left, each round's metrics as it ends), plain progress lines when the
output is a file or a pipe (no redraws, at most one line per stage every ``PLAIN_EVERY_S``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from deepercluster.progress import Event

PLAIN_EVERY_S = 30.0
ROW_COLUMNS = (("kmeans_nmi_labels", "kmNMI"), ("probe_acc", "probe"), ("knn_acc", "kNN"), ("nmi_labels", "NMI"),
               ("train_loss", "loss"))


@dataclass
class StageLine:
    label: str
    status: str = "running"
    step: str = ""
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    step_started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    printed: float = field(default_factory=time.monotonic)  # plain output: the first progress line after a while

    def rate_and_left(self) -> tuple[float | None, float | None]:
        elapsed = time.monotonic() - self.step_started
        if self.done == 0 or elapsed <= 0:
            return None, None
        rate = self.done / elapsed
        return rate, (self.total - self.done) / rate


def round_row(row: dict[str, Any]) -> str:
    """A round's headline metrics as one short line."""
    parts = [f"{title} {row[key]:.3f}" for key, title in ROW_COLUMNS
             if isinstance(row.get(key), int | float) and row[key] == row[key]]
    if isinstance(row.get("wall_s"), int | float):
        parts.append(f"{row['wall_s']:.0f} s")
    return f"round {int(row['round'])}: " + ("  ".join(parts) or "no metrics")


class RunView:
    """Subscribe it to :mod:`deepercluster.progress` while a run goes (``with view: ...``)."""

    def __init__(self, console: Console, title: str, live: bool | None = None):
        self.console, self.title = console, title
        self.live = console.is_terminal if live is None else live
        self.lines: dict[str, StageLine] = {}
        self._live: Live | None = None

    def __enter__(self) -> RunView:
        if self.live:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def __call__(self, event: Event) -> None:
        d = event.data
        if event.kind == "stage":
            line = self.lines[d["label"]] = StageLine(d["label"], d["status"])
            if d["status"] == "done":
                self._say(f"{line.label:<13} done already (its fingerprint matches)")
        elif event.kind == "units":
            line = self.lines.setdefault(d["label"], StageLine(d["label"]))
            if d["step"] != line.step:
                line.step, line.step_started = d["step"], time.monotonic()
            line.done, line.total = d["done"], d["total"]
            if not self.live and time.monotonic() - line.printed >= PLAIN_EVERY_S and 0 < line.done < line.total:
                line.printed = time.monotonic()
                self._say(self._describe(line))
        elif event.kind == "stage_end":
            line = self.lines.setdefault(d["label"], StageLine(d["label"]))
            line.status, line.seconds = "finished", d["seconds"]
            units = f"{d['units']} unit" + ("s" if d["units"] != 1 else "")
            self._say(f"{line.label:<13} done in {d['seconds']:.1f} s ({units})")
        elif event.kind == "metrics":
            self._say(round_row(d["row"]), style="bold")
        if self._live is not None:
            self._live.update(self._render())

    def _describe(self, line: StageLine) -> str:
        rate, left = line.rate_and_left()
        text = f"{line.label:<13} {line.step} {line.done}/{line.total} units"
        if rate is not None:
            text += f", {rate:.2f}/s"
        if left is not None:
            text += f", about {left:.0f} s left"
        return text

    def _say(self, text: str, style: str | None = None) -> None:
        (self._live.console if self._live is not None else self.console).print(
            Text(text, style=style or ""), soft_wrap=True)

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 2))
        for line in self.lines.values():
            if line.status == "running":
                table.add_row(Text(self._describe(line)), Text(f"{time.monotonic() - line.started:.0f} s"))
        return Group(Text(self.title, style="bold"), table)

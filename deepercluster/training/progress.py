"""The per-iteration progress line rank 0 prints (one per iteration), and its parser for whoever reads the
workers' output (the Prefect task turns it into a progress artifact)."""

from __future__ import annotations

import re
from typing import Any

_LINE = re.compile(
    r"^train r(?P<round>\d+) step (?P<step>\d+)/(?P<steps>\d+) epoch (?P<epoch>\d+) iter (?P<iter>\d+)/(?P<iters>\d+)"
    r" loss (?P<loss>\S+) acc_super (?P<acc_super>\S+) acc_sub (?P<acc_sub>\S+) (?P<images_per_s>\S+) img/s$"
)
_INTS = ("round", "step", "steps", "epoch", "iter", "iters")


def format_progress(r: int, row: dict[str, Any], iters_per_epoch: int, total_steps: int) -> str:
    """``row``: a training-log row (epoch, iter (0-based), step, loss, acc_super, acc_sub, images_per_s)."""
    return (f"train r{r} step {row['step']}/{total_steps} epoch {row['epoch']} iter {row['iter'] + 1}/"
            f"{iters_per_epoch} loss {row['loss']:.4f} acc_super {row['acc_super']:.3f} acc_sub {row['acc_sub']:.3f} "
            f"{row['images_per_s']:.0f} img/s")


def parse_progress(line: str) -> dict[str, Any] | None:
    """The fields of a progress line (``iter`` 1-based), or None for any other line."""
    m = _LINE.match(line.strip())
    if m is None:
        return None
    out: dict[str, Any] = {}
    for key, value in m.groupdict().items():
        out[key] = int(value) if key in _INTS else float(value)
    return out

"""The per-iteration progress record rank 0 prints (one JSON line per iteration, the row ``log.jsonl`` keeps), its
reader for whoever reads the workers' output, and its one-line human form."""

from __future__ import annotations

import json
from typing import Any

PREFIX = "@progress "  # marks a progress record among the workers' other output lines


def format_progress(r: int, row: dict[str, Any], iters_per_epoch: int, total_steps: int) -> str:
    """``row``: a training-log row (epoch, iter (0-based), step, loss, acc_super, acc_sub, images_per_s)."""
    record = {"round": r, "steps": total_steps, "iters": iters_per_epoch,
              **{k: v for k, v in row.items() if isinstance(v, int | float)}, "iter": row["iter"] + 1}
    return PREFIX + json.dumps(record, sort_keys=True)


def parse_progress(line: str) -> dict[str, Any] | None:
    """The fields of a progress record (``iter`` 1-based), or None for any other line."""
    line = line.strip()
    if not line.startswith(PREFIX):
        return None
    try:
        record = json.loads(line[len(PREFIX):])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def describe_progress(p: dict[str, Any]) -> str:
    """A progress record as one readable line."""
    return (f"train r{p['round']} step {p['step']}/{p['steps']} epoch {p['epoch']} iter {p['iter']}/{p['iters']} "
            f"loss {p['loss']:.4f} acc_super {p['acc_super']:.3f} acc_sub {p['acc_sub']:.3f} "
            f"{p['images_per_s']:.0f} img/s")

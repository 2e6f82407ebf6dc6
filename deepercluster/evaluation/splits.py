"""The probes' train/test splits of a run's labelled images: deterministic, disjoint, and the same for every
round and every method run on the same data with the same ``eval`` settings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from deepercluster.config import EvalConfig
from deepercluster.errors import ConfigError


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # image ids, sorted
    test: np.ndarray  # image ids, sorted, disjoint from ``train``


def split_count(size: float | int, n: int) -> int:
    """A fraction of ``n`` (rounded down, at least 1) or a count."""
    return max(1, int(size * n)) if isinstance(size, float) else int(size)


def probe_splits(image_ids: np.ndarray, labels: pd.Series | np.ndarray, cfg: EvalConfig) -> Splits:
    """Permute the labelled images with ``cfg.split_seed``; the first ``probe_train`` are the train split, the next
    ``probe_test`` the test split. ``labels`` is missing (NA) for unlabelled images."""
    labelled = np.asarray(image_ids)[~pd.isna(pd.Series(labels)).to_numpy()]
    n = len(labelled)
    n_train, n_test = split_count(cfg.probe_train, n), split_count(cfg.probe_test, n)
    if n_train + n_test > n:
        raise ConfigError(f"eval.probe_train + eval.probe_test = {n_train} + {n_test} images exceed the {n} "
                          "labelled images of the run: lower them")
    order = np.random.default_rng(np.random.SeedSequence([cfg.split_seed, 7])).permutation(labelled)
    return Splits(np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_test]))

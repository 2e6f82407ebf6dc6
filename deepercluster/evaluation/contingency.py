"""NMI and ARI of two labellings of every image, accumulated part by part.

The evaluate stage compares this round's targets with the labels and with the previous round's targets over all N
images. Holding both labellings whole is N-sized; instead :class:`PairCounts` keeps the sparse contingency table
(how many images have each (a, b) pair, at most one entry per pair that occurs) and :func:`aligned_parts` streams
parquet files that list the same images in the same order, row group by row group, in step. :meth:`PairCounts.nmi`
and :meth:`PairCounts.ari` then follow scikit-learn's arithmetic (``normalized_mutual_info_score`` with the
arithmetic normalisation, ``adjusted_rand_score``): the result equals :func:`deepercluster.evaluation.metrics.nmi`
/ ``ari`` on the whole arrays (to float rounding; in practice bit for bit).
"""

from __future__ import annotations

from collections.abc import Iterator
from math import log

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import mutual_info_score

from deepercluster.errors import StoreError
from deepercluster.store import RunStore

SHIFT = 32  # a pair (a, b) is coded a << 32 | b: both must lie in [0, 2^31)
LIMIT = 1 << 31
NA = -1  # a missing label, as read by :func:`aligned_parts`


class PairCounts:
    """The sparse contingency table of two labellings (non-negative integers below 2^31), fed in parts."""

    def __init__(self) -> None:
        self.codes = np.zeros(0, dtype=np.int64)  # sorted, unique pair codes
        self.counts = np.zeros(0, dtype=np.int64)  # images per pair

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Count the pairs ``(a[i], b[i])`` of one part."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if len(a) != len(b):
            raise ValueError(f"labellings of different lengths: {len(a)} and {len(b)}")
        if len(a) == 0:
            return
        for name, x in (("first", a), ("second", b)):
            if x.min() < 0 or x.max() >= LIMIT:
                raise ValueError(f"the {name} labelling holds values outside [0, 2^31): {x.min()}..{x.max()}")
        codes, counts = np.unique((a << SHIFT) | b, return_counts=True)
        self._merge(codes, counts.astype(np.int64))

    def _merge(self, codes: np.ndarray, counts: np.ndarray) -> None:
        """Add sorted unique ``codes`` with their ``counts`` (a merge of two sorted lists, not a re-sort)."""
        at = np.searchsorted(self.codes, codes)
        seen = at < len(self.codes)
        seen[seen] = self.codes[at[seen]] == codes[seen]
        self.counts[at[seen]] += counts[seen]
        self.codes = np.insert(self.codes, at[~seen], codes[~seen])
        self.counts = np.insert(self.counts, at[~seen], counts[~seen])

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def table(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """The contingency matrix (rows: values of the first labelling, columns: of the second, both in increasing
        order, as scikit-learn's ``contingency_matrix``) and its row and column sums."""
        a, b = self.codes >> SHIFT, self.codes & (LIMIT * 2 - 1)
        rows_of, row = np.unique(a, return_inverse=True)
        cols_of, col = np.unique(b, return_inverse=True)
        matrix = sp.csr_matrix((self.counts, (row, col)), shape=(len(rows_of), len(cols_of)), dtype=np.int64)
        return matrix, _sums(row, self.counts, len(rows_of)), _sums(col, self.counts, len(cols_of))

    def nmi(self) -> float:
        """Normalised mutual information, arithmetic normalisation (``sklearn.metrics.normalized_mutual_info_score``
        computed from the table)."""
        matrix, n_a, n_b = self.table()
        if len(n_a) == len(n_b) == 1 or len(n_a) == len(n_b) == 0:
            return 1.0  # neither labelling splits the images: a perfect match, as scikit-learn has it
        mi = mutual_info_score(None, None, contingency=matrix.astype(np.float64))
        if mi == 0:
            return 0.0
        return float(mi / np.mean([_entropy(n_a), _entropy(n_b)]))

    def ari(self) -> float:
        """Adjusted Rand index (``sklearn.metrics.adjusted_rand_score`` from the pair confusion of the table)."""
        matrix, n_a, n_b = self.table()
        n = int(n_a.sum())
        sum_squares = int((matrix.data**2).sum())
        fp = int(matrix.dot(n_b).sum()) - sum_squares
        fn = int(matrix.transpose().dot(n_a).sum()) - sum_squares
        tp = sum_squares - n
        tn = n * n - fp - fn - sum_squares
        if fn == 0 and fp == 0:
            return 1.0
        return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _sums(index: np.ndarray, counts: np.ndarray, size: int) -> np.ndarray:
    """Integer sums of ``counts`` by ``index`` (a row's or a column's images)."""
    out = np.zeros(size, dtype=np.int64)
    np.add.at(out, index, counts)
    return out


def _entropy(sizes: np.ndarray) -> float:
    """Entropy of a labelling from its class sizes, as scikit-learn's ``_entropy``."""
    if len(sizes) == 1:
        return 0.0
    pi = sizes.astype(np.float64)
    pi_sum = np.sum(pi)
    return float(-np.sum((pi / pi_sum) * (np.log(pi) - log(pi_sum))))


def aligned_parts(store: RunStore, sources: list[tuple[str, str]]) -> Iterator[list[np.ndarray]]:
    """Parts of the parquet files ``sources`` = [(file, column)] that list the same images in the same order (an
    ``image_id`` column each, checked equal), in step: each yield holds one array per source, of the same rows. The
    files' row groups need not match: only a row group of each is held at a time. A nullable column (``label_id``)
    reads its missing values as :data:`NA`."""
    streams = [_column_parts(store, rel, column) for rel, column in sources]
    held: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(streams)
    while True:
        for i, stream in enumerate(streams):
            if held[i] is None or len(held[i][0]) == 0:
                held[i] = next(stream, None)
        ended = [h is None for h in held]
        if all(ended):
            return
        if any(ended):
            short = sources[ended.index(True)][0]
            raise StoreError(f"{store.url(short)} lists fewer images than {store.url(sources[ended.index(False)][0])}"
                             ": recompute the stage that wrote it (--force)")
        rows = min(len(h[0]) for h in held)
        ids = held[0][0][:rows]
        for (rel, _), h in zip(sources, held, strict=True):
            if not np.array_equal(h[0][:rows], ids):
                raise StoreError(f"{store.url(rel)} lists other images, or in another order, than "
                                 f"{store.url(sources[0][0])} (near image {int(ids[0])}): recompute the stage that "
                                 "wrote it (--force)")
        yield [h[1][:rows] for h in held]
        held = [(h[0][rows:], h[1][rows:]) for h in held]


def _column_parts(store: RunStore, rel: str, column: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image ids, ``column`` as int64, NA -> :data:`NA`) of ``rel``, row group by row group."""
    for part in store.iter_parquet(rel, columns=["image_id", column]):
        values = pd.array(part[column], dtype="Int64").to_numpy(dtype=np.int64, na_value=NA)
        yield part["image_id"].to_numpy(dtype=np.int64), values

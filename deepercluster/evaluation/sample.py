"""The labelled sample the evaluate stage's numeric work reads: at most ``eval.sample`` labelled images.

The k-means agreement, the linear probe and the kNN need the images' vectors in memory; reading every labelled
image makes the stage's memory grow with the run. The sample is drawn while streaming the manifest row group by
row group (its ``image_id`` and ``label_id`` columns only): each labelled image gets a key, a bijective 64-bit hash
(splitmix64) of its id salted by ``eval.split_seed``, and the ``eval.sample`` smallest keys are kept (bottom-k
sampling). So the sample is uniform, the same for every round and every method run on the same images (as the
probe splits), independent of the manifest's row groups, and held in O(sample + one row group) memory. With no
more labelled images than ``eval.sample``, it is all of them: what the stage read before it sampled.

Vectors are then read only at the sampled rows (:func:`sample_whitened`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deepercluster.clustering.vectors import open_round_features, read_finite
from deepercluster.clustering.whitening import ensure_pca, open_whitened, whiten, whitening_done
from deepercluster.config import PipelineConfig
from deepercluster.paths import MANIFEST, features_rel, whitened_rel
from deepercluster.store import RunStore

SALT_KEY = 13  # the sample's salt is drawn from SeedSequence([split_seed, SALT_KEY])


@dataclass(frozen=True)
class LabelledSample:
    """Labelled images: ``ids`` sorted (rows of the round's feature arrays), ``labels`` theirs (int64)."""

    ids: np.ndarray
    labels: np.ndarray
    labelled: int  # labelled images of the run (the sample's population)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Where images ``ids`` (all in the sample) are in it."""
        return np.searchsorted(self.ids, ids)


def splitmix64(x: np.ndarray, salt: int) -> np.ndarray:
    """The splitmix64 finaliser of ``x + salt`` (uint64, wrapping): a bijection, so distinct ids never tie."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(salt)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def labelled_parts(store: RunStore) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image ids, labels) of the manifest's labelled images, row group by row group."""
    for part in store.iter_parquet(MANIFEST, columns=["image_id", "label_id"]):
        labels = pd.array(part["label_id"], dtype="Int64")
        known = ~np.asarray(labels.isna())
        yield (part["image_id"].to_numpy(dtype=np.int64)[known],
               labels[known].to_numpy(dtype=np.int64))


def labelled_sample(store: RunStore, size: int, seed: int) -> LabelledSample:
    """At most ``size`` labelled images of the run, a uniform sample seeded by ``seed`` (see the module)."""
    salt = int(np.random.SeedSequence([seed, SALT_KEY]).generate_state(1, np.uint64)[0])
    keys = np.zeros(0, dtype=np.uint64)
    ids = np.zeros(0, dtype=np.int64)
    labels = np.zeros(0, dtype=np.int64)
    labelled = 0
    for part_ids, part_labels in labelled_parts(store):
        labelled += len(part_ids)
        keys = np.concatenate([keys, splitmix64(part_ids, salt)])
        ids = np.concatenate([ids, part_ids])
        labels = np.concatenate([labels, part_labels])
        if len(keys) > size:
            keep = np.argpartition(keys, size - 1)[:size]
            keys, ids, labels = keys[keep], ids[keep], labels[keep]
    order = np.argsort(ids, kind="stable")
    return LabelledSample(ids[order], labels[order], labelled)


def rows_at(store: RunStore, rel: str, ids: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """``columns`` of the parquet file ``rel`` (an ``image_id`` column, e.g. the manifest or the assignments) at
    images ``ids`` (sorted, all listed), in that order: the file is streamed row group by row group and only those
    rows kept."""
    ids = np.asarray(ids, dtype=np.int64)
    kept = [part[np.isin(part["image_id"].to_numpy(dtype=np.int64), ids)]
            for part in store.iter_parquet(rel, columns=["image_id", *columns])]
    found = pd.concat(kept, ignore_index=True).drop_duplicates("image_id").set_index("image_id")
    return found.loc[ids, columns].reset_index(drop=True)


def sample_uris(store: RunStore, ids: np.ndarray) -> list[str]:
    """The ``uri`` of images ``ids`` (sorted), streaming the manifest (for ``eval.layer``, which reruns the model)."""
    return rows_at(store, MANIFEST, ids, ["uri"])["uri"].tolist()


def sample_whitened(store: RunStore, cfg: PipelineConfig, r: int, ids: np.ndarray) -> np.ndarray:
    """The whitened features (float32, len(ids) x d) of images ``ids`` (sorted): rows of ``whitened.zarr`` when the
    cluster stage wrote it, else (the final round has no clusters) the sampled raw features whitened with the
    round's PCA (:func:`ensure_pca`: loaded, or fitted on ``cluster.pca_sample`` rows and saved), as
    ``whitened_features`` whitens them. Only the sampled rows are read."""
    if whitening_done(store, r):
        return read_finite(store, open_whitened(store, r), whitened_rel(r), ids, f"the whitened features of round {r}")
    pca = ensure_pca(store, cfg, r)
    raw = read_finite(store, open_round_features(store, r), features_rel(r), ids, f"the features of round {r}")
    return whiten(pca, raw)

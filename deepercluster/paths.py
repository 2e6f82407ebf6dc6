"""Where every artifact of a run lives, relative to the run's root: the one place that names them (torch-free).

    config.yaml                               the run's config (schema version, every field)
    _lease.json                               who runs it now (host, pid, expiry)
    history.parquet                           one row of metrics per evaluated round
    data/listing/part-XXXXX.parquet           the source listed in parts (+ _complete.json)
    data/parts/part-XXXXX.parquet             each part scanned: sizes, content hashes, rejects
    data/manifest.parquet, rejects.parquet    kept images (numbered, in shards) and refused inputs
    data/packed/shard-XXXXX.tar (+ index)     with data.repack: each shard's images in one tar
    rounds/<r>/model.pt (+ model.json)        the weights round r starts from (round 0: what made it)
    rounds/<r>/features.zarr/features         N x D float16 features, one zarr shard per image shard
                                              (zarr shard s: the object features/c/<s>/0)
    rounds/<r>/clusters/                      pca.npz, whitened.zarr, super/sub parquet + centroids and means,
                                              assignments.parquet, stats.json, sizes.png
    rounds/<r>/train/                         checkpoint.pt, heads/step-*/group-*.pt, final.pt, log.jsonl
    rounds/<r>/eval/                          metrics.json, gallery/cluster-XXXXX.png, metrics.png
    <scope>/_done/<stage>/<unit>.json         completion records (scope: data or rounds/<r>)
    <scope>/_lineage/<stage>.json             what the stage's outputs were made from (fingerprint)
"""

from __future__ import annotations

import re

CONFIG_FILE = "config.yaml"
LEASE_FILE = "_lease.json"
HISTORY = "history.parquet"

LISTING = "data/listing"
LISTING_DONE = f"{LISTING}/_complete.json"
PARTS = "data/parts"
MANIFEST = "data/manifest.parquet"
REJECTS = "data/rejects.parquet"
PACKED = "data/packed"
PACKED_INDEX = f"{PACKED}/index.parquet"  # image_id -> packed uri, written once every shard is packed

FEATURES_ARRAY = "features"
WHITENED = "whitened.zarr"


def round_dir(r: int) -> str:
    return f"rounds/{r}"


def packed_rel(shard: int) -> str:
    return f"{PACKED}/shard-{shard:05d}.tar"


def model_rel(r: int) -> str:
    return f"{round_dir(r)}/model.pt"


def features_group_rel(r: int) -> str:
    return f"{round_dir(r)}/features.zarr"


def features_rel(r: int) -> str:
    """The N x D feature array of round ``r`` (what ``zarr.open_array`` takes)."""
    return f"{features_group_rel(r)}/{FEATURES_ARRAY}"


def zarr_shard_rel(array_rel: str, shard: int) -> str:
    """The object holding zarr shard ``shard`` (rows) of the 2-D array at ``array_rel`` (zarr 3, one shard across
    the columns, the default ``/`` chunk key separator): what a unit that writes that shard records."""
    return f"{array_rel}/c/{shard}/0"


def clusters_rel(r: int, name: str = "") -> str:
    return f"{round_dir(r)}/clusters" + (f"/{name}" if name else "")


def pca_rel(r: int) -> str:
    return clusters_rel(r, "pca.npz")


def whitened_rel(r: int) -> str:
    return clusters_rel(r, WHITENED)


def assignments_rel(r: int) -> str:
    return clusters_rel(r, "assignments.parquet")


def means_rel(r: int, s: int) -> str:
    return clusters_rel(r, f"sub-{s:04d}_means.npy")


def train_rel(r: int) -> str:
    return f"{round_dir(r)}/train"


def checkpoint_rel(r: int) -> str:
    return f"{train_rel(r)}/checkpoint.pt"


def final_rel(r: int) -> str:
    return f"{train_rel(r)}/final.pt"


def log_rel(r: int) -> str:
    return f"{train_rel(r)}/log.jsonl"


def heads_dir_rel(r: int) -> str:
    return f"{train_rel(r)}/heads"


def group_heads_rel(r: int, step: int, group: int) -> str:
    return f"{heads_dir_rel(r)}/step-{step:06d}/group-{group:03d}.pt"


def eval_rel(r: int, name: str = "") -> str:
    return f"{round_dir(r)}/eval" + (f"/{name}" if name else "")


def metrics_rel(r: int) -> str:
    return eval_rel(r, "metrics.json")


def gallery_rel(r: int, target: int) -> str:
    return eval_rel(r, f"gallery/cluster-{target:05d}.png")


# ---- which unit makes a file: (stage, round, unit) ----------------------------------------------------------------
_OWNERS: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(rf"{PARTS}/(?P<n>part-\d+)\.parquet"), "shard", "{n}"),
    (re.compile(r"data/(manifest|rejects)\.parquet"), "shard", "manifest"),
    (re.compile(r"rounds/(?P<r>\d+)/features\.zarr/features/c/(?P<s>\d+)/0"), "extract", "shard-{s:05d}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/whitened\.zarr/c/(?P<s>\d+)/0"), "cluster", "whiten-{s:05d}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/pca\.npz"), "cluster", "pca"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/whitened\.json"), "cluster", "whitened"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/level1/(labels|distance)-(?P<s>\d+)\.npy"), "cluster", "assign-{s:05d}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/(?P<n>level1|super-\d+)_centroids\.npy"), "cluster", "kmeans-{n}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/kmeans/(?P<n>level1|super-\d+)-part-(?P<b>\d+)\.npz"), "cluster",
     "part-{n}-{b:05d}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/level2/(?P<n>super-\d+)/(labels|distance)-(?P<s>\d+)\.npy"), "cluster",
     "assign-{n}-{s:05d}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/kmeans/(?P<n>level1|super-\d+)\.npz"), "cluster", "ckpt-{n}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/sub-(?P<s>\d+)(\.parquet|_centroids\.npy|_means\.npy)"), "cluster",
     "super-{s:04d}"),
    (re.compile(r"rounds/(?P<r>\d+)/clusters/(assignments\.parquet|stats\.json|sizes\.png)"), "cluster", "_stage"),
    (re.compile(r"rounds/(?P<r>\d+)/eval/metrics\.json"), "evaluate", "_stage"),
    (re.compile(r"rounds/(?P<r>\d+)/eval/(?P<n>cluster-metrics|probes)\.json"), "evaluate", "{n}"),
]


def owner_of(rel: str) -> tuple[str, int | None, str] | None:
    """The unit whose completion record lists ``rel`` among its outputs, as (stage, round, unit): the stage
    modules' unit names (``_stage``: the stage's own record); None for a file no unit records."""
    for pattern, stage, unit in _OWNERS:
        m = pattern.fullmatch(rel)
        if m:
            groups = {k: v if k == "n" else int(v) for k, v in m.groupdict().items()}
            r = groups.pop("r", None)
            return stage, r, unit.format(**groups)
    return None

"""The evaluate stage of round ``r``: what the round's features (extracted with ``rounds/<r>/model.pt``) are worth.

- NMI between this round's and the previous round's cluster assignments;
- when the source has labels: NMI/ARI of the pseudo-labels and of a k-means (k = number of classes) of the
  whitened features against them, a linear probe and a cosine kNN on the frozen features (``eval`` config);
- cluster-size statistics and training figures.

-> ``rounds/<r>/eval/metrics.json`` and a row of ``history.parquet``. Round ``rounds`` (the model the last training
produced, ``eval.final_round``) has features but no clusters: its row holds the feature metrics only."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd

from deepercluster.clustering.stage import assignments_rel, clusters_rel, load_assignments, whitened_features
from deepercluster.clustering.vectors import read_finite
from deepercluster.config import PipelineConfig
from deepercluster.data.shard import load_manifest
from deepercluster.device import resolve_device
from deepercluster.errors import StoreError
from deepercluster.evaluation.layers import layer_features
from deepercluster.evaluation.metrics import ari, kmeans_agreement, nmi
from deepercluster.evaluation.probes import knn_accuracy, linear_probe
from deepercluster.evaluation.splits import probe_splits
from deepercluster.features import features_rel, open_features
from deepercluster.paths import HISTORY, metrics_rel
from deepercluster.store import RunStore, round_dir

STAGE = "evaluate"


def _train_summary(store: RunStore, r: int) -> dict[str, float]:
    """Loss and accuracies of the round's last training iteration, and the training throughput."""
    rec = store.done_record("train", r, "_stage")
    if not rec:
        return {}
    out = {"images_per_s": rec.get("images_per_s")}
    log = f"{round_dir(r)}/train/log.jsonl"
    if store.exists(log):
        lines = store.read_text(log).strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            out.update({k: last[k] for k in ("loss", "acc_super", "acc_sub") if k in last})
    return {k: v for k, v in out.items() if v is not None}


def cluster_metrics(store: RunStore, r: int, labels: pd.Series) -> dict:
    """Cluster sizes, NMI vs the previous round, NMI/ARI of the pseudo-labels vs labels (where labelled)."""
    a = load_assignments(store, r)
    target = a["target"].to_numpy()
    stats = store.read_json(clusters_rel(r, "stats.json"))
    out: dict = {k: stats[k] for k in ("targets", "non_empty", "size_min", "size_max", "balance")}
    if r > 0 and store.exists(assignments_rel(r - 1)):
        out["nmi_prev"] = nmi(target, load_assignments(store, r - 1)["target"].to_numpy())
    known = labels.notna().to_numpy()
    if known.any():
        y = labels[known].to_numpy(dtype=np.int64)
        out["nmi_labels"] = nmi(target[known], y)
        out["ari_labels"] = ari(target[known], y)
    return out


def probe_features(store: RunStore, cfg: PipelineConfig, r: int, ids: np.ndarray, uris: list[str]) -> np.ndarray:
    """Features of images ``ids`` that the probes read: rows of ``features.zarr``, or the ``eval.layer`` module."""
    if cfg.eval.layer is None:  # checked: a missing or unreadable feature shard is one line naming its unit
        order = np.argsort(ids, kind="stable")
        x = read_finite(store, open_features(store, r), features_rel(r), np.asarray(ids)[order],
                        f"the features of round {r}")
        out = np.empty_like(x)
        out[order] = x
        return out
    return layer_features(store, cfg, r, cfg.eval.layer, uris)


def probe_metrics(store: RunStore, cfg: PipelineConfig, r: int, manifest: pd.DataFrame,
                  whitened: np.ndarray | None = None) -> dict:
    """Linear-probe and kNN accuracy on the run's fixed train/test splits of its labelled images (and, given the
    round's ``whitened`` features, the kNN accuracy on those)."""
    ev = cfg.eval
    splits = probe_splits(manifest["image_id"].to_numpy(), manifest["label_id"], ev)
    ids = np.concatenate([splits.train, splits.test])
    by_id = manifest.set_index("image_id")
    x = probe_features(store, cfg, r, ids, by_id.loc[ids, "uri"].tolist())
    y = by_id.loc[ids, "label_id"].to_numpy(dtype=np.int64)
    n = len(splits.train)
    out: dict = {"probe_train_n": n, "probe_test_n": len(splits.test), "probe_dim": int(x.shape[1])}
    if ev.linear_probe:
        tick = time.perf_counter()
        device = resolve_device(cfg.runtime.device)
        res = linear_probe(x[:n], y[:n], x[n:], y[n:], ev.probe_weight_decay, ev.probe_max_iter, device)
        out.update(probe_acc=res.test_acc, probe_train_acc=res.train_acc, probe_s=time.perf_counter() - tick)
    if ev.knn:
        out["knn_acc"] = knn_accuracy(x[:n], y[:n], x[n:], y[n:], ev.knn_k)
    if ev.knn and whitened is not None:
        # the same vote on the PCA-whitened features the cluster stage clusters (and the k-means NMI reads): a
        # cosine vote on the raw layer is dominated by its few largest directions (after rotation training, the 5
        # largest hold ~99% of the variance), which a whitened vote, as in retrieval benchmarks, is not
        w = whitened[ids]
        out["knn_whitened_acc"] = knn_accuracy(w[:n], y[:n], w[n:], y[n:], ev.knn_k)
    return out


def evaluate_round(store: RunStore, cfg: PipelineConfig, r: int, mark_done: bool = True) -> dict:
    """Every metric of round ``r``'s features: ``metrics.json``, the round's history row and (``mark_done``) the
    stage record."""
    if not store.exists(f"{features_rel(r)}/zarr.json"):
        raise StoreError(f"evaluate round {r}: {store.url(features_rel(r))} is missing: run the extract stage first")
    manifest = load_manifest(store)
    labels = manifest["label_id"]
    metrics: dict = {"round": r}
    if store.exists(assignments_rel(r)):
        metrics.update(cluster_metrics(store, r, labels))
    known = labels.notna().to_numpy()
    if known.any():
        y = labels[known].to_numpy(dtype=np.int64)
        n_classes = int(len(np.unique(y)))
        whitened = whitened_features(store, cfg, r) if n_classes > 1 and (cfg.eval.kmeans_nmi or cfg.eval.knn) \
            else None
        if cfg.eval.kmeans_nmi and n_classes > 1:
            metrics.update(kmeans_agreement(whitened[known], y, cfg.cluster.niter,
                                            cfg.eval.kmeans_runs, np.random.SeedSequence([cfg.seed, r, 99])))
        if (cfg.eval.linear_probe or cfg.eval.knn) and n_classes > 1:
            metrics.update(probe_metrics(store, cfg, r, manifest, whitened))
    metrics.update({f"train_{k}": v for k, v in _train_summary(store, r).items()})
    store.write_json(metrics_rel(r), metrics)
    append_history(store, metrics)
    if mark_done:
        mark_evaluated(store, r, metrics)
    return metrics


def mark_evaluated(store: RunStore, r: int, metrics: dict) -> None:
    store.mark_stage_done(STAGE, r, {k: metrics.get(k) for k in ("nmi_labels", "probe_acc", "knn_acc")},
                          outputs=[metrics_rel(r)])


def append_history(store: RunStore, row: dict) -> pd.DataFrame:
    """Replace (or add) this round's row of ``history.parquet``; rows stay sorted by round."""
    history = load_history(store)
    history = history[history["round"] != row["round"]] if len(history) else history
    history = pd.concat([history, pd.DataFrame([row])], ignore_index=True).sort_values("round")
    store.write_parquet(HISTORY, history)
    return history


def load_history(store: RunStore) -> pd.DataFrame:
    return store.read_parquet(HISTORY) if store.exists(HISTORY) else pd.DataFrame({"round": []})

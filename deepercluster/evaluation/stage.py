"""The evaluate stage: NMI between this round's and the previous round's assignments, NMI/ARI against labels
when the source has them (of the pseudo-labels, and of a k-means with k = number of classes on the features),
cluster-size statistics, training figures -> ``rounds/<r>/eval/metrics.json`` and a row of ``history.parquet``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from deepercluster.clustering.kmeans import kmeans
from deepercluster.clustering.stage import assignments_rel, clusters_rel, load_assignments, whitened_features
from deepercluster.config import PipelineConfig
from deepercluster.data.shard import load_manifest
from deepercluster.evaluation.metrics import ari, nmi
from deepercluster.store import RunStore, round_dir

STAGE = "evaluate"
HISTORY = "history.parquet"


def metrics_rel(r: int) -> str:
    return f"{round_dir(r)}/eval/metrics.json"


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


def evaluate_round(store: RunStore, cfg: PipelineConfig, r: int, force: bool = False) -> dict:
    if not force and store.stage_done(STAGE, r):
        return store.read_json(metrics_rel(r))
    a = load_assignments(store, r)
    target = a["target"].to_numpy()
    stats = store.read_json(clusters_rel(r, "stats.json"))
    metrics: dict = {"round": r, "targets": stats["targets"], "non_empty": stats["non_empty"],
                     "size_min": stats["size_min"], "size_max": stats["size_max"], "balance": stats["balance"]}
    if r > 0 and store.exists(assignments_rel(r - 1)):
        metrics["nmi_prev"] = nmi(target, load_assignments(store, r - 1)["target"].to_numpy())
    labels = load_manifest(store)["label_id"]
    if labels.notna().all():
        y = labels.to_numpy(dtype=np.int64)
        metrics["nmi_labels"] = nmi(target, y)
        metrics["ari_labels"] = ari(target, y)
        n_classes = int(len(np.unique(y)))
        if cfg.eval.kmeans_nmi and n_classes > 1:
            res = kmeans(whitened_features(store, cfg, r), n_classes, cfg.cluster.niter,
                         np.random.SeedSequence([cfg.seed, r, 99]))
            metrics["kmeans_nmi_labels"] = nmi(res.assign, y)
            metrics["kmeans_ari_labels"] = ari(res.assign, y)
    metrics.update({f"train_{k}": v for k, v in _train_summary(store, r).items()})
    store.write_json(metrics_rel(r), metrics)
    append_history(store, metrics)
    store.mark_stage_done(STAGE, r, {"nmi_labels": metrics.get("nmi_labels")})
    return metrics


def append_history(store: RunStore, row: dict) -> pd.DataFrame:
    """Replace (or add) this round's row of ``history.parquet``; rows stay sorted by round."""
    history = load_history(store)
    history = history[history["round"] != row["round"]] if len(history) else history
    history = pd.concat([history, pd.DataFrame([row])], ignore_index=True).sort_values("round")
    store.write_parquet(HISTORY, history)
    return history


def load_history(store: RunStore) -> pd.DataFrame:
    return store.read_parquet(HISTORY) if store.exists(HISTORY) else pd.DataFrame({"round": []})

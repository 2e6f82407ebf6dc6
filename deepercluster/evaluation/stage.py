"""The evaluate stage of round ``r``: what the round's features (extracted with ``rounds/<r>/model.pt``) are worth.

- NMI between this round's and the previous round's cluster assignments;
- when the source has labels: NMI/ARI of the pseudo-labels and of a k-means (k = number of classes) of the
  whitened features against them, a linear probe and a cosine kNN on the frozen features (``eval`` config);
- cluster-size statistics and training figures.

-> ``rounds/<r>/eval/metrics.json`` and a row of ``history.parquet``. Round ``rounds`` (the model the last training
produced, ``eval.final_round``) has features but no clusters: its row holds the feature metrics only.

Memory does not grow with the run: the cluster metrics stream the assignments and the manifest row group by row
group into contingency tables (:mod:`.contingency`); the k-means agreement and the probes read the vectors of a
seeded labelled sample of at most ``eval.sample`` images only (:mod:`.sample`). The work is three units, each
recorded when done so that a killed stage resumes where it was: ``cluster-metrics`` and ``probes`` write partial
results (``eval/<unit>.json``), ``metrics`` merges them into ``metrics.json`` and the history row."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from deepercluster.clustering.stage import assignments_rel, clusters_rel
from deepercluster.clustering.vectors import read_finite
from deepercluster.config import PipelineConfig
from deepercluster.device import resolve_device
from deepercluster.errors import StoreError
from deepercluster.evaluation.contingency import NA, PairCounts, aligned_parts
from deepercluster.evaluation.layers import layer_features
from deepercluster.evaluation.metrics import kmeans_agreement
from deepercluster.evaluation.probes import knn_accuracy, linear_probe
from deepercluster.evaluation.sample import LabelledSample, labelled_sample, sample_uris, sample_whitened
from deepercluster.evaluation.splits import probe_splits
from deepercluster.features import features_rel, open_features
from deepercluster.paths import HISTORY, MANIFEST, eval_rel, metrics_rel
from deepercluster.store import RunStore, round_dir

STAGE = "evaluate"
CLUSTER_UNIT = "cluster-metrics"  # its partial: eval/cluster-metrics.json
PROBES_UNIT = "probes"  # its partial: eval/probes.json
PART_UNITS = (CLUSTER_UNIT, PROBES_UNIT)  # merged, in this order, into metrics.json
METRICS_UNIT = "metrics"


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


def cluster_metrics(store: RunStore, r: int) -> dict:
    """Cluster sizes, NMI vs the previous round, NMI/ARI of the pseudo-labels vs labels (where labelled), over every
    image: ``assignments.parquet`` (and the previous round's) and the manifest's labels are streamed row group by
    row group into sparse contingency tables, so memory holds a row group, not the run."""
    stats = store.read_json(clusters_rel(r, "stats.json"))
    out: dict = {k: stats[k] for k in ("targets", "non_empty", "size_min", "size_max", "balance")}
    with_prev = r > 0 and store.exists(assignments_rel(r - 1))
    sources = [(assignments_rel(r), "target"), (MANIFEST, "label_id")]
    if with_prev:
        sources.append((assignments_rel(r - 1), "target"))
    vs_labels, vs_prev = PairCounts(), PairCounts()
    for parts in aligned_parts(store, sources):
        target, labels = parts[0], parts[1]
        known = labels != NA
        vs_labels.add(target[known], labels[known])
        if with_prev:
            vs_prev.add(target, parts[2])
    if with_prev:
        out["nmi_prev"] = vs_prev.nmi()
    if vs_labels.total:
        out["nmi_labels"] = vs_labels.nmi()
        out["ari_labels"] = vs_labels.ari()
    return out


def probe_features(store: RunStore, cfg: PipelineConfig, r: int, ids: np.ndarray,
                   uris: Callable[[], list[str]]) -> np.ndarray:
    """Features of images ``ids`` that the probes read: rows of ``features.zarr``, or the ``eval.layer`` module run
    on the images (``uris``: their URIs, looked up only then)."""
    if cfg.eval.layer is None:  # checked: a missing or unreadable feature shard is one line naming its unit
        order = np.argsort(ids, kind="stable")
        x = read_finite(store, open_features(store, r), features_rel(r), np.asarray(ids)[order],
                        f"the features of round {r}")
        out = np.empty_like(x)
        out[order] = x
        return out
    return layer_features(store, cfg, r, cfg.eval.layer, uris())


def probe_metrics(store: RunStore, cfg: PipelineConfig, r: int, sample: LabelledSample,
                  whitened: np.ndarray | None = None) -> dict:
    """Linear-probe and kNN accuracy on the run's fixed train/test splits of its labelled ``sample`` (and, given
    the sample's ``whitened`` features, the kNN accuracy on those)."""
    ev = cfg.eval
    splits = probe_splits(sample.ids, sample.labels, ev)
    ids = np.concatenate([splits.train, splits.test])
    at = sample.positions(ids)
    x = probe_features(store, cfg, r, ids, lambda: sample_uris(store, ids))
    y = sample.labels[at]
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
        w = whitened[at]
        out["knn_whitened_acc"] = knn_accuracy(w[:n], y[:n], w[n:], y[n:], ev.knn_k)
    return out


def sample_metrics(store: RunStore, cfg: PipelineConfig, r: int) -> tuple[dict, dict]:
    """The k-means agreement and the probes on the labelled sample (``eval.sample``), and what the sample was
    (for the unit's record). Only the sample's rows of the round's vectors are read."""
    ev = cfg.eval
    sample = labelled_sample(store, ev.sample, ev.split_seed)
    about = {"labelled": sample.labelled, "sample": len(sample.ids)}
    n_classes = int(len(np.unique(sample.labels)))
    if n_classes < 2 or not (ev.kmeans_nmi or ev.linear_probe or ev.knn):
        return {}, about
    whitened = sample_whitened(store, cfg, r, sample.ids) if ev.kmeans_nmi or ev.knn else None
    out: dict = {}
    if ev.kmeans_nmi:
        out.update(kmeans_agreement(whitened, sample.labels, cfg.cluster.niter, ev.kmeans_runs,
                                    np.random.SeedSequence([cfg.seed, r, 99])))
    if ev.linear_probe or ev.knn:
        out.update(probe_metrics(store, cfg, r, sample, whitened))
    return out, about


def part_rel(r: int, unit: str) -> str:
    """The partial metrics a unit of the stage writes (``eval/<unit>.json``)."""
    return eval_rel(r, f"{unit}.json")


def check_features(store: RunStore, r: int) -> None:
    if not store.exists(f"{features_rel(r)}/zarr.json"):
        raise StoreError(f"evaluate round {r}: {store.url(features_rel(r))} is missing: run the extract stage first")


def run_cluster_unit(store: RunStore, r: int) -> dict:
    """Unit ``cluster-metrics``: the cluster metrics (none in a round without clusters) -> its partial json."""
    metrics = cluster_metrics(store, r) if store.exists(assignments_rel(r)) else {}
    store.write_json(part_rel(r, CLUSTER_UNIT), metrics)
    store.mark_done(STAGE, r, CLUSTER_UNIT, outputs=[part_rel(r, CLUSTER_UNIT)])
    return metrics


def run_probes_unit(store: RunStore, cfg: PipelineConfig, r: int) -> dict:
    """Unit ``probes``: k-means agreement, linear probe and kNN on the labelled sample -> its partial json."""
    check_features(store, r)
    metrics, about = sample_metrics(store, cfg, r)
    store.write_json(part_rel(r, PROBES_UNIT), metrics)
    store.mark_done(STAGE, r, PROBES_UNIT, about, outputs=[part_rel(r, PROBES_UNIT)])
    return metrics


def part_ids(store: RunStore, r: int) -> dict[str, str | None]:
    """The record ids of the partial units (what the assembled ``metrics.json`` was made from)."""
    return {u: (rec or {}).get("id") for u in PART_UNITS for rec in [store.done_record(STAGE, r, u)]}


def run_metrics_unit(store: RunStore, r: int) -> dict:
    """Unit ``metrics``: the partials and the training figures merged -> ``metrics.json`` and the history row."""
    metrics: dict = {"round": r}
    for unit in PART_UNITS:
        metrics.update(store.read_json(part_rel(r, unit)))
    metrics.update({f"train_{k}": v for k, v in _train_summary(store, r).items()})
    store.write_json(metrics_rel(r), metrics)
    append_history(store, metrics)
    store.mark_done(STAGE, r, METRICS_UNIT, {"merged": part_ids(store, r)})
    return metrics


def evaluate_round(store: RunStore, cfg: PipelineConfig, r: int, mark_done: bool = True) -> dict:
    """Every metric of round ``r``'s features, every unit recomputed in this process: ``metrics.json``, the
    round's history row and (``mark_done``) the stage record."""
    check_features(store, r)
    run_cluster_unit(store, r)
    run_probes_unit(store, cfg, r)
    metrics = run_metrics_unit(store, r)
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

"""Does it learn? One labelled image set, every method side by side, same network, image size and training budget.

    python bench/quality.py --data /usr/share/datasets/fashion-mnist          # IDX folder (MNIST, Fashion-MNIST)
    python bench/quality.py --data ../shared/data/cifar10-test --image-size 32 # or a folder of class sub-folders

Methods, all in this one process tree (one Prefect server, one Dask cluster, the pipeline's own flows):
  pixels         k-means / probes on the raw pixels (resized to the input size, in [0, 1])
  random         the randomly initialised network (round 0 of the runs: every run starts from the same seed)
  rotnet         `rounds` x `epochs` of rotation prediction
  deepcluster    `rounds` rounds of k-means (k clusters) + `epochs` epochs each
  deepercluster  the same, 2-level clusters x 4 rotations
  clusterfit     k-means (k clusters) of the final RotNet model's features, a new network trained from scratch on
                 them for `rounds` x `epochs` epochs (the same training budget)

Every metric is measured on the final features of each method (the model after its last training: ``eval.final_round``)
with the same splits: k-means NMI (k = number of classes) against the labels, linear-probe and kNN (cosine, k=20)
accuracy on held-out labelled images. Prints one table, writes ``quality.csv`` and ``quality.png`` (NMI and linear
probe over rounds). Runs resume: rerunning with the same arguments skips what is done. ``--budget-minutes`` stops
starting new methods once spent (the table says what was skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

HEADLINE = ("kmeans_nmi_labels", "kmeans_nmi_labels_std", "probe_acc", "knn_acc", "knn_whitened_acc")
METHODS = ("pixels", "random", "rotnet", "deepcluster", "deepercluster", "clusterfit")


def cpu_seconds() -> float:
    """CPU time of this process, its waited-for children and every live descendant (Dask workers, torchrun) with
    their own waited-for children (a torchrun that a Dask worker ran and reaped)."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="IDX folder or folder of class sub-folders of images")
    p.add_argument("--out", default=None, help="where the runs and the results go (default runs/bench-quality/...)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (IDX order; for a folder: "
                   "round-robin over the classes)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--sobel", action="store_true", help="fixed Sobel front-end (the papers'; no colour here anyway)")
    p.add_argument("--rounds", type=int, default=4, help="clustering rounds of deepcluster/deepercluster/rotnet")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per round")
    p.add_argument("--k", type=int, default=100, help="clusters of deepcluster and clusterfit (over-clustering)")
    p.add_argument("--super-clusters", type=int, default=2, help="deepercluster: level-1 clusters (x 4 rotations)")
    p.add_argument("--pca-dim", type=int, default=32)
    p.add_argument("--epoch-images", type=int, default=None, help="images drawn per training epoch (uniformly over "
                   "the clusters; default: all of them)")
    p.add_argument("--batch-size", type=int, default=128, help="images per rank per iteration")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--nproc", type=int, default=1, help="torchrun ranks")
    p.add_argument("--crop-ratio", type=float, default=1.0, help="clustering view's centre crop (the papers' 0.875 "
                   "is for photos with background; these small centred images fill their frame)")
    p.add_argument("--crop-scale", type=float, default=0.5, help="RandomResizedCrop lower scale")
    p.add_argument("--probe-train", type=float, default=0.5, help="fraction (<1) or count of labelled images")
    p.add_argument("--probe-test", type=float, default=0.5, help="fraction (<1) or count of labelled images")
    p.add_argument("--dask-workers", type=int, default=2)
    p.add_argument("--budget-minutes", type=float, default=60.0, help="start no new method once this much wall "
                   "time has passed")
    p.add_argument("--seed", type=int, default=0, help="first training seed")
    p.add_argument("--seeds", type=int, default=1, help="training seeds: every trained method (and the random "
                   "network, whose init is seeded too) runs with seed, seed+1, ...; the summary shows mean +- std")
    return p.parse_args(argv)


def split_size(v: float) -> float | int:
    return int(v) if v >= 1 else float(v)


def base_config(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    return {
        "rounds": args.rounds,
        "seed": args.seed,
        "data": {"source": str(folder), "shard_size": 1024, "image_size": args.image_size,
                 "crop_ratio": args.crop_ratio},
        "model": {"arch": "smallnet", "feature_dim": args.feature_dim, "sobel": args.sobel},
        "extract": {"batch_size": 512},
        "cluster": {"pca_dim": args.pca_dim, "niter": 20},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "nproc": args.nproc,
                  "checkpoint_every": 200, "crop_scale": [args.crop_scale, 1.0],
                  "epoch_images": args.epoch_images},
        "eval": {"probe_train": split_size(args.probe_train), "probe_test": split_size(args.probe_test),
                 "final_round": True},
        "runtime": {"dask_workers": args.dask_workers},
    }


def method_config(base: dict[str, Any], method: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = json.loads(json.dumps(base))
    cfg["method"] = method
    if method == "rotnet":
        cfg["cluster"].update(super_clusters=1, k=1)
    elif method == "deepcluster":
        cfg["cluster"].update(super_clusters=1, k=args.k)
    elif method == "deepercluster":
        cfg["cluster"].update(super_clusters=args.super_clusters, k=max(1, args.k // args.super_clusters))
    return cfg


def pixel_baseline(store, cfg) -> dict[str, Any]:
    """k-means NMI (k = classes, 50 iterations, mean of eval.kmeans_runs seeds, raw pixels) and the probes on the raw
    pixels, same splits."""
    from deepercluster.clustering.pca import fit_pca
    from deepercluster.clustering.whitening import whiten
    from deepercluster.data.shard import load_manifest
    from deepercluster.evaluation.metrics import kmeans_agreement
    from deepercluster.evaluation.pixels import pixel_features
    from deepercluster.evaluation.probes import knn_accuracy, linear_probe
    from deepercluster.evaluation.splits import probe_splits

    manifest = load_manifest(store)
    known = manifest["label_id"].notna().to_numpy()
    x = pixel_features(manifest["uri"].tolist(), cfg.data.image_size)
    y = manifest["label_id"].to_numpy(dtype=np.float64)
    yk = y[known].astype(np.int64)
    out: dict[str, Any] = {**kmeans_agreement(x[known], yk, 50, cfg.eval.kmeans_runs,
                                              np.random.SeedSequence([cfg.seed, 99])), "dim": x.shape[1]}
    s = probe_splits(manifest["image_id"].to_numpy(), manifest["label_id"], cfg.eval)
    ytr, yte = y[s.train].astype(np.int64), y[s.test].astype(np.int64)
    out["probe_acc"] = linear_probe(x[s.train], ytr, x[s.test], yte, cfg.eval.probe_weight_decay,
                                    cfg.eval.probe_max_iter).test_acc
    out["knn_acc"] = knn_accuracy(x[s.train], ytr, x[s.test], yte, cfg.eval.knn_k)
    w = whiten(fit_pca(x, cfg.cluster.pca_dim), x)  # as the cluster stage whitens
    out["knn_whitened_acc"] = knn_accuracy(w[s.train], ytr, w[s.test], yte, cfg.eval.knn_k)
    return out


MEASURES = {"kmeans_nmi_labels": "k-means NMI", "probe_acc": "linear probe", "knn_acc": "kNN",
            "knn_whitened_acc": "kNN (whitened)"}


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method: the number of seeds done and, per measure, the mean and std (ddof 0) over seeds."""
    done = table[table["status"].astype(str).str.startswith("done")]
    out = []
    for method in [m for m in METHODS if m in set(done["method"])]:
        part = done[done["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": len(part)}
        for key in MEASURES:
            if key in part:
                values = part[key].astype(float)
                row[key], row[f"{key}_sd"] = float(values.mean()), float(values.std(ddof=0))
        out.append(row)
    return pd.DataFrame(out)


def format_summary(summary: pd.DataFrame) -> str:
    """The table as markdown, each cell ``mean +- std`` over the seeds."""
    head = "| method | seeds | " + " | ".join(MEASURES.values()) + " |"
    lines = [head, "|" + "---|" * (2 + len(MEASURES))]
    for _, row in summary.iterrows():
        cells = [f"{row[k]:.3f} +- {row[f'{k}_sd']:.3f}" if k in row and pd.notna(row[k]) else "-"
                 for k in MEASURES]
        lines.append(f"| {row['method']} | {int(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(histories: dict[str, pd.DataFrame], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "kmeans_nmi_labels", "k-means NMI vs labels"),
                           (axes[1], "probe_acc", "linear probe accuracy")):
        for name, h in histories.items():
            if key in h:
                ax.plot(h["round"], h[key], marker="o", label=name)
        for row in rows:
            if row["method"] == "pixels" and row.get(key) is not None:
                ax.axhline(row[key], color="grey", linestyle="--", label="raw pixels")
        ax.set_xlabel("round (features of the model that starts it; last = after the last training)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        print(f"error: unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    from deepercluster.clusterfit import share_manifest
    from deepercluster.config import RuntimeConfig, build_config
    from deepercluster.data.digits import cache_dir
    from deepercluster.data.idx import benchmark_folder
    from deepercluster.errors import DeeperClusterError
    from deepercluster.evaluation.stage import load_history
    from deepercluster.run import init_run, open_run
    from deepercluster.store import RunStore

    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    try:
        folder = benchmark_folder(args.data, cache_dir(), args.limit)
    except DeeperClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base = base_config(args, folder)
    tag = hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:8]
    out = Path(args.out or f"runs/bench-quality/{Path(args.data).name}-{tag}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"data {folder} -> {out}  (prepared in {time.perf_counter() - start_wall:.0f} s)", flush=True)

    from flows.clusterfit import clusterfit_flow
    from flows.dask_runtime import dask_scheduler
    from flows.pipeline import pipeline_flow
    from flows.stages import stage_flow

    rows: list[dict[str, Any]] = []
    histories: dict[str, pd.DataFrame] = {}
    budget_s = args.budget_minutes * 60
    trained = [m for m in ("rotnet", "deepcluster", "deepercluster") if m in methods]
    if "clusterfit" in methods and "rotnet" not in trained:
        trained.insert(0, "rotnet")  # the source of ClusterFit
    seeds = [args.seed + i for i in range(args.seeds)]
    shard_run = out / "shard"

    def timed(name: str, seed: int | None, fn) -> dict[str, Any] | None:
        elapsed = time.perf_counter() - start_wall
        if elapsed > budget_s:
            print(f"[{name}] skipped: the budget of {args.budget_minutes:.0f} min is spent ({elapsed / 60:.1f} min)")
            rows.append({"method": name, "seed": seed, "status": "skipped (budget)"})
            return None
        w0, c0 = time.perf_counter(), cpu_seconds()
        result = fn()
        row = {"method": name, "seed": seed, "status": "done", **result, "wall_s": time.perf_counter() - w0,
               "cpu_s": cpu_seconds() - c0}
        rows.append(row)
        print(f"[{name}] {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
              flush=True)
        return row

    with dask_scheduler(RuntimeConfig(dask_workers=args.dask_workers)) as address:
        # the shard stage once; every other run gets the same manifest
        init_run(RunStore(shard_run), build_config(method_config(base, "rotnet", args)))
        timed("shard", None, lambda: {k: v for k, v in stage_flow(str(shard_run), "shard", dask_address=address).items()
                                      if k in ("images", "rejects", "classes")})
        store0, cfg0 = open_run(str(shard_run))

        if "pixels" in methods:
            timed("pixels", None, lambda: pixel_baseline(store0, cfg0))

        def pipeline(method: str, seed: int) -> dict[str, Any]:
            run = out / f"seed-{seed}" / method
            init_run(RunStore(run), build_config(method_config({**base, "seed": seed}, method, args)))
            share_manifest(RunStore(run), store0)
            pipeline_flow(str(run), dask_address=address)
            h = load_history(RunStore(run))
            histories[f"{method} s{seed}"] = h
            final = h[h["round"] == args.rounds].iloc[0].to_dict()
            out_row = {k: final.get(k) for k in HEADLINE} | {"rounds": args.rounds}
            r0 = h.iloc[0].to_dict()
            if method == trained[0] and "random" in methods:
                rows.append({"method": "random", "seed": seed, "status": "done (round 0)",
                             **{k: r0.get(k) for k in HEADLINE}})
            return out_row

        for seed in seeds:
            for method in trained:
                timed(method, seed, lambda m=method, s=seed: pipeline(m, s))

            source = out / f"seed-{seed}" / "rotnet" / "rounds" / str(args.rounds) / "model.pt"
            if "clusterfit" not in methods:
                continue

            def clusterfit(seed: int = seed, source: Path = source) -> dict[str, Any]:
                cfg = method_config({**base, "seed": seed}, "clusterfit", args)
                cfg.update(rounds=1)
                cfg["cluster"].update(super_clusters=1, k=args.k)
                cfg["train"]["epochs"] = args.rounds * args.epochs  # the same training budget
                cfg["clusterfit"] = {"checkpoint": str(source), "model": base["model"]}
                run = out / f"seed-{seed}" / "clusterfit"
                init_run(RunStore(run), build_config(cfg))
                summary = clusterfit_flow(str(run), dask_address=address)
                histories[f"clusterfit s{seed}"] = load_history(RunStore(run)).assign(round=args.rounds)
                return {**summary["target"], "source_probe_acc": summary["source"]["probe_acc"],
                        "source_kmeans_nmi": summary["source"]["kmeans_nmi_labels"]}

            if source.is_file():
                timed("clusterfit", seed, clusterfit)
            else:
                rows.append({"method": "clusterfit", "seed": seed, "status": "skipped (no RotNet model)"})

    table = pd.DataFrame(rows)
    keep = [c for c in ("method", "seed", "status", *HEADLINE, "source_probe_acc",
                        "source_kmeans_nmi", "images", "wall_s", "cpu_s") if c in table]
    table = table[keep].astype({"seed": "Int64"})
    table.to_csv(out / "quality.csv", index=False)
    summary = summarise(table)
    summary.to_csv(out / "quality-summary.csv", index=False)
    if histories:
        plot(histories, rows, out / "quality.png")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))
        print()
        print(format_summary(summary))
    wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    print(f"total: {wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min on {psutil.cpu_count()} cores; "
          f"config: {json.dumps({k: base[k] for k in ('data', 'model', 'train', 'eval')})}; "
          f"k={args.k}, rounds={args.rounds}, seeds={seeds}; results in {out}/quality.csv, quality-summary.csv "
          "and quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

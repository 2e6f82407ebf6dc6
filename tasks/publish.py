"""What a finished stage shows in the Prefect UI (:func:`publish`): the cluster stage's size histogram, the evaluate
stage's per-round metrics table, and a round's inspection (the cluster-size table of the largest and smallest
clusters, galleries and the metrics plot as PNG data URIs: the Prefect UI renders them without access to the run
store)."""

from __future__ import annotations

import base64
import hashlib
import re

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from deepercluster.clustering.stage import clusters_rel
from deepercluster.errors import DeeperClusterError
from deepercluster.evaluation.stage import load_history
from deepercluster.inspection import RoundInspection, inspect_round
from deepercluster.run import open_run
from deepercluster.store import RunStore

MAX_INLINE_BYTES = 2_000_000  # galleries beyond this are listed by their store URL instead of shown


def artifact_key(store: RunStore, *parts: object) -> str:
    """A Prefect artifact key of this run (``<run name>-<hash of its URI>-<parts>``): two runs, or two rounds,
    never replace each other's artifacts."""
    name = re.sub(r"[^a-z0-9]+", "-", store.uri.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:24] or "run"
    digest = hashlib.sha256(store.uri.encode()).hexdigest()[:6]
    tail = "-".join(re.sub(r"[^a-z0-9]+", "-", str(p).lower()) for p in parts)
    return f"{name}-{digest}-{tail}"


def _image(store: RunStore, rel: str, title: str, budget: list[int]) -> str:
    data = store.read_bytes(rel)
    if len(data) > budget[0]:
        return f"- {title}: `{store.url(rel)}`"
    budget[0] -= len(data)
    return f"**{title}** (`{store.url(rel)}`)\n\n![{title}](data:image/png;base64,{base64.b64encode(data).decode()})"


def _size_rows(result: RoundInspection) -> list[dict]:
    rows = []
    for kind, frame in (("largest", result.top), ("smallest", result.bottom)):
        for rec in frame.to_dict("records"):
            rows.append({"kind": kind, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}})
    return rows


@task(name="inspect-round")
def publish_inspection(run: str, r: int) -> dict:
    """Write round ``r``'s galleries and the metrics plot into the store and show them as Prefect artifacts.
    A failure here (an image that became unreadable...) is logged, never fails the round."""
    store, cfg = open_run(run)
    if not store.stage_done("cluster", r):
        return {}
    try:
        result = inspect_round(store, r, n_targets=cfg.cluster.n_targets)
    except (DeeperClusterError, OSError) as err:
        get_run_logger().warning("inspection of round %d skipped: %s", r, err)
        return {}
    create_table_artifact(key=artifact_key(store, f"r{r}", "cluster-sizes"), table=_size_rows(result),
                          description=f"Round {r} of {store.uri}: largest and smallest of {len(result.sizes)} "
                                      f"clusters ({result.empty} empty)")
    budget = [MAX_INLINE_BYTES]
    parts = [f"# Round {r} of `{store.uri}`"]
    if result.metrics_plot:
        parts.append(_image(store, result.metrics_plot, "metrics over rounds", budget))
    parts += [_image(store, rel, f"cluster {t} ({int(result.sizes.set_index('target').at[t, 'size'])} images)",
                     budget) for t, rel in result.galleries.items()]
    create_markdown_artifact(key=artifact_key(store, f"r{r}", "galleries"), markdown="\n\n".join(parts),
                             description=f"Galleries of sampled clusters of round {r} (closest images first)")
    return {"galleries": len(result.galleries), "empty": result.empty}


HEADLINE = ("round", "kmeans_nmi_labels", "probe_acc", "knn_acc", "nmi_labels", "nmi_prev")


@task(name="publish-cluster-sizes")
def publish_cluster_sizes(run: str, r: int) -> None:
    """The cluster-size histogram as a Prefect artifact (the PNG inline as a data URI: the UI renders it without
    access to the run store)."""
    store, _ = open_run(run)
    stats = store.read_json(clusters_rel(r, "stats.json"))
    rel = clusters_rel(r, stats["histogram"])
    png = base64.b64encode(store.read_bytes(rel)).decode()
    l1, l2 = stats["level1"], stats["level2"]
    markdown = "\n".join([
        f"# Cluster sizes, round {r}",
        f"![cluster-size histogram](data:image/png;base64,{png})",
        "",
        "| targets | non-empty | min | median | max | balance | empty repairs (l1 / l2) | streamed units |",
        "|---|---|---|---|---|---|---|---|",
        f"| {stats['targets']} | {stats['non_empty']} | {stats['size_min']} | {stats['size_median']:g} | "
        f"{stats['size_max']} | {stats['balance']:.3f} | {l1['repairs']} / {l2['repairs']} | "
        f"{int(l1['streamed']) + len(l2['streamed'])} |",
        "",
        f"Store: `{store.url(rel)}`",
    ])
    create_markdown_artifact(key=artifact_key(store, f"r{r}", "cluster-histogram"), markdown=markdown,
                             description=f"Cluster-size histogram of round {r} of {store.uri}")


@task(name="publish-history")
def publish_history(run: str) -> None:
    """The per-round metrics table, headline columns first."""
    store, _ = open_run(run)
    history = load_history(store)
    columns = [c for c in HEADLINE if c in history.columns] + [c for c in history.columns if c not in HEADLINE]
    history = history[columns]
    create_table_artifact(
        key=artifact_key(store, "history"),
        table=history.round(4).astype(object).where(history.notna(), None).to_dict("records"),
        description=f"Per-round metrics of {store.uri}: k-means NMI (k = classes), linear-probe and kNN accuracy "
        "of the frozen features on held-out labelled images, NMI of the pseudo-labels vs labels and vs the previous "
        "round, cluster sizes, training figures",
    )


def publish(run: str, stage: str, r: int | None) -> None:
    """Whatever a finished stage shows in the Prefect UI (nothing for most stages)."""
    if stage == "cluster" and r is not None:
        publish_cluster_sizes(run, r)
    elif stage == "evaluate" and r is not None:
        publish_history(run)
        publish_inspection(run, r)


def publish_summary(run: str, current: str) -> None:
    """The run's live summary on its top-level flow run: where it stands, the per-round metrics (headline columns
    first) and where each round's features, assignments and model are."""
    from deepercluster.paths import assignments_rel, features_rel, model_rel

    store, cfg = open_run(run)
    history = load_history(store)
    lines = [f"# {store.uri}", "", f"**{cfg.method}, {cfg.rounds} rounds** - now: {current}", ""]
    columns = [c for c in HEADLINE if c in history.columns]
    if len(history) and columns:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for _, row in history.iterrows():
            lines.append("| " + " | ".join("-" if row[c] != row[c] else f"{row[c]:.4g}" for c in columns) + " |")
        lines.append("")
    lines += ["| round | features | assignments | model |", "|---|---|---|---|"]
    for r in range(cfg.rounds + 1):
        cells = [f"`{store.url(rel)}`" if store.exists(rel) else "-" for rel in (
            f"{features_rel(r)}/zarr.json", assignments_rel(r), model_rel(r))]
        cells[0] = cells[0].replace("/zarr.json", "")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    create_markdown_artifact(key=artifact_key(store, "summary"), markdown="\n".join(lines),
                             description=f"Where {store.uri} stands: current stage, metrics, artifact locations")

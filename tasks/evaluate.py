from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from deepercluster.evaluation.stage import evaluate_round, load_history
from deepercluster.run import open_run

HEADLINE = ("round", "kmeans_nmi_labels", "probe_acc", "knn_acc", "nmi_labels", "nmi_prev")


@task(name="evaluate-round")
def evaluate(run: str, r: int, force: bool = False) -> dict:
    store, cfg = open_run(run)
    metrics = evaluate_round(store, cfg, r, force=force)
    history = load_history(store)
    columns = [c for c in HEADLINE if c in history.columns] + [c for c in history.columns if c not in HEADLINE]
    history = history[columns]
    create_table_artifact(
        key="deepercluster-history",
        table=history.round(4).astype(object).where(history.notna(), None).to_dict("records"),
        description=f"Per-round metrics of {store.uri}: k-means NMI (k = classes), linear-probe and kNN accuracy "
        "of the frozen features on held-out labelled images, NMI of the pseudo-labels vs labels and vs the previous "
        "round, cluster sizes, training figures",
    )
    return metrics

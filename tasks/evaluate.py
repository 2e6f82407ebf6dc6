from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from deepercluster.evaluation.stage import evaluate_round, load_history
from deepercluster.run import open_run


@task(name="evaluate-round")
def evaluate(run: str, r: int, force: bool = False) -> dict:
    store, cfg = open_run(run)
    metrics = evaluate_round(store, cfg, r, force=force)
    history = load_history(store)
    create_table_artifact(
        key="deepercluster-history",
        table=history.round(4).astype(object).where(history.notna(), None).to_dict("records"),
        description=f"Per-round metrics of {store.uri} (NMI vs labels and vs the previous round, cluster sizes)",
    )
    return metrics

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from deepercluster import clusterfit
from deepercluster.run import open_run
from tasks.publish import artifact_key


@task(name="clusterfit-prepare-source")
def prepare_source(run: str) -> str:
    """The source sub-run (its round-0 model = the source weights); returns its URI."""
    store, cfg = open_run(run)
    return clusterfit.prepare_source(store, cfg)


@task(name="clusterfit-import-labels")
def import_labels(run: str) -> dict:
    store, cfg = open_run(run)
    return clusterfit.import_labels(store, cfg)


@task(name="clusterfit-summary")
def summarise(run: str, source_metrics: dict, target_metrics: dict) -> dict:
    store, _ = open_run(run)
    summary = clusterfit.summarise(store, source_metrics, target_metrics)
    rows = [{"network": name, **{k: None if v is None else round(v, 4) for k, v in summary[name].items()}}
            for name in ("source", "target")]
    create_table_artifact(key=artifact_key(store, "clusterfit"), table=rows,
                          description=f"ClusterFit {store.uri}: the source network and the new network trained on "
                          "the k-means labels of its features, under the same probes")
    return summary

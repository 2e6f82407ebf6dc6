from __future__ import annotations

import base64

from prefect import task
from prefect.artifacts import create_markdown_artifact

from deepercluster.clustering import stage
from deepercluster.run import open_run


@task(name="prepare-cluster")
def prepare_cluster(run: str, r: int, force: bool = False) -> list[int]:
    store, cfg = open_run(run)
    return stage.prepare_cluster(store, cfg, r, force=force)


@task(name="cluster-super", retries=1)
def cluster_super(run: str, r: int, s: int) -> dict:
    store, cfg = open_run(run)
    return stage.cluster_super(store, cfg, r, s)


@task(name="finalize-cluster")
def finalize_cluster(run: str, r: int) -> dict:
    """Merge the units, then show the cluster-size histogram as a Prefect artifact (the PNG inline as a data URI:
    the UI renders it without access to the run store)."""
    store, cfg = open_run(run)
    stats = stage.finalize_cluster(store, cfg, r)
    rel = stage.clusters_rel(r, stats["histogram"])
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
    create_markdown_artifact(key="deepercluster-cluster-histogram", markdown=markdown,
                             description=f"Cluster-size histogram of round {r} of {store.uri}")
    return stats

"""Inspection artifacts of a round: the cluster-size table (largest and smallest clusters) and a markdown artifact
showing the galleries and the metrics plot (PNG as data URIs: the Prefect UI renders them without access to the
run store)."""

from __future__ import annotations

import base64

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from deepercluster.errors import DeeperClusterError
from deepercluster.inspection import RoundInspection, inspect_round
from deepercluster.run import open_run
from deepercluster.store import RunStore

MAX_INLINE_BYTES = 2_000_000  # galleries beyond this are listed by their store URL instead of shown


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
    create_table_artifact(key="deepercluster-cluster-sizes", table=_size_rows(result),
                          description=f"Round {r} of {store.uri}: largest and smallest of {len(result.sizes)} "
                                      f"clusters ({result.empty} empty)")
    budget = [MAX_INLINE_BYTES]
    parts = [f"# Round {r} of `{store.uri}`"]
    if result.metrics_plot:
        parts.append(_image(store, result.metrics_plot, "metrics over rounds", budget))
    parts += [_image(store, rel, f"cluster {t} ({int(result.sizes.set_index('target').at[t, 'size'])} images)",
                     budget) for t, rel in result.galleries.items()]
    create_markdown_artifact(key="deepercluster-galleries", markdown="\n\n".join(parts),
                             description=f"Galleries of sampled clusters of round {r} (closest images first)")
    return {"galleries": len(result.galleries), "empty": result.empty}

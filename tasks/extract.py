from __future__ import annotations

from prefect import task

from deepercluster import features
from deepercluster.errors import DeeperClusterError
from deepercluster.run import open_run


@task(name="prepare-extract")
def prepare_extract(run: str, r: int, force: bool = False) -> list[int]:
    store, cfg = open_run(run)
    return features.prepare_extract(store, cfg, r, force=force)


def _transient(task, task_run, state) -> bool:
    """Retry what may pass on a second try (storage, memory), not a user's error (an unreadable image)."""
    return not isinstance(state.data, DeeperClusterError)


@task(name="extract-shard", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient)
def extract_shard(run: str, r: int, shard: int) -> int:
    store, cfg = open_run(run)
    return features.extract_shard(store, cfg, r, shard)


@task(name="extract-shards", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient)
def extract_shards(run: str, r: int, shards: list[int]) -> int:
    """A group of consecutive shards in one stream (each still written and recorded on its own)."""
    store, cfg = open_run(run)
    return features.extract_shards(store, cfg, r, shards)


@task(name="finalize-extract")
def finalize_extract(run: str, r: int) -> dict[str, int]:
    store, _ = open_run(run)
    return features.finalize_extract(store, r)

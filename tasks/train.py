from __future__ import annotations

from prefect import task

from deepercluster.run import open_run


@task(name="train-round", retries=1, retry_delay_seconds=5)
def train_round(run: str, r: int, force: bool = False) -> dict:
    """Launches torchrun; a retry resumes from the last checkpoint in the store."""
    from deepercluster.training.launch import run_train_stage

    store, cfg = open_run(run)
    return run_train_stage(store, cfg, r, force=force)

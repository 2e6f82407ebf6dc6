from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from deepercluster.data import shard
from deepercluster.run import open_run


@task(name="list-source")
def list_source(run: str, force: bool = False) -> list[str]:
    store, cfg = open_run(run)
    if force:
        shard.reset_shard_stage(store)
    return shard.list_source(store, cfg.data)


@task(name="scan-part", retries=2, retry_delay_seconds=2)
def scan_part(run: str, part: str) -> dict[str, int]:
    store, cfg = open_run(run)
    return shard.scan_part(store, cfg.data, part)


@task(name="finalize-manifest")
def finalize_manifest(run: str) -> dict[str, int]:
    store, cfg = open_run(run)
    return shard.finalize_manifest(store, cfg.data)


@task(name="repack-shard", retries=2, retry_delay_seconds=2)
def repack_shard(run: str, shard_id: int) -> int:
    store, cfg = open_run(run)
    return shard.repack_shard(store, cfg.data, shard_id)


@task(name="finalize-shard-stage")
def finalize_shard_stage(run: str) -> dict:
    store, cfg = open_run(run)
    return shard.finalize_shard_stage(store, cfg.data)


class ScanProgress:
    """A progress bar (Prefect progress artifact ``shard-scan``) and a log line every 10% of the listing parts."""

    def __init__(self, total: int, done: int = 0, min_interval_s: float = 2.0):
        self.total, self.done, self.min_interval_s = max(total, 1), done, min_interval_s
        self.kept = self.rejected = 0
        self._last = time.monotonic()
        self._logged = self.done * 10 // self.total
        self._artifact = create_progress_artifact(self._percent(), key="shard-scan",
                                                  description="shard stage: listing parts scanned")

    def _percent(self) -> float:
        return round(100.0 * self.done / self.total, 1)

    def step(self, counts: dict[str, int]) -> None:
        self.done += 1
        self.kept += counts.get("kept", 0)
        self.rejected += counts.get("rejected", 0)
        now = time.monotonic()
        if self.done == self.total or now - self._last >= self.min_interval_s:
            update_progress_artifact(self._artifact, self._percent())
            self._last = now
        if self.done * 10 // self.total > self._logged:
            self._logged = self.done * 10 // self.total
            get_run_logger().info("shard: %d/%d parts scanned (%.0f%%), %d kept, %d rejected so far", self.done,
                                  self.total, self._percent(), self.kept, self.rejected)

"""Opening a run: bind a config to a run store, or read back the config a run was made with."""

from __future__ import annotations

from deepercluster.config import PipelineConfig, config_from_yaml_text
from deepercluster.errors import ConfigError, StoreError
from deepercluster.store import STAGES, RunStore

CONFIG_FILE = "config.yaml"


def default_run_dir(cfg: PipelineConfig) -> str:
    """Where ``deepercluster run`` puts a run when no ``--run`` is given: one folder per method and config hash."""
    return f"runs/{cfg.method}-{cfg.hash[:8]}"


def init_run(store: RunStore, cfg: PipelineConfig) -> None:
    """Save ``cfg`` into a new run, or check that an existing run was made with the same config (resume)."""
    if store.exists(CONFIG_FILE):
        existing = load_run_config(store)
        if existing.hash != cfg.hash:
            raise ConfigError(
                f"run {store.uri} was made with another config (hash {existing.hash}, now {cfg.hash}): "
                "use a new --run directory to start a different run"
            )
        if existing.runtime == cfg.runtime:
            return
    store.write_text(CONFIG_FILE, cfg.to_yaml())


def open_run(run_uri: str) -> tuple[RunStore, PipelineConfig]:
    """The store and the config of an existing run: what every stage starts from."""
    store = RunStore(run_uri)
    return store, load_run_config(store)


def check_stage(cfg: PipelineConfig, stage: str, r: int) -> None:
    """Raise a one-line error unless ``stage`` is a stage name and ``r`` one of the run's rounds (shard: any)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if stage != "shard" and not 0 <= r < cfg.rounds:
        raise ConfigError(f"round {r} is outside this run's rounds 0..{cfg.rounds - 1}")


def load_run_config(store: RunStore) -> PipelineConfig:
    if not store.exists(CONFIG_FILE):
        raise StoreError(f"{store.uri} is not a run (no {CONFIG_FILE}): start it with `deepercluster run`")
    return config_from_yaml_text(store.read_text(CONFIG_FILE))

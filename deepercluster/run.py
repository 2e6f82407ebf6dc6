"""Opening a run: bind a config to a run store, or read back the config a run was made with.

A run's config may change after it started: a changed field recomputes exactly the stages that read it (see
:mod:`deepercluster.stages.lineage`), ``rounds`` may be raised (the run continues), and fields added by a newer
version of the package take their defaults. What cannot change is the method, and ``rounds`` cannot go down."""

from __future__ import annotations

import hashlib
import json

from deepercluster.config import RESULT_NEUTRAL, PipelineConfig, config_from_yaml_text, iter_fields
from deepercluster.errors import ConfigError, StoreError
from deepercluster.paths import CONFIG_FILE  # noqa: F401  (re-exported)
from deepercluster.store import RunStore


def run_identity(cfg: PipelineConfig) -> str:
    """A short hash of what makes a run's results, stable across upgrades: the fields that differ from their
    default, minus the result-neutral ones and ``rounds`` (a run extended by more rounds is the same run)."""
    chosen = {name: value for name, value, default, _ in iter_fields(cfg)
              if value != default and name not in RESULT_NEUTRAL and name != "rounds"
              and not name.startswith("runtime.")}
    blob = json.dumps(chosen, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_run_dir(cfg: PipelineConfig) -> str:
    """Where ``deepercluster run`` puts a run when no ``--run`` is given: one folder per method and identity."""
    return f"runs/{cfg.method}-{run_identity(cfg)[:8]}"


def config_changes(old: PipelineConfig, new: PipelineConfig) -> list[str]:
    """``field old -> new`` for every field whose value differs."""
    before = {name: value for name, value, _, _ in iter_fields(old)}
    return [f"{name} {_show(before.get(name))} -> {_show(value)}" for name, value, _, _ in iter_fields(new)
            if before.get(name) != value]


def init_run(store: RunStore, cfg: PipelineConfig) -> list[str]:
    """Save ``cfg`` into a new run, or into an existing one (resume, or a changed config); returns the changes."""
    changes: list[str] = []
    if store.exists(CONFIG_FILE):
        existing = load_run_config(store)
        if existing.method != cfg.method:
            raise ConfigError(f"run {store.uri} is a {existing.method} run: use a new --run directory for "
                              f"{cfg.method}")
        if cfg.rounds < existing.rounds:
            raise ConfigError(f"run {store.uri} has {existing.rounds} rounds: rounds can be raised, not lowered "
                              f"(to {cfg.rounds}); use a new --run directory for fewer rounds")
        changes = config_changes(existing, cfg)
        if not changes and existing.to_yaml() == cfg.to_yaml():
            return []
    store.write_text(CONFIG_FILE, cfg.to_yaml())
    return changes


def preflight(cfg: PipelineConfig) -> None:
    """The checks a new run can make before anything is written (the config's own are made when it is built):
    what kind of source ``data.source`` is (a plain image file is none)."""
    from deepercluster.data.sources import source_kind

    source_kind(cfg.data)


def open_run(run_uri: str) -> tuple[RunStore, PipelineConfig]:
    """The store and the config of an existing run: what every stage starts from."""
    store = RunStore(run_uri)
    return store, load_run_config(store)


def load_run_config(store: RunStore) -> PipelineConfig:
    """The run's saved config (the data source and checkpoints it names are not looked at)."""
    if not store.exists(CONFIG_FILE):
        raise StoreError(f"{store.uri} is not a run (no {CONFIG_FILE}): start it with `deepercluster run`")
    from deepercluster.data.images import use_limits

    cfg = config_from_yaml_text(store.read_text(CONFIG_FILE), where=store.url(CONFIG_FILE))
    use_limits(cfg.data.max_side, cfg.data.max_aspect)  # what this process's image decoding accepts
    return cfg


def _show(value: object) -> str:
    return json.dumps(value, default=str)

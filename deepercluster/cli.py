"""``deepercluster run | stage | inspect``.

``run`` and ``stage`` drive the Prefect flows (imported lazily: the library itself never imports Prefect);
without ``PREFECT_API_URL`` Prefect starts a temporary local server for the duration of the command.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deepercluster.config import PRESETS, load_config
from deepercluster.errors import DeeperClusterError
from deepercluster.store import ROUND_STAGES, STAGES, RunStore

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Unsupervised image features by clustering: DeepCluster, RotNet, DeeperCluster.")
console = Console()


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(2)


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@app.command()
def run(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (default: the preset's)"),
    run_dir: str | None = typer.Option(None, "--run", "-r", help="run store (path or URL); default runs/<method>-<hash>"),
    method: str | None = typer.Option(None, "--method", "-m", help=f"preset: {', '.join(PRESETS)}"),
) -> None:
    """Run (or resume) the whole pipeline: shard, then extract -> cluster -> train -> evaluate per round."""
    from deepercluster.run import default_run_dir, init_run

    try:
        cfg = load_config(config, method=method)
        store = RunStore(run_dir or default_run_dir(cfg))
        init_run(store, cfg)
    except DeeperClusterError as err:
        _fail(err)
    console.print(f"run [bold]{store.uri}[/]  method={cfg.method}  config={cfg.hash}  rounds={cfg.rounds}")
    _prefect_env()
    from flows.pipeline import pipeline_flow

    try:
        pipeline_flow(store.uri)
    except DeeperClusterError as err:
        _fail(err)
    console.print(history_table(store))
    console.print(f"artifacts in {store.uri}")


@app.command()
def stage(
    name: str = typer.Argument(..., help=f"one of {', '.join(STAGES)}"),
    run_dir: str = typer.Option(..., "--run", "-r", help="run store (path or URL)"),
    round_: int = typer.Option(0, "--round", help="round (ignored by shard)"),
    force: bool = typer.Option(False, "--force", help="recompute even the units already done"),
) -> None:
    """Run (or rerun with --force) one stage of an existing run."""
    from deepercluster.run import open_run

    if name not in STAGES:
        _fail(ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}"))
    try:
        store, cfg = open_run(run_dir)
        if name != "shard" and not 0 <= round_ < cfg.rounds:
            raise DeeperClusterError(f"round {round_} is outside this run's rounds 0..{cfg.rounds - 1}")
    except DeeperClusterError as err:
        _fail(err)
    _prefect_env()
    from flows.stages import STAGE_FLOWS

    try:
        result = STAGE_FLOWS[name](store.uri, force=force) if name == "shard" else STAGE_FLOWS[name](
            store.uri, round_, force=force)
    except DeeperClusterError as err:
        _fail(err)
    console.print(f"{name} done: {result}")


@app.command()
def inspect(run_dir: str = typer.Argument(..., help="run store (path or URL)")) -> None:
    """Per-round metrics and per-stage completion of a run."""
    from deepercluster.run import open_run

    try:
        store, cfg = open_run(run_dir)
    except DeeperClusterError as err:
        _fail(err)
    console.print(f"run [bold]{store.uri}[/]  method={cfg.method}  config={cfg.hash}")
    console.print(completion_table(store, cfg.rounds))
    console.print(history_table(store))


def completion_table(store: RunStore, rounds: int) -> Table:
    from deepercluster.data.shard import MANIFEST

    table = Table(title="stages (done units)")
    table.add_column("round")
    for s in ROUND_STAGES:
        table.add_column(s)
    shard_info = store.done_record("shard", None, "_stage")
    if shard_info:
        console.print(f"shard: done, {shard_info['images']} images, {shard_info['rejects']} rejects "
                      f"({store.url(MANIFEST)})")
    else:
        console.print(f"shard: {len(store.done_units('shard', None))} parts scanned, not finalised")
    for r in range(rounds):
        cells = []
        for s in ROUND_STAGES:
            n = len(store.done_units(s, r))
            cells.append("[green]done[/]" if store.stage_done(s, r) else (f"{n} units" if n else "-"))
        table.add_row(str(r), *cells)
    return table


def history_table(store: RunStore) -> Table:
    from deepercluster.evaluation.stage import load_history

    history = load_history(store)
    table = Table(title="per-round metrics")
    columns = [c for c in ("round", "nmi_labels", "ari_labels", "kmeans_nmi_labels", "nmi_prev", "non_empty",
                           "size_min", "size_max", "train_loss", "train_acc_super", "train_acc_sub")
               if c in history.columns]
    for c in columns:
        table.add_column(c, justify="right")
    for row in history.itertuples(index=False):
        values = row._asdict()
        table.add_row(*[_fmt(values[c]) for c in columns])
    return table


def _fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

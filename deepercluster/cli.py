"""``deepercluster run | stage | inspect``.

``run`` and ``stage`` drive the Prefect flows (imported lazily: the library itself never imports Prefect);
without ``PREFECT_API_URL`` Prefect starts a temporary local server for the duration of the command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

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
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: the preset's)")] = None,
    run_dir: Annotated[str | None, typer.Option("--run", "-r", help="run store (path or URL)")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help=f"preset: {', '.join(PRESETS)}")] = None,
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
    name: Annotated[str, typer.Argument(help=f"one of {', '.join(STAGES)}")],
    run_dir: Annotated[str, typer.Option("--run", "-r", help="run store (path or URL)")],
    round_: Annotated[int, typer.Option("--round", help="round (ignored by shard)")] = 0,
    force: Annotated[bool, typer.Option("--force", help="recompute even the units already done")] = False,
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
    summary = {k: v for k, v in result.items() if isinstance(v, int | float | str) and k not in ("unit", "pid")}
    console.print(f"{name} done: {summary}")


@app.command()
def inspect(run_dir: Annotated[str, typer.Argument(help="run store (path or URL)")]) -> None:
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


HISTORY_COLUMNS = {  # column -> (title, format)
    "round": ("round", "{:.0f}"),
    "nmi_labels": ("NMI labels", "{:.3f}"),
    "ari_labels": ("ARI labels", "{:.3f}"),
    "kmeans_nmi_labels": ("k-means NMI", "{:.3f}"),
    "nmi_prev": ("NMI prev", "{:.3f}"),
    "non_empty": ("clusters", "{:.0f}"),
    "size_min": ("min size", "{:.0f}"),
    "size_max": ("max size", "{:.0f}"),
    "train_loss": ("loss", "{:.3f}"),
    "train_acc_super": ("acc super", "{:.3f}"),
    "train_acc_sub": ("acc sub", "{:.3f}"),
}


def history_table(store: RunStore) -> Table:
    from deepercluster.evaluation.stage import load_history

    history = load_history(store)
    columns = [c for c in HISTORY_COLUMNS if c in history.columns]
    table = Table(title="per-round metrics (NMI/ARI of the pseudo-labels vs labels; k-means NMI: k = classes)")
    for c in columns:
        table.add_column(HISTORY_COLUMNS[c][0], justify="right")
    for _, row in history.iterrows():
        table.add_row(*["-" if row[c] != row[c] or row[c] is None else HISTORY_COLUMNS[c][1].format(row[c])
                        for c in columns])
    return table


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

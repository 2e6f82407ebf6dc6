"""``deepercluster run | stage | inspect``.

``run`` and ``stage`` drive the Prefect flows (imported lazily: the library itself never imports Prefect);
without ``PREFECT_API_URL`` Prefect starts a temporary local server for the duration of the command.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deepercluster.config import PRESETS, PipelineConfig, load_config
from deepercluster.errors import DeeperClusterError
from deepercluster.store import ROUND_STAGES, STAGES, RunStore, export_storage_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Unsupervised image features by clustering: DeepCluster, RotNet, DeeperCluster.")
console = Console()


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(2)


def _prefect_env(verbose: bool = False) -> None:
    """Prefect's settings for a command, set before Prefect is imported. Unless ``verbose``, Prefect's console
    handler shows nothing below CRITICAL (in this process and the Dask workers it starts): its lines still reach the
    Prefect server and the run's log file (:func:`_log_to_run`), as do warnings and the tracebacks of failed
    tasks: a user error reaches the console as one line."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


def _log_to_run(store: RunStore) -> str | None:
    """Prefect's and the library's log lines (INFO and up) into ``<run>/logs/<command time>.log`` (local runs;
    remote ones have the Prefect server's). Returns the file's path."""
    import logging
    import time

    if not store.is_local:
        return None
    path = Path(store.path("logs")) / time.strftime("%Y%m%d-%H%M%S.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s - %(message)s"))
    for name in ("prefect", "deepercluster"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    return str(path)


def _watch(title: str):
    """The live view of a command's run, subscribed to the progress events while it is open."""
    from contextlib import contextmanager

    from deepercluster.console import RunView
    from deepercluster.progress import subscribe

    @contextmanager
    def watching():
        view = RunView(console, title)
        stop = subscribe(view)
        try:
            with view:
                yield view
        finally:
            stop()

    return watching()


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: the preset's)")] = None,
    run_dir: Annotated[str | None, typer.Option("--run", "-r", help="run store (path or URL)")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help=f"preset: {', '.join(PRESETS)}")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", "-s", help="section.field=value over the config "
                                                    "(repeatable), e.g. --set cluster.k=1000")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", help="rounds (raise it to extend a run)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also Prefect's log lines on the console")] = False,
) -> None:
    """Run, resume or extend the pipeline: shard, then extract -> cluster -> train -> evaluate per round. On an
    existing run, a changed config recomputes exactly the stages whose fingerprinted fields changed."""
    from deepercluster.data.shard import source_change
    from deepercluster.lease import acquire_lease
    from deepercluster.run import CONFIG_FILE, default_run_dir, init_run, preflight, run_identity
    from deepercluster.stages import run_plan

    try:
        cfg = resolve_config(config, method, sets or [], rounds, run_dir)
        export_storage_options(cfg.runtime.storage_options)  # for this process and the workers it starts
        store = RunStore(run_dir or default_run_dir(cfg))
        if not store.exists(CONFIG_FILE):
            preflight(cfg)  # before the run's folder exists: a wrong source leaves nothing behind
        lease = acquire_lease(store, "deepercluster run")
    except DeeperClusterError as err:
        _fail(err)
    try:
        changes = init_run(store, cfg)
        console.print(f"run [bold]{store.uri}[/]  method={cfg.method}  identity={run_identity(cfg)[:8]}  "
                      f"rounds={cfg.rounds}", highlight=False, soft_wrap=True)
        for change in changes:
            console.print(f"config changed: {change}", highlight=False)
        note = source_change(store, cfg.data)
        if note:
            console.print(f"note: {note.replace('RUN', store.uri)}", highlight=False, soft_wrap=True)
        if cfg.method != "clusterfit":
            for state in run_plan(store, cfg):
                if state.status == "stale":
                    console.print(f"recomputed: {state.describe()}", highlight=False)
        _prefect_env(verbose)
        from flows.pipeline import pipeline_flow

        log_file = _log_to_run(store)
        if log_file:
            console.print(f"log: {log_file}", highlight=False, soft_wrap=True)
        with _watch(f"{cfg.method} run {store.uri}, {cfg.rounds} rounds"):
            result = pipeline_flow(store.uri)
    except DeeperClusterError as err:
        _fail(err)
    finally:
        lease.release()
    if cfg.method == "clusterfit":
        console.print(result[0])
    console.print(history_table(store))
    console.print(f"artifacts in {store.uri}")


def resolve_config(path: Path | None, method: str | None, sets: list[str], rounds: int | None,
                   run_dir: str | None) -> PipelineConfig:
    """The config a command asks for: ``--config`` (or, on an existing ``--run`` without one, the run's saved
    config; else the preset's defaults), then ``--set`` and ``--rounds`` over it."""
    from deepercluster.config import build_config, deep_merge, parse_sets
    from deepercluster.run import CONFIG_FILE, load_run_config

    if path is None and run_dir and RunStore(run_dir).exists(CONFIG_FILE):
        saved = load_run_config(RunStore(run_dir)).model_dump(mode="json")
        saved = deep_merge(saved, parse_sets(sets))
        if rounds is not None:
            saved["rounds"] = rounds
        return build_config(saved, method=method)
    return load_config(path, method=method, sets=sets, rounds=rounds)


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: the preset's)")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help=f"preset: {', '.join(PRESETS)}")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", "-s", help="section.field=value (repeatable)")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", help="rounds")] = None,
    run_dir: Annotated[str | None, typer.Option("--run", "-r", help="start from this run's saved config")] = None,
    as_yaml: Annotated[bool, typer.Option("--yaml", help="print the resolved config as YAML (a config file)")] = False,
) -> None:
    """The resolved config, field by field: its value, its default and what it means ("*": changed from the
    default; "neutral": changes no result, in no fingerprint)."""
    from deepercluster.config import RESULT_NEUTRAL, iter_fields

    try:
        cfg = resolve_config(config, method, sets or [], rounds, run_dir)
    except DeeperClusterError as err:
        _fail(err)
    if as_yaml:
        print(cfg.to_yaml(), end="")
        return
    section = None
    for name, value, default, description in iter_fields(cfg):
        head, _, field = name.rpartition(".")
        if head != section:
            section = head
            console.print(f"[bold]{head or 'run'}[/]", highlight=False)
        mark = "*" if value != default else " "
        neutral = "  neutral" if name in RESULT_NEUTRAL or name.startswith("runtime.") else ""
        console.print(f" {mark} {field} = {_yaml_value(value)}   (default {_yaml_value(default)}){neutral}",
                      highlight=False, soft_wrap=True)
        if description:
            text = description.removesuffix(" (result-neutral: not fingerprinted)")
            console.print(textwrap.fill(text, width=max(40, console.width - 1), initial_indent=" " * 6,
                                        subsequent_indent=" " * 6), highlight=False, style="dim")


def _yaml_value(value: object) -> str:
    import json

    return json.dumps(value, default=str) if not isinstance(value, str) else value


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of {', '.join(STAGES)}")],
    run_dir: Annotated[str, typer.Option("--run", "-r", help="run store (path or URL)")],
    round_: Annotated[int, typer.Option("--round", help="round (ignored by shard)")] = 0,
    force: Annotated[bool, typer.Option("--force", help="recompute even the units already done")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also Prefect's log lines on the console")] = False,
) -> None:
    """Run (or rerun with --force) one stage of an existing run: the flow the `stage/NAME` deployments run. Stages
    that read its outputs become stale: the next `deepercluster run` recomputes them."""
    from deepercluster.lease import acquire_lease
    from deepercluster.run import open_run
    from deepercluster.stages import get_stage

    try:
        store, cfg = open_run(run_dir)
        get_stage(name).check_round(cfg, round_)
        lease = acquire_lease(store, f"deepercluster stage {name}")
    except DeeperClusterError as err:
        _fail(err)
    _prefect_env(verbose)
    from flows.stages import stage_flow

    try:
        _log_to_run(store)
        with _watch(f"stage {name} of {store.uri}"):
            result = stage_flow(store.uri, name, round_, force=force)
    except DeeperClusterError as err:
        _fail(err)
    finally:
        lease.release()
    summary = {k: v for k, v in result.items() if isinstance(v, int | float | str) and k not in ("unit", "pid", "id")}
    console.print(f"{name} done: {summary}", highlight=False, soft_wrap=True)
    for reason, count in (result.get("reasons") or {}).items():  # the shard stage: its rejects per reason
        console.print(f"  rejected, {reason}: {count}", highlight=False, soft_wrap=True)


@app.command()
def inspect(
    run_dir: Annotated[str, typer.Argument(help="run store (path or URL)")],
    shards: Annotated[bool, typer.Option("--shards", help="images per shard, rejects, sample rows")] = False,
    galleries: Annotated[int, typer.Option("--galleries", min=0, help="clusters to draw a gallery PNG of")] = 8,
    features: Annotated[bool, typer.Option("--features", help="the round's features: shape, dtype, completed "
                                                              "shards, norms, nearest neighbours of --image")] = False,
    round_: Annotated[int, typer.Option("--round", min=0, help="round (with --features)")] = 0,
    image: Annotated[int, typer.Option("--image", min=0, help="image id whose nearest neighbours are drawn")] = 0,
    neighbours: Annotated[int, typer.Option("--neighbours", min=1, help="nearest neighbours to draw")] = 8,
    png: Annotated[Path | None, typer.Option("--png", help="neighbour grid PNG (default: into the run)")] = None,
    all_columns: Annotated[bool, typer.Option("--all-columns", help="every metric, one row each")] = False,
) -> None:
    """Per-round metrics, per-stage completion, cluster sizes (largest and smallest clusters) of the last clustered
    round, a gallery PNG per sampled cluster and a plot of the metrics over rounds (written into the run)."""
    from deepercluster.run import open_run

    try:
        store, cfg = open_run(run_dir)
    except DeeperClusterError as err:
        _fail(err)
    from deepercluster.lease import read_lease

    console.print(f"run [bold]{store.uri}[/]  method={cfg.method}  rounds={cfg.rounds}", highlight=False)
    from deepercluster.data.shard import source_change

    note = source_change(store, cfg.data) if cfg.data.source else None
    if note:
        console.print(f"note: {note.replace('RUN', store.uri)}", highlight=False, soft_wrap=True)
    owner = read_lease(store)
    if owner:
        console.print(f"in use by {owner['what']} (host {owner['host']}, pid {owner['pid']})", highlight=False)
    if shards:
        print_shards(store)
        return
    if features:
        print_features(store, round_, image, neighbours, png)
        return
    console.print(completion_table(store, cfg))
    console.print(history_table(store, all_columns=all_columns))
    print_clusters(store, cfg.rounds, cfg.cluster.n_targets, galleries)


def print_features(store: RunStore, r: int, image: int, k: int, png: Path | None) -> None:
    """Shape, dtype, completed shards and norm statistics of round ``r``'s features, and the nearest neighbours of
    one image as a PNG grid (into the run at ``rounds/<r>/eval/neighbours-<image>.png``, or ``png``)."""
    from deepercluster.features.inspect import feature_summary, nearest_neighbours, neighbour_grid

    try:
        info = feature_summary(store, r)
        nn = nearest_neighbours(store, r, image, k)
        grid = neighbour_grid(store, image, nn)
    except DeeperClusterError as err:
        _fail(err)
    state = "complete" if info["stage_done"] else "in progress"
    console.print(f"features round {r}: {info['url']}  shape={info['shape']}  dtype={info['dtype']}  "
                  f"layer={info['layer']}  shards {info['shards_done']}/{info['shards']} done ({state})")
    console.print(f"L2 norms of {info['rows_checked']} rows: min {info['norm_min']:.4g}  mean {info['norm_mean']:.4g}"
                  f"  max {info['norm_max']:.4g}  std {info['norm_std']:.4g}  zero rows {info['zero_rows']}  "
                  f"non-finite rows {info['non_finite_rows']}")
    table = Table(title=f"nearest neighbours of image {image} (cosine)")
    table.add_column("image_id", justify="right")
    table.add_column("similarity", justify="right")
    for i, sim in nn:
        table.add_row(str(i), f"{sim:.4f}")
    console.print(table)
    if png is None:
        rel = f"rounds/{r}/eval/neighbours-{image:06d}.png"
        store.write_bytes(rel, grid)
        console.print(f"neighbour grid: {store.url(rel)}")
    else:
        png.write_bytes(grid)
        console.print(f"neighbour grid: {png}")


def print_clusters(store: RunStore, rounds: int, n_targets: int, galleries: int, r: int | None = None) -> None:
    """Cluster sizes of round ``r`` (default: the last clustered one), its largest and smallest clusters, and where
    the galleries and the metrics plot were written."""
    from deepercluster.inspection import inspect_round, last_clustered_round

    r = last_clustered_round(store, rounds) if r is None else r
    if r is None:
        console.print("clusters: no round clustered yet")
        return
    try:
        try:
            result = inspect_round(store, r, n_targets=n_targets, galleries=galleries)
        except OSError as err:  # the images moved away or unreadable: everything but the galleries
            console.print(f"galleries skipped: the run's images cannot be read here ({err})", highlight=False,
                          soft_wrap=True)
            result = inspect_round(store, r, n_targets=n_targets, galleries=0)
    except (DeeperClusterError, OSError) as err:
        _fail(err)
    sizes = result.sizes[result.sizes["size"] > 0]["size"]
    console.print(f"round {r}: {len(sizes)} non-empty clusters of {len(result.sizes)} ({result.empty} empty), sizes "
                  f"min {sizes.min()} / median {sizes.median():.0f} / max {sizes.max()}")
    for title, frame in (("largest clusters", result.top), ("smallest clusters", result.bottom)):
        table = Table(title=f"round {r}: {title}")
        columns = [c for c in ("target", "super", "sub", "size", "top_label", "purity") if c in frame.columns]
        for c in columns:
            table.add_column(c, justify="right")
        for rec in frame[columns].to_dict("records"):
            table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in rec.values()])
        console.print(table)
    if result.galleries:
        console.print(f"galleries ({len(result.galleries)}): {store.url(f'rounds/{r}/eval/gallery')}/")
    if result.metrics_plot:
        console.print(f"metrics over rounds: {store.url(result.metrics_plot)}")


def print_shards(store: RunStore, head: int = 10) -> None:
    """The shard stage's output: rows per shard (the first and last ``head``), rejects per reason, sample rows."""
    from deepercluster.data.shard import MANIFEST, shard_summary

    if not store.exists(MANIFEST):
        _fail(DeeperClusterError(f"{store.url(MANIFEST)} is missing: run `deepercluster stage shard` first"))
    summary = shard_summary(store)
    per_shard = summary["per_shard"]
    console.print(f"{summary['images']} images in {len(per_shard)} shards, {sum(summary['reasons'].values())} "
                  "rejects")
    table = Table(title="images per shard")
    table.add_column("shard", justify="right")
    table.add_column("images", justify="right")
    keys = sorted(per_shard)
    shown = keys if len(keys) <= 2 * head else keys[:head] + [None] + keys[-head:]
    for k in shown:
        table.add_row("..." if k is None else str(k), "..." if k is None else str(per_shard[k]))
    console.print(table)
    table = Table(title="rejects per reason")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for reason, count in summary["reasons"].items():
        table.add_row(reason, str(count))
    console.print(table)
    sample = summary["sample"]
    table = Table(title="sample rows")
    columns = [c for c in sample.columns if c != "sha256"]
    for c in columns:
        table.add_column(c, overflow="fold")
    for _, row in sample.iterrows():
        table.add_row(*[str(row[c]) for c in columns])
    console.print(table)


def completion_table(store: RunStore, cfg: PipelineConfig) -> Table:
    """Each stage of each round against the current config: done, stale (and why, below), units done, or -."""
    from deepercluster.stages import run_plan

    states = run_plan(store, cfg)
    shard = states[0]
    info = store.done_record("shard", None, "_stage")
    if shard.status == "done" and info:
        console.print(f"shard: done, {info['images']} images, {info['rejects']} rejects")
    else:
        console.print(f"shard: {shard.status}, {len(store.done_units('shard', None))} units done", highlight=False)
    cells: dict[tuple[int, str], str] = {}
    for st in states[1:]:
        n = len(store.done_units(st.name, st.round))
        cells[st.round, st.name] = {"done": "[green]done[/]", "stale": "[yellow]stale[/]"}.get(
            st.status, f"{n} units" if n else "-")
    table = Table(title="stages (done units)")
    table.add_column("round")
    for name in ROUND_STAGES:
        table.add_column(name)
    for r in sorted({r for r, _ in cells}):
        table.add_row(str(r), *[cells.get((r, name), "") for name in ROUND_STAGES])
    for st in states:
        if st.status == "stale":
            console.print(f"stale: {st.describe()}", highlight=False)
    return table


HISTORY_COLUMNS = {  # column -> (short title, format); the first ones are the default table (fits 80 columns)
    "round": ("round", "{:.0f}"),
    "kmeans_nmi_labels": ("kmNMI", "{:.3f}"),
    "probe_acc": ("probe", "{:.3f}"),
    "knn_acc": ("kNN", "{:.3f}"),
    "nmi_labels": ("NMI", "{:.3f}"),
    "nmi_prev": ("NMIprev", "{:.3f}"),
    "train_loss": ("loss", "{:.3f}"),
    "wall_s": ("time s", "{:.0f}"),
    "ari_labels": ("ARI labels", "{:.3f}"),
    "knn_whitened_acc": ("kNN whitened", "{:.3f}"),
    "non_empty": ("clusters", "{:.0f}"),
    "size_min": ("min size", "{:.0f}"),
    "size_max": ("max size", "{:.0f}"),
    "train_acc_super": ("acc super", "{:.3f}"),
    "train_acc_sub": ("acc sub", "{:.3f}"),
}
DEFAULT_COLUMNS = 8  # round .. time s
LEGEND = ("kmNMI: NMI of a k-means (k = classes) of the features vs labels; probe / kNN: linear-probe and kNN "
          "accuracy on held-out labelled images; NMI: pseudo-labels vs labels; NMIprev: vs the previous round")


def _cell(column: str, value: object) -> str:
    if value is None or value != value:
        return "-"
    return HISTORY_COLUMNS[column][1].format(value) if column in HISTORY_COLUMNS else f"{value:.4g}"


def history_table(store: RunStore, all_columns: bool = False) -> Table:
    """The per-round metrics: the headline columns (readable at 80 columns, numbers never cut), or with
    ``all_columns`` every recorded column, one row per metric and one column per round."""
    from deepercluster.evaluation.stage import load_history

    history = load_history(store)
    if not all_columns:
        columns = [c for c in list(HISTORY_COLUMNS)[:DEFAULT_COLUMNS] if c in history.columns]
        table = Table(title="per-round metrics", caption=LEGEND, caption_justify="left")
        for c in columns:
            table.add_column(HISTORY_COLUMNS[c][0], justify="right", no_wrap=True)
        for _, row in history.iterrows():
            table.add_row(*[_cell(c, row[c]) for c in columns])
        return table
    columns = [c for c in history.columns if c != "round" and pd_numeric(history[c])]
    table = Table(title="per-round metrics (every column)")
    table.add_column("metric", no_wrap=True)
    for r in history["round"]:
        table.add_column(f"r{int(r)}", justify="right", no_wrap=True)
    for c in columns:
        table.add_row(c, *[_cell(c, v) for v in history[c]])
    return table


def pd_numeric(series: object) -> bool:
    from pandas.api.types import is_numeric_dtype

    return bool(is_numeric_dtype(series))


@app.command()
def verify(
    run_dir: Annotated[str, typer.Argument(help="run store (path or URL)")],
    round_: Annotated[int | None, typer.Option("--round", min=0, help="only this round's stages")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="recompute the bad units (only them), then verify "
                                                          "again")] = False,
) -> None:
    """Check every completed unit's files against its completion record (size and SHA-256): one line per bad unit
    naming the file, the unit and the command that recomputes it, and exit 1; else a one-line summary."""
    from deepercluster.run import open_run
    from deepercluster.verify import repair_run, verify_run

    summary: dict[str, int] = {}
    try:
        store, cfg = open_run(run_dir)
        problems = verify_run(store, round_, summary)
        if problems and repair:
            from deepercluster.lease import acquire_lease

            lease = acquire_lease(store, "deepercluster verify --repair")
            try:
                for line in repair_run(store, cfg, problems):
                    console.print(line, highlight=False, soft_wrap=True)
            finally:
                lease.release()
            problems = verify_run(store, round_, summary)
    except DeeperClusterError as err:
        _fail(err)
    for problem in problems:
        console.print(problem.line(store), highlight=False, soft_wrap=True, markup=False)
    checked = f"{summary['units']} units, {summary['files']} files ({summary['bytes'] / 2**20:.1f} MiB)"
    if problems:
        console.print(f"{len(problems)} bad units of {checked}", highlight=False)
        raise typer.Exit(1)
    unlisted = f"; {summary['unlisted']} unit records list no files (training's, or older than file lists)" \
        if summary["unlisted"] else ""
    console.print(f"verified {checked}: all match their records{unlisted}", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

"""The ``dask-imgcurate`` click group ``main`` and its commands."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import click

from dask_imgcurate.backend import column_names, to_pandas
from dask_imgcurate.cli.config import CurateConfig, _settings, _storage_options
from dask_imgcurate.cli.options import (
    lenient_option,
    storage_option,
    with_cluster_options,
    with_filter_options,
    with_layout_options,
    with_model_options,
)
from dask_imgcurate.cli.output import (
    EXIT_ERROR,
    _Group,
    _one_line,
    _setup_logging,
    _show_progress,
    _summary_table,
    _table,
)
from dask_imgcurate.cli.work import (
    _check_output,
    _client,
    _export,
    _head_available,
    _load,
    _scored,
    _with_keep,
    run_curate,
)
from dask_imgcurate.cluster import cluster_kind, describe
from dask_imgcurate.errors import CurateError, ShardWarning


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details, show tracebacks.")
@click.version_option(package_name="dask_imgcurate")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Curate image-text WebDataset shards: index, embed, score, filter, export."""
    ctx.call_on_close(_setup_logging(verbose))


def run(prog_name: str = "dask-imgcurate") -> None:
    """The console entry point: ``main`` as a process of its own. A command that failed or
    was interrupted leaves at once, its one line said: tasks still running in this
    process's threads (dask's local scheduler) would otherwise hold the exit until they end,
    and speak on the way. (In-process callers, e.g. tests, call ``main``.)"""
    try:
        main(prog_name=prog_name)
    except SystemExit as done:
        if done.code not in (0, None):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(done.code if isinstance(done.code, int) else EXIT_ERROR)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a late Ctrl-C changes nothing
        raise


def _write_index(job: tuple[str, dict | None]) -> tuple[str | None, str | None, list[str]]:
    """Write one shard's .idx (module level, so a worker process can run it): its path, or
    None and why not; and what is suspect about the shard."""
    from dask_imgcurate.io.shards import write_dali_index_noting

    tar, options = job
    try:
        idx, notes = write_dali_index_noting(tar, storage_options=options)
    except (CurateError, OSError) as err:  # a damaged or unreadable shard: the others go on
        return None, _one_line(err), []
    return idx, None, [_one_line(message) for message, _ in notes]


@main.command()
@click.argument("path")
@storage_option
def index(path: str, storage_options: str | None) -> None:
    """Write a DALI .idx beside every .tar shard of PATH (a directory, glob or tar).

    Damaged shards are named and not indexed (exit 1); suspect ones (cut between records,
    data after their end, members ignored or links skipped) are indexed with a warning.
    """
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from tqdm import tqdm

    from dask_imgcurate.io import find_shards
    from dask_imgcurate.io import fs as fsio

    options = _storage_options(storage_options)
    fs, _ = fsio.url_to_fs(path, options)
    shards = find_shards(fs, path)
    if not shards:
        raise FileNotFoundError(f"no .tar shards found in {path}")
    # Local shards: scanning headers is CPU work, so use processes; remote ones wait on I/O.
    if fsio.is_local(fs):
        pool = ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, len(shards)))
    else:
        pool = ThreadPoolExecutor(max_workers=min(8, len(shards)))
    jobs = [(fsio.qualify(fs, shard.tar), options) for shard in shards]
    with pool:
        written = list(
            tqdm(
                pool.map(_write_index, jobs),
                total=len(shards),
                desc="index",
                unit="shard",
                file=sys.stderr,
                disable=not _show_progress(),
            )
        )
    done = [idx for idx, _, _ in written if idx is not None]
    failed = [(job[0], why) for job, (idx, why, _) in zip(jobs, written) if idx is None]
    suspect = [notes for _, _, notes in written if notes]
    rows = {"shards indexed": len(done)}
    if suspect:
        rows["with warnings"] = len(suspect)
    if done:
        rows.update(first=done[0], last=done[-1])
    _table(rows)
    for notes in suspect:
        for note in notes:
            click.echo(f"warning: {note}", err=True)
    if failed:
        for tar, why in failed:
            click.echo(
                f"not indexed: {why}" if tar in why else f"not indexed: {tar}: {why}", err=True
            )
        raise CurateError(f"{len(failed)} of {len(jobs)} shards could not be indexed")


@main.command()
@click.argument("path")
@storage_option
@click.option(
    "--rows", type=click.IntRange(min=0), default=5, show_default=True, help="Sample rows to show."
)
@lenient_option
def inspect(
    path: str, storage_options: str | None, rows: int, lenient: bool, on_mismatch: str
) -> None:
    """Shards, records, columns, sizes and damage of the dataset at PATH."""
    import dask

    from dask_imgcurate.errors import ShardNotice

    options = _storage_options(storage_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = CurateConfig(storage_options=options, on_mismatch=on_mismatch)
        ds = _load(path, config, strict=not lenient)
        frame = ds.metadata
        tasks = {
            "per_shard": frame.map_partitions(len),
            "image_bytes": frame["_image_size"].clip(lower=0).sum(),
            "no_image": (frame["_image_size"] < 0).sum(),
            # not frame.head(npartitions=-1): dask reads the partitions again for that
            "head": frame.map_partitions(_first_rows, rows, meta=frame._meta),
        }
        if "error" in frame.columns:
            tasks["errors"] = frame["error"].count()  # non-null
        bar = contextlib.nullcontext()
        if _show_progress():
            from dask.diagnostics import ProgressBar

            bar = ProgressBar(out=sys.stderr)
        with bar:
            (result,) = dask.compute(tasks, scheduler="threads")
    # a shard's damage is reported each time it is read: once per message is enough
    shard_warnings = [w for w in caught if issubclass(w.category, ShardWarning)]
    damaged = list(
        dict.fromkeys(str(w.message) for w in shard_warnings if w.category is not ShardNotice)
    )
    notices = list(
        dict.fromkeys(str(w.message) for w in shard_warnings if w.category is ShardNotice)
    )
    for w in caught:  # not about the shards: show them as usual
        if not issubclass(w.category, ShardWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    fs = ds.fs
    sizes = [fs.size(s.tar) for s in ds.shards]
    per_shard = list(result["per_shard"])
    summary = {
        "path": path,
        "shards": len(ds.shards),
        "with parquet": sum(s.parquet is not None for s in ds.shards),
        "with .idx": sum(s.idx is not None for s in ds.shards),
        "records": int(sum(per_shard)),
        "records without image": int(result["no_image"]),
    }
    if "errors" in result:
        summary["records with errors"] = int(result["errors"])
    summary["tar bytes"] = f"{sum(sizes) / 1e6:.1f} MB"
    summary["image bytes"] = f"{int(result['image_bytes']) / 1e6:.1f} MB"
    summary["damaged shards"] = sum(
        any(line.startswith(f"{tar}: ") for line in damaged) for tar in ds.tar_files
    )
    if notices:
        summary["shard warnings"] = len(notices)
    _table(summary)
    if len(per_shard) == len(ds.shards):
        click.echo("\nshards:")
        shown = 10
        for shard, count, size in list(zip(ds.shards, per_shard, sizes))[:shown]:
            click.echo(f"  {_basename(shard.tar):<24} {count:>8} records {size / 1e6:>9.1f} MB")
        if len(ds.shards) > shown:
            click.echo(f"  ... and {len(ds.shards) - shown} more")
    click.echo("\ncolumns:")
    for name, dtype in frame.dtypes.items():
        click.echo(f"  {name:<24} {dtype}")
    for line in damaged:
        click.echo(f"damage: {line}")
    for line in notices:
        click.echo(f"warning: {line}")
    head = result["head"].head(rows)
    if rows and len(head):
        from dask_imgcurate.metadata import is_bookkeeping

        visible = [c for c in head.columns if not is_bookkeeping(c)]
        click.echo("\n" + to_pandas(head[visible]).to_string(max_colwidth=40))


def _first_rows(part, rows: int):
    return part.head(rows)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@main.command()
@click.argument("path")
@click.option(
    "--output", default=None, help="Directory for the Parquet files [default: beside the tars]."
)
@with_model_options
@with_cluster_options
@lenient_option
@storage_option
@click.pass_context
def embed(ctx: click.Context, path: str, output: str | None, **_) -> None:
    """Compute CLIP embeddings and scores of PATH; save them as its Parquet metadata.

    A score head runs when its weights are given (--aesthetic-model, --nsfw-model), cached,
    or --allow-download is set. The Parquet files (NNNNN.parquet beside NNNNN.tar, or in
    --output) then hold every metadata column plus image_embedding, aesthetic_score,
    nsfw_score and error.
    """
    config = _settings(ctx)
    if output is not None:  # before any model is loaded
        from dask_imgcurate.export.guards import check_output_path
        from dask_imgcurate.io import fs as fsio

        check_output_path(*fsio.url_to_fs(output, config.storage_options))
    dataset = _load(path, config)
    aesthetic, nsfw = _head_available("aesthetic", config), _head_available("nsfw", config)
    fetch = cluster_kind(config.scheduler_address, config.n_workers) != "existing"
    scored = _scored(dataset, config, aesthetic=aesthetic, nsfw=nsfw, fetch=fetch)
    stale = [  # an earlier run's scores belong to its embeddings, not these
        column
        for column, on in (("aesthetic_score", aesthetic), ("nsfw_score", nsfw))
        if not on and column in column_names(scored.metadata)
    ]
    if stale:
        scored = scored.with_metadata(scored.metadata.drop(columns=stale))
        warnings.warn(
            f"dropped {' and '.join(stale)} from the metadata: an earlier run scored other "
            f"embeddings; give the head's weights (--aesthetic-model / --nsfw-model) to score "
            f"these",
            stacklevel=1,
        )
    with _client(config) as client:
        written = scored.save_metadata(output, verbose=_show_progress())
        cluster = describe(client)
    columns = ["image_embedding"] + [
        c for c, on in (("aesthetic_score", aesthetic), ("nsfw_score", nsfw)) if on
    ]
    errors = int(written["errors"].sum())
    _table(
        {
            "parquet files written": len(written),
            "records": int(written["rows"].sum()),
            "records with errors": errors,
            "columns added": ", ".join(columns + ["error"]),
            "output": os.path.dirname(written["path"].iloc[0]) if len(written) else output,
            "cluster": cluster,
        }
    )
    if errors:
        click.echo(
            f"{errors} records could not be read or decoded: their embeddings and scores are "
            f"null and their reason is in the 'error' column (`dask-imgcurate inspect`); "
            f"exports leave them out",
            err=True,
        )


@main.command()
@click.argument("path")
@click.argument("output")
@with_layout_options
@with_filter_options
@with_cluster_options
@lenient_option
@storage_option
@click.pass_context
def export(ctx: click.Context, path: str, output: str, **_) -> None:
    """Export the records of PATH that pass the filters to OUTPUT (tar + Parquet shards).

    Filters read the metadata (run `embed` first for the scores); rows with an error are
    always dropped. Re-running an interrupted export finishes it.
    """
    config = _settings(ctx)
    _check_output(path, output)
    dataset, column = _with_keep(_load(path, config), config)
    with _client(config) as client:
        summary = _export(dataset, output, config, column)
        cluster = describe(client)
    _summary_table(summary, cluster)


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.argument("output")
@click.option("--config", "config_path", default=None, help="YAML file of settings.")
@with_model_options
@with_filter_options
@with_layout_options
@with_cluster_options
@lenient_option
@storage_option
@click.pass_context
def curate(ctx: click.Context, input_path: str, output: str, config_path: str | None, **_) -> None:
    """Embed, score, filter and export INPUT to OUTPUT in one pass.

    Settings come from --config (a YAML mapping whose keys are the flags' names with
    underscores, e.g. min_aesthetic: 5.0); flags given on the command line override it.
    Score heads run when a filter needs them or their weights are given.
    """
    config = _settings(ctx, config_path)
    _check_output(input_path, output)
    summary, cluster = run_curate(input_path, output, config)
    _summary_table(summary, cluster)


@main.command()
@click.option(
    "--dir", "directory", default="demo-output", show_default=True, help="Where it all goes."
)
@click.option(
    "--shards", type=click.IntRange(min=1), default=4, show_default=True, help="Input shards."
)
@click.option(
    "--samples-per-shard",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Records per input shard.",
)
@click.option(
    "--n-workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Worker processes of the local cluster; 0: no cluster, threads in this process.",
)
@click.option("--scheduler-address", default=None, help="Use the running Dask cluster instead.")
def demo(
    directory: str,
    shards: int,
    samples_per_shard: int,
    n_workers: int,
    scheduler_address: str | None,
) -> None:
    """Build the demo dataset and curate it end to end with a tiny built-in model.

    The steps are the documented workflow: embed and score, save_metadata, filter on the
    scores, export. Random weights give arbitrary score scales, so the demo's thresholds
    are score quantiles (keep the top 70 % aesthetic, drop the top 10 % NSFW). DIR/input
    gets the shards, DIR/models the tiny model's heads, DIR/curated the export (a re-run
    skips its finished shards and removes those of a run with other options).
    """
    import dask

    from dask_imgcurate.demo import make_demo_dataset
    from dask_imgcurate.models.builtin import make_demo_models

    started = time.perf_counter()
    root = Path(directory)
    source = root / "input"
    # exactly these tars: a re-run with fewer shards leaves the earlier run's others there
    tars = make_demo_dataset(source, n_shards=shards, samples_per_shard=samples_per_shard)
    models = make_demo_models(root / "models")
    click.echo(
        f"demo dataset: {shards} shards x {samples_per_shard} records in {source}\n"
        f"model: {models.clip_model} with RANDOM weights (offline demo): its scores are "
        f"meaningless. For real work: --model ViT-L-14 --pretrained openai"
    )
    config = CurateConfig(
        model=models.clip_model,
        pretrained=None,
        aesthetic_model=str(models.aesthetic),
        nsfw_model=str(models.nsfw),
        batch_size=32,
        samples_per_shard=100,
        max_shards=3,
        scheduler_address=scheduler_address,
        n_workers=n_workers,
    )
    scored = _scored(_load(tars, config), config, aesthetic=True, nsfw=True)
    with _client(config) as client:
        # embeddings + scores become the shards' Parquet metadata
        scored.save_metadata(verbose=_show_progress())
        dataset = _load(tars, config)  # cheap reload: the scores are metadata now
        meta = dataset.metadata
        low, high = dask.compute(
            meta["aesthetic_score"].quantile(0.3), meta["nsfw_score"].quantile(0.9)
        )
        config.min_aesthetic, config.max_nsfw = float(low), float(high)
        dataset, column = _with_keep(dataset, config)
        with warnings.catch_warnings():  # the demo's own directory: removed below
            warnings.filterwarnings("ignore", "(?s).*shard files this export did not write")
            summary = _export(dataset, str(root / "curated"), config, column)
        cluster = describe(client)
    stale, summary.other_files = summary.other_files, []
    for path in stale:  # an earlier demo run's, with other options: not this dataset's
        os.remove(path)
    if stale:
        click.echo(
            f"removed {len(stale)} shard files of an earlier demo run from {root / 'curated'}"
        )
    click.echo(f"thresholds: aesthetic_score >= {low:.4f}, nsfw_score < {high:.4f}")
    _summary_table(summary, cluster, total=time.perf_counter() - started)

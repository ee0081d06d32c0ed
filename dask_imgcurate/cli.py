"""``dask-imgcurate``: index, inspect, embed, export, curate, demo."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import click

from dask_imgcurate.errors import CurateError

log = logging.getLogger("dask_imgcurate")

# Errors that are the user's input, not our bug: one line, exit 1.
_USER_ERRORS = (CurateError, FileNotFoundError, PermissionError, ValueError, KeyError, ImportError)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            click.echo(f"error: {message}", err=True)
            sys.exit(1)


def _storage_options(value: str | None) -> dict:
    if not value:
        return {}
    try:
        options = json.loads(value)
    except ValueError as err:
        raise click.BadParameter(f"not JSON: {err}") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object")
    return options


storage_option = click.option(
    "--storage-options", default=None, help="fsspec storage options as JSON (e.g. endpoint_url)."
)
cluster_options = [
    click.option("--scheduler-address", default=None, help="Connect to this Dask scheduler."),
    click.option(
        "--n-workers",
        type=int,
        default=None,
        help="Local worker processes (default: one per core; 0 = no cluster, threads).",
    ),
]


def with_cluster_options(f):
    for option in reversed(cluster_options):
        f = option(f)
    return f


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="dask_imgcurate")
def main(verbose: bool) -> None:
    """Curate image-text WebDataset shards: index, embed, score, filter, export."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.argument("path")
@storage_option
def index(path: str, storage_options: str | None) -> None:
    """Write a DALI .idx beside every .tar shard under PATH."""
    from tqdm import tqdm

    from dask_imgcurate.io import find_shards, write_dali_index
    from dask_imgcurate.io import fs as fsio

    options = _storage_options(storage_options)
    fs, root = fsio.url_to_fs(path, options)
    shards = find_shards(fs, root)
    if not shards:
        raise FileNotFoundError(f"no .tar shards found in {path}")
    for shard in tqdm(shards, desc="index", unit="shard", disable=None):
        write_dali_index(fsio.qualify(fs, shard.tar), storage_options=options)
    _table({"shards indexed": len(shards), "path": path})


@main.command()
@click.argument("path")
@storage_option
@click.option("--rows", default=5, help="Sample rows to show.")
@click.option("--lenient", is_flag=True, help="Report damaged shards instead of failing.")
def inspect(path: str, storage_options: str | None, rows: int, lenient: bool) -> None:
    """Shards, records, columns and sizes of the dataset at PATH."""
    import warnings

    import dask

    from dask_imgcurate import ImageTextPairDataset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageTextPairDataset.from_webdataset(
            path, storage_options=_storage_options(storage_options), strict=not lenient
        )
        frame = ds.metadata
        count, image_bytes, head = dask.compute(
            frame.shape[0],
            frame["_image_size"].clip(lower=0).sum(),
            frame.head(rows, npartitions=-1),
        )
    fs = ds.fs
    tar_bytes = sum(fs.size(s.tar) for s in ds.shards)
    summary = {
        "shards": len(ds.shards),
        "with parquet": sum(s.parquet is not None for s in ds.shards),
        "with .idx": sum(s.idx is not None for s in ds.shards),
        "records": int(count),
        "tar bytes": f"{tar_bytes / 1e6:.1f} MB",
        "image bytes": f"{int(image_bytes) / 1e6:.1f} MB",
    }
    if "error" in frame.columns:
        summary["records with errors"] = int(frame["error"].notna().sum().compute())
    damaged = [str(w.message) for w in caught if "byte offset" in str(w.message)]
    summary["damaged shards"] = len(damaged)
    _table(summary)
    click.echo("\ncolumns:")
    for name, dtype in frame.dtypes.items():
        click.echo(f"  {name:<24} {dtype}")
    for line in damaged:
        click.echo(f"damage: {line}")
    if rows:
        visible = [c for c in head.columns if not c.startswith("_")]
        click.echo("\n" + head[visible].to_string(max_colwidth=40))


@dataclass
class CurateConfig:
    """Every setting of ``curate`` (flags or a YAML file with these keys)."""

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    aesthetic_model: str | None = None
    nsfw_model: str | None = None
    allow_download: bool = False
    batch_size: int = 256
    num_threads: int = 4
    min_aesthetic: float | None = None
    max_nsfw: float | None = None
    query: str | None = None
    layout: str = "webdataset"
    samples_per_shard: int = 10000
    max_shards: int = 5
    images_per_tar: int = 1000
    scheduler_address: str | None = None
    n_workers: int | None = None
    storage_options: dict | None = None

    @classmethod
    def from_yaml(cls, path: str) -> CurateConfig:
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**data)


def _scored(dataset, config: CurateConfig):
    """The dataset with embeddings and the scores the config's thresholds need."""
    from dask_imgcurate.embed import ClipImageEmbedder
    from dask_imgcurate.models.clip import clip_embed_dim

    dim = clip_embed_dim(config.model) or 768
    classifiers = []
    if config.aesthetic_model or config.min_aesthetic is not None:
        from dask_imgcurate.models.classifiers import AestheticClassifier

        classifiers.append(
            AestheticClassifier(
                config.aesthetic_model, embedding_dim=dim, allow_download=config.allow_download
            )
        )
    if config.nsfw_model or config.max_nsfw is not None:
        from dask_imgcurate.models.classifiers import NsfwClassifier

        classifiers.append(
            NsfwClassifier(
                config.nsfw_model, embedding_dim=dim, allow_download=config.allow_download
            )
        )
    if (
        config.pretrained
        and os.path.sep in config.pretrained
        and not os.path.exists(config.pretrained)
    ):
        raise FileNotFoundError(f"CLIP weights not found: {config.pretrained}")
    embedder = ClipImageEmbedder(
        model_name=config.model,
        pretrained=config.pretrained,
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        classifiers=classifiers,
    )
    return embedder(dataset)


def _with_keep(dataset, config: CurateConfig):
    """Add the boolean ``keep`` column from the thresholds and query (None: keep all)."""
    meta = dataset.metadata
    keep = None
    needed = {"aesthetic_score": config.min_aesthetic, "nsfw_score": config.max_nsfw}
    for column, threshold in needed.items():
        if threshold is not None and column not in meta.columns:
            raise KeyError(f"no {column!r} column to filter on; run `dask-imgcurate embed` first")
    if config.min_aesthetic is not None:
        keep = meta["aesthetic_score"] >= config.min_aesthetic
    if config.max_nsfw is not None:
        verdict = meta["nsfw_score"] < config.max_nsfw
        keep = verdict if keep is None else keep & verdict
    if config.query:
        query = config.query
        verdict = meta.map_partitions(lambda df: df.eval(query).astype(bool), meta=("keep", bool))
        keep = verdict if keep is None else keep & verdict
    if keep is None:
        return dataset, None
    return dataset.with_metadata(meta.assign(keep=keep.fillna(False))), "keep"


def _export(dataset, output: str, config: CurateConfig, filter_column: str | None):
    options = dict(storage_options=config.storage_options or None, verbose=True)
    if config.layout == "images":
        return dataset.write_images(
            output, images_per_tar=config.images_per_tar, filter_column=filter_column, **options
        )
    if config.layout != "webdataset":
        raise ValueError(f"layout must be 'webdataset' or 'images', not {config.layout!r}")
    return dataset.to_webdataset(
        output,
        filter_column=filter_column,
        samples_per_shard=config.samples_per_shard,
        max_shards=config.max_shards,
        **options,
    )


def _load(path: str, config: CurateConfig):
    from dask_imgcurate import ImageTextPairDataset

    return ImageTextPairDataset.from_webdataset(path, storage_options=config.storage_options)


def _table(rows: dict) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        click.echo(f"{key:<{width}}  {value}")


def _summary_table(summary) -> None:
    _table(
        {
            "records in": summary.records_in,
            "records out": summary.records_out,
            "dropped by filter": summary.dropped_by_filter,
            "dropped for errors": summary.dropped_for_errors,
            "shards written": summary.shards_written,
            "shards already complete": summary.shards_skipped,
            "bytes written": f"{summary.bytes_written / 1e6:.1f} MB",
            "seconds": f"{summary.seconds:.1f}",
            "output": summary.path,
        }
    )


model_options = [
    click.option("--model", default="ViT-L-14", show_default=True, help="open_clip model name."),
    click.option(
        "--pretrained",
        default="openai",
        show_default=True,
        help="open_clip tag or local checkpoint; 'none' for random weights.",
    ),
    click.option("--aesthetic-model", default=None, help="Local aesthetic head weights."),
    click.option("--nsfw-model", default=None, help="Local NSFW head weights."),
    click.option("--allow-download", is_flag=True, help="Download missing classifier weights."),
    click.option("--batch-size", default=256, show_default=True),
]


def with_model_options(f):
    for option in reversed(model_options):
        f = option(f)
    return f


def _config(**kwargs) -> CurateConfig:
    if kwargs.get("pretrained") == "none":
        kwargs["pretrained"] = None
    if isinstance(kwargs.get("storage_options"), str) or kwargs.get("storage_options") is None:
        kwargs["storage_options"] = _storage_options(kwargs.get("storage_options"))
    known = {f.name for f in fields(CurateConfig)}
    return CurateConfig(**{k: v for k, v in kwargs.items() if k in known and v is not None})


@main.command()
@click.argument("path")
@click.option(
    "--output", default=None, help="Directory for the Parquet files (default: beside the tars)."
)
@with_model_options
@with_cluster_options
@storage_option
def embed(path: str, output: str | None, **kwargs) -> None:
    """Compute CLIP embeddings and scores; save them as the dataset's Parquet metadata."""
    from dask_imgcurate.cluster import dask_client

    config = _config(**kwargs)
    config.min_aesthetic = 0.0 if config.aesthetic_model or config.allow_download else None
    config.max_nsfw = 1.0 if config.nsfw_model or config.allow_download else None
    with dask_client(config.scheduler_address, config.n_workers):
        dataset = _scored(_load(path, config), config)
        written = dataset.save_metadata(output)
    _table({"parquet files written": len(written), "records": int(written["rows"].sum())})


@main.command()
@click.argument("path")
@click.argument("output")
@click.option("--layout", type=click.Choice(["webdataset", "images"]), default="webdataset")
@click.option("--samples-per-shard", default=10000, show_default=True)
@click.option("--max-shards", default=5, show_default=True)
@click.option("--images-per-tar", default=1000, show_default=True)
@click.option("--min-aesthetic", type=float, default=None, help="Keep aesthetic_score >= this.")
@click.option("--max-nsfw", type=float, default=None, help="Keep nsfw_score < this.")
@click.option("--query", default=None, help="A pandas query expression that rows must satisfy.")
@with_cluster_options
@storage_option
def export(path: str, output: str, **kwargs) -> None:
    """Export the records of PATH that pass the filters to OUTPUT (tar + Parquet shards)."""
    from dask_imgcurate.cluster import dask_client

    config = _config(**kwargs)
    with dask_client(config.scheduler_address, config.n_workers):
        dataset, column = _with_keep(_load(path, config), config)
        summary = _export(dataset, output, config, column)
    _summary_table(summary)


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.argument("output")
@click.option("--config", "config_path", default=None, help="YAML file of settings.")
@with_model_options
@click.option("--min-aesthetic", type=float, default=None)
@click.option("--max-nsfw", type=float, default=None)
@click.option("--query", default=None)
@click.option("--layout", type=click.Choice(["webdataset", "images"]), default=None)
@click.option("--samples-per-shard", type=int, default=None)
@with_cluster_options
@storage_option
def curate(input_path: str, output: str, config_path: str | None, **kwargs) -> None:
    """Embed, score, filter and export INPUT to OUTPUT in one pass."""
    config = CurateConfig.from_yaml(config_path) if config_path else CurateConfig()
    ctx = click.get_current_context()
    for key, value in _config(**kwargs).__dict__.items():
        source = ctx.get_parameter_source(key) if key in ctx.params else None
        if source is not None and source.name != "DEFAULT":
            setattr(config, key, value)
    summary = run_curate(input_path, output, config)
    _summary_table(summary)


def run_curate(input_path: str, output: str, config: CurateConfig):
    """Load, embed and score, filter, export (the ``curate`` command's work)."""
    from dask_imgcurate.cluster import dask_client

    with dask_client(config.scheduler_address, config.n_workers):
        dataset = _scored(_load(input_path, config), config)
        dataset, column = _with_keep(dataset, config)
        return _export(dataset, output, config, column)


@main.command()
@click.option("--dir", "directory", default="demo-output", show_default=True)
@click.option("--shards", default=4, show_default=True)
@click.option("--samples-per-shard", default=64, show_default=True)
@click.option("--n-workers", type=int, default=2, show_default=True)
def demo(directory: str, shards: int, samples_per_shard: int, n_workers: int) -> None:
    """Build the demo dataset and curate it end to end with a tiny built-in model.

    The steps are the documented workflow: embed and score, save_metadata, filter on the
    scores, export. Random weights give arbitrary score scales, so the demo's thresholds
    are score quantiles (keep the top 70 % aesthetic, drop the top 10 % NSFW).
    """
    import dask

    from dask_imgcurate import ImageTextPairDataset
    from dask_imgcurate.cluster import dask_client
    from dask_imgcurate.demo import make_demo_dataset
    from dask_imgcurate.models.builtin import make_demo_models

    root = Path(directory)
    source = root / "input"
    make_demo_dataset(source, n_shards=shards, samples_per_shard=samples_per_shard)
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
    )
    with dask_client(None, n_workers):
        scored = _scored(ImageTextPairDataset.from_webdataset(str(source)), config)
        scored.save_metadata()  # embeddings + scores become the shards' Parquet metadata
        dataset = ImageTextPairDataset.from_webdataset(str(source))
        meta = dataset.metadata
        low, high = dask.compute(
            meta["aesthetic_score"].quantile(0.3), meta["nsfw_score"].quantile(0.9)
        )
        config.min_aesthetic, config.max_nsfw = float(low), float(high)
        dataset, column = _with_keep(dataset, config)
        summary = _export(dataset, str(root / "curated"), config, column)
    click.echo(f"thresholds: aesthetic_score >= {low:.4f}, nsfw_score < {high:.4f}")
    _summary_table(summary)


if __name__ == "__main__":  # pragma: no cover
    main()

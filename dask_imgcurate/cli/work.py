"""The work of the commands: load, check models, embed and score, filter, export."""

from __future__ import annotations

import os
import warnings

from dask_imgcurate.cli.config import CurateConfig
from dask_imgcurate.cli.output import _one_line, _show_progress, _verbose
from dask_imgcurate.cluster import cluster_kind, describe
from dask_imgcurate.errors import CurateError


def _check_output(path: str, output: str) -> None:
    """Refuse to export into the input's own directory (it would replace shards being read)."""
    if "://" in path or "://" in output or any(ch in path for ch in "*?["):
        same = path.rstrip("/") == output.rstrip("/")
    else:
        source = os.path.realpath(path)
        source = os.path.dirname(source) if source.endswith(".tar") else source
        same = source == os.path.realpath(output)
    if same:
        raise ValueError(f"OUTPUT must be another directory than the input: {output}")


def _load(path: str | list[str], config: CurateConfig, *, strict: bool | None = None):
    from dask_imgcurate import ImageTextPairDataset

    strict = not config.lenient if strict is None else strict
    return ImageTextPairDataset.from_webdataset(
        path,
        storage_options=config.storage_options or None,
        strict=strict,
        on_mismatch=config.on_mismatch,
    )


def _clip_dim(config: CurateConfig, *, fetch: bool) -> int:
    """Check the CLIP model and its weights before any work; return its embedding size.

    A pretrained tag's weights are fetched here once (``fetch``) so that local workers find
    them in the cache instead of each downloading them.
    """
    import open_clip

    from dask_imgcurate.models.builtin import register_builtin_configs
    from dask_imgcurate.models.clip import clip_embed_dim

    register_builtin_configs()
    model, pretrained = config.model, config.pretrained
    schema = model.startswith(("hf-hub:", "local-dir:"))
    dim = clip_embed_dim(model)
    if dim is None and not schema:
        raise ValueError(
            f"unknown open_clip model {model!r} (--model); open_clip.list_models() lists them"
        )
    # pretrained=None (random weights): _scored says so once everything else is checked
    if pretrained is not None and not schema and not os.path.isfile(pretrained):
        name = model.replace("/", "-")
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise FileNotFoundError(
                f"CLIP weights not found: {pretrained!r} is neither a file nor a pretrained tag "
                f"of {model} (tags: {tags}; 'none' for random weights)"
            )
        if fetch:
            try:
                open_clip.download_pretrained(cfg)
            except Exception as err:  # noqa: BLE001 - any failure means: no weights
                raise CurateError(
                    f"cannot get CLIP weights {model}/{pretrained}: {_one_line(err)} (offline? "
                    f"pass --pretrained PATH to a local checkpoint)"
                ) from None
    return dim or 768


def _head_class(kind: str):
    from dask_imgcurate.models import classifiers

    return classifiers.AestheticClassifier if kind == "aesthetic" else classifiers.NsfwClassifier


def _check_head_file(kind: str, config: CurateConfig) -> None:
    """Raise naming the flag when the head's weights are neither given, cached nor allowed
    to be downloaded, or the given file does not exist."""
    from dask_imgcurate.models import classifiers

    cls = _head_class(kind)
    path = getattr(config, f"{kind}_model")
    flag = f"--{kind}-model"
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} model weights not found: {path} ({flag})")
    cached = os.path.join(classifiers.cache_dir(), cls.filename)
    if path is None and not config.allow_download and not os.path.isfile(cached):
        raise FileNotFoundError(
            f"no {kind} model weights: pass {flag} PATH (a torch state dict) or "
            f"--allow-download (fetches {cls.url} into {classifiers.cache_dir()})"
        )


def _head(kind: str, config: CurateConfig, dim: int):
    """The aesthetic or NSFW head, its weights loaded once here (or fetched) as a check."""
    from dask_imgcurate.models import classifiers

    _check_head_file(kind, config)
    cls = _head_class(kind)
    path = getattr(config, f"{kind}_model")
    cached = os.path.join(classifiers.cache_dir(), cls.filename)
    head = cls(path, embedding_dim=dim, allow_download=config.allow_download)
    try:
        head.load_weights(head.weights_path())  # downloads once, here, when allowed and missing
    except ValueError as err:
        raise ValueError(f"{kind} model: {_one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - unreadable, wrong layout, failed download
        raise CurateError(
            f"cannot load {kind} model weights {path or cached}: {_one_line(err)}"
        ) from None
    return head


def _scored(dataset, config: CurateConfig, *, aesthetic: bool, nsfw: bool, fetch: bool = True):
    """The dataset with embeddings and the asked-for scores (lazy); checks weights first."""
    from dask_imgcurate.embed import ClipImageEmbedder

    wanted = [kind for kind, on in (("aesthetic", aesthetic), ("nsfw", nsfw)) if on]
    for kind in wanted:  # the cheapest checks first
        _check_head_file(kind, config)
    dim = _clip_dim(config, fetch=fetch)
    heads = [_head(kind, config, dim) for kind in wanted]
    if config.pretrained is None:
        from dask_imgcurate.models.clip import RandomWeightsWarning

        warnings.warn(
            f"{config.model} runs with random weights (pretrained: none): its embeddings and "
            f"scores are meaningless",
            RandomWeightsWarning,
            stacklevel=2,
        )
    embedder = ClipImageEmbedder(
        model_name=config.model,
        pretrained=config.pretrained,
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        classifiers=heads,
    )
    return embedder(dataset)


def _needs(config: CurateConfig, column: str) -> bool:
    """Whether ``curate``'s filters read ``column``."""
    threshold = config.min_aesthetic if column == "aesthetic_score" else config.max_nsfw
    return threshold is not None or column in (config.query or "")


def _head_available(kind: str, config: CurateConfig) -> bool:
    """Whether ``embed`` can run a head: weights given, cached, or downloadable."""
    from dask_imgcurate.models import classifiers

    if getattr(config, f"{kind}_model") is not None or config.allow_download:
        return True
    cls = classifiers.AestheticClassifier if kind == "aesthetic" else classifiers.NsfwClassifier
    return os.path.isfile(os.path.join(classifiers.cache_dir(), cls.filename))


def _with_keep(dataset, config: CurateConfig):
    """Add the boolean ``_keep`` column from the thresholds and query (None: keep all).

    Everything is checked against the frame's columns now, before any work.
    """
    meta = dataset.metadata
    for column, flag, threshold in (
        ("aesthetic_score", "--min-aesthetic", config.min_aesthetic),
        ("nsfw_score", "--max-nsfw", config.max_nsfw),
    ):
        if threshold is not None and threshold != threshold:  # NaN: every comparison False
            raise ValueError(f"{flag} must be a number, not {threshold}")
        if threshold is not None and column not in meta.columns:
            raise KeyError(
                f"{flag}: the metadata has no {column!r} column; run `dask-imgcurate embed` "
                f"with the {column.split('_')[0]} model first"
            )
    keep = None
    if config.min_aesthetic is not None:
        keep = meta["aesthetic_score"] >= config.min_aesthetic
    if config.max_nsfw is not None:
        verdict = meta["nsfw_score"] < config.max_nsfw
        keep = verdict if keep is None else keep & verdict
    if config.query:
        from pandas.api.types import is_bool_dtype

        from dask_imgcurate.backend import to_pandas

        query = config.query
        try:
            result = to_pandas(meta._meta).eval(query)  # pandas' eval, on either backend
        except Exception as err:  # noqa: BLE001 - pandas raises many kinds
            raise ValueError(f"bad query {query!r}: {_one_line(err)}") from None
        if getattr(result, "ndim", 0) != 1 or not is_bool_dtype(result.dtype):
            raise ValueError(
                f"bad query {query!r}: it must give one true/false value per row (a "
                f"condition such as 'width >= 256'), not {getattr(result, 'dtype', 'a scalar')}"
            )
        verdict = meta.map_partitions(_eval_query, query, meta=("keep", bool))
        keep = verdict if keep is None else keep & verdict
    if keep is None:
        return dataset, None
    from dask_imgcurate.metadata import KEEP_COLUMN  # bookkeeping: not written to Parquet

    keep = keep.fillna(False).astype(bool)
    return dataset.with_metadata(meta.assign(**{KEEP_COLUMN: keep})), KEEP_COLUMN


def _eval_query(frame, query: str):
    """The query's verdict on a partition, by pandas' eval (cudf's takes numbers only)."""
    import pandas as pd

    from dask_imgcurate.backend import to_pandas

    try:
        verdict = to_pandas(frame).eval(query).fillna(False).astype(bool)
        if isinstance(frame, pd.DataFrame):
            return verdict
        import cudf

        return cudf.from_pandas(verdict)
    except Exception as err:  # checked on the empty frame; the data can still fail it
        shard = frame["_shard"].iloc[0] if len(frame) and "_shard" in frame else "a partition"
        raise ValueError(f"--query {query!r} failed on {shard}: {_one_line(err)}") from None


def _export(dataset, output: str, config: CurateConfig, filter_column: str | None):
    options = dict(storage_options=config.storage_options or None, verbose=_show_progress())
    if config.layout == "images":  # (progress bars go to stderr: stdout is the summary's)
        return dataset.write_images(
            output, images_per_tar=config.images_per_tar, filter_column=filter_column, **options
        )
    return dataset.to_webdataset(
        output,
        filter_column=filter_column,
        samples_per_shard=config.samples_per_shard,
        max_shards=config.max_shards,
        **options,
    )


def _client(config: CurateConfig):
    from dask_imgcurate.cluster import dask_client

    return dask_client(config.scheduler_address, config.n_workers, quiet=not _verbose())


def run_curate(input_path: str, output: str, config: CurateConfig):
    """Load, embed and score, filter, export (the ``curate`` command's work).

    Returns ``(ExportSummary, cluster description)``.
    """
    dataset = _load(input_path, config)
    aesthetic = _needs(config, "aesthetic_score") or config.aesthetic_model is not None
    nsfw = _needs(config, "nsfw_score") or config.nsfw_model is not None
    fetch = cluster_kind(config.scheduler_address, config.n_workers) != "existing"
    scored = _scored(dataset, config, aesthetic=aesthetic, nsfw=nsfw, fetch=fetch)
    scored, column = _with_keep(scored, config)
    with _client(config) as client:
        summary = _export(scored, output, config, column)
        return summary, describe(client)

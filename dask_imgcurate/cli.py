"""``dask-imgcurate``: index, inspect, embed, export, curate, demo.

Every command prints a summary table on stdout and exits 0 on success. Bad input (a path
that does not exist, no shards, a bad config, missing weights, a corrupt shard) prints one
line ``error: ...`` on stderr, writes nothing and exits 1 (``-v`` shows the traceback
instead). Ctrl-C exits 130 and SIGTERM 143; an interrupted export is finished by running
the same command again. Progress bars go to stderr when it is a terminal (or with ``-v``).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import signal
import sys
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import click
from click.core import ParameterSource

from dask_imgcurate.cluster import cluster_kind, default_n_workers, describe, quiet_third_party
from dask_imgcurate.errors import CurateError

log = logging.getLogger("dask_imgcurate")

# Errors that are the user's input (or environment), not our bug: one line, exit 1.
_USER_ERRORS = (CurateError, OSError, ValueError, KeyError, TypeError, ImportError)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


_RESUME = "every file under its final name is complete; run the same command again to finish"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that clusters and files are closed cleanly."""


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(message).split()) or type(err).__name__


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _on_sigterm(signum, frame):
    raise _Terminated()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {' '.join(str(message).split())}\n"


class _Group(click.Group):
    """Turns user errors into one line on stderr, and interrupts into exit codes."""

    def invoke(self, ctx):
        verbose = bool(ctx.params.get("verbose"))
        format_warning = warnings.formatwarning
        warnings.formatwarning = _one_line_warning
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            with warnings.catch_warnings():
                return super().invoke(ctx)
        except _Terminated:
            _fail(f"terminated: {_RESUME}", EXIT_TERMINATED)
        except KeyboardInterrupt:
            _fail(f"interrupted: {_RESUME}", EXIT_INTERRUPTED)
        except BrokenPipeError:  # stdout closed early (`| head`): nothing worth saying
            with contextlib.suppress(Exception):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_ERROR)
        except _USER_ERRORS as err:
            if verbose:
                raise
            _fail(f"error: {_one_line(err)}", EXIT_ERROR)
        except Exception as err:
            if verbose or type(err).__name__ != "KilledWorker":
                raise
            _fail(f"error: {_one_line(err)} (out of memory? see -v)", EXIT_ERROR)
        finally:
            warnings.formatwarning = format_warning
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


class _StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is at the time."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: bool) -> Callable[[], None]:
    """Our log lines on stderr (INFO with ``verbose``, else WARNING), third parties quiet;
    returns a function restoring the previous state (for in-process use, e.g. tests)."""
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    previous = root.level
    handler = _StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    undo_quiet = quiet_third_party(verbose)

    def restore() -> None:
        undo_quiet()
        root.removeHandler(handler)
        root.setLevel(previous)

    return restore


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


def _show_progress() -> bool:
    """Progress bars (on stderr): with ``-v``, or when stderr is a terminal."""
    return _verbose() or sys.stderr.isatty()


# ------------------------------------------------------------------ settings


@dataclass
class CurateConfig:
    """Every setting of ``curate`` (flags, or a YAML file with these keys)."""

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
        """Settings from a YAML mapping of these keys; unknown keys and wrong types raise."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"config file is a directory: {path}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {_one_line(err)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"
                raise ValueError(f"{path}: unknown key {key!r}{hint}")
        config = cls()
        for key, value in data.items():
            setattr(config, key, _typed(key, value, path))
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError naming the setting when a value is out of range."""
        if self.layout not in ("webdataset", "images"):
            raise ValueError(f"layout must be 'webdataset' or 'images', not {self.layout!r}")
        for name in ("batch_size", "num_threads", "samples_per_shard", "max_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images_per_tar < 1:
            raise ValueError(f"images_per_tar must be >= 1, got {self.images_per_tar}")
        if self.n_workers is not None and self.n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {self.n_workers}")
        if self.pretrained is not None and self.pretrained.lower() in ("none", ""):
            self.pretrained = None


_DEFAULTS = CurateConfig()
_FIELDS = {f.name: str(f.type) for f in fields(CurateConfig)}


def _typed(key: str, value, source: str):
    """``value`` checked against the type of setting ``key`` (from YAML)."""
    kinds = _FIELDS[key].split(" | ")
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{source}: {key} must not be empty")
    kind = kinds[0]
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "dict" and isinstance(value, dict):
        return value
    names = {"bool": "true or false", "int": "an integer", "float": "a number"}
    names.update(str="a string", dict="a mapping")
    raise ValueError(f"{source}: {key} must be {names[kind]}, not {value!r}")


def _storage_options(value: str | dict | None) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        options = json.loads(value)
    except ValueError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--storage-options") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return options


def _settings(ctx: click.Context, config_path: str | None = None) -> CurateConfig:
    """The YAML file's settings (or the defaults), overridden by the flags given."""
    config = CurateConfig.from_yaml(config_path) if config_path else CurateConfig()
    for name, value in ctx.params.items():
        if name not in _FIELDS:
            continue
        if ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            continue  # not given: the YAML value (or the default) stands
        if name == "storage_options":
            value = _storage_options(value)
        setattr(config, name, value)
    config.check()
    return config


# ------------------------------------------------------------------ options


def _options(*decorators):
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


storage_option = click.option(
    "--storage-options",
    default=None,
    help='fsspec storage options as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\'.',
)

with_cluster_options = _options(
    click.option(
        "--scheduler-address",
        default=None,
        help="Use the running Dask cluster at this address (tcp://host:8786).",
    ),
    click.option(
        "--n-workers",
        type=click.IntRange(min=0),
        default=None,
        help=f"Worker processes of the local cluster [default: {default_n_workers()}]; "
        "0: no cluster, threads in this process.",
    ),
)

with_model_options = _options(
    click.option("--model", default=_DEFAULTS.model, show_default=True, help="open_clip model."),
    click.option(
        "--pretrained",
        default=_DEFAULTS.pretrained,
        show_default=True,
        help="open_clip pretrained tag or local checkpoint; 'none' for random weights.",
    ),
    click.option("--aesthetic-model", default=None, help="Aesthetic head weights (torch file)."),
    click.option("--nsfw-model", default=None, help="NSFW head weights (torch file)."),
    click.option(
        "--allow-download",
        is_flag=True,
        help="Download missing aesthetic / NSFW head weights into the cache.",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=_DEFAULTS.batch_size,
        show_default=True,
        help="Images per model batch.",
    ),
    click.option(
        "--num-threads",
        type=click.IntRange(min=1),
        default=_DEFAULTS.num_threads,
        show_default=True,
        help="DALI decoder threads per worker.",
    ),
)

with_filter_options = _options(
    click.option("--min-aesthetic", type=float, default=None, help="Keep aesthetic_score >= this."),
    click.option("--max-nsfw", type=float, default=None, help="Keep nsfw_score < this."),
    click.option(
        "--query",
        default=None,
        help="Keep rows where this pandas expression is true, e.g. 'width >= 256'.",
    ),
)

with_layout_options = _options(
    click.option(
        "--layout",
        type=click.Choice(["webdataset", "images"]),
        default=_DEFAULTS.layout,
        show_default=True,
        help="webdataset: renumbered NNNNN.tar shards; images: ImageWriter layout, ids kept.",
    ),
    click.option(
        "--samples-per-shard",
        type=click.IntRange(min=1),
        default=_DEFAULTS.samples_per_shard,
        show_default=True,
        help="Records per output shard (webdataset layout).",
    ),
    click.option(
        "--max-shards",
        type=click.IntRange(min=1),
        default=_DEFAULTS.max_shards,
        show_default=True,
        help="Digits of output shard numbers (webdataset layout).",
    ),
    click.option(
        "--images-per-tar",
        type=click.IntRange(min=1),
        default=_DEFAULTS.images_per_tar,
        show_default=True,
        help="Records per output tar (images layout).",
    ),
)


# ------------------------------------------------------------------ the work


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


def _load(path: str, config: CurateConfig, *, strict: bool = True):
    from dask_imgcurate import ImageTextPairDataset

    return ImageTextPairDataset.from_webdataset(
        path, storage_options=config.storage_options or None, strict=strict
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
    import torch

    from dask_imgcurate.models import classifiers

    _check_head_file(kind, config)
    cls = _head_class(kind)
    path = getattr(config, f"{kind}_model")
    cached = os.path.join(classifiers.cache_dir(), cls.filename)
    head = cls(path, embedding_dim=dim, allow_download=config.allow_download)
    try:
        weights = head.weights_path()  # downloads once, here, when allowed and missing
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        head._check_weights(state, weights)
        head.build().load_state_dict(state)
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
        query = config.query
        try:
            result = meta._meta.eval(query)
        except Exception as err:  # noqa: BLE001 - pandas raises many kinds
            raise ValueError(f"bad query {query!r}: {_one_line(err)}") from None
        if getattr(result, "ndim", 0) != 1:
            raise ValueError(f"bad query {query!r}: it must give one true/false value per row")
        verdict = meta.map_partitions(_eval_query, query, meta=("keep", bool))
        keep = verdict if keep is None else keep & verdict
    if keep is None:
        return dataset, None
    # "_keep": a bookkeeping name, so the column is not written to the output's Parquet
    return dataset.with_metadata(meta.assign(_keep=keep.fillna(False).astype(bool))), "_keep"


def _eval_query(frame, query: str):
    return frame.eval(query).fillna(False).astype(bool)


def _export(dataset, output: str, config: CurateConfig, filter_column: str | None):
    progress = _show_progress()
    # the export's own progress bar writes to stdout: keep stdout for the summary table
    with contextlib.redirect_stdout(sys.stderr) if progress else contextlib.nullcontext():
        options = dict(storage_options=config.storage_options or None, verbose=progress)
        if config.layout == "images":
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


# Progress of the embed stage: each partition reports its row count when done, through
# distributed's events on a cluster, or a callback in this process without one.
_LOCAL_TICKS: dict = {}


def _tick(frame, topic: str):
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    if worker is not None:
        worker.log_event(topic, len(frame))
    elif topic in _LOCAL_TICKS:
        _LOCAL_TICKS[topic](len(frame))
    return frame


class _Progress:
    """A progress bar over the partitions of a lazy stage (disabled: does nothing)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.topic = f"dask-imgcurate-{label}-{uuid.uuid4().hex}"
        self.bar = None
        self.records = 0

    def wrap(self, dataset):
        if not self.enabled:
            return dataset
        meta = dataset.metadata
        from tqdm import tqdm

        self.bar = tqdm(total=meta.npartitions, desc=self.label, unit="shard", file=sys.stderr)
        _LOCAL_TICKS[self.topic] = self._update
        return dataset.with_metadata(meta.map_partitions(_tick, self.topic, meta=meta._meta))

    def _update(self, rows: int) -> None:
        self.records += rows
        self.bar.set_postfix(records=self.records, refresh=False)
        self.bar.update(1)

    @contextlib.contextmanager
    def attached(self, client):
        if self.bar is not None and client is not None:
            client.subscribe_topic(self.topic, lambda event: self._update(event[1]))
        try:
            yield
        finally:
            _LOCAL_TICKS.pop(self.topic, None)
            if self.bar is not None:
                if client is not None:
                    client.unsubscribe_topic(self.topic)
                self.bar.close()


def _table(rows: dict) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        click.echo(f"{key:<{width}}  {value}")


def _summary_table(summary, cluster: str | None = None) -> None:
    rows = {
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
    if cluster is not None:
        rows["cluster"] = cluster
    _table(rows)


# ------------------------------------------------------------------ commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details, show tracebacks.")
@click.version_option(package_name="dask_imgcurate")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Curate image-text WebDataset shards: index, embed, score, filter, export."""
    ctx.call_on_close(_setup_logging(verbose))


@main.command()
@click.argument("path")
@storage_option
def index(path: str, storage_options: str | None) -> None:
    """Write a DALI .idx beside every .tar shard of PATH (a directory, glob or tar)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from dask_imgcurate.io import find_shards, write_dali_index
    from dask_imgcurate.io import fs as fsio

    options = _storage_options(storage_options)
    fs, _ = fsio.url_to_fs(path, options)
    shards = find_shards(fs, path)
    if not shards:
        raise FileNotFoundError(f"no .tar shards found in {path}")

    def one(shard):
        return write_dali_index(fsio.qualify(fs, shard.tar), storage_options=options)

    with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
        written = list(
            tqdm(
                pool.map(one, shards),
                total=len(shards),
                desc="index",
                unit="shard",
                file=sys.stderr,
                disable=not _show_progress(),
            )
        )
    _table({"shards indexed": len(written), "first": written[0], "last": written[-1]})


@main.command()
@click.argument("path")
@storage_option
@click.option("--rows", default=5, show_default=True, help="Sample rows to show.")
@click.option("--lenient", is_flag=True, help="Report damaged shards instead of failing.")
def inspect(path: str, storage_options: str | None, rows: int, lenient: bool) -> None:
    """Shards, records, columns, sizes and damage of the dataset at PATH."""
    import dask

    options = _storage_options(storage_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _load(path, CurateConfig(storage_options=options), strict=not lenient)
        frame = ds.metadata
        tasks = {
            "per_shard": frame.map_partitions(len),
            "image_bytes": frame["_image_size"].clip(lower=0).sum(),
            "no_image": (frame["_image_size"] < 0).sum(),
            "head": frame.head(rows, npartitions=-1, compute=False),
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
    damaged = list(dict.fromkeys(str(w.message) for w in caught if "byte offset" in str(w.message)))
    other = [w for w in caught if "byte offset" not in str(w.message)]
    for w in other:  # not the damage reports: show them as usual
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
    summary["damaged shards"] = len(damaged)
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
    head = result["head"]
    if rows and len(head):
        visible = [c for c in head.columns if not c.startswith("_")]
        click.echo("\n" + head[visible].to_string(max_colwidth=40))


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@main.command()
@click.argument("path")
@click.option(
    "--output", default=None, help="Directory for the Parquet files [default: beside the tars]."
)
@with_model_options
@with_cluster_options
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
    dataset = _load(path, config)
    aesthetic, nsfw = _head_available("aesthetic", config), _head_available("nsfw", config)
    fetch = cluster_kind(config.scheduler_address, config.n_workers) != "existing"
    progress = _Progress("embed", _show_progress())
    scored = progress.wrap(_scored(dataset, config, aesthetic=aesthetic, nsfw=nsfw, fetch=fetch))
    with _client(config) as client, progress.attached(client):
        written = scored.save_metadata(output)
        cluster = describe(client)
    columns = ["image_embedding"] + [
        c for c, on in (("aesthetic_score", aesthetic), ("nsfw_score", nsfw)) if on
    ]
    _table(
        {
            "parquet files written": len(written),
            "records": int(written["rows"].sum()),
            "columns added": ", ".join(columns + ["error"]),
            "output": os.path.dirname(written["path"].iloc[0]) if len(written) else output,
            "cluster": cluster,
        }
    )


@main.command()
@click.argument("path")
@click.argument("output")
@with_layout_options
@with_filter_options
@with_cluster_options
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


def run_curate(input_path: str, output: str, config: CurateConfig):
    """Load, embed and score, filter, export (the ``curate`` command's work).

    Returns ``(ExportSummary, cluster description)``.
    """
    dataset = _load(input_path, config)
    aesthetic = _needs(config, "aesthetic_score") or config.aesthetic_model is not None
    nsfw = _needs(config, "nsfw_score") or config.nsfw_model is not None
    fetch = cluster_kind(config.scheduler_address, config.n_workers) != "existing"
    progress = _Progress("embed", _show_progress())
    scored = progress.wrap(_scored(dataset, config, aesthetic=aesthetic, nsfw=nsfw, fetch=fetch))
    scored, column = _with_keep(scored, config)
    with _client(config) as client, progress.attached(client):
        summary = _export(scored, output, config, column)
        return summary, describe(client)


@main.command()
@click.option("--dir", "directory", default="demo-output", show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=64, show_default=True)
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
    are score quantiles (keep the top 70 % aesthetic, drop the top 10 % NSFW).
    """
    import dask

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
        scheduler_address=scheduler_address,
        n_workers=n_workers,
    )
    scored = _scored(_load(str(source), config), config, aesthetic=True, nsfw=True)
    progress = _Progress("embed", _show_progress())
    scored = progress.wrap(scored)
    with _client(config) as client:
        with progress.attached(client):
            scored.save_metadata()  # embeddings + scores become the shards' Parquet metadata
        dataset = _load(str(source), config)  # cheap reload: the scores are metadata now
        meta = dataset.metadata
        low, high = dask.compute(
            meta["aesthetic_score"].quantile(0.3), meta["nsfw_score"].quantile(0.9)
        )
        config.min_aesthetic, config.max_nsfw = float(low), float(high)
        dataset, column = _with_keep(dataset, config)
        summary = _export(dataset, str(root / "curated"), config, column)
        cluster = describe(client)
    click.echo(f"thresholds: aesthetic_score >= {low:.4f}, nsfw_score < {high:.4f}")
    _summary_table(summary, cluster)


if __name__ == "__main__":  # pragma: no cover
    main()

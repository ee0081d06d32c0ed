"""The NeMo Curator-style stage API, as thin adapters over ``ImageTextPairDataset``.

Stages do not run anything themselves: each turns the pipeline's state into a lazier state
(a dataset whose metadata has more columns), and only ``ImageWriterStage`` computes. Filters
do not drop rows: they AND their verdict into the boolean ``keep`` column, which the writer
exports. The verdict is this pipeline's own: a ``keep`` column loaded with the metadata (an
earlier run's, saved by ``save_metadata``) is replaced by the first filter and, with no
filter stage, not applied (both with a warning). A record failing a threshold is dropped there and counted in the summary's
``dropped_by_filter``; a record whose image could not be read or decoded (``error`` set, no
score) is left to the writer, which drops it and counts it in ``dropped_for_errors``.

GPU share: ``ImageReaderStage(num_gpus_per_worker=g)`` becomes a Dask *resource* request.
When the writer computes on a ``distributed`` client whose workers advertise a ``GPU``
resource (``LocalCUDACluster(resources={"GPU": 1})``, ``dask worker --resources GPU=1``),
every task that runs the CLIP model or a score head is annotated with
``resources={"GPU": g}``, so a worker with ``GPU=1`` runs at most ``1 / g`` of them at once
and workers without a GPU never get one. On local schedulers and clusters without a ``GPU``
resource nothing is annotated (such tasks could never be scheduled there).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask

from dask_imgcurate.backend import column_names
from dask_imgcurate.dataset import ImageTextPairDataset
from dask_imgcurate.device import GPU_RESOURCE, worker_resources
from dask_imgcurate.export import ExportSummary

KEEP_COLUMN = "keep"
ERROR_COLUMN = "error"
DEFAULT_GPUS_PER_WORKER = 0.25
"""GPU share of one embedding task when no ``ImageReaderStage`` says otherwise."""


@dataclass
class PipelineState:
    """What flows between stages."""

    dataset: ImageTextPairDataset | None = None
    reader: dict[str, Any] = field(default_factory=dict)
    embedding: dict[str, Any] = field(default_factory=dict)
    gpu_share: float = 0.0
    filtered: bool = False  # a filter stage has set ``keep``
    summary: ExportSummary | None = None


class Stage:
    """A pipeline step: ``apply(state) -> state``."""

    name = "stage"

    def apply(self, state: PipelineState) -> PipelineState:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_options(stage: str, target, options: dict, exclude: tuple[str, ...] = ()) -> None:
    """Refuse keyword ``options`` that ``target`` (a class) does not take, when the stage is
    built rather than when the pipeline runs."""
    parameters = inspect.signature(target).parameters
    accepted = {n for n, p in parameters.items() if p.kind is not p.VAR_POSITIONAL} - set(exclude)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"{stage}: unknown option(s) {unknown} (passed on to {target.__name__}, which takes "
            f"{sorted(accepted)})"
        )


def _require_dataset(state: PipelineState, stage: Stage) -> ImageTextPairDataset:
    if state.dataset is None:
        raise ValueError(f"{type(stage).__name__} needs a FilePartitioningStage before it")
    return state.dataset


class FilePartitioningStage(Stage):
    """Find the input shards: one partition per ``files_per_partition`` tar files.

    ``strict``, ``on_mismatch`` and ``backend`` go to ``ImageTextPairDataset.from_webdataset``
    (damaged shards, sidecars that disagree with their tars, pandas or cudf)."""

    def __init__(
        self,
        file_paths: str | Sequence[str],
        files_per_partition: int = 1,
        file_extensions: Sequence[str] = (".tar",),
        storage_options: dict | None = None,
        id_col: str = "key",
        *,
        strict: bool = True,
        on_mismatch: str = "raise",
        backend: str = "auto",
    ):
        unsupported = [e for e in file_extensions if e.lower() != ".tar"]
        if unsupported:
            raise ValueError(f"only .tar shards are supported, not {unsupported}")
        if files_per_partition < 1:
            raise ValueError(f"files_per_partition must be >= 1, got {files_per_partition}")
        self.file_paths = file_paths
        self.files_per_partition = files_per_partition
        self.file_extensions = list(file_extensions)
        self.storage_options = storage_options
        self.id_col = id_col
        self.strict, self.on_mismatch, self.backend = strict, on_mismatch, backend

    def apply(self, state: PipelineState) -> PipelineState:
        state.dataset = ImageTextPairDataset.from_webdataset(
            self.file_paths,
            id_col=self.id_col,
            storage_options=self.storage_options,
            files_per_partition=self.files_per_partition,
            backend=self.backend,
            strict=self.strict,
            on_mismatch=self.on_mismatch,
        )
        return state


class ImageReaderStage(Stage):
    """Image decoding options (DALI), used by the embedding stage that decodes the images.

    ``task_batch_size`` is the decode (and model) batch size, ``num_threads`` DALI's CPU
    threads, and ``num_gpus_per_worker`` the GPU share each embedding task asks of Dask
    workers that advertise a ``GPU`` resource (not requested on clusters without one).
    """

    def __init__(
        self,
        task_batch_size: int = 100,
        verbose: bool = True,
        num_threads: int = 8,
        num_gpus_per_worker: float = DEFAULT_GPUS_PER_WORKER,
    ):
        if task_batch_size < 1:
            raise ValueError(f"task_batch_size must be >= 1, got {task_batch_size}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        worker_resources(num_gpus_per_worker)  # validates the share
        self.task_batch_size = task_batch_size
        self.verbose = verbose
        self.num_threads = num_threads
        self.num_gpus_per_worker = num_gpus_per_worker

    def apply(self, state: PipelineState) -> PipelineState:
        _require_dataset(state, self)
        state.reader = dict(
            batch_size=self.task_batch_size,
            num_threads=self.num_threads,
            num_gpus_per_worker=float(self.num_gpus_per_worker),
            verbose=self.verbose,
        )
        return state


class ImageEmbeddingStage(Stage):
    """CLIP image embeddings (column ``image_embedding``) via ``ClipImageEmbedder``.

    ``pretrained``: an open_clip tag (weights downloaded by open_clip on first use), a local
    checkpoint path, or ``None`` for random weights (meaningless embeddings; for tests and
    demos). ``batch_size`` defaults to the reader stage's ``task_batch_size``; other keyword
    arguments go to ``ClipImageEmbedder`` (e.g. ``classifiers=``, ``precision=``).
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        batch_size: int | None = None,
        device: str = "auto",
        **embedder_options: Any,
    ):
        from dask_imgcurate.embed import ClipImageEmbedder

        own = ("model_name", "pretrained", "batch_size", "device")
        _check_options(type(self).__name__, ClipImageEmbedder, embedder_options, own)
        self.model_name = model_name
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.device = device
        self.embedder_options = embedder_options

    def apply(self, state: PipelineState) -> PipelineState:
        from dask_imgcurate.embed import ClipImageEmbedder
        from dask_imgcurate.models.clip import clip_embed_dim

        dataset = _require_dataset(state, self)
        reader = state.reader
        options = {"num_threads": reader.get("num_threads", 4), **self.embedder_options}
        embedder = ClipImageEmbedder(
            model_name=self.model_name,
            pretrained=self.pretrained,
            batch_size=reader.get("batch_size", 256)
            if self.batch_size is None
            else self.batch_size,
            device=self.device,
            **options,
        )
        state.dataset = embedder(dataset)
        state.embedding = dict(
            model_name=self.model_name,
            embedding_dim=clip_embed_dim(self.model_name),
            column=embedder.embedding_column,
            device=self.device,
            scores=[c.output_column for c in embedder.classifiers],  # computed with it
        )
        on_cpu = str(self.device).strip().lower() == "cpu"
        state.gpu_share = (
            0.0 if on_cpu else reader.get("num_gpus_per_worker", DEFAULT_GPUS_PER_WORKER)
        )
        return state


class _ScoreFilterStage(Stage):
    column = ""  # the score column (the classifier's ``output_column`` may rename it)

    def __init__(self, score_threshold: float = 0.5, model_path: str | None = None, **options):
        _check_options(type(self).__name__, self.classifier_class(), options, ("model_path",))
        if (
            isinstance(score_threshold, bool)
            or not isinstance(score_threshold, numbers.Real)
            or math.isnan(score_threshold)
        ):  # NaN compares False with every score: it would drop every record
            raise ValueError(
                f"{type(self).__name__}: score_threshold must be a number, not {score_threshold!r}"
            )
        self.score_threshold = score_threshold
        self.model_path = model_path
        self.options = options
        self.column = options.get("output_column") or type(self).column

    @staticmethod
    def classifier_class() -> type:  # pragma: no cover - interface
        raise NotImplementedError

    def classifier(self, **defaults: Any):
        cls = self.classifier_class()
        return cls(model_path=self.model_path, **{**defaults, **self.options})

    def passes(self, scores):  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, state: PipelineState) -> PipelineState:
        dataset = _require_dataset(state, self)
        embedding = state.embedding
        if self.column in embedding.get("scores", ()):
            score = False  # the embedding stage's classifiers scored its embeddings
        elif embedding:
            score = True  # scores saved earlier belong to other embeddings (or heads)
        else:
            score = self.column not in column_names(dataset.metadata)  # else: saved scores
        if score:
            column = embedding.get("column", "image_embedding")
            if column not in column_names(dataset.metadata):
                raise ValueError(
                    f"{type(self).__name__} needs an ImageEmbeddingStage before it (or a "
                    f"{self.column!r} column in the metadata)"
                )
            defaults: dict[str, Any] = {"embedding_column": column}
            if embedding.get("embedding_dim"):
                defaults["embedding_dim"] = embedding["embedding_dim"]
            if embedding.get("device"):
                defaults["device"] = embedding["device"]
            dataset = self.classifier(**defaults)(dataset)
        meta = dataset.metadata
        # no score (NaN) when the image failed: the writer drops the record as an error
        verdict = self.passes(meta[self.column]).fillna(False).astype(bool)
        if state.filtered:  # an earlier filter stage of this pipeline
            verdict = verdict & meta[KEEP_COLUMN]
        elif KEEP_COLUMN in column_names(meta):
            warnings.warn(
                f"{type(self).__name__} replaces the {KEEP_COLUMN!r} column the metadata was "
                f"loaded with (an earlier run's verdict?): this pipeline keeps what its own "
                f"filter stages pass",
                stacklevel=2,
            )
        meta = meta.assign(**{KEEP_COLUMN: verdict})
        state.dataset = dataset.with_metadata(meta)
        state.filtered = True
        return state


class ImageAestheticFilterStage(_ScoreFilterStage):
    """Keep records whose ``aesthetic_score`` is at least ``score_threshold``."""

    column = "aesthetic_score"

    @staticmethod
    def classifier_class() -> type:
        from dask_imgcurate.models.classifiers import AestheticClassifier

        return AestheticClassifier

    def passes(self, scores):
        return scores >= self.score_threshold


class ImageNSFWFilterStage(_ScoreFilterStage):
    """Keep records whose ``nsfw_score`` is below ``score_threshold``."""

    column = "nsfw_score"

    @staticmethod
    def classifier_class() -> type:
        from dask_imgcurate.models.classifiers import NsfwClassifier

        return NsfwClassifier

    def passes(self, scores):
        return scores < self.score_threshold


class ImageWriterStage(Stage):
    """Write the kept records with ``ImageTextPairDataset.write_images`` (computes)."""

    def __init__(
        self,
        output_dir: str,
        images_per_tar: int = 1000,
        remove_image_data: bool = False,
        verbose: bool = False,
        deterministic_name: bool = True,
        storage_options: dict | None = None,
    ):
        self.output_dir = output_dir
        self.images_per_tar = images_per_tar
        self.remove_image_data = remove_image_data
        self.verbose = verbose
        self.deterministic_name = deterministic_name
        self.storage_options = storage_options

    def apply(self, state: PipelineState) -> PipelineState:
        dataset = _require_dataset(state, self)
        if not state.filtered and KEEP_COLUMN in column_names(dataset.metadata):
            warnings.warn(
                f"the metadata was loaded with a {KEEP_COLUMN!r} column but no filter stage "
                f"ran: writing every record (to apply it: dataset.write_images(..., "
                f"filter_column={KEEP_COLUMN!r}))",
                stacklevel=2,
            )
        with gpu_annotations(dataset.metadata, state.gpu_share):
            state.summary = dataset.write_images(
                self.output_dir,
                images_per_tar=self.images_per_tar,
                filter_column=KEEP_COLUMN if state.filtered else None,
                deterministic_name=self.deterministic_name,
                remove_image_data=self.remove_image_data,
                # the reader stage's verbose: progress of reading + embedding
                verbose=self.verbose or bool(state.reader.get("verbose")),
                storage_options=self.storage_options,
            )
        return state


# --------------------------------------------------------------------------- GPU share


def _current_client():
    """The ``distributed`` client Dask computes on here, or None."""
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return get_client()
    except ValueError:  # no client
        return None


def gpu_task_resources(num_gpus_per_worker: float, client=None) -> dict[str, float]:
    """Resources for one GPU task: ``{"GPU": num_gpus_per_worker}``, or ``{}`` when not wanted.

    ``{}`` when the share is 0, when there is no ``distributed`` client (``client=None``
    looks for the current one) or when none of its workers advertises a ``GPU`` resource.
    Raises ``ValueError`` when the share exceeds every GPU worker's ``GPU`` resource: such
    tasks could never run.
    """
    wanted = worker_resources(num_gpus_per_worker)  # validates; {} for a zero share
    if not wanted:
        return {}
    share = wanted[GPU_RESOURCE]
    client = client if client is not None else _current_client()
    if client is None:
        return {}
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    gpus = [float((info.get("resources") or {}).get(GPU_RESOURCE, 0)) for info in workers.values()]
    gpus = [g for g in gpus if g > 0]
    if not gpus:
        return {}
    if share > max(gpus):
        raise ValueError(
            f"num_gpus_per_worker={share:g} exceeds the {GPU_RESOURCE} resource of every "
            f"worker (at most {max(gpus):g}): the embedding tasks could never run"
        )
    return {GPU_RESOURCE: share}


def _is_gpu_expr(expr) -> bool:
    """Whether a dask-expr expression maps the CLIP embedder or a score head."""
    from dask_imgcurate.embed import _embed_partition
    from dask_imgcurate.models.classifiers import EmbeddingClassifier

    try:
        func = expr.operand("func") if "func" in expr._parameters else None
    except Exception:  # noqa: BLE001 - an expression type we do not know
        return False
    if func is _embed_partition:
        return True
    owner = getattr(func, "__self__", None)
    return isinstance(owner, EmbeddingClassifier) and func.__name__ == "score_partition"


def gpu_task_keys(frame) -> set:
    """Keys of the tasks of ``frame``'s optimised graph that run the model or a score head.

    Blockwise fusion merges the embedding into tasks named after other operations, so the
    keys are those of every (fused) expression containing such a map. The graph is the one
    ``frame.to_delayed()`` and ``frame.compute()`` build (``frame.optimize()``).
    """
    keys: set = set()
    for expr in frame.optimize().expr.walk():
        # a ``Fused`` expression lists the expressions it merged in its ``exprs`` operand
        fused = "exprs" in getattr(expr, "_parameters", ())
        members: Iterable = expr.operand("exprs") if fused else (expr,)
        if any(_is_gpu_expr(m) for m in members):
            keys.update(expr.__dask_keys__())
    return keys


@contextlib.contextmanager
def gpu_annotations(frame, num_gpus_per_worker: float, client=None):
    """Within it, graphs sent to a GPU cluster ask ``{"GPU": share}`` for ``frame``'s GPU tasks.

    Dask DataFrame (query planning) ignores ``dask.annotate`` around graph construction,
    so this annotates at submission time instead: a global ``resources`` annotation whose
    value is a per-key lookup (a ``defaultdict`` bound method: it unpickles on a scheduler
    without this package), ``{}`` (no restriction) for every other task. A no-op when
    :func:`gpu_task_resources` says no GPU resource is wanted.
    """
    resources = gpu_task_resources(num_gpus_per_worker, client)
    keys = gpu_task_keys(frame) if resources else set()
    if not keys:
        yield resources
        return
    lookup: defaultdict = defaultdict(dict, {key: dict(resources) for key in keys})
    with dask.annotate(resources=lookup.__getitem__), warnings.catch_warnings():
        # dask-expr warns that annotations are ignored while building frames; this one is
        # read when the graph is submitted (Client.compute / persist), where it applies
        warnings.filterwarnings("ignore", message=r"Dask annotations .* detected")
        yield resources


__all__ = [
    "FilePartitioningStage",
    "ImageAestheticFilterStage",
    "ImageEmbeddingStage",
    "ImageNSFWFilterStage",
    "ImageReaderStage",
    "ImageWriterStage",
    "PipelineState",
    "Stage",
]

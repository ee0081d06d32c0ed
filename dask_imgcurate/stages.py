"""The NeMo Curator-style stage API, as thin adapters over ``ImageTextPairDataset``.

Stages do not run anything themselves: each turns the pipeline's state into a lazier state
(a dataset whose metadata has more columns), and only ``ImageWriterStage`` computes. Filters
do not drop rows: they AND their verdict into the boolean ``keep`` column, which the writer
exports (so records with an ``error`` or failing a threshold are dropped there, and counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dask_imgcurate.dataset import ImageTextPairDataset
from dask_imgcurate.export import ExportSummary

KEEP_COLUMN = "keep"


@dataclass
class PipelineState:
    """What flows between stages."""

    dataset: ImageTextPairDataset | None = None
    reader: dict[str, Any] = field(default_factory=dict)
    summary: ExportSummary | None = None


class Stage:
    """A pipeline step: ``apply(state) -> state``."""

    name = "stage"

    def apply(self, state: PipelineState) -> PipelineState:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _require_dataset(state: PipelineState, stage: Stage) -> ImageTextPairDataset:
    if state.dataset is None:
        raise RuntimeError(f"{type(stage).__name__} needs a FilePartitioningStage before it")
    return state.dataset


class FilePartitioningStage(Stage):
    """Find the input shards: one partition per ``files_per_partition`` tar files."""

    def __init__(
        self,
        file_paths: str | Sequence[str],
        files_per_partition: int = 1,
        file_extensions: Sequence[str] = (".tar",),
        storage_options: dict | None = None,
        id_col: str = "key",
    ):
        unsupported = [e for e in file_extensions if e.lower() != ".tar"]
        if unsupported:
            raise ValueError(f"only .tar shards are supported, not {unsupported}")
        self.file_paths = file_paths
        self.files_per_partition = files_per_partition
        self.file_extensions = list(file_extensions)
        self.storage_options = storage_options
        self.id_col = id_col

    def apply(self, state: PipelineState) -> PipelineState:
        state.dataset = ImageTextPairDataset.from_webdataset(
            self.file_paths,
            id_col=self.id_col,
            storage_options=self.storage_options,
            files_per_partition=self.files_per_partition,
        )
        return state


class ImageReaderStage(Stage):
    """Image decoding options (DALI), used by the embedding stage that decodes the images.

    ``task_batch_size`` is the decode batch size, ``num_threads`` DALI's CPU threads, and
    ``num_gpus_per_worker`` the GPU share each task asks of Dask workers that advertise a
    ``GPU`` resource (ignored on clusters without one).
    """

    def __init__(
        self,
        task_batch_size: int = 100,
        verbose: bool = True,
        num_threads: int = 8,
        num_gpus_per_worker: float = 0.25,
    ):
        self.task_batch_size = task_batch_size
        self.verbose = verbose
        self.num_threads = num_threads
        self.num_gpus_per_worker = num_gpus_per_worker

    def apply(self, state: PipelineState) -> PipelineState:
        _require_dataset(state, self)
        state.reader = dict(
            batch_size=self.task_batch_size,
            num_threads=self.num_threads,
            num_gpus_per_worker=self.num_gpus_per_worker,
            verbose=self.verbose,
        )
        return state


class ImageEmbeddingStage(Stage):
    """CLIP image embeddings (column ``image_embedding``) via ``ClipImageEmbedder``."""

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        batch_size: int | None = None,
        device: str = "auto",
        **embedder_options: Any,
    ):
        self.model_name = model_name
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.device = device
        self.embedder_options = embedder_options

    def apply(self, state: PipelineState) -> PipelineState:
        from dask_imgcurate.embed import ClipImageEmbedder

        dataset = _require_dataset(state, self)
        reader = state.reader
        embedder = ClipImageEmbedder(
            model_name=self.model_name,
            pretrained=self.pretrained,
            batch_size=self.batch_size or reader.get("batch_size", 256),
            num_threads=reader.get("num_threads", 4),
            device=self.device,
            **self.embedder_options,
        )
        state.dataset = embedder(dataset)
        return state


class _ScoreFilterStage(Stage):
    column = ""

    def __init__(self, score_threshold: float = 0.5, model_path: str | None = None, **options):
        self.score_threshold = score_threshold
        self.model_path = model_path
        self.options = options

    def classifier(self):  # pragma: no cover - interface
        raise NotImplementedError

    def passes(self, scores):  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, state: PipelineState) -> PipelineState:
        dataset = _require_dataset(state, self)
        if self.column not in dataset.metadata.columns:
            dataset = self.classifier()(dataset)
        meta = dataset.metadata
        verdict = self.passes(meta[self.column]).fillna(False).astype(bool)
        if KEEP_COLUMN in meta.columns:
            verdict = verdict & meta[KEEP_COLUMN]
        meta = meta.assign(**{KEEP_COLUMN: verdict})
        state.dataset = dataset.with_metadata(meta)
        return state


class ImageAestheticFilterStage(_ScoreFilterStage):
    """Keep records whose ``aesthetic_score`` is at least ``score_threshold``."""

    column = "aesthetic_score"

    def classifier(self):
        from dask_imgcurate.models.classifiers import AestheticClassifier

        return AestheticClassifier(model_path=self.model_path, **self.options)

    def passes(self, scores):
        return scores >= self.score_threshold


class ImageNSFWFilterStage(_ScoreFilterStage):
    """Keep records whose ``nsfw_score`` is below ``score_threshold``."""

    column = "nsfw_score"

    def classifier(self):
        from dask_imgcurate.models.classifiers import NsfwClassifier

        return NsfwClassifier(model_path=self.model_path, **self.options)

    def passes(self, scores):
        return scores < self.score_threshold


class ImageWriterStage(Stage):
    """Write the kept records with ``ImageTextPairDataset.write_images`` (computes)."""

    def __init__(
        self,
        output_dir: str,
        images_per_tar: int = 1000,
        remove_image_data: bool = True,
        verbose: bool = True,
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
        state.summary = dataset.write_images(
            self.output_dir,
            images_per_tar=self.images_per_tar,
            filter_column=KEEP_COLUMN if KEEP_COLUMN in dataset.metadata.columns else None,
            deterministic_name=self.deterministic_name,
            remove_image_data=self.remove_image_data,
            verbose=self.verbose,
            storage_options=self.storage_options,
        )
        return state


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

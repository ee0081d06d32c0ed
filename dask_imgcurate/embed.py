"""CLIP image embeddings (and scores of heads on them) for every record of a dataset.

``ClipImageEmbedder(...)(dataset)`` maps each metadata partition through: read the
partition's images by byte range, decode and preprocess them with DALI
(:mod:`dask_imgcurate.io.image_reader`), embed them with an open_clip model, score the
embeddings with the given classifiers. The model, the heads and the DALI pipelines are
created once per worker process and reused by all partitions.

Added columns: the embedding column (``list<float32>`` via ``pd.ArrowDtype``; null when the
record has no usable image), one float32 column per classifier (NaN where the embedding is
null) and ``error`` (string; null when fine, else ``"no image"``, ``"read: ..."`` or
``"decode: ..."``). An ``error`` already in the frame is kept, except that re-running an
embedding (its column already there) replaces the image errors that embedding recorded
before, so an image fixed since loses its error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dask_imgcurate.backend import like, to_pandas
from dask_imgcurate.io.image_reader import (
    MAX_IMAGE_PIXELS,
    DaliImageReader,
    check_reader_options,
    is_reader_error,
)
from dask_imgcurate.models.classifiers import EmbeddingClassifier
from dask_imgcurate.models.clip import (
    clip_embed_dim,
    has_random_weights,
    load_clip,
    resolve_local_paths,
    warn_random_weights,
)
from dask_imgcurate.progress import note_reading

if TYPE_CHECKING:
    from dask_imgcurate.dataset import ImageTextPairDataset

EMBEDDING_DTYPE = pd.ArrowDtype(pa.list_(pa.float32()))
"""dtype of embedding columns: pyarrow ``list<float32>``."""

ERROR_DTYPE = pd.StringDtype("pyarrow")
"""dtype of the ``error`` column (what Dask turns string columns into)."""

ERROR_COLUMN = "error"


class ClipImageEmbedder:
    """Add CLIP image embeddings (and classifier scores) to a dataset's metadata.

    ``model_name``/``pretrained``/``precision`` select the open_clip model (see
    :func:`dask_imgcurate.models.clip.load_clip`; ``pretrained=None`` or ``"none"`` means
    random weights).
    ``normalize`` L2-normalises the stored embeddings (classifiers always see normalised
    ones). ``autocast`` runs the model under fp16 autocast on CUDA. ``device`` is resolved on
    the worker (``"auto"``: CUDA when available). ``source`` is the image reader's
    (``"range"`` or ``"webdataset"``); images declaring more than ``max_image_pixels``
    pixels get an ``error`` instead of being decoded (None: no limit).
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        batch_size: int = 256,
        embedding_column: str = "image_embedding",
        classifiers: Sequence[EmbeddingClassifier] = (),
        normalize: bool = True,
        autocast: bool = True,
        device: str = "auto",
        num_threads: int = 4,
        *,
        precision: str = "fp32",
        source: str = "range",
        pil_fallback: bool = True,
        prefetch: int = 1,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        check_reader_options(batch_size, num_threads, source, prefetch, max_image_pixels)
        if isinstance(pretrained, str) and pretrained.strip().lower() in ("none", ""):
            pretrained = None  # as the command line's --pretrained none
        # relative local paths are taken from this (the client's) current directory
        model_name, pretrained = resolve_local_paths(model_name, pretrained)
        if has_random_weights(model_name, pretrained):  # here, not in each loading task
            warn_random_weights(model_name, stacklevel=2)
        self.model_name = model_name
        self.pretrained = pretrained
        self.batch_size = int(batch_size)
        self.embedding_column = embedding_column
        self.classifiers = tuple(classifiers)
        self.normalize = normalize
        self.autocast = autocast
        self.device = device
        self.num_threads = int(num_threads)
        self.precision = precision
        self.source = source
        self.pil_fallback = pil_fallback
        self.prefetch = int(prefetch)
        self.max_image_pixels = max_image_pixels
        columns = [embedding_column, ERROR_COLUMN] + [c.output_column for c in self.classifiers]
        if len(set(columns)) != len(columns):
            raise ValueError(f"output columns clash: {columns}")
        for clf in self.classifiers:
            if clf.embedding_column != embedding_column:
                raise ValueError(
                    f"{type(clf).__name__} reads {clf.embedding_column!r} but the embedder "
                    f"writes {embedding_column!r}"
                )

    # ---- Dask

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """A copy of ``dataset`` whose metadata has the embedding, score and error columns."""
        self.check_embedding_dim()
        ddf = dataset.metadata
        id_col = getattr(dataset, "id_col", "key")
        storage_options = dict(getattr(dataset, "storage_options", None) or {})
        out = ddf.map_partitions(
            _embed_partition,
            self,
            id_col,
            storage_options,
            meta=self.output_meta(ddf._meta),
        )
        return dataset.with_metadata(out)

    def __dask_tokenize__(self) -> tuple:
        return (type(self).__name__, repr(sorted(vars(self).items(), key=lambda kv: kv[0])))

    def output_meta(self, meta):
        """Empty frame with ``meta``'s columns plus the columns this stage adds (in
        ``meta``'s backend)."""
        model, meta = meta, to_pandas(meta)
        added: dict[str, pd.Series] = {
            self.embedding_column: pd.Series([], dtype=EMBEDDING_DTYPE),
        }
        for clf in self.classifiers:
            added[clf.output_column] = pd.Series([], dtype=np.float32)
        added[ERROR_COLUMN] = pd.Series([], dtype=ERROR_DTYPE)
        meta = meta.iloc[:0]
        result = meta.assign(**{k: v.set_axis(meta.index) for k, v in added.items()})
        return like(result, model, self.added_columns())

    def added_columns(self) -> list[str]:
        """The columns this stage adds (or replaces)."""
        scores = [clf.output_column for clf in self.classifiers]
        return [self.embedding_column, *scores, ERROR_COLUMN]

    def check_embedding_dim(self) -> None:
        """Raise ``ValueError`` if a classifier's ``embedding_dim`` differs from the model's.

        Uses open_clip's config only (no weights); unknown configs are checked on the worker.
        """
        dim = clip_embed_dim(self.model_name)
        if dim is not None:
            self._check_classifiers(dim)

    def _check_classifiers(self, dim: int) -> None:
        for clf in self.classifiers:
            if clf.embedding_dim != dim:
                raise ValueError(
                    f"{type(clf).__name__} expects {clf.embedding_dim}-d embeddings but "
                    f"{self.model_name} produces {dim}-d embeddings"
                )

    # ---- one partition

    def embed_partition(
        self, df: pd.DataFrame, id_col: str = "key", storage_options: dict | None = None
    ) -> pd.DataFrame:
        """Embed and score one pandas partition (the function mapped over the dataset). Rows
        are matched to images by position (``id_col`` is not used: ids may repeat)."""
        clip = load_clip(
            self.model_name, self.pretrained, self.device, self.precision, warn_random=False
        )
        self._check_classifiers(clip.embed_dim)
        n = len(df)
        dim = clip.embed_dim
        embeddings = np.zeros((n, dim), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        errors = np.full(n, None, dtype=object)
        if n:
            reader = DaliImageReader(
                clip.preprocess,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device=clip.device,
                source=self.source,
                pil_fallback=self.pil_fallback,
                storage_options=storage_options,
                prefetch=self.prefetch,
                max_image_pixels=self.max_image_pixels,
            )
            # rows are told apart by position: ids may repeat within a partition (two
            # datasets numbered alike, loaded together or repartitioned)
            rows = df.assign(**{_ROW: np.arange(n).astype(str)})
            for batch in reader.iter_batches(rows, _ROW):
                if batch.keys:
                    vectors = clip.encode_images(batch.images, self.normalize, self.autocast)
                    pos = np.asarray(batch.keys, dtype=np.int64)
                    embeddings[pos] = vectors.cpu().numpy()
                    valid[pos] = True
                if batch.errors:
                    pos = np.asarray(list(batch.errors), dtype=np.int64)
                    errors[pos] = list(batch.errors.values())
            unseen = ~valid & pd.isna(errors)
            if unseen.any():  # the reader covers every row; this guards the contract
                raise RuntimeError(f"image reader skipped {int(unseen.sum())} rows")

        columns: dict[str, Any] = {
            self.embedding_column: pd.Series(
                pd.arrays.ArrowExtensionArray(_list_array(embeddings, valid)), index=df.index
            )
        }
        for clf in self.classifiers:
            scores = np.full(n, np.nan, dtype=np.float32)
            if valid.any():
                scores[valid] = clf.score(embeddings[valid])
            columns[clf.output_column] = pd.Series(scores, index=df.index)
        error = pd.Series(pd.array(errors.tolist(), dtype=ERROR_DTYPE), index=df.index)
        if ERROR_COLUMN in df:
            rerun = self.embedding_column in df  # an earlier run of this same embedding
            error = _merge_errors(df[ERROR_COLUMN].astype(ERROR_DTYPE), error, rerun)
        columns[ERROR_COLUMN] = error
        return df.assign(**columns)

    def __repr__(self) -> str:
        return (
            f"ClipImageEmbedder(model_name={self.model_name!r}, pretrained={self.pretrained!r}, "
            f"device={self.device!r}, classifiers={list(self.classifiers)!r})"
        )


_ROW = "__dask_imgcurate_row__"  # the reader's key column while embedding: row positions


def _embed_partition(df, embedder: ClipImageEmbedder, id_col: str, storage_options: dict):
    """``embed_partition`` for a partition of either backend (cudf: through pandas)."""
    part = to_pandas(df)
    if "_shard" in part.columns:  # a worker that dies decoding them: named by its tars
        note_reading(part["_shard"].dropna().unique().tolist())
    result = embedder.embed_partition(part, id_col, storage_options)
    return like(result, df, embedder.added_columns())


def _merge_errors(previous: pd.Series, new: pd.Series, rerun: bool) -> pd.Series:
    """``previous`` errors, their nulls filled with ``new`` (this run's). On a ``rerun`` of
    the same embedding, the image errors it recorded before are replaced too, so a fixed
    image loses its error; another stage's, the user's, or another embedding's stay."""
    if not rerun:
        return previous.where(previous.notna(), new)
    foreign = previous.fillna("").map(lambda e: bool(e) and not is_reader_error(e)).astype(bool)
    return previous.where(foreign, new)


def _list_array(matrix: np.ndarray, valid: np.ndarray) -> pa.ListArray:
    """``list<float32>`` array of ``matrix`` rows, null where not ``valid``."""
    n, dim = matrix.shape
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.where(valid, dim, 0), out=offsets[1:])
    values = pa.array(matrix[valid].reshape(-1), type=pa.float32())
    return pa.ListArray.from_arrays(
        pa.array(offsets), values, type=pa.list_(pa.float32()), mask=pa.array(~valid)
    )

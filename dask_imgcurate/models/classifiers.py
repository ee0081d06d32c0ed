"""Score heads on CLIP image embeddings: LAION aesthetic predictor and LAION NSFW detector.

Both take L2-normalised CLIP image embeddings (they normalise their input themselves) and
were trained on OpenAI CLIP ViT-L/14 (768-d). Weights are loaded from a local torch state
dict (``model_path``); without one they are looked for in the cache directory
(``$DASK_IMGCURATE_HOME``, default ``~/.cache/dask_imgcurate``) and downloaded from the
documented URL only when ``allow_download=True``. Loaded heads are cached per process.
"""

from __future__ import annotations

import os
import urllib.request
import zipfile
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from dask_imgcurate.backend import like, to_pandas
from dask_imgcurate.device import resolve_device
from dask_imgcurate.models.cache import ProcessCache, file_signature

if TYPE_CHECKING:
    from dask_imgcurate.dataset import ImageTextPairDataset

AESTHETIC_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)
"""LAION improved aesthetic predictor (ViT-L/14, 768-d): a torch state dict."""

NSFW_URL = (
    "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/releases/download/v1.0/"
    "clip_autokeras_binary_nsfw.zip"
)
"""LAION CLIP-based NSFW detector (ViT-L/14, 768-d): a zipped AutoKeras model.

It is converted to a torch state dict on download with :func:`convert_keras_nsfw`, which
needs ``tensorflow`` and ``autokeras`` (not dependencies of this package).
"""


def cache_dir() -> str:
    """Directory where downloaded weights are kept."""
    return os.environ.get(
        "DASK_IMGCURATE_HOME", os.path.join(os.path.expanduser("~"), ".cache", "dask_imgcurate")
    )


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor: linear stack 768 -> 1024 -> 128 -> 64 -> 16 -> 1.

    Same layout (``layers.N``) as christophschuhmann/improved-aesthetic-predictor, so its
    published state dict loads as is. There are no activations, only dropouts (inactive in
    eval mode), exactly as in the original.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Normalization(nn.Module):
    """Keras ``Normalization`` layer: ``(x - mean) / sqrt(variance)``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("variance", torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


class NsfwMLP(nn.Module):
    """LAION CLIP-based NSFW detector (ViT-L/14 head) in torch.

    Keras normalization, then dense 768 -> 64 -> 512 -> 256 (ReLU) -> 1 (sigmoid). Parameter
    names (``norm.mean``, ``norm.variance``, ``linear_1`` .. ``linear_4``) follow the common
    Keras-to-torch conversion of ``clip_autokeras_binary_nsfw``.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.norm = _Normalization(input_size)
        self.linear_1 = nn.Linear(input_size, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x))


_HEADS: ProcessCache[nn.Module] = ProcessCache()


class EmbeddingClassifier:
    """Base class: a small torch head scoring CLIP image embeddings.

    Holds only configuration (cheap to pickle into a Dask graph); the weights are loaded
    lazily, once per process and device.
    """

    output_column: ClassVar[str] = "score"
    url: ClassVar[str] = ""
    filename: ClassVar[str] = ""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        embedding_dim: int = 768,
        embedding_column: str = "image_embedding",
        output_column: str | None = None,
        allow_download: bool = False,
        device: str = "auto",
        batch_size: int = 8192,
    ) -> None:
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if model_path is not None:
            model_path = os.fspath(model_path)
            if os.path.isfile(model_path):  # relative to this (the client's) directory, not
                model_path = os.path.abspath(model_path)  # to a worker's
        self.model_path = model_path
        self.embedding_dim = int(embedding_dim)
        self.embedding_column = embedding_column
        if output_column is not None:
            self.output_column = output_column
        self.allow_download = allow_download
        self.device = device
        self.batch_size = int(batch_size)
        if model_path is not None and not os.path.isfile(model_path):  # say so now, not on
            raise FileNotFoundError(  # a worker after the CLIP model has run
                f"{type(self).__name__}: model_path {model_path}: no such file"
            )
        if model_path is None and not allow_download and not os.path.isfile(self._cached_path()):
            raise ValueError(
                f"{type(self).__name__}: no model_path given and {self._cached_path()} does not "
                f"exist; pass model_path=<local state dict> or allow_download=True "
                f"(downloads {self.url})"
            )

    # ---- to implement

    def build(self) -> nn.Module:
        """A fresh, randomly initialised head for ``embedding_dim``."""
        raise NotImplementedError

    def _download(self, dest: str) -> None:
        _download(self.url, dest)

    # ---- weights

    def _cached_path(self) -> str:
        return os.path.join(cache_dir(), self.filename)

    def weights_path(self) -> str:
        """Local state dict path, downloading it first if allowed and needed."""
        if self.model_path is not None:
            return self.model_path
        path = self._cached_path()
        if not os.path.isfile(path):
            if not self.allow_download:
                raise FileNotFoundError(f"{path} missing and allow_download=False")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._download(path)
        return path

    def load(self) -> nn.Module:
        """The head with its weights, in eval mode on the resolved device (cached per process)."""
        device = resolve_device(self.device)
        path = os.path.abspath(self.weights_path())
        key = (type(self).__name__, path, self.embedding_dim, str(device))
        # built again when the file changed (a long-lived worker, weights replaced)
        return _HEADS.get(key, lambda: self.load_weights(path, device), file_signature(path))

    def load_weights(self, path: str, device: str | torch.device = "cpu") -> nn.Module:
        """A new head with the state dict at ``path`` (checked against ``embedding_dim``)."""
        head = self.build()
        name = type(self).__name__
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # pickle / zip errors: not a torch state dict file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{name}: {path} is not a torch state dict ({reason})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{name}: {path} holds a {type(state).__name__}, not a state dict")
        self._check_weights(state, path)
        try:
            head.load_state_dict(state)
        except RuntimeError as err:  # another head's weights (e.g. NSFW weights for aesthetics)
            expected = sorted(head.state_dict())
            raise ValueError(
                f"{name}: {path} holds weights of another model (its keys "
                f"{sorted(state)[:6]}, this head's {expected[:6]}): {str(err).splitlines()[0]}"
            ) from None
        head.eval().to(device)
        for p in head.parameters():
            p.requires_grad_(False)
        return head

    def _check_weights(self, state: dict[str, Any], path: str) -> None:
        first = next((v for k, v in state.items() if k.endswith("weight") and v.ndim == 2), None)
        if first is not None and first.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{type(self).__name__}: weights {path} expect {first.shape[1]}-d embeddings "
                f"but embedding_dim={self.embedding_dim}"
            )

    # ---- scoring

    def score(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Scores (float32, shape ``(N,)``) for embeddings of shape ``(N, embedding_dim)``.

        Embeddings are L2-normalised first, as the heads were trained on normalised ones.
        """
        if isinstance(embeddings, torch.Tensor):
            x = embeddings.detach()
        else:
            x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        if x.ndim != 2:
            raise ValueError(f"embeddings must be 2-d (N, dim), got shape {tuple(x.shape)}")
        if x.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{type(self).__name__}: embedding size mismatch: got {x.shape[1]}-d embeddings, "
                f"the classifier expects {self.embedding_dim}-d (embedding_dim={self.embedding_dim})"
            )
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        head = self.load()
        device = next(head.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start : start + self.batch_size].to(device, torch.float32)
                chunk = torch.nn.functional.normalize(chunk, dim=-1)
                out.append(head(chunk).reshape(-1).float().cpu())
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def score_partition(self, frame):
        """``frame`` with :attr:`output_column` added (NaN where the embedding is null);
        either backend (cudf: scored through pandas)."""
        df = to_pandas(frame)
        column = df[self.embedding_column]
        result = np.full(len(df), np.nan, dtype=np.float32)
        if len(df):
            emb, valid = embeddings_to_numpy(column, self.embedding_dim)
            if valid.any():
                result[valid] = self.score(emb[valid])
        scored = df.assign(**{self.output_column: pd.Series(result, index=df.index)})
        return like(scored, frame, [self.output_column])

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """Add :attr:`output_column` to a dataset whose metadata has embeddings."""
        ddf = dataset.metadata
        if self.embedding_column not in ddf.columns:
            raise KeyError(
                f"metadata has no {self.embedding_column!r} column; run ClipImageEmbedder first"
            )
        empty = to_pandas(ddf._meta)
        added = empty.assign(**{self.output_column: pd.Series([], dtype=np.float32)})
        meta = like(added, ddf._meta, [self.output_column])
        return dataset.with_metadata(ddf.map_partitions(self.score_partition, meta=meta))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_path={self.model_path!r}, "
            f"embedding_dim={self.embedding_dim}, output_column={self.output_column!r})"
        )


class AestheticClassifier(EmbeddingClassifier):
    """LAION improved aesthetic predictor; adds ``aesthetic_score`` (roughly 1..10)."""

    output_column = "aesthetic_score"
    url = AESTHETIC_URL
    filename = "sac+logos+ava1-l14-linearMSE.pth"

    def build(self) -> nn.Module:
        return AestheticMLP(self.embedding_dim)


class NsfwClassifier(EmbeddingClassifier):
    """LAION CLIP-based NSFW detector; adds ``nsfw_score`` in [0, 1] (1 = NSFW)."""

    output_column = "nsfw_score"
    url = NSFW_URL
    filename = "clip_autokeras_binary_nsfw.pth"

    def build(self) -> nn.Module:
        return NsfwMLP(self.embedding_dim)

    def _download(self, dest: str) -> None:
        zip_path = dest + ".zip"
        _download(self.url, zip_path)
        convert_keras_nsfw(zip_path, dest)


def embeddings_to_numpy(column: pd.Series, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 (N, dim) matrix, validity mask)`` from a list<float32> column; nulls are 0."""
    n = len(column)
    if isinstance(column.dtype, pd.ArrowDtype):
        chunked = column.array.__arrow_array__()
        arr = chunked.combine_chunks() if isinstance(chunked, pa.ChunkedArray) else chunked
        items = None
    else:
        arr, items = None, column.tolist()
    if arr is not None:
        valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    else:
        items = items if items is not None else []
        valid = np.array([v is not None and not _isna(v) for v in items], dtype=bool)
        lengths = np.array([len(v) if ok else 0 for v, ok in zip(items, valid)], dtype=np.int64)
    sizes = set(lengths[valid].tolist())
    if len(sizes) > 1:
        raise ValueError(f"embeddings have different sizes: {sorted(sizes)}")
    width = sizes.pop() if sizes else (dim or 0)
    if dim is not None and valid.any() and width != dim:
        raise ValueError(
            f"embedding size mismatch: column has {width}-d embeddings, expected {dim}-d"
        )
    out = np.zeros((n, width), dtype=np.float32)
    if valid.any():
        if arr is not None:
            flat = arr.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
            out[valid] = np.asarray(flat, dtype=np.float32).reshape(-1, width)
        else:
            out[valid] = np.asarray([items[i] for i in np.flatnonzero(valid)], dtype=np.float32)
    return out, valid


def _isna(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _download(url: str, dest: str) -> None:
    tmp = f"{dest}.part-{os.getpid()}"
    try:
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 - fixed https URLs
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert_keras_nsfw(src: str, dest: str) -> str:
    """Convert LAION's ``clip_autokeras_binary_nsfw`` (zip or directory) to a torch state dict.

    Needs ``tensorflow`` and ``autokeras``. Returns ``dest``.
    """
    try:
        import autokeras as ak  # type: ignore[import-not-found]
        from tensorflow.keras.models import load_model  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError(
            "converting the Keras NSFW model needs tensorflow and autokeras; alternatively "
            "pass NsfwClassifier(model_path=...) a torch state dict with keys norm.mean, "
            "norm.variance, linear_1..linear_4 (.weight, .bias)"
        ) from err
    model_dir = src
    if zipfile.is_zipfile(src):
        out_dir = os.path.dirname(os.path.abspath(dest))
        with zipfile.ZipFile(src) as zf:
            zf.extractall(out_dir)
            top = {n.split("/")[0] for n in zf.namelist()}
        model_dir = os.path.join(out_dir, sorted(top)[0])
    keras = load_model(model_dir, custom_objects=ak.CUSTOM_OBJECTS)
    dense = [layer for layer in keras.layers if layer.__class__.__name__ == "Dense"]
    norm = next(layer for layer in keras.layers if layer.__class__.__name__ == "Normalization")
    state = {
        "norm.mean": torch.tensor(norm.weights[0].numpy()).reshape(-1),
        "norm.variance": torch.tensor(norm.weights[1].numpy()).reshape(-1),
    }
    for i, layer in enumerate(dense, start=1):
        state[f"linear_{i}.weight"] = torch.tensor(layer.weights[0].numpy()).T.contiguous()
        state[f"linear_{i}.bias"] = torch.tensor(layer.weights[1].numpy())
    torch.save(state, dest)
    return dest


def clear_classifier_cache() -> None:
    """Forget the heads loaded in this process."""
    _HEADS.clear()

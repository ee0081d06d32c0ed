"""Helpers for the compute tests: a tiny open_clip config, tars built with stdlib ``tarfile``,
metadata partitions computed independently of the package's indexer, random-weight heads.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

TINY_MODEL = "tiny-vit-test"
TINY_EMBED_DIM = 32
TINY_IMAGE_SIZE = 64
TINY_CONFIG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OTHER_IMAGE_EXTS = ("avif", "bmp", "gif", "j2k", "jp2", "pbm", "pgm", "pnm", "ppm", "tif", "tiff")

_registered: str | None = None


def register_tiny_clip() -> str:
    """Register the tiny ViT config with open_clip (once per process); return its name."""
    global _registered
    if _registered is None:
        import open_clip

        directory = Path(tempfile.mkdtemp(prefix="tiny-clip-"))
        (directory / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(directory)
        assert TINY_MODEL in open_clip.list_models()
        _registered = TINY_MODEL
    return _registered


def synthetic_image(seed: int, size: tuple[int, int] = (97, 71), mode: str = "RGB") -> Image.Image:
    """A smooth image with some structure (gradients, a rectangle, mild noise); size is (W, H)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.3)
        channels.append(127 + 100 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + phase + c))
    arr = np.stack(channels, axis=-1)
    x0, y0 = rng.integers(0, max(1, w // 2)), rng.integers(0, max(1, h // 2))
    arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, 3)
    arr += rng.normal(0, 6, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(np.full((h, w), 255, np.uint8), "L")
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """``img`` encoded as ``fmt`` (PIL format name: JPEG, PNG, WEBP, GIF)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_tar(
    path: str | Path,
    members: list[tuple[str, bytes]],
    fmt: int = tarfile.PAX_FORMAT,
    encoding: str = "utf-8",
) -> Path:
    """Write an uncompressed tar with ``members`` (name, data) in the given order, with the
    stdlib ``tarfile`` in format ``fmt`` (pax headers only where a name needs one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt, encoding=encoding) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def count_indexing(monkeypatch) -> list[str]:
    """The names of the tars ``metadata`` indexes from now on (appended as they are)."""
    from dask_imgcurate import metadata

    calls: list[str] = []
    real = metadata.index_shard

    def counting(fs, shard, **kwargs):
        calls.append(Path(shard.tar).name)
        return real(fs, shard, **kwargs)

    monkeypatch.setattr(metadata, "index_shard", counting)
    return calls


def split_key(name: str) -> tuple[str | None, str | None]:
    """WebDataset rule: key = path up to the first dot of the basename, extension = the rest;
    (None, None) for a basename without a dot or starting with one (in no record)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None, None
    return name[:dot], name[dot + 1 :]


def image_rank(ext: str) -> int:
    """README rule for a record's image: 0 for a web image extension (``jpg``, any case), 1
    for another image format's (``tif``), 2 and 3 for one whose last part is one of those
    (``seg.png``, ``0.jpg``; ``x.bmp``), 4 otherwise; the first member in tar order of the
    lowest rank is the image."""
    ext = ext.lower()
    last = ext.rsplit(".", 1)[-1]
    for rank, (part, names) in enumerate(
        [(ext, IMAGE_EXTS), (ext, OTHER_IMAGE_EXTS), (last, IMAGE_EXTS), (last, OTHER_IMAGE_EXTS)]
    ):
        if part in names:
            return rank
    return 4


def partition_from_tar(path: str | Path, id_col: str = "key") -> pd.DataFrame:
    """Metadata partition (CONTRACT columns) of a tar, via stdlib ``tarfile``; sorted by key.
    A record's image is picked by ``image_rank``, as the README says."""
    path = str(Path(path).resolve())
    records: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar.getmembers():
            if not m.isreg():
                continue
            key, ext = split_key(m.name)
            if key is None:
                continue
            rec = records.setdefault(
                key,
                {
                    id_col: key,
                    "caption": None,
                    "_shard": path,
                    "_image_member": None,
                    "_image_offset": -1,
                    "_image_size": -1,
                },
            )
            rank = image_rank(ext)
            if rank < rec.get("_rank", 4):
                rec.update(
                    _image_member=m.name,
                    _image_offset=m.offset_data,
                    _image_size=m.size,
                    _rank=rank,
                )
            if ext == "txt":
                rec["caption"] = tar.extractfile(m).read().decode()
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "_rank"} for r in records.values()])
    df = df.astype({"_image_offset": "int64", "_image_size": "int64"})
    return df.sort_values(id_col, ignore_index=True)


def save_random_head(cls, path: str | Path, embedding_dim: int = TINY_EMBED_DIM, seed: int = 0):
    """Save a random-weight state dict for classifier class ``cls``; return the path."""
    torch.manual_seed(seed)
    module = cls(model_path=None, embedding_dim=embedding_dim, allow_download=True).build()
    torch.save(module.state_dict(), path)
    return str(path)


class FakeDataset:
    """The slice of ``ImageTextPairDataset`` the compute stages use."""

    def __init__(self, metadata, id_col: str = "key", storage_options: dict | None = None):
        self.metadata = metadata
        self.id_col = id_col
        self.storage_options = storage_options or {}

    def with_metadata(self, ddf) -> FakeDataset:
        return FakeDataset(ddf, self.id_col, self.storage_options)

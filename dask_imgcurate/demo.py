"""Deterministic synthetic image-text WebDataset shards for demos and tests.

Images are random crops of the bundled photographs in ``dask_imgcurate/data/photos``
(scikit-image sample data), resized and re-encoded. Every function is pure given its
arguments: the same seed gives byte-identical images, tars and Parquet files (with the same
Pillow / pyarrow versions). Record ``i`` depends only on ``(seed, i)`` and the image options.

A *record* is a dict in the ``webdataset`` style::

    {"__key__": "000000042", "jpg": b"...", "txt": "a photo of ...", "json": {...}}

The image entry is named after its extension (``jpg``, ``png`` or ``webp``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from dask_imgcurate.io import fs as fsio

__all__ = [
    "DEFAULT_SIZES",
    "IMAGE_EXTENSIONS",
    "corrupt_jpeg",
    "make_demo_dataset",
    "make_images",
    "make_shard_records",
    "photo_names",
    "write_parquet",
    "write_shard",
]

#: Output (width, height) choices for generated images.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (256, 256),
    (320, 240),
    (200, 300),
    (512, 384),
    (96, 128),
)
#: Record member extension for each supported ``fmt`` / ``image_format``.
IMAGE_EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
#: Fixed tar member mtime (2020-01-01T00:00:00Z) so shards are byte-reproducible.
TAR_MTIME = 1_577_836_800

_ADJECTIVES = ("bright", "dark", "blurry", "sharp", "colorful", "old", "close-up", "wide")
_STYLES = ("a photo of", "an image of", "a picture of", "a cropped photo of", "a snapshot of")
_EXTRAS = ("in daylight", "on a plain background", "seen up close", "from a distance", "")


@functools.cache
def _photos() -> tuple[tuple[str, Image.Image], ...]:
    """Load the bundled photos once, as RGB, sorted by name."""
    root = resources.files("dask_imgcurate").joinpath("data").joinpath("photos")
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".jpg"):
            with Image.open(io.BytesIO(entry.read_bytes())) as im:
                rgb = im.convert("RGB")
            rgb.info = {}
            out.append((entry.name[: -len(".jpg")], rgb))
    if not out:
        raise FileNotFoundError(f"no demo photos found in {root}")
    return tuple(out)


def photo_names() -> list[str]:
    """Return the base names of the bundled photos, sorted."""
    return [name for name, _ in _photos()]


def _rng(seed: int, index: int) -> random.Random:
    """Return the random generator for record ``index`` under ``seed``."""
    return random.Random(f"dask_imgcurate.demo:{seed}:{index}")


def _check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {list(IMAGE_EXTENSIONS)}")
    return fmt


def _make_image(
    rng: random.Random, sizes: Sequence[tuple[int, int]], fmt: str
) -> tuple[bytes, int, int, str, int, int]:
    """Return (bytes, width, height, photo name, crop width, crop height) for one image."""
    name, photo = rng.choice(_photos())
    pw, ph = photo.size
    cw = rng.randint(-(-pw * 2 // 5), pw)  # at least 40% of each side (ceil)
    ch = rng.randint(-(-ph * 2 // 5), ph)
    x0 = rng.randint(0, pw - cw)
    y0 = rng.randint(0, ph - ch)
    width, height = sizes[rng.randrange(len(sizes))]
    quality = rng.randint(85, 95)  # drawn for every format so crops don't depend on fmt
    img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue(), width, height, name, cw, ch


def make_images(
    n: int,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    fmt: str = "jpeg",
) -> list[tuple[bytes, int, int]]:
    """Return ``n`` encoded images as ``(bytes, width, height)``.

    Image ``i`` is a random crop (at least 40% of each side) of a random bundled photo,
    resized to a random ``(width, height)`` from ``sizes`` and encoded as ``fmt``
    (``"jpeg"`` with quality 85..95, ``"png"`` or ``"webp"``). Image ``i`` equals the image of
    record ``i`` from :func:`make_shard_records` with the same seed, sizes and format.
    """
    fmt = _check_format(fmt)
    return [_make_image(_rng(seed, i), sizes, fmt)[:3] for i in range(n)]


def make_shard_records(
    start_index: int,
    n: int,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    image_format: str = "jpeg",
) -> list[dict[str, Any]]:
    """Return ``n`` records with keys ``start_index .. start_index + n - 1`` (9 digits).

    Each record has ``__key__``, the image bytes under its extension (``jpg``, ``png`` or
    ``webp``), ``txt`` (caption str) and ``json`` (img2dataset-style dict with ``key``,
    ``caption``, ``url``, ``width``, ``height``, ``original_width``, ``original_height``,
    ``status`` and ``similarity``; the originals are the crop box size).
    """
    fmt = _check_format(image_format)
    ext = IMAGE_EXTENSIONS[fmt]
    records = []
    for i in range(start_index, start_index + n):
        rng = _rng(seed, i)
        data, width, height, name, orig_w, orig_h = _make_image(rng, sizes, fmt)
        key = f"{i:09d}"
        extra = rng.choice(_EXTRAS)
        subject = name.replace("_", " ")
        caption = f"{rng.choice(_STYLES)} {rng.choice(_ADJECTIVES)} {subject}"
        caption = f"{caption} {extra}" if extra else caption
        meta = {
            "key": key,
            "caption": caption,
            "url": f"https://example.com/images/{name}/{key}.{ext}",
            "width": width,
            "height": height,
            "original_width": orig_w,
            "original_height": orig_h,
            "status": "success",
            "similarity": round(rng.uniform(0.2, 0.4), 6),
        }
        records.append({"__key__": key, ext: data, "txt": caption, "json": meta})
    return records


def _member_bytes(value: bytes | str | dict[str, Any]) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: str | os.PathLike[str],
    records: Iterable[dict[str, Any]],
    extra_members: Iterable[tuple[str, bytes]] | None = None,
) -> None:
    """Write ``records`` to a tar at ``path`` with the stdlib ``tarfile`` (PAX format).

    Records are written in the given order (:func:`make_shard_records` returns them in key
    order). Each record's members are ``{key}.{ext}``: the image first, then ``txt``, then
    ``json``, then any other entries in sorted order; ``str`` values are UTF-8 encoded and
    ``dict`` values JSON encoded. ``extra_members`` are ``(name, data)`` pairs appended
    after the records. Member mtime, mode, owner and group are fixed. A file already holding
    these bytes is left as it is (its modification time too: exports resume); another is
    replaced atomically.
    """
    first = ("jpg", "jpeg", "png", "webp", "txt", "json")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rec in records:
            key = rec["__key__"]
            exts = [e for e in first if e in rec]
            exts += sorted(e for e in rec if e not in first and e != "__key__")
            for ext in exts:
                _add_member(tar, f"{key}.{ext}", _member_bytes(rec[ext]))
        for name, data in extra_members or ():
            _add_member(tar, name, data)
    data = buffer.getbuffer()
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == len(data) and f.read() == data:
            return
    with fsio.atomic_write(LocalFileSystem(), str(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_parquet(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Write an img2dataset-style sidecar Parquet for ``records`` (in the given order).

    Columns: ``key``, ``caption``, ``url``, ``status`` (string) and ``width``, ``height``
    (int64), taken from each record's ``json`` entry.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    metas = [rec["json"] for rec in records]
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("url", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("status", pa.string()),
        ]
    )
    columns = {name: [m[name] for m in metas] for name in schema.names}
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path)


def make_demo_dataset(
    out_dir: str | os.PathLike[str],
    n_shards: int = 4,
    samples_per_shard: int = 64,
    with_parquet: bool = True,
    seed: int = 0,
    image_format: str = "jpeg",
) -> list[str]:
    """Write ``00000.tar`` (+ ``00000.parquet``), ... into ``out_dir``; return the tar paths.

    Shard ``s`` holds keys ``s * samples_per_shard .. (s + 1) * samples_per_shard - 1``,
    zero-padded to 9 digits. ``out_dir`` is created if needed; returned paths are absolute.
    """
    out = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out, exist_ok=True)
    tars = []
    for s in range(n_shards):
        records = make_shard_records(
            s * samples_per_shard, samples_per_shard, seed, image_format=image_format
        )
        tar_path = os.path.join(out, f"{s:05d}.tar")
        write_shard(tar_path, records)
        if with_parquet:
            write_parquet(os.path.join(out, f"{s:05d}.parquet"), records)
        tars.append(tar_path)
    return tars


def corrupt_jpeg(data: bytes) -> bytes:
    """Return bytes that start like the JPEG ``data`` but cannot be decoded.

    Keeps the SOI marker and the first segment (usually APP0/JFIF) and replaces the rest
    with deterministic garbage (same total length, at least 64 bytes of it) that contains no
    ``0xFF`` byte, hence no further JPEG marker.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (missing SOI marker)")
    keep = 2
    if len(data) >= 6 and data[2] == 0xFF:
        keep = min(len(data), 4 + int.from_bytes(data[4:6], "big"))
    rng = random.Random(len(data))
    garbage = bytes(rng.randrange(0xFF) for _ in range(max(len(data) - keep, 64)))
    return data[:keep] + garbage

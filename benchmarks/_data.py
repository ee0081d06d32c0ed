"""Realistic benchmark shards, built quickly from the bundled photos.

About 500 distinct JPEGs (random crops of ``dask_imgcurate/data/photos``, 300x400 ..
512x384, ~36 KB on average) are made once with ``dask_imgcurate.demo.make_images`` and
cycled over the records; every record still has its own key, caption and ``.json``. Shards
are written with the stdlib ``tarfile`` (``demo.write_shard``, PAX format, image + txt + json
per record) beside an img2dataset-style sidecar Parquet (``demo.write_parquet``).

A ``MANIFEST.json`` records the parameters; a directory whose manifest matches is reused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

from dask_imgcurate import demo

#: Image sizes for the benchmark data: ~36 KB JPEGs on average (quality 85..95).
BENCH_SIZES = ((400, 300), (384, 384), (448, 336), (512, 384), (300, 400))
MANIFEST = "MANIFEST.json"
_VERSION = 1
_STYLES = ("a photo of", "an image of", "a picture of", "a cropped photo of", "a snapshot of")
_ADJECTIVES = ("bright", "dark", "blurry", "sharp", "colorful", "old", "close-up", "wide")
_EXTRAS = ("in daylight", "on a plain background", "seen up close", "from a distance", "")


def _records(start: int, n: int, images: list[tuple[bytes, int, int]], seed: int) -> list[dict]:
    names = demo.photo_names()
    out = []
    for i in range(start, start + n):
        rng = random.Random(f"bench-reshard:{seed}:{i}")
        data, width, height = images[i % len(images)]
        key = f"{i:09d}"
        subject = names[rng.randrange(len(names))].replace("_", " ")
        caption = f"{rng.choice(_STYLES)} {rng.choice(_ADJECTIVES)} {subject}"
        extra = rng.choice(_EXTRAS)
        caption = f"{caption} {extra}" if extra else caption
        meta = {
            "key": key,
            "caption": caption,
            "url": f"https://example.com/images/{subject.replace(' ', '_')}/{key}.jpg",
            "width": width,
            "height": height,
            "original_width": width * 2,
            "original_height": height * 2,
            "status": "success",
            "similarity": round(rng.uniform(0.2, 0.4), 6),
        }
        out.append({"__key__": key, "jpg": data, "txt": caption, "json": meta})
    return out


def ensure_dataset(
    path: str,
    n_shards: int = 16,
    per_shard: int = 2000,
    n_images: int = 500,
    seed: int = 0,
    log=print,
) -> dict:
    """Build (or reuse) ``n_shards`` shards of ``per_shard`` records in ``path``.

    Returns the manifest: parameters, ``tar_bytes`` and ``total_bytes`` (tars + Parquet).
    """
    params = dict(
        version=_VERSION,
        n_shards=n_shards,
        per_shard=per_shard,
        n_images=n_images,
        seed=seed,
        sizes=[list(s) for s in BENCH_SIZES],
    )
    manifest_path = os.path.join(path, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("params") == params and all(
            os.path.exists(os.path.join(path, f"{s:05d}.tar")) for s in range(n_shards)
        ):
            return manifest
        log(f"{path}: manifest differs from the requested parameters; rebuilding")
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    started = time.perf_counter()
    log(f"building {n_shards} x {per_shard} records in {path} ...")
    images = demo.make_images(n_images, seed=seed, sizes=BENCH_SIZES)
    tar_bytes = parquet_bytes = 0
    for s in range(n_shards):
        records = _records(s * per_shard, per_shard, images, seed)
        tar = os.path.join(path, f"{s:05d}.tar")
        parquet = os.path.join(path, f"{s:05d}.parquet")
        demo.write_shard(tar, records)
        demo.write_parquet(parquet, records)
        tar_bytes += os.path.getsize(tar)
        parquet_bytes += os.path.getsize(parquet)
    manifest = dict(
        params=params,
        records=n_shards * per_shard,
        tar_bytes=tar_bytes,
        total_bytes=tar_bytes + parquet_bytes,
    )
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"built {tar_bytes / 1e9:.2f} GB of tars in {time.perf_counter() - started:.0f} s")
    return manifest

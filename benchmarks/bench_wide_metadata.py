"""Peak memory of exports whose metadata is wide: 768-float32 embeddings in the sidecars.

Builds ``--shards`` shards of 1000 tiny records each (a few hundred bytes of image, a
caption, a json), whose sidecar Parquet holds ``key`` and a 768-d ``image_embedding``
(3 KB per record: the metadata is larger than the images), under ``bench-data/wide-N``.
Each of ``to_webdataset``, ``write_images`` and ``save_metadata`` then runs in a fresh
process (synchronous scheduler); the table gives its seconds and its peak RSS above the
process's RSS after loading. Memory that stays flat as ``--shards`` grows means an export
holds no more than a few shards' metadata at once. ``--dim 0`` leaves the embedding out
(sidecars of keys only, under ``bench-data/records-N-d0``): memory per record, not per column.

Usage::

    python benchmarks/bench_wide_metadata.py --shards 50,150
    python benchmarks/bench_wide_metadata.py --shards 250,500,1000 --dim 0
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PER_SHARD = 1000


def build(directory: str, shards: int, dim: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(os.path.join(directory, "done")):
        return
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    for s in range(shards):
        keys = [f"{s:05d}{r:04d}" for r in range(PER_SHARD)]
        with tarfile.open(os.path.join(directory, f"{s:05d}.tar"), "w") as tar:
            for key in keys:
                for ext, data in (("jpg", key.encode() * 30), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        table = pa.table({"key": keys})
        if dim:
            values = pa.array(rng.standard_normal(PER_SHARD * dim, dtype=np.float32))
            offsets = pa.array(np.arange(0, PER_SHARD * dim + 1, dim, dtype=np.int32))
            table = table.append_column(
                "image_embedding", pa.ListArray.from_arrays(offsets, values)
            )
        pq.write_table(table, os.path.join(directory, f"{s:05d}.parquet"))
    open(os.path.join(directory, "done"), "w").close()


def measure(data: str, mode: str) -> None:
    """In this process: one export of ``data``; prints seconds and peak RSS above base."""
    import threading
    import time
    import warnings

    import dask
    import psutil

    from dask_imgcurate import ImageTextPairDataset

    peak = [0]
    process = psutil.Process()

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    warnings.simplefilter("ignore")
    out = tempfile.mkdtemp(prefix="bench-wide-")
    with dask.config.set(scheduler="synchronous"):
        ds = ImageTextPairDataset.from_webdataset(data)
        base = process.memory_info().rss
        threading.Thread(target=watch, daemon=True).start()
        started = time.perf_counter()
        if mode == "to_webdataset":
            ds.to_webdataset(out, samples_per_shard=5000)
        elif mode == "write_images":
            ds.write_images(out, images_per_tar=5000)
        else:
            ds.save_metadata(out)
        seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    print(f"{seconds:.1f} {(peak[0] - base) / 2**20:.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="50,150", help="comma-separated shard counts")
    parser.add_argument("--dim", type=int, default=768, help="embedding size (0: none)")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # DATA MODE (internal)
    args = parser.parse_args(argv)
    if args.measure:
        measure(*args.measure)
        return 0
    print("| records | embeddings MB | export | seconds | peak RSS above base, MB |")
    print("|---:|---:|---|---:|---:|")
    for shards in (int(n) for n in args.shards.split(",")):
        name = f"wide-{shards}" if args.dim == 768 else f"records-{shards}-d{args.dim}"
        data = os.path.join(ROOT, "bench-data", name)
        build(data, shards, args.dim)
        for mode in ("to_webdataset", "write_images", "save_metadata"):
            command = [sys.executable, __file__, "--measure", data, mode]
            seconds, rss = subprocess.run(
                command, check=True, capture_output=True, text=True
            ).stdout.split()
            mb = shards * PER_SHARD * args.dim * 4 / 2**20
            print(f"| {shards * PER_SHARD} | {mb:.0f} | {mode} | {seconds} | {rss} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export of many small shards: is the per-shard cost flat as the shard count grows?

LAION-size datasets have 10^4 - 10^5 shards. This builds (once, under ``--data``) shards of
4 tiny records each (``.jpg`` of random bytes + ``.txt`` + ``.json``: nothing to copy, so
only per-shard and per-task costs remain) and times ``from_webdataset`` + ``to_webdataset``
(1000 records per output shard, synchronous scheduler, each count in a fresh process) for
each ``--counts`` value. Linear scaling means equal ms per shard.

Usage::

    python benchmarks/bench_many_shards.py [--counts 1500,3000,6000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

RUN = """
import shutil, sys, time, dask
from dask_imgcurate import ImageTextPairDataset
data, out = sys.argv[1:3]
shutil.rmtree(out, ignore_errors=True)
with dask.config.set(scheduler="synchronous"):
    start = time.perf_counter()
    summary = ImageTextPairDataset.from_webdataset(data).to_webdataset(out, samples_per_shard=1000)
    print(time.perf_counter() - start, summary.records_out)
shutil.rmtree(out, ignore_errors=True)
"""


def build(directory: Path, count: int) -> None:
    if directory.exists() and len(list(directory.glob("*.tar"))) == count:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for s in range(count):
        with tarfile.open(directory / f"{s:06d}.tar", "w") as tar:
            for r in range(4):
                key = f"{s:06d}{r:04d}"
                for ext, data in (
                    ("jpg", b"\xff\xd8" + os.urandom(300)),
                    ("txt", b"a caption"),
                    ("json", json.dumps({"key": key, "width": r}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bench-data/many")
    parser.add_argument("--counts", default="1500,3000,6000")
    args = parser.parse_args()
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        data = Path(args.data) / str(count)
        build(data, count)
        proc = subprocess.run(
            [sys.executable, "-c", RUN, str(data), f"{args.data}/out"],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds, records = proc.stdout.split()
        assert int(records) == 4 * count, proc.stdout
        rows.append((count, float(seconds)))
    print("| shards | export s | ms per shard |\n|---:|---:|---:|")
    for count, seconds in rows:
        print(f"| {count} | {seconds:.2f} | {1000 * seconds / count:.2f} |")


if __name__ == "__main__":
    main()

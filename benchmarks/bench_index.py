"""Benchmark: indexing WebDataset shards from tar headers vs. ``tarfile`` and raw reads.

Builds (once; cached under ``--data``) about 1 GB of realistic shards with the demo
generator: a pool of real-photo JPEGs (~40 KB) is generated once and cycled, each record
being ``.jpg`` + ``.txt`` + ``.json``. DALI ``.idx`` files are written beside the shards.
Then, with the page cache warm, it times (median of ``--repeat`` runs) over all shards:

- ``scan_tar`` (headers only, through an mmap),
- ``scan_tar`` + ``group_records`` (the full index used by ``from_webdataset``),
- loading the existing ``.idx`` files (``index_shard``: parse + group),
- ``tarfile.open(...).getmembers()`` (the stdlib reference),
- ``cat`` of the shards to ``/dev/null`` (reading every byte once).

Run from the repository root::

    python benchmarks/bench_index.py [--data bench-data/index] [--gb 1.0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dask_imgcurate import demo  # noqa: E402
from dask_imgcurate.io import fs as fsio  # noqa: E402
from dask_imgcurate.io.records import group_records  # noqa: E402
from dask_imgcurate.io.shards import Shard, index_shard, write_dali_index  # noqa: E402
from dask_imgcurate.io.tarindex import scan_tar  # noqa: E402

SIZES = ((512, 384), (448, 336), (384, 384), (384, 512))
POOL = 400
MANIFEST = "manifest.json"


def _padded(n: int) -> int:
    return 512 + -(-n // 512) * 512


def build(data: Path, n_shards: int, target_bytes: int, seed: int = 0) -> dict:
    """Write the shards (and their .idx) unless a manifest for the same settings exists."""
    settings = {
        "n_shards": n_shards,
        "target_bytes": target_bytes,
        "seed": seed,
        "pool": POOL,
        "sizes": [list(s) for s in SIZES],
    }
    manifest = data / MANIFEST
    if manifest.exists():
        info = json.loads(manifest.read_text())
        if info.get("settings") == settings and all(
            (data / name).exists() for name in info["files"]
        ):
            return info
    data.mkdir(parents=True, exist_ok=True)
    for old in data.glob("*.tar"):
        old.unlink()
    t0 = time.perf_counter()
    pool = demo.make_shard_records(0, POOL, seed, sizes=SIZES)
    per_record = statistics.mean(
        _padded(len(r["jpg"]))
        + _padded(len(r["txt"].encode()))
        + _padded(len(json.dumps(r["json"], separators=(",", ":")).encode()))
        for r in pool
    )
    per_shard = -(-int(target_bytes * 1.01) // (n_shards * int(per_record)))  # 1% margin

    def records(shard: int):
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            base = pool[i % POOL]
            key = f"{i:09d}"
            yield {
                "__key__": key,
                "jpg": base["jpg"],
                "txt": base["txt"],
                "json": {**base["json"], "key": key},
            }

    files = []
    for s in range(n_shards):
        tar = data / f"{s:05d}.tar"
        tmp = data / f".{s:05d}.tar.tmp"
        demo.write_shard(tmp, records(s))
        os.replace(tmp, tar)
        write_dali_index(str(tar))
        files += [tar.name, tar.with_suffix(".idx").name]
    info = {
        "settings": settings,
        "files": files,
        "records": n_shards * per_shard,
        "members": 3 * n_shards * per_shard,
        "bytes": sum((data / f).stat().st_size for f in files if f.endswith(".tar")),
        "mean_jpeg_bytes": round(statistics.mean(len(r["jpg"]) for r in pool)),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    manifest.write_text(json.dumps(info, indent=1))
    return info


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{model}, nproc={nproc or os.cpu_count()}, Python {platform.python_version()}"


def _index_members(tar: str) -> int:
    """Records + members of one shard as the library loads it (a worker's task)."""
    return len(index_shard(LocalFileSystem(), Shard(tar=tar)).members)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data", default="bench-data/index", help="cache directory for shards")
    ap.add_argument("--gb", type=float, default=1.0, help="total shard size to build (GB)")
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    data = Path(args.data).resolve()
    info = build(data, args.shards, int(args.gb * 1e9))
    tars = sorted(str(p) for p in data.glob("*.tar"))
    fs = LocalFileSystem()
    members = info["members"]

    def ours_scan():
        n = 0
        for tar in tars:
            with fsio.open_buffer(fs, tar) as buffer:
                n += len(scan_tar(buffer, tar))
        return n

    def ours_records():
        n = 0
        for tar in tars:
            with fsio.open_buffer(fs, tar) as buffer:
                n += len(group_records(scan_tar(buffer, tar)).members)
        return n

    def from_idx():
        n = 0
        for tar in tars:
            n += len(index_shard(fs, Shard(tar=tar, idx=tar[: -len(".tar")] + ".idx")).members)
        return n

    workers = os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers)  # started (and warmed) before any timing

    def ours_parallel():
        return sum(pool.map(_index_members, tars))

    def stdlib_tarfile():
        n = 0
        for tar in tars:
            with tarfile.open(tar, "r:") as t:
                n += sum(1 for m in t.getmembers() if m.isreg())
        return n

    def cat():
        with open(os.devnull, "wb") as null:
            subprocess.run(["cat", *tars], stdout=null, check=True)
        return members

    cases = [
        ("`scan_tar` (mmap, headers only)", ours_scan),
        ("`scan_tar` + `group_records`", ours_records),
        (f"`index_shard`, one task per shard on {workers} processes", ours_parallel),
        ("load existing `.idx` (`index_shard`)", from_idx),
        ("stdlib `tarfile` `getmembers()`", stdlib_tarfile),
        ("`cat` shards > /dev/null", cat),
    ]
    cat()  # warm the page cache
    times = {}
    for name, fn in cases:
        assert fn() == members, name  # warm-up run, and every method sees every member
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)

    pool.shutdown()
    ref = times["stdlib `tarfile` `getmembers()`"]
    print(f"Machine: {machine()}")
    print(
        f"Data: {len(tars)} shards, {info['bytes'] / 1e9:.2f} GB, {info['records']} records, "
        f"{members} members (mean JPEG {info['mean_jpeg_bytes'] / 1e3:.1f} KB), page cache warm; "
        f"median of {args.repeat} runs"
    )
    print()
    print("| method | seconds | members/s | speed-up vs tarfile |")
    print("|---|---:|---:|---:|")
    for name, _ in cases:
        t = times[name]
        print(f"| {name} | {t:.4f} | {members / t:,.0f} | {ref / t:.1f}x |")


if __name__ == "__main__":
    main()

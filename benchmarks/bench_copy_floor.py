"""What copying the reshard benchmark's bytes costs on this machine, without the library.

Companion to ``bench_reshard.py`` (same data, ``bench-data/reshard``): it measures the floors
an export is bounded by, each on 1 and on 2 processes (the shards split between them):

``cp``            ``cp -r`` of all shards (coreutils copies in-kernel: ``copy_file_range``).
``cfr-whole``     ``os.copy_file_range`` of every whole shard: the same in-kernel copy.
``pread-write``   ``os.preadv`` 8 MB at a time into one reused buffer + ``os.pwrite``: a
                  plain user-space copy of every byte.
``cfr-members``   the kept 70 % of members (``crc32(key) % 100 < 70``) copied in-kernel, one
                  ``copy_file_range`` per payload plus one ``pwrite`` per (new) header: an
                  export that never copies through user space. Headers from ``scan_tar``.
``ours-halves``   the library's synchronous export (as ``ours-1w`` in ``bench_reshard.py``)
                  run as independent processes on disjoint halves of the shards: the
                  parallel speed-up of the work itself, without a Dask cluster.

Best of ``--repeat`` runs each (minimum: these are floors), warm page cache, outputs removed
and ``sync`` run between runs. Usage::

    python benchmarks/bench_copy_floor.py              # after bench_reshard.py built the data
"""

from __future__ import annotations

import argparse
import glob
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from multiprocessing import get_context

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
CHUNK = 8 << 20


def _out(out: str, path: str) -> int:
    return os.open(os.path.join(out, os.path.basename(path)), os.O_WRONLY | os.O_CREAT, 0o644)


def cfr_whole(paths: list[str], out: str) -> None:
    for path in paths:
        src, dst = os.open(path, os.O_RDONLY), _out(out, path)
        size, done = os.fstat(src).st_size, 0
        while done < size:
            done += os.copy_file_range(src, dst, size - done)
        os.close(src)
        os.close(dst)


def pread_write(paths: list[str], out: str) -> None:
    view = memoryview(bytearray(CHUNK))
    for path in paths:
        src, dst = os.open(path, os.O_RDONLY), _out(out, path)
        offset = 0
        while n := os.preadv(src, [view], offset):
            os.pwrite(dst, view[:n], offset)
            offset += n
        os.close(src)
        os.close(dst)


def cfr_members(paths: list[str], out: str) -> None:
    from dask_imgcurate.io.tarindex import scan_tar

    header = bytes(512)  # stands in for a new header: same size, same system call
    for path in paths:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        index = scan_tar(buffer, path)
        buffer.close()
        src, dst = os.open(path, os.O_RDONLY), _out(out, path)
        at = 0
        for name, offset, size in zip(index.names, index.offsets.tolist(), index.sizes.tolist()):
            if zlib.crc32(name.split(".")[0].encode()) % 100 >= 70:
                continue
            os.pwrite(dst, header, at)
            at += 512
            padded, done = size + -size % 512, 0
            while done < padded:
                done += os.copy_file_range(src, dst, padded - done, offset + done, at + done)
            at += padded
        os.close(src)
        os.close(dst)


def ours(paths: list[str], out: str) -> None:
    import dask
    from bench_reshard import keep_series

    from dask_imgcurate import ImageTextPairDataset

    source = tempfile.mkdtemp(prefix="bench-floor-src-")
    for path in paths:  # this process's shards, with their sidecar Parquet
        for p in (path, path[: -len(".tar")] + ".parquet"):
            os.symlink(p, os.path.join(source, os.path.basename(p)))
    with dask.config.set(scheduler="synchronous"):
        ds = ImageTextPairDataset.from_webdataset(source)
        frame = ds.metadata
        keep = frame[ds.id_col].map_partitions(keep_series, meta=("keep", bool))
        ds = ds.with_metadata(frame.assign(keep=keep))
        ds.to_webdataset(out, filter_column="keep", samples_per_shard=5000, resume=False)
    shutil.rmtree(source)


METHODS = {"cfr-whole": cfr_whole, "pread-write": pread_write, "cfr-members": cfr_members}


def _worker(args: tuple) -> float:
    name, paths, out, start = args
    if name == "ours-halves":  # imports and first-call costs are not what is measured
        warm = tempfile.mkdtemp(prefix="bench-floor-warm-")
        ours(paths[:1], warm)
        shutil.rmtree(warm)
    while time.time() < start:  # both processes start together
        time.sleep(0.0005)
    began = time.perf_counter()
    (ours if name == "ours-halves" else METHODS[name])(paths, out)
    return time.perf_counter() - began


def run(name: str, paths: list[str], processes: int, root: str) -> float:
    """Seconds until the last process finished."""
    outs = [os.path.join(root, f"{name}-{i}") for i in range(processes)]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    os.sync()
    if name == "cp":
        started = time.perf_counter()
        procs = [
            subprocess.Popen(["cp", "-r", *paths[i::processes], outs[i]]) for i in range(processes)
        ]
        for proc in procs:
            proc.wait()
        return time.perf_counter() - started
    start = time.time() + (6.0 if name == "ours-halves" else 1.0)
    jobs = [(name, paths[i::processes], outs[i], start) for i in range(processes)]
    if name == "ours-halves" and processes == 1:
        jobs = [(name, paths, outs[0], start)]
    with get_context("spawn").Pool(processes) as pool:
        return max(pool.map(_worker, jobs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "bench-data", "reshard"))
    parser.add_argument("--out-root", default=os.path.join(ROOT, "bench-data", "floor-out"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.data, "*.tar")))
    if not paths:
        raise SystemExit(f"no shards in {args.data}: run benchmarks/bench_reshard.py first")
    total = sum(os.path.getsize(p) for p in paths)
    print(f"{len(paths)} shards, {total / 1e9:.2f} GB; best of {args.repeat}\n")
    print("| method | 1 process s | 2 processes s | speed-up |")
    print("|---|---:|---:|---:|")
    for name in ("cp", "cfr-whole", "pread-write", "cfr-members", "ours-halves"):
        one = min(run(name, paths, 1, args.out_root) for _ in range(args.repeat))
        two = min(run(name, paths, 2, args.out_root) for _ in range(args.repeat))
        print(f"| `{name}` | {one:.3f} | {two:.3f} | {one / two:.2f}x |", flush=True)
    shutil.rmtree(args.out_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

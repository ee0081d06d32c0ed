"""Indexing remote tars without ``.idx``: a chunked copy to a temporary file against the
whole tar in one GET, in memory.

The first ``--shards`` shards of ``bench-data/reshard`` (~79 MB each) are served over HTTP
by ``bench_remote_export.serve`` (``--latency`` s per answer, at most ``--mbps`` MB/s per
connection). Each contender runs in a fresh process, alternating, ``--repeat`` times, and
indexes the shards one after another (``index_shard``, as a partition does):

``chunked``  ``fsio.download``: ``DOWNLOAD_CHUNK`` bytes per GET, ``DOWNLOAD_BATCH`` GETs in
             flight, written to an anonymous temporary file that is memory-mapped and scanned
``whole``    one GET of the whole tar into memory, then scanned (what loading did before)

Both must find the same members. Prints seconds (median, min-max) and the process's peak
RSS above what it held after a warm-up on a small file: all of it, and its anonymous part
(sampled every millisecond; the rest is file pages the kernel may drop).

    python benchmarks/bench_remote_index.py --latency 0.03 --mbps 100 --repeat 3
    python benchmarks/bench_remote_index.py --joined   # one 315 MB tar instead of four
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import sys
import tarfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _data  # noqa: E402
import bench_remote_export  # noqa: E402

CONTENDERS = ("chunked", "whole")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _anon_mb() -> float:
    """This process's anonymous resident memory (not file pages, which the kernel can
    drop: the temporary copy's, mapped to be scanned)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


class AnonPeak(threading.Thread):
    """The largest ``_anon_mb`` seen, sampled every millisecond until ``stop``."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = _anon_mb(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _anon_mb())

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak


def run(name: str, urls: list[str], answer, chunk: int, batch: int) -> None:
    """Index ``urls`` one after another; put (seconds, peak RSS growth MB, peak anonymous
    RSS growth MB, members) on ``answer``."""
    import io
    import tarfile

    import fsspec

    from dask_imgcurate.io import fs as fsio
    from dask_imgcurate.io.shards import Shard, index_shard
    from dask_imgcurate.io.tarindex import scan_tar

    http = fsspec.filesystem("http")
    fsio.DOWNLOAD_CHUNK, fsio.DOWNLOAD_BATCH = (
        chunk or fsio.DOWNLOAD_CHUNK,
        batch or fsio.DOWNLOAD_BATCH,
    )

    def index(url: str):
        if name == "chunked":
            return index_shard(http, Shard(tar=url)).members
        return scan_tar(fsio.read_bytes(http, url), url)

    small = io.BytesIO()  # warm-up: imports, first-call costs, the HTTP session
    with tarfile.open(fileobj=small, mode="w") as tf:
        tf.addfile(tarfile.TarInfo("0.txt"))
    scan_tar(small.getvalue())
    http.size(urls[0])
    base, anon_base, sampler = _peak_mb(), _anon_mb(), AnonPeak()
    sampler.start()
    started = time.perf_counter()
    members = sum(len(index(url)) for url in urls)
    seconds = time.perf_counter() - started
    answer.put((seconds, _peak_mb() - base, sampler.stop() - anon_base, members))


def joined(data: str, tars: list[str]) -> str:
    """A directory holding ``joined.tar``, the members of ``tars`` in one tar (made once)."""
    root = os.path.join(os.path.dirname(data), f"remote-index-{len(tars)}")
    target = os.path.join(root, "joined.tar")
    if not os.path.exists(target):
        os.makedirs(root, exist_ok=True)
        with tarfile.open(target + ".part", "w", format=tarfile.USTAR_FORMAT) as out:
            for name in tars:
                with tarfile.open(os.path.join(data, name)) as tf:
                    for member in tf:
                        out.addfile(member, tf.extractfile(member))
        os.rename(target + ".part", target)
    return root


def main(argv=None) -> int:
    parser = bench_remote_export.server_arguments(__doc__)
    parser.add_argument("--chunk-mb", type=float, default=0, help="DOWNLOAD_CHUNK (0: default)")
    parser.add_argument("--batch", type=int, default=0, help="DOWNLOAD_BATCH (0: default)")
    parser.add_argument(
        "--joined", action="store_true", help="index one tar holding the shards' members"
    )
    args = parser.parse_args(argv)

    _data.ensure_dataset(args.data, log=lambda m: print(m, file=sys.stderr))
    tars = sorted(n for n in os.listdir(args.data) if n.endswith(".tar"))[: args.shards]
    if args.joined:
        args.data, tars = joined(args.data, tars), ["joined.tar"]
    server, base_url, _ = bench_remote_export.start_server(args.data, tars, args.latency, args.mbps)
    urls = [f"{base_url}/{t}" for t in tars]
    spawn = mp.get_context("spawn")
    results: dict[str, list[tuple[float, float, float, int]]] = {c: [] for c in CONTENDERS}
    try:
        for round_ in range(args.repeat):
            for name in CONTENDERS:
                answer = spawn.Queue()
                child = spawn.Process(
                    target=run, args=(name, urls, answer, int(args.chunk_mb * 2**20), args.batch)
                )
                child.start()
                result = answer.get()
                child.join()
                results[name].append(result)
                print(
                    f"round {round_ + 1} {name:<8} {result[0]:6.2f} s  +{result[1]:4.0f} MB RSS  "
                    f"+{result[2]:4.0f} MB anonymous",
                    file=sys.stderr,
                )
    finally:
        server.terminate()
    counts = {runs[0][3] for runs in results.values()}
    assert len(counts) == 1, f"the contenders found different members: {counts}"
    mb = sum(os.path.getsize(os.path.join(args.data, t)) for t in tars) / 1e6
    cap = f"{args.mbps:g} MB/s per connection" if args.mbps else "no bandwidth cap"
    print(
        f"## Remote indexing: {len(tars)} tars, {mb:.0f} MB over HTTP, "
        f"{args.latency * 1000:g} ms per request, {cap}\n"
    )
    print("| contender | s (median) | min–max | peak RSS growth MB | of it anonymous MB |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        times = [r[0] for r in runs]
        print(
            f"| {name} | {statistics.median(times):.2f} | {min(times):.2f}–{max(times):.2f} | "
            f"{max(r[1] for r in runs):.0f} | {max(r[2] for r in runs):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

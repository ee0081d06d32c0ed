"""Export from a remote store: concurrent ranged GETs against one range at a time.

The shards of ``bench-data/reshard`` (the first ``--shards`` of them) are served over HTTP
from a separate process that answers every request after ``--latency`` seconds (an object
store's time to first byte) and sends at most ``--mbps`` MB/s per connection (0: no cap).
The dataset is loaded and its metadata persisted untimed (without ``.idx`` files loading
reads each tar whole to index it); then, alternating, ``--repeat`` times each:

``download``       fsspec ``get`` of the input tars, whole, concurrently: every byte once
                   (the ``cp -r`` of a store)
``ours``           ``to_webdataset(filter_column="keep")`` with its remote reads: members
                   merged across gaps up to ``REMOTE_MAX_GAP``, ``REMOTE_MAX_READ`` per GET,
                   ``REMOTE_BATCH`` bytes of GETs in flight at once
``one-at-a-time``  the same export reading as it does local files: one ranged GET after
                   another, gaps up to ``MAX_GAP`` merged, ``MAX_READ`` per GET (what the
                   writer did before it fetched remote ranges concurrently)

The filter keeps ~70 % (``bench_reshard.keep_key``). Both exports' tars must be
byte-identical. Prints seconds (median, min-max), GETs and MB served per run.

    python benchmarks/bench_remote_export.py --latency 0.03 --mbps 100 --repeat 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _data  # noqa: E402
import bench_reshard  # noqa: E402

CONTENDERS = ("download", "ours", "one-at-a-time")


def serve(root: str, names: list[str], latency: float, mbps: float, port, counters) -> None:
    """Serve ``names`` from ``root`` with byte ranges, ``latency`` s before each answer."""
    files = {n: open(os.path.join(root, n), "rb").read() for n in names}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, head: bool) -> None:
            time.sleep(latency)
            data = files.get(self.path.lstrip("/"))
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            body, status = data, 200
            if wanted and not head:
                start = int(wanted.group(1))
                end = int(wanted.group(2)) + 1 if wanted.group(2) else len(data)
                body, status = data[start:end], 206
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            with counters.get_lock():
                counters[0] += 1
                counters[1] += len(body)
            step = 1 << 20
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                if mbps:
                    time.sleep(min(step, len(body) - i) / (mbps * 1e6))

        def do_HEAD(self):
            self._answer(head=True)

        def do_GET(self):
            self._answer(head=False)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    server = Server(("127.0.0.1", 0), Handler)
    port.value = server.server_address[1]
    server.serve_forever()


def server_arguments(doc: str) -> argparse.ArgumentParser:
    """A parser with the options of the served shards and of the server."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(bench_reshard.ROOT, "bench-data", "reshard"))
    parser.add_argument("--shards", type=int, default=4, help="input shards served")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds before each answer")
    parser.add_argument("--mbps", type=float, default=100.0, help="MB/s per connection (0: no cap)")
    parser.add_argument("--repeat", type=int, default=3)
    return parser


def start_server(root: str, names: list[str], latency: float, mbps: float):
    """``serve`` in a forked process: (the process, its base URL, its counters of GETs and
    bytes sent)."""
    fork = mp.get_context("fork")
    counters, port = fork.Array("q", 2), fork.Value("i", 0)
    server = fork.Process(
        target=serve, args=(root, names, latency, mbps, port, counters), daemon=True
    )
    server.start()
    while not port.value:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{port.value}", counters


def main(argv=None) -> int:
    parser = server_arguments(__doc__)
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    args = parser.parse_args(argv)

    import dask
    import fsspec

    from dask_imgcurate import ImageTextPairDataset
    from dask_imgcurate.io import writer

    _data.ensure_dataset(args.data, log=lambda m: print(m, file=sys.stderr))
    tars = sorted(n for n in os.listdir(args.data) if n.endswith(".tar"))[: args.shards]
    names = [n for t in tars for n in (t, t[:-4] + ".parquet")]
    server, base_url, counters = start_server(args.data, names, args.latency, args.mbps)
    urls = [f"{base_url}/{t}" for t in tars]
    input_mb = sum(os.path.getsize(os.path.join(args.data, t)) for t in tars) / 1e6
    scratch = tempfile.mkdtemp(prefix="bench-remote-")
    concurrent = {
        k: getattr(writer, k) for k in ("REMOTE_MAX_GAP", "REMOTE_MAX_READ", "REMOTE_BATCH")
    }
    serial = dict(REMOTE_MAX_GAP=writer.MAX_GAP, REMOTE_MAX_READ=writer.MAX_READ, REMOTE_BATCH=1)
    results: dict[str, list[tuple[float, int, int]]] = {c: [] for c in CONTENDERS}
    try:
        with dask.config.set(scheduler="synchronous"):
            ds = ImageTextPairDataset.from_webdataset(urls)
            keep = ds.metadata[ds.id_col].map_partitions(
                bench_reshard.keep_series, meta=("keep", bool)
            )
            ds = ds.with_metadata(ds.metadata.assign(keep=keep).persist())
            http = fsspec.filesystem("http")
            for round_ in range(args.repeat):
                for name in CONTENDERS:
                    out = os.path.join(scratch, name)
                    shutil.rmtree(out, ignore_errors=True)
                    counters[0] = counters[1] = 0
                    started = time.perf_counter()
                    if name == "download":
                        os.makedirs(out)
                        http.get(urls, out + "/")
                    else:
                        for key, value in (concurrent if name == "ours" else serial).items():
                            setattr(writer, key, value)
                        ds.to_webdataset(
                            out,
                            filter_column="keep",
                            samples_per_shard=args.samples_per_shard,
                            resume=False,
                        )
                    seconds = time.perf_counter() - started
                    results[name].append((seconds, counters[0], counters[1]))
                    print(
                        f"round {round_ + 1} {name:<14} {seconds:6.2f} s  {counters[0]:5d} GETs  "
                        f"{counters[1] / 1e6:7.1f} MB",
                        file=sys.stderr,
                    )
                ours, serial_out = (os.path.join(scratch, n) for n in ("ours", "one-at-a-time"))
                for tar in sorted(os.listdir(ours)):
                    with open(os.path.join(ours, tar), "rb") as a:
                        with open(os.path.join(serial_out, tar), "rb") as b:
                            assert a.read() == b.read(), f"{tar} differs between the exports"
    finally:
        server.terminate()
        shutil.rmtree(scratch, ignore_errors=True)
    base = statistics.median(s for s, _, _ in results["one-at-a-time"])
    cap = f"{args.mbps:g} MB/s per connection" if args.mbps else "no bandwidth cap"
    print(
        f"## Remote export: {len(tars)} shards, {input_mb:.0f} MB over HTTP, "
        f"{args.latency * 1000:g} ms per request, {cap}\n"
    )
    print("| contender | s (median) | min–max | GETs | MB served | x one-at-a-time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        times = [s for s, _, _ in runs]
        median = statistics.median(times)
        print(
            f"| {name} | {median:.2f} | {min(times):.2f}–{max(times):.2f} | {runs[-1][1]} | "
            f"{runs[-1][2] / 1e6:.0f} | {base / median:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

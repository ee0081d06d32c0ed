"""Where a ``LocalCluster`` export's time goes: repeated exports in one long-lived cluster.

Companion to ``bench_reshard.py`` (same data and export: ``bench-data/reshard``, the 70 %
filter, 5000 records per output shard). ``bench_reshard.py`` times one export per fresh
process; this keeps one cluster of ``--workers`` worker processes (1 thread each) and runs
``--runs`` full exports after an untimed first one, reporting for each:

- wall seconds of the export (load + filter + ``to_webdataset``);
- CPU seconds of the client process: its main thread (graph building, planning) and its
  other threads (the scheduler and the client's communication, which share the process);
- CPU seconds of each worker process;
- from the task stream: seconds the tasks computed per worker, the number of tasks, and
  when the first task started.

Usage::

    python benchmarks/bench_cluster_overhead.py --workers 1
    python benchmarks/bench_cluster_overhead.py --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def export_once(data: str, out: str, per_shard: int) -> tuple[float, float]:
    """One export as ``bench_reshard.py`` times it; returns (start, end) in ``time.time()``."""
    from bench_reshard import keep_series

    from dask_imgcurate import ImageTextPairDataset

    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    ds = ImageTextPairDataset.from_webdataset(data)
    frame = ds.metadata
    keep = frame[ds.id_col].map_partitions(keep_series, meta=("keep", bool))
    ds = ds.with_metadata(frame.assign(keep=keep))
    ds.to_webdataset(out, filter_column="keep", samples_per_shard=per_shard, resume=False)
    return started, time.time()


def measure(client, data: str, out: str, per_shard: int) -> dict:
    from distributed import get_task_stream

    cpu0, main0 = time.process_time(), time.thread_time()
    workers0 = client.run(time.process_time)
    with get_task_stream(client) as stream:
        started, ended = export_once(data, out, per_shard)
    cpu1, main1 = time.process_time(), time.thread_time()
    workers1 = client.run(time.process_time)
    busy: dict[str, float] = defaultdict(float)
    first, tasks = ended, 0
    for task in stream.data:
        for span in task["startstops"]:
            if span["action"] == "compute":
                busy[task["worker"]] += span["stop"] - span["start"]
                first = min(first, span["start"])
                tasks += 1
    shutil.rmtree(out, ignore_errors=True)
    return dict(
        seconds=ended - started,
        client_main_cpu=main1 - main0,
        client_other_cpu=(cpu1 - cpu0) - (main1 - main0),
        worker_cpu=[workers1[w] - workers0[w] for w in sorted(workers0)],
        task_seconds=[busy[w] for w in sorted(busy)],
        tasks=tasks,
        first_task=first - started,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", default=os.path.join(ROOT, "bench-data", "reshard"))
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        parser.error(f"{args.data}: run benchmarks/bench_reshard.py first (it builds the data)")

    from distributed import Client, LocalCluster

    out = tempfile.mkdtemp(prefix="bench-cluster-overhead-")
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        export_once(args.data, out, args.samples_per_shard)  # untimed: first-call costs
        rows = [measure(client, args.data, out, args.samples_per_shard) for _ in range(args.runs)]
    shutil.rmtree(out, ignore_errors=True)

    def fmt(values) -> str:
        return " / ".join(f"{v:.3f}" for v in values)

    print(f"LocalCluster, {args.workers} worker process(es) x 1 thread, {args.data}")
    print("run | s | client main CPU | client other CPU | worker CPU | task s | tasks | first")
    for i, r in enumerate(rows, 1):
        print(
            f"{i} | {r['seconds']:.3f} | {r['client_main_cpu']:.3f} | "
            f"{r['client_other_cpu']:.3f} | {fmt(r['worker_cpu'])} | {fmt(r['task_seconds'])} | "
            f"{r['tasks']} | {r['first_task']:.3f}"
        )
    print(f"median seconds: {statistics.median(r['seconds'] for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

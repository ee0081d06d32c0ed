"""Reshard benchmark: filter ~70 % of >= 1 GB of WebDataset shards into 5000-record shards.

Contenders, all in one run, each timed as its own subprocess (warm page cache, fresh output
directory every time, median of ``--repeat`` runs, round-robin so that drift hits all alike):

``cp``              ``cp -r`` of the input directory (all its bytes; the floor to beat).
``ours-1w``         ``ImageTextPairDataset.from_webdataset`` on the raw tars (no ``.idx``:
                    header indexing included) -> ``keep`` column -> ``to_webdataset(...,
                    filter_column="keep", samples_per_shard=5000, resume=False)``, dask
                    ``synchronous`` scheduler.
``ours-threads2``   the same with dask's threaded scheduler, 2 threads.
``ours-dist1``      the same on ``distributed.LocalCluster(n_workers=1, threads_per_worker=1,
                    processes=True)``: one worker with the cluster's machinery, the like-for-
                    like base for ``ours-dist2``.
``ours-dist2``      the same on ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
                    processes=True)`` (cluster start and worker imports are setup, not timed).
``legacy``          the legacy serial algorithm, re-implemented faithfully: metadata from the
                    sidecar Parquet (no tar indexing), filtered and written as a temporary
                    Parquet per partition; then one loop on the driver over (temp Parquet, tar)
                    pairs, ``tarfile`` ``getmembers()`` + ``extractfile().read()`` of the kept
                    members, records re-keyed ``shard * 10**ceil(log10(S)) + pos`` and written
                    with ``tarfile`` plus one Parquet per output shard.
``wds``             a plain script on ``webdataset``: key set from the Parquet, then
                    ``wds.WebDataset(urls, shardshuffle=False)`` -> filter -> renamed samples
                    -> ``wds.ShardWriter(pattern, maxcount=5000)``.

Data: ``--data`` (default ``bench-data/reshard``, built once and reused: 16 shards x 2000
records, 1.26 GB, see ``_data.py``). Filter: ``crc32(key) % 100 < 70`` (keeps 69.8 %).
Times are the work inside each process, after interpreter start, imports and one untimed
warm-up run of the contender's own code on a tiny 2-shard dataset (lazy imports and
first-call costs, which every Python contender pays once per process and ``cp`` does not;
reported as setup, with LocalCluster start); the whole process wall time is shown too.
Peak RSS is the largest single process of the run (GNU ``time`` %M: the process and every
descendant it reaped) and the peak sum over the process tree (psutil, sampled every 50 ms).
The machine may be shared: before each run the benchmark waits (``--idle-threshold``,
``--idle-timeout``) for other processes to calm down, and reports the share of CPU they
took during each run. Outputs are checked at the end (record counts, new keys, sha256 of the
members of 300 sampled records against the input; ours byte-identical across schedulers).
A full run takes 6-11 minutes. To measure a modified copy of the package, put it first on
``PYTHONPATH``: the contenders' subprocesses inherit it.

Usage::

    python benchmarks/bench_reshard.py                 # build/reuse bench-data/reshard, run all
    python benchmarks/bench_reshard.py --repeat 3 --contenders cp,ours-1w,legacy
    python benchmarks/bench_reshard.py --scale 2        # 2x dataset (bench-data/reshard-x2)
    python benchmarks/bench_reshard.py --rss-flat       # also run ours on the 2x dataset
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

KEEP_PERCENT = 70
MAX_SHARDS = 5
CONTENDERS = ("cp", "ours-1w", "ours-threads2", "ours-dist1", "ours-dist2", "legacy", "wds")
OURS = ("ours-1w", "ours-threads2", "ours-dist1", "ours-dist2")
RESULT_MARK = "@@RESULT "
GNU_TIME = "/usr/bin/time"


# --------------------------------------------------------------------------- the filter
def keep_key(key: str) -> bool:
    """Deterministic ~70 % filter on the record key."""
    return zlib.crc32(key.encode()) % 100 < KEEP_PERCENT


def keep_series(keys):
    """``keep_key`` over a pandas Series of keys (same index)."""
    import numpy as np
    import pandas as pd

    values = np.fromiter((keep_key(k) for k in keys.tolist()), dtype=bool, count=len(keys))
    return pd.Series(values, index=keys.index, name="keep")


def new_key(shard: int, pos: int, per_shard: int) -> str:
    digits = math.ceil(math.log10(per_shard))
    return f"{shard * 10**digits + pos:0{MAX_SHARDS + digits}d}"


# --------------------------------------------------------------------------- contenders
def run_ours(data: str, out: str, mode: str, per_shard: int, warmup: tuple | None = None) -> dict:
    import dask

    from dask_imgcurate import ImageTextPairDataset

    with contextlib.suppress(ImportError):
        import distributed  # noqa: F401  (dask's get_scheduler imports it: an import, untimed)

    def export(source: str, target: str, per: int):
        ds = ImageTextPairDataset.from_webdataset(source)
        frame = ds.metadata
        keep = frame[ds.id_col].map_partitions(keep_series, meta=("keep", bool))
        ds = ds.with_metadata(frame.assign(keep=keep))
        return ds.to_webdataset(target, filter_column="keep", samples_per_shard=per, resume=False)

    started = time.perf_counter()
    cluster = client = None
    if mode in ("ours-dist1", "ours-dist2"):
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=int(mode[-1]), threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
        config = contextlib.nullcontext()
    elif mode == "ours-threads2":
        config = dask.config.set(scheduler="threads", num_workers=2)
    else:
        config = dask.config.set(scheduler="synchronous")
    with config:
        if warmup:
            export(*warmup, 16)
        setup = time.perf_counter() - started
        started = time.perf_counter()
        summary = export(data, out, per_shard)
        seconds = time.perf_counter() - started
    if client is not None:
        client.close()
        cluster.close()
    return dict(seconds=seconds, setup=setup, records=summary.records_out)


def warmup_data() -> tuple[str, str]:
    """A tiny dataset (2 shards x 40 records) and an output directory for an untimed
    warm-up run of a contender's own code: lazy imports and first-call costs are setup."""
    from dask_imgcurate.demo import make_demo_dataset

    root = tempfile.mkdtemp(prefix="bench-reshard-warmup-")
    make_demo_dataset(os.path.join(root, "in"), n_shards=2, samples_per_shard=40, seed=0)
    return os.path.join(root, "in"), os.path.join(root, "out")


def run_legacy(data: str, out: str, per_shard: int, id_col: str = "key") -> dict:
    """The legacy serial algorithm (temp Parquet per partition, then one tarfile loop)."""
    import io
    import tarfile
    from functools import partial

    import fsspec
    import numpy as np
    import pandas as pd
    from fsspec.core import open_files

    started = time.perf_counter()
    max_shards = MAX_SHARDS
    max_samples_per_shard = math.ceil(math.log10(per_shard))
    os.makedirs(out)

    def name_partition(index, temp=False, ext="parquet"):
        return f"{'temp_' if temp else ''}{index:0{max_shards}d}.{ext}"

    # from_webdataset: metadata = read_parquet(path), each partition sorted by id; then
    # to_webdataset: metadata[metadata[filter_column]].to_parquet(path, name_function=temp)
    for i, parquet_file in enumerate(open_files(os.path.join(data, "*.parquet"))):
        with parquet_file as f:
            frame = pd.read_parquet(f)
        frame = frame.sort_values(id_col).reset_index(drop=True)
        frame["keep"] = keep_series(frame[id_col])
        frame = frame[frame["keep"]]
        frame.to_parquet(os.path.join(out, name_partition(i, temp=True)))

    def combine_id(shard_id, sample_id):
        n_digits = max_samples_per_shard + max_shards
        return f"{sample_id + (10**max_samples_per_shard) * shard_id:0{n_digits}d}"

    def filter_valid_members(members, valid_ids):
        return [m for m in members if int(m.name.split(".")[0]) in valid_ids]

    def eligible_samples():
        parquet_files = open_files(os.path.join(out, "temp_*.parquet"))
        tar_files = open_files(os.path.join(data, "*.tar"))
        curr_df = None
        total_tar_samples = []
        for parquet_file, tar_file in zip(parquet_files, tar_files):
            with parquet_file as f:
                shard_df = pd.read_parquet(f)
            valid_member_ids = set(map(int, shard_df[id_col]))
            with tar_file as f:
                tar = tarfile.open(fileobj=f)
                valid_members = filter_valid_members(tar.getmembers(), valid_member_ids)
                valid_members.sort(key=lambda x: x.name)
                tar_samples = [(m, tar.extractfile(m).read()) for m in valid_members]
            if len(tar_samples) % len(shard_df) != 0:
                raise RuntimeError(f"{tar_file.path}: entries not a multiple of samples")
            entries_per_sample = len(tar_samples) // len(shard_df)
            curr_df = (
                shard_df if curr_df is None else pd.concat([curr_df, shard_df], ignore_index=True)
            )
            total_tar_samples.extend(tar_samples)
            parquet_file.fs.delete(parquet_file.path)
            while len(curr_df) >= per_shard:
                yield (
                    curr_df.iloc[:per_shard].copy(),
                    total_tar_samples[: per_shard * entries_per_sample],
                )
                curr_df = curr_df.iloc[per_shard:]
                total_tar_samples = total_tar_samples[per_shard * entries_per_sample :]
        yield curr_df, total_tar_samples

    records = 0
    for shard_id, (shard_df, shard_tar) in enumerate(eligible_samples()):
        new_ids = np.arange(len(shard_df))
        shard_df[id_col] = list(map(partial(combine_id, shard_id), new_ids))
        with fsspec.open(os.path.join(out, name_partition(shard_id)), mode="wb") as f:
            shard_df.to_parquet(f, index=False)
        members_per_sample = len(shard_tar) / len(shard_df)
        with fsspec.open(os.path.join(out, name_partition(shard_id, ext="tar")), mode="wb") as f:
            tar = tarfile.open(fileobj=f, mode="w")
            for i, (member, data_bytes) in enumerate(shard_tar):
                member_id = combine_id(shard_id, int(i // members_per_sample))
                member.name = f"{member_id}.{member.name.split('.')[-1]}"
                tar.addfile(member, io.BytesIO(data_bytes))
            tar.close()
        records += len(shard_df)
    return dict(seconds=time.perf_counter() - started, setup=0.0, records=records)


def run_wds(data: str, out: str, per_shard: int) -> dict:
    """A plain reshard script on the webdataset library's ShardWriter."""
    import pyarrow.parquet as pq
    import webdataset as wds

    started = time.perf_counter()
    keep = set()
    for path in sorted(glob.glob(os.path.join(data, "*.parquet"))):
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        keep.update(k for k in keys if keep_key(k))
    urls = sorted(glob.glob(os.path.join(data, "*.tar")))
    os.makedirs(out)
    n = 0
    with wds.ShardWriter(os.path.join(out, "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in wds.WebDataset(urls, shardshuffle=False):
            if sample["__key__"] not in keep:
                continue
            renamed = {"__key__": new_key(*divmod(n, per_shard), per_shard)}
            renamed.update((k, v) for k, v in sample.items() if not k.startswith("__"))
            sink.write(renamed)
            n += 1
    return dict(seconds=time.perf_counter() - started, setup=0.0, records=n)


def child_main(name: str, data: str, out: str, per_shard: int) -> None:
    started = time.perf_counter()
    warm_in, warm_out = warmup = warmup_data()
    try:
        if name in OURS:
            result = run_ours(data, out, name, per_shard, warmup)
        elif name in ("legacy", "wds"):
            run = run_legacy if name == "legacy" else run_wds
            run(warm_in, warm_out, 16)
            setup = time.perf_counter() - started
            result = run(data, out, per_shard)
            result["setup"] += setup
        else:
            raise SystemExit(f"unknown contender {name}")
    finally:
        shutil.rmtree(os.path.dirname(warm_in), ignore_errors=True)
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- measuring
class _TreeRSS(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, sampled."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self.stop.wait(self.interval)


def run_one(name: str, data: str, out: str, per_shard: int, log) -> dict:
    if name == "cp":
        cmd = ["cp", "-r", data, out]
    else:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_child",
            name,
            data,
            out,
            "--samples-per-shard",
            str(per_shard),
        ]
    # GNU time reports the command's peak RSS (it and every descendant it reaped). Measured
    # through it, not by wait4 here: a child spawned with vfork from this (bigger) process
    # inherits this process's RSS high-water mark at exec.
    fd, rss_file = tempfile.mkstemp(prefix="bench-reshard-rss-")
    os.close(fd)
    if os.path.exists(GNU_TIME):
        cmd = [GNU_TIME, "-f", "%M", "-o", rss_file] + cmd
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        busy0, total0 = _cpu_jiffies()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=ROOT)
        sampler = _TreeRSS(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        busy1, total1 = _cpu_jiffies()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        stdout.seek(0)
        stderr.seek(0)
        text, errors = stdout.read(), stderr.read()
    maxrss_kb = usage.ru_maxrss
    with open(rss_file) as f:
        lines = f.read().split()
    os.remove(rss_file)
    if os.path.exists(GNU_TIME) and lines and lines[-1].isdigit():
        maxrss_kb = int(lines[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{text[-3000:]}\n{errors[-5000:]}")
    result = dict(seconds=wall, setup=0.0, records=None)
    for line in text.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
    tars = glob.glob(os.path.join(out, "*.tar"))
    cpu = usage.ru_utime + usage.ru_stime  # the contender and every descendant it reaped
    hz = os.sysconf("SC_CLK_TCK")
    result.update(
        cpu=cpu,
        others=max(0.0, (busy1 - busy0) / hz - cpu) / max((total1 - total0) / hz, 1e-9),
        wall=wall,
        maxrss=maxrss_kb * 1024,
        tree_rss=sampler.peak,
        largest_shard=max((os.path.getsize(t) for t in tars), default=0),
        out_tars=len(tars),
    )
    return result


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def busy_fraction(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``seconds`` (by anything: other users included)."""
    b0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_idle(threshold: float, timeout: float, log) -> float:
    """Wait (up to ``timeout`` s) until the machine is at most ``threshold`` busy."""
    deadline = time.monotonic() + timeout
    busy = busy_fraction()
    waited = False
    while busy > threshold and time.monotonic() < deadline:
        if not waited:
            log(f"    machine {busy:.0%} busy (other processes); waiting for it to calm down")
            waited = True
        time.sleep(2)
        busy = busy_fraction()
    return busy


def drop_output(path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    os.sync()


def warm_cache(data: str) -> None:
    for path in sorted(glob.glob(os.path.join(data, "*"))):
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


# --------------------------------------------------------------------------- verification
def _expected_keys(data: str) -> list[str]:
    import pyarrow.parquet as pq

    keys = []
    for path in sorted(glob.glob(os.path.join(data, "*.parquet"))):
        shard = sorted(pq.read_table(path, columns=["key"]).column("key").to_pylist())
        keys.extend(k for k in shard if keep_key(k))
    return keys


def _tar_members(path: str) -> dict[str, tuple[int, int]]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _group(members: dict[str, tuple[int, int]], path: str) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for name, (offset, size) in members.items():
        key, _, ext = name.partition(".")
        records.setdefault(key, {})[ext] = (path, offset, size)
    return records


def verify(
    out: str, data: str, expected: list[str], inputs: dict, per_shard: int, sample: int = 300
) -> dict:
    """Record count, new keys, and member sha256 of sampled records against the input."""
    outputs: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        outputs.update(_group(_tar_members(path), path))
    keys = sorted(outputs)
    problems = []
    if len(keys) != len(expected):
        problems.append(f"{len(keys)} records, expected {len(expected)}")
    want = [new_key(*divmod(i, per_shard), per_shard) for i in range(len(expected))]
    if keys != want[: len(keys)]:
        problems.append("output keys are not shard*10^d+pos in order")
    rng = random.Random(0)
    positions = sorted(rng.sample(range(min(len(keys), len(expected))), min(sample, len(keys))))
    for pos in positions:
        rec = outputs[keys[pos]]
        meta = json.loads(_read(*rec["json"]))
        old = expected[pos]
        if meta.get("key") != old:
            problems.append(f"position {pos}: json key {meta.get('key')} != expected {old}")
            continue
        src = inputs[old]
        if set(rec) != set(src):
            problems.append(f"position {pos}: members {sorted(rec)} != {sorted(src)}")
            continue
        for ext in src:
            a = hashlib.sha256(_read(*rec[ext])).digest()
            b = hashlib.sha256(_read(*src[ext])).digest()
            if a != b:
                problems.append(f"position {pos} ({old}.{ext}): sha256 differs")
    return dict(records=len(keys), sampled=len(positions), problems=problems)


def _digest_tars(out: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- report
def machine_info() -> dict:
    import dask
    import distributed
    import pandas
    import pyarrow
    import webdataset

    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    mem = "?"
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"),
    }


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, runs in results.items():
        secs = [r["seconds"] for r in runs]
        out[name] = dict(
            median=statistics.median(secs),
            lo=min(secs),
            hi=max(secs),
            wall=statistics.median(r["wall"] for r in runs),
            setup=statistics.median(r["setup"] for r in runs),
            cpu=statistics.median(r["cpu"] for r in runs),
            others=max(r["others"] for r in runs),
            maxrss=max(r["maxrss"] for r in runs),
            tree_rss=max(r["tree_rss"] for r in runs),
            largest_shard=max(r["largest_shard"] for r in runs),
            records=runs[-1]["records"],
            runs=len(runs),
        )
    return out


def table(stats: dict[str, dict], input_bytes: int) -> str:
    base = {b: stats[b]["median"] for b in ("cp", "legacy", "wds") if b in stats}
    head = ["contender", "s (median)", "min-max", "process s", "CPU s", "input MB/s"]
    head += [f"x {b}" for b in base]
    head += [
        "peak RSS MB (1 proc)",
        "peak RSS MB (tree)",
        "largest out shard MB",
        "others' CPU (max)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in stats.items():
        row = [
            f"`{name}`",
            f"{s['median']:.2f}",
            f"{s['lo']:.2f}-{s['hi']:.2f}",
            f"{s['wall']:.2f}" + (f" (+{s['setup']:.1f} setup)" if s["setup"] else ""),
            f"{s['cpu']:.2f}",
            f"{input_bytes / 1e6 / s['median']:.0f}",
        ]
        row += [f"{t / s['median']:.2f}" for t in base.values()]
        row += [
            f"{s['maxrss'] / 1e6:.0f}",
            f"{s['tree_rss'] / 1e6:.0f}",
            f"{s['largest_shard'] / 1e6:.0f}" if s["largest_shard"] else "-",
            f"{s['others']:.0%}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def goals(stats: dict[str, dict]) -> list[str]:
    lines = []
    ours = [n for n in OURS if n in stats]
    if not ours:
        return lines

    def mark(ok):
        return "MET" if ok else "MISSED"

    best = min(ours, key=lambda n: stats[n]["median"])
    t = {n: stats[n]["median"] for n in stats}
    for base, need, label in (
        ("cp", 0.8, "x cp (incl. indexing raw tars)"),
        ("legacy", 2.0, "x legacy serial algorithm"),
        ("wds", 3.0, "x ShardWriter script"),
    ):
        if base in t:
            for n in ours:
                r = t[base] / t[n]
                lines.append(f"- >= {need}{label}: `{n}` {r:.2f}x -> {mark(r >= need)}")
    for one, two in (
        ("ours-1w", "ours-threads2"),
        ("ours-1w", "ours-dist2"),
        ("ours-dist1", "ours-dist2"),
    ):
        if one in t and two in t:
            r = t[one] / t[two]
            lines.append(
                f"- 2 workers >= 1.6x 1 worker: `{two}` vs `{one}` {r:.2f}x -> {mark(r >= 1.6)}"
            )
    for n in ours:
        s = stats[n]
        limit = 2 * s["largest_shard"] + 300e6
        lines.append(
            f"- peak RSS <= 2 x largest output shard + 300 MB ({limit / 1e6:.0f} MB): `{n}` "
            f"{s['maxrss'] / 1e6:.0f} MB per process -> {mark(s['maxrss'] <= limit)}; "
            f"tree {s['tree_rss'] / 1e6:.0f} MB -> {mark(s['tree_rss'] <= limit)}"
        )
    lines.append(f"- fastest of ours: `{best}`")
    return lines


# --------------------------------------------------------------------------- main
def benchmark(
    args, data: str, contenders: list[str], repeat: int, warmup: int, log, check=None
) -> tuple:
    """Run every contender ``warmup + repeat`` times, round-robin. ``check(name, out)`` is
    called on each contender's first timed output; every output is deleted after its run,
    so each run starts with the same amount of page cache in use (on this VM, others'
    outputs left in place slowed the 2-worker runs by ~20 %: page reclaim competes for the
    two cores)."""
    from _data import ensure_dataset

    manifest = ensure_dataset(
        data, n_shards=args.shards * args.scale_of(data), per_shard=args.per_shard, log=log
    )
    input_bytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(data, "*")))
    out_root = os.path.abspath(args.out_root)
    os.makedirs(out_root, exist_ok=True)
    log(
        f"input: {data}: {manifest['records']} records, {input_bytes / 1e9:.2f} GB; "
        f"warming the page cache"
    )
    warm_cache(data)
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(warmup + repeat):
        for name in contenders:
            out = os.path.join(out_root, name)
            drop_output(out)
            if args.idle_threshold < 1:
                wait_for_idle(args.idle_threshold, args.idle_timeout, log)
            res = run_one(name, data, out, args.samples_per_shard, log)
            tag = "warm-up" if r < warmup else f"run {r - warmup + 1}/{repeat}"
            log(
                f"  {tag:>9} {name:<14} {res['seconds']:6.2f} s (process {res['wall']:5.2f} s) "
                f"cpu {res['cpu']:5.2f} s, others {res['others']:4.0%}, "
                f"rss {res['maxrss'] / 1e6:5.0f} MB / tree {res['tree_rss'] / 1e6:5.0f} MB "
                f"records {res['records']}"
            )
            if r >= warmup:
                results[name].append(res)
                if check is not None and len(results[name]) == 1:
                    check(name, out)
            if not args.keep_output:
                drop_output(out)
    return manifest, input_bytes, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="dataset dir (default bench-data/reshard, or -x{scale})"
    )
    parser.add_argument("--scale", type=int, default=1, help="dataset size multiplier")
    parser.add_argument("--shards", type=int, default=16, help="input shards at scale 1")
    parser.add_argument("--per-shard", type=int, default=2000, help="records per input shard")
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out-root", default=os.path.join(ROOT, "bench-data", "reshard-out"))
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--keep-output", action="store_true")
    parser.add_argument(
        "--rss-flat", action="store_true", help="also run ours on a 2x dataset and compare peak RSS"
    )
    parser.add_argument(
        "--idle-threshold",
        type=float,
        default=0.15,
        help="before each run, wait until the whole machine is at most this busy "
        "(fraction of all CPUs; 1 = don't wait)",
    )
    parser.add_argument("--idle-timeout", type=float, default=120.0)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument(
        "--_child", nargs=3, metavar=("NAME", "DATA", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args._child:
        child_main(*args._child, args.samples_per_shard)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def default_data(scale):
        name = "reshard" if scale == 1 else f"reshard-x{scale}"
        return os.path.join(ROOT, "bench-data", name)

    data = os.path.abspath(args.data or default_data(args.scale))
    scales = {data: args.scale}
    args.scale_of = lambda d: scales[d]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")

    info = machine_info()
    checked = None if args.no_verify else dict(verification={}, digests={}, expected=None)

    def check(name: str, out: str) -> None:
        """Verify a contender's first timed output (it is deleted after each run)."""
        if name == "cp":
            return
        if checked["expected"] is None:
            checked["expected"] = _expected_keys(data)
            checked["inputs"] = {}
            for path in sorted(glob.glob(os.path.join(data, "*.tar"))):
                checked["inputs"].update(_group(_tar_members(path), path))
        log(f"  verifying {name} ...")
        checked["verification"][name] = verify(
            out, data, checked["expected"], checked["inputs"], args.samples_per_shard
        )
        if name in OURS:
            checked["digests"][name] = _digest_tars(out)

    manifest, input_bytes, results = benchmark(
        args, data, contenders, args.repeat, args.warmup, log, None if args.no_verify else check
    )
    stats = summarize(results)
    report = [
        f"## Reshard: {manifest['records']} records, {input_bytes / 1e9:.2f} GB in "
        f"{manifest['params']['n_shards']} shards -> filter keeping {KEEP_PERCENT} % -> "
        f"{args.samples_per_shard} records per output shard",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"Median of {args.repeat} (after {args.warmup} warm-up round), warm page cache; "
        "seconds are the work inside each process (process s: whole process incl. "
        "interpreter start + imports; setup: LocalCluster start and a warm-up run on a "
        "tiny dataset, untimed). "
        "`x cp` = cp seconds / contender seconds, and so on. CPU s: user + system CPU of "
        "the contender's processes. others' CPU: share of all CPUs that other processes on "
        "the machine used during the run (max over runs; high values mean a noisy number).",
        "",
        table(stats, input_bytes),
        "",
        "Goals:",
        *goals(stats),
    ]

    verification: dict = {}  # stays empty with --no-verify
    if checked is not None:
        verification, digests = checked["verification"], checked["digests"]
        report += ["", f"Correctness ({len(checked['expected'])} records expected):"]
        for name, v in verification.items():
            status = "ok" if not v["problems"] else "PROBLEMS: " + "; ".join(v["problems"][:5])
            report.append(
                f"- `{name}`: {v['records']} records, {v['sampled']} sampled records' "
                f"members sha256-equal to the input: {status}"
            )
        if len(set(digests.values())) > 1:
            report.append(f"- ours' tars differ between schedulers: {digests}")
        elif digests:
            report.append(f"- ours' tars are byte-identical across {sorted(digests)}")
        if "legacy" in verification and any(n in verification for n in OURS):
            same = all(
                verification[n]["records"] == verification["legacy"]["records"]
                for n in OURS
                if n in verification
            )
            report.append(f"- ours' record count == legacy's: {same}")
    flat = None
    if args.rss_flat:
        data2 = os.path.abspath(default_data(args.scale * 2))
        scales[data2] = args.scale * 2
        ours = [c for c in contenders if c in OURS]
        log(f"RSS flatness: {ours} on {data2}")
        _, bytes2, results2 = benchmark(args, data2, ours, min(args.repeat, 2), 0, log)
        stats2 = summarize(results2)
        flat = {
            n: (
                stats[n]["maxrss"],
                stats2[n]["maxrss"],
                stats[n]["tree_rss"],
                stats2[n]["tree_rss"],
                stats2[n]["median"],
            )
            for n in ours
        }
        report += [
            "",
            f"RSS when the dataset doubles ({input_bytes / 1e9:.2f} -> {bytes2 / 1e9:.2f} GB):",
            "",
            "| contender | 1 proc MB (1x -> 2x) | tree MB (1x -> 2x) | s at 2x |",
            "|---|---|---|---|",
        ]
        for n, (a, b, c, d, s2) in flat.items():
            report.append(
                f"| `{n}` | {a / 1e6:.0f} -> {b / 1e6:.0f} ({b / a:.2f}x) | "
                f"{c / 1e6:.0f} -> {d / 1e6:.0f} ({d / c:.2f}x) | {s2:.2f} |"
            )
        for name in ours:
            drop_output(os.path.join(os.path.abspath(args.out_root), name))

    print("\n".join(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    info=info,
                    manifest=manifest,
                    input_bytes=input_bytes,
                    results=results,
                    verification=verification,
                    flat=flat,
                ),
                f,
                indent=1,
                default=str,
            )
    problems = any(v["problems"] for v in verification.values())
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

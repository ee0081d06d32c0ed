"""Export a dataset's kept records as new tar + Parquet shards, in parallel.

1. Each partition's kept rows (filter column True, no ``error``) are selected once, in the
   task that reads the partition, and held (``dask.persist``): metadata only, never image
   bytes, plus the bytes each record will take in an output tar (``record_spans``).
2. Their counts are prefix-summed into global positions (``plan_shards``), so output shard
   ``n`` knows exactly which row slices it holds and where each record goes in its tar. On
   a distributed client this happens as partitions arrive: a shard is started once every
   partition before its last row is selected (``_stream``).
3. Local outputs: each shard is filled by independent piece tasks of about ``PIECE_BYTES``
   that copy their records' byte ranges to precomputed offsets of one temporary tar
   (``write_piece``), then one commit task ends it, writes ``.idx`` + Parquet and renames
   them into place, Parquet last (``commit_shard``). Object stores: a shard is one task that
   stages it locally and uploads each file whole (``write_shard``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import numbers
import os
import posixpath
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dask
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.backend import column_names, to_arrow
from dask_imgcurate.errors import DuplicateKeyError
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.tarwrite import END_OF_ARCHIVE
from dask_imgcurate.io.writer import (
    MissingPieces,
    ShardResult,
    commit_shard,
    finished,
    job_fingerprint,
    plan_members,
    plan_shards,
    record_spans,
    stack_slices,
    write_piece,
    write_shard,
)
from dask_imgcurate.metadata import is_bookkeeping
from dask_imgcurate.progress import (
    PartitionProgress,
    compute_with_progress,
    current_client,
    nested_column_shuffles,
    tick,
)

log = logging.getLogger(__name__)

PIECE_BYTES = 64 << 20  # target bytes per piece task of a local output shard


@dataclass
class ExportSummary:
    """What an export did; also logged when it ends."""

    path: str
    records_in: int = 0
    records_out: int = 0
    dropped_by_filter: int = 0
    dropped_for_errors: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)  # shard files it did not write

    def __str__(self) -> str:
        rate = self.bytes_written / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"exported {self.records_out} of {self.records_in} records to {self.path}: "
            f"{self.shards_written} shard{'' if self.shards_written == 1 else 's'} written, "
            f"{self.shards_skipped} already complete, "
            f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s ({rate:.0f} MB/s); "
            f"dropped {self.dropped_by_filter} by filter, {self.dropped_for_errors} for errors"
            + (f"; {len(self.other_files)} other shard files there" if self.other_files else "")
        )


class _TooManyShards(ValueError):
    """More output shards than ``max_shards`` digits can number."""


@dataclass(frozen=True)
class _Selection:
    """One partition's kept rows (Arrow), what each takes in an output tar, its counts and,
    when asked for, its digest."""

    table: pa.Table
    spans: np.ndarray  # bytes of each kept record in an output tar (``record_spans``)
    records_in: int
    dropped_for_errors: int
    digest: str
    sources: tuple[str, ...]  # the tars its rows come from (``_shard``)

    def stats(self) -> tuple:
        """What the planner needs: everything but the rows."""
        return self.spans, self.records_in, self.dropped_for_errors, self.digest, self.sources


def _select(
    frame,
    filter_column: str | None,
    digest: bool,
    key_bytes_of,
    id_col: str,
    progress: str | None = None,
    partition_info: dict | None = None,
) -> _Selection:
    table = to_arrow(frame)
    n_in = table.num_rows
    keep = np.ones(n_in, dtype=bool)
    if filter_column is not None:
        column = table.column(filter_column).fill_null(False).cast(pa.bool_())
        keep &= column.to_numpy(zero_copy_only=False)
    errors = 0
    if "error" in table.column_names:  # a record with an error counts as one, whatever
        ok = table.column("error").is_null().to_numpy(zero_copy_only=False)  # the filter
        errors = int((~ok).sum())  # says (its scores are NaN: a score filter drops it)
        keep &= ok
    kept = table.filter(pa.array(keep))
    orphans = kept.column("_members").is_null()
    if kept.column("_members").null_count:  # dd.merge(scores, metadata, how="left")
        ids = kept.filter(orphans).column(id_col).to_pylist()[:5]
        raise ValueError(
            f"rows to export are no record of the dataset's tars (no '_members': rows a "
            f"merge or concat added), e.g. the ids {ids}; merge "
            f"the other table into the dataset's metadata (how='left' or 'inner'), or filter "
            f"those rows out"
        )
    spans = record_spans(kept, key_bytes_of(kept))
    sources = tuple(pc.unique(table.column("_shard")).drop_null().to_pylist())
    tick(progress, (partition_info or {}).get("number", 0), n_in)
    return _Selection(kept, spans, n_in, errors, _digest(kept) if digest else "", sources)


def _digest(kept: pa.Table) -> str:
    """sha256 over the records' tar names and their members' names and sizes."""
    lists = kept.column("_members").combine_chunks()
    flat = lists.flatten()
    size = flat.field("size").cast(pa.string())
    members = pc.binary_join_element_wise("", flat.field("name"), size, "\0")
    bounds = np.concatenate([[0], np.cumsum(lists.value_lengths().to_numpy())])
    records = pc.binary_join(pa.ListArray.from_arrays(bounds.astype(np.int32), members), "")
    shards = pc.dictionary_encode(kept.column("_shard").combine_chunks())
    names = [fsio.basename(s) for s in shards.dictionary.to_pylist()]
    tars = pa.array(names, pa.string()).take(shards.indices)
    text = "".join(pc.binary_join_element_wise(tars, records, "").to_pylist())
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _Layout:
    """How one kind of export names and describes its output shards."""

    name_of: Callable[[int], str]  # output shard n -> file name without extension
    new_keys_of: Callable[[int, int, pa.Table], list[str]]  # (n, first position, rows)
    key_bytes_of: Callable[[pa.Table], np.ndarray]  # rows -> UTF-8 bytes of their new keys
    parquet_of: Callable[[int, pa.Table, list[str]], pa.Table]
    params: dict  # what else decides the output's bytes (part of each shard's fingerprint)


@dataclass(frozen=True)
class _ShardPlan:
    """One output shard: its rows as partition slices, and its pieces."""

    n: int
    slices: list[tuple[int, int, int]]  # (partition, start, stop)
    # (partition, start, stop, position in the shard, byte offset in its tar, bytes)
    pieces: list[tuple[int, int, int, int, int, int]]
    tar_size: int

    def inputs(self, selections: Sequence) -> tuple[list, list[tuple[int, int, int]]]:
        """The selections this shard reads, and its slices indexing into them."""
        used = sorted({p for p, _, _ in self.slices})
        slices = [(used.index(p), start, stop) for p, start, stop in self.slices]
        return [selections[p] for p in used], slices


def _plan(
    stats: list[tuple],
    per_shard: int,
    first_shard: int = 0,
    complete_only: bool = False,
    first_partition: int = 0,
    rows_before: int = 0,
) -> list[_ShardPlan]:
    """Output shards of ``per_shard`` records (see ``plan_shards``), each cut into pieces of
    about ``PIECE_BYTES`` that never cross an input partition, with their byte offsets.
    ``stats`` may start at partition ``first_partition``, after ``rows_before`` rows."""
    shards = []
    counts = [len(s[0]) for s in stats]
    planned = plan_shards(counts, per_shard, first_shard, complete_only, rows_before)
    for n, local in enumerate(planned, start=first_shard):
        slices = [(p + first_partition, start, stop) for p, start, stop in local]
        pieces, position, offset = [], 0, 0
        for p, start, stop in local:
            ends = np.cumsum(stats[p][0][start:stop])
            cuts = _piece_cuts(ends)
            for a, b in zip(cuts, cuts[1:]):
                size = int(ends[b - 1] - (ends[a - 1] if a else 0))
                piece = (p + first_partition, start + a, start + b, position + a, offset, size)
                pieces.append(piece)
                offset += size
            position += stop - start
        shards.append(_ShardPlan(n, slices, pieces, offset + len(END_OF_ARCHIVE)))
    return shards


class _Planner:
    """Plans output shards while partitions' stats arrive in order (``_stream``), looking
    only at partitions whose rows are not yet in a planned shard: planning stays linear in
    the number of partitions however they arrive."""

    def __init__(self, per_shard: int):
        self.per_shard = per_shard
        self.planned = 0  # output shards planned so far
        self.base = 0  # the first partition with rows not in a planned shard ...
        self.rows_before = 0  # ... and the rows before it

    def complete(self, stats: list, known: int) -> list[_ShardPlan]:
        """The full shards not planned yet among partitions ``0 .. known - 1``, whose
        ``stats`` are in (more partitions may follow)."""
        return self._take(stats, known, complete_only=True)

    def rest(self, stats: list) -> list[_ShardPlan]:
        """Every shard not planned yet, once all partitions' stats are in ``stats``."""
        return self._take(stats, len(stats), complete_only=False)

    def _take(self, stats: list, end: int, complete_only: bool) -> list[_ShardPlan]:
        window = stats[self.base : end]
        shards = _plan(
            window, self.per_shard, self.planned, complete_only, self.base, self.rows_before
        )
        self.planned += len(shards)
        next_row = self.planned * self.per_shard
        while self.base < end and self.rows_before + len(stats[self.base][0]) <= next_row:
            self.rows_before += len(stats[self.base][0])
            self.base += 1
        return shards


def _piece_cuts(ends: np.ndarray) -> list[int]:
    """Row boundaries that cut rows whose bytes end at ``ends`` into ~``PIECE_BYTES`` pieces."""
    marks = range(PIECE_BYTES, int(ends[-1]), PIECE_BYTES)
    cuts = np.searchsorted(ends, marks, side="right") + 1  # each piece passes a mark once
    return sorted({0, *cuts.tolist(), len(ends)})


@nested_column_shuffles()
def _export(
    dataset,
    path: str,
    *,
    filter_column: str | None,
    per_shard: int,
    layout: _Layout,
    storage_options: dict | None,
    resume: bool,
    verbose: bool,
    write_idx: bool,
    shard_count_check: Callable[[int], None] = lambda n: None,
    name_prefix: Callable[[list[str]], None] | None = None,
) -> ExportSummary:
    started = time.perf_counter()
    out_fs, out_root = fsio.url_to_fs(path, storage_options)
    input_tars, inputs_known = _input_tars(dataset)
    _real_directory.cache_clear()  # symlinks may have changed since an earlier export
    _refuse_input_directory(out_fs, out_root, input_tars)
    if fsio.is_local(out_fs) and out_fs.isfile(out_root):
        raise NotADirectoryError(f"{out_root} is a file: the output must be a directory")
    if not fsio.is_local(out_fs):  # a missing bucket: say so before any partition is read
        fsio.makedirs(out_fs, out_root)
    summary = ExportSummary(path=fsio.qualify(out_fs, out_root))
    frame = dataset.metadata
    needed = [dataset.id_col, "_members", "_shard"]
    missing = [c for c in needed if c not in column_names(frame)]
    if missing:
        raise KeyError(
            f"the metadata has no column {missing[0]!r} (dropped or renamed?): an export "
            f"needs the id column {dataset.id_col!r} and the bookkeeping columns '_members' "
            f"and '_shard' that from_webdataset adds"
        )
    if filter_column is not None:
        _check_filter_column(frame, filter_column)
    reading = PartitionProgress("export: reading", frame.npartitions, verbose)
    select = (filter_column, name_prefix is not None, layout.key_bytes_of, dataset.id_col)
    if "resources" in dask.get_annotations() or not isinstance(frame._meta, pd.DataFrame):
        # GPU tasks are annotated by their keys (stages.gpu_annotations): keep them intact;
        # other backends (cudf) get the same plain tasks
        selecting = [
            dask.delayed(_select)(part, *select, reading.topic, {"number": i})
            for i, part in enumerate(frame.to_delayed())
        ]
    else:  # one fused task per partition (read + select), whose result is not a frame
        selected = frame.map_partitions(
            _select, *select, reading.topic, meta=("selection", object), enforce_metadata=False
        )
        selecting = selected.to_delayed()
    job = _Job(out_fs, out_root, dataset.fs, layout, write_idx)
    client = current_client()

    def check_sources(stats: tuple) -> None:  # the tars a partition's rows come from
        _refuse_input_directory(out_fs, out_root, stats[4])  # (directories: cached)

    with fsio.writing_to(out_fs, out_root), reading:  # no other export there meanwhile
        with dask.annotate(priority=_in_partition_order):  # on a cluster, for _stream
            selections = dask.persist(*selecting, optimize_graph=False)  # local: computed
        stats_tasks = [dask.delayed(_Selection.stats)(s) for s in selections]
        submit = _Submitter(job, selections, resume, shard_count_check)
        # Stream only when every tar the frame reads is known up front (checked above)
        if client is not None and name_prefix is None and inputs_known:
            stats, results = _stream(client, stats_tasks, per_shard, submit, reading, check_sources)
        else:  # all counts first (and, for deterministic names, every partition's digest)
            stats = list(dask.compute(*stats_tasks, optimize_graph=False))
            reading.close()
            _refuse_input_directory(out_fs, out_root, {t for s in stats for t in s[4]})
            if name_prefix is not None:
                name_prefix([s[3] for s in stats])
            shards = _plan(stats, per_shard)
            tasks = submit(shards) if shards else []
            results = compute_with_progress(tasks, verbose, "export: writing")
    summary.records_in = sum(s[1] for s in stats)
    summary.dropped_for_errors = sum(s[2] for s in stats)
    summary.records_out = sum(len(s[0]) for s in stats)
    summary.dropped_by_filter = (
        summary.records_in - summary.records_out - summary.dropped_for_errors
    )
    if not results:
        reasons = []
        if summary.dropped_by_filter:
            reasons.append(f"{summary.dropped_by_filter} dropped by the filter")
        if summary.dropped_for_errors:
            reasons.append(f"{summary.dropped_for_errors} for errors")
        why = f" ({', '.join(reasons)})" if reasons else ""
        message = f"no record of {summary.records_in} was kept{why}: nothing was written"
        warnings.warn(f"{summary.path}: {message}", stacklevel=4)  # the caller of the method
    summary.shards_written = sum(not r.skipped for r in results)
    summary.shards_skipped = sum(r.skipped for r in results)
    summary.bytes_written = sum(r.bytes for r in results if not r.skipped)
    summary.files = [r.tar for r in results]
    unindexed = [r.tar for r in results if r.idx is None]
    if write_idx and unindexed:
        warnings.warn(
            f"{len(unindexed)} output shards have no .idx, e.g. {fsio.basename(unindexed[0])}: "
            f"a member name there holds white space or has an empty extension ('KEY.'), "
            f"which DALI's index format cannot hold (readers index such tars themselves)",
            stacklevel=4,
        )
    summary.other_files = _other_shard_files(out_fs, out_root, results)
    if summary.other_files:
        warnings.warn(
            f"{summary.path} also holds {len(summary.other_files)} shard files this export did "
            f"not write (from an earlier, different export?), e.g. "
            f"{[fsio.basename(f) for f in summary.other_files[:5]]}: readers of the directory "
            f"will see them too; remove them, or export to an empty directory",
            stacklevel=4,
        )
    summary.seconds = time.perf_counter() - started
    log.info("%s", summary)
    return summary


def _names_in(fs, directory: str) -> set[str]:
    """File names in ``directory`` (none when it does not exist: on object stores, a prefix
    with no objects)."""
    try:
        return {fsio.basename(p) for p in fs.ls(directory, detail=False)}
    except FileNotFoundError:
        return set()


def _other_shard_files(out_fs, out_root: str, results: list[ShardResult]) -> list[str]:
    """``.tar`` / ``.parquet`` / ``.idx`` files in the output directory that are not this
    export's (temporary files of running writers are hidden: never listed; an ``.idx``
    beside one of its tars describes that tar: written shards remove any other)."""
    ours = set()
    for r in results:
        stem = fsio.basename(r.tar)[: -len(".tar")]
        ours.update((stem + ".tar", stem + ".parquet", stem + ".idx"))
    return [
        fsio.qualify(out_fs, fsio.join(out_root, name))
        for name in sorted(_names_in(out_fs, out_root) - ours)
        if name.endswith((".tar", ".parquet", ".idx")) and not name.startswith(".")
    ]


def _input_tars(dataset) -> tuple[set[str], bool]:
    """The tars the metadata frame reads (``fsio.qualify``-ed): the dataset's own and those
    of every shard loader in the frame's expression (``dd.concat`` of datasets), and whether
    that is all of them (False when a leaf is something else: a persisted or pandas frame,
    whose ``_shard`` values are only known once computed)."""
    from dask_imgcurate.dataset import _ShardLoader

    tars = {fsio.qualify(dataset.fs, s.tar) for s in dataset.shards}
    complete = True
    for node in dataset.metadata.expr.walk():
        if node.dependencies():
            continue
        loader = node.operand("func") if "func" in node._parameters else None
        if isinstance(loader, _ShardLoader):
            for group in node.operand("iterables")[0]:
                tars.update(fsio.qualify(loader.fs, s.tar) for s in group)
        else:
            complete = False
    return tars, complete


@functools.lru_cache(maxsize=4096)
def _real_directory(directory: str) -> str:
    """A directory of ``fsio.qualify``-ed paths, with symlinks resolved when local (cached
    within an export: on a cluster each partition's directories are checked as they come)."""
    return (directory if "://" in directory else os.path.realpath(directory)).rstrip("/")


def _refuse_input_directory(out_fs, out_root: str, input_tars) -> None:
    """Outputs are named like shards (``00000.tar``): never write among the input's own."""
    local = fsio.is_local(out_fs)
    target = _real_directory(out_root) if local else fsio.qualify(out_fs, out_root).rstrip("/")
    for directory in {posixpath.dirname(t) for t in input_tars}:
        if _real_directory(directory) == target:
            raise ValueError(
                f"{target} holds this dataset's input shards: exporting there could replace "
                f"them while they are read; write to another directory"
            )


def _check_filter_column(frame, column: str) -> None:
    if column not in column_names(frame):
        raise KeyError(f"filter column {column!r} is not in the metadata")
    meta = frame._meta
    in_index = column not in meta.columns  # a named index is exported as a column
    dtype = meta.index.get_level_values(column).dtype if in_index else meta.dtypes[column]
    if not pd.api.types.is_bool_dtype(dtype):
        raise TypeError(
            f"filter column {column!r} must be boolean (True keeps a record, False or null "
            f"drops it), not {dtype}; make one first, e.g. "
            f"metadata.assign(keep=metadata[{column!r}] > threshold)"
        )


def _in_partition_order(key) -> int:
    """Task priority: partitions in order (a frame's task keys end in their index)."""
    return -key[-1] if isinstance(key, tuple) and isinstance(key[-1], int) else 0


def _stream(client, stats_tasks: list, per_shard: int, submit, reading, check: Callable) -> tuple:
    """On a distributed client: start writing each output shard as soon as the partitions
    before its last row are selected, while later partitions are still being read. Each
    partition's stats pass ``check`` first. ``reading``: the reading progress (closed before
    the writing's shows)."""
    from distributed import as_completed, progress, wait

    # each as soon as its partition is (the graphs need no culling: see compute_with_progress)
    futures = client.compute(stats_tasks, priority=1, optimize_graph=False)
    index = {future.key: i for i, future in enumerate(futures)}
    stats: list = [None] * len(futures)
    known = 0  # partitions selected without a gap from the first
    planner = _Planner(per_shard)
    writing: list = []
    try:
        for batch in as_completed(futures).batches():  # all finished since the last batch
            for future, result in zip(batch, client.gather(batch)):
                check(result)
                stats[index[future.key]] = result
            while known < len(stats) and stats[known] is not None:
                known += 1
            shards = planner.complete(stats, known)
            if shards:  # before the remaining reads: a worker never waits for the last one
                writing += client.compute(submit(shards), priority=1, optimize_graph=False)
        shards = planner.rest(stats)  # the last, shorter shard
        if shards:
            writing += client.compute(submit(shards), priority=1, optimize_graph=False)
    except _TooManyShards:  # found when the last partitions came in: undo what was written
        wait(writing)  # what runs would still publish files
        for result in client.gather(writing, errors="skip"):
            if not result.skipped:
                submit.job.remove(result)
        raise
    reading.close()
    if reading.topic is not None and writing:
        print("export: writing", flush=True)
        progress(writing)
    return stats, client.gather(writing)


class _Submitter:
    """Turns planned output shards into tasks (a finished ``ShardResult`` for a shard an
    earlier run completed); prepares the output directory before the first."""

    def __init__(self, job: _Job, selections: Sequence, resume: bool, shard_count_check):
        self.job, self.selections, self.resume = job, selections, resume
        self.shard_count_check = shard_count_check
        self.run = uuid.uuid4().hex[:8]
        self.shared = dask.delayed(job, name=f"export-job-{self.run}")  # shipped once
        self.prepared = False
        self.existing: set[str] = set()  # file names in the output directory at the start

    def __call__(self, shards: list[_ShardPlan]) -> list:
        job = self.job
        self.shard_count_check(shards[-1].n + 1)
        if not self.prepared:
            fsio.makedirs(job.out_fs, job.out_root)  # object stores: the bucket must exist
            if fsio.remove_stale_temps(job.out_fs, job.out_root):
                log.info("%s: removed temporary files of an interrupted earlier run", job.out_root)
            # one listing, not a request per shard: what an earlier run may have finished
            self.existing = _names_in(job.out_fs, job.out_root) if self.resume else set()
            self.prepared = True
        earlier = [s for s in shards if job.name(s.n, ".parquet") in self.existing]
        done = _finished_shards(job, self.selections, earlier) if earlier else {}
        return [done[s.n] if s.n in done else self._task(s) for s in shards]

    def _task(self, shard: _ShardPlan):
        n, job, run, shared = shard.n, self.job, self.run, self.shared
        parts, slices = shard.inputs(self.selections)
        if not fsio.is_local(job.out_fs):  # object stores: one task, uploaded when complete
            return dask.delayed(_write_whole)(
                parts, slices, n, shared, dask_key_name=f"export-shard-{run}-{n}"
            )
        tar_tmp = fsio.temp_path(job.out_fs, job.path(n, ".tar"))  # pieces fill it in place
        written = [
            dask.delayed(_write_piece)(
                self.selections[p],
                start,
                stop,
                n,
                position,
                (offset, size),
                tar_tmp,
                shared,
                dask_key_name=f"export-piece-{run}-{n}-{k}",
            )
            for k, (p, start, stop, position, offset, size) in enumerate(shard.pieces)
        ]
        return dask.delayed(_commit)(
            parts, slices, n, tar_tmp, shared, written, dask_key_name=f"export-commit-{run}-{n}"
        )


@dataclass(frozen=True)
class _Job:
    """What every task of one export shares."""

    out_fs: fsspec.AbstractFileSystem
    out_root: str
    source_fs: fsspec.AbstractFileSystem
    layout: _Layout
    write_idx: bool

    def name(self, n: int, ext: str) -> str:
        return self.layout.name_of(n) + ext

    def path(self, n: int, ext: str) -> str:
        return fsio.join(self.out_root, self.name(n, ext))

    def outputs(self, n: int) -> dict:
        """Output shard ``n``'s files, as ``commit_shard`` and ``write_shard`` take them."""
        return dict(
            tar_path=self.path(n, ".tar"),
            parquet_path=self.path(n, ".parquet"),
            idx_path=self.path(n, ".idx"),
            write_idx=self.write_idx,
        )

    def remove(self, result: ShardResult) -> None:
        """Remove a shard this job wrote."""
        for path in (result.parquet, result.idx, result.tar):  # Parquet (complete) first
            if path is not None:
                self.out_fs.rm_file(path)

    def shard(self, parts: list[_Selection], slices, n: int) -> tuple:
        """Output shard ``n``'s rows, new keys, Parquet table and fingerprint."""
        rows = stack_slices([s.table for s in parts], slices)
        keys = self.layout.new_keys_of(n, 0, rows)
        table = self.layout.parquet_of(n, rows, keys)
        params = dict(self.layout.params, shard=n, write_idx=self.write_idx)
        return rows, keys, table, job_fingerprint(rows, keys, params, table)


def _finished_shards(job: _Job, selections, existing: list[_ShardPlan]) -> dict[int, ShardResult]:
    """Which of the shards whose final Parquet exists a finished earlier run of the same job
    left complete (resume): checked by fingerprint, in parallel tasks."""
    checks = [
        dask.delayed(_skipped_if_finished)(*shard.inputs(selections), shard.n, job)
        for shard in existing
    ]
    results = dask.compute(*checks, optimize_graph=False)
    return {shard.n: r for shard, r in zip(existing, results) if r is not None}


def _skipped_if_finished(parts: list[_Selection], slices, n: int, job: _Job):
    """Output shard ``n``'s ``ShardResult`` when this same job already completed it."""
    rows, _, _, digest = job.shard(parts, slices, n)
    files = job.outputs(n)
    done = finished(job.out_fs, files["tar_path"], files["parquet_path"], digest, files["idx_path"])
    return None if done is None else dataclasses.replace(done, records=len(rows))


def _write_piece(
    part: _Selection, start: int, stop: int, n: int, position: int, span, tar_tmp, job
) -> int:
    rows = part.table.slice(start, stop - start)
    keys = job.layout.new_keys_of(n, position, rows)
    offset, size = span
    end = write_piece(tar_tmp, plan_members(rows, keys), offset, job.source_fs)
    if end != offset + size:  # the plan and the tar disagree: never commit such a tar
        raise RuntimeError(
            f"{tar_tmp}: a piece wrote bytes [{offset}, {end}), the plan said "
            f"[{offset}, {offset + size}) (an inconsistency in dask_imgcurate; please report)"
        )
    return offset


def _commit(
    parts: list[_Selection], slices, n: int, tar_tmp: str, job: _Job, starts: list[int]
) -> ShardResult:
    rows, keys, table, fingerprint = job.shard(parts, slices, n)
    commit = functools.partial(
        commit_shard, rows, keys, table, out_fs=job.out_fs, fingerprint=fingerprint
    )
    try:
        return commit(tar_tmp=tar_tmp, piece_starts=starts, **job.outputs(n))
    except MissingPieces as err:  # a retried piece wrote into a file created anew
        log.warning("%s; writing the shard again", err)
    tar_tmp = fsio.temp_path(job.out_fs, job.path(n, ".tar"))
    try:
        write_piece(tar_tmp, plan_members(rows, keys), 0, job.source_fs)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tar_tmp)
        raise
    return commit(tar_tmp=tar_tmp, **job.outputs(n))  # removes tar_tmp unless published


def _write_whole(parts: list[_Selection], slices, n: int, job: _Job) -> ShardResult:
    rows, keys, table, fingerprint = job.shard(parts, slices, n)
    return write_shard(
        rows,
        keys,
        table,
        source_fs=job.source_fs,
        out_fs=job.out_fs,
        fingerprint=fingerprint,
        **job.outputs(n),
        resume=False,  # checked before
    )


def _count(name: str, value) -> int:
    """``value`` as a positive int, checked before any work (numpy ints are fine)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, not {value}")
    return int(value)


def _user_columns(rows: pa.Table, id_col: str) -> pa.Table:
    """The columns written to Parquet, the id column first."""
    others = [c for c in rows.column_names if not is_bookkeeping(c) and c != id_col]
    return rows.select([id_col, *others])


def to_webdataset(
    dataset,
    path: str,
    filter_column: str | None = None,
    samples_per_shard: int = 10000,
    max_shards: int = 5,
    old_id_col: str | None = None,
    *,
    storage_options: dict | None = None,
    resume: bool = True,
    verbose: bool = False,
    write_idx: bool = True,
) -> ExportSummary:
    """See ``ImageTextPairDataset.to_webdataset``."""
    samples_per_shard = _count("samples_per_shard", samples_per_shard)
    max_shards = _count("max_shards", max_shards)
    id_col = dataset.id_col
    if old_id_col == id_col:
        raise ValueError(
            f"old_id_col={old_id_col!r} is the id column, which holds the new ids; name "
            f"another column for the old ones"
        )
    if old_id_col and old_id_col in column_names(dataset.metadata):
        warnings.warn(
            f"old_id_col={old_id_col!r} replaces the metadata column of that name in the "
            f"exported Parquet",
            stacklevel=3,
        )
    position_digits = 0 if samples_per_shard == 1 else len(str(samples_per_shard - 1))
    width = max_shards + position_digits

    def new_keys_of(n: int, first: int, rows: pa.Table) -> list[str]:
        base = n * 10**position_digits + first
        return [f"{base + i:0{width}d}" for i in range(rows.num_rows)]

    def parquet_of(n: int, rows: pa.Table, new_keys: list[str]) -> pa.Table:
        table = _user_columns(rows, id_col)
        old = table.column(id_col)
        table = table.set_column(table.column_names.index(id_col), id_col, pa.array(new_keys))
        if old_id_col:
            if old_id_col in table.column_names:
                table = table.drop_columns([old_id_col])
            table = table.add_column(1, old_id_col, old)
        return table

    def check(count: int) -> None:
        if count > 10**max_shards:
            raise _TooManyShards(
                f"{count} output shards do not fit in max_shards={max_shards} digits; "
                f"raise max_shards or samples_per_shard"
            )

    return _export(
        dataset,
        path,
        filter_column=filter_column,
        per_shard=samples_per_shard,
        layout=_Layout(
            name_of=lambda n: f"{n:0{max_shards}d}",
            new_keys_of=new_keys_of,
            key_bytes_of=lambda rows: np.full(rows.num_rows, width, dtype=np.int64),
            parquet_of=parquet_of,
            params=dict(
                kind="webdataset",
                per_shard=samples_per_shard,
                max_shards=max_shards,
                old_id_col=old_id_col,
                id_col=id_col,
            ),
        ),
        storage_options=storage_options,
        resume=resume,
        verbose=verbose,
        write_idx=write_idx,
        shard_count_check=check,
    )


def write_images(
    dataset,
    output_dir: str,
    images_per_tar: int = 1000,
    filter_column: str | None = None,
    deterministic_name: bool = True,
    remove_image_data: bool = False,
    verbose: bool = False,
    *,
    storage_options: dict | None = None,
    resume: bool = True,
    write_idx: bool = True,
) -> ExportSummary:
    """See ``ImageTextPairDataset.write_images``."""
    del remove_image_data  # image bytes are never held in memory: nothing to remove
    images_per_tar = _count("images_per_tar", images_per_tar)
    id_col = dataset.id_col
    prefix = [] if deterministic_name else [uuid.uuid4().hex[:16]]
    present = column_names(dataset.metadata)
    replaced = [c for c in ("tar_file", "member_name") if c in present]
    if replaced:  # e.g. metadata loaded from an earlier write_images output
        warnings.warn(
            f"write_images replaces the metadata columns {replaced} in the Parquet it writes "
            f"with the new tar file and image member names",
            stacklevel=3,
        )

    def name_prefix(digests: list[str]) -> None:
        h = hashlib.sha256(f"{images_per_tar}\0{filter_column}\0".encode())
        for d in digests:
            h.update(d.encode())
        prefix.append(h.hexdigest()[:16])

    def new_keys_of(n: int, first: int, rows: pa.Table) -> list[str]:
        keys = rows.column(id_col).to_pylist()
        unsafe = [k for k in keys if k.startswith("/") or ".." in k.split("/")]
        if unsafe:
            raise ValueError(
                f"record keys {unsafe[:10]} would be unsafe member names; use to_webdataset, "
                f"which renames records"
            )
        if len(set(keys)) < len(keys):  # e.g. two datasets whose ids both start at 000000000
            repeated = sorted(k for k, count in Counter(keys).items() if count > 1)
            raise DuplicateKeyError(
                f"{name_of(n)}.tar would hold records {repeated[:10]} twice "
                f"({len(repeated)} ids repeat among its input records): write_images keeps "
                f"record ids; make them unique, or use to_webdataset, which renames records"
            )
        return keys

    def key_bytes_of(rows: pa.Table) -> np.ndarray:
        ids = rows.column(id_col).combine_chunks().cast(pa.binary())
        return pc.binary_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)

    def name_of(n: int) -> str:
        return f"images-{prefix[0]}-{n:06d}"

    def parquet_of(n: int, rows: pa.Table, new_keys: list[str]) -> pa.Table:
        table = _user_columns(rows, id_col).drop_columns(replaced)
        tar_name = f"{name_of(n)}.tar"
        table = table.add_column(1, "tar_file", pa.array([tar_name] * rows.num_rows, pa.string()))
        return table.add_column(2, "member_name", rows.column("_image_member"))

    return _export(
        dataset,
        output_dir,
        filter_column=filter_column,
        per_shard=images_per_tar,
        layout=_Layout(
            name_of=name_of,
            new_keys_of=new_keys_of,
            key_bytes_of=key_bytes_of,
            parquet_of=parquet_of,
            params=dict(kind="images", per_shard=images_per_tar, id_col=id_col),
        ),
        storage_options=storage_options,
        resume=resume,
        verbose=verbose,
        write_idx=write_idx,
        name_prefix=name_prefix if deterministic_name else None,
    )


__all__ = ["ExportSummary", "to_webdataset", "write_images"]

"""Running an export: select, plan, then piece and commit tasks (streamed on a cluster);
resume, the lock on the output directory, the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dask
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
from dask.delayed import Delayed

from dask_imgcurate.backend import column_names
from dask_imgcurate.errors import ColumnTypeConflict, TooManyShards
from dask_imgcurate.export import guards, planning, selection
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.schemas import ColumnTypes
from dask_imgcurate.io.writer import (
    MissingPieces,
    ShardResult,
    commit_shard,
    finished,
    job_fingerprint,
    plan_members,
    type_null_columns,
    write_piece,
    write_shard,
)
from dask_imgcurate.metadata import is_bookkeeping
from dask_imgcurate.progress import (
    PartitionProgress,
    compute_with_progress,
    current_client,
    naming_killed_tasks,
    nested_column_shuffles,
    show_progress,
)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Layout:
    """How one kind of export names and describes its output shards."""

    name_of: Callable[[int], str]  # output shard n -> file name without extension
    new_keys_of: Callable[[int, int, pa.Table], list[str]]  # (n, first position, rows)
    key_bytes_of: Callable[[pa.Table], np.ndarray]  # rows -> UTF-8 bytes of their new keys
    parquet_of: Callable[[int, pa.Table, list[str]], pa.Table]
    params: dict  # what else decides the output's bytes (part of each shard's fingerprint)


@nested_column_shuffles()
@naming_killed_tasks()
def run_export(
    dataset,
    path: str,
    *,
    filter_column: str | None,
    per_shard: int,
    layout: Layout,
    storage_options: dict | None,
    resume: bool,
    verbose: bool,
    write_idx: bool,
    shard_count_check: Callable[[int], None] = lambda n: None,
    name_prefix: Callable[[list[str]], None] | None = None,
) -> ExportSummary:
    started = time.perf_counter()
    out_fs, out_root = fsio.url_to_fs(path, storage_options)
    fsio.refuse_read_only(out_fs, out_root, "export")
    guards.check_output_path(out_fs, out_root)
    inputs, inputs_known = guards.input_tars(dataset, sidecars=True)
    guards.real_directory.cache_clear()  # symlinks may have changed since an earlier export
    guards.refuse_input_directory(out_fs, out_root, inputs)
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
    if "_shard_version" not in column_names(frame):
        warnings.warn(
            "the metadata has no '_shard_version' column (dropped?): a tar rewritten since it "
            "was indexed cannot be told from an unchanged one; keep the bookkeeping columns",
            stacklevel=4,
        )
    if filter_column is not None:
        guards.check_filter_column(frame, filter_column)
    guards.check_error_column(frame)
    reading = PartitionProgress("export: reading", frame.npartitions, verbose)
    run = uuid.uuid4().hex[:8]  # names this export's temporary files
    spill = (out_fs, out_root, run)
    select = (filter_column, name_prefix is not None, layout.key_bytes_of, dataset.id_col, spill)
    if "resources" in dask.get_annotations() or not isinstance(frame._meta, pd.DataFrame):
        # GPU tasks are annotated by their keys (stages.gpu_annotations): keep them intact;
        # other backends (cudf) get the same plain tasks
        selecting = [
            dask.delayed(selection.select_partition)(part, *select, reading.topic, {"number": i})
            for i, part in enumerate(frame.to_delayed())
        ]
    else:  # one fused task per partition (read + select), whose result is not a frame
        selected = frame.map_partitions(
            selection.select_partition,
            *select,
            reading.topic,
            meta=("selection", object),
            enforce_metadata=False,
        )
        selecting = selected.to_delayed()
    job = _Job(out_fs, out_root, dataset.fs, layout, write_idx)
    client = current_client()

    types = ColumnTypes("export")

    def check(stats: tuple) -> None:  # a partition's, as it comes in
        tars = stats[4]  # the tars its rows come from
        guards.refuse_other_stores(dataset.fs, tars)
        guards.refuse_input_directory(out_fs, out_root, tars)  # (directories: cached)
        if stats[5] is not None:
            types.add(stats[5], tars)

    with fsio.writing_to(out_fs, out_root), reading:  # no other export there meanwhile
        if fsio.remove_stale_temps(out_fs, out_root):  # before this run writes any
            log.info("%s: removed temporary files of an interrupted earlier run", out_root)
        try:
            with dask.annotate(priority=_in_partition_order):  # on a cluster, for _stream
                selections = dask.persist(*selecting, optimize_graph=False)  # local: computed
            submit = _Submitter(job, selections, resume, shard_count_check, run)
            # Stream only when every tar the frame reads is known up front (checked above)
            if client is not None and name_prefix is None and inputs_known:
                stats, results = _stream(client, selections, per_shard, submit, reading, check)
            else:  # all counts first (and, for deterministic names, every partition's digest)
                stats_tasks = [dask.delayed(selection.Selection.stats)(s) for s in selections]
                stats = list(dask.compute(*stats_tasks, optimize_graph=False))
                reading.close()
                for partition in stats:
                    check(partition)
                if name_prefix is not None:
                    name_prefix([s[3] for s in stats])
                shards = planning.plan_pieces(stats, per_shard)
                tasks = submit(shards) if shards else []
                results = compute_with_progress(tasks, verbose, "export: writing")
            if type_null_columns(out_fs, results):  # still under the lock
                log.info("%s: typed the columns null in some shards' Parquet", out_root)
        except BaseException:  # tasks may still run: only the selections' spilled columns
            fsio.remove_stale_temps(out_fs, out_root, mark=fsio.TEMP_MARK + run)
            raise
        # every task has ended: also the files of a commit whose worker died mid-way
        fsio.remove_stale_temps(out_fs, out_root)
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
    summary.other_files = guards.other_shard_files(out_fs, out_root, results)
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


def _in_partition_order(key) -> int:
    """Task priority: partitions in order (a frame's task keys end in their index)."""
    return -key[-1] if isinstance(key, tuple) and isinstance(key[-1], int) else 0


def _stream(
    client, selections: Sequence, per_shard: int, submit, reading, check: Callable
) -> tuple:
    """On a distributed client: start writing each output shard as soon as the partitions
    before its last row are selected, while later partitions are still being read. Each
    partition's stats pass ``check`` first. ``reading``: the reading progress (closed before
    the writing's shows). ``selections``: persisted; each is gathered as soon as it is
    computed (small: its rows are spilled), with no task of its own for its stats."""
    from distributed import as_completed, futures_of, wait

    futures = [futures_of(s)[0] for s in selections]
    index = {future.key: i for i, future in enumerate(futures)}
    stats: list = [None] * len(futures)
    known = 0  # partitions selected without a gap from the first
    planner = planning.Planner(per_shard)
    writing: list = []
    try:
        for batch in as_completed(futures).batches():  # all finished since the last batch
            for future, result in zip(batch, client.gather(batch)):
                result = result.stats()
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
        reading.close()
        if reading.topic is not None and writing:
            show_progress(writing, "export: writing")
        return stats, client.gather(writing)
    except (TooManyShards, ColumnTypeConflict):  # found as partitions came in: undo writes
        wait(writing)  # what runs would still publish files
        for result in client.gather(writing, errors="skip"):
            if not result.skipped:
                submit.job.remove(result)
        raise
    except BaseException:  # (Ctrl-C too) tasks not yet started never start
        # the commits first, which releases their pieces: cancelling a selection first
        # reaches the pieces reading it, which no client wants itself, and the scheduler
        # (distributed 2026.8) fails an assertion there, dropping this client's connection
        # and with it every result the client held
        client.cancel(writing)
        client.cancel(futures)
        raise


class _Submitter:
    """Turns planned output shards into tasks (a finished ``ShardResult`` for a shard an
    earlier run completed); prepares the output directory before the first."""

    def __init__(self, job: _Job, selections: Sequence, resume: bool, shard_count_check, run: str):
        self.job, self.selections, self.resume = job, selections, resume
        self.shard_count_check = shard_count_check
        self.run = run
        self.shared = dask.delayed(job, name=f"export-job-{self.run}")  # shipped once
        self.prepared = False
        self.existing: set[str] = set()  # file names in the output directory at the start

    def __call__(self, shards: list[planning.ShardPlan]) -> list:
        job = self.job
        self.shard_count_check(shards[-1].n + 1)
        if not self.prepared:
            fsio.makedirs(job.out_fs, job.out_root)  # object stores: the bucket must exist
            # one listing, not a request per shard: what an earlier run may have finished
            self.existing = guards.names_in(job.out_fs, job.out_root) if self.resume else set()
            self.prepared = True
        earlier = [s for s in shards if job.name(s.n, ".parquet") in self.existing]
        done = _finished_shards(job, self.selections, earlier) if earlier else {}
        return [done[s.n] if s.n in done else self._task(s) for s in shards]

    def _task(self, shard: planning.ShardPlan):
        n, job, run, shared = shard.n, self.job, self.run, self.shared
        parts, slices = shard.inputs(self.selections)
        if not fsio.is_local(job.out_fs):  # object stores: one task, uploaded when complete
            return delayed_call(
                _write_whole, parts, slices, n, shared, key=f"export-shard-{run}-{n}"
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
        return delayed_call(
            _commit, parts, slices, n, tar_tmp, shared, written, key=f"export-commit-{run}-{n}"
        )


@dataclass(frozen=True)
class _Job:
    """What every task of one export shares."""

    out_fs: fsspec.AbstractFileSystem
    out_root: str
    source_fs: fsspec.AbstractFileSystem
    layout: Layout
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
                fsio.remove_file(self.out_fs, path, missing_ok=True)

    def shard(self, parts: list[selection.Selection], slices, n: int) -> tuple:
        """Output shard ``n``'s rows, new keys, Parquet table and fingerprint."""
        rows = pa.concat_tables(
            [parts[i].rows(start, stop) for i, start, stop in slices],
            promote_options="permissive",
        )
        keys = self.layout.new_keys_of(n, 0, rows)
        table = self.layout.parquet_of(n, rows, keys)
        params = dict(self.layout.params, shard=n, write_idx=self.write_idx)
        return rows, keys, table, job_fingerprint(rows, keys, params, table)


def _finished_shards(
    job: _Job, selections, existing: list[planning.ShardPlan]
) -> dict[int, ShardResult]:
    """Which of the shards whose final Parquet exists a finished earlier run of the same job
    left complete (resume): checked by fingerprint, in parallel tasks."""
    checks = [
        delayed_call(_skipped_if_finished, *shard.inputs(selections), shard.n, job)
        for shard in existing
    ]
    results = dask.compute(*checks, optimize_graph=False)
    return {shard.n: r for shard, r in zip(existing, results) if r is not None}


def delayed_call(func: Callable, *args, key: str | None = None):
    """``dask.delayed(func)(*args)`` (named ``key``), built in time linear in the ``Delayed``
    objects that list arguments hold. Dask (2026.8) optimises the ``Delayed`` objects found
    inside a list argument together and then culls that graph once per object: quadratic in
    the list's length (an output shard read from 10,000 partitions spent over half a minute
    there), while a ``Delayed`` passed as an argument itself is only referenced. So each
    list of ``Delayed`` is passed item by item and rebuilt in the task (``_regrouped``)."""
    shape, flat = [], []
    for arg in args:
        if isinstance(arg, list) and arg and all(isinstance(a, Delayed) for a in arg):
            shape.append(len(arg))
            flat.extend(arg)
        else:
            shape.append(None)
            flat.append(arg)
    name = {} if key is None else {"dask_key_name": key}
    return dask.delayed(_regrouped, pure=False)(func, tuple(shape), *flat, **name)


def _regrouped(func: Callable, shape: tuple, *flat):
    """``func`` called with ``delayed_call``'s arguments, its lists rebuilt."""
    args, i = [], 0
    for size in shape:
        if size is None:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i : i + size]))
            i += size
    return func(*args)


def _skipped_if_finished(parts: list[selection.Selection], slices, n: int, job: _Job):
    """Output shard ``n``'s ``ShardResult`` when this same job already completed it."""
    rows, _, _, digest = job.shard(parts, slices, n)
    files = job.outputs(n)
    done = finished(job.out_fs, files["tar_path"], files["parquet_path"], digest, files["idx_path"])
    return None if done is None else dataclasses.replace(done, records=len(rows))


def _write_piece(
    part: selection.Selection, start: int, stop: int, n: int, position: int, span, tar_tmp, job
) -> int:
    rows = part.rows(start, stop)
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
    parts: list[selection.Selection], slices, n: int, tar_tmp: str, job: _Job, starts: list[int]
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


def _write_whole(parts: list[selection.Selection], slices, n: int, job: _Job) -> ShardResult:
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


def user_columns(rows: pa.Table, id_col: str) -> pa.Table:
    """The columns written to Parquet, the id column first."""
    others = [c for c in rows.column_names if not is_bookkeeping(c) and c != id_col]
    return rows.select([id_col, *others])

"""Export a dataset's kept records as new tar + Parquet shards, in parallel.

1. Each partition's kept rows (filter column True, no ``error``) are computed once and
   held (``dask.persist``): metadata only, never image bytes.
2. Their counts are prefix-summed into global positions, so output shard ``n`` knows
   exactly which row slices it holds (``plan_shards``).
3. Each output shard is an independent task that reads only the byte ranges of its own
   records from the source tars and writes tar, ``.idx`` and Parquet (``io.writer``).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dask
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.backend import to_arrow
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.writer import (
    ShardResult,
    job_fingerprint,
    plan_shards,
    stack_slices,
    write_shard,
)
from dask_imgcurate.metadata import is_bookkeeping
from dask_imgcurate.progress import compute_with_progress

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

    def __str__(self) -> str:
        rate = self.bytes_written / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"exported {self.records_out} of {self.records_in} records to {self.path}: "
            f"{self.shards_written} shards written, {self.shards_skipped} already complete, "
            f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s ({rate:.0f} MB/s); "
            f"dropped {self.dropped_by_filter} by filter, {self.dropped_for_errors} for errors"
        )


@dataclass(frozen=True)
class _Selection:
    """One partition's kept rows (Arrow), its counts and, when asked for, its digest."""

    table: pa.Table
    records_in: int
    dropped_for_errors: int
    digest: str


def _select(frame, filter_column: str | None, digest: bool) -> _Selection:
    table = to_arrow(frame)
    n_in = table.num_rows
    keep = np.ones(n_in, dtype=bool)
    if filter_column is not None:
        column = table.column(filter_column).fill_null(False).cast(pa.bool_())
        keep &= column.to_numpy(zero_copy_only=False)
    errors = 0
    if "error" in table.column_names:
        ok = table.column("error").is_null().to_numpy(zero_copy_only=False)
        errors = int((keep & ~ok).sum())
        keep &= ok
    kept = table.filter(pa.array(keep))
    return _Selection(kept, n_in, errors, _digest(kept) if digest else "")


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


def _select_partitions(dataset, filter_column: str | None, digest: bool) -> list:
    frame = dataset.metadata
    if filter_column is not None and filter_column not in frame.columns:
        raise KeyError(f"filter column {filter_column!r} is not in the metadata")
    parts = frame.to_delayed()
    selections = [dask.delayed(_select, pure=True)(p, filter_column, digest) for p in parts]
    return list(dask.persist(*selections))


def _export(
    dataset,
    path: str,
    *,
    filter_column: str | None,
    per_shard: int,
    name_of: Callable[[int], str],
    new_keys_of: Callable[[int, pa.Table], list[str]],
    parquet_of: Callable[[int, pa.Table, list[str]], pa.Table],
    params: dict,
    storage_options: dict | None,
    resume: bool,
    verbose: bool,
    write_idx: bool,
    shard_count_check: Callable[[int], None] = lambda n: None,
    name_prefix: Callable[[list[str]], None] | None = None,
) -> ExportSummary:
    started = time.perf_counter()
    out_fs, out_root = fsio.url_to_fs(path, storage_options)
    summary = ExportSummary(path=fsio.qualify(out_fs, out_root))
    selections = _select_partitions(dataset, filter_column, name_prefix is not None)
    stats = dask.compute(
        *[
            dask.delayed(
                lambda s: (s.table.num_rows, s.records_in, s.dropped_for_errors, s.digest)
            )(s)
            for s in selections
        ]
    )
    counts = [s[0] for s in stats]
    summary.records_in = sum(s[1] for s in stats)
    summary.dropped_for_errors = sum(s[2] for s in stats)
    summary.records_out = sum(counts)
    summary.dropped_by_filter = (
        summary.records_in - summary.records_out - summary.dropped_for_errors
    )
    if name_prefix is not None:
        name_prefix([s[3] for s in stats])
    plan = plan_shards(counts, per_shard)
    if not plan:
        message = "the filter kept no records: nothing was written"
        warnings.warn(f"{summary.path}: {message}", stacklevel=3)
        summary.seconds = time.perf_counter() - started
        log.info("%s", summary)
        return summary
    shard_count_check(len(plan))
    fsio.makedirs(out_fs, out_root)  # object stores: the bucket must exist
    if fsio.remove_stale_temps(out_fs, out_root):
        log.info("%s: removed temporary files of an interrupted earlier run", summary.path)
    tasks = []
    for n, pieces in enumerate(plan):
        used = sorted({p for p, _, _ in pieces})
        local = [(used.index(p), start, stop) for p, start, stop in pieces]
        tasks.append(
            dask.delayed(_write_one, pure=True)(
                [selections[p] for p in used],
                local,
                n,
                dict(
                    name=fsio.join(out_root, name_of(n)),
                    source_fs=dataset.fs,
                    out_fs=out_fs,
                    new_keys_of=new_keys_of,
                    parquet_of=parquet_of,
                    params=params,
                    resume=resume,
                    write_idx=write_idx,
                ),
            )
        )
    results: Sequence[ShardResult] = compute_with_progress(tasks, verbose, "export")
    summary.shards_written = sum(not r.skipped for r in results)
    summary.shards_skipped = sum(r.skipped for r in results)
    summary.bytes_written = sum(r.bytes for r in results if not r.skipped)
    summary.files = [r.tar for r in results]
    summary.seconds = time.perf_counter() - started
    log.info("%s", summary)
    return summary


def _write_one(selections: list[_Selection], pieces, n: int, spec: dict) -> ShardResult:
    rows = stack_slices([s.table for s in selections], pieces)
    new_keys = spec["new_keys_of"](n, rows)
    name = spec["name"]
    return write_shard(
        rows,
        new_keys,
        spec["parquet_of"](n, rows, new_keys),
        source_fs=spec["source_fs"],
        out_fs=spec["out_fs"],
        tar_path=name + ".tar",
        parquet_path=name + ".parquet",
        idx_path=name + ".idx" if spec["write_idx"] else None,
        fingerprint=job_fingerprint(rows, new_keys, dict(spec["params"], shard=n)),
        resume=spec["resume"],
    )


def _user_columns(rows: pa.Table) -> pa.Table:
    return rows.select([c for c in rows.column_names if not is_bookkeeping(c)])


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
    if samples_per_shard < 1 or max_shards < 1:
        raise ValueError("samples_per_shard and max_shards must be >= 1")
    id_col = dataset.id_col
    position_digits = 0 if samples_per_shard == 1 else len(str(samples_per_shard - 1))
    width = max_shards + position_digits

    def new_keys_of(n: int, rows: pa.Table) -> list[str]:
        base = n * 10**position_digits
        return [f"{base + i:0{width}d}" for i in range(rows.num_rows)]

    def parquet_of(n: int, rows: pa.Table, new_keys: list[str]) -> pa.Table:
        table = _user_columns(rows)
        old = table.column(id_col)
        table = table.set_column(table.column_names.index(id_col), id_col, pa.array(new_keys))
        if old_id_col:
            if old_id_col in table.column_names:
                table = table.drop_columns([old_id_col])
            table = table.add_column(1, old_id_col, old)
        return table

    def check(count: int) -> None:
        if count > 10**max_shards:
            raise ValueError(
                f"{count} output shards do not fit in max_shards={max_shards} digits; "
                f"raise max_shards or samples_per_shard"
            )

    return _export(
        dataset,
        path,
        filter_column=filter_column,
        per_shard=samples_per_shard,
        name_of=lambda n: f"{n:0{max_shards}d}",
        new_keys_of=new_keys_of,
        parquet_of=parquet_of,
        params=dict(
            kind="webdataset",
            per_shard=samples_per_shard,
            max_shards=max_shards,
            old_id_col=old_id_col,
            id_col=id_col,
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
    if images_per_tar < 1:
        raise ValueError("images_per_tar must be >= 1")
    id_col = dataset.id_col
    prefix = [] if deterministic_name else [uuid.uuid4().hex[:16]]

    def name_prefix(digests: list[str]) -> None:
        h = hashlib.sha256(f"{images_per_tar}\0{filter_column}\0".encode())
        for d in digests:
            h.update(d.encode())
        prefix.append(h.hexdigest()[:16])

    def new_keys_of(n: int, rows: pa.Table) -> list[str]:
        keys = rows.column(id_col).to_pylist()
        unsafe = [k for k in keys if k.startswith("/") or ".." in k.split("/")]
        if unsafe:
            raise ValueError(
                f"record keys {unsafe[:10]} would be unsafe member names; use to_webdataset, "
                f"which renames records"
            )
        return keys

    def name_of(n: int) -> str:
        return f"images-{prefix[0]}-{n:06d}"

    def parquet_of(n: int, rows: pa.Table, new_keys: list[str]) -> pa.Table:
        table = _user_columns(rows)
        tar_name = f"{name_of(n)}.tar"
        table = table.add_column(1, "tar_file", pa.array([tar_name] * rows.num_rows, pa.string()))
        return table.add_column(2, "member_name", rows.column("_image_member"))

    return _export(
        dataset,
        output_dir,
        filter_column=filter_column,
        per_shard=images_per_tar,
        name_of=name_of,
        new_keys_of=new_keys_of,
        parquet_of=parquet_of,
        params=dict(kind="images", per_shard=images_per_tar, id_col=id_col),
        storage_options=storage_options,
        resume=resume,
        verbose=verbose,
        write_idx=write_idx,
        name_prefix=name_prefix if deterministic_name else None,
    )


__all__ = ["ExportSummary", "to_webdataset", "write_images"]

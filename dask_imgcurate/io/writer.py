"""The writer core: copy records' member bytes into one output tar (+ .idx + Parquet).

Bytes are copied as they are (no decode, no re-encode), read by byte range from the source
tars. Adjacent member ranges of a source are merged into one read of at most
``MAX_READ`` bytes, so memory per shard stays bounded whatever the shard size. Each output
file is written under a temporary name and moved into place when complete; the Parquet file
comes last and carries a fingerprint of the job, so a re-run can tell a finished shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.records import split_key
from dask_imgcurate.io.tarindex import BLOCK
from dask_imgcurate.io.tarwrite import END_OF_ARCHIVE, member_header, padding

MAX_READ = 8 << 20  # bytes per merged read
MAX_GAP = 64 << 10  # merge two ranges of a source when at most this far apart
FINGERPRINT_KEY = b"dask_imgcurate.fingerprint"
TAR_SIZE_KEY = b"dask_imgcurate.tar_size"


@dataclass(frozen=True)
class ShardResult:
    """What writing one output shard did."""

    tar: str
    parquet: str
    records: int
    bytes: int
    skipped: bool = False


@dataclass(frozen=True)
class _Member:
    source: str
    offset: int
    size: int
    out_name: str


def output_members(rows: pa.Table, new_keys: Sequence[str]) -> list[_Member]:
    """Every member of ``rows`` (in row order, then tar order) with its output name."""
    sources = rows.column("_shard").to_pylist()
    members = rows.column("_members").to_pylist()
    out = []
    for source, record, key in zip(sources, members, new_keys):
        for m in record:
            ext = split_key(m["name"])[1]
            out.append(_Member(source, m["offset"], m["size"], f"{key}.{ext}" if ext else key))
    return out


def _merged_reads(members: list[_Member]) -> Iterator[tuple[str, int, int, list[_Member]]]:
    """Group members into reads ``(source, start, end, members)`` of adjacent ranges."""
    group: list[_Member] = []
    start = end = 0
    for m in members:
        if (
            group
            and m.source == group[0].source
            and 0 <= m.offset - end <= MAX_GAP
            and m.offset + m.size - start <= MAX_READ
        ):
            group.append(m)
            end = m.offset + m.size
            continue
        if group:
            yield group[0].source, start, end, group
        group, start, end = [m], m.offset, m.offset + m.size
    if group:
        yield group[0].source, start, end, group


class _RangeReader:
    """Reads byte ranges of source tars: ``pread`` locally, ranged GETs elsewhere (retried
    on transient errors, see ``fsio.retry``)."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs
        self.local = fsio.is_local(fs)
        self.files: dict[str, int] = {}

    def read(self, source: str, start: int, end: int) -> bytes:
        path = self.fs._strip_protocol(source)
        if self.local:
            fd = self.files.get(path)
            if fd is None:
                fd = self.files[path] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, end - start, start)
        else:
            data = fsio.read_range(self.fs, path, start, end)  # retried when transient
        if len(data) != end - start:
            raise OSError(
                f"{source}: short read at byte offset {start} ({len(data)} of {end - start} "
                f"bytes); the tar changed or is truncated since it was indexed"
            )
        return data

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def job_fingerprint(rows: pa.Table, new_keys: Sequence[str], params: dict) -> str:
    """A digest of what an output shard will contain, from metadata alone."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for source, record, key in zip(
        rows.column("_shard").to_pylist(), rows.column("_members").to_pylist(), new_keys
    ):
        digest.update(f"{source}\0{key}\0".encode())
        for m in record:
            digest.update(f"{m['name']}\0{m['offset']}\0{m['size']}\0".encode())
    return digest.hexdigest()


def finished(fs: fsspec.AbstractFileSystem, tar: str, parquet: str, fingerprint: str) -> bool:
    """True when ``tar`` + ``parquet`` are a complete earlier write of the same job."""
    try:
        with fs.open(parquet, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        return meta.get(FINGERPRINT_KEY) == fingerprint.encode() and int(
            meta.get(TAR_SIZE_KEY, -1)
        ) == fs.size(tar)
    except (FileNotFoundError, OSError, pa.ArrowInvalid, ValueError):
        return False


def write_shard(
    rows: pa.Table,
    new_keys: Sequence[str],
    parquet_table: pa.Table,
    *,
    source_fs: fsspec.AbstractFileSystem,
    out_fs: fsspec.AbstractFileSystem,
    tar_path: str,
    parquet_path: str,
    idx_path: str | None,
    fingerprint: str,
    resume: bool = True,
) -> ShardResult:
    """Write ``rows``' records as ``tar_path`` (+ DALI ``idx_path``) and ``parquet_table``.

    ``rows`` needs ``_shard`` and ``_members``; record i is written under ``new_keys[i]``
    and ``parquet_table`` row i describes it. With ``resume``, a shard whose Parquet carries
    the same fingerprint and whose tar has the recorded size is left as it is.
    """
    if resume and finished(out_fs, tar_path, parquet_path, fingerprint):
        return ShardResult(
            fsio.qualify(out_fs, tar_path),
            fsio.qualify(out_fs, parquet_path),
            rows.num_rows,
            out_fs.size(tar_path),
            skipped=True,
        )
    members = output_members(rows, new_keys)
    reader = _RangeReader(source_fs)
    idx_lines: list[str] = []
    current_key = None
    try:
        with fsio.atomic_write(out_fs, tar_path) as tmp, open(tmp, "wb") as out:
            position = 0
            for source, start, end, group in _merged_reads(members):
                data = memoryview(reader.read(source, start, end))
                for m in group:
                    header = member_header(m.out_name, m.size)
                    out.write(header)
                    payload_at = position + len(header)
                    out.write(data[m.offset - start : m.offset - start + m.size])
                    out.write(padding(m.size))
                    position = payload_at + m.size + (-m.size % BLOCK)
                    key, ext = split_key(m.out_name)
                    entry = f"{ext} {payload_at} {m.size} {m.out_name}"
                    if key == current_key:
                        idx_lines[-1] += " " + entry
                    else:
                        idx_lines.append(entry)
                        current_key = key
            out.write(END_OF_ARCHIVE)
            tar_size = position + len(END_OF_ARCHIVE)
    finally:
        reader.close()
    if idx_path is not None and not any(" " in m.out_name for m in members):
        with fsio.atomic_write(out_fs, idx_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(f"v1.2 {len(idx_lines)}\n" + "".join(line + "\n" for line in idx_lines))
    schema_meta = dict(parquet_table.schema.metadata or {})
    schema_meta[FINGERPRINT_KEY] = fingerprint.encode()
    schema_meta[TAR_SIZE_KEY] = str(tar_size).encode()
    with fsio.atomic_write(out_fs, parquet_path) as tmp:
        pq.write_table(parquet_table.replace_schema_metadata(schema_meta), tmp)
    return ShardResult(
        fsio.qualify(out_fs, tar_path),
        fsio.qualify(out_fs, parquet_path),
        rows.num_rows,
        tar_size,
    )


def stack_slices(parts: Sequence[pa.Table], pieces: Sequence[tuple[int, int, int]]) -> pa.Table:
    """Concatenate ``parts[i][start:stop]`` for each ``(i, start, stop)`` in ``pieces``."""
    tables = [parts[i].slice(start, stop - start) for i, start, stop in pieces]
    if not tables:
        return parts[0].slice(0, 0)
    return pa.concat_tables(tables, promote_options="permissive")


def plan_shards(counts: Sequence[int], per_shard: int) -> list[list[tuple[int, int, int]]]:
    """Split rows counted per partition into output shards of ``per_shard`` rows.

    Returns, per output shard, its ``(partition, start, stop)`` row slices, in input order:
    every shard but the last holds exactly ``per_shard`` rows.
    """
    if per_shard < 1:
        raise ValueError("samples per shard must be >= 1")
    bounds = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
    total = int(bounds[-1])
    plan = []
    for first in range(0, total, per_shard):
        last = min(first + per_shard, total)
        pieces = []
        p = int(np.searchsorted(bounds, first, side="right") - 1)
        while p < len(counts) and bounds[p] < last:
            start = max(first, int(bounds[p])) - int(bounds[p])
            stop = min(last, int(bounds[p + 1])) - int(bounds[p])
            if stop > start:
                pieces.append((p, start, stop))
            p += 1
        plan.append(pieces)
    return plan

"""The writer core: copy records' member bytes into an output tar (+ .idx + Parquet).

Bytes are copied as they are (no decode, no re-encode), read by byte range from the source
tars: adjacent member ranges of a source are merged into one read of at most ``MAX_READ``
bytes into a buffer reused by the thread (a larger member is copied ``MAX_READ`` at a time),
so memory stays bounded whatever the shard and member sizes. The layout of an output tar
follows from metadata alone (``record_spans``, ``tar_layout``), so several ``write_piece``
calls, in any processes, can fill one temporary tar at known offsets; ``commit_shard``
then ends it and publishes tar, ``.idx`` and Parquet, the Parquet last: it carries a
fingerprint of the job, so a re-run can tell a finished shard. ``write_shard`` does all of
it in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dask_imgcurate.backend import set_columns
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.dali_index import VERSION as DALI_VERSION
from dask_imgcurate.io.ranges import merge_ranges
from dask_imgcurate.io.records import split_keys
from dask_imgcurate.io.schemas import common_schema
from dask_imgcurate.io.shards import check_unchanged, version_type_error
from dask_imgcurate.io.tarindex import BLOCK
from dask_imgcurate.io.tarwrite import END_OF_ARCHIVE, header_lengths, member_headers

MAX_READ = 8 << 20  # bytes per merged read
MAX_GAP = 64 << 10  # merge two ranges of a source when at most this far apart
REMOTE_MAX_GAP = 256 << 10  # on object stores, where a request costs more than this read in vain
REMOTE_MAX_READ = 2 << 20  # bytes per ranged GET (several merged members)
REMOTE_BATCH = 64 << 20  # bytes of ranged GETs in flight at once (a piece's worth)
FINGERPRINT_KEY = b"dask_imgcurate.fingerprint"
TAR_SIZE_KEY = b"dask_imgcurate.tar_size"
IDX_SIZE_KEY = b"dask_imgcurate.idx_size"  # of the shard's .idx; absent when it has none
HEADER_BATCH = 1024  # members whose headers are encoded at once
MAX_OPEN_SOURCES = 16  # source tars a reader keeps open (a sorted frame mixes thousands)
_IOV_MAX = 1024  # buffers per writev: IOV_MAX on Linux, macOS and the BSDs
_ZEROS = memoryview(bytes(BLOCK))
_SPACE = r"[\t-\r\x1c-\x1f\x85\pZ]"  # str.isspace's characters (RE2's \s: ASCII ones only)


@dataclass(frozen=True)
class ShardResult:
    """What writing one output shard did."""

    tar: str
    parquet: str
    records: int
    bytes: int
    skipped: bool = False
    idx: str | None = None  # its DALI index, when it has one
    schema: pa.Schema | None = None  # its Parquet's (without metadata)


@dataclass(frozen=True)
class MemberPlan:
    """An output shard's members in write order, one array entry per member."""

    sources: list[str]  # the source tars
    source: np.ndarray  # index into ``sources``
    offsets: np.ndarray  # payload offset in the source tar
    sizes: np.ndarray
    names: pa.Array  # output member names
    versions: Sequence[frozenset] = ()  # per source: its versions the rows were indexed at

    def __len__(self) -> int:
        return len(self.sizes)


def _flat_members(rows: pa.Table) -> tuple[pa.ListArray, pa.StructArray]:
    lists = rows.column("_members").combine_chunks()
    return lists, lists.flatten()


def plan_members(rows: pa.Table, new_keys: Sequence[str]) -> MemberPlan:
    """Every member of ``rows`` (in row order, then tar order) with its output name."""
    lists, flat = _flat_members(rows)
    record = np.repeat(np.arange(len(lists)), lists.value_lengths().to_numpy())
    shards = pc.dictionary_encode(rows.column("_shard").combine_chunks())
    keys = pa.array(new_keys, pa.string()).take(record)
    ext = pc.fill_null(split_keys(flat.field("name"))[1], "")
    names = pc.binary_join_element_wise(keys, ext, ".")  # "key." stays a member of "key"
    return MemberPlan(
        sources=shards.dictionary.to_pylist(),
        source=shards.indices.to_numpy()[record],
        offsets=flat.field("offset").to_numpy(),
        sizes=flat.field("size").to_numpy(),
        names=names,
        versions=_source_versions(rows, shards),
    )


def _source_versions(rows: pa.Table, shards: pa.DictionaryArray) -> list[frozenset]:
    """Per source tar (``shards``' dictionary), the ``_shard_version`` s of its rows (none
    without that column, or on object stores)."""
    versions: list[set] = [set() for _ in range(len(shards.dictionary))]
    if "_shard_version" not in rows.column_names:
        return [frozenset()] * len(versions)
    column = rows.column("_shard_version")
    if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        raise version_type_error(str(column.type))
    pairs = pa.table({"tar": shards.indices, "version": column})
    distinct = pairs.group_by(["tar", "version"]).aggregate([]).drop_null()
    for tar, version in zip(*(c.to_pylist() for c in distinct.columns)):
        versions[tar].add(version)
    return [frozenset(v) for v in versions]


def merged_reads(
    plan: MemberPlan, max_gap: int = MAX_GAP, max_read: int = MAX_READ
) -> Iterator[tuple[int, int, int, int]]:
    """Group members into reads ``(first, stop, start, end)``: members ``first:stop`` of one
    source, in order, within its bytes ``[start, end)`` (``merge_ranges``' rules)."""
    breaks = np.diff(plan.source, prepend=plan.source[:1]).astype(bool).tolist()
    ends = (plan.offsets + plan.sizes).tolist()
    return merge_ranges(plan.offsets.tolist(), ends, max_gap, max_read, breaks)


def _pread_all(fd: int, view: memoryview, offset: int) -> int:
    """``os.preadv`` into ``view`` until it is full or the file ends; the bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            break
        got += n
    return got


_THREAD = threading.local()


def _read_buffer(size: int) -> memoryview:
    """A writable view of ``size`` bytes, reused by every read of this thread (fresh pages
    cost a page fault each, expensive on VMs); buffers over ``MAX_READ`` are not kept."""
    buffer = getattr(_THREAD, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(max(size, MAX_READ))
        if size <= MAX_READ:
            _THREAD.buffer = buffer
    return memoryview(buffer)[:size]


class _RangeReader:
    """Reads byte ranges of source tars: locally with ``preadv`` into this thread's reused
    buffer, elsewhere with ranged GETs (retried on transient errors, see ``fsio.retry``).
    ``versions``: per source, the versions it was indexed at; a local tar that is not at
    them when opened raises ``ShardChangedError``. At most ``MAX_OPEN_SOURCES`` local tars
    are open at once (the least recently read is closed first): a piece of a sorted frame
    reads from as many tars as it has records, more than a process may have files open."""

    def __init__(self, fs: fsspec.AbstractFileSystem, versions: dict | None = None):
        self.fs = fs
        self.local = fsio.is_local(fs)
        self.files: dict[str, int] = {}  # in order of use, the most recent last
        self.versions = versions or {}

    def read(self, source: str, start: int, end: int) -> memoryview | bytes:
        """Bytes ``[start, end)`` of ``source``; a local read is a view of the reused
        buffer, valid until the next read."""
        path = self.fs._strip_protocol(source)
        want = end - start
        if self.local:
            fd = self.files.pop(path, None)
            if fd is None:
                while len(self.files) >= MAX_OPEN_SOURCES:
                    os.close(self.files.pop(next(iter(self.files))))
                with fsio.explain_missing(self.fs, "a source tar of this export", source):
                    fd = os.open(path, os.O_RDONLY)
                try:
                    check_unchanged(source, self.versions.get(source, ()), os.fstat(fd))
                except BaseException:
                    os.close(fd)
                    raise
            self.files[path] = fd  # the most recently used
            data = _read_buffer(want)
            got = _pread_all(fd, data, start)
        else:
            data = fsio.read_range(self.fs, path, start, end)  # retried when transient
            got = len(data)
        _check_length(source, start, want, got)
        return data

    def read_many(self, spans: list[tuple[str, int, int]]) -> list[bytes]:
        """Bytes ``[start, end)`` of ``source`` for each of ``spans``, ``(source, start,
        end)`` of remote sources, in one ``cat_ranges`` call (concurrent ranged GETs, failed
        ones retried)."""
        paths = [self.fs._strip_protocol(source) for source, _, _ in spans]
        starts = [start for _, start, _ in spans]
        sizes = [end - start for _, start, end in spans]
        blobs = fsio.read_ranges(self.fs, paths, starts, sizes)
        for (source, start, _), want, data in zip(spans, sizes, blobs):
            _check_length(source, start, want, len(data))
        return blobs

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def _check_length(source: str, start: int, want: int, got: int) -> None:
    if got != want:
        raise OSError(
            f"{source}: short read at byte offset {start} ({got} of {want} bytes); the "
            f"tar changed or is truncated since it was indexed"
        )


def fetched_reads(
    plan: MemberPlan, reader: _RangeReader
) -> Iterator[tuple[int, int, int, int, memoryview | bytes | None]]:
    """``merged_reads`` of ``plan`` with their bytes (None for a read over ``MAX_READ``: one
    large member, for the caller to copy a part at a time). Local reads are made one at a
    time, into the reused buffer; remote ones (gaps up to ``REMOTE_MAX_GAP`` merged) are
    fetched concurrently, ``REMOTE_BATCH`` bytes at a time, from any of the sources."""
    if reader.local:
        for first, stop, start, end in merged_reads(plan, MAX_GAP, MAX_READ):
            source = plan.sources[plan.source[first]]
            data = None if end - start > MAX_READ else reader.read(source, start, end)
            yield first, stop, start, end, data
        return
    batch: list[tuple[int, int, int, int]] = []
    held = 0  # bytes the batch reads
    for read in merged_reads(plan, REMOTE_MAX_GAP, REMOTE_MAX_READ):
        _, _, start, end = read
        if batch and (held + end - start > REMOTE_BATCH or end - start > MAX_READ):
            yield from _fetch_batch(plan, reader, batch)
            batch, held = [], 0
        if end - start > MAX_READ:
            yield (*read, None)
        else:
            batch.append(read)
            held += end - start
    yield from _fetch_batch(plan, reader, batch)


def _fetch_batch(plan: MemberPlan, reader: _RangeReader, batch: list[tuple[int, int, int, int]]):
    spans = [(plan.sources[plan.source[first]], start, end) for first, _, start, end in batch]
    yield from (
        (*read, data) for read, data in zip(batch, reader.read_many(spans) if spans else [])
    )


def _pwrite_all(fd: int, chunks: list, offset: int) -> int:
    """``os.pwritev`` all of ``chunks`` in order at ``offset``, ``_IOV_MAX`` at a time,
    resuming short writes; return the offset after them."""
    i = 0
    while i < len(chunks):
        batch = chunks[i : i + _IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        if written == sum(map(len, batch)):
            i += len(batch)
            continue
        for chunk in batch:
            if written < len(chunk):
                chunks[i] = memoryview(chunk)[written:]
                break
            written -= len(chunk)
            i += 1
    return offset


def tar_layout(header_bytes: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """Where each member's header starts in a tar of these members, and the tar's size
    (end-of-archive blocks included)."""
    span = np.asarray(header_bytes, dtype=np.int64) + sizes + -sizes % BLOCK
    ends = np.cumsum(span)
    total = int(ends[-1]) if len(ends) else 0
    return ends - span, total + len(END_OF_ARCHIVE)


def record_spans(rows: pa.Table, key_bytes: np.ndarray) -> np.ndarray:
    """Bytes each record of ``rows`` occupies in an output tar (headers, payloads, padding)
    when written under a key of ``key_bytes[i]`` UTF-8 bytes, as ``plan_members`` names it."""
    lists, flat = _flat_members(rows)
    counts = lists.value_lengths().to_numpy()
    ext = pc.fill_null(split_keys(flat.field("name"))[1], "")
    ext_bytes = pc.binary_length(ext.cast(pa.binary())).to_numpy(zero_copy_only=False)
    name_bytes = np.repeat(np.asarray(key_bytes, dtype=np.int64), counts) + ext_bytes + 1
    header_at, tar_size = tar_layout(header_lengths(name_bytes), flat.field("size").to_numpy())
    record_at = header_at[np.cumsum(counts) - counts]  # each record's first header
    return np.diff(record_at, append=tar_size - len(END_OF_ARCHIVE))


def write_piece(
    tar: str, plan: MemberPlan, offset: int, source_fs: fsspec.AbstractFileSystem
) -> int:
    """Copy ``plan``'s members (headers, payloads, padding) into the local file ``tar``
    (created if missing; other pieces may be writing elsewhere in it) from byte ``offset``.
    Returns the offset after them."""
    offsets, sizes = plan.offsets.tolist(), plan.sizes.tolist()
    reader = _RangeReader(source_fs, dict(zip(plan.sources, plan.versions)))
    fd = os.open(tar, os.O_WRONLY | os.O_CREAT, 0o644)
    at = offset
    batch = batch_end = 0  # headers are made for HEADER_BATCH members at a time
    try:
        for first, stop, start, end, read in fetched_reads(plan, reader):
            if read is None:  # one large member: copied a MAX_READ at a time
                source = plan.sources[plan.source[first]]
                at = _copy_large(fd, tar, reader, source, (start, end), plan, first, at)
                continue
            data = memoryview(read)
            chunks: list = []
            for i in range(first, stop):
                if i >= batch_end:
                    batch, batch_end = i, min(i + HEADER_BATCH, len(plan))
                    names = plan.names.slice(batch, batch_end - batch)
                    headers, bounds = member_headers(names, plan.sizes[batch:batch_end])
                    starts = bounds.tolist()
                size, begin, j = sizes[i], offsets[i] - start, i - batch
                chunks += (
                    headers[starts[j] : starts[j + 1]],
                    data[begin : begin + size],
                    _ZEROS[: -size % BLOCK],
                )
            at = _write(fd, tar, chunks, at)
    finally:
        os.close(fd)
        reader.close()
    return at


def _copy_large(
    fd: int, tar: str, reader: _RangeReader, source: str, span: tuple[int, int], plan, i, at
) -> int:
    """Write member ``i`` of ``plan`` (bytes ``span`` of ``source``) with its header and
    padding at ``at`` in ``tar``, holding at most ``MAX_READ`` of it; the offset after it."""
    start, end = span
    at = _write(fd, tar, [member_headers(plan.names.slice(i, 1), plan.sizes[i : i + 1])[0]], at)
    for offset in range(start, end, MAX_READ):
        at = _write(fd, tar, [reader.read(source, offset, min(offset + MAX_READ, end))], at)
    return _write(fd, tar, [_ZEROS[: -(end - start) % BLOCK]], at)


def _write(fd: int, tar: str, chunks: list, at: int) -> int:
    """``_pwrite_all``, its errors naming ``tar`` (a full disk: which one)."""
    with fsio.naming(tar):
        return _pwrite_all(fd, chunks, at)


class MissingPieces(RuntimeError):
    """A shard's temporary tar lacks what some of its pieces wrote: their writes went to
    another file (this one was renamed or removed after they ran, and a later piece created
    it anew: a task retried after its worker died)."""


def _missing_piece(tar: str, plan: MemberPlan, header_at: np.ndarray, starts) -> int | None:
    """The first offset in ``starts`` (where pieces began) at which ``tar`` lacks the
    header block that piece wrote (zeros, if the piece wrote elsewhere), or None."""
    try:
        fd = os.open(tar, os.O_RDONLY)
    except FileNotFoundError:
        return min(starts, default=0)
    try:
        for start in starts:
            i = int(np.searchsorted(header_at, start))
            if i == len(header_at) or header_at[i] != start:
                return start  # not where a member begins: not a piece of this plan
            expected = member_headers(plan.names.slice(i, 1), plan.sizes[i : i + 1])[0]
            if os.pread(fd, BLOCK, start) != bytes(expected[:BLOCK]):
                return start
    finally:
        os.close(fd)
    return None


def commit_shard(
    rows: pa.Table,
    new_keys: Sequence[str],
    parquet_table: pa.Table,
    *,
    out_fs: fsspec.AbstractFileSystem,
    tar_tmp: str,
    tar_path: str,
    parquet_path: str,
    idx_path: str,
    write_idx: bool = True,
    fingerprint: str,
    piece_starts: Sequence[int] = (),
) -> ShardResult:
    """Finish an output shard whose members are all in ``tar_tmp`` (``write_piece``): end
    the tar, write its DALI ``.idx`` and Parquet, and publish all three under their final
    names, the Parquet (which marks the shard complete) last.

    ``rows`` (with ``_shard`` and ``_members``), ``new_keys`` and ``parquet_table`` are the
    shard's records as its pieces wrote them. Without an index (``write_idx=False``, or a
    member name with white space, which DALI's format cannot hold) a file left at
    ``idx_path`` by an earlier write is removed first: it would describe another tar.
    Raises ``MissingPieces`` when the header a piece wrote at one of ``piece_starts`` is not
    in ``tar_tmp``.
    """
    plan = plan_members(rows, new_keys)
    header_bytes = header_lengths(pc.binary_length(plan.names.cast(pa.binary())).to_numpy())
    header_at, tar_size = tar_layout(header_bytes, plan.sizes)
    staged = [(tar_tmp, tar_path)]  # removed unless published
    try:
        missing = _missing_piece(tar_tmp, plan, header_at, piece_starts) if piece_starts else None
        if missing is not None:
            raise MissingPieces(f"{tar_tmp}: the piece written at byte {missing} is not in it")
        members_end = tar_size - len(END_OF_ARCHIVE)
        with open(tar_tmp, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            past = size - members_end  # zeros there: the end blocks of a commit run before
            if size > tar_size or (
                past > 0 and os.pread(f.fileno(), past, members_end).strip(b"\0")
            ):
                raise RuntimeError(  # never published
                    f"{tar_tmp}: {size - members_end} bytes past the members' end that are "
                    f"not end-of-archive blocks (an inconsistency in dask_imgcurate; please "
                    f"report)"
                )
            with fsio.naming(tar_tmp):
                os.pwrite(f.fileno(), END_OF_ARCHIVE, members_end)
        text = idx_text(plan, header_at + header_bytes) if write_idx else None
        if text is not None:
            staged.append((fsio.temp_path(out_fs, idx_path), idx_path))
            with fsio.naming(staged[-1][0]), open(staged[-1][0], "w", encoding="utf-8") as f:
                f.write(text)
        else:
            fsio.remove_file(out_fs, idx_path, missing_ok=True)
        schema_meta = dict(parquet_table.schema.metadata or {})
        schema_meta[FINGERPRINT_KEY] = fingerprint.encode()
        schema_meta[TAR_SIZE_KEY] = str(tar_size).encode()
        if text is not None:
            schema_meta[IDX_SIZE_KEY] = str(len(text.encode())).encode()
        staged.append((fsio.temp_path(out_fs, parquet_path), parquet_path))
        with fsio.naming(staged[-1][0]):
            pq.write_table(parquet_table.replace_schema_metadata(schema_meta), staged[-1][0])
            schema = pq.read_schema(staged[-1][0]).remove_metadata()  # as read (s -> ms)
        # an earlier export's Parquet marks its own tar complete: gone before this tar
        # replaces that one, so a crash in between leaves the shard to be written again
        fsio.remove_file(out_fs, parquet_path, missing_ok=True)
        for tmp, final in staged:
            fsio.publish(out_fs, tmp, final)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return ShardResult(
        fsio.qualify(out_fs, tar_path),
        fsio.qualify(out_fs, parquet_path),
        len(rows),
        tar_size,
        idx=fsio.qualify(out_fs, idx_path) if text is not None else None,
        schema=schema,
    )


def write_shard(
    rows: pa.Table,
    new_keys: Sequence[str],
    parquet_table: pa.Table,
    *,
    source_fs: fsspec.AbstractFileSystem,
    out_fs: fsspec.AbstractFileSystem,
    tar_path: str,
    parquet_path: str,
    idx_path: str,
    write_idx: bool = True,
    fingerprint: str,
    resume: bool = True,
) -> ShardResult:
    """One output shard in one call: ``write_piece`` of all its members, then
    ``commit_shard``. With ``resume``, a shard whose Parquet carries the same fingerprint
    and whose tar has the recorded size is left as it is."""
    if resume:
        done = finished(out_fs, tar_path, parquet_path, fingerprint, idx_path)
        if done is not None:
            return dataclasses.replace(done, records=len(rows))
    tar_tmp = fsio.temp_path(out_fs, tar_path)
    try:
        write_piece(tar_tmp, plan_members(rows, new_keys), 0, source_fs)
        return commit_shard(
            rows,
            new_keys,
            parquet_table,
            out_fs=out_fs,
            tar_tmp=tar_tmp,
            tar_path=tar_path,
            parquet_path=parquet_path,
            idx_path=idx_path,
            write_idx=write_idx,
            fingerprint=fingerprint,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tar_tmp)


def idx_text(plan: MemberPlan, payload_at: np.ndarray) -> str | None:
    """The DALI ``.idx`` of a tar holding ``plan``'s members with payloads at
    ``payload_at``: a line per run of members with one key; None if a name has white space
    or no extension."""
    if pc.any(pc.match_substring_regex(plan.names, _SPACE)).as_py():  # as format_dali_index
        return None
    keys, exts = split_keys(plan.names)
    if pc.any(pc.equal(exts, "")).as_py():  # a line's fields would not parse
        return None
    entries = pc.binary_join_element_wise(
        exts,
        pa.array(payload_at).cast(pa.string()),
        pa.array(plan.sizes).cast(pa.string()),
        plan.names,
        " ",
    )
    new_line = np.ones(len(plan), dtype=bool)
    new_line[1:] = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
    starts = np.append(np.flatnonzero(new_line), len(plan)).astype(np.int32)
    lines = pc.binary_join(pa.ListArray.from_arrays(starts, entries), " ").to_pylist()
    return f"{DALI_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def job_fingerprint(
    rows: pa.Table, new_keys: Sequence[str], params: dict, parquet: pa.Table
) -> str:
    """A digest of what an output shard will contain, from metadata alone: the source byte
    ranges (and tar versions) and new names of its members, and the schema and values of
    its Parquet."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    lists, flat = _flat_members(rows)
    for strings in (rows.column("_shard").to_pylist(), new_keys, flat.field("name").to_pylist()):
        digest.update("\0".join(strings).encode("utf-8", "surrogateescape") + b"\1")
    if "_shard_version" in rows.column_names:  # a tar rewritten since: the shard is redone
        versions = rows.column("_shard_version").cast(pa.int64())
        digest.update(pc.fill_null(versions, 0).to_numpy().astype("<i8").tobytes())
    for numbers in (flat.field("offset"), flat.field("size"), lists.value_lengths()):
        digest.update(numbers.to_numpy().astype("<i8").tobytes())
    # the Parquet's types as written: decoding categoricals below would hide string <-> category
    digest.update("\0".join(f"{f.name}:{f.type}" for f in parquet.schema).encode() + b"\1")
    # Arrow IPC bytes of fresh buffers (``take``): equal for equal values however the rows
    # were laid out (slices, chunks, a trip between workers); bytes under nulls aside, which
    # can only make an unchanged shard look changed, i.e. rewritten, never the reverse
    canonical = parquet.combine_chunks().take(pa.array(np.arange(parquet.num_rows)))
    decoded = {}
    for i, column in enumerate(canonical.columns):  # categoricals: values, not dictionaries
        if pa.types.is_dictionary(column.type):
            values = pa.chunked_array([c.dictionary_decode() for c in column.chunks])
            decoded[i] = (pa.field(canonical.field(i).name, values.type), values)
    canonical = set_columns(canonical, decoded)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, canonical.schema) as stream:
        stream.write_table(canonical)
    digest.update(sink.getvalue())
    return digest.hexdigest()


def finished(
    fs: fsspec.AbstractFileSystem, tar: str, parquet: str, fingerprint: str, idx: str
) -> ShardResult | None:
    """The result of a complete earlier write of the same job to ``tar`` + ``parquet`` (and
    ``idx`` when that write made one), with ``skipped`` set and ``records`` unknown (-1);
    None when there is none."""
    try:
        with fs.open(parquet, "rb") as f:
            schema = pq.read_schema(f)
        meta = schema.metadata or {}
        if meta.get(FINGERPRINT_KEY) != fingerprint.encode():
            return None
        tar_size = int(meta.get(TAR_SIZE_KEY, -1))
        if tar_size != fs.size(tar):
            return None
        if IDX_SIZE_KEY in meta and int(meta[IDX_SIZE_KEY]) != fs.size(idx):
            return None
    except (FileNotFoundError, OSError, pa.ArrowInvalid, ValueError):
        return None
    return ShardResult(
        fsio.qualify(fs, tar),
        fsio.qualify(fs, parquet),
        -1,
        tar_size,
        skipped=True,
        idx=fsio.qualify(fs, idx) if IDX_SIZE_KEY in meta else None,
        schema=schema.remove_metadata(),
    )


def retype_parquet(fs: fsspec.AbstractFileSystem, path: str, schema: pa.Schema) -> None:
    """Rewrite the Parquet file ``path`` with its columns cast to ``schema`` (null columns
    to ``common_schema``'s types), keeping its schema metadata; atomically."""
    table = pq.read_table(io.BytesIO(fsio.read_bytes(fs, path)))
    table = table.cast(schema.with_metadata(table.schema.metadata))
    with fsio.atomic_write(fs, path) as tmp, fsio.naming(tmp):
        pq.write_table(table, tmp)


def type_null_columns(fs: fsspec.AbstractFileSystem, results: Sequence[ShardResult]) -> int:
    """Give each written shard's Parquet the ``common_schema`` of them all, so readers of the
    directory as one dataset see one type per column; the number of files rewritten."""
    common = common_schema([r.schema for r in results if r.schema is not None])
    if common is None:
        return 0
    stale = [r.parquet for r in results if r.schema is not None and r.schema != common]
    paths = [fs._strip_protocol(p) for p in stale]
    fsio.concurrently([functools.partial(retype_parquet, fs, p, common) for p in paths], 8)
    return len(paths)


def plan_shards(
    counts: Sequence[int],
    per_shard: int,
    first_shard: int = 0,
    complete_only: bool = False,
    rows_before: int = 0,
) -> list[list[tuple[int, int, int]]]:
    """Split rows counted per partition into output shards of ``per_shard`` rows.

    Returns, per output shard from ``first_shard`` on, its ``(partition, start, stop)`` row
    slices, in input order: every shard but the last holds exactly ``per_shard`` rows. With
    ``complete_only`` a last shard of fewer rows is left out (more rows may follow).
    ``counts`` may start later than the first partition: ``rows_before`` rows come before
    ``counts[0]`` (at most ``first_shard * per_shard``), and partitions are numbered from it.
    """
    if per_shard < 1:
        raise ValueError("samples per shard must be >= 1")
    if rows_before > first_shard * per_shard:
        raise ValueError("the counts start after the first shard to plan")
    bounds = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
    total = int(bounds[-1])
    plan = []
    for first in range(first_shard * per_shard - rows_before, total, per_shard):
        last = min(first + per_shard, total)
        if complete_only and last - first < per_shard:
            break
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

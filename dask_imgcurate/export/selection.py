"""Each partition's kept rows, selected in the task that reads it: metadata only, with the
bytes each record will take in an output tar (``record_spans``).

A selection is held (persisted) until the export ends, so it keeps in memory only what
planning needs: its counts and each kept record's size in an output tar (8 bytes a record).
The kept rows themselves (ids, member lists, captions, embeddings, scores) go to a hidden
file of Arrow IPC segments in the output directory, from which the pieces and the commit of
each output shard read back the segments that hold their rows (memory-mapped where local).
Memory then stays flat however many records an export selects."""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.backend import to_arrow
from dask_imgcurate.export import guards
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.writer import record_spans
from dask_imgcurate.progress import tick


@dataclass(frozen=True)
class Selection:
    """One partition's kept rows (Arrow, or where they were spilled), what each takes in an
    output tar, its counts and, when asked for, its digest."""

    table: pa.Table | None  # the kept rows, unless spilled
    spans: np.ndarray  # bytes of each kept record in an output tar (``record_spans``)
    records_in: int
    dropped_for_errors: int
    digest: str
    sources: tuple[str, ...]  # the tars its rows come from (``_shard``)
    schema: pa.Schema | None  # the kept rows', when there are any
    spilled: Spilled | None = None  # the kept rows, written out

    def rows(self, start: int, stop: int) -> pa.Table:
        """Kept rows ``start:stop``, every column in the frame's order."""
        if self.spilled is not None:
            return self.spilled.read(start, stop)
        return self.table.slice(start, stop - start)

    def stats(self) -> tuple:
        """What the planner needs: everything but the rows."""
        return (
            self.spans,
            self.records_in,
            self.dropped_for_errors,
            self.digest,
            self.sources,
            self.schema,
        )


SEGMENT_BYTES = 256 << 10
"""A spilled selection's rows are Arrow IPC files of about this many bytes each, one after
another in one file: a shard that takes a few rows of a partition reads only their segments
(one ranged GET on object stores), not every row of the partition."""


ALIGN = 64  # segments start at multiples of this: their buffers stay aligned for Arrow


@dataclass(frozen=True)
class Spilled:
    """Where a selection's kept rows are: Arrow IPC files (segments) in one file."""

    fs: fsspec.AbstractFileSystem
    path: str
    offsets: tuple[int, ...]  # segment i: ``sizes[i]`` bytes at ``offsets[i]`` in the file,
    sizes: tuple[int, ...]
    starts: tuple[int, ...]  # ... rows [starts[i], starts[i + 1]) of the table

    @classmethod
    def write(
        cls, table: pa.Table, fs: fsspec.AbstractFileSystem, path: str, directory: str
    ) -> Spilled:
        """Write ``table`` (at least one row) as ``path``; ``directory``: the output
        directory, named when it is missing."""
        per = rows_per_segment(table)
        starts = list(range(0, table.num_rows, per))
        chunks, offsets, sizes, at = [], [], [], 0
        for start in starts:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table.slice(start, per))  # Arrow IPC: no encoding
            segment = sink.getvalue()
            padding = bytes(-segment.size % ALIGN)
            chunks += [segment, padding]
            offsets.append(at)
            sizes.append(segment.size)
            at += segment.size + len(padding)
        with fsio.explain_missing(fs, "the output directory, made by the client", directory):
            fsio.write_file(fs, path, b"".join(chunks))
        return cls(fs, path, tuple(offsets), tuple(sizes), (*starts, table.num_rows))

    def read(self, start: int, stop: int) -> pa.Table:
        """Rows ``start:stop``, read from the segments that hold them; local files are
        memory-mapped (a slice touches only its pages), remote ones read by one ranged GET."""
        first = min(bisect.bisect_right(self.starts, start), len(self.starts) - 1) - 1
        last = max(bisect.bisect_left(self.starts, stop), first + 1)
        at, end = self.offsets[first], self.offsets[last - 1] + self.sizes[last - 1]
        what = "the selected rows, written into the output directory by a worker"
        with fsio.explain_missing(self.fs, what, self.path):
            if fsio.is_local(self.fs):
                mapped = pa.memory_map(self.path)
                mapped.seek(at)
                data = mapped.read_buffer(end - at)  # no copy
            else:
                data = pa.py_buffer(fsio.read_range(self.fs, self.path, at, end))
        if data.size != end - at:
            raise OSError(
                f"{fsio.qualify(self.fs, self.path)}: {data.size} bytes at byte offset {at}, "
                f"expected {end - at}: the file changed after a worker wrote it"
            )
        tables = [
            pa.ipc.open_file(data.slice(self.offsets[i] - at, self.sizes[i])).read_all()
            for i in range(first, last)
        ]
        return pa.concat_tables(tables).slice(start - self.starts[first], stop - start)


def rows_per_segment(table: pa.Table) -> int:
    """About ``SEGMENT_BYTES`` of the rows' own data, and enough rows that the dictionaries,
    which every segment repeats whole, add at most a quarter to the file."""
    dictionaries = sum(
        max(chunk.dictionary.nbytes for chunk in column.chunks)
        for column in table.columns
        if pa.types.is_dictionary(column.type) and column.num_chunks
    )
    data = max(table.nbytes - dictionaries, 1)
    return max(1, max(SEGMENT_BYTES, 4 * dictionaries) * table.num_rows // data)


def spill_path(directory: str, run: str, partition: int) -> str:
    """A hidden temporary name (``remove_stale_temps`` sweeps it after a crash)."""
    return fsio.join(directory, f".rows-{partition:06d}.arrow{fsio.TEMP_MARK}{run}")


def select_partition(
    frame,
    filter_column: str | None,
    digest: bool,
    key_bytes_of,
    id_col: str,
    spill: tuple | None = None,
    progress: str | None = None,
    partition_info: dict | None = None,
) -> Selection:
    """``spill``: ``(fs, directory, run)`` to hold the kept rows in a file, not in memory."""
    table = to_arrow(frame)
    n_in = table.num_rows
    keep = np.ones(n_in, dtype=bool)
    if filter_column is not None:
        column = table.column(filter_column).fill_null(False).cast(pa.bool_())
        keep &= column.to_numpy(zero_copy_only=False)
    errors = 0
    if "error" in table.column_names:  # a record with an error counts as one, whatever
        guards.check_error_texts(table)  # (an object column of booleans, say)
        ok = table.column("error").is_null().to_numpy(zero_copy_only=False)  # the filter
        errors = int((~ok).sum())  # says (its scores are NaN: a score filter drops it)
        keep &= ok
    kept = table.filter(pa.array(keep))
    if kept.column("_members").null_count:  # dd.merge(scores, metadata, how="left")
        orphans = kept.column("_members").is_null()
        ids = kept.filter(orphans).column(id_col).to_pylist()[:5]
        raise ValueError(
            f"rows to export are no record of the dataset's tars (no '_members': rows a "
            f"merge or concat added), e.g. the ids {ids}; merge "
            f"the other table into the dataset's metadata (how='left' or 'inner'), or filter "
            f"those rows out"
        )
    spans = record_spans(kept, key_bytes_of(kept))
    sources = tuple(pc.unique(table.column("_shard")).drop_null().to_pylist())
    number = (partition_info or {}).get("number", 0)
    digested = digest_rows(kept) if digest else ""
    spilled, schema = None, kept.schema if kept.num_rows else None  # types of kept values
    if spill is not None and kept.num_rows:
        fs, directory, run = spill
        spilled = Spilled.write(kept, fs, spill_path(directory, run, number), directory)
        kept = None
    tick(progress, number, n_in)
    return Selection(kept, spans, n_in, errors, digested, sources, schema, spilled)


def digest_rows(kept: pa.Table) -> str:
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

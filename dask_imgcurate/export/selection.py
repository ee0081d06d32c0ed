"""Each partition's kept rows, selected in the task that reads it: metadata only, with the
bytes each record will take in an output tar (``record_spans``).

A selection is held (persisted) until the export ends, so it keeps in memory only what the
piece tasks need (the id and bookkeeping columns); the other metadata columns (captions,
embeddings, scores: most of the bytes) go to a hidden Parquet fragment in the output
directory (Arrow IPC), which the commit of each output shard reads back for its rows. Memory then
grows with the records' member lists, not with their metadata."""

from __future__ import annotations

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
from dask_imgcurate.metadata import is_bookkeeping
from dask_imgcurate.progress import tick


@dataclass(frozen=True)
class Selection:
    """One partition's kept rows (Arrow), what each takes in an output tar, its counts and,
    when asked for, its digest."""

    table: pa.Table
    spans: np.ndarray  # bytes of each kept record in an output tar (``record_spans``)
    records_in: int
    dropped_for_errors: int
    digest: str
    sources: tuple[str, ...]  # the tars its rows come from (``_shard``)
    spilled: Spilled | None = None  # the other columns, when there are any

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows ``start:stop`` with every column, in the frame's order."""
        held = self.table.slice(start, stop - start)
        if self.spilled is None:
            return held
        fs, path = self.spilled.fs, self.spilled.path
        what = "the selected rows' columns, written into the output directory by a worker"
        with fsio.explain_missing(fs, what, path):
            data = fsio.read_bytes(fs, path)  # retried when remote
        other = pa.ipc.open_stream(data).read_all().slice(start, stop - start)
        columns = {name: held.column(name) for name in held.column_names}
        columns.update({name: other.column(name) for name in other.column_names})
        return pa.table({name: columns[name] for name in self.spilled.order})

    def stats(self) -> tuple:
        """What the planner needs: everything but the rows."""
        return self.spans, self.records_in, self.dropped_for_errors, self.digest, self.sources


@dataclass(frozen=True)
class Spilled:
    """Where a selection's other columns are, and the frame's column order."""

    fs: fsspec.AbstractFileSystem
    path: str
    order: tuple[str, ...]


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
    """``spill``: ``(fs, directory, run)`` to hold only the id and bookkeeping columns."""
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
    other = [c for c in kept.column_names if c != id_col and not is_bookkeeping(c)]
    spilled = None
    if spill is not None and other and kept.num_rows:
        fs, directory, run = spill
        spilled = Spilled(fs, spill_path(directory, run, number), tuple(kept.column_names))
        rest = kept.select(other)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rest.schema) as stream:
            stream.write_table(rest)  # Arrow IPC: no encoding, every type as it is
        with fsio.explain_missing(fs, "the output directory, made by the client", directory):
            fsio.write_file(fs, spilled.path, sink.getvalue().to_pybytes())
        held = [i for i, c in enumerate(kept.column_names) if c == id_col or is_bookkeeping(c)]
        kept = kept.select(held)  # (drop_columns is quadratic in the columns it drops)
    tick(progress, number, n_in)
    return Selection(kept, spans, n_in, errors, digested, sources, spilled)


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

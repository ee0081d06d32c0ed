"""Each partition's kept rows, selected in the task that reads it: metadata only, with the
bytes each record will take in an output tar (``record_spans``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.backend import to_arrow
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.writer import record_spans
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

    def stats(self) -> tuple:
        """What the planner needs: everything but the rows."""
        return self.spans, self.records_in, self.dropped_for_errors, self.digest, self.sources


def select_partition(
    frame,
    filter_column: str | None,
    digest: bool,
    key_bytes_of,
    id_col: str,
    progress: str | None = None,
    partition_info: dict | None = None,
) -> Selection:
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
    return Selection(kept, spans, n_in, errors, digest_rows(kept) if digest else "", sources)


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

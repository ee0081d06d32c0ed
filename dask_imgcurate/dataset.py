"""``ImageTextPairDataset``: WebDataset shards as a Dask DataFrame of record metadata."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import posixpath
import uuid
import warnings
from collections.abc import Sequence

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dask_imgcurate import export
from dask_imgcurate.backend import column_names, resolve_backend, to_arrow, to_frame
from dask_imgcurate.errors import ShardWarning
from dask_imgcurate.export import ExportSummary
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.schemas import ColumnTypes, common_schema
from dask_imgcurate.io.shards import Shard, find_shards
from dask_imgcurate.metadata import is_bookkeeping, repeated_ids, shard_table, sidecar_schema
from dask_imgcurate.progress import (
    PartitionProgress,
    naming_killed_tasks,
    nested_column_shuffles,
    note_reading,
    tick,
)

log = logging.getLogger(__name__)


class ImageTextPairDataset:
    """Image-text WebDataset shards with their metadata as a Dask DataFrame.

    ``metadata`` has one row per record and one partition per shard (or per
    ``files_per_partition`` shards); within a partition rows are sorted by ``id_col``.
    Assign a new frame to ``metadata`` (or use ``with_metadata``) to add columns.
    """

    def __init__(
        self,
        path: str | Sequence[str],
        metadata: dd.DataFrame,
        shards: Sequence[Shard],
        id_col: str = "key",
        storage_options: dict | None = None,
        files_per_partition: int = 1,
    ):
        self.path = path
        self.metadata = metadata
        self.shards = list(shards)
        self.id_col = id_col
        self.storage_options = dict(storage_options or {})
        self.files_per_partition = files_per_partition

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsio.url_to_fs(self._first_path, self.storage_options)[0]

    @property
    def _first_path(self) -> str:
        return self.path[0] if isinstance(self.path, (list, tuple)) else self.path

    @property
    def tar_files(self) -> list[str]:
        """Paths of the shards, as users write them (``s3://...`` for remote ones)."""
        fs = self.fs
        return [fsio.qualify(fs, s.tar) for s in self.shards]

    def with_metadata(self, metadata: dd.DataFrame) -> ImageTextPairDataset:
        """A copy of this dataset with another metadata frame."""
        return ImageTextPairDataset(
            self.path,
            metadata,
            self.shards,
            self.id_col,
            self.storage_options,
            self.files_per_partition,
        )

    def __repr__(self) -> str:
        return (
            f"ImageTextPairDataset({self.path!r}, shards={len(self.shards)}, "
            f"partitions={self.metadata.npartitions}, columns={list(self.metadata.columns)})"
        )

    @classmethod
    def from_webdataset(
        cls,
        path: str | Sequence[str],
        id_col: str = "key",
        storage_options: dict | None = None,
        backend: str = "auto",
        files_per_partition: int = 1,
        *,
        strict: bool = True,
        on_mismatch: str = "raise",
    ) -> ImageTextPairDataset:
        """Load the ``*.tar`` shards of ``path`` (a directory, glob, tar, or list of tars).

        A ``NNNNN.parquet`` beside ``NNNNN.tar`` supplies that shard's metadata (its ids must
        match the tar's keys, or with ``on_mismatch="drop"`` the intersection is kept);
        otherwise captions and ``.json`` fields are read from the tar. A ``NNNNN.idx`` (DALI
        v1.2) beside a tar is used instead of scanning it. ``strict=False`` keeps the complete
        records before damage in a truncated or corrupt tar (with a warning) instead of
        raising.
        """
        if files_per_partition < 1:
            raise ValueError("files_per_partition must be >= 1")
        if on_mismatch not in ("raise", "drop"):
            raise ValueError("on_mismatch must be 'raise' or 'drop'")
        if not isinstance(path, str) and not len(path):  # e.g. a glob that matched nothing
            raise FileNotFoundError("no .tar shards found: the list of paths is empty")
        fs, _ = fsio.url_to_fs(path if isinstance(path, str) else path[0], storage_options)
        shards = find_shards(fs, path)
        if not shards:
            raise FileNotFoundError(f"no .tar shards found in {path}")
        backend = resolve_backend(backend)
        loader = _ShardLoader(fs, id_col, strict, on_mismatch, backend, schema=None)
        loader.schema = _infer_schema(loader, shards)
        groups = [
            tuple(shards[i : i + files_per_partition])
            for i in range(0, len(shards), files_per_partition)
        ]
        meta = to_frame(loader.schema.empty_table(), backend)
        with dask.config.set({"dataframe.convert-string": False}):
            ddf = dd.from_map(
                loader, groups, meta=meta, enforce_metadata=False, label="read-webdataset"
            )
        return cls(path, ddf, shards, id_col, storage_options, files_per_partition)

    @nested_column_shuffles()
    @naming_killed_tasks()
    def save_metadata(
        self,
        path: str | None = None,
        columns: Sequence[str] | None = None,
        storage_options: dict | None = None,
        verbose: bool = False,
    ) -> pd.DataFrame:
        """Write each shard's metadata to ``<path>/<shard stem>.parquet``.

        ``path=None`` overwrites the Parquet files beside the dataset's own tars. Each file is
        written under a temporary name and renamed when complete. ``columns`` (default: all
        but the ``_``-prefixed bookkeeping columns) always gets the id column first.
        ``storage_options`` are those of ``path`` (default: the dataset's). ``verbose`` shows
        a progress bar over the partitions (which compute whatever the metadata holds:
        embeddings, scores). Returns one row per file written (shard, path, rows, and
        ``errors``: its rows with a non-null ``error`` column, 0 without one).
        """
        frame = self.metadata
        present = column_names(frame)  # a named index (set_index) is written too
        for needed in (self.id_col, "_shard"):
            if needed not in present:
                raise KeyError(
                    f"save_metadata: the metadata has no column {needed!r} (dropped or "
                    f"renamed?): every Parquet row needs its record's id and shard ('_shard')"
                )
        if columns is None:
            columns = [c for c in present if not is_bookkeeping(c)]
        bookkeeping = [c for c in columns if is_bookkeeping(c)]
        if bookkeeping:
            raise ValueError(
                f"save_metadata: {bookkeeping} are bookkeeping columns (the reader's and "
                f"writer's own), which are never written to Parquet"
            )
        missing = [c for c in columns if c not in present]
        if missing:
            raise KeyError(f"save_metadata: no such columns {missing}")
        columns = [self.id_col] + [c for c in columns if c != self.id_col]
        fs = self.fs
        groups = None
        if frame.npartitions == -(-len(self.shards) // self.files_per_partition):
            groups = [
                self.shards[i : i + self.files_per_partition]
                for i in range(0, len(self.shards), self.files_per_partition)
            ]
        if path is None:
            out_fs, target = fs, None
        else:
            out_fs, target = fsio.url_to_fs(path, storage_options or self.storage_options)
            export.guards.check_output_path(out_fs, target)
        fsio.refuse_read_only(out_fs, target or self.shards[0].tar, "save_metadata (pass path=)")
        progress = PartitionProgress("save_metadata", frame.npartitions, verbose)
        run = uuid.uuid4().hex[:8]
        writer = _MetadataWriter(fs, out_fs, target, list(columns), run, progress.topic)
        result_meta = pd.DataFrame(
            {
                "shard": pd.Series([], dtype=object),
                "path": pd.Series([], dtype=object),
                "fragment": pd.Series([], dtype=object),
                "rows": pd.Series([], dtype="int64"),
                "errors": pd.Series([], dtype="int64"),
                "schema": pd.Series([], dtype=object),
            }
        )
        directories = writer.directories(export.guards.input_tars(self)[0])
        with contextlib.ExitStack() as held:
            for directory in directories:  # no other writer there meanwhile
                held.enter_context(fsio.writing_to(out_fs, directory))
            for directory in directories:  # fragments of an interrupted earlier run
                fsio.remove_stale_temps(out_fs, directory)
            try:
                with dask.config.set({"dataframe.convert-string": False}), progress:
                    # the shard groups reach the tasks as one Delayed (a dependency, shipped
                    # once per worker), not in the writer: it is serialized for every task,
                    # which with all the groups inside was quadratic in the partitions
                    groups_arg = None if groups is None else dask.delayed(groups, traverse=False)
                    fragments = frame.map_partitions(writer, groups_arg, meta=result_meta)
                    fragments = fragments.compute()
                written = _publish_fragments(out_fs, fragments, self.id_col)
                writer.remove_fragments(directories)  # of tasks run again (a worker died)
                return written
            except BaseException:
                writer.remove_fragments(directories)  # best effort: tasks may still write
                raise

    def to_webdataset(
        self,
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
        """Export the kept records as ``{n:0{max_shards}d}.tar`` + ``.parquet`` (+ ``.idx``).

        Keeps rows where ``filter_column`` is True (all rows when None) and, when an
        ``error`` column exists, rows without an error. Every output shard but the last holds
        exactly ``samples_per_shard`` records, in the metadata frame's order. Record ids become
        ``shard * 10**d + position`` zero-padded to ``max_shards + d`` digits, where
        ``d = ceil(log10(samples_per_shard))``; members are renamed to match and their bytes
        copied unchanged (so a ``key`` inside a ``.json`` member keeps the old id). The old id
        is kept in ``old_id_col`` when given. ``storage_options``: the output's (fsspec);
        ``resume``: skip shards an earlier run of the same export completed; ``verbose``:
        progress bars; ``write_idx``: a DALI ``.idx`` beside each tar.
        """
        return export.to_webdataset(
            self,
            path,
            filter_column,
            samples_per_shard,
            max_shards,
            old_id_col,
            storage_options=storage_options,
            resume=resume,
            verbose=verbose,
            write_idx=write_idx,
        )

    def write_images(
        self,
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
        """Export in the ImageWriter layout: ``images-{hash}-{NNNNNN}.tar`` + ``.parquet``.

        Records keep their ids and all their members. With ``deterministic_name`` the hash
        comes from the kept records and the parameters, so the same input gives the same
        names and bytes on every run; otherwise it is random. Each Parquet holds the id, the
        ``tar_file`` (relative name), the image's ``member_name`` and every metadata column.
        ``remove_image_data`` is accepted for compatibility: image bytes are never held.
        ``verbose``, ``storage_options``, ``resume`` and ``write_idx`` as for
        ``to_webdataset``.
        """
        return export.write_images(
            self,
            output_dir,
            images_per_tar,
            filter_column,
            deterministic_name,
            remove_image_data,
            verbose,
            storage_options=storage_options,
            resume=resume,
            write_idx=write_idx,
        )


NULL_TYPE_LOOKAHEAD = 16  # sidecar footers read to type a column all null in the first


class _ShardLoader:
    """Builds one partition from a group of shards (picklable, runs on workers)."""

    def __init__(self, fs, id_col, strict, on_mismatch, backend, schema):
        self.fs, self.id_col, self.strict = fs, id_col, strict
        self.on_mismatch, self.backend, self.schema = on_mismatch, backend, schema

    def __dask_tokenize__(self):
        return (
            type(self).__name__,
            self.fs,
            self.id_col,
            self.strict,
            self.on_mismatch,
            self.backend,
            str(self.schema),
        )

    def table(self, shard: Shard) -> pa.Table:
        what = "a file of this shard, listed when the dataset was loaded"
        with fsio.explain_missing(self.fs, what):
            return shard_table(
                self.fs, shard, self.id_col, strict=self.strict, on_mismatch=self.on_mismatch
            )

    def __call__(self, group: tuple[Shard, ...]):
        note_reading([fsio.qualify(self.fs, s.tar) for s in group])
        tables = [_conform(self.table(s), self.schema, fsio.qualify(self.fs, s.tar)) for s in group]
        table = pa.concat_tables(tables)
        if len(tables) > 1:  # each shard is sorted; the partition must be too
            table = table.sort_by(self.id_col)
        return to_frame(table, self.backend)


def _infer_schema(loader: _ShardLoader, shards: list[Shard]) -> pa.Schema:
    """Schema of the first shard with records: from its sidecar Parquet's footer when it has
    one, so loading reads no tar on the client. A column typed null there (all null: a
    pandas object column without values) takes its type from the next sidecar footers that
    have one (up to ``NULL_TYPE_LOOKAHEAD`` of them), else string."""
    for first in range(len(shards)):
        shard = shards[first]
        schema = sidecar_schema(loader.fs, shard, loader.id_col)
        if schema is not None:
            break
        with warnings.catch_warnings():  # the compute reports them (and per-record ones:
            warnings.simplefilter("ignore")  # invalid .json, huge ints), once
            table = loader.table(shard)
        schema = table.schema
        if table.num_rows:
            break
    untyped = {f.name for f in schema if f.type == pa.null()}
    found: dict[str, pa.DataType] = {}
    for shard in shards[first + 1 : first + 1 + NULL_TYPE_LOOKAHEAD] if untyped else ():
        later = sidecar_schema(loader.fs, shard, loader.id_col)
        for field in later or ():
            if field.name in untyped and field.type != pa.null():
                found.setdefault(field.name, field.type)
        if len(found) == len(untyped):
            break
    fields = []
    for field in schema:
        if field.type == pa.null():
            field = field.with_type(found.get(field.name, pa.string()))
        fields.append(field)
    return pa.schema(fields)


def _conform(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    """Give ``table`` exactly ``schema``'s columns and types; name the shard on failure."""
    # names looked up in sets: each column_names / names access builds a list, which per
    # column made conforming a shard quadratic in its columns
    present, wanted = set(table.column_names), set(schema.names)
    extra = [c for c in table.column_names if c not in wanted]
    if extra:
        warnings.warn(
            f"{source}: columns {extra} are not in the dataset's schema (taken from its first "
            f"shard) and are left out of the metadata frame",
            ShardWarning,
            stacklevel=2,
        )
    columns = []
    for field in schema:
        if field.name not in present:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.null_count < len(column) and _changes_kind(column.type, field.type):
            raise TypeError(  # Arrow would cast 2 -> True, True -> 1: values changing meaning
                f"{source}: column {field.name!r} is {column.type}, the dataset has "
                f"{field.type} (from its first shard): make the field one type in every shard"
            )
        try:
            columns.append(column.cast(field.type) if column.type != field.type else column)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise TypeError(
                f"{source}: column {field.name!r} is {column.type}, the dataset has "
                f"{field.type}: {err}"
            ) from None
    return pa.Table.from_arrays(columns, schema=schema)


def _changes_kind(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether casting ``source`` values to ``target`` changes what they mean: booleans to or
    from numbers. (Numbers widen; anything becomes text in a string column, losslessly.)"""

    def is_number(t: pa.DataType) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t)

    boolean = pa.types.is_boolean
    return (boolean(source) and is_number(target)) or (is_number(source) and boolean(target))


class _MetadataWriter:
    """Writes a partition's rows of each shard to a hidden fragment file (picklable):
    ``_publish_fragments`` then gives each shard one Parquet, whichever partitions held its
    rows (after ``repartition`` or ``sort_values``, several do)."""

    def __init__(self, fs, out_fs, target, columns, run: str, progress=None):
        self.fs, self.out_fs, self.target = fs, out_fs, target  # of the tars, of the output
        self.columns, self.run = columns, run
        self.progress = progress  # a PartitionProgress topic

    def __call__(self, frame, groups=None, partition_info=None):
        """``groups``: every partition's shards (when the partitions are the loaded ones),
        so that a shard whose rows were all filtered out still gets its (empty) file."""
        table = to_arrow(frame)
        number = partition_info["number"] if partition_info is not None else 0
        shards = (
            [fsio.qualify(self.fs, s.tar) for s in groups[number]]
            if groups is not None and partition_info is not None
            else []
        )
        present = (
            table.column("_shard").unique().to_pylist() if "_shard" in table.column_names else []
        )
        for s in present:
            if s not in shards:
                shards.append(s)
        rows = []
        for source in shards:
            part = table.filter(pc.equal(table.column("_shard"), source))
            _refuse_repeated_ids(part.column(self.columns[0]), source)
            out = self._path_for(source)
            fragment = self._fragment_for(out, number)
            written = part.select(self.columns)
            with fsio.atomic_write(self.out_fs, fragment) as tmp, fsio.naming(tmp):
                pq.write_table(written, tmp)
            rows.append(
                {
                    "shard": source,
                    "path": fsio.qualify(self.out_fs, out),
                    "fragment": fragment,
                    "rows": part.num_rows,
                    "errors": _error_count(part),
                    "schema": written.schema,
                }
            )
        columns = ["shard", "path", "fragment", "rows", "errors", "schema"]
        tick(self.progress, number, table.num_rows)
        return pd.DataFrame(rows, columns=columns).astype({"rows": "int64", "errors": "int64"})

    def _path_for(self, source: str) -> str:
        tar = self.fs._strip_protocol(source)
        stem = fsio.basename(tar)[: -len(".tar")]
        if self.target is None:
            return tar[: -len(".tar")] + ".parquet"
        return fsio.join(self.target, stem + ".parquet")

    def _fragment_for(self, out: str, partition: int) -> str:
        """A hidden name unique to this task (a retried task writes a new one)."""
        directory, name = posixpath.split(out)
        unique = f"{self.run}-part{partition:06d}-{uuid.uuid4().hex[:8]}"
        return fsio.join(directory, f".{name}{fsio.TEMP_MARK}{unique}")

    def directories(self, input_tars: set[str]) -> list[str]:
        """Where this writer's files go: the target, or the directories of the tars."""
        if self.target is not None:
            return [self.target]
        return sorted({posixpath.dirname(self.fs._strip_protocol(t)) for t in input_tars})

    def remove_fragments(self, directories: list[str]) -> None:
        """Remove this run's fragments from ``directories`` (after a failure)."""
        for directory in directories:
            with contextlib.suppress(OSError):
                fsio.remove_stale_temps(self.out_fs, directory, f"{fsio.TEMP_MARK}{self.run}-part")


def _error_count(table: pa.Table) -> int:
    """Rows of ``table`` whose ``error`` column is set (0 without that column)."""
    if "error" not in table.column_names:
        return 0
    return len(table) - table.column("error").null_count


def _refuse_repeated_ids(ids: pa.ChunkedArray, shard: str) -> None:
    """A sidecar whose ids repeat never loads (``MetadataMismatchError``, whatever
    ``on_mismatch``): refuse to write one, before any file is published (a merge with a
    table that repeats keys, the same dataset concatenated twice)."""
    repeated = repeated_ids(ids)
    if repeated:
        raise ValueError(
            f"save_metadata: the metadata has several rows for records "
            f"{repeated[:10]} of {shard} (ids repeated: "
            f"{len(repeated)}; a merge with a table that repeats keys?): a sidecar with "
            f"repeated ids cannot be loaded; drop the duplicates first (drop_duplicates)"
        )


def _publish_fragments(fs, fragments: pd.DataFrame, id_col: str) -> pd.DataFrame:
    """One Parquet per shard from its fragments: a rename for one fragment, a merge (rows
    in partition order) for several, or for one whose columns typed null another fragment
    types (``common_schema``). Every merge is done (and checked) before any file is
    published."""
    shards_of = fragments.groupby("path", sort=False)["shard"].unique()
    for path, shards in shards_of.items():
        if len(shards) > 1:  # e.g. a/00000.tar and b/00000.tar, saved to one directory
            raise ValueError(
                f"save_metadata: shards {sorted(shards)[:2]} would both be saved as {path}; "
                f"save each directory's shards separately, or beside their tars (path=None)"
            )
    for directory in {posixpath.dirname(f) for f in fragments["fragment"]}:
        fs.invalidate_cache(directory)  # workers wrote the fragments: a cached listing lacks them
    merges, rows, sources = [], [], []
    types = ColumnTypes("save_metadata")  # no conflict, or nothing is published
    for schema, shard in zip(fragments["schema"], fragments["shard"]):
        types.add(schema, [shard])
    common = common_schema(fragments["schema"].tolist())
    for (shard, path), group in fragments.groupby(["shard", "path"], sort=False):
        parts = group["fragment"].tolist()
        typed = common is None or all(s == common for s in group["schema"])
        if len(parts) == 1 and typed:
            sources.append(parts[0])
        else:
            merged = _merged_name(parts[0])
            merge = dask.delayed(_merge_fragments)
            merges.append(merge(fs, parts, merged, id_col, shard, common))
            sources.append(merged)
        rows.append(
            {
                "shard": shard,
                "path": path,
                "rows": int(group["rows"].sum()),
                "errors": int(group["errors"].sum()),
            }
        )
    dask.compute(*merges)
    _move_all(fs, [(source, fs._strip_protocol(row["path"])) for source, row in zip(sources, rows)])
    counts = {"rows": "int64", "errors": "int64"}
    return pd.DataFrame(rows, columns=["shard", "path", *counts]).astype(counts)


PUBLISH_CONCURRENCY = 32
"""Fragments renamed at once on object stores, where a rename is a copy and a delete."""


def _move_all(fs: fsspec.AbstractFileSystem, moves: list[tuple[str, str]]) -> None:
    """Rename each fragment ``source`` to its shard's Parquet ``target``: one after another
    locally; on object stores ``PUBLISH_CONCURRENCY`` at a time (two requests each, one
    after another, cost a second per 20 shards at 25 ms a request). The first failure is
    raised once the renames under way end; those not yet started are not."""
    what = "the metadata of a shard, written there by a worker"

    def move(source: str, target: str) -> None:
        with fsio.explain_missing(fs, what, source):
            fsio.move(fs, source, target)

    calls = [functools.partial(move, source, target) for source, target in moves]
    fsio.concurrently(calls, 1 if fsio.is_local(fs) else PUBLISH_CONCURRENCY)


def _merged_name(fragment: str) -> str:
    """A hidden name for the merge of a shard's fragments, which a failed run removes with
    them (``_MetadataWriter.remove_fragments``)."""
    return f"{fragment.rsplit('-part', 1)[0]}-part-merged-{uuid.uuid4().hex[:8]}"


def _merge_fragments(
    fs, fragments: list[str], path: str, id_col: str, shard: str, schema: pa.Schema | None
) -> None:
    tables = [pq.read_table(io.BytesIO(fsio.read_bytes(fs, fragment))) for fragment in fragments]
    # a column all null in one fragment is typed null there (pandas object columns)
    table = pa.concat_tables(tables, promote_options="permissive")
    if schema is not None:  # and in every file of this save, as in the others
        table = table.cast(schema)
    _refuse_repeated_ids(table.column(id_col), shard)  # rows of one record in two partitions
    with fsio.atomic_write(fs, path) as tmp, fsio.naming(tmp):
        pq.write_table(table, tmp)
    for fragment in fragments:
        fsio.remove_file(fs, fragment)


__all__ = ["ImageTextPairDataset"]

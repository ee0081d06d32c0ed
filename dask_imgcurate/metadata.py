"""Build one shard's metadata as an Arrow table: one row per record, sorted by id.

Columns: the id column, then either the sidecar Parquet's columns or (without one) the
``caption`` from each record's ``.txt`` and the top-level scalar fields of its ``.json``,
then the bookkeeping columns in ``BOOKKEEPING``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dask_imgcurate.errors import (
    MetadataMismatchError,
    RangeRequestsUnsupported,
    ShardNotice,
    ShardWarning,
)
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.records import RecordIndex, split_key
from dask_imgcurate.io.shards import Shard, index_shard, prefetch, shard_notes

log = logging.getLogger(__name__)

MEMBER_TYPE = pa.list_(
    pa.struct([("name", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
)
BOOKKEEPING = {
    "_shard": pa.string(),
    "_image_member": pa.string(),
    "_image_offset": pa.int64(),
    "_image_size": pa.int64(),
    "_members": MEMBER_TYPE,
    "_shard_version": pa.int64(),  # the tar's when indexed: exports check it is unchanged
}
_MAX_LISTED = 10


KEEP_COLUMN = "_keep"
"""The filter column the command line and the example scripts add (never exported)."""


def is_bookkeeping(column: str) -> bool:
    """Whether ``column`` is one of the reader's and writer's own (``BOOKKEEPING``, and
    ``KEEP_COLUMN``): never read from a sidecar or ``.json``, never written to Parquet.
    Other names starting with ``_`` (``_id``, say) are the user's."""
    return column in BOOKKEEPING or column == KEEP_COLUMN


def _is_stored_index(column: str) -> bool:
    """A frame index that pandas or dask stored as a Parquet column (not the user's data)."""
    return (
        column == "__null_dask_index__" or re.fullmatch(r"__index_level_\d+__", column) is not None
    )


def _internal(column: str) -> bool:
    return is_bookkeeping(column) or _is_stored_index(column)


def shard_table(
    fs: fsspec.AbstractFileSystem,
    shard: Shard,
    id_col: str = "key",
    *,
    strict: bool = True,
    on_mismatch: str = "raise",
) -> pa.Table:
    """Metadata of one shard (see module docstring)."""
    fetched = prefetch(fs, shard)  # remote: the .idx, tar size and sidecar at once
    records = index_shard(fs, shard, strict=strict, prefetched=fetched)
    source = fsio.qualify(fs, shard.tar)
    damaged = records.members.damage is not None
    for message, category in shard_notes(records):
        warnings.warn(message, category, stacklevel=2)
    book = bookkeeping_table(records, source)
    lost_rows = 0
    if shard.parquet is not None:
        user = _read_sidecar(fs, shard, id_col, None if fetched is None else fetched.parquet)
        if damaged or records.undecodable:  # it describes lost records: not a mismatch
            present = pa.array(records.keys, pa.string())
            kept = pc.is_in(user.column(id_col), value_set=present)
            lost_rows = user.num_rows - pc.sum(kept).as_py() if user.num_rows else 0
            user = user.filter(kept)
        user, book = _align(user, book, id_col, records.keys, source, on_mismatch)
    else:
        user = _table_from_members(fs, shard, records, id_col)
    lost = f"; dropped their {lost_rows} sidecar Parquet rows" if lost_rows else ""
    if damaged:
        warnings.warn(
            f"{records.members.damage}; kept the {len(records)} complete records before it "
            f"(dropped {records.dropped_incomplete} possibly incomplete record{lost})",
            ShardWarning,
            stacklevel=2,
        )
    elif lost_rows:
        warnings.warn(
            f"{source}: dropped the {lost_rows} sidecar Parquet rows of the records dropped for "
            f"member names that are not UTF-8",
            ShardWarning,
            stacklevel=2,
        )
    table = user
    for name in book.column_names:
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, book.column(name))
    return table.sort_by(id_col)


def bookkeeping_table(records: RecordIndex, source: str) -> pa.Table:
    """Bookkeeping columns of ``records`` in tar order."""
    members = records.members
    n = len(records)
    used = int(records.stops[-1]) if n else 0  # records are consecutive runs from member 0
    structs = pa.StructArray.from_arrays(
        [pa.array(members.names[:used], pa.string()), members.offsets[:used], members.sizes[:used]],
        fields=list(MEMBER_TYPE.value_type),
    )
    list_offsets = np.append(records.starts, used).astype(np.int32)
    image = records.image_member
    has_image = image >= 0
    return pa.table(
        {
            "_shard": pa.array([source] * n, pa.string()),
            "_image_member": pa.array(
                [members.names[i] if i >= 0 else None for i in image.tolist()], pa.string()
            ),
            "_image_offset": np.where(has_image, members.offsets[image], -1),
            "_image_size": np.where(has_image, members.sizes[image], -1),
            "_members": pa.ListArray.from_arrays(pa.array(list_offsets), structs),
            "_shard_version": pa.nulls(n, pa.int64())
            if records.version is None
            else pa.array(np.full(n, records.version, dtype=np.int64)),
        },
        schema=pa.schema(BOOKKEEPING),
    )


def sidecar_schema(
    fs: fsspec.AbstractFileSystem, shard: Shard, id_col: str = "key"
) -> pa.Schema | None:
    """The schema ``shard_table`` gives ``shard``, from its sidecar Parquet's footer alone
    (no tar read); None without a sidecar or when the sidecar has no rows."""
    if shard.parquet is None:
        return None

    def footer() -> tuple[pa.Schema, int]:
        try:
            with fs.open(shard.parquet, "rb") as f:
                parquet = pq.ParquetFile(f)
                return parquet.schema_arrow, parquet.metadata.num_rows
        except ValueError as err:  # fsspec's HTTP file, when the server ignores ranges
            if "Cannot seek streaming" not in str(err):
                raise
            raise RangeRequestsUnsupported(
                f"{fsio.qualify(fs, shard.parquet)}: the server does not serve byte ranges "
                f"(HTTP Range requests), which reading shards needs"
            ) from err

    schema, rows = fsio.retry(fs, shard.parquet, footer)
    if not rows:
        return None
    _check_id_column(fs, shard, id_col, schema.names)
    fields = [
        field.with_type(pa.string()) if field.name == id_col else field
        for field in schema
        if not _internal(field.name)
    ]
    return pa.schema(fields + [pa.field(name, kind) for name, kind in BOOKKEEPING.items()])


def _read_sidecar(
    fs: fsspec.AbstractFileSystem, shard: Shard, id_col: str, data: bytes | None = None
) -> pa.Table:
    """The sidecar Parquet of ``shard`` (``data``: its bytes, when already read)."""
    if data is None:
        data = fsio.read_bytes(fs, shard.parquet)
    table = pq.read_table(io.BytesIO(data))
    _check_id_column(fs, shard, id_col, table.column_names)
    ids = table.column(id_col).cast(pa.string())
    table = table.set_column(table.column_names.index(id_col), id_col, ids)
    reserved = [c for c in table.column_names if is_bookkeeping(c)]
    if reserved:
        warnings.warn(
            f"{fsio.qualify(fs, shard.parquet)}: its columns {reserved} have names the "
            f"reader's bookkeeping uses, and are left out (rename them to keep them)",
            ShardWarning,
            stacklevel=3,
        )
    return table.drop_columns([c for c in table.column_names if _internal(c)])


def _check_id_column(fs, shard: Shard, id_col: str, columns: list[str]) -> None:
    if id_col not in columns:
        raise MetadataMismatchError(
            f"{fsio.qualify(fs, shard.parquet)}: no id column {id_col!r} "
            f"(columns: {columns}); pass id_col= to name it"
        )


def repeated_ids(ids: pa.Array | pa.ChunkedArray) -> list:
    """The values that occur more than once in ``ids``, sorted."""
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return sorted(repeated.to_pylist(), key=str)


def _align(
    user: pa.Table,
    book: pa.Table,
    id_col: str,
    keys: list[str],
    source: str,
    on_mismatch: str,
) -> tuple[pa.Table, pa.Table]:
    """Match sidecar rows to tar records by id; return both in the same (record) order."""
    ids = user.column(id_col).to_pylist()
    position = {k: i for i, k in enumerate(ids)}
    if len(position) != len(ids):
        dupes = repeated_ids(user.column(id_col))[:_MAX_LISTED]
        raise MetadataMismatchError(f"{source}: sidecar Parquet repeats ids {dupes}")
    key_set = set(keys)
    missing = [k for k in keys if k not in position]  # in the tar, not in the Parquet
    extra = [k for k in ids if k not in key_set]  # in the Parquet, not in the tar
    if extra and "status" in user.column_names:
        # img2dataset lists every sample it tried; those it failed to download are in no tar
        status = dict(zip(ids, user.column("status").to_pylist()))
        failed = [k for k in extra if status[k] not in (None, "success")]
        if failed:
            log.info("%s: %d sidecar rows of samples not downloaded left out", source, len(failed))
            failed_set = set(failed)
            extra = [k for k in extra if k not in failed_set]
    if missing or extra:
        what = (
            f"{source}: sidecar Parquet and tar disagree: {len(missing)} records in the tar "
            f"have no Parquet row (e.g. {missing[:_MAX_LISTED]}), {len(extra)} Parquet rows "
            f"have no record in the tar (e.g. {extra[:_MAX_LISTED]})"
        ) + _zero_padding_hint(missing, extra)
        if on_mismatch != "drop":
            raise MetadataMismatchError(
                what
                + "; pass on_mismatch='drop' (command line: --on-mismatch drop) to keep the intersection"
            )
        warnings.warn(
            f"{what}; dropped those {len(missing)} records and {len(extra)} Parquet rows",
            ShardWarning,
            stacklevel=3,
        )
    kept = [i for i, k in enumerate(keys) if k in position]
    user = user.take(pa.array([position[keys[i]] for i in kept], pa.int64()))
    return user, book.take(pa.array(kept, pa.int64()))


def _zero_padding_hint(missing: list[str], extra: list[str]) -> str:
    """A hint when the Parquet's ids are the tar's keys without their leading zeros."""
    unpadded = set(extra)
    if any(k[:1] == "0" and k.isdigit() and (k.lstrip("0") or "0") in unpadded for k in missing):
        return (
            " (the Parquet's ids are the tar's keys without their leading zeros: written as "
            "integers? store the ids as strings)"
        )
    return ""


def _table_from_members(
    fs: fsspec.AbstractFileSystem, shard: Shard, records: RecordIndex, id_col: str
) -> pa.Table:
    """Id, caption (``.txt``) and scalar ``.json`` fields, read from the tar."""
    members = records.members
    txt, jsn = {}, {}
    for r, (s, e) in enumerate(zip(records.starts.tolist(), records.stops.tolist())):
        for i in range(s, e):
            ext = split_key(members.names[i])[1].lower()
            if ext == "txt" and r not in txt:
                txt[r] = i
            elif ext == "json" and r not in jsn:
                jsn[r] = i
    wanted = sorted(set(txt.values()) | set(jsn.values()))
    blobs = dict(
        zip(
            wanted,
            fsio.read_ranges(fs, shard.tar, members.offsets[wanted], members.sizes[wanted]),
        )
    )
    n = len(records)
    captions: list[str | None] = [None] * n
    not_utf8 = []  # records whose caption is shown with U+FFFD for its undecodable bytes
    for r, member in txt.items():
        try:
            captions[r] = blobs[member].decode("utf-8")
        except UnicodeDecodeError:
            captions[r] = blobs[member].decode("utf-8", "replace")
            not_utf8.append(r)
    not_utf8.sort()
    if not_utf8:
        warnings.warn(
            f"{fsio.qualify(fs, shard.tar)}: {len(not_utf8)} records' .txt member is not "
            f"UTF-8 (e.g. record {records.keys[not_utf8[0]]!r}); their captions show each "
            f"undecodable byte as U+FFFD (the members themselves are exported unchanged)",
            ShardWarning,
            stacklevel=3,
        )
    columns: dict[str, list] = {id_col: list(records.keys), "caption": captions}
    fields: dict[str, list] = {}
    other_ids = []  # records whose .json holds an id_col field that is not their key
    for r in range(n):
        if r not in jsn:
            continue
        try:
            obj = json.loads(blobs[jsn[r]])
        except ValueError as err:
            warnings.warn(
                f"{fsio.qualify(fs, shard.tar)}: record {records.keys[r]!r}: invalid .json "
                f"member ({err}); its fields are null",
                ShardWarning,
                stacklevel=3,
            )
            continue
        if not isinstance(obj, dict):
            continue
        for k, v in obj.items():
            if k == "caption" and captions[r] is None and isinstance(v, str):
                captions[r] = v  # no .txt member: the .json's caption stands in
                continue
            if k == id_col and v is not None and str(v) != records.keys[r]:
                other_ids.append((records.keys[r], v))
            if k in columns or is_bookkeeping(k) or isinstance(v, (dict, list)):
                continue
            column = fields.get(k)
            if column is None:  # not setdefault: its default, n long, would be built per value
                column = fields[k] = [None] * n
            column[r] = v
    if other_ids:
        key, value = other_ids[0]
        warnings.warn(
            f"{fsio.qualify(fs, shard.tar)}: {len(other_ids)} records' .json field {id_col!r} "
            f"differs from their key (e.g. record {key!r}: {value!r}); the id column holds the "
            f"keys (pass another id_col to keep both)",
            ShardNotice,
            stacklevel=3,
        )
    for k, values in fields.items():
        columns[k] = values
    arrays = {}
    for k, values in columns.items():
        try:
            arrays[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them as JSON text
            arrays[k] = pa.array([None if v is None else json.dumps(v) for v in values])
        except OverflowError:  # an integer beyond 64 bits: JSON text too, and say so
            r = next((r for r, v in enumerate(values) if _beyond_int64(v)), None)
            where = "" if r is None else f"record {records.keys[r]!r}: "
            value = "" if r is None else f" {values[r]}"
            warnings.warn(
                f"{fsio.qualify(fs, shard.tar)}: {where}.json field {k!r} holds an integer"
                f"{value} beyond 64 bits; the field's values are kept as JSON text",
                ShardWarning,
                stacklevel=3,
            )
            arrays[k] = pa.array([None if v is None else json.dumps(v) for v in values])
    arrays[id_col] = arrays[id_col].cast(pa.string())
    if arrays["caption"].type == pa.null():
        arrays["caption"] = arrays["caption"].cast(pa.string())
    return pa.table(arrays)


def _beyond_int64(value) -> bool:
    return isinstance(value, int) and not -(2**63) <= value < 2**63

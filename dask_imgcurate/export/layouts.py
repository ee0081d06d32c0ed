"""The two output layouts: ``to_webdataset`` (renumbered ``NNNNN.tar``) and ``write_images``
(NeMo Curator's ImageWriter ``images-{hash}-{NNNNNN}.tar``)."""

from __future__ import annotations

import hashlib
import uuid
import warnings
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.backend import column_names
from dask_imgcurate.errors import DuplicateKeyError, TooManyShards
from dask_imgcurate.export import guards, run
from dask_imgcurate.metadata import is_bookkeeping


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
) -> run.ExportSummary:
    """See ``ImageTextPairDataset.to_webdataset``."""
    samples_per_shard = guards.positive_int("samples_per_shard", samples_per_shard)
    max_shards = guards.positive_int("max_shards", max_shards)
    id_col = dataset.id_col
    if old_id_col == "":
        raise ValueError("old_id_col must be a column name or None, not ''")
    if old_id_col == id_col:
        raise ValueError(
            f"old_id_col={old_id_col!r} is the id column, which holds the new ids; name "
            f"another column for the old ones"
        )
    if old_id_col and is_bookkeeping(old_id_col):
        raise ValueError(
            f"old_id_col={old_id_col!r} is a bookkeeping column name, which readers of the "
            f"export's Parquet leave out (from_webdataset would drop the old ids); name "
            f"another column"
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
        table = run.user_columns(rows, id_col)
        old = table.column(id_col)
        table = table.set_column(table.column_names.index(id_col), id_col, pa.array(new_keys))
        if old_id_col:
            if old_id_col in table.column_names:
                table = table.drop_columns([old_id_col])
            table = table.add_column(1, old_id_col, old)
        return table

    def check(count: int) -> None:
        if count > 10**max_shards:
            raise TooManyShards(
                f"the records need at least {count} output shards, more than "
                f"max_shards={max_shards} digits can number; raise max_shards or "
                f"samples_per_shard"
            )

    return run.run_export(
        dataset,
        path,
        filter_column=filter_column,
        per_shard=samples_per_shard,
        layout=run.Layout(
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


_KEY = r"(?s)^(?:.*/)?[^/.]+$"  # a whole key by records.split_key's rule: no dot after the last /
_UNSAFE = r"(?s)^/|(?:^|/)\.\.(?:/|$)|\x00"  # absolute, a ".." component, or a NUL


def check_member_keys(rows: pa.Table, id_col: str) -> None:
    """Raise unless every id of ``rows`` can name members (``ID.jpg``) that WebDataset
    readers key back to that id, and is a safe relative path."""
    ids = rows.column(id_col).cast(pa.string())  # (a categorical id column too)
    bad = pc.or_kleene(
        pc.invert(pc.match_substring_regex(ids, _KEY)), pc.match_substring_regex(ids, _UNSAFE)
    )
    bad = pc.fill_null(bad, True)  # a null id
    if not pc.any(bad).as_py():
        return
    first = pc.index(bad, True).as_py()
    key = ids[first].as_py()
    if key is None or key == "":
        why = "is empty" if key == "" else "is null"
    elif key.startswith("/") or ".." in key.split("/") or "\0" in key:
        why = "is an unsafe member name (absolute, with a '..' component, or a NUL)"
    else:
        why = "has a '.' after its last '/' (readers would split the key there) or ends in '/'"
    count = pc.sum(bad).as_py()
    raise ValueError(
        f"{rows.column('_shard')[first].as_py()}: record id {key!r} {why}; write_images names "
        f"members after record ids ({count} ids here cannot be); use to_webdataset, which "
        f"renames records, or fix the {id_col!r} column"
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
) -> run.ExportSummary:
    """See ``ImageTextPairDataset.write_images``."""
    del remove_image_data  # image bytes are never held in memory: nothing to remove
    images_per_tar = guards.positive_int("images_per_tar", images_per_tar)
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
        if len(set(keys)) < len(keys):  # e.g. two datasets whose ids both start at 000000000
            repeated = sorted(k for k, count in Counter(keys).items() if count > 1)
            shards = rows.column("_shard").to_pylist()
            sources = sorted({t for k, t in zip(keys, shards) if k == repeated[0]})
            raise DuplicateKeyError(
                f"{name_of(n)}.tar would hold records {repeated[:10]} twice "
                f"({len(repeated)} ids repeat among its input records; {repeated[0]!r} comes "
                f"from {sources}): write_images keeps record ids; make them unique, or use "
                f"to_webdataset, which renames records"
            )
        return keys

    def key_bytes_of(rows: pa.Table) -> np.ndarray:  # in each partition's selection task
        check_member_keys(rows, id_col)
        ids = rows.column(id_col).combine_chunks().cast(pa.binary())
        return pc.binary_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)

    def name_of(n: int) -> str:
        return f"images-{prefix[0]}-{n:06d}"

    def parquet_of(n: int, rows: pa.Table, new_keys: list[str]) -> pa.Table:
        table = run.user_columns(rows, id_col).drop_columns(replaced)
        tar_name = f"{name_of(n)}.tar"
        table = table.add_column(1, "tar_file", pa.array([tar_name] * rows.num_rows, pa.string()))
        return table.add_column(2, "member_name", rows.column("_image_member"))

    return run.run_export(
        dataset,
        output_dir,
        filter_column=filter_column,
        per_shard=images_per_tar,
        layout=run.Layout(
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

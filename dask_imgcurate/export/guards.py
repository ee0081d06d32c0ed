"""Checks before an export writes: the output is not among the inputs, the filter column is
boolean, counts are positive integers; and what else is in the output directory."""

from __future__ import annotations

import functools
import numbers
import os
import posixpath

import pandas as pd
import pyarrow as pa

from dask_imgcurate.backend import column_names
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.writer import ShardResult


def names_in(fs, directory: str) -> set[str]:
    """File names in ``directory`` (none when it does not exist: on object stores, a prefix
    with no objects)."""
    try:
        return {fsio.basename(p) for p in fs.ls(directory, detail=False)}
    except FileNotFoundError:
        return set()


def other_shard_files(out_fs, out_root: str, results: list[ShardResult]) -> list[str]:
    """``.tar`` / ``.parquet`` / ``.idx`` files in the output directory that are not this
    export's (temporary files of running writers are hidden: never listed; an ``.idx``
    beside one of its tars describes that tar: written shards remove any other)."""
    ours = set()
    for r in results:
        stem = fsio.basename(r.tar)[: -len(".tar")]
        ours.update((stem + ".tar", stem + ".parquet", stem + ".idx"))
    return [
        fsio.qualify(out_fs, fsio.join(out_root, name))
        for name in sorted(names_in(out_fs, out_root) - ours)
        if name.endswith((".tar", ".parquet", ".idx")) and not name.startswith(".")
    ]


def _files(fs, shards, sidecars: bool) -> set[str]:
    paths = [p for s in shards for p in ((s.tar, s.parquet, s.idx) if sidecars else (s.tar,))]
    return {fsio.qualify(fs, p) for p in paths if p is not None}


def input_tars(dataset, sidecars: bool = False) -> tuple[set[str], bool]:
    """The tars the metadata frame reads (``fsio.qualify``-ed; with ``sidecars``, their
    ``.parquet`` and ``.idx`` files too): the dataset's own and those of every shard loader
    in the frame's expression (``dd.concat`` of datasets), and whether that is all of them
    (False when a leaf is something else: a persisted or pandas frame, whose ``_shard``
    values are only known once computed)."""
    from dask_imgcurate.dataset import _ShardLoader

    tars = _files(dataset.fs, dataset.shards, sidecars)
    complete = True
    for node in dataset.metadata.expr.walk():
        if node.dependencies():
            continue
        loader = node.operand("func") if "func" in node._parameters else None
        if isinstance(loader, _ShardLoader):
            local = fsio.is_local(loader.fs) and fsio.is_local(dataset.fs)
            if loader.fs != dataset.fs and not local:  # read and named through ours
                other = fsio.qualify(loader.fs, node.operand("iterables")[0][0][0].tar)
                raise _other_store(other, fsio.qualify(dataset.fs, dataset.shards[0].tar))
            for group in node.operand("iterables")[0]:
                tars.update(_files(loader.fs, group, sidecars))
        else:
            complete = False
    return tars, complete


def refuse_other_stores(fs, tars) -> None:
    """Refuse rows whose ``_shard`` (``fsio.qualify``-ed) is on another store than ``fs``,
    through which the export would read it (a persisted frame mixing datasets)."""
    local, schemes = fsio.is_local(fs), fsio.protocols(fs)
    for tar in tars:
        scheme = tar.split("://", 1)[0] if "://" in tar else None
        foreign = scheme is not None if local else scheme not in schemes
        if foreign:
            raise _other_store(tar, "local" if local else "/".join(sorted(schemes)))


def _other_store(example: str, ours: str) -> ValueError:
    return ValueError(
        f"the metadata holds rows of shards on another filesystem (e.g. {example}) than the "
        f"dataset's ({ours}), or with other storage_options; export or save each dataset "
        f"separately"
    )


def check_output_path(fs, path: str) -> None:
    """Refuse an output directory that is a file, and an object-store path with an empty,
    ``.`` or ``..`` part: keys are taken as written (``bkt//out`` is the key prefix
    ``/out``), unlike local paths."""
    parts = path.split("/")
    if not fsio.is_local(fs) and any(part in ("", ".", "..") for part in parts[1:]):
        clean = posixpath.normpath(path).lstrip("/")
        raise ValueError(
            f"{fsio.qualify(fs, path)}: an object-store path with an empty, '.' or '..' part "
            f"names other keys than it seems (keys are not normalised); write to "
            f"{fsio.qualify(fs, clean)}"
        )
    with fsio.storage_errors(fs, path, action="write"):
        is_file = fs.isfile(path)
    if is_file:
        raise NotADirectoryError(
            f"{fsio.qualify(fs, path)} is a file: the output must be a directory"
        )


@functools.lru_cache(maxsize=4096)
def real_directory(directory: str) -> str:
    """A directory of ``fsio.qualify``-ed paths, with symlinks resolved when local (cached
    within an export: on a cluster each partition's directories are checked as they come)."""
    return (directory if "://" in directory else os.path.realpath(directory)).rstrip("/")


def _directories(path: str) -> set[str]:
    """Where a ``fsio.qualify``-ed input file is, symlinks resolved when local: the
    directory it is listed in and, for a symlink, that of every link and file it leads to."""
    found = {real_directory(posixpath.dirname(path))}
    if "://" in path:
        return found
    seen = set()
    while os.path.islink(path) and path not in seen:  # (a directory's links are resolved)
        seen.add(path)
        path = os.path.join(os.path.dirname(path), os.readlink(path))
        found.add(real_directory(os.path.dirname(path)))
    return found


def refuse_input_directory(out_fs, out_root: str, input_tars) -> None:
    """Outputs are named like shards (``00000.tar``): never write among the input's own
    files (``input_tars``), nor beside any that symlinked ones lead to."""
    local = fsio.is_local(out_fs)
    target = real_directory(out_root) if local else fsio.qualify(out_fs, out_root).rstrip("/")
    for tar in input_tars:
        if target in _directories(tar):
            raise ValueError(
                f"{target} holds this dataset's input shards (e.g. {tar}): exporting there "
                f"could replace them while they are read; write to another directory"
            )


def check_filter_column(frame, column: str) -> None:
    if column not in column_names(frame):
        raise KeyError(f"filter column {column!r} is not in the metadata")
    meta = frame._meta
    in_index = column not in meta.columns  # a named index is exported as a column
    dtype = meta.index.get_level_values(column).dtype if in_index else meta.dtypes[column]
    if not pd.api.types.is_bool_dtype(dtype):
        raise TypeError(
            f"filter column {column!r} must be boolean (True keeps a record, False or null "
            f"drops it), not {dtype}; make one first, e.g. "
            f"metadata.assign(keep=metadata[{column!r}] > threshold)"
        )


def check_error_column(frame) -> None:
    """Exports drop rows whose ``error`` is set: refuse an ``error`` column that holds no
    error texts (a field of the user's own called so would drop rows it does not mean to)."""
    meta = frame._meta
    if "error" not in meta.columns:
        return
    dtype = meta.dtypes["error"]
    if isinstance(dtype, pd.CategoricalDtype):
        dtype = dtype.categories.dtype
    elif isinstance(dtype, pd.ArrowDtype) and pa.types.is_dictionary(dtype.pyarrow_dtype):
        dtype = pd.ArrowDtype(dtype.pyarrow_dtype.value_type)
    if not (pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)):
        raise error_column_error(str(meta.dtypes["error"]))


def check_error_texts(table: pa.Table) -> None:
    """``check_error_column`` on a partition's values (an object column's dtype says
    nothing of them): text, or all null."""
    kind = table.column("error").type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        where = f"{table.column('_shard')[0].as_py()}: " if table.num_rows else ""
        raise error_column_error(str(kind), where)


def error_column_error(type_name: str, where: str = "") -> TypeError:
    """The error for an ``error`` column that holds no error texts (``where``: the shard)."""
    return TypeError(
        f"{where}the metadata's 'error' column is {type_name}: exports drop every record "
        f"whose 'error' is set (not null), as the embedder records images it could not "
        f"read; rename a column of your own called 'error'"
    )


def positive_int(name: str, value) -> int:
    """``value`` as a positive int, checked before any work (numpy ints are fine)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, not {value}")
    return int(value)

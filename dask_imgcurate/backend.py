"""DataFrame backend: pandas on CPU, cudf when a GPU and cudf are present.

Every partition is first built as an Arrow table; ``to_frame`` is the one place where the
backend matters, so the rest of the code has a single path.
"""

from __future__ import annotations

import importlib.util
import re
import warnings

import pandas as pd
import pyarrow as pa

BACKENDS = ("auto", "pandas", "cudf")


def gpu_available() -> bool:
    """True when torch sees a CUDA device."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def resolve_backend(backend: str = "auto") -> str:
    """``"pandas"`` or ``"cudf"``; ``"auto"`` picks cudf only with a GPU and a cudf (and
    dask-cudf) that imports, else pandas (with a warning when cudf is there but fails).
    Decided where the frame is built: workers need the same backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pandas":
        return backend
    if backend == "auto" and (importlib.util.find_spec("cudf") is None or not gpu_available()):
        return "pandas"
    try:
        import cudf  # noqa: F401
        import dask_cudf  # noqa: F401 (dask's cudf backend)
    except Exception as err:  # noqa: BLE001 - e.g. a driver too old for this cudf
        why = " ".join(str(err).split())[:200] or type(err).__name__
        if backend == "cudf":
            raise ImportError(
                f"backend='cudf' needs cudf and dask-cudf ({why}): "
                f"pip install 'dask_imgcurate[gpu]'"
            ) from err
        warnings.warn(f"cudf cannot be used ({why}): the metadata uses pandas", stacklevel=3)
        return "pandas"
    return "cudf"


def _pandas_type(arrow_type: pa.DataType):
    """Nullable pandas dtypes, so a column's dtype never depends on whether it has nulls."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.StringDtype("pyarrow")
    if pa.types.is_integer(arrow_type):
        return pd.api.types.pandas_dtype(
            str(arrow_type).replace("int", "Int").replace("uInt", "UInt")
        )
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    if pa.types.is_nested(arrow_type) or pa.types.is_decimal(arrow_type):
        # decimals as Python objects would be saved again with a precision inferred from
        # each partition's values: shards of one column typed differently, which no longer load
        return pd.ArrowDtype(arrow_type)
    return None


def to_frame(table: pa.Table, backend: str):
    """Convert an Arrow table to a DataFrame of ``backend`` (``pandas`` or ``cudf``).

    pandas frames keep strings Arrow-backed, integers and booleans nullable (``Int64``,
    ``boolean``: a null never turns an int column into floats), and nested columns
    (embeddings, member lists) and decimals as ``pd.ArrowDtype``, so nothing becomes Python
    objects.
    """
    if backend == "cudf":
        import cudf

        return cudf.DataFrame.from_arrow(table)
    return table.to_pandas(types_mapper=_pandas_type, ignore_metadata=True)


def _index_columns(meta) -> list[str]:
    """The named index levels written as columns: those not also a column's name."""
    return [n for n in meta.index.names if n is not None and n not in meta.columns]


def column_names(frame) -> list[str]:
    """The columns ``to_arrow`` gives ``frame`` (pandas, cudf or Dask): its own, then its
    named index levels."""
    meta = getattr(frame, "_meta", frame)
    return [*meta.columns, *_index_columns(meta)]


def _conversion_error(frame: pd.DataFrame, err: Exception):
    """``ColumnTypeConflict`` for a pandas frame pyarrow cannot convert, naming a tar of its
    rows (``_shard``) and pyarrow's reason."""
    from dask_imgcurate.errors import ColumnTypeConflict
    from dask_imgcurate.io.fs import basename

    shards = frame["_shard"].dropna().unique() if "_shard" in frame else []
    where = f"the rows of {basename(str(shards[0]))}" if len(shards) else "a partition"
    reason = "; ".join(str(a) for a in reversed(err.args)) or type(err).__name__
    named = re.search(r"column (.+?) with type", reason)
    column = repr(named.group(1)) if named else "'column'"
    return ColumnTypeConflict(
        f"{where} cannot be converted to Arrow: {reason} (a column holding values of several "
        f"types? give it one type first, e.g. metadata.astype({{{column}: 'string'}}))"
    )


def to_arrow(frame) -> pa.Table:
    """The inverse of ``to_frame`` for either backend. Named index levels
    (``set_index("url")``) are kept as columns, last, as ``to_parquet`` keeps them; unnamed
    ones (and any named like a column) are dropped."""
    levels = _index_columns(frame)
    if levels:
        own = list(frame.columns)
        frame = frame.reset_index(level=levels)[[*own, *levels]]
    if hasattr(frame, "to_arrow"):  # cudf (its default keeps a non-range index as a column)
        table = _typed_nulls(frame.to_arrow(preserve_index=False), frame)
    else:
        try:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:  # an object column of mixed values
            raise _conversion_error(frame, err) from err
        _refuse_guessed_decimals(frame, table)
    table = _wide_dictionaries(table)
    return table.replace_schema_metadata(None)  # no pandas dtype notes in our Parquet files


def _refuse_guessed_decimals(frame: pd.DataFrame, table: pa.Table) -> None:
    """Refuse an object column of ``decimal.Decimal``: pyarrow gives it the precision and
    scale of each partition's own values (``decimal128(1, 1)`` here, ``(5, 2)`` there), and
    files written with different ones cannot be read back as one dataset."""
    for (name, dtype), kind in zip(frame.dtypes.items(), table.schema.types):
        if pd.api.types.is_object_dtype(dtype) and pa.types.is_decimal(kind):
            raise TypeError(
                f"column {name!r} holds Python Decimal objects, whose precision is guessed "
                f"from each partition's values ({kind} in this one), so the files written "
                f"would disagree and not load together; give it one type first, e.g. "
                f"meta[{name!r}] = meta[{name!r}].astype(pd.ArrowDtype(pa.decimal128(38, "
                f"{kind.scale})))"
            )


def _wide_dictionaries(table: pa.Table) -> pa.Table:
    """Dictionary (categorical) columns with int32 indices: pandas gives each partition the
    narrowest codes its own categories need (int8 up to 127), so the rows of several
    partitions (one output shard, one shard's merged Parquet) could not share a dictionary,
    and a Parquet file holding them all as int8 could not be read back."""
    widened = {}
    for i, field in enumerate(table.schema):
        kind = field.type
        if pa.types.is_dictionary(kind) and kind.index_type.bit_width < 32:
            wide = pa.dictionary(pa.int32(), kind.value_type, kind.ordered)
            widened[i] = (field.with_type(wide), table.column(i).cast(wide))
    return set_columns(table, widened)


def set_columns(table: pa.Table, columns: dict[int, tuple[pa.Field, pa.ChunkedArray]]) -> pa.Table:
    """``table`` with the columns at the keys of ``columns`` replaced (field, values), in
    one go: ``Table.set_column`` per column rebuilds the table each time, which for a
    column of each kind was quadratic in the columns."""
    if not columns:
        return table
    fields, values = list(table.schema), table.columns
    for i, (field, column) in columns.items():
        fields[i], values[i] = field, column
    return pa.Table.from_arrays(values, schema=pa.schema(fields, table.schema.metadata))


def _typed_nulls(table: pa.Table, frame) -> pa.Table:
    """cudf gives a list or struct column with nothing but nulls (an empty partition's, say)
    the Arrow type null: its own type back."""
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type) and hasattr(frame[field.name].dtype, "to_arrow"):
            typed = pa.nulls(table.num_rows, frame[field.name].dtype.to_arrow())
            table = table.set_column(i, field.name, typed)
    return table


def to_pandas(frame) -> pd.DataFrame:
    """A partition as pandas, for code written for pandas (decoding, scoring): a cudf one is
    converted through Arrow (dtypes as ``to_frame`` makes them; its index kept)."""
    if isinstance(frame, pd.DataFrame):
        return frame
    result = to_frame(to_arrow(frame.reset_index(drop=True)), "pandas")
    result.index = frame.index.to_pandas()
    return result


def like(result: pd.DataFrame, model, columns: list[str]):
    """``model`` with ``result``'s ``columns`` (``result``: pandas, computed from
    ``to_pandas(model)``, same index) set, in ``model``'s backend; for cudf only those
    columns cross to the GPU (the others stay as they were, NaN as NaN)."""
    if isinstance(model, pd.DataFrame):
        return result
    import cudf

    frame = model.copy(deep=False)
    for name in columns:
        column = cudf.Series.from_arrow(pa.array(result[name], from_pandas=False))
        column.index = model.index
        frame[name] = column
    return frame

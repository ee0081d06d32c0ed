"""One Arrow type per column across the Parquet files one write produces.

pyarrow types a pandas object column per partition: all None there is ``null``, ints in one
partition and strings in another are ``int64`` and ``string``. ``common_schema`` gives the
null columns the type the other files give them; ``ColumnTypes`` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from dask_imgcurate.errors import ColumnTypeConflict
from dask_imgcurate.io import fs as fsio


def common_schema(schemas: Sequence[pa.Schema]) -> pa.Schema | None:
    """One schema for Parquet files of ``schemas``: a column typed null in some (pyarrow's
    type for a pandas object column without values) gets the type the others give it. None
    when they disagree otherwise (other types, other columns)."""
    if not schemas or any(s.names != schemas[0].names for s in schemas):
        return None
    try:
        return pa.unify_schemas([s.remove_metadata() for s in schemas])
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # not only nulls differ: left as they are
        return None


class ColumnTypes:
    """The type of each column over the partitions added so far; ``add`` raises
    ``ColumnTypeConflict`` for a type no promotion reconciles (``int64`` and ``string``),
    naming the column, both types and a tar of each side. Null types are never a conflict;
    ``int32`` / ``int64``, timestamp units and the like are promoted as ``pa.concat_tables``
    (permissive) promotes them."""

    def __init__(self, what: str) -> None:
        self.what = what  # "export" or "save_metadata"
        self.types: dict[str, tuple[pa.DataType, str]] = {}  # column: (type, a tar with it)

    def add(self, schema: pa.Schema, tars: Sequence[str]) -> None:
        where = fsio.basename(sorted(tars)[0]) if tars else "a partition"
        for field in schema:
            if pa.types.is_null(field.type):
                continue
            seen = self.types.setdefault(field.name, (field.type, where))
            if seen[0] != field.type and not _promotable(field.name, seen[0], field.type):
                raise ColumnTypeConflict(
                    f"{self.what}: column {field.name!r} holds {seen[0]} values in the rows "
                    f"of {seen[1]} and {field.type} in those of {where}, which no Parquet "
                    f"reader takes as one column; give it one type first (e.g. "
                    f"metadata.astype({{{field.name!r}: 'string'}}))"
                )


def _promotable(name: str, a: pa.DataType, b: pa.DataType) -> bool:
    try:
        pa.unify_schemas(
            [pa.schema([(name, a)]), pa.schema([(name, b)])], promote_options="permissive"
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False
    return True

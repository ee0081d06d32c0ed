#!/usr/bin/env python
"""Reshard a WebDataset: copy its records into shards of a new size, optionally filtered.

Record bytes are copied unchanged; records are renumbered (``--old-id-col`` keeps the old
ids in the output Parquet). ``--query`` is a pandas expression over the metadata columns
(the sidecar Parquet's, or the captions and ``.json`` fields read from the tars).

Examples::

    python scripts/reshard.py shards/ resharded/ --samples-per-shard 5000
    python scripts/reshard.py shards/ big-images/ --samples-per-shard 1000 \\
        --query "width >= 512 and height >= 512" --old-id-col old_key
"""

from __future__ import annotations

import argparse
import sys

from _common import positive_int, reported_errors
from pandas.api.types import is_bool_dtype

from dask_imgcurate import ImageTextPairDataset
from dask_imgcurate.cluster import dask_client
from dask_imgcurate.metadata import KEEP_COLUMN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="directory (or glob, or URL) of the *.tar shards")
    parser.add_argument("output", help="directory for the new shards")
    parser.add_argument("--samples-per-shard", type=positive_int, default=10000)
    parser.add_argument(
        "--max-shards", type=positive_int, default=5, help="digits of shard numbers"
    )
    parser.add_argument("--query", default=None, help="keep rows where this is true")
    parser.add_argument("--old-id-col", default=None, help="column for the old record ids")
    parser.add_argument(
        "--n-workers", type=int, default=None, help="local worker processes (0: threads)"
    )
    parser.add_argument("--scheduler-address", default=None, help="a running Dask cluster")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks, Dask logs")
    args = parser.parse_args(argv)

    with reported_errors(args.verbose):  # bad input: one line `error: ...`, exit 1
        dataset = ImageTextPairDataset.from_webdataset(args.input)
        filter_column = None
        if args.query:
            meta = dataset.metadata
            query = args.query
            try:  # check the query on the columns (an empty frame) before any work
                result = meta._meta.eval(query)
            except Exception as err:
                raise ValueError(f"bad --query {query!r}: {err}") from err
            if not is_bool_dtype(getattr(result, "dtype", None)):
                raise ValueError(f"bad --query {query!r}: not a true/false condition")
            keep = meta.map_partitions(  # a null (a record without .json) is not True
                lambda df: df.eval(query).fillna(False).astype(bool), meta=(KEEP_COLUMN, bool)
            )
            # a bookkeeping name (KEEP_COLUMN, "_keep"): not written to the output's Parquet
            dataset.metadata = meta.assign(**{KEEP_COLUMN: keep})
            filter_column = KEEP_COLUMN
        with dask_client(args.scheduler_address, args.n_workers, quiet=not args.verbose):
            summary = dataset.to_webdataset(
                args.output,
                filter_column=filter_column,
                samples_per_shard=args.samples_per_shard,
                max_shards=args.max_shards,
                old_id_col=args.old_id_col,
            )
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

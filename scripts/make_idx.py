#!/usr/bin/env python
"""Write a DALI ``.idx`` beside every ``.tar`` shard of a directory (local or fsspec URL).

DALI's ``fn.readers.webdataset`` and ``ImageTextPairDataset.from_webdataset`` use the index
instead of scanning the tar. Shards whose ``.idx`` exists are skipped unless ``--force``.

Examples::

    python scripts/make_idx.py shards/
    python scripts/make_idx.py s3://bucket/shards --force --threads 32
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

import fsspec
from _common import reported_errors

from dask_imgcurate import write_dali_index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a directory of *.tar shards, or one .tar")
    parser.add_argument("--force", action="store_true", help="rewrite existing .idx files")
    parser.add_argument("--threads", type=int, default=8, help="shards indexed at once")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    with reported_errors(args.verbose):  # bad input: one line `error: ...`, exit 1
        fs, root = fsspec.core.url_to_fs(args.path)
        if root.endswith(".tar") and fs.isfile(root):
            tars = [root]
        else:
            tars = sorted(fs.glob(root.rstrip("/") + "/*.tar"))
        if not tars:
            raise FileNotFoundError(f"no .tar shards found in {args.path}")
        had = {t for t in tars if fs.exists(t[: -len(".tar")] + ".idx")}
        todo = [t for t in tars if args.force or t not in had]
        with ThreadPoolExecutor(max_workers=max(1, args.threads)) as pool:
            written = list(pool.map(lambda tar: write_dali_index(fs.unstrip_protocol(tar)), todo))
    for path in written:
        print(path)
    print(
        f"indexed {len(written)} of {len(tars)} shards "
        f"({len(had)} had one, {'rewritten' if args.force else 'kept'})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

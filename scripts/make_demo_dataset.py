#!/usr/bin/env python
"""Write a small deterministic image-text WebDataset demo (tars + sidecar Parquet).

Example: ``python scripts/make_demo_dataset.py /tmp/demo --shards 4 --samples-per-shard 64``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
    from dask_imgcurate.demo import IMAGE_EXTENSIONS, make_demo_dataset
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dask_imgcurate.demo import IMAGE_EXTENSIONS, make_demo_dataset

from _common import positive_int, reported_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write 00000.tar, 00000.parquet, ... into")
    parser.add_argument(
        "--shards", type=positive_int, default=4, help="number of tar shards (default 4)"
    )
    parser.add_argument(
        "--samples-per-shard", type=positive_int, default=64, help="records per shard (default 64)"
    )
    parser.add_argument("--no-parquet", action="store_true", help="skip the sidecar Parquet files")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--image-format", choices=sorted(IMAGE_EXTENSIONS), default="jpeg", help="image encoding"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with reported_errors(args.verbose):  # bad input: one line `error: ...`, exit 1
        tars = make_demo_dataset(
            args.out_dir,
            n_shards=args.shards,
            samples_per_shard=args.samples_per_shard,
            with_parquet=not args.no_parquet,
            seed=args.seed,
            image_format=args.image_format,
        )
    size = sum(os.path.getsize(p) for p in tars)
    for path in tars:
        print(path)
    print(
        f"wrote {len(tars)} shards x {args.samples_per_shard} records "
        f"({size / 1e6:.1f} MB of tar) in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

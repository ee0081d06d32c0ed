"""An export piece reading from many source tars held one open file per tar.

A frame sorted by score (or loaded with files_per_partition > 1) puts records of many tars in
one ~64 MB piece; the piece kept every source tar open until it was written, so with more
tars than the open-file limit allows (1024 by default; 64 here) the export failed:

    OSError: [Errno 24] Too many open files: '.../00058.tar'

Run: PYTHONPATH=. python repros/export_many_tars_emfile.py   (fixed: prints "exported ...")
"""

import resource
import sys
import tempfile
import warnings

import dask

from dask_imgcurate import ImageTextPairDataset
from dask_imgcurate.demo import make_demo_dataset

warnings.simplefilter("ignore")
dask.config.set(scheduler="synchronous")
with tempfile.TemporaryDirectory() as tmp:
    make_demo_dataset(f"{tmp}/src", n_shards=100, samples_per_shard=1)
    ds = ImageTextPairDataset.from_webdataset(f"{tmp}/src")
    meta = ds.metadata
    ds.metadata = meta.sort_values("caption").repartition(npartitions=1)  # tars mixed
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        print(ds.to_webdataset(f"{tmp}/out", samples_per_shard=1000))
    except OSError as err:
        sys.exit(f"BUG: {err}")

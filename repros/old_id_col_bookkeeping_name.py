"""to_webdataset(old_id_col="_shard") (or "_keep", ...) writes the old ids under a
bookkeeping column name, which from_webdataset leaves out of the export's metadata (with a
ShardWarning per shard): the old ids are gone from the reloaded frame.

Run: PYTHONPATH=. python repros/old_id_col_bookkeeping_name.py
"""

import tempfile
import warnings
from pathlib import Path

import dask

from dask_imgcurate import ImageTextPairDataset
from dask_imgcurate.demo import make_demo_dataset

dask.config.set(scheduler="synchronous")
with tempfile.TemporaryDirectory() as tmp:
    src, out = Path(tmp) / "src", Path(tmp) / "out"
    make_demo_dataset(src, n_shards=1, samples_per_shard=4, seed=1)
    ds = ImageTextPairDataset.from_webdataset(str(src))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.to_webdataset(str(out), old_id_col="_shard")
            frame = ImageTextPairDataset.from_webdataset(str(out)).metadata.compute()
        print("exported; the reloaded '_shard' holds", frame["_shard"].iloc[0], "(no old ids)")
    except ValueError as err:
        print("refused:", err)

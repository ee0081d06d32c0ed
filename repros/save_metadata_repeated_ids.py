"""save_metadata of a frame with two rows for one record (a left merge with a table that
repeats a key, or one dataset's metadata concatenated twice) writes a sidecar with repeated
ids without a word; with path=None that replaces the dataset's own sidecar, and the dataset
no longer loads, with any on_mismatch: 'MetadataMismatchError: sidecar Parquet repeats ids'.

Run: PYTHONPATH=. python repros/save_metadata_repeated_ids.py
"""

import tempfile
from pathlib import Path

import dask
import pandas as pd

from dask_imgcurate import ImageTextPairDataset
from dask_imgcurate.demo import make_demo_dataset

dask.config.set(scheduler="synchronous")
with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / "src"
    make_demo_dataset(src, n_shards=2, samples_per_shard=8, seed=1)
    ds = ImageTextPairDataset.from_webdataset(str(src))
    scores = pd.DataFrame(  # two scores for one record
        {"key": pd.array(["000000001", "000000001"], dtype="string"), "score": [0.1, 0.2]}
    )
    meta = ds.metadata.merge(scores, on="key", how="left")
    try:
        ds.with_metadata(meta).save_metadata()
        print("save_metadata wrote", sorted(p.name for p in src.glob("*.parquet")))
    except ValueError as err:
        print("save_metadata refused:", err)
    for on_mismatch in ("raise", "drop"):
        try:
            again = ImageTextPairDataset.from_webdataset(str(src), on_mismatch=on_mismatch)
            print(f"loads (on_mismatch={on_mismatch!r}):", len(again.metadata.compute()), "rows")
        except ValueError as err:
            print(f"does not load (on_mismatch={on_mismatch!r}):", type(err).__name__, err)

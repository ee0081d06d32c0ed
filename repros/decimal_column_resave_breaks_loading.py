"""A decimal column saved with save_metadata reloads as an object column of Python
Decimals; saving (or exporting) that frame again lets pyarrow infer each partition's
precision from its values (decimal128(2, 2) for shard 0, decimal128(3, 2) for shard 1),
and the result no longer loads: 'column 'price' is decimal128(3, 2), the dataset has
decimal128(2, 2): Decimal value does not fit in precision 2'. A save_metadata() with
path=None that changes nothing thus leaves the dataset unloadable.

Run: PYTHONPATH=. python repros/decimal_column_resave_breaks_loading.py
"""

import decimal
import tempfile
from pathlib import Path

import dask
import pandas as pd
import pyarrow as pa

from dask_imgcurate import ImageTextPairDataset
from dask_imgcurate.demo import make_demo_dataset

dask.config.set(scheduler="synchronous")
DEC = pd.ArrowDtype(pa.decimal128(10, 2))


def add_price(part: pd.DataFrame) -> pd.DataFrame:
    # shard 0: prices below 1 (precision 2 would do), shard 1: up to 9.99 (precision 3)
    second = part["_shard"].astype(str).str.endswith("00001.tar")
    cents = [decimal.Decimal(i % 100) / 100 for i in range(len(part))]
    values = [c + 9 if b else c for c, b in zip(cents, second)]
    return part.assign(price=pd.Series(pd.array(values, dtype=DEC), index=part.index))


with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / "src"
    make_demo_dataset(src, n_shards=2, samples_per_shard=10, seed=1)
    ds = ImageTextPairDataset.from_webdataset(str(src))
    meta = ds.metadata.map_partitions(add_price, meta=add_price(ds.metadata._meta))
    ds.with_metadata(meta).save_metadata()  # decimal128(10, 2) in both files: fine
    reloaded = ImageTextPairDataset.from_webdataset(str(src))
    print("reloaded dtype:", reloaded.metadata.dtypes["price"])
    out = Path(tmp) / "out"
    reloaded.to_webdataset(str(out), samples_per_shard=10)  # one output shard per input
    try:
        exported = ImageTextPairDataset.from_webdataset(str(out)).metadata.compute()
        print("the export loads:", len(exported), "rows")
    except TypeError as err:
        print("the export does not load:", err)
    reloaded.save_metadata()  # the same frame, saved again
    try:
        again = ImageTextPairDataset.from_webdataset(str(src)).metadata.compute()
        print("the dataset loads after a second save:", len(again), "rows")
    except TypeError as err:
        print("the dataset does not load after a second save:", err)

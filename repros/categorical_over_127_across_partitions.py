"""Categorical columns (astype("category")) whose categories, over several partitions,
exceed 127: pandas gives each partition int8 codes.

- to_webdataset / write_images: an output shard fed by two partitions fails with pyarrow's
  'These dictionaries cannot be combined' after its pieces were written (here with
  old_id_col and a categorical key; any categorical column that reaches the Parquet);
- save_metadata: a shard whose rows sit in two partitions (repartition) gets a Parquet
  written with int8 indices and 128+ values, which no reader can read back ('Integer value
  128 not in range'): with path=None that replaces the dataset's own sidecar.

Run: PYTHONPATH=. python repros/categorical_over_127_across_partitions.py
"""

import tempfile
from pathlib import Path

import dask
import pyarrow.parquet as pq

from dask_imgcurate import ImageTextPairDataset
from dask_imgcurate.demo import make_demo_dataset

dask.config.set(scheduler="synchronous")
with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / "src"
    make_demo_dataset(src, n_shards=2, samples_per_shard=64, seed=1)  # 64 + 64 = 128 ids
    ds = ImageTextPairDataset.from_webdataset(str(src))
    meta = ds.metadata
    meta = meta.assign(text=meta["caption"] + " #" + meta["key"])  # 128 distinct texts
    for column in ("key", "text"):
        out = Path(tmp) / f"out-{column}"
        try:
            ds.with_metadata(meta.astype({column: "category"})).to_webdataset(
                str(out), samples_per_shard=1000, old_id_col="old"
            )
            table = pq.read_table(out / "00000.parquet")
            print("to_webdataset", column, "OK:", table.num_rows, "rows")
        except Exception as err:  # noqa: BLE001
            print("to_webdataset", column, "FAILS:", type(err).__name__, err)
            print("  left in output:", sorted(p.name for p in out.iterdir()))
    # one shard of 200 records whose rows sit in two partitions of 100 categories each
    big = Path(tmp) / "big"
    make_demo_dataset(big, n_shards=1, samples_per_shard=200, seed=2)
    one = ImageTextPairDataset.from_webdataset(str(big))
    meta = one.metadata.repartition(npartitions=2)
    meta = meta.assign(text=(meta["caption"] + " #" + meta["key"]).astype("category"))
    one.with_metadata(meta).save_metadata(str(Path(tmp) / "saved"))
    try:
        table = pq.read_table(Path(tmp) / "saved" / "00000.parquet")
        print("save_metadata OK:", table.num_rows, "rows")
    except Exception as err:  # noqa: BLE001
        print("save_metadata wrote an unreadable Parquet:", type(err).__name__, err)

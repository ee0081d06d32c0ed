"""Export a dataset's kept records as new tar + Parquet shards, in parallel.

1. Each partition's kept rows (filter column True, no ``error``) are selected once, in the
   task that reads the partition, and held (``dask.persist``): metadata only, never image
   bytes, plus the bytes each record will take in an output tar (``record_spans``).
2. Their counts are prefix-summed into global positions (``plan_shards``), so output shard
   ``n`` knows exactly which row slices it holds and where each record goes in its tar. On
   a distributed client this happens as partitions arrive (each selection is gathered as
   it is computed: small, its rows spilled): a shard is started once every partition
   before its last row is selected (``run._stream``).
3. Local outputs: each shard is filled by independent piece tasks of about ``PIECE_BYTES``
   that copy their records' byte ranges to precomputed offsets of one temporary tar
   (``write_piece``), then one commit task ends it, writes ``.idx`` + Parquet and renames
   them into place, Parquet last (``commit_shard``). Object stores: a shard is one task that
   stages it locally and uploads each file whole (``write_shard``).

Modules: ``selection`` (1), ``planning`` (2), ``run`` (the driver and its tasks), ``guards``
(checks before writing), ``layouts`` (``to_webdataset`` and ``write_images``).
"""

from __future__ import annotations

from dask_imgcurate.export.layouts import to_webdataset, write_images
from dask_imgcurate.export.run import ExportSummary

__all__ = ["ExportSummary", "to_webdataset", "write_images"]

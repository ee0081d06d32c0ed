"""Byte-level I/O: tar indexing, DALI index files, storage access, shard writing."""

from dask_imgcurate.io.dali_index import format_dali_index, parse_dali_index
from dask_imgcurate.io.records import RecordIndex, group_records, split_key
from dask_imgcurate.io.shards import Shard, find_shards, index_shard, write_dali_index
from dask_imgcurate.io.tarindex import TarIndex, scan_tar

__all__ = [
    "RecordIndex",
    "Shard",
    "TarIndex",
    "find_shards",
    "format_dali_index",
    "group_records",
    "index_shard",
    "parse_dali_index",
    "scan_tar",
    "split_key",
    "write_dali_index",
]

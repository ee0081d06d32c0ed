"""Exceptions. Each names the shard (and record or byte offset) it is about."""

from __future__ import annotations


class CurateError(Exception):
    """Base class for dask_imgcurate errors."""


class TarFormatError(CurateError, ValueError):
    """A tar shard is truncated, corrupt or not a tar at all."""

    def __init__(self, source: str, offset: int, reason: str):
        self.source, self.offset, self.reason = source, offset, reason
        super().__init__(f"{source}: {reason} at byte offset {offset}")


class CompressedTarError(CurateError, ValueError):
    """The shard is compressed; byte-range access needs an uncompressed tar."""


class DuplicateKeyError(CurateError, ValueError):
    """A record key (or a key + extension) occurs twice in one shard."""


class MetadataMismatchError(CurateError, ValueError):
    """A sidecar Parquet's ids differ from its tar's record keys."""


class IndexFileError(CurateError, ValueError):
    """A DALI ``.idx`` file is malformed or does not describe its tar."""


class TooManyShards(CurateError, ValueError):
    """An export needs more output shards than ``max_shards`` digits can number."""


class ColumnTypeConflict(CurateError, TypeError):
    """A metadata column holds values of different types in different partitions (a pandas
    object column of ints in one, strings in another): their Parquet files would disagree."""


class ShardChangedError(CurateError, RuntimeError):
    """A tar changed after it was indexed: the metadata's byte offsets may point at other
    bytes now (names the tar, its version then and now)."""


class DecoderUnavailable(CurateError, RuntimeError):
    """DALI cannot build its decoding pipeline here (driver, device): no image could be
    decoded, so nothing is recorded per record."""


class RangeRequestsUnsupported(CurateError, OSError):
    """A server answered a byte-range read with the whole file: it does not serve ranges,
    which reading members needs (names the URL)."""


class StorageAccessDenied(CurateError, PermissionError):
    """The credentials may not read (or write) an object-store path; names URL and bucket."""


class StorageNotFound(CurateError, FileNotFoundError):
    """An object-store bucket or key does not exist; names URL and bucket."""


class WorkersKilled(CurateError, RuntimeError):
    """Every Dask worker that ran one task died while running it (``distributed``'s
    ``KilledWorker``, its cause): out of memory, or a crash in native code; names the tars
    the task read."""


class RandomWeightsWarning(UserWarning):
    """A model runs with random weights: its embeddings and scores are meaningless."""


class ShardWarning(UserWarning):
    """A shard is damaged or suspect (truncated, cut between records, data after its end);
    the records that could be read are kept."""


class ShardNotice(ShardWarning):
    """A ``ShardWarning`` about a shard read as WebDataset readers read it, not damaged:
    members that belong to no record, links not followed, an ``.idx`` not used."""

"""Find shards (``*.tar`` with optional ``.parquet`` / ``.idx`` siblings) and index them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec

from dask_imgcurate.errors import IndexFileError
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.dali_index import format_dali_index, parse_dali_index
from dask_imgcurate.io.records import RecordIndex, group_records
from dask_imgcurate.io.tarindex import scan_tar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One tar and the sidecar files found beside it (fsspec paths, no protocol)."""

    tar: str
    parquet: str | None = None
    idx: str | None = None

    @property
    def stem(self) -> str:
        return fsio.basename(self.tar)[: -len(".tar")]


def find_shards(fs: fsspec.AbstractFileSystem, path: str | Sequence[str]) -> list[Shard]:
    """Shards under a directory, matching a glob, or listed explicitly; sorted by path."""
    if isinstance(path, (list, tuple)):
        tars = [fs._strip_protocol(p) for p in path]
    else:
        path = fs._strip_protocol(path)
        with fsio.storage_errors(fs, path):  # object stores: one line naming the bucket
            if any(ch in path for ch in "*?["):
                tars = fs.glob(path)
            elif path.endswith(".tar") and fs.isfile(path):
                tars = [path]
            elif fs.isdir(path):
                tars = [p for p in fs.ls(path, detail=False) if p.endswith(".tar")]
            else:
                raise FileNotFoundError(f"no such file or directory: {path}")
    tars = sorted(t for t in tars if t.endswith(".tar"))
    siblings: set[str] = set()
    for directory in {t.rsplit("/", 1)[0] if "/" in t else "" for t in tars}:
        with fsio.storage_errors(fs, directory or "."):
            siblings.update(fs.ls(directory or ".", detail=False))
    if isinstance(path, (list, tuple)):  # listed explicitly: each must exist
        missing = [t for t in tars if t not in siblings]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"no such shard: {fsio.qualify(fs, missing[0])}{more}")
    shards = []
    for tar in tars:
        stem = tar[: -len(".tar")]
        shards.append(
            Shard(
                tar=tar,
                parquet=stem + ".parquet" if stem + ".parquet" in siblings else None,
                idx=stem + ".idx" if stem + ".idx" in siblings else None,
            )
        )
    return shards


def index_shard(
    fs: fsspec.AbstractFileSystem, shard: Shard, *, strict: bool = True, use_idx: bool = True
) -> RecordIndex:
    """Records of a shard, from its ``.idx`` when present and valid, else by scanning."""
    source = fsio.qualify(fs, shard.tar)
    if use_idx and shard.idx is not None:
        try:
            text = fsio.read_bytes(fs, shard.idx).decode("utf-8")
            members = parse_dali_index(text, source, tar_size=fs.size(shard.tar))
            return group_records(members)
        except (IndexFileError, UnicodeDecodeError) as err:
            log.warning("ignoring index %s (%s); scanning the tar instead", shard.idx, err)
    with fsio.open_buffer(fs, shard.tar) as buffer:
        return group_records(scan_tar(buffer, source, strict=strict))


def write_dali_index(
    tar_path: str, idx_path: str | None = None, storage_options: dict | None = None
) -> str:
    """Write a DALI v1.2 ``.idx`` for ``tar_path`` (default: beside it); return its path."""
    fs, tar = fsio.url_to_fs(tar_path, storage_options)
    if idx_path is None:
        idx = tar[: -len(".tar")] + ".idx" if tar.endswith(".tar") else tar + ".idx"
    else:
        idx = fsio.url_to_fs(idx_path, storage_options)[1]
    records = index_shard(fs, Shard(tar=tar), use_idx=False)
    with fsio.atomic_write(fs, idx) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(format_dali_index(records))
    return fsio.qualify(fs, idx)

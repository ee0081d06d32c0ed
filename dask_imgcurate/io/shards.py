"""Find shards (``*.tar`` with optional ``.parquet`` / ``.idx`` siblings) and index them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import numpy as np

from dask_imgcurate.errors import (
    CompressedTarError,
    IndexFileError,
    ShardChangedError,
    ShardNotice,
    ShardWarning,
)
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.dali_index import (
    TAIL_READ,
    check_gaps,
    check_headers,
    check_tail,
    format_dali_index,
    gaps_to_check,
    members_end,
    members_to_check,
    parse_dali_index,
)
from dask_imgcurate.io.records import RecordIndex, group_records, split_key
from dask_imgcurate.io.tarindex import BLOCK, TarIndex, scan_tar

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


_COMPRESSED_SUFFIXES = {
    ".tar.gz": "gzip",
    ".tgz": "gzip",
    ".taz": "gzip",
    ".tar.bz2": "bzip2",
    ".tbz": "bzip2",
    ".tbz2": "bzip2",
    ".tar.xz": "xz",
    ".txz": "xz",
    ".tar.zst": "zstd",
    ".tar.zstd": "zstd",
    ".tzst": "zstd",
    ".tar.lz4": "lz4",
    ".tar.lzma": "lzma",
    ".tlz": "lzma",
    ".tar.z": "compress",
}
_EXAMPLES = 3


def find_shards(fs: fsspec.AbstractFileSystem, path: str | Sequence[str]) -> list[Shard]:
    """Shards under a directory, matching a glob, or listed explicitly; sorted by path.

    A path that exists is used as it is, glob characters and all. A compressed tar
    (``.tar.gz``, ...) raises ``CompressedTarError`` when named, or when a directory or
    glob finds no other shards; directories named ``*.tar`` are not shards. Listings are
    never taken from an object store client's cache (another process may have written
    there since).
    """
    if not fsio.is_local(fs):
        fs.invalidate_cache()
    if isinstance(path, str) and _BRACES.search(path) and not fs.exists(fs._strip_protocol(path)):
        path = expand_braces(path)  # WebDataset's shard notation: "{00000..00099}.tar"
    if isinstance(path, (list, tuple)):
        tars = [fs._strip_protocol(p) for p in path]
        repeated = sorted(t for t, n in Counter(tars).items() if n > 1)
        if repeated:  # its records would be read twice
            raise ValueError(f"{fsio.qualify(fs, repeated[0])} is listed more than once")
        listings = _listings(fs, tars)
        for tar in tars:
            _check_named(fs, tar, listings[_parent(tar)].get(tar))
    else:
        path = fs._strip_protocol(path)
        with fsio.storage_errors(fs, path):  # object stores: one line naming the bucket
            if fs.isfile(path):
                _check_named(fs, path, "file")
                found = {path: "file"}
            elif fs.isdir(path):
                found = {info["name"]: _kind(fs, info) for info in fs.ls(path, detail=True)}
            elif any(ch in path for ch in "*?["):
                found = {n: _kind(fs, i) for n, i in fs.glob(path, detail=True).items()}
            else:
                raise FileNotFoundError(f"no such file or directory: {fsio.qualify(fs, path)}")
        files = [name for name, kind in found.items() if kind == "file"]
        tars = [name for name in files if name.endswith(".tar")]
        if not tars:
            compressed = sorted(name for name in files if _compression(name))
            if compressed:
                raise _compressed_error(fs, compressed[0], len(compressed) - 1)
        _refuse_other_case(fs, files, found_shards=bool(tars))
        listings = _listings(fs, tars)
    shards = []
    for tar in sorted(tars):
        stem, siblings = tar[: -len(".tar")], listings[_parent(tar)]
        shards.append(
            Shard(
                tar=tar,
                parquet=stem + ".parquet" if stem + ".parquet" in siblings else None,
                idx=stem + ".idx" if stem + ".idx" in siblings else None,
            )
        )
    return shards


_BRACES = re.compile(r"\{[^{}]*(,|\.\.)[^{}]*\}")  # a brace to expand, innermost


def expand_braces(pattern: str) -> list[str]:
    """Every path of a brace pattern, as WebDataset's ``braceexpand`` reads it, in order:
    ``{000..012}`` counts (zero-padded to the widest end), ``{0..8..2}`` in steps, ``{a..c}``
    letters, ``{a,b}`` alternatives (which may hold braces); several braces combine
    (``{a,b}-{0..1}`` -> ``a-0 a-1 b-0 b-1``); ``{}`` and ``{x}`` stay as they are."""
    start = _outer_brace(pattern)
    if start is None:
        return [pattern]
    end = _closing(pattern, start)
    body, tail = pattern[start + 1 : end], pattern[end + 1 :]
    head = pattern[:start]
    choices = _alternatives(body)
    if choices is None:  # not an expansion: keep "{...}" and go on after it
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [
        head + choice + rest
        for alternative in choices
        for choice in expand_braces(alternative)
        for rest in expand_braces(tail)
    ]


def _outer_brace(pattern: str) -> int | None:
    """Where the first brace that holds an expansion (``,`` or ``..``) opens."""
    match = _BRACES.search(pattern)
    if match is None:
        return None
    depth, start = 0, None
    for i, ch in enumerate(pattern[: match.start() + 1]):  # the outermost brace around it
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
    return start


def _closing(pattern: str, start: int) -> int:
    depth = 0
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return i
    return len(pattern)  # unbalanced: the rest is the body


def _alternatives(body: str) -> list[str] | None:
    """A brace body's alternatives: its top-level comma parts, or a sequence; None if it
    is neither."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    if parts:
        return [*parts, body[last:]]
    numbers = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    if numbers:
        first, last_, step = numbers.groups()
        step = abs(int(step or 1)) or 1
        a, b = int(first), int(last_)
        width = max(len(first), len(last_)) if first[0] == "0" or last_[0] == "0" else 0
        values = range(a, b + 1, step) if b >= a else range(a, b - 1, -step)
        return [f"{n:0{width}d}" for n in values]
    letters = re.fullmatch(r"([A-Za-z])\.\.([A-Za-z])", body)
    if letters:
        a, b = map(ord, letters.groups())
        return [chr(c) for c in (range(a, b + 1) if b >= a else range(a, b - 1, -1))]
    return None


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _listings(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, dict[str, str]]:
    """``{directory: {path: type}}`` for the directories of ``paths``: one listing each; a
    path the listing lacks, or all of them where a directory cannot be listed (an HTTP
    server, a bucket that allows reads but not listing), is looked up by itself, with the
    sidecars it may have."""
    listings = {}
    for directory in {_parent(p) for p in paths}:
        named = [p for p in paths if _parent(p) == directory]
        try:
            with fsio.storage_errors(fs, directory or "."):
                entries = fs.ls(directory or ".", detail=True)
        except Exception as err:  # noqa: BLE001 - whatever the store says, look one by one
            if fsio.is_local(fs):
                raise
            log.debug("cannot list %s (%s): looking up its shards one by one", directory, err)
            entries = []
        listing = {info["name"]: _kind(fs, info) for info in entries}
        unlisted = [p for p in named if p not in listing]
        listings[directory] = {**listing, **_looked_up(fs, unlisted)}
    return listings


def _kind(fs: fsspec.AbstractFileSystem, info: dict) -> str:
    """A listing entry's type, symbolic links followed (fsspec lists a local link as
    "other"; the Hugging Face hub's cache links every file of a snapshot)."""
    if info.get("type") == "other" and info.get("islink"):
        if fs.isfile(info["name"]):
            return "file"
        if fs.isdir(info["name"]):
            return "directory"
    return info.get("type", "file")


LOOKUP_CONCURRENCY = 64
"""Requests at once asking whether listed shards and their sidecars exist (3 per shard:
1000 shards at 30 ms a request take ~1.4 s)."""


def _looked_up(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, str]:
    """``{path: type}`` of those of ``paths``, and of their ``.parquet`` / ``.idx``
    siblings, that exist (one request each, ``LOOKUP_CONCURRENCY`` at a time). Only a real
    "not found" means absent: a sidecar the server refuses or fails to serve is an error,
    not a missing sidecar (its metadata would be lost quietly)."""
    candidates = []
    for path in paths:
        stem = path[: -len(".tar")] if path.endswith(".tar") else path
        candidates += dict.fromkeys((path, stem + ".parquet", stem + ".idx"))

    def kind(candidate: str) -> str | None:
        try:  # retry's errors are explained: a refusal or a failure is no FileNotFoundError
            return fsio.retry(fs, candidate, lambda: fs.info(candidate)).get("type", "file")
        except FileNotFoundError:
            return None

    calls = [functools.partial(kind, candidate) for candidate in candidates]
    kinds = fsio.concurrently(calls, LOOKUP_CONCURRENCY)
    return {c: k for c, k in zip(candidates, kinds) if k is not None}


def _check_named(fs: fsspec.AbstractFileSystem, path: str, kind: str | None) -> None:
    """Raise unless ``path``, named as a shard, is a ``.tar`` file (``kind``: its type)."""
    url = fsio.qualify(fs, path)
    if url.startswith(("http://", "https://")) and ".tar?" in url:
        raise ValueError(
            f"{url}: shard URLs with a query string (signed or tokenised URLs) are not "
            f"supported: a shard's sidecars and output names follow from its path; pass "
            f"credentials as headers (storage_options={{'client_kwargs': {{'headers': "
            f"...}}}}) or download the shards first"
        )
    if kind is None:
        raise FileNotFoundError(f"no such shard: {url}")
    if kind != "file":
        raise IsADirectoryError(f"{url}: is a directory, not a .tar shard")
    if _compression(path):
        raise _compressed_error(fs, path)
    if not path.endswith(".tar"):
        hint = ""
        if path.lower().endswith(".tar"):
            hint = f"; {_CASE}"
        elif url.startswith(("http://", "https://")):
            hint = "; over HTTP there is no directory listing to rely on: list the tars' URLs"
        raise ValueError(f"{url}: not a .tar shard (shards are uncompressed .tar files{hint})")


def _compression(path: str) -> str | None:
    lower = path.lower()
    return next((k for suffix, k in _COMPRESSED_SUFFIXES.items() if lower.endswith(suffix)), None)


_CASE = "shard names end in '.tar', matched case-sensitively (rename the files)"


def _refuse_other_case(fs: fsspec.AbstractFileSystem, files: list[str], found_shards: bool):
    """Files ending in '.TAR' (any case but '.tar'): an error when no shard was found,
    else a warning that they are not read."""
    other = sorted(name for name in files if name.lower().endswith(".tar") and name[-4:] != ".tar")
    if not other:
        return
    what = f"{fsio.qualify(fs, other[0])}" + (f" (and {len(other) - 1} more)" if other[1:] else "")
    if not found_shards:
        raise FileNotFoundError(f"no .tar shards found, but {what}: {_CASE}")
    warnings.warn(f"not read: {what}: {_CASE}", ShardWarning, stacklevel=4)


def _compressed_error(
    fs: fsspec.AbstractFileSystem, path: str, more: int = 0
) -> CompressedTarError:
    others = f" (and {more} more)" if more else ""
    return CompressedTarError(
        f"{fsio.qualify(fs, path)}{others}: this shard is {_compression(path)}-compressed; "
        f"dask_imgcurate reads members by byte range and needs an uncompressed .tar "
        f"(decompress it first)"
    )


@dataclass(frozen=True)
class Prefetched:
    """A remote shard's files read before indexing it, with one round of requests: the
    ``.idx`` and the tar's size (when the index is used), else the whole tar (its
    ``fsio.download``, which ``index_shard`` closes); the sidecar Parquet (None: not asked
    for, or no sidecar)."""

    idx: bytes | None = None
    tar_size: int | None = None
    tar: BinaryIO | None = None
    parquet: bytes | None = None


def prefetch(
    fs: fsspec.AbstractFileSystem, shard: Shard, *, use_idx: bool = True, parquet: bool = True
) -> Prefetched | None:
    """What ``index_shard`` reads first of ``shard`` (and with ``parquet`` its sidecar), as
    concurrent requests on object stores, where one after another they cost a round trip
    each (each read is retried on transient errors); None for local files."""
    if fsio.is_local(fs):
        return None
    calls = {}
    if use_idx and shard.idx is not None:
        calls["idx"] = lambda: fsio.read_bytes(fs, shard.idx)
        calls["tar_size"] = lambda: fs.size(shard.tar)
    else:
        calls["tar"] = lambda: fsio.download(fs, shard.tar)
    if parquet and shard.parquet is not None:
        calls["parquet"] = lambda: fsio.read_bytes(fs, shard.parquet)
    return Prefetched(**dict(zip(calls, fsio.concurrently(list(calls.values())))))


def index_shard(
    fs: fsspec.AbstractFileSystem,
    shard: Shard,
    *,
    strict: bool = True,
    use_idx: bool = True,
    prefetched: Prefetched | None = None,
) -> RecordIndex:
    """Records of a shard, from its ``.idx`` when present and consistent with the tar,
    else by scanning the tar (an ``.idx`` not used is reported as a ``ShardNotice``).
    ``prefetched``: its files already read (``prefetch``), read here otherwise."""
    source = fsio.qualify(fs, shard.tar)
    version = fsio.file_version(fs, shard.tar)  # before reading: a later change shows
    scanned = None
    if prefetched is not None and prefetched.tar is not None:
        with prefetched.tar, fsio.mapped(prefetched.tar) as buffer:
            scanned = scan_tar(buffer, source, strict=strict)
    elif use_idx and shard.idx is not None:
        try:
            if prefetched is not None and prefetched.idx is not None:
                text, tar_size = prefetched.idx.decode("utf-8"), prefetched.tar_size
            else:
                text = fsio.read_bytes(fs, shard.idx).decode("utf-8")
                tar_size = fs.size(shard.tar)
            members = parse_dali_index(text, source, tar_size=tar_size)
            members = _checked_against_tar(fs, shard.tar, members, tar_size)
            if _modified_after(fs, shard.tar, shard.idx):
                why = "the tar was modified after the index was written"
            elif _escaped_names(members):
                why = "its names may be escaped (DALI's wds2idx lists GNU tar's quoting)"
            else:
                return dataclasses.replace(group_records(members, strict=strict), version=version)
            with fsio.open_buffer(fs, shard.tar) as buffer:  # every header, not a sample
                scanned = scan_tar(buffer, source, strict=strict)
            _check_all_members(members, scanned, why)
            return dataclasses.replace(group_records(scanned, strict=strict), version=version)
        except (IndexFileError, UnicodeDecodeError) as err:
            why = str(err).removeprefix(f"{source}: ")
            warnings.warn(
                f"{source}: ignoring its index {fsio.qualify(fs, shard.idx)} ({why}); "
                f"scanning the tar instead: rewrite the index with write_dali_index or "
                f"`dask-imgcurate index`",
                ShardNotice,
                stacklevel=2,
            )
    if scanned is None:
        with fsio.open_buffer(fs, shard.tar) as buffer:
            scanned = scan_tar(buffer, source, strict=strict)
    return dataclasses.replace(group_records(scanned, strict=strict), version=version)


def _modified_after(fs: fsspec.AbstractFileSystem, tar: str, idx: str) -> bool:
    """Whether a local ``tar`` was modified after its index ``idx`` was written (then the
    index is checked against every header; a copy that did not keep times costs that scan)."""
    return fsio.is_local(fs) and os.stat(tar).st_mtime_ns > os.stat(idx).st_mtime_ns


def _escaped_names(index: TarIndex) -> bool:
    """Whether an index's member names may be escaped rather than the tar's own: DALI's
    ``wds2idx`` copies them from ``tar --list``, which quotes a backslash as ``\\\\``,
    control characters as ``\\n`` or ``\\ooo`` and, in the C locale, every non-ASCII byte
    as ``\\ooo``. Such names hold a backslash, and may be too long or too few to be among
    the headers sampled, so they are checked against every header instead."""
    return any("\\" in name for name in index.names)


def _check_all_members(
    listed: TarIndex,
    scanned: TarIndex,
    why: str = "the tar was modified after the index was written",
) -> None:
    """Raise ``IndexFileError`` unless an index lists exactly the members a scan found
    (``why``: why it was checked against a scan, for the message); members in no record
    (dot-files, ``README``), which indexes may or may not list, are left out of both."""
    listed, scanned = _in_records(listed), _in_records(scanned)
    if len(listed) != len(scanned):
        where = f"the tar has {len(scanned)} members, the index lists {len(listed)}"
    else:
        differ = (
            (listed.offsets != scanned.offsets)
            | (listed.sizes != scanned.sizes)
            | (np.array(listed.names, dtype=object) != np.array(scanned.names, dtype=object))
        )
        if not differ.any():
            return
        i = int(np.argmax(differ))
        where = f"member {i} is {scanned.names[i]!r} at byte {scanned.offsets[i]}"
    raise IndexFileError(f"{why}: {where}")


def _in_records(index: TarIndex) -> TarIndex:
    """``index`` without its members that belong to no record."""
    rows = [i for i, name in enumerate(index.names) if split_key(name)[0] is not None]
    if len(rows) == len(index):
        return index
    return dataclasses.replace(
        index,
        names=[index.names[i] for i in rows],
        offsets=index.offsets[rows],
        sizes=index.sizes[rows],
    )


def version_type_error(type_name: str) -> TypeError:
    """The error for a ``_shard_version`` column that is no longer int64 (a digest cast to
    float loses bits: every tar would look changed)."""
    return TypeError(
        f"the metadata's '_shard_version' column is {type_name}, not int64 (converted?): the "
        f"tars' versions cannot be checked; leave bookkeeping columns as they are, or load "
        f"the dataset again"
    )


def check_unchanged(source: str, indexed: Iterable[int], now: os.stat_result | None) -> None:
    """Raise ``ShardChangedError`` unless the tar ``source`` (``now``: its ``os.stat``, None
    when not local) is still at every version in ``indexed`` (its rows' ``_shard_version``,
    nulls left out)."""
    if now is None:
        return
    version = fsio.stat_version(now)
    if any(v != version for v in indexed):
        raise ShardChangedError(
            f"{source} changed after it was indexed (now {fsio.describe_stat(now)}): the "
            f"metadata's byte offsets may point at other bytes; load the dataset again "
            f"(from_webdataset) and redo the work based on the old one"
        )


CHECK_MAX_GAP = 256 << 10
"""Remote tars: header blocks (and the tail) this close together are checked with one GET
(a small shard's with one or two GETs instead of some twenty)."""
CHECK_MAX_READ = 2 << 20
"""Remote tars: bytes per such GET, at most."""


def _checked_against_tar(
    fs: fsspec.AbstractFileSystem, tar: str, members: TarIndex, tar_size: int
) -> TarIndex:
    """``members`` (from an index) with the tar's end state, once a few of their headers and
    the bytes after the last one, read in one batch, agree; else ``IndexFileError``."""
    rows, gaps = members_to_check(members), gaps_to_check(members)
    end = members_end(members)
    tail = max(0, min(tar_size, end + TAIL_READ) - end)
    starts = [*(members.offsets[rows] - BLOCK).tolist(), *gaps.tolist()]
    sizes = [BLOCK] * len(starts) + [tail]
    blocks = fsio.read_ranges(fs, tar, [*starts, end], sizes, CHECK_MAX_GAP, CHECK_MAX_READ)
    try:
        problem = check_headers(members, rows, blocks[: len(rows)])
        problem = problem or check_gaps(gaps, blocks[len(rows) : -1])
        if problem is not None:
            raise IndexFileError(problem)
        state = check_tail(blocks[-1], end, tar_size, members.source)
        if state is None:  # a long tail (concatenated tars?): read all of it
            state = check_tail(fsio.read_range(fs, tar, end, tar_size), end, tar_size)
    except IndexFileError as err:
        raise IndexFileError(f"it does not describe the tar: {err}") from None
    members.ends_marked, members.data_after_end = state
    return members


def shard_notes(records: RecordIndex) -> list[tuple[str, type[Warning]]]:
    """What is suspect about a shard read as ``records`` (its damage apart): one message
    each, with its warning category."""
    members, source = records.members, records.members.source
    notes: list[tuple[str, type[Warning]]] = []
    if members.data_after_end is not None:
        notes.append(
            (
                f"{source}: data follows its end-of-archive blocks (from byte offset "
                f"{members.data_after_end}; concatenated tars?) and is ignored, as tar "
                f"readers ignore it: only the {len(records)} records before them are read",
                ShardWarning,
            )
        )
    if not members.ends_marked:
        notes.append(
            (
                f"{source}: ends after {len(members)} members without the end-of-archive "
                f"blocks tar writers add when they finish: it may have been cut short between "
                f"records (an interrupted write or download); its {len(records)} records are "
                f"kept",
                ShardWarning,
            )
        )
    if records.undecodable:
        notes.append(
            (
                f"{source}: dropped {records.undecodable} records whose member names are not "
                f"UTF-8 (the first one's data starts at byte offset "
                f"{records.undecodable_offset}); kept the other {len(records)} records",
                ShardWarning,
            )
        )
    if records.ignored:
        notes.append(
            (
                f"{source}: ignored {len(records.ignored)} members that belong to no record "
                f"(a basename without an extension or starting with a dot, such as macOS "
                f"'._' files), as WebDataset readers ignore them: {_examples(records.ignored)}",
                ShardNotice,
            )
        )
    if members.skipped:
        notes.append(
            (
                f"{source}: skipped {len(members.skipped)} links or other members that are "
                f"not regular files (links are not followed: their records are read without "
                f"them): {_examples(members.skipped)}",
                ShardNotice,
            )
        )
    return notes


def _examples(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_EXAMPLES])
    return shown + (", ..." if len(names) > _EXAMPLES else "")


def write_dali_index(
    tar_path: str, idx_path: str | None = None, storage_options: dict | None = None
) -> str:
    """Write a DALI v1.2 ``.idx`` for ``tar_path`` (default: beside it); return its path.

    What is suspect about the shard (cut between records, data after its end, members
    ignored or skipped) is reported as a ``ShardWarning`` each, as loading reports it.
    """
    idx, notes = write_dali_index_noting(tar_path, idx_path, storage_options)
    for message, category in notes:
        warnings.warn(message, category, stacklevel=2)
    return idx


def write_dali_index_noting(
    tar_path: str, idx_path: str | None = None, storage_options: dict | None = None
) -> tuple[str, list[tuple[str, type[Warning]]]]:
    """``write_dali_index``, returning the warnings (``shard_notes``) instead of issuing
    them: ``(path, [(message, category), ...])``."""
    fs, tar = fsio.url_to_fs(tar_path, storage_options)
    if idx_path is None:
        idx = tar[: -len(".tar")] + ".idx" if tar.endswith(".tar") else tar + ".idx"
    else:
        idx = fsio.url_to_fs(idx_path, storage_options)[1]
    records = index_shard(fs, Shard(tar=tar), use_idx=False)
    with fsio.atomic_write(fs, idx) as tmp, fsio.naming(tmp), open(tmp, "w", encoding="utf-8") as f:
        f.write(format_dali_index(records))
    return fsio.qualify(fs, idx), shard_notes(records)

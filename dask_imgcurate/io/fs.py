"""Storage access through fsspec: one code path for local disks and object stores.

Remote reads and uploads are retried on transient errors (connection resets, timeouts,
other ``OSError`` s) with exponential backoff; local files never are. Object-store errors
that retrying cannot fix (access denied, no such bucket or key) are re-raised as one line
naming the URL and the bucket. Credentials are never read, stored or logged here: fsspec
and the store's client library (s3fs / botocore, gcsfs, adlfs) find them in their standard
places, or take them from ``storage_options``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import mmap
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, TypeVar

import dask.config
import fsspec
from fsspec.implementations.local import LocalFileSystem

from dask_imgcurate.errors import (
    CurateError,
    RangeRequestsUnsupported,
    StorageAccessDenied,
    StorageNotFound,
)
from dask_imgcurate.io.ranges import merge_ranges

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS = 4
"""Tries of one remote read or upload (the first included) before its error is raised."""

RETRY_DELAY = 0.5
"""Seconds before the first retry; each further retry waits twice as long (with jitter)."""

_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def url_to_fs(
    path: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path without protocol)`` for ``path``."""
    return fsspec.core.url_to_fs(str(path), **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as users write it: absolute for local files, ``proto://...`` otherwise."""
    return os.path.abspath(path) if is_local(fs) else fs.unstrip_protocol(path)


def _worker():
    """The Dask worker running this code; None outside one."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _worker_address() -> str | None:
    """The address of the Dask worker running this code; None outside one."""
    worker = _worker()
    return None if worker is None else worker.address


@contextlib.contextmanager
def explain_missing(fs: fsspec.AbstractFileSystem, what: str, path: str | None = None):
    """Turn a local ``FileNotFoundError`` inside the block into one that names the file
    (``path``, else the error's own), what it is (``what``: this task expected it) and where
    it was looked for: a cluster's workers that share no disk see different files. Object
    stores' errors, which explain themselves, pass unchanged."""
    try:
        yield
    except FileNotFoundError as err:
        path = path or err.filename
        if not is_local(fs) or path is None:
            raise
        worker = _worker_address()
        where = f"on Dask worker {worker}" if worker else "here"
        reason = f" ({err.strerror})" if err.strerror else ""
        raise FileNotFoundError(
            f"{path}: {what}, is missing {where}{reason}: removed meanwhile, or not visible "
            f"there; the client and every worker must see the input and output at the same "
            f"paths (a shared disk or an object store)"
        ) from err


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- errors and retries


def _client_errors(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and its causes that are an HTTP client library's: aiohttp's (fsspec's HTTP
    filesystem raises them, or a ``FileNotFoundError`` caused by one for every failed
    lookup) and botocore's (s3fs)."""
    while err is not None:
        if type(err).__module__.startswith(("aiohttp", "botocore")):
            yield err
        err = err.__cause__


def http_status(err: BaseException) -> int | None:
    """The HTTP status behind an error of fsspec's HTTP filesystem (aiohttp's
    ``ClientResponseError``); None for other errors."""
    statuses = (getattr(e, "status", None) for e in _client_errors(err))
    return next((s for s in statuses if isinstance(s, int)), None)


_CONNECTION_ERRORS = {
    "ClientConnectionError",  # aiohttp's
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "EndpointConnectionError",  # botocore's
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyConnectionError",
}


def _connection_error(err: BaseException) -> bool:
    """aiohttp's and botocore's connection and payload errors (mostly not ``OSError`` s)."""
    return any(type(e).__name__ in _CONNECTION_ERRORS for e in _client_errors(err))


def _changed_object(err: BaseException) -> bool:
    """s3fs's ``FileExpired``: the object was replaced while it was being read (an
    ``OSError``, but retrying reads the same stale version)."""
    return type(err).__name__ == "FileExpired"


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying on a remote store: I/O errors, timeouts, HTTP 5xx and
    429 answers and dropped connections, except those that say what is there (missing,
    forbidden, a directory)."""
    status = http_status(err)
    if status is not None:
        return status >= 500 or status == 429
    if _connection_error(err):
        return True
    if _changed_object(err):
        return False
    timeouts = (TimeoutError, asyncio.TimeoutError)  # distinct classes before Python 3.11
    return isinstance(err, (OSError, *timeouts)) and not isinstance(err, _PERMANENT)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
"""Stores whose first path component is a bucket (or container)."""


def protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    """The URL schemes of ``fs`` (``{"s3", "s3a"}``)."""
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _bucket(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    if not protocols(fs) & BUCKET_PROTOCOLS:
        return None
    return fs._strip_protocol(path).lstrip("/").split("/", 1)[0]


def explain(
    err: BaseException, fs: fsspec.AbstractFileSystem, path: str, action: str = "read"
) -> BaseException:
    """``err`` as a one-line error naming ``path`` and its bucket (object stores only).

    Returns ``err`` itself when it needs no explaining (local files, already explained, or
    not an access / not-found error).
    """
    if is_local(fs) or isinstance(err, CurateError):
        return err
    url = qualify(fs, path)
    bucket = _bucket(fs, path)
    status = http_status(err)
    if status in (401, 403):
        return StorageAccessDenied(f"{url}: access denied (HTTP {status})")
    if status is not None and status not in (404, 410):
        return OSError(f"{url}: the server answered HTTP {status} ({_one_line(err)[:200]})")
    if status is None and _connection_error(err):
        return OSError(f"{url}: cannot reach the server ({_one_line(err)[:200]})")
    if _changed_object(err):
        return OSError(
            f"{url}: the object was replaced while it was being read; load the dataset again"
        )
    if isinstance(err, PermissionError):
        what = f"bucket {bucket!r}" if bucket else "it"
        return StorageAccessDenied(
            f"{url}: access denied: the credentials in use cannot {action} {what} "
            f"({_one_line(err)})"
        )
    if isinstance(err, FileNotFoundError):
        where = "no such file or directory"
        if bucket:
            where = f"no such key in bucket {bucket!r}"
            with contextlib.suppress(Exception):
                if not fs.exists(bucket):
                    where = f"no such bucket {bucket!r}"
        return StorageNotFound(f"{url}: {where}")
    return err


@contextlib.contextmanager
def storage_errors(
    fs: fsspec.AbstractFileSystem, path: str, action: str = "read"
) -> Iterator[None]:
    """Re-raise access-denied and not-found errors of an object store with ``explain``."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - explained, or raised as it is
        explained = explain(err, fs, path, action)
        if explained is err:
            raise
        raise explained from err


def _backoff(attempt: int) -> float:
    return RETRY_DELAY * 2 ** (attempt - 1) * (0.5 + random.random() / 2)


def _give_up_or_wait(
    err: BaseException,
    fs: fsspec.AbstractFileSystem,
    path: str,
    action: str,
    attempt: int,
    what: str,
) -> None:
    """Raise ``err`` (explained) when permanent or out of tries; else log and back off."""
    if not is_transient(err) or attempt == RETRY_ATTEMPTS:
        explained = explain(err, fs, path, action)
        if explained is err:
            raise err
        raise explained from err
    delay = _backoff(attempt)
    log.warning(
        "%s: transient error on %s (%s); retry %d of %d in %.1f s",
        qualify(fs, path),
        what,
        _one_line(err),
        attempt,
        RETRY_ATTEMPTS - 1,
        delay,
    )
    time.sleep(delay)


def retry(
    fs: fsspec.AbstractFileSystem,
    path: str,
    call: Callable[[], T],
    action: str = "read",
) -> T:
    """``call()``, retried on transient errors when ``fs`` is remote (never locally).

    Makes up to ``RETRY_ATTEMPTS`` tries with exponential backoff, logging each retry at
    WARNING (the URL and the error only). The last error, or a permanent one, is raised
    (access denied / not found ones as one line naming the bucket).
    """
    if is_local(fs):
        return call()
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted below
            _give_up_or_wait(err, fs, path, action, attempt, action)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- reading


def file_version(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    """``stat_version`` of a local file; None on object stores (an object can be replaced
    too, but a fresh HEAD per read costs a request, and s3fs answers a throttled one with a
    wrong size: they are not checked)."""
    return stat_version(os.stat(path)) if is_local(fs) else None


def stat_version(st: os.stat_result) -> int:
    """A 64-bit number that changes when the file is rewritten: a digest of its size and
    modification time (int64, so a metadata column of it costs 8 bytes a row)."""
    digest = hashlib.blake2b(b"%d:%d" % (st.st_size, st.st_mtime_ns), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def describe_stat(st: os.stat_result) -> str:
    """``"378880 bytes, modified 2026-11-21T16:08:49.935332361Z"``."""
    seconds, nanoseconds = divmod(st.st_mtime_ns, 10**9)
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{st.st_size} bytes, modified {when}.{nanoseconds:09d}Z"


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole file (retried on transient errors when remote)."""
    return retry(fs, path, lambda: fs.cat_file(path))


DOWNLOAD_CHUNK = 2 << 20
"""Remote files copied whole (``download``): bytes per ranged GET."""
DOWNLOAD_BATCH = 16
"""... and such GETs in flight at once: at most 32 MB held in memory, whatever the size."""


def download(fs: fsspec.AbstractFileSystem, path: str) -> BinaryIO:
    """A remote file copied into an anonymous temporary file (in ``scratch_dir()``, gone
    once closed), returned open at its start. At most ``DOWNLOAD_BATCH`` ranged GETs of
    ``DOWNLOAD_CHUNK`` bytes are held in memory: a file smaller than a chunk costs one GET,
    a larger one a HEAD for its size, then concurrent GETs (each retried on transient
    errors). A server that ignores byte ranges answers the first GET with the whole file,
    which is then used."""
    out = tempfile.TemporaryFile(dir=scratch_dir())
    try:
        first = _first_chunk(fs, path)
        out.write(first)
        if len(first) == DOWNLOAD_CHUNK:
            size = retry(fs, path, lambda: fs.size(path))
            if size is None:  # no Content-Length: only the whole file can be asked for
                out.seek(0)
                out.write(read_bytes(fs, path))
            else:
                starts = list(range(DOWNLOAD_CHUNK, size, DOWNLOAD_CHUNK))
                for at in range(0, len(starts), DOWNLOAD_BATCH):
                    batch = starts[at : at + DOWNLOAD_BATCH]
                    sizes = [min(DOWNLOAD_CHUNK, size - start) for start in batch]
                    for start, want, data in zip(batch, sizes, read_ranges(fs, path, batch, sizes)):
                        if len(data) != want:
                            raise OSError(
                                f"{qualify(fs, path)}: {len(data)} bytes at byte offset "
                                f"{start} where {want} were expected: the file changed "
                                f"while it was read"
                            )
                        out.write(data)
        out.flush()
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise


def _first_chunk(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The first ``DOWNLOAD_CHUNK`` bytes of a remote file (all of it if smaller, or if the
    server ignores byte ranges); an empty file's none (a range of it is refused)."""
    try:
        return retry(fs, path, lambda: fs.cat_file(path, start=0, end=DOWNLOAD_CHUNK))
    except Exception:
        try:
            empty = fs.size(path) == 0
        except Exception:  # noqa: BLE001 - the GET's error is the one to report
            empty = False
        if empty:
            return b""
        raise


@contextlib.contextmanager
def open_buffer(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[bytes | mmap.mmap]:
    """The whole file as a buffer: an ``mmap`` of it, or of its ``download`` when remote."""
    if not is_local(fs):
        with download(fs, path) as f, mapped(f) as buffer:
            yield buffer
        return
    with open(path, "rb") as f, mapped(f) as buffer:
        yield buffer


@contextlib.contextmanager
def mapped(f: BinaryIO) -> Iterator[bytes | mmap.mmap]:
    """An open file's bytes, memory-mapped for reading (an empty file's: ``b""``)."""
    if os.fstat(f.fileno()).st_size == 0:
        yield b""
        return
    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield buffer
    finally:
        _close_mapping(buffer)


def _close_mapping(mapped: mmap.mmap) -> None:
    """Unmap now if nothing still views the mapping; else when its last view is freed. (On
    Dask workers a view can outlive its use for a while, in a frame the statistical profiler
    holds or in a reference cycle: that must not fail the task after its work is done.)"""
    try:
        mapped.close()
    except BufferError:
        gc.collect()
        with contextlib.suppress(BufferError):
            mapped.close()


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a remote file (one ranged GET, retried when transient)."""
    data = retry(fs, path, lambda: fs.cat_file(path, start=start, end=end))
    return _within(fs, path, start, end, data)


def _within(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int, data: bytes) -> bytes:
    """``data``, the answer to a ranged read, unless it is longer than the range: a server
    that ignores byte ranges sends the whole file (``python -m http.server`` does)."""
    if len(data) > end - start:
        raise RangeRequestsUnsupported(
            f"{qualify(fs, path)}: asked for {end - start} bytes at byte offset {start}, got "
            f"{len(data)}: the server does not serve byte ranges (HTTP Range requests), "
            f"which reading members needs"
        )
    return data


def merged_spans(
    offsets: Sequence[int], sizes: Sequence[int], max_gap: int, max_read: int
) -> list[tuple[int, int, list[int]]]:
    """Ranges ``[offset, offset + size)`` of one file grouped into reads ``(start, end,
    [range numbers])``, taken in offset order (``merge_ranges``' rules)."""
    order = sorted(range(len(offsets)), key=lambda i: int(offsets[i]))
    starts = [int(offsets[i]) for i in order]
    ends = [start + int(sizes[i]) for start, i in zip(starts, order)]
    return [
        (start, end, order[first:stop])
        for first, stop, start, end in merge_ranges(starts, ends, max_gap, max_read)
    ]


def read_ranges(
    fs: fsspec.AbstractFileSystem,
    path: str | Sequence[str],
    offsets: Sequence[int],
    sizes: Sequence[int],
    max_gap: int = -1,
    max_read: int = 0,
) -> list[bytes]:
    """Read byte ranges ``[offset, offset + size)`` of one file (``path``), or of one file
    per range (a sequence of paths).

    Locally with ``pread``; remotely with one ``cat_ranges`` call (concurrent ranged GETs)
    whose failed ranges are retried, only them, on transient errors. A range past the end
    of the file comes back short; callers check lengths. With ``max_gap`` >= 0 (one file
    only), remote ranges that ``merged_spans`` groups are fetched by one GET each.
    """
    if not len(offsets):
        return []
    if max_gap >= 0 and isinstance(path, str) and not is_local(fs):
        spans = merged_spans(offsets, sizes, max_gap, max_read)
        if len(spans) < len(offsets):
            starts = [start for start, _, _ in spans]
            reads = read_ranges(fs, path, starts, [end - start for start, end, _ in spans])
            out = [b""] * len(offsets)
            for (start, _, members), data in zip(spans, reads):
                for i in members:
                    at = int(offsets[i]) - start
                    out[i] = data[at : at + int(sizes[i])]
            return out
    paths = [path] * len(offsets) if isinstance(path, str) else list(path)
    if is_local(fs):
        with contextlib.ExitStack() as files:
            opened: dict[str, int] = {}
            out = []
            for p, o, n in zip(paths, offsets, sizes):
                if p not in opened:
                    opened[p] = files.enter_context(open(p, "rb")).fileno()
                out.append(os.pread(opened[p], int(n), int(o)))
            return out
    starts = [int(o) for o in offsets]
    ends = [int(o) + int(n) for o, n in zip(offsets, sizes)]
    out: list[bytes | None] = [None] * len(starts)
    pending = list(range(len(starts)))
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            # fsspec's cat_ranges returns a failed range's exception in its place
            got = fs.cat_ranges(
                [paths[i] for i in pending],
                [starts[i] for i in pending],
                [ends[i] for i in pending],
            )
        except Exception as err:  # noqa: BLE001 - the whole call failed: every range did
            got = [err] * len(pending)
        failed = []
        for i, data in zip(pending, got):
            if isinstance(data, BaseException):
                failed.append((i, data))
            else:
                out[i] = _within(fs, paths[i], starts[i], ends[i], data)
        if not failed:
            return out  # type: ignore[return-value]
        pending = [i for i, _ in failed]
        what = f"{len(pending)} of {len(starts)} byte ranges"
        first = failed[0][0]
        _give_up_or_wait(failed[0][1], fs, paths[first], "read", attempt, what)
    raise AssertionError("unreachable")


def concurrently(calls: Sequence[Callable[[], T]], at_once: int | None = None) -> list[T]:
    """``[call() for call in calls]``, made ``at_once`` at a time (all at once by default),
    one thread each (remote requests: their round trips overlap). The first failed call's
    error, in the order of ``calls``, is raised once the calls under way have ended; calls
    not yet started then never start."""
    if len(calls) < 2 or at_once == 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=at_once or len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()


# ---------------------------------------------------------------- writing

_READ_ONLY = frozenset({"http", "https"})


def refuse_read_only(fs: fsspec.AbstractFileSystem, path: str, what: str) -> None:
    """Raise ``ValueError`` before writing to a store that only reads (HTTP)."""
    if protocols(fs) & _READ_ONLY:
        raise ValueError(
            f"{what}: {qualify(fs, path)} is read-only (HTTP): write to a local directory or "
            f"an object store instead"
        )


TEMP_MARK = ".tmp-"


def makedirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the output directory ``path``; on object stores its bucket must exist.

    fsspec's ``makedirs`` would create a missing bucket: a typo in a bucket name would then
    silently make a new bucket. Here a missing or unreadable bucket is a one-line error
    naming it instead.
    """
    if is_local(fs):
        os.makedirs(path, exist_ok=True)
        return
    with storage_errors(fs, path, action="write"):
        bucket = _bucket(fs, path)
        if bucket:
            fs.info(bucket)  # FileNotFoundError / PermissionError when missing / forbidden
        fs.makedirs(path, exist_ok=True)


LOCK_NAME = ".dask_imgcurate.lock"


@contextlib.contextmanager
def writing_to(fs: fsspec.AbstractFileSystem, directory: str) -> Iterator[None]:
    """Hold the output ``directory`` for one writer (local directories: an advisory lock,
    released when the process ends however it ends). A second export into it while one runs
    would remove the first one's temporary files: a clear error instead. A directory made
    here and left empty is removed."""
    if not is_local(fs):
        yield
        return
    import fcntl

    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    lock = os.path.join(directory, LOCK_NAME)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CurateError(
                f"{os.path.abspath(directory)}: another export or save_metadata is writing "
                f"there now; wait for it to finish (re-running the same export then resumes "
                f"it), or write elsewhere"
            ) from None
        try:  # the holder before us removes the file, then unlocks: ours must be current
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)  # before unlocking (see above)
            if created:  # and nothing was written: leave no trace
                os.rmdir(directory)
        os.close(fd)


@contextlib.contextmanager
def naming(path: str, action: str = "writing") -> Iterator[None]:
    """Make an ``OSError`` of the block that names no file name ``path``: a full disk
    (ENOSPC), a quota, an I/O error while writing say which file (``os.pwrite``, a buffered
    file's flush and pyarrow name none). The error keeps its errno, hence its class."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or path in str(err):
            raise
        reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
        raise OSError(err.errno, f"{reason}: {action} {path}") from err


def remove_file(fs: fsspec.AbstractFileSystem, path: str, missing_ok: bool = False) -> None:
    """Delete the file ``path`` (retried on transient errors when remote); with
    ``missing_ok``, a file that is not there is fine."""
    try:
        retry(fs, path, lambda: fs.rm_file(path), action="write")
    except FileNotFoundError:  # (explained on object stores: StorageNotFound is one too)
        if not missing_ok:
            raise


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` as the file ``path`` (one upload, retried on transient errors, when
    remote). Not atomic locally: for files under hidden temporary names."""
    if is_local(fs):
        with naming(path), open(path, "wb") as f:
            f.write(data)
        return
    retry(fs, path, lambda: fs.pipe_file(path, data), action="write")


def remove_stale_temps(fs: fsspec.AbstractFileSystem, directory: str, mark: str = TEMP_MARK) -> int:
    """Delete the hidden temporary files (``.NAME.tmp-*``) that an interrupted writer left
    in ``directory``: ``atomic_write``'s local ones, and ``save_metadata``'s fragments (also
    objects on object stores, where nothing else is ever written under a temporary name).
    Call it only while no other writer uses the directory (``writing_to``); or with a
    ``mark`` naming one run's files (``TEMP_MARK`` + its id), for that run's."""
    if is_local(fs):
        if not os.path.isdir(directory):
            return 0
        names = os.listdir(directory)
    else:
        fs.invalidate_cache(directory)
        try:
            names = [basename(p) for p in fs.ls(directory, detail=False)]
        except FileNotFoundError:
            return 0
    stale = [n for n in names if n.startswith(".") and mark in n]
    for name in stale:
        remove_file(fs, join(directory, name))
    return len(stale)


def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Rename the file ``source`` to ``target`` (literal paths, never globs): atomic
    locally; on object stores a copy, then the source's removal, each retried."""
    if is_local(fs):
        os.replace(source, target)
        return
    retry(fs, target, lambda: fs.cp_file(source, target), action="write")
    remove_file(fs, source)


def temp_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A new local file name to write ``path``'s bytes to before ``publish``.

    Local outputs get a hidden name in the same directory (so the rename is atomic, and
    ``remove_stale_temps`` finds it after a crash); object stores get a local temp file
    named after this process (``_sweep_staging`` removes those of killed processes).
    """
    if is_local(fs):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        return os.path.join(
            directory, f".{os.path.basename(path)}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
        )
    directory = scratch_dir()
    _sweep_staging(directory)
    fd, tmp = tempfile.mkstemp(prefix=f"{_STAGING}{os.getpid()}-", suffix=".part", dir=directory)
    os.close(fd)
    return tmp


_STAGING = "dask-imgcurate-"  # local staging files of uploads: dask-imgcurate-<pid>-*.part
_swept: set[str] = set()  # scratch directories swept by this process


def scratch_dir() -> str:
    """Where local scratch files go (uploads staged, remote tars downloaded to be indexed):
    in a Dask worker its local directory (``--local-directory``), else Dask's
    ``temporary-directory`` when set, else ``TMPDIR``."""
    worker = _worker()
    if worker is not None:
        return worker.local_directory
    configured = dask.config.get("temporary-directory", None)
    if not configured:
        return tempfile.gettempdir()
    directory = os.path.expanduser(str(configured))
    os.makedirs(directory, exist_ok=True)
    return directory


def _sweep_staging(directory: str) -> None:
    """Once per process and ``directory``: remove the staging files of processes that no
    longer run (killed while uploading; they never got to remove theirs)."""
    if directory in _swept:
        return
    _swept.add(directory)
    for name in os.listdir(directory):
        pid = name[len(_STAGING) :].split("-", 1)[0]
        if name.startswith(_STAGING) and name.endswith(".part") and pid.isdigit():
            if not _running(int(pid)):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def publish(fs: fsspec.AbstractFileSystem, tmp: str, path: str) -> None:
    """Make the finished local file ``tmp`` (from ``temp_path``) appear as ``path`` in one
    step: a rename locally, one whole upload (retried on transient errors) elsewhere."""
    if is_local(fs):
        os.replace(tmp, path)
        return
    try:
        retry(fs, path, lambda: fs.put_file(tmp, path), action="write")
    finally:
        os.remove(tmp)


@contextlib.contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """Yield a local temporary file name; on success it becomes ``path`` in one step.

    See ``temp_path`` and ``publish``: no partial or temporary object is ever visible
    under ``path``. On error the temporary file is removed and ``path`` is untouched.
    """
    tmp = temp_path(fs, path)
    try:
        yield tmp
        publish(fs, tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

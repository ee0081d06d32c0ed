"""Storage access through fsspec: one code path for local disks and object stores."""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem


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


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@contextlib.contextmanager
def open_buffer(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[bytes | mmap.mmap]:
    """The whole file as a buffer: an ``mmap`` for local files, bytes otherwise."""
    if not is_local(fs):
        yield fs.cat_file(path)
        return
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield mapped
        finally:
            mapped.close()


def read_ranges(
    fs: fsspec.AbstractFileSystem, path: str, offsets: Sequence[int], sizes: Sequence[int]
) -> list[bytes]:
    """Read byte ranges ``[offset, offset + size)`` of one file."""
    if not len(offsets):
        return []
    if is_local(fs):
        with open(path, "rb") as f:
            return [os.pread(f.fileno(), int(n), int(o)) for o, n in zip(offsets, sizes)]
    starts = [int(o) for o in offsets]
    ends = [int(o) + int(n) for o, n in zip(offsets, sizes)]
    return fs.cat_ranges([path] * len(starts), starts, ends)


TEMP_MARK = ".tmp-"


def remove_stale_temps(fs: fsspec.AbstractFileSystem, directory: str) -> int:
    """Delete temporary files that an interrupted ``atomic_write`` left in ``directory``."""
    if not is_local(fs) or not os.path.isdir(directory):
        return 0
    stale = [n for n in os.listdir(directory) if n.startswith(".") and TEMP_MARK in n]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return len(stale)


@contextlib.contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """Yield a local temporary file name; on success it becomes ``path`` in one step.

    Local files are renamed into place (same directory, so the rename is atomic); object
    stores get the finished file in one upload. On error the temporary file is removed and
    ``path`` is untouched.
    """
    if is_local(fs):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(
            directory, f".{os.path.basename(path)}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
        )
    else:
        fd, tmp = tempfile.mkstemp(prefix="dask-imgcurate-", suffix=".part")
        os.close(fd)
    try:
        yield tmp
        if is_local(fs):
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

"""Objects built once per process and key (models, classifier heads), thread-safe."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from dask_imgcurate.io.fs import stat_version

T = TypeVar("T")


class ProcessCache(Generic[T]):
    """A dict whose missing values are built at most once, even with many threads.

    ``version`` (e.g. :func:`file_signature` of the weights a value was built from) is kept
    beside each value: asking with another version builds it again and replaces it, so a
    long-lived process (a worker of an external cluster) never keeps using weights whose
    file was replaced since."""

    def __init__(self) -> None:
        self._items: dict[Hashable, tuple[Hashable, T]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T], version: Hashable = None) -> T:
        entry = self._items.get(key)
        if entry is None or entry[0] != version:
            with self._lock:
                entry = self._items.get(key)
                if entry is None or entry[0] != version:
                    entry = self._items[key] = (version, build())
        return entry[1]

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def file_signature(path: str | None) -> int | tuple | None:
    """``fsio.stat_version`` (size and modification time) of a local file; for a directory,
    the files in it with theirs, by name; None when ``path`` is None or names nothing here."""
    if path is None:
        return None
    try:
        if os.path.isdir(path):
            entries = sorted(os.scandir(path), key=lambda e: e.name)
            return tuple((e.name, stat_version(e.stat())) for e in entries if e.is_file())
        return stat_version(os.stat(path))
    except OSError:
        return None

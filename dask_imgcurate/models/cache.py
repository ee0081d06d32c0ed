"""Objects built once per process and key (models, classifier heads), thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessCache(Generic[T]):
    """A dict whose missing values are built at most once, even with many threads."""

    def __init__(self) -> None:
        self._items: dict[Hashable, T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        item = self._items.get(key)
        if item is None:
            with self._lock:
                item = self._items.get(key)
                if item is None:
                    item = self._items[key] = build()
        return item

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

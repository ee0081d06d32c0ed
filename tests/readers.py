"""Independent readers for test assertions (standard library only, never our own code)."""

from __future__ import annotations

import tarfile
from pathlib import Path


def tar_records(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """``[(key, {extension: bytes})]`` in tar order, read with the stdlib ``tarfile``."""
    records: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, _, ext = member.name.partition(".")
            if not records or records[-1][0] != key:
                records.append((key, {}))
            records[-1][1][ext] = tf.extractfile(member).read()
    return records

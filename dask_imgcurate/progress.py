"""Compute dask tasks with a progress bar, on a local scheduler or a distributed client."""

from __future__ import annotations

from collections.abc import Sequence

import dask


def _client():
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def compute_with_progress(tasks: Sequence, verbose: bool, label: str) -> list:
    """``dask.compute(*tasks)``, showing progress when ``verbose``."""
    if not verbose:
        return list(dask.compute(*tasks))
    client = _client()
    if client is not None:
        from distributed import progress

        futures = client.compute(list(tasks))
        progress(futures)
        return client.gather(futures)
    from dask.diagnostics import ProgressBar

    print(f"{label}:", flush=True)
    with ProgressBar():
        return list(dask.compute(*tasks))

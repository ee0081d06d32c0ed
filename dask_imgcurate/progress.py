"""Compute dask tasks with a progress bar, on a local scheduler or a distributed client."""

from __future__ import annotations

from collections.abc import Sequence

import dask


def current_client():
    """The ``distributed`` client dask computes on now, or None (a local scheduler, also
    when ``dask.config`` names one while a client exists)."""
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        return None
    return client if dask.base.get_scheduler() == client.get else None


def compute_with_progress(tasks: Sequence, verbose: bool, label: str) -> list:
    """``dask.compute(*tasks)``, showing progress when ``verbose``."""
    if not verbose:
        return list(dask.compute(*tasks))
    client = current_client()
    if client is not None:
        from distributed import progress

        futures = client.compute(list(tasks))
        progress(futures)
        return client.gather(futures)
    from dask.diagnostics import ProgressBar

    print(f"{label}:", flush=True)
    with ProgressBar():
        return list(dask.compute(*tasks))

"""Compute dask tasks with a progress bar, on a local scheduler or a distributed client."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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
    """``dask.compute(*tasks)``, showing progress when ``verbose``. Without graph
    optimisation: for delayed tasks it is culling only, which nothing here needs and whose
    cost over a layer per task (many shards) grew faster than the number of tasks."""
    if not verbose:
        return list(dask.compute(*tasks, optimize_graph=False))
    client = current_client()
    if client is not None:
        from distributed import progress

        futures = client.compute(list(tasks), optimize_graph=False)
        progress(futures)
        return client.gather(futures)
    from dask.diagnostics import ProgressBar

    print(f"{label}:", flush=True)
    with ProgressBar():
        return list(dask.compute(*tasks, optimize_graph=False))


@contextlib.contextmanager
def nested_column_shuffles() -> Iterator[None]:
    """Compute a sorted or shuffled metadata frame on a cluster: dask's default there, the
    P2P shuffle, fails on nested Arrow columns (``_members``, embeddings: pyarrow cannot
    read back their pandas dtype names), so unless the user chose a method, use "tasks"."""
    if dask.config.get("dataframe.shuffle.method", None) is not None:
        yield
        return
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        yield

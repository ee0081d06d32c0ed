"""Choose where Dask computes: an existing cluster, a local GPU cluster, or local processes."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator

from dask_imgcurate.backend import gpu_available

log = logging.getLogger(__name__)


def cluster_kind(scheduler_address: str | None = None, n_workers: int | None = None) -> str:
    """``"existing"``, ``"local-cuda"`` (GPUs + dask-cuda), ``"local"`` or ``"none"``."""
    if scheduler_address:
        return "existing"
    if importlib.util.find_spec("dask_cuda") is not None and gpu_available():
        return "local-cuda"
    if n_workers == 0:
        return "none"  # the caller's default scheduler (threads), no cluster
    return "local"


@contextlib.contextmanager
def dask_client(
    scheduler_address: str | None = None, n_workers: int | None = None
) -> Iterator[object | None]:
    """A ``distributed.Client`` for the chosen cluster (``None`` for ``n_workers=0``).

    ``scheduler_address`` connects to a running ``dask-scheduler`` (with ``dask-cuda-worker``
    or ``dask-worker`` processes); otherwise a ``LocalCUDACluster`` is started when GPUs and
    dask-cuda are present, else a ``LocalCluster`` of ``n_workers`` single-threaded processes.
    """
    kind = cluster_kind(scheduler_address, n_workers)
    if kind == "none":
        yield None
        return
    from distributed import Client, LocalCluster

    if kind == "existing":
        with Client(scheduler_address) as client:
            log.info("connected to %s", scheduler_address)
            yield client
        return
    if kind == "local-cuda":
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(n_workers=n_workers, dashboard_address=None)
    else:
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    with cluster, Client(cluster) as client:
        log.info("started %s with %d workers", type(cluster).__name__, len(cluster.workers))
        yield client

"""Choose where Dask computes: an existing cluster, a local GPU cluster, or local processes."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import dask

log = logging.getLogger(__name__)

#: Messages of ``RandomWeightsWarning`` (``dask_imgcurate.models.clip``) start like this.
RANDOM_WEIGHTS_MESSAGE = r"open_clip model .* has random weights"


def default_n_workers() -> str:
    """How many workers a local cluster gets when ``n_workers`` is None (for help texts)."""
    return (
        f"one per GPU with dask-cuda, one with GPUs but no dask-cuda, else one per CPU core "
        f"({os.cpu_count() or 1} here)"
    )


def cluster_kind(scheduler_address: str | None = None, n_workers: int | None = None) -> str:
    """``"existing"``, ``"none"`` (``n_workers=0``), ``"local-cuda"`` (GPUs + dask-cuda) or
    ``"local"``."""
    if scheduler_address:
        return "existing"
    if n_workers == 0:
        return "none"  # the caller's default scheduler (threads), no cluster
    if n_workers is not None and n_workers < 0:
        raise ValueError(f"n_workers must be >= 0, got {n_workers}")
    if importlib.util.find_spec("dask_cuda") is not None:
        from dask_imgcurate.backend import gpu_available

        if gpu_available():
            return "local-cuda"
    return "local"


class OpenClipNotices(logging.Filter):
    """Drops open_clip's informational messages (it logs on the root logger), e.g. "No
    pretrained weights loaded"; its errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return record.levelno >= logging.ERROR or "/open_clip/" not in path


def quiet_third_party(verbose: bool = False) -> Callable[[], None]:
    """Keep third-party chatter off stderr in this process; return a function undoing it.

    Always: repeats of the random-weights warning (the CLI says it once). Unless
    ``verbose``: open_clip's root-logger notices ("No pretrained weights loaded"),
    distributed's logs below ERROR (INFO and WARNING with ``verbose``), asyncio's
    (after Ctrl-C every pending gather logs "Task exception was never retrieved"), and
    huggingface_hub's / urllib3's retry warnings (a download's failure is our one error).
    """
    filters = list(warnings.filters)
    warnings.filterwarnings("ignore", message=RANDOM_WEIGHTS_MESSAGE)
    root = logging.getLogger()
    added = None
    if not verbose and not any(isinstance(f, OpenClipNotices) for f in root.filters):
        added = OpenClipNotices()
        root.addFilter(added)
    # huggingface_hub resets its logger's level when its logging module is first imported
    # (by open_clip's download, after this): it reads HF_HUB_VERBOSITY then
    verbosity = os.environ.get("HF_HUB_VERBOSITY")
    if not verbose and verbosity is None:
        os.environ["HF_HUB_VERBOSITY"] = "error"
    levels = {}
    for name, level in (
        ("distributed", logging.WARNING if verbose else logging.ERROR),
        ("asyncio", logging.NOTSET if verbose else logging.CRITICAL),
        # offline, a weights download logs every retry (for about a minute) before failing
        ("huggingface_hub", logging.NOTSET if verbose else logging.ERROR),
        ("urllib3", logging.NOTSET if verbose else logging.ERROR),
    ):
        levels[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(level)

    def undo() -> None:
        warnings.filters[:] = filters
        if not verbose and verbosity is None:
            os.environ.pop("HF_HUB_VERBOSITY", None)
        if added is not None:
            root.removeFilter(added)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

    return undo


try:  # the plugin base class is optional: distributed may be missing with n_workers=0
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPluginBase = object


class QuietWorkers(_WorkerPluginBase):
    """Worker plugin: :func:`quiet_third_party` in every worker process of a local cluster
    (their stderr is ours), so each warning is shown once, by the client."""

    name = "dask-imgcurate-quiet"

    def setup(self, worker) -> None:
        quiet_third_party(verbose=False)
        # a failing task is reported once, by the client
        logging.getLogger("distributed").setLevel(logging.CRITICAL)


class IgnoreSigint(_WorkerPluginBase):
    """Worker plugin: the worker process ignores SIGINT, as those a local cluster starts do
    (``_workers_ignore_sigint``); also a worker its nanny restarts, which would not inherit
    it. Ctrl-C in a terminal reaches the whole process group: the client closes the
    cluster."""

    name = "dask-imgcurate-ignore-sigint"

    def setup(self, worker) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def describe(client) -> str:
    """A short description of the client's cluster for summaries (``"none (threads)"``)."""
    if client is None:
        return "none (threads in this process)"
    cluster = getattr(client, "cluster", None)
    workers = len(client.nthreads())
    name = type(cluster).__name__ if cluster is not None else "existing cluster"
    return f"{name} at {client.scheduler.address} ({workers} worker{'' if workers == 1 else 's'})"


def _fast_exit() -> dict:
    """Dask config starting local workers with ``forkserver`` where available.

    A worker started with ``spawn`` (distributed's default) runs the full interpreter
    shutdown when it closes, which takes seconds once torch and torchvision are imported;
    the nanny then waits 4 s and kills it. ``forkserver`` children leave with ``os._exit``
    at once. Nothing else differs: the fork server itself is a fresh interpreter.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        return {"distributed.worker.multiprocessing-method": "forkserver"}
    return {}


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Worker processes started within ignore SIGINT (they inherit it): a terminal's Ctrl-C,
    sent to the whole process group, then interrupts only this process, which closes the
    cluster, instead of also killing every worker with a traceback of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _forkserver_ignoring_sigint() -> bool:
    """Start multiprocessing's fork server (with distributed's preloads) while SIGINT is
    ignored, unless it runs already: each worker it forks restores the handlers the server
    started with, so it ignores SIGINT too, and Ctrl-C is ignored here only for the
    milliseconds the server takes to be spawned, not for the cluster's whole start. False
    where local workers are not forked by it."""
    if dask.config.get("distributed.worker.multiprocessing-method") != "forkserver":
        return False
    from multiprocessing import forkserver

    from distributed.utils import get_mp_context

    get_mp_context()  # its preloads, set before the server starts
    # it starts the resource tracker too: with a Ctrl-C during the cluster's start (this
    # process then leaves at once) that would warn of "leaked semaphore objects" it cleans up
    quiet_tracker = "ignore::UserWarning:multiprocessing.resource_tracker"
    sys.warnoptions.append(quiet_tracker)  # the -W options its command line gets
    try:
        with _workers_ignore_sigint():
            forkserver.ensure_running()
    finally:
        sys.warnoptions.remove(quiet_tracker)
    return True


def local_workers(kind: str, n_workers: int | None, gpus: int) -> tuple[int | None, str]:
    """How many workers a local cluster of ``kind`` gets on a machine with ``gpus`` GPUs
    (None: the cluster's default), and a warning ("" for none). dask-cuda runs one worker
    per GPU and refuses more; without it every worker process would load its models on the
    same GPU 0."""
    if kind == "local-cuda" and n_workers is not None and n_workers > gpus:
        return gpus, (
            f"{n_workers} workers asked for, {gpus} GPU{'' if gpus == 1 else 's'} here: "
            f"{gpus} worker{'' if gpus == 1 else 's'} (one per GPU)"
        )
    if kind == "local" and gpus:
        advice = "install dask-cuda (the gpu extra) for one worker per GPU"
        if n_workers is None:
            return 1, f"GPUs but no dask-cuda: one worker process, on GPU 0; {advice}"
        if n_workers > 1:
            return n_workers, f"GPUs but no dask-cuda: all {n_workers} workers use GPU 0; {advice}"
    return n_workers, ""


def _gpu_count() -> int:
    """CUDA devices torch sees (0 without NVIDIA's driver, without importing torch)."""
    if not os.path.exists("/dev/nvidiactl"):
        return 0
    from dask_imgcurate.backend import gpu_available

    if not gpu_available():
        return 0
    import torch

    return torch.cuda.device_count()


@contextlib.contextmanager
def dask_client(
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    *,
    quiet: bool = False,
) -> Iterator[object | None]:
    """A ``distributed.Client`` for the chosen cluster (``None`` for ``n_workers=0``).

    ``scheduler_address`` connects to a running ``dask-scheduler`` (with ``dask-cuda-worker``
    or ``dask-worker`` processes); otherwise a ``LocalCUDACluster`` is started when GPUs and
    dask-cuda are present (``n_workers`` GPUs, default all; more are capped, with a warning),
    else a ``LocalCluster`` of ``n_workers`` single-threaded processes (default: one per
    core; one, with a warning, where GPUs are seen without dask-cuda), whose workers ignore
    SIGINT (Ctrl-C stops this process, which closes them). ``quiet`` keeps the
    local workers' logs and warnings off stderr (their stderr is this process's; the caller
    reports errors and says once what needs saying).
    The dashboard of a local cluster listens on a free port (logged at INFO).
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
    silence = logging.CRITICAL if quiet else logging.WARNING
    n_workers, advice = local_workers(kind, n_workers, _gpu_count())
    if advice:
        warnings.warn(advice, stacklevel=3)  # the caller of the ``with``
    if kind == "local-cuda":
        from dask_cuda import LocalCUDACluster

        with _workers_ignore_sigint():
            cluster = LocalCUDACluster(
                n_workers=n_workers, dashboard_address=":0", silence_logs=silence
            )
    else:
        with dask.config.set(_fast_exit()):
            forked = _forkserver_ignoring_sigint()
            with contextlib.nullcontext() if forked else _workers_ignore_sigint():
                cluster = LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                    silence_logs=silence,
                )
    with cluster, Client(cluster) as client:
        client.register_plugin(IgnoreSigint())
        if quiet:
            client.register_plugin(QuietWorkers())
        log.info(
            "started %s with %d workers; dashboard %s",
            type(cluster).__name__,
            len(cluster.workers),
            cluster.dashboard_link,
        )
        yield client

"""Progress of long work, on a local scheduler or a distributed client: a bar over the
partitions tasks report (``PartitionProgress`` + ``tick``) and ``compute_with_progress``."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import dask
import dask.multiprocessing

from dask_imgcurate.errors import WorkersKilled

_LOCAL_BARS: dict[str, Callable[[int, int], None]] = {}  # topic -> update, tasks run here


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
        futures = client.compute(list(tasks), optimize_graph=False)
        show_progress(futures, label)
        return client.gather(futures)
    from dask.diagnostics import ProgressBar

    print(f"{label}:", file=sys.stderr, flush=True)
    with ProgressBar(out=sys.stderr):
        return list(dask.compute(*tasks, optimize_graph=False))


def show_progress(futures: Sequence, label: str) -> None:
    """``distributed.progress`` of ``futures`` under ``label``, on stderr like every other
    bar here (its text bar writes to stdout: redirected while it runs), until they finish."""
    from distributed import progress

    print(f"{label}:", file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):
        progress(futures)


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


READING = "dask-imgcurate-reading"
"""Topic of the workers' events ``(repr(task key), tars)``, sent as a task starts reading
tars: a task that killed every worker that ran it is then named by them."""


def _worker():
    """The ``distributed`` worker running this code, or None."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not in a distributed worker
        return None


def note_reading(tars: Sequence[str]) -> None:
    """In a distributed worker: tell the scheduler that the running task reads ``tars``."""
    worker = _worker()
    if worker is not None:
        worker.log_event(READING, (repr(worker.get_current_task()), list(tars)))


@contextlib.contextmanager
def naming_killed_tasks() -> Iterator[None]:
    """Raise distributed's ``KilledWorker`` (every worker that ran a task died) as
    ``WorkersKilled`` naming the tars that task read (``note_reading``), when it read any."""
    try:
        yield
    except Exception as err:
        if type(err).__name__ != "KilledWorker":
            raise
        tars = _tars_read_by(err.task)
        if not tars:
            raise
        tried = err.allowed_failures + 1
        raise WorkersKilled(
            f"{', '.join(tars)}: every worker that ran the task reading "
            f"{'it' if len(tars) == 1 else 'them'} died ({tried} worker"
            f"{'' if tried == 1 else 's'}, the last {err.last_worker.address}): out of "
            f"memory, or a crash in native code such as an image decoder? See the workers' "
            f"logs"
        ) from err


def _tars_read_by(key) -> list[str]:
    """The tars the task ``key`` read, as its workers reported them (none if unknown)."""
    try:
        from distributed import get_client

        events = get_client().get_events(READING)
    except Exception:  # no client, or it lost its scheduler
        return []
    for _, (task, tars) in reversed(events):
        if task == repr(key):
            return list(tars)
    return []


def tick(topic: str | None, partition: int, records: int) -> None:
    """Called by a task when it has done ``partition`` (``records`` rows): advances the
    ``PartitionProgress`` of ``topic`` (distributed's events from a worker; a callback in
    this process on local schedulers). Nothing when ``topic`` is None."""
    if topic is None:
        return
    worker = _worker()
    if worker is not None:
        worker.log_event(topic, (partition, records))
        return
    update = _LOCAL_BARS.get(topic)
    if update is not None:
        update(partition, records)


class PartitionProgress:
    """A progress bar (stderr) over ``total`` partitions, advanced by tasks calling
    ``tick(progress.topic, partition, rows)``; shows the records done too, each partition
    counted once (a task run again after a worker died ticks again). Use as a context around
    the compute. Disabled: ``topic`` is None and nothing is shown. Under the multiprocessing
    scheduler (tasks in other processes, which cannot call back) dask's task progress bar
    is shown instead."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total = label, total
        self.topic = f"dask-imgcurate-progress-{uuid.uuid4().hex}" if enabled else None
        self.records = 0
        self._done: set[int] = set()
        self._bar = self._client = self._tasks = None
        self._lock = threading.Lock()

    def __enter__(self) -> PartitionProgress:
        if self.topic is None or self._bar is not None or self._tasks is not None:
            return self
        if dask.base.get_scheduler() is dask.multiprocessing.get:
            from dask.diagnostics import ProgressBar

            print(f"{self.label}:", file=sys.stderr, flush=True)
            self._tasks = ProgressBar(out=sys.stderr)
            self._tasks.__enter__()
            return self
        from tqdm import tqdm

        self._bar = tqdm(total=self.total, desc=self.label, unit="partition", file=sys.stderr)
        _LOCAL_BARS[self.topic] = self._update
        self._client = current_client()
        if self._client is not None:
            self._client.subscribe_topic(self.topic, lambda event: self._update(*event[1]))
        return self

    def _update(self, partition: int, records: int) -> None:
        with self._lock:  # threaded scheduler: tasks tick from several threads
            if self._bar is None or partition in self._done:  # closed, or a rerun
                return
            self._done.add(partition)
            self.records += records
            self._bar.set_postfix_str(f"records={self.records}", refresh=False)
            self._bar.update(1)

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    def close(self, failed: bool = False) -> None:
        """Stop showing (again: nothing); unless ``failed``, first wait a moment for the
        workers' last reports."""
        if self._tasks is not None:
            self._tasks.__exit__(None, None, None)
            self._tasks = None
        if self._bar is None:
            return
        _LOCAL_BARS.pop(self.topic, None)
        if self._client is not None:
            if not failed:  # the workers' last events may still be on their way
                deadline = time.monotonic() + 2.0
                while len(self._done) < self.total and time.monotonic() < deadline:
                    time.sleep(0.01)
            with contextlib.suppress(Exception):  # a client closed meanwhile
                self._client.unsubscribe_topic(self.topic)
            # unsubscribe_topic only tells the scheduler: drop the client's handler too
            getattr(self._client, "_event_handlers", {}).pop(self.topic, None)
        with self._lock:
            bar, self._bar = self._bar, None
        bar.close()

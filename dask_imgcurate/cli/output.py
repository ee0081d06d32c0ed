"""Errors, exit codes, signals and logging of ``dask-imgcurate``; its summary tables."""

# Every command prints a summary table on stdout and exits 0 on success. Bad input (a path
# that does not exist, no shards, a bad config, missing weights, a corrupt shard) prints one
# line ``error: ...`` on stderr, writes nothing and exits 1 (``-v`` shows the traceback
# instead). Ctrl-C exits 130 and SIGTERM 143; an interrupted export is finished by running
# the same command again. Progress bars go to stderr when it is a terminal (or with ``-v``).

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

import click

from dask_imgcurate.cluster import quiet_third_party
from dask_imgcurate.errors import CurateError

log = logging.getLogger("dask_imgcurate")

# Errors that are the user's input (or environment), not our bug: one line, exit 1.
_USER_ERRORS = (CurateError, OSError, ValueError, KeyError, TypeError, ImportError)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


_RESUME = "every file under its final name is complete; run the same command again to finish"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that clusters and files are closed cleanly."""


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(message).split()) or type(err).__name__


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _on_sigterm(signum, frame):
    raise _Terminated()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {' '.join(str(message).split())}\n"


class _Group(click.Group):
    """Turns user errors into one line on stderr, and interrupts into exit codes."""

    def invoke(self, ctx):
        verbose = bool(ctx.params.get("verbose"))
        format_warning = warnings.formatwarning
        warnings.formatwarning = _one_line_warning
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            with warnings.catch_warnings():
                return super().invoke(ctx)
        except _Terminated:
            _fail(f"terminated: {_RESUME}", EXIT_TERMINATED)
        except KeyboardInterrupt:
            _fail(f"interrupted: {_RESUME}", EXIT_INTERRUPTED)
        except BrokenPipeError:  # stdout closed early (`| head`): nothing worth saying
            with contextlib.suppress(Exception):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_ERROR)
        except _USER_ERRORS as err:
            if verbose:
                raise
            _fail(f"error: {_one_line(err)}", EXIT_ERROR)
        except Exception as err:
            if verbose or type(err).__name__ != "KilledWorker":
                raise
            _fail(f"error: {_one_line(err)} (out of memory? see -v)", EXIT_ERROR)
        finally:
            warnings.formatwarning = format_warning
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


class _StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is at the time."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: bool) -> Callable[[], None]:
    """Our log lines on stderr (INFO with ``verbose``, else WARNING), third parties quiet;
    returns a function restoring the previous state (for in-process use, e.g. tests)."""
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    previous = root.level
    handler = _StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    undo_quiet = quiet_third_party(verbose)

    def restore() -> None:
        undo_quiet()
        root.removeHandler(handler)
        root.setLevel(previous)

    return restore


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


def _show_progress() -> bool:
    """Progress bars (on stderr): with ``-v``, or when stderr is a terminal."""
    return _verbose() or sys.stderr.isatty()


def _table(rows: dict) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        click.echo(f"{key:<{width}}  {value}")


def _summary_table(summary, cluster: str | None = None, total: float | None = None) -> None:
    """The export's summary; ``total``: seconds of the whole command, when it did more work
    before the export (the demo scores and saves first)."""
    rows = {
        "records in": summary.records_in,
        "records out": summary.records_out,
        "dropped by filter": summary.dropped_by_filter,
        "dropped for errors": summary.dropped_for_errors,
        "shards written": summary.shards_written,
        "shards already complete": summary.shards_skipped,
        "bytes written": f"{summary.bytes_written / 1e6:.1f} MB",
        "export seconds": f"{summary.seconds:.1f}",
        "output": summary.path,
    }
    if total is not None:
        rows["total seconds"] = f"{total:.1f}"
    if summary.other_files:
        rows["other shard files there"] = f"{len(summary.other_files)} (not from this export)"
    if cluster is not None:
        rows["cluster"] = cluster
    _table(rows)

"""What the scripts share: bad input is one line on stderr, as with ``dask-imgcurate``.

The scripts import this as ``_common``: Python puts a script's own directory on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from dask_imgcurate.errors import CurateError

# The user's input or environment, not a bug. open_clip reports a model name or checkpoint
# it does not know as a RuntimeError.
USER_ERRORS = (CurateError, OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError)


@contextlib.contextmanager
def reported_errors(verbose: bool = False):
    """Turn a user error into ``error: ...`` on stderr and exit 1 (``verbose``: raise it, for
    the traceback), and Ctrl-C into exit 130."""
    if not verbose:  # after Ctrl-C, distributed's pending gathers log "Task exception ..."
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as err:
        if verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {' '.join(str(message).split()) or type(err).__name__}", file=sys.stderr)
        raise SystemExit(1) from None


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (otherwise a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value

"""``dask-imgcurate``: index, inspect, embed, export, curate, demo."""

from __future__ import annotations

import os
import sys
from importlib import import_module
from typing import TYPE_CHECKING

_LAZY = {
    "CurateConfig": "dask_imgcurate.cli.config",
    "main": "dask_imgcurate.cli.commands",
    "run_curate": "dask_imgcurate.cli.work",
}

if TYPE_CHECKING:
    from dask_imgcurate.cli.commands import main
    from dask_imgcurate.cli.config import CurateConfig
    from dask_imgcurate.cli.work import run_curate


def run(prog_name: str = "dask-imgcurate") -> None:
    """The console entry point (``commands.run``); a Ctrl-C while the command line's
    modules load (a second or so) exits 130 with one line too, not a traceback."""
    try:
        from dask_imgcurate.cli.commands import run as run_command
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)  # 128 + SIGINT, as the command's own interruptions exit
    run_command(prog_name)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dask_imgcurate.cli' has no attribute {name!r}")


__all__ = ["CurateConfig", "main", "run", "run_curate"]

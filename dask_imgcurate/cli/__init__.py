"""``dask-imgcurate``: index, inspect, embed, export, curate, demo."""

from dask_imgcurate.cli.commands import main, run
from dask_imgcurate.cli.config import CurateConfig
from dask_imgcurate.cli.work import run_curate

__all__ = ["CurateConfig", "main", "run", "run_curate"]

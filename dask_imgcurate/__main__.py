"""``python -m dask_imgcurate``: the ``dask-imgcurate`` command line."""

from dask_imgcurate.cli import run

run()

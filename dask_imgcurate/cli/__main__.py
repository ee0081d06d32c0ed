"""``python -m dask_imgcurate.cli``: the ``dask-imgcurate`` command line."""

from dask_imgcurate.cli import run

run()

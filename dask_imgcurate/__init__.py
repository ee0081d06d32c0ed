"""dask_imgcurate: curate image-text WebDataset shards with Dask."""

from dask_imgcurate.dataset import ImageTextPairDataset
from dask_imgcurate.io import write_dali_index

__all__ = ["ImageTextPairDataset", "write_dali_index"]
__version__ = "0.1.0"

"""dask_imgcurate: curate image-text WebDataset shards with Dask."""

from __future__ import annotations

from importlib import import_module

from dask_imgcurate.dataset import ImageTextPairDataset
from dask_imgcurate.export import ExportSummary
from dask_imgcurate.io import write_dali_index

__version__ = "0.1.0"

# Compute classes import torch, DALI and open_clip: load them on first use.
_LAZY = {
    "ClipImageEmbedder": "dask_imgcurate.embed",
    "AestheticClassifier": "dask_imgcurate.models.classifiers",
    "NsfwClassifier": "dask_imgcurate.models.classifiers",
    "Pipeline": "dask_imgcurate.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dask_imgcurate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AestheticClassifier",
    "ClipImageEmbedder",
    "ExportSummary",
    "ImageTextPairDataset",
    "NsfwClassifier",
    "Pipeline",
    "write_dali_index",
]

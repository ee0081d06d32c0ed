"""dask_imgcurate: curate image-text WebDataset shards with Dask."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Loaded on first use: importing the package stays instant (the command line catches a
# Ctrl-C from its first milliseconds), and torch, DALI and open_clip load only when needed.
_LAZY = {
    "AestheticClassifier": "dask_imgcurate.models.classifiers",
    "ClipImageEmbedder": "dask_imgcurate.embed",
    "ExportSummary": "dask_imgcurate.export",
    "ImageTextPairDataset": "dask_imgcurate.dataset",
    "NsfwClassifier": "dask_imgcurate.models.classifiers",
    "Pipeline": "dask_imgcurate.pipeline",
    "write_dali_index": "dask_imgcurate.io",
}

if TYPE_CHECKING:
    from dask_imgcurate.dataset import ImageTextPairDataset
    from dask_imgcurate.embed import ClipImageEmbedder
    from dask_imgcurate.export import ExportSummary
    from dask_imgcurate.io import write_dali_index
    from dask_imgcurate.models.classifiers import AestheticClassifier, NsfwClassifier
    from dask_imgcurate.pipeline import Pipeline


# ``dask_imgcurate.errors`` etc. after a bare ``import dask_imgcurate``
_SUBMODULES = {
    "backend",
    "cli",
    "cluster",
    "dataset",
    "demo",
    "device",
    "embed",
    "errors",
    "export",
    "io",
    "metadata",
    "models",
    "pipeline",
    "progress",
    "stages",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'dask_imgcurate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    "AestheticClassifier",
    "ClipImageEmbedder",
    "ExportSummary",
    "ImageTextPairDataset",
    "NsfwClassifier",
    "Pipeline",
    "write_dali_index",
]

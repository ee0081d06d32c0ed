"""Models: open_clip image encoders and score heads on their embeddings."""

from dask_imgcurate.models.classifiers import (
    AESTHETIC_URL,
    NSFW_URL,
    AestheticClassifier,
    EmbeddingClassifier,
    NsfwClassifier,
)
from dask_imgcurate.models.clip import ClipModel, RandomWeightsWarning, load_clip

__all__ = [
    "AESTHETIC_URL",
    "NSFW_URL",
    "AestheticClassifier",
    "ClipModel",
    "EmbeddingClassifier",
    "NsfwClassifier",
    "RandomWeightsWarning",
    "load_clip",
]

"""A tiny open_clip config shipped with the package, for the offline demo and tests.

With random weights its embeddings and scores are meaningless: it exists so that the whole
pipeline can run anywhere without downloading weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

TINY_MODEL = "dask-imgcurate-tiny"
_registered = False
_lock = threading.Lock()


def register_builtin_configs() -> None:
    """Make the package's model configs known to open_clip (once per process)."""
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            import open_clip

            open_clip.add_model_config(Path(str(files("dask_imgcurate.models") / "configs")))
            _registered = True


@dataclass(frozen=True)
class DemoModels:
    clip_model: str
    embedding_dim: int
    aesthetic: Path
    nsfw: Path


def make_demo_models(directory: str | Path, seed: int = 0) -> DemoModels:
    """Random-weight aesthetic and NSFW heads for the tiny model, saved under ``directory``."""
    import torch

    from dask_imgcurate.models.classifiers import AestheticMLP, NsfwMLP
    from dask_imgcurate.models.clip import clip_embed_dim

    register_builtin_configs()
    dim = clip_embed_dim(TINY_MODEL)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, head_type in (("aesthetic", AestheticMLP), ("nsfw", NsfwMLP)):
        torch.manual_seed(seed)
        paths[name] = directory / f"{name}-random-{dim}d.pt"
        torch.save(head_type(dim).state_dict(), paths[name])
    return DemoModels(TINY_MODEL, dim, paths["aesthetic"], paths["nsfw"])

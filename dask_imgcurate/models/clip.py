"""open_clip image encoders, loaded once per process.

Models are cached in a module-level dict keyed by ``(model_name, pretrained, device,
precision)``, so every task in a Dask worker process shares one copy (built again when a
local checkpoint file changes: its size or modification time).

``pretrained`` is an open_clip tag (e.g. ``"openai"``; open_clip downloads the weights on
first use), a local checkpoint path, or ``None`` for random weights (a
:class:`RandomWeightsWarning` says the resulting scores are meaningless; the weights come
from a fixed seed, so every worker process builds the same model). Model names are
open_clip's (``"ViT-L-14"``) or ``"local-dir:/path"`` / ``"hf-hub:org/repo"`` schemas.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dask_imgcurate.device import resolve_device
from dask_imgcurate.errors import RandomWeightsWarning  # noqa: F401 (its old home)
from dask_imgcurate.io.preprocess import PreprocessSpec
from dask_imgcurate.models.builtin import register_builtin_configs
from dask_imgcurate.models.cache import ProcessCache, file_signature

RANDOM_WEIGHTS_SEED = 0
"""Seed for models built with ``pretrained=None``, identical in every process."""


@dataclass
class ClipModel:
    """A loaded open_clip model with what the pipeline needs to feed it."""

    model: torch.nn.Module
    preprocess: PreprocessSpec
    transform: Callable[[Any], torch.Tensor]  # open_clip's own eval transform (PIL -> tensor)
    embed_dim: int
    device: torch.device
    precision: str
    key: tuple[str, str | None, str, str]

    @torch.inference_mode()
    def encode_images(
        self, images: torch.Tensor, normalize: bool = True, autocast: bool = True
    ) -> torch.Tensor:
        """Embed preprocessed images ``(N, 3, H, W)``; float32 ``(N, embed_dim)`` on the model device.

        ``autocast`` runs the model under CUDA autocast (fp16) on GPUs; it is ignored on CPU.
        """
        if images.shape[0] == 0:
            return torch.empty((0, self.embed_dim), dtype=torch.float32, device=self.device)
        images = images.to(self.device, non_blocking=True)
        use_autocast = autocast and self.device.type == "cuda" and self.precision == "fp32"
        ctx = (
            torch.autocast(device_type="cuda", dtype=torch.float16)
            if use_autocast
            else contextlib.nullcontext()
        )
        with ctx:
            if self.precision in ("fp16", "pure_fp16"):
                images = images.half()
            elif self.precision in ("bf16", "pure_bf16"):
                images = images.bfloat16()
            features = self.model.encode_image(images)
        features = features.float()
        if normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features


_CACHE: ProcessCache[ClipModel] = ProcessCache()
_LOADS = 0


def _cache_key(
    model_name: str, pretrained: str | None, device: torch.device, precision: str
) -> tuple[str, str | None, str, str]:
    if pretrained is not None and os.path.isfile(pretrained):
        pretrained = os.path.abspath(pretrained)
    return (model_name, pretrained, str(device), precision)


_LOCAL_DIR = "local-dir:"


def resolve_local_paths(model_name: str, pretrained: str | None) -> tuple[str, str | None]:
    """``model_name`` and ``pretrained`` with a relative local checkpoint file or
    ``local-dir:`` directory made absolute, here (on the client): the workers of a cluster
    may run in another current directory, where a relative path names another file or none.
    A ``pretrained`` that is an open_clip tag of the model stays a tag (open_clip prefers
    the tag to a file of that name)."""
    if model_name.startswith(_LOCAL_DIR):
        directory = model_name[len(_LOCAL_DIR) :]
        if directory and os.path.isdir(directory):
            model_name = _LOCAL_DIR + os.path.abspath(directory)
    if isinstance(pretrained, str) and os.path.isfile(pretrained):
        if not _is_pretrained_tag(model_name, pretrained):
            pretrained = os.path.abspath(pretrained)
    return model_name, pretrained


def _is_pretrained_tag(model_name: str, pretrained: str) -> bool:
    try:
        import open_clip

        return bool(open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained))
    except Exception:  # noqa: BLE001 - a schema name (hf-hub:) or an open_clip change
        return False


def _weights_signature(model_name: str, pretrained: str | None) -> tuple:
    """Sizes and modification times of the local files the model is built from: a cached
    model is built again when they changed (a long-lived worker, weights replaced)."""
    local_dir = model_name[len(_LOCAL_DIR) :] if model_name.startswith(_LOCAL_DIR) else None
    checkpoint = pretrained if pretrained is not None and os.path.isfile(pretrained) else None
    return (file_signature(local_dir), file_signature(checkpoint))


def load_clip(
    model_name: str = "ViT-L-14",
    pretrained: str | None = "openai",
    device: str | torch.device = "auto",
    precision: str = "fp32",
    *,
    warn_random: bool = True,
) -> ClipModel:
    """The open_clip model for these arguments, loaded on first call in this process.
    ``warn_random``: warn of random weights (``pretrained=None``) when loading."""
    dev = resolve_device(device)
    key = _cache_key(model_name, pretrained, dev, precision)
    return _CACHE.get(
        key,
        lambda: _load(model_name, pretrained, dev, precision, key, warn_random),
        version=_weights_signature(model_name, pretrained),
    )


def has_random_weights(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip builds this model with random weights."""
    return pretrained is None and not model_name.startswith(("hf-hub:", "local-dir:"))


def warn_random_weights(model_name: str, stacklevel: int) -> None:
    """The ``RandomWeightsWarning`` for ``model_name`` (``stacklevel`` as in
    ``warnings.warn``, counted from the caller of this function)."""
    warnings.warn(
        f"open_clip model {model_name!r} has random weights (pretrained=None): "
        "its embeddings and any scores computed from them are meaningless",
        RandomWeightsWarning,
        stacklevel=stacklevel + 1,
    )


def _machine_failure(err: BaseException) -> bool:
    """Out of memory (host or device): no fault of the checkpoint file."""
    return isinstance(err, MemoryError) or "out of memory" in str(err).lower()


def _load(
    model_name: str,
    pretrained: str | None,
    device: torch.device,
    precision: str,
    key: tuple[str, str | None, str, str],
    warn_random: bool,
) -> ClipModel:
    global _LOADS
    import open_clip

    from dask_imgcurate.cluster import OpenClipNotices

    register_builtin_configs()  # worker processes need the package's configs too
    random = has_random_weights(model_name, pretrained)
    if random and warn_random:
        warn_random_weights(model_name, stacklevel=5)  # the caller of load_clip
    notices = OpenClipNotices() if random else None  # its "No pretrained weights loaded"
    if notices is not None:  # says what the warning says
        logging.getLogger().addFilter(notices)
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as undo:
        if notices is not None:
            undo.callback(logging.getLogger().removeFilter, notices)
        # random weights are seeded: every worker process builds the same model
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, precision=precision
            )
        except Exception as err:  # noqa: BLE001 - a file that is no checkpoint fails anyhow
            if pretrained is None or not os.path.isfile(pretrained) or _machine_failure(err):
                raise
            detail = " ".join(str(err).split())
            detail = detail[:200] + " ..." if len(detail) > 200 else detail or type(err).__name__
            raise ValueError(
                f"{pretrained}: not a checkpoint of open_clip model {model_name!r} ({detail})"
            ) from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    preprocess = PreprocessSpec.from_open_clip(model)
    embed_dim = _embed_dim(model)
    _LOADS += 1
    return ClipModel(model, preprocess, transform, embed_dim, device, precision, key)


def _embed_dim(model: torch.nn.Module) -> int:
    visual = getattr(model, "visual", None)
    for attr in ("output_dim", "embed_dim"):
        value = getattr(visual, attr, None)
        if isinstance(value, int):
            return value
    size = PreprocessSpec.from_open_clip(model).size
    with torch.inference_mode():
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        out = model.encode_image(torch.zeros((1, 3, *size), device=device, dtype=dtype))
    return int(out.shape[-1])


def clip_embed_dim(model_name: str) -> int | None:
    """Embedding size from open_clip's config for ``model_name`` (no weights); None if unknown."""
    try:
        import open_clip

        register_builtin_configs()
        if model_name.startswith("local-dir:"):
            import json

            path = os.path.join(model_name[len("local-dir:") :], "open_clip_config.json")
            with open(path, encoding="utf-8") as f:
                return int(json.load(f)["model_cfg"]["embed_dim"])
        if model_name.startswith("hf-hub:"):
            return None
        cfg = open_clip.get_model_config(model_name.replace("/", "-"))
        return None if cfg is None else int(cfg["embed_dim"])
    except Exception:  # noqa: BLE001 - the caller only uses this for an early check
        return None


def clear_clip_cache() -> None:
    """Forget the models loaded in this process."""
    _CACHE.clear()


def clip_cache_info() -> dict[str, Any]:
    """``{"loads": models loaded so far in this process, "cached": [cache keys]}``."""
    return {"loads": _LOADS, "cached": _CACHE.keys()}

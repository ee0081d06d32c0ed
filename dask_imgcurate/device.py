"""Device selection for the compute stages (CLIP embedding, classifiers, DALI decoding).

``device="auto"`` is resolved where the work runs (on the Dask worker, not on the client),
so a CPU-only client can drive GPU workers. Dask places GPU tasks through worker
*resources*: start each GPU worker with ``resources=worker_resources(n)`` and submit GPU
work under ``dask.annotate(resources=task_resources(device))``.
"""

from __future__ import annotations

import math
import re

import torch

GPU_RESOURCE = "GPU"
"""Name of the Dask worker resource that counts GPUs."""

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def cuda_available() -> bool:
    """Whether torch can use a CUDA device in this process."""
    return bool(torch.cuda.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a concrete torch device.

    ``"auto"`` picks the current CUDA device when CUDA is available, else the CPU.
    ``"cuda"`` / ``"cuda:N"`` raise ``RuntimeError`` when CUDA is unavailable and
    ``ValueError`` when ``N`` is not a visible device.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    name = device.strip().lower()
    if name == "auto":
        if cuda_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.match(name)
    if match is None:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not cuda_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if match.group(1) is None else int(match.group(1))
    if index >= count:
        raise ValueError(f"device {device!r} requested but only {count} CUDA device(s) visible")
    return torch.device("cuda", index)


def dali_device_id(device: torch.device) -> int | None:
    """DALI ``device_id`` for ``device``: the CUDA index, or ``None`` for CPU-only pipelines."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def dali_decoder_device(device: torch.device) -> str:
    """DALI image decoder backend for ``device``: ``"mixed"`` on CUDA, else ``"cpu"``."""
    return "mixed" if device.type == "cuda" else "cpu"


def worker_resources(num_gpus_per_worker: float) -> dict[str, float]:
    """Dask worker ``resources`` mapping for a worker owning ``num_gpus_per_worker`` GPUs.

    Returns ``{}`` for CPU workers (``0``), else ``{"GPU": n}``.
    """
    n = float(num_gpus_per_worker)
    if not math.isfinite(n) or n < 0:
        raise ValueError(
            f"num_gpus_per_worker must be a finite number >= 0, got {num_gpus_per_worker!r}"
        )
    return {GPU_RESOURCE: n} if n > 0 else {}


def task_resources(device: str | torch.device, gpus_per_task: float = 1.0) -> dict[str, float]:
    """Dask task ``resources`` annotation for work on ``device``.

    ``{"GPU": gpus_per_task}`` for CUDA devices (``"cuda"``, ``"cuda:N"``, or ``"auto"``
    when this process sees CUDA), ``{}`` for the CPU. Unlike :func:`resolve_device`, this
    never raises for a CUDA device the client cannot see: the client may have no GPU.
    """
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if cuda_available() else "cpu"
    if name == "cpu":
        return {}
    if _CUDA_RE.match(name) is None:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    n = float(gpus_per_task)
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"gpus_per_task must be a finite number > 0, got {gpus_per_task!r}")
    return {GPU_RESOURCE: n}

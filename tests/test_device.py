"""Device selection, without a GPU: torch.cuda is monkeypatched."""

from __future__ import annotations

import pytest
import torch

from dask_imgcurate import device as dev


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_without_cuda_is_cpu(no_cuda: None) -> None:
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_cuda_raises(no_cuda: None) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        dev.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        dev.resolve_device("cuda:1")


def test_auto_with_cuda(two_gpus: None) -> None:
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("CUDA:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        dev.resolve_device("cuda:2")


def test_unknown_device() -> None:
    for bad in ("gpu", "cuda:x", "mps:0", ""):
        with pytest.raises(ValueError, match="unknown device"):
            dev.resolve_device(bad)
    with pytest.raises(TypeError):
        dev.resolve_device(0)  # type: ignore[arg-type]


def test_dali_device_choice() -> None:
    cpu = torch.device("cpu")
    assert dev.dali_device_id(cpu) is None
    assert dev.dali_decoder_device(cpu) == "cpu"
    gpu = torch.device("cuda", 1)
    assert dev.dali_device_id(gpu) == 1
    assert dev.dali_decoder_device(gpu) == "mixed"


def test_worker_resources() -> None:
    assert dev.worker_resources(0) == {}
    assert dev.worker_resources(1) == {"GPU": 1.0}
    assert dev.worker_resources(0.5) == {"GPU": 0.5}
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            dev.worker_resources(bad)


def test_task_resources(no_cuda: None) -> None:
    assert dev.task_resources("cpu") == {}
    assert dev.task_resources("auto") == {}
    # the client may lack the GPU the workers have
    assert dev.task_resources("cuda") == {"GPU": 1.0}
    assert dev.task_resources("cuda:3", gpus_per_task=0.5) == {"GPU": 0.5}
    with pytest.raises(ValueError):
        dev.task_resources("cuda", gpus_per_task=0)
    with pytest.raises(ValueError):
        dev.task_resources("tpu")


def test_task_resources_auto_with_cuda(two_gpus: None) -> None:
    assert dev.task_resources("auto") == {"GPU": 1.0}

"""Shared fixtures: demo datasets built with ``dask_imgcurate.demo`` and the real fixture shard.

The demo datasets are session-scoped and must be treated as read-only; a test that changes
files (writes ``.idx`` or Parquet files, cuts a tar) copies them first with ``copy_dataset``.
"""

from __future__ import annotations

import shutil
import signal
import tarfile
from pathlib import Path

import pytest

from dask_imgcurate import demo

DATA = Path(__file__).resolve().parent / "data"

DEMO_SHARDS = 3
DEMO_SAMPLES = 12
NOPQ_SHARDS = 2
NOPQ_SAMPLES = 10


def pytest_configure(config: pytest.Config) -> None:
    """Run with Ctrl-C handled even when started with SIGINT ignored (a background job of a
    non-interactive shell, ``nohup``): the Ctrl-C tests' commands inherit an ignored SIGINT
    and would run on; a handled one is reset to the default in every child process."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _reference_members(path: str | Path) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file, as the stdlib ``tarfile`` sees it."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]


@pytest.fixture(scope="session")
def tarfile_members():
    """The independent reference: a function ``path -> [(name, offset_data, size), ...]``."""
    return _reference_members


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards x 12 records (jpg, txt, json) with sidecar Parquet files. Read-only."""
    out = tmp_path_factory.mktemp("demo-parquet")
    demo.make_demo_dataset(out, n_shards=DEMO_SHARDS, samples_per_shard=DEMO_SAMPLES, seed=7)
    return out


@pytest.fixture(scope="session")
def demo_dir_nopq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 shards x 10 records (jpg, txt, json), no Parquet. Read-only."""
    out = tmp_path_factory.mktemp("demo-noparquet")
    demo.make_demo_dataset(
        out, n_shards=NOPQ_SHARDS, samples_per_shard=NOPQ_SAMPLES, with_parquet=False, seed=11
    )
    return out


@pytest.fixture(scope="session")
def fixture_tar() -> Path:
    """The real one-record NeMo Curator shard (key ``0``: jpg, json, txt)."""
    path = DATA / "nemo-curator-00000.tar"
    assert path.is_file(), f"missing test data {path}"
    return path


@pytest.fixture(scope="session")
def fixture_idx(fixture_tar: Path) -> Path:
    """The DALI v1.2 index that DALI's ``wds2idx`` wrote for ``fixture_tar``."""
    return fixture_tar.with_suffix(".idx")


@pytest.fixture
def copy_dataset(tmp_path: Path):
    """Copy a (read-only) dataset directory into this test's ``tmp_path``; return the copy."""

    def copy(src: Path, name: str = "ds") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy

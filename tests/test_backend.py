"""The cudf backend's partition handling, with a stand-in for cudf (none runs here: it needs
a GPU). The stand-in has the slice of ``cudf.DataFrame`` the package calls and, like cudf,
refuses implicit conversion to host arrays, so pandas-only code handed a partition fails as
it would on a GPU. What it cannot show is cudf's own behaviour: that needs a GPU run."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dask_imgcurate import ImageTextPairDataset, backend
from dask_imgcurate.demo import make_demo_dataset
from dask_imgcurate.embed import ClipImageEmbedder, _embed_partition
from dask_imgcurate.models.builtin import make_demo_models
from dask_imgcurate.models.classifiers import AestheticClassifier

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


class _NoHostArrays:
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a host NumPy array via __array__ is not allowed")


class FakeIndex(_NoHostArrays):
    def __init__(self, index: pd.Index):
        self.pandas = index

    @property
    def names(self) -> list:
        return list(self.pandas.names)

    def to_pandas(self) -> pd.Index:
        return self.pandas


class FakeCudfFrame(_NoHostArrays):
    def __init__(self, frame: pd.DataFrame):
        self.pandas = frame

    @classmethod
    def from_arrow(cls, table: pa.Table) -> FakeCudfFrame:
        return cls(table.to_pandas(types_mapper=backend._pandas_type, ignore_metadata=True))

    def to_arrow(self, preserve_index=None) -> pa.Table:
        index = preserve_index is not False and not isinstance(self.pandas.index, pd.RangeIndex)
        return pa.Table.from_pandas(self.pandas, preserve_index=index)  # cudf's default

    @property
    def index(self) -> FakeIndex:
        return FakeIndex(self.pandas.index)

    @index.setter
    def index(self, value: FakeIndex) -> None:
        self.pandas.index = value.pandas

    @property
    def columns(self) -> pd.Index:
        return self.pandas.columns

    def __len__(self) -> int:
        return len(self.pandas)


@pytest.fixture
def fake_cudf(monkeypatch):
    module = types.ModuleType("cudf")
    module.DataFrame = FakeCudfFrame
    module.from_pandas = FakeIndex
    monkeypatch.setitem(sys.modules, "cudf", module)
    return module


@pytest.fixture(scope="module")
def partition(tmp_path_factory) -> pd.DataFrame:
    """A demo shard's metadata, filtered: its index is no longer a range."""
    root = tmp_path_factory.mktemp("backend")
    make_demo_dataset(root, n_shards=1, samples_per_shard=6, seed=2)
    frame = ImageTextPairDataset.from_webdataset(str(root)).metadata.compute()
    return frame.iloc[[0, 2, 3, 5]]


def test_round_trip_keeps_values_dtypes_and_index(fake_cudf, partition):
    fake = backend.like(partition, FakeCudfFrame(partition.iloc[:0]))
    assert isinstance(fake, FakeCudfFrame)
    pd.testing.assert_frame_equal(backend.to_pandas(fake), partition)
    assert (
        backend.to_pandas(partition) is partition
        and backend.like(partition, partition) is partition
    )
    assert "__index_level_0__" not in backend.to_arrow(fake).column_names


def test_embedding_and_scoring_a_cudf_partition(fake_cudf, partition, tmp_path):
    models = make_demo_models(tmp_path)
    head = AestheticClassifier(models.aesthetic, embedding_dim=models.embedding_dim, device="cpu")
    embedder = ClipImageEmbedder(
        models.clip_model, pretrained=None, device="cpu", batch_size=4, classifiers=[head]
    )
    fake = FakeCudfFrame(partition.copy())
    result = _embed_partition(fake, embedder, "key", {})
    assert isinstance(result, FakeCudfFrame)
    expected = embedder.embed_partition(partition, "key", {})
    pd.testing.assert_frame_equal(backend.to_pandas(result), expected)
    assert expected["error"].isna().all() and np.isfinite(expected["aesthetic_score"]).all()
    meta = embedder.output_meta(FakeCudfFrame(partition.iloc[:0]))
    assert isinstance(meta, FakeCudfFrame)
    assert list(meta.columns) == list(expected.columns)
    unscored = FakeCudfFrame(backend.to_pandas(result).drop(columns="aesthetic_score"))
    scored = head.score_partition(unscored)
    assert isinstance(scored, FakeCudfFrame)
    rescored = backend.to_pandas(scored)  # the score column comes last now
    pd.testing.assert_frame_equal(rescored, expected[list(rescored.columns)])

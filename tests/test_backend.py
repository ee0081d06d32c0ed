"""The cudf backend's partition handling: with real cudf where it imports (a GPU machine),
and always with a stand-in. The stand-in has the slice of ``cudf`` the package calls and,
like cudf, refuses implicit conversion to host arrays (so pandas-only code handed a
partition fails as it would on a GPU) and gives empty or all-null nested columns the Arrow
type null, as cudf 26.10 does. What it cannot show is the rest of cudf's behaviour: the
``cudf`` variant of each test, on a GPU machine, does."""

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


class _Indexed(_NoHostArrays):
    """A pandas object in disguise, with cudf's ``index`` (a ``FakeIndex``)."""

    pandas: pd.Series | pd.DataFrame

    @property
    def index(self) -> FakeIndex:
        return FakeIndex(self.pandas.index)

    @index.setter
    def index(self, value: FakeIndex) -> None:
        self.pandas.index = value.pandas


class FakeListDtype:
    def __init__(self, arrow_type: pa.DataType):
        self.arrow_type = arrow_type

    def to_arrow(self) -> pa.DataType:
        return self.arrow_type


class FakeSeries(_Indexed):
    def __init__(self, series: pd.Series):
        self.pandas = series

    @classmethod
    def from_arrow(cls, array: pa.Array) -> FakeSeries:
        return cls(array.to_pandas(types_mapper=backend._pandas_type))

    def to_pandas(self) -> pd.Series:
        return self.pandas

    @property
    def dtype(self):
        kind = self.pandas.dtype
        return FakeListDtype(kind.pyarrow_dtype) if isinstance(kind, pd.ArrowDtype) else kind


class FakeCudfFrame(_Indexed):
    def __init__(self, frame: pd.DataFrame):
        self.pandas = frame

    @classmethod
    def from_arrow(cls, table: pa.Table) -> FakeCudfFrame:
        return cls(table.to_pandas(types_mapper=backend._pandas_type, ignore_metadata=True))

    def to_arrow(self, preserve_index=None) -> pa.Table:
        index = preserve_index is not False and not isinstance(self.pandas.index, pd.RangeIndex)
        table = pa.Table.from_pandas(self.pandas, preserve_index=index)  # cudf's default
        for i, field in enumerate(table.schema):  # as cudf 26.10: nested, all null -> null
            nested = pa.types.is_list(field.type) or pa.types.is_struct(field.type)
            if nested and table.column(i).null_count == table.num_rows:
                table = table.set_column(i, field.name, pa.nulls(table.num_rows))
        return table

    def reset_index(self, drop: bool = False) -> FakeCudfFrame:
        return FakeCudfFrame(self.pandas.reset_index(drop=drop))

    def copy(self, deep: bool = True) -> FakeCudfFrame:
        return FakeCudfFrame(self.pandas.copy(deep=deep))

    def __getitem__(self, name: str) -> FakeSeries:
        return FakeSeries(self.pandas[name])

    def __setitem__(self, name: str, column: FakeSeries) -> None:
        assert column.pandas.index.equals(self.pandas.index)  # cudf would align on it
        self.pandas[name] = column.pandas

    @property
    def columns(self) -> pd.Index:
        return self.pandas.columns

    def __len__(self) -> int:
        return len(self.pandas)


@pytest.fixture(params=["stand-in", "cudf"])
def cudf(request, monkeypatch):
    if request.param == "cudf":
        return pytest.importorskip("cudf")
    module = types.ModuleType("cudf")
    module.DataFrame = FakeCudfFrame
    module.Series = FakeSeries
    module.from_pandas = lambda x: FakeSeries(x) if isinstance(x, pd.Series) else FakeIndex(x)
    monkeypatch.setitem(sys.modules, "cudf", module)
    return module


def on_gpu(cudf, frame: pd.DataFrame):
    """``frame`` as a cudf partition (through Arrow: nested columns included)."""
    out = cudf.DataFrame.from_arrow(pa.Table.from_pandas(frame, preserve_index=False))
    out.index = cudf.from_pandas(frame.index)
    return out


@pytest.fixture(scope="module")
def partition(tmp_path_factory) -> pd.DataFrame:
    """A demo shard's metadata, filtered: its index is no longer a range."""
    root = tmp_path_factory.mktemp("backend")
    make_demo_dataset(root, n_shards=1, samples_per_shard=6, seed=2)
    frame = ImageTextPairDataset.from_webdataset(str(root)).metadata.compute()
    return frame.iloc[[0, 2, 3, 5]]


def test_round_trip_keeps_values_dtypes_and_index(cudf, partition):
    gpu = on_gpu(cudf, partition)
    pd.testing.assert_frame_equal(backend.to_pandas(gpu), partition)
    assert backend.to_pandas(partition) is partition
    assert backend.like(partition, partition, ["key"]) is partition
    assert "__index_level_0__" not in backend.to_arrow(gpu).column_names
    # an empty partition's member lists keep their type (cudf makes them null-typed)
    empty = backend.to_arrow(on_gpu(cudf, partition.iloc[:0]))
    assert (
        empty.schema.field("_members").type
        == backend.to_arrow(partition).schema.field("_members").type
    )
    # only the named columns cross back: the others are the partition's own
    changed = partition.assign(width=partition["width"] * 2, caption="x")
    result = backend.to_pandas(backend.like(changed, on_gpu(cudf, partition), ["width"]))
    assert result["width"].tolist() == changed["width"].tolist()
    assert result["caption"].tolist() == partition["caption"].tolist()


def test_embedding_and_scoring_a_cudf_partition(cudf, partition, tmp_path):
    models = make_demo_models(tmp_path)
    head = AestheticClassifier(models.aesthetic, embedding_dim=models.embedding_dim, device="cpu")
    embedder = ClipImageEmbedder(
        models.clip_model, pretrained=None, device="cpu", batch_size=4, classifiers=[head]
    )
    result = _embed_partition(on_gpu(cudf, partition), embedder, "key", {})
    assert isinstance(result, cudf.DataFrame)
    expected = embedder.embed_partition(partition, "key", {})
    pd.testing.assert_frame_equal(backend.to_pandas(result), expected)
    assert expected["error"].isna().all() and np.isfinite(expected["aesthetic_score"]).all()
    meta = embedder.output_meta(on_gpu(cudf, partition.iloc[:0]))
    assert isinstance(meta, cudf.DataFrame)
    assert list(meta.columns) == list(expected.columns)
    unscored = on_gpu(cudf, backend.to_pandas(result).drop(columns="aesthetic_score"))
    scored = head.score_partition(unscored)
    assert isinstance(scored, cudf.DataFrame)
    rescored = backend.to_pandas(scored)  # the score column comes last now
    pd.testing.assert_frame_equal(rescored, expected[list(rescored.columns)])


def test_a_query_runs_on_pandas_for_a_cudf_partition(cudf, partition):
    """cudf's eval takes numbers only; the CLI's --query is pandas' on every backend."""
    from dask_imgcurate.cli.work import _eval_query

    query = "caption.str.len() > 30 and width >= 200"
    verdict = _eval_query(on_gpu(cudf, partition), query)
    assert isinstance(verdict, cudf.Series)
    pd.testing.assert_series_equal(verdict.to_pandas(), _eval_query(partition, query))
    assert 0 < verdict.to_pandas().sum() < len(partition)


def test_categoricals_are_widened_and_decoded_in_one_rebuild_of_the_table(monkeypatch):
    """A wide frame's categoricals are widened (``to_arrow``) and decoded (an export's
    fingerprint) in one rebuild of its table: ``Table.set_column`` per categorical was
    quadratic in the columns."""
    from dask_imgcurate.io import writer

    replaced = []

    def counted(table: pa.Table, columns: dict) -> pa.Table:
        replaced.append(sorted(columns))
        return set_columns(table, columns)

    set_columns = backend.set_columns
    monkeypatch.setattr(backend, "set_columns", counted)
    monkeypatch.setattr(writer, "set_columns", counted)
    frame = pd.DataFrame({f"c{i}": pd.Categorical(["a", "b"]) for i in range(4)})
    frame.insert(2, "x", [1.0, 2.0])
    table = backend.to_arrow(frame)
    assert replaced == [[0, 1, 3, 4]]
    assert [f.type.index_type for f in table.schema if f.name != "x"] == [pa.int32()] * 4
    members = [[{"name": f"{i}.jpg", "offset": 512 * i, "size": 1}] for i in range(2)]
    rows = table.append_column("_shard", pa.array(["a.tar"] * 2))
    rows = rows.append_column("_members", pa.array(members))
    writer.job_fingerprint(rows, ["0", "1"], {}, table)
    assert replaced == [[0, 1, 3, 4]] * 2

"""``ImageTextPairDataset.from_webdataset`` / ``save_metadata`` and the backend choice.

Expected values come from independent readers: ``tarfile`` for members and payloads,
``pyarrow.parquet`` for sidecar and saved files, ``json`` for the records' ``.json``.
"""

from __future__ import annotations

import decimal
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import types
import warnings
from pathlib import Path

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from compute_helpers import write_tar

from dask_imgcurate import ImageTextPairDataset, demo
from dask_imgcurate import backend as backend_mod
from dask_imgcurate.errors import (
    CompressedTarError,
    DuplicateKeyError,
    MetadataMismatchError,
    ShardNotice,
    ShardWarning,
    TarFormatError,
)
from dask_imgcurate.io.shards import Shard
from dask_imgcurate.metadata import BOOKKEEPING, shard_table, sidecar_schema

BOOK = list(BOOKKEEPING)
PLACE = ["_shard", "_shard_version"]  # where and when a tar was indexed: differ by store


def load(path, **kwargs) -> ImageTextPairDataset:
    return ImageTextPairDataset.from_webdataset(str(path), **kwargs)


def partitions(ds: ImageTextPairDataset) -> list[pd.DataFrame]:
    parts = ds.metadata.to_delayed()
    return list(dask.compute(*parts))


def tar_records(tar: Path) -> dict[str, dict]:
    """key -> {"members": [(name, offset, size)], "data": {ext: bytes}} read by tarfile."""
    out: dict[str, dict] = {}
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            if not m.isreg():
                continue
            slash = m.name.rfind("/") + 1
            dot = m.name.find(".", slash)
            key, ext = m.name[:dot], m.name[dot + 1 :]
            rec = out.setdefault(key, {"members": [], "data": {}})
            rec["members"].append((m.name, m.offset_data, m.size))
            rec["data"][ext] = t.extractfile(m).read()
    return out


# --- layout ---------------------------------------------------------------------------------


def test_one_partition_per_shard(demo_dir):
    ds = load(demo_dir)
    tars = sorted(str(p) for p in demo_dir.glob("*.tar"))
    assert ds.tar_files == tars and len(tars) == 3
    assert ds.metadata.npartitions == 3
    for tar, part in zip(tars, partitions(ds), strict=True):
        assert set(part["_shard"]) == {tar}
        assert list(part["key"]) == sorted(tar_records(Path(tar)))


def test_inputs_dir_glob_list_single(demo_dir):
    tars = sorted(str(p) for p in demo_dir.glob("*.tar"))
    assert load(demo_dir).tar_files == tars
    assert load(f"{demo_dir}/0000[02].tar").tar_files == [tars[0], tars[2]]
    assert ImageTextPairDataset.from_webdataset([tars[2], tars[0]]).tar_files == [tars[0], tars[2]]
    single = load(tars[1])
    assert single.tar_files == [tars[1]] and len(single.metadata.compute()) == 12


def test_files_per_partition(demo_dir):
    ds = load(demo_dir, files_per_partition=2)
    parts = partitions(ds)
    assert [len(p) for p in parts] == [24, 12]
    assert [sorted(set(p["_shard"])) for p in parts] == [ds.tar_files[:2], ds.tar_files[2:]]
    with pytest.raises(ValueError):
        load(demo_dir, files_per_partition=0)


def test_rows_sorted_within_partitions(tmp_path):
    records = demo.make_shard_records(0, 12, seed=3)
    order = [5, 0, 11, 3, 8, 1]
    demo.write_shard(tmp_path / "00000.tar", [records[i] for i in order])
    demo.write_parquet(tmp_path / "00000.parquet", [records[i] for i in sorted(order)[::-1]])
    rest = [i for i in range(12) if i not in order]
    demo.write_shard(tmp_path / "00001.tar", [records[i] for i in rest[::-1]])
    demo.write_parquet(tmp_path / "00001.parquet", [records[i] for i in rest])
    captions = {r["__key__"]: r["txt"] for r in records}
    for fpp, expected in [(1, [sorted(order), rest]), (2, [list(range(12))])]:
        parts = partitions(load(tmp_path, files_per_partition=fpp))
        assert [list(p["key"]) for p in parts] == [[f"{i:09d}" for i in e] for e in expected]
        for part in parts:  # sidecar rows moved along with their ids
            assert list(part["caption"]) == [captions[k] for k in part["key"]]


def test_parquet_layout_columns_and_values(demo_dir):
    frame = load(demo_dir).metadata.compute()
    assert frame["key"].dtype == pd.StringDtype("pyarrow")
    assert frame["_members"].dtype == pd.ArrowDtype(BOOKKEEPING["_members"])
    assert frame["_image_offset"].dtype == frame["_image_size"].dtype == "Int64"
    sidecar = pa.concat_tables(
        [pq.read_table(p) for p in sorted(demo_dir.glob("*.parquet"))]
    ).to_pandas()
    assert list(frame.columns) == list(sidecar.columns) + BOOK
    got = frame[list(sidecar.columns)].reset_index(drop=True)
    want = sidecar.sort_values("key").reset_index(drop=True)
    for col in sidecar.columns:
        assert got[col].tolist() == want[col].tolist(), col


def test_no_parquet_layout_reads_txt_and_json(demo_dir_nopq):
    frame = load(demo_dir_nopq).metadata.compute()
    assert len(frame) == 20
    assert {"key", "caption", "width", "height", "original_width", "similarity"} <= set(
        frame.columns
    )
    for tar in sorted(demo_dir_nopq.glob("*.tar")):
        for key, rec in tar_records(tar).items():
            row = frame[frame["key"] == key].iloc[0]
            assert row["caption"] == rec["data"]["txt"].decode("utf-8")
            meta = json.loads(rec["data"]["json"])
            for field in ("url", "width", "height", "original_width", "status", "similarity"):
                assert row[field] == meta[field], (key, field)


def test_json_fields_scalars_only(tmp_path):
    members = [
        ("a.jpg", b"A"),
        ("a.json", json.dumps({"n": 1, "tags": ["x"], "nested": {"k": 1}, "s": "hi"}).encode()),
        ("b.jpg", b"B"),
        ("b.txt", "caption b ✓".encode()),
        ("b.json", json.dumps({"n": 2, "flag": True, "caption": "not this"}).encode()),
        ("c.jpg", b"C"),
        ("c.json", json.dumps({"caption": "from the json"}).encode()),  # no .txt
    ]
    frame = load(write_tar(tmp_path / "00000.tar", members)).metadata.compute()
    assert list(frame.columns) == ["key", "caption", "n", "s", "flag"] + BOOK
    rows = frame.set_index("key")
    assert pd.isna(rows.loc["a", "caption"]) and rows.loc["b", "caption"] == "caption b ✓"
    assert rows.loc["c", "caption"] == "from the json"  # the .txt wins where there is one
    assert rows["n"].tolist()[:2] == [1, 2] and rows.loc["a", "s"] == "hi"
    assert pd.isna(rows.loc["a", "flag"]) and bool(rows.loc["b", "flag"]) is True


def test_a_json_id_field_other_than_the_key_is_named(tmp_path):
    """With ``id_col="id"`` the id column holds the tar keys; a ``.json`` ``id`` that says
    otherwise is not dropped quietly."""
    members = [
        ("a.jpg", b"A"),
        ("a.json", json.dumps({"id": "a", "n": 1}).encode()),
        ("b.jpg", b"B"),
        ("b.json", json.dumps({"id": "XYZ", "n": 2}).encode()),
    ]
    tar = write_tar(tmp_path / "00000.tar", members)
    with pytest.warns(ShardNotice, match=r"1 records' .json field 'id' differs .*'b': 'XYZ'"):
        frame = ImageTextPairDataset.from_webdataset(str(tar), id_col="id").metadata.compute()
    assert frame["id"].tolist() == ["a", "b"] and frame["n"].tolist() == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default id_col: no field of that name
        assert load(tar).metadata.compute()["key"].tolist() == ["a", "b"]


def test_image_range_is_the_image(demo_dir, demo_dir_nopq):
    for root in (demo_dir, demo_dir_nopq):
        frame = load(root).metadata.compute()
        assert (frame["_image_size"] > 0).all()
        for tar, rows in frame.groupby("_shard"):
            by_name = {}
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    by_name[m.name] = hashlib.sha256(t.extractfile(m).read()).hexdigest()
            with open(tar, "rb") as f:
                for name, off, size in rows[
                    ["_image_member", "_image_offset", "_image_size"]
                ].itertuples(index=False):
                    f.seek(off)
                    assert hashlib.sha256(f.read(size)).hexdigest() == by_name[name]
                    assert name.endswith(".jpg")


def test_members_column(demo_dir, fixture_tar):
    for root in (demo_dir, fixture_tar):
        frame = load(root).metadata.compute()
        for tar, rows in frame.groupby("_shard"):
            expected = tar_records(Path(tar))
            assert sorted(rows["key"]) == sorted(expected)
            for key, members in zip(rows["key"], rows["_members"], strict=True):
                got = [(m["name"], m["offset"], m["size"]) for m in members]
                assert got == expected[key]["members"]


def test_real_fixture_shard(fixture_tar):
    frame = load(fixture_tar).metadata.compute()
    expected = tar_records(fixture_tar)["0"]
    assert frame["key"].tolist() == ["0"]
    row = frame.iloc[0]
    assert row["caption"] == expected["data"]["txt"].decode()
    assert row["_image_member"] == "0.jpg"
    assert (row["_image_offset"], row["_image_size"]) == expected["members"][0][1:]


def test_other_members_kept_and_uppercase_image(tmp_path):
    members = [
        ("000001.JPG", b"upper"),
        ("000001.cls", b"3"),
        ("000001.npy", b"\x93NUMPY\x01\x00"),
        ("000001.txt", b"first"),
        ("000002.cls", b"4"),
        ("000002.txt", b"no image here"),
    ]
    tar = write_tar(tmp_path / "00000.tar", members)
    frame = load(tar).metadata.compute().set_index("key")
    expected = tar_records(tar)
    assert frame.loc["000001", "_image_member"] == "000001.JPG"
    assert frame.loc["000001", "_image_offset"] == expected["000001"]["members"][0][1]
    assert pd.isna(frame.loc["000002", "_image_member"])
    assert (frame.loc["000002", "_image_offset"], frame.loc["000002", "_image_size"]) == (-1, -1)
    for key in ("000001", "000002"):
        got = [(m["name"], m["offset"], m["size"]) for m in frame.loc[key, "_members"]]
        assert got == expected[key]["members"]


def test_custom_id_column(tmp_path):
    records = demo.make_shard_records(0, 4)
    demo.write_shard(tmp_path / "00000.tar", records)
    table = pa.table({"sample_id": [r["__key__"] for r in records], "score": [1.0, 2, 3, 4]})
    pq.write_table(table, tmp_path / "00000.parquet")
    frame = load(tmp_path, id_col="sample_id").metadata.compute()
    assert list(frame.columns) == ["sample_id", "score"] + BOOK
    assert frame["score"].tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(MetadataMismatchError, match="no id column 'key'"):
        load(tmp_path)


@pytest.mark.parametrize(
    "columns",
    [
        {"key": ["a", "b"], "caption": ["x", None], "score": [1.5, 2.0]},
        {"key": [1, 2], "width": [64, 32], "nsfw": [True, False]},  # integer ids
        {"key": ["a", "b"], "embedding": [[0.5, 1.0], [2.0, 3.0]], "empty": [None, None]},
        {"key": ["a", "b"], "_shard": ["x", "y"], "_old": [1, 2], "when": ["2024-01-02"] * 2},
        {"key": ["a", "b"], "label": pd.Categorical(["cat", "dog"])},  # dictionary-typed
    ],
    ids=["strings", "int-ids", "lists-nulls", "bookkeeping-names", "categorical"],
)
def test_schema_from_sidecar_footer_matches_rows(tmp_path, columns):
    keys = [str(k) for k in columns["key"]]
    records = [dict(r, __key__=k) for r, k in zip(demo.make_shard_records(0, 2), keys)]
    demo.write_shard(tmp_path / "00000.tar", records)
    frame = pd.DataFrame(columns)
    if "when" in frame:
        frame["when"] = pd.to_datetime(frame["when"])
    if "embedding" in columns:  # float32 lists, as embedding stages write them
        frame["embedding"] = frame["embedding"].map(lambda v: np.array(v, "float32"))
    pq.write_table(
        pa.Table.from_pandas(frame.set_index("key", drop=False)), tmp_path / "00000.parquet"
    )
    fs = fsspec.filesystem("file")
    shard = Shard(str(tmp_path / "00000.tar"), str(tmp_path / "00000.parquet"))
    rows = shard_table(fs, shard)
    assert sidecar_schema(fs, shard).equals(pa.schema(list(rows.schema)), check_metadata=True)
    got = load(tmp_path).metadata.compute()
    assert got["key"].tolist() == keys
    assert list(got.columns) == rows.column_names


def test_conforming_a_shard_lists_its_column_names_once_not_per_column():
    """A shard's table is conformed to the schema in time linear in its columns: it listed
    the table's column names once per column (a 500-column sidecar: 0.12 s a shard)."""
    from dask_imgcurate.dataset import _conform

    class Counted:  # a table counting the lists of names it builds
        def __init__(self, table: pa.Table):
            self.table, self.listed = table, 0

        @property
        def column_names(self) -> list[str]:
            self.listed += 1
            return self.table.column_names

        def __getattr__(self, name: str):
            return getattr(self.table, name)

    for width in (10, 100):
        table = pa.table({f"c{i}": [i] for i in range(width)})
        counted = Counted(table)
        assert _conform(counted, table.schema, "00000.tar").equals(table)
        assert counted.listed <= 2


def test_loading_reads_no_tar_when_a_sidecar_gives_the_schema(demo_dir, monkeypatch):
    import dask_imgcurate.metadata as metadata

    def no_tar_reads(*args, **kwargs):
        raise AssertionError("a tar was indexed on the client")

    monkeypatch.setattr(metadata, "index_shard", no_tar_reads)
    ds = load(demo_dir)
    assert list(ds.metadata.columns)[-len(BOOK) :] == BOOK
    monkeypatch.undo()
    assert ds.metadata.compute().shape[1] == len(ds.metadata.columns)


# --- awkward shards --------------------------------------------------------------------------


def test_empty_shard_is_an_empty_partition(tmp_path, demo_dir_nopq):
    write_tar(tmp_path / "00000.tar", [])
    shutil.copyfile(demo_dir_nopq / "00000.tar", tmp_path / "00001.tar")
    write_tar(tmp_path / "00002.tar", [])
    ds = load(tmp_path)
    parts = partitions(ds)
    assert [len(p) for p in parts] == [0, 10, 0]
    assert all(list(p.columns) == list(parts[1].columns) for p in parts)
    assert ds.metadata.compute()["key"].tolist() == sorted(tar_records(tmp_path / "00001.tar"))
    only_empty = load(tmp_path / "00000.tar")
    assert len(only_empty.metadata.compute()) == 0


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_empty_shard_from_gnu_tar(tmp_path):
    import subprocess

    subprocess.run(["tar", "cf", "00000.tar", "-T", "/dev/null"], cwd=tmp_path, check=True)
    assert len(load(tmp_path).metadata.compute()) == 0


def test_duplicate_keys(tmp_path):
    write_tar(tmp_path / "00000.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"3")])
    with pytest.raises(DuplicateKeyError, match="'a'") as err:
        load(tmp_path).metadata.compute()
    assert str(tmp_path / "00000.tar") in str(err.value)
    assert "'a.jpg' and 'a.txt', not adjacent" in str(err.value)
    assert "--sort=name" in str(err.value)  # how to write a proper one


def test_duplicate_member_names(tmp_path):
    write_tar(tmp_path / "00000.tar", [("a.jpg", b"1"), ("a.txt", b"2"), ("a.jpg", b"3")])
    with pytest.raises(DuplicateKeyError, match="'a.jpg'"):
        load(tmp_path).metadata.compute()


def test_unsafe_member_names(tmp_path, monkeypatch):
    root = tmp_path / "x" / "y" / "data"
    root.mkdir(parents=True)
    members = [
        ("/abs/x.jpg", b"abs"),
        ("/abs/x.txt", b"absolute"),
        ("../../evil.jpg", b"evil"),
        ("../../evil.txt", b"escaped"),
    ]
    write_tar(root / "00000.tar", members)
    monkeypatch.chdir(root)
    before = sorted(tmp_path.rglob("*"))
    frame = load(root).metadata.compute().set_index("key")
    assert sorted(frame.index) == ["../../evil", "/abs/x"]
    assert frame.loc["../../evil", "caption"] == "escaped"
    assert frame.loc["/abs/x", "_image_member"] == "/abs/x.jpg"
    assert sorted(tmp_path.rglob("*")) == before
    assert not os.path.exists(root / "../../evil.jpg") and not os.path.exists("/abs/x.jpg")


@pytest.fixture(params=["mid-payload", "mid-header"])
def cut_dataset(request, demo_dir_nopq, copy_dataset, tarfile_members):
    """A copy of the no-parquet demo with 00001.tar cut inside record 000000014.

    Cut inside the payload of its ``.txt`` or inside the header of its ``.json``; returns
    the path and the offset of the damaged member's header.
    """
    path = copy_dataset(demo_dir_nopq)
    tar = path / "00001.tar"
    members = tarfile_members(tar)
    if request.param == "mid-payload":
        name, offset, size = members[13]
        assert name == "000000014.txt"
        cut = offset + size // 2
    else:
        name, offset, _ = members[14]
        assert name == "000000014.json"
        cut = offset - 512 + 100
    tar.write_bytes(tar.read_bytes()[:cut])
    return path, offset - 512


def test_truncated_shard_strict(cut_dataset):
    path, header = cut_dataset
    with pytest.raises(TarFormatError) as err:
        load(path).metadata.compute()
    assert err.value.source == str(path / "00001.tar") and err.value.offset == header
    assert f"byte offset {header}" in str(err.value)


def test_truncated_shard_lenient(cut_dataset):
    path, header = cut_dataset
    with pytest.warns(UserWarning, match=f"00001.tar: .*byte offset {header}"):
        frame = load(path, strict=False).metadata.compute()
    part = frame[frame["_shard"] == str(path / "00001.tar")]
    assert part["key"].tolist() == [f"{i:09d}" for i in range(10, 14)]
    other = frame[frame["_shard"] == str(path / "00000.tar")]
    assert len(other) == 10


def test_truncated_shard_lenient_with_sidecar(demo_dir, copy_dataset):
    """The sidecar's rows of records lost with the damage are dropped, not a mismatch."""
    path = copy_dataset(demo_dir)
    tar = path / "00001.tar"
    full = load(path).metadata.compute()
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])
    with pytest.raises(TarFormatError):
        load(path).metadata.compute()
    with pytest.warns(UserWarning, match=r"00001.tar: .*kept the \d+ complete records.*sidecar"):
        frame = load(path, strict=False).metadata.compute()
    part = frame[frame["_shard"] == str(tar)]
    assert 0 < len(part) < 12
    before = full[full["_shard"] == str(tar)].head(len(part))
    assert part["key"].tolist() == before["key"].tolist()
    assert part["caption"].tolist() == before["caption"].tolist()  # sidecar values kept
    assert len(frame) == 24 + len(part)


def test_compressed_shard(tmp_path, demo_dir_nopq):
    data = (demo_dir_nopq / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(gzip.compress(data))
    with pytest.raises(CompressedTarError, match="compressed") as err:
        load(tmp_path).metadata.compute()
    assert "gzip" in str(err.value) and "00000.tar" in str(err.value)


# --- sidecar mismatch -------------------------------------------------------------------------


def test_parquet_mismatch(tmp_path):
    records = demo.make_shard_records(0, 30)
    demo.write_shard(tmp_path / "00000.tar", records[:28])  # tar: 0..27
    demo.write_parquet(tmp_path / "00000.parquet", records[14:])  # parquet: 14..29
    with pytest.raises(MetadataMismatchError) as err:
        load(tmp_path).metadata.compute()
    msg = str(err.value)
    assert str(tmp_path / "00000.tar") in msg
    assert "14 records in the tar" in msg and "2 Parquet rows" in msg
    listed = [f"{i:09d}" for i in range(10)]
    assert all(k in msg for k in listed)
    assert f"{10:09d}" not in msg  # at most 10 ids listed
    assert f"{28:09d}" in msg and f"{29:09d}" in msg

    assert "leading zeros" not in msg
    with pytest.warns(ShardWarning, match="dropped those 14 records and 2 Parquet rows"):
        frame = load(tmp_path, on_mismatch="drop").metadata.compute()
    assert frame["key"].tolist() == [f"{i:09d}" for i in range(14, 28)]
    captions = {r["__key__"]: r["txt"] for r in records}
    assert frame["caption"].tolist() == [captions[k] for k in frame["key"]]
    image_offsets = {k: v["members"][0][1] for k, v in tar_records(tmp_path / "00000.tar").items()}
    assert frame["_image_offset"].tolist() == [image_offsets[k] for k in frame["key"]]
    with pytest.raises(ValueError):
        load(tmp_path, on_mismatch="ignore")


def test_integer_ids_in_the_sidecar_get_a_hint(tmp_path):
    """Ids written as integers lose the keys' zero-padding: the mismatch says so."""
    records = demo.make_shard_records(0, 12)
    demo.write_shard(tmp_path / "00000.tar", records)
    demo.write_parquet(tmp_path / "00000.parquet", records)
    table = pq.read_table(tmp_path / "00000.parquet")
    ids = pa.array([int(k) for k in table.column("key").to_pylist()], pa.int64())
    pq.write_table(
        table.set_column(table.column_names.index("key"), "key", ids), tmp_path / "00000.parquet"
    )
    hint = r"the Parquet's ids are the tar's keys without their leading zeros: written as integers"
    with pytest.raises(MetadataMismatchError, match=rf"12 records in the tar .*\({hint}"):
        load(tmp_path).metadata.compute()


def test_img2dataset_rows_of_samples_not_downloaded_are_no_mismatch(tmp_path):
    """img2dataset's Parquet lists every sample it tried; those with a status other than
    "success" have no record in the tar. A successful one missing is still a mismatch."""
    records = demo.make_shard_records(0, 6)
    for failed in (records[1], records[4]):
        failed["json"]["status"] = "failed_to_download"
    demo.write_shard(tmp_path / "00000.tar", [records[i] for i in (0, 2, 3, 5)])
    demo.write_parquet(tmp_path / "00000.parquet", records)
    frame = load(tmp_path).metadata.compute()
    assert frame["key"].tolist() == [f"{i:09d}" for i in (0, 2, 3, 5)]
    assert (frame["status"] == "success").all()
    records[4]["json"]["status"] = "success"  # said to be downloaded, but not in the tar
    demo.write_parquet(tmp_path / "00000.parquet", records)
    with pytest.raises(MetadataMismatchError, match=r"1 Parquet rows have no record in the tar"):
        load(tmp_path).metadata.compute()


# --- save_metadata ----------------------------------------------------------------------------


def _with_score(ds: ImageTextPairDataset) -> ImageTextPairDataset:
    meta = ds.metadata
    return ds.with_metadata(meta.assign(score=(meta["width"] * 2 + meta["height"]).astype("Int64")))


def test_save_metadata_overwrites_own_parquet(demo_dir, copy_dataset):
    path = copy_dataset(demo_dir)
    ds = _with_score(load(path))
    expected = ds.metadata.compute()
    result = ds.save_metadata()
    assert result["path"].tolist() == [str(path / f"0000{i}.parquet") for i in range(3)]
    assert result["rows"].tolist() == [12, 12, 12]
    assert result["errors"].tolist() == [0, 0, 0]  # no error column
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [f"0000{i}.tar" for i in range(3)] + [f"0000{i}.parquet" for i in range(3)]
    )  # no temporary files left
    saved = pa.concat_tables([pq.read_table(path / f"0000{i}.parquet") for i in range(3)])
    user = ["key", "caption", "url", "width", "height", "status", "score"]
    assert saved.column_names == user
    assert saved.to_pandas()["score"].tolist() == expected["score"].tolist()
    assert saved.column("key").to_pylist() == expected["key"].tolist()

    reloaded = load(path).metadata.compute()
    assert list(reloaded.columns) == user + BOOK
    pd.testing.assert_frame_equal(
        reloaded[user].reset_index(drop=True), expected[user].reset_index(drop=True)
    )


def test_save_metadata_is_atomic(demo_dir, copy_dataset, monkeypatch):
    path = copy_dataset(demo_dir)
    originals = {p.name: p.read_bytes() for p in path.glob("*.parquet")}
    ds = _with_score(load(path))

    def crash(table, where, *args, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pq, "write_table", crash)
    # synchronous: with threads, compute re-raises the first failure while another task may
    # still be inside its own write, whose temporary file it removes a moment later
    with pytest.raises(OSError, match="simulated"), dask.config.set(scheduler="synchronous"):
        ds.save_metadata()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.glob("*.parquet")} == originals
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [f"0000{i}.tar" for i in range(3)] + list(originals)
    )
    assert len(load(path).metadata.compute()) == 36


def test_save_metadata_explicit_path_and_columns(demo_dir_nopq, tmp_path):
    ds = load(demo_dir_nopq)
    out = tmp_path / "out"
    result = ds.save_metadata(str(out), columns=["caption", "width", "key"])
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00001.parquet"]
    assert result["shard"].tolist() == ds.tar_files
    frame = ds.metadata.compute()
    for i, tar in enumerate(ds.tar_files):
        table = pq.read_table(out / f"0000{i}.parquet")
        assert table.column_names == ["key", "caption", "width"]
        rows = frame[frame["_shard"] == tar]
        assert table.column("key").to_pylist() == rows["key"].tolist()
        assert table.column("caption").to_pylist() == rows["caption"].tolist()
        assert table.column("width").to_pylist() == rows["width"].tolist()
    assert not list(demo_dir_nopq.glob("*.parquet"))
    with pytest.raises(KeyError, match="nope"):
        ds.save_metadata(str(out), columns=["nope"])
    with pytest.raises(ValueError, match=r"\['_shard'\] are bookkeeping columns"):
        ds.save_metadata(str(tmp_path / "bookkeeping"), columns=["caption", "_shard"])
    assert not (tmp_path / "bookkeeping").exists()


def test_save_metadata_file_names_follow_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for stem, start in (("00042", 0), ("shard-x", 5)):
        demo.write_shard(src / f"{stem}.tar", demo.make_shard_records(start, 5))
    ds = load(src)
    filtered = ds.with_metadata(ds.metadata[ds.metadata["width"] >= 200])
    expected = filtered.metadata.compute()
    assert 0 < len(expected) < 10  # the filter really dropped rows
    result = filtered.save_metadata(str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00042.parquet",
        "shard-x.parquet",
    ]
    saved = pd.concat(
        [pq.read_table(tmp_path / "out" / n).to_pandas() for n in result["path"]],
        ignore_index=True,
    )
    assert saved["key"].tolist() == expected["key"].tolist()
    assert result["rows"].sum() == len(expected)
    assert "_members" not in saved.columns and "_shard" not in saved.columns


@pytest.mark.parametrize("scheduler", ["synchronous", "cluster"])
def test_save_metadata_gives_a_shard_filtered_empty_its_file(tmp_path, scheduler):
    """Every loaded shard gets a Parquet, one whose rows were all filtered out an empty one
    (each task learns its partition's shards from a Delayed shared by all the tasks)."""
    src = tmp_path / "src"
    src.mkdir()
    for n in range(3):
        demo.write_shard(src / f"0000{n}.tar", demo.make_shard_records(5 * n, 5))
    ds = load(src)
    gone = str(src / "00001.tar")
    filtered = ds.with_metadata(ds.metadata[ds.metadata["_shard"] != gone])
    out = tmp_path / "out"
    if scheduler == "cluster":
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c:
            with Client(c):
                result = filtered.save_metadata(str(out))
    else:
        with dask.config.set(scheduler="synchronous"):
            result = filtered.save_metadata(str(out))
    assert result["rows"].tolist() == [5, 0, 5]
    assert sorted(p.name for p in out.iterdir()) == [f"0000{n}.parquet" for n in range(3)]
    assert pq.read_table(out / "00001.parquet").num_rows == 0
    assert (
        pq.read_table(out / "00002.parquet").column("key").to_pylist()
        == (ds.metadata.compute()["key"].tolist()[10:])
    )


@pytest.mark.parametrize("reshape", ["repartition", "sort_values"])
def test_save_metadata_of_a_reshaped_frame_keeps_every_row(demo_dir, tmp_path, reshape):
    """A shard's rows spread over several partitions all reach its one Parquet file."""
    ds = _with_score(load(demo_dir))
    meta = ds.metadata
    odd = meta["key"].str.slice(-1).astype(int) % 2 == 1
    meta = meta.assign(error=meta["key"].where(odd, None))  # counted per shard when saved
    if reshape == "repartition":
        meta = meta.repartition(npartitions=7)  # splits every shard
    else:  # a unique sort key: the same order in every computation
        meta = meta.assign(rank=meta["score"] * 1000 + meta["key"].str.slice(6).astype(int))
        meta = meta.sort_values("rank", npartitions=3)
    frame = meta.compute()
    partitions_per_shard = (
        pd.concat(
            [
                p[["_shard"]].assign(partition=i)
                for i, p in enumerate(dask.compute(*meta.to_delayed()))
            ]
        )
        .groupby("_shard")["partition"]
        .nunique()
    )
    assert partitions_per_shard.max() > 1
    result = ds.with_metadata(meta).save_metadata(str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"0000{i}.parquet" for i in range(3)
    ]  # one file per shard, no fragments left
    for tar, path, rows, errors in result.itertuples(index=False):
        saved = pq.read_table(path).to_pandas()
        expected = frame[frame["_shard"] == tar]
        assert rows == len(saved) == len(expected) == 12
        assert errors == saved["error"].notna().sum() == expected["error"].notna().sum() == 6
        assert saved["key"].tolist() == expected["key"].tolist()  # in the frame's order
        assert saved["score"].tolist() == expected["score"].tolist()


def test_save_metadata_of_categoricals_split_across_partitions_reloads(tmp_path):
    """A shard whose rows sit in two partitions, each with its own 100 categories (int8
    codes): its merged Parquet holds 200, and must be readable (it was written with int8
    indices, which no reader could read back, replacing the sidecar with path=None)."""
    src = tmp_path / "src"
    demo.make_demo_dataset(src, n_shards=1, samples_per_shard=200, seed=2)
    ds = load(src)
    meta = ds.metadata.repartition(npartitions=2)
    meta = meta.assign(text=(meta["caption"] + " #" + meta["key"]).astype("category"))
    expected = meta.compute()
    with dask.config.set(scheduler="synchronous"):
        result = ds.with_metadata(meta).save_metadata()
    assert result["rows"].tolist() == [200]
    table = pq.read_table(src / "00000.parquet")
    assert pa.types.is_dictionary(table.schema.field("text").type)
    assert table.column("text").to_pylist() == expected["text"].astype(str).tolist()
    reloaded = load(src).metadata.compute()
    assert reloaded["text"].astype(str).tolist() == expected["text"].astype(str).tolist()


def test_decimal_columns_keep_their_type_through_a_reload_and_a_second_save(tmp_path):
    """Decimals loaded as Python objects were saved again with a precision inferred from each
    partition's values (decimal128(2, 2) for one shard, (3, 2) for the next): the dataset
    then failed to load ('does not fit in precision 2'), and so did an export of it."""
    src = tmp_path / "src"
    demo.make_demo_dataset(src, n_shards=2, samples_per_shard=4, seed=1)
    kind = pa.decimal128(10, 2)
    for i, parquet in enumerate(sorted(src.glob("*.parquet"))):  # 0.0x, then 9.0x
        table = pq.read_table(parquet)
        prices = [decimal.Decimal(9 * i) + decimal.Decimal(k) / 100 for k in range(len(table))]
        pq.write_table(table.append_column("price", pa.array(prices, kind)), parquet)
    ds = load(src)
    expected = ds.metadata.compute()["price"].tolist()
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=4)
        ds.save_metadata()
    for path in (src, tmp_path / "out"):
        assert {pq.read_schema(p).field("price").type for p in path.glob("*.parquet")} == {kind}
        assert load(path).metadata.compute()["price"].tolist() == expected
    assert ds.metadata.dtypes["price"] == pd.ArrowDtype(kind)  # no Python objects


def test_python_decimal_objects_are_refused_before_writing(tmp_path):
    """A user's object column of Decimals gets, from pyarrow, each partition's own precision
    (decimal128(1, 1) for 0.5, (5, 2) for 123.45): the sidecars saved in place then never
    load together. Refused before any file changes, with the cast that fixes it."""
    src = tmp_path / "src"
    demo.make_demo_dataset(src, n_shards=2, samples_per_shard=4, seed=1)
    ds = load(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}

    def add_prices(df):
        second = df["_shard"].astype(str).str.endswith("00001.tar")
        prices = [decimal.Decimal("123.45") if s else decimal.Decimal("0.5") for s in second]
        return df.assign(price=pd.Series(prices, index=df.index, dtype=object))

    meta = ds.metadata._meta.assign(price=pd.Series([], dtype=object))
    ds.metadata = ds.metadata.map_partitions(add_prices, meta=meta)
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(TypeError, match="'price' holds Python Decimal objects"):
            ds.save_metadata()
        with pytest.raises(TypeError, match="'price' holds Python Decimal objects"):
            ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=4)
        assert {p.name: p.read_bytes() for p in src.iterdir()} == before
        kind = pa.decimal128(38, 2)
        typed = ds.metadata.assign(price=ds.metadata["price"].astype(pd.ArrowDtype(kind)))
        ds.metadata = typed
        ds.save_metadata()  # the cast the message suggests
    reloaded = load(src).metadata.compute()
    assert {pq.read_schema(p).field("price").type for p in src.glob("*.parquet")} == {kind}
    want = ["0.5"] * 4 + ["123.45"] * 4
    assert [str(v.normalize()) for v in reloaded["price"]] == want


@pytest.mark.parametrize("how", ["merge", "concat"])
def test_save_metadata_refuses_repeated_ids_before_writing(demo_dir, copy_dataset, how):
    """Two rows for one record (a merge with a table that repeats a key; a dataset's
    metadata concatenated twice, its shard's rows then in two partitions) made a sidecar
    that repeats ids, which never loads again (whatever on_mismatch): refused, and the
    dataset's own sidecars are left as they were."""
    path = copy_dataset(demo_dir)
    ds = load(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    meta = ds.metadata
    if how == "merge":
        scores = pd.DataFrame({"key": pd.array(["000000013"] * 2, "string"), "s": [1.0, 2.0]})
        meta = meta.merge(scores, on="key", how="left")
        repeated = r"\['000000013'\] of .*00001\.tar"
    else:
        meta = dd.concat([meta, meta.partitions[2]])
        repeated = r"\['000000024', .* of .*00002\.tar"
    with pytest.raises(ValueError, match=rf"several rows for records {repeated}"):
        with dask.config.set(scheduler="synchronous"):
            ds.with_metadata(meta).save_metadata()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # no fragment left
    assert len(load(path).metadata.compute()) == 36


def test_save_metadata_to_another_filesystem(demo_dir_nopq, tmp_path):
    """``path`` names its own filesystem (here memory://, for a local dataset)."""
    ds = load(demo_dir_nopq)
    target = f"memory:///{tmp_path.name}/meta"
    result = ds.save_metadata(target)
    memory = fsspec.filesystem("memory")
    assert sorted(memory.ls(f"/{tmp_path.name}/meta", detail=False)) == [
        f"/{tmp_path.name}/meta/0000{i}.parquet" for i in range(2)
    ]
    assert result["path"].tolist() == [f"{target}/0000{i}.parquet" for i in range(2)]
    with memory.open(f"/{tmp_path.name}/meta/00001.parquet", "rb") as f:
        keys = pq.read_table(f).column("key").to_pylist()
    frame = ds.metadata.compute()
    assert keys == frame[frame["_shard"] == ds.tar_files[1]]["key"].tolist()
    assert not (Path.cwd() / tmp_path.name).exists() and not list(tmp_path.iterdir())


def test_save_metadata_refuses_two_shards_of_one_name(tmp_path):
    """a/00000.tar and b/00000.tar saved to one directory would be one file: refused,
    nothing written (it lost one shard's rows silently)."""
    for name, start in (("a", 0), ("b", 5)):
        (tmp_path / name).mkdir()
        demo.write_shard(tmp_path / name / "00000.tar", demo.make_shard_records(start, 3))
    ds = ImageTextPairDataset.from_webdataset([str(tmp_path / n / "00000.tar") for n in "ab"])
    with pytest.raises(ValueError, match=r"would both be saved as .*00000\.parquet"):
        ds.save_metadata(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # not even the directory
    ds.save_metadata()  # beside their tars: no clash
    assert pq.read_table(tmp_path / "b" / "00000.parquet").column("key").to_pylist() == [
        f"{i:09d}" for i in range(5, 8)
    ]


def test_object_column_null_in_some_partitions_saves_and_reloads(demo_dir_nopq, tmp_path):
    """A pandas object column is typed per partition: all None there is Arrow null. Saved
    fragments of a sorted frame merge (null promotes to the type); a shard's file whose rows
    are all None has the type the others give the column (it was typed null, and reading the
    directory as one dataset failed: 'Unsupported cast from list<element: string> to null'),
    and loading types such a column from the sidecars, not ``string``."""
    ds = load(demo_dir_nopq)
    meta = ds.metadata

    def tags(frame: pd.DataFrame) -> pd.Series:
        first = frame["_shard"].str.endswith("00000.tar")
        values = [None if f else [k[-1], "x"] for k, f in zip(frame["key"], first)]
        return pd.Series(values, index=frame.index, dtype=object)

    meta = meta.assign(tags=meta.map_partitions(tags, meta=("tags", object)))
    expected = meta.compute().set_index("key")["tags"]
    for name, frame in (("plain", meta), ("sorted", meta.sort_values("width"))):
        out = tmp_path / name
        shutil.copytree(demo_dir_nopq, out)
        ds.with_metadata(frame).save_metadata(str(out))
        files = sorted(out.glob("*.parquet"))
        (kind,) = {pq.read_schema(p).field("tags").type for p in files}
        assert pa.types.is_list(kind) and kind.value_type == pa.string()
        assert pq.read_table(files).column("tags").null_count == 10  # one dataset
        reloaded = load(out).metadata.compute()
        assert reloaded["tags"].dtype == pd.ArrowDtype(pa.list_(pa.string()))
        assert reloaded["key"].tolist() == expected.index.tolist()
        for key, value in zip(reloaded["key"], reloaded["tags"]):
            assert (None if value is pd.NA else list(value)) == expected[key]


def test_save_then_reload_no_parquet_dataset(demo_dir_nopq, copy_dataset):
    path = copy_dataset(demo_dir_nopq)
    ds = _with_score(load(path))
    expected = ds.metadata.compute()
    ds.save_metadata()
    assert sorted(p.name for p in path.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    reloaded = load(path).metadata.compute()
    assert reloaded["score"].tolist() == expected["score"].tolist()
    assert reloaded["caption"].tolist() == expected["caption"].tolist()
    assert reloaded["_image_offset"].tolist() == expected["_image_offset"].tolist()


# --- remote (fsspec) storage ----------------------------------------------------------------


@pytest.fixture
def memory_copy(demo_dir_nopq, request):
    """The no-parquet demo copied into fsspec's in-memory filesystem (the non-local path)."""
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    root = f"/imgcurate-{request.node.name}"
    for f in demo_dir_nopq.iterdir():
        mem.pipe(f"{root}/{f.name}", f.read_bytes())
    yield mem, root
    mem.rm(root, recursive=True)


def test_remote_storage_matches_local(memory_copy, demo_dir_nopq, tmp_path):
    mem, root = memory_copy
    url = f"memory://{root}"
    ds = load(url)
    assert ds.tar_files == [f"memory://{root}/0000{i}.tar" for i in range(2)]
    remote = ds.metadata.compute()
    local = load(demo_dir_nopq).metadata.compute()
    assert remote["_shard"].tolist()[0] == ds.tar_files[0]
    pd.testing.assert_frame_equal(remote.drop(columns=PLACE), local.drop(columns=PLACE))

    from dask_imgcurate import write_dali_index

    assert write_dali_index(f"{url}/00000.tar") == f"memory://{root}/00000.idx"
    local_idx = write_dali_index(str(demo_dir_nopq / "00000.tar"), str(tmp_path / "l.idx"))
    assert mem.cat_file(f"{root}/00000.idx") == Path(local_idx).read_bytes()
    assert pd.testing.assert_frame_equal(load(url).metadata.compute(), remote) is None
    result = ds.save_metadata()
    assert result["path"].tolist() == [f"memory://{root}/0000{i}.parquet" for i in range(2)]
    reloaded = load(url).metadata.compute()
    pd.testing.assert_frame_equal(reloaded.drop(columns=PLACE), local.drop(columns=PLACE))


# --- paths ------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError, match="no-such.tar"):
        load(tmp_path / "no-such.tar")


def test_missing_shard_in_list(demo_dir):
    tars = [str(demo_dir / "00000.tar"), str(demo_dir / "zz-missing.tar")]
    with pytest.raises(FileNotFoundError, match="no such shard: .*zz-missing.tar"):
        ImageTextPairDataset.from_webdataset(tars)  # at once, not at compute time
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        ImageTextPairDataset.from_webdataset([str(demo_dir / "elsewhere" / "00000.tar")])


def test_a_shard_file_missing_on_a_worker_is_explained(copy_dataset, demo_dir):
    """A tar or sidecar listed when loading but missing where a partition is computed (a
    worker that does not see the client's files, or a file removed since) names the file,
    where it was missed and what workers need, instead of a bare errno message."""
    ds_dir = copy_dataset(demo_dir)
    ds = ImageTextPairDataset.from_webdataset(str(ds_dir))
    (ds_dir / "00001.parquet").unlink()
    match = r"00001\.parquet: a file of this shard, listed when the dataset was loaded, is missing"
    with pytest.raises(FileNotFoundError, match=match) as info:
        ds.metadata.compute(scheduler="sync")
    assert "every worker must see the input and output at the same paths" in str(info.value)
    (ds_dir / "00001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"00001\.tar: a file of this shard"):
        ds.metadata.compute(scheduler="sync")


def test_directory_without_shards(tmp_path):
    (tmp_path / "notes.txt").write_text("not a shard")
    (tmp_path / "00000.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        load(f"{tmp_path}/*.tar")
    with pytest.raises(FileNotFoundError, match="no .tar shards found: the list of paths is empty"):
        ImageTextPairDataset.from_webdataset([])  # e.g. glob.glob that matched nothing


# --- backend ----------------------------------------------------------------------------------


@pytest.fixture
def fake_find_spec(monkeypatch):
    """Make ``importlib.util.find_spec('cudf')`` report cudf as installed or not."""
    real = importlib.util.find_spec

    def install(present: bool):
        def find_spec(name, *args, **kwargs):
            if name == "cudf":
                return object() if present else None
            return real(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return install


@pytest.fixture
def fake_gpu(monkeypatch):
    torch = pytest.importorskip("torch")

    def set_gpu(present: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: present)

    return set_gpu


@pytest.mark.parametrize(
    ("has_cudf", "has_gpu", "expected"),
    [
        (True, True, "cudf"),
        (True, False, "pandas"),
        (False, True, "pandas"),
        (False, False, "pandas"),
    ],
)
def test_auto_backend_logic(fake_find_spec, fake_gpu, has_cudf, has_gpu, expected, monkeypatch):
    fake_find_spec(has_cudf)
    fake_gpu(has_gpu)
    for name in ("cudf", "dask_cudf"):  # stand-ins that import
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    assert backend_mod.resolve_backend("auto") == expected


def test_auto_backend_falls_back_when_cudf_fails_to_import(fake_find_spec, fake_gpu, monkeypatch):
    fake_find_spec(True)
    fake_gpu(True)
    monkeypatch.setitem(sys.modules, "cudf", types.ModuleType("cudf"))
    monkeypatch.setitem(sys.modules, "dask_cudf", None)  # import raises ImportError
    with pytest.warns(UserWarning, match="cudf cannot be used .*: the metadata uses pandas"):
        assert backend_mod.resolve_backend("auto") == "pandas"
    with pytest.raises(ImportError, match="needs cudf and dask-cudf"):
        backend_mod.resolve_backend("cudf")


def test_backend_on_this_machine(demo_dir):
    if importlib.util.find_spec("cudf") is not None:
        pytest.skip("cudf is installed here")
    assert backend_mod.resolve_backend("auto") == "pandas"
    assert backend_mod.resolve_backend() == "pandas"
    assert backend_mod.resolve_backend("pandas") == "pandas"
    with pytest.raises(ImportError, match=r"cudf.*pip install"):
        backend_mod.resolve_backend("cudf")
    with pytest.raises(ImportError, match="cudf"):
        load(demo_dir, backend="cudf")
    part = load(demo_dir, backend="auto").metadata.partitions[0].compute()
    assert isinstance(part, pd.DataFrame)


def test_cudf_requested_but_missing(fake_find_spec, fake_gpu):
    fake_find_spec(False)
    fake_gpu(True)
    with pytest.raises(
        ImportError, match=r"backend='cudf' needs cudf and dask-cudf .*: pip install"
    ):
        backend_mod.resolve_backend("cudf")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend_mod.resolve_backend("polars")


def test_user_columns_starting_with_an_underscore_are_kept(tmp_path):
    """Only the reader's own columns are bookkeeping: a sidecar's ``_source`` and a
    ``.json``'s ``_id`` are data, loaded, saved back and exported; an index pandas stored
    as a column (``__index_level_0__``) is not data."""
    src = tmp_path / "src"
    src.mkdir()
    records = demo.make_shard_records(0, 4)
    for i, record in enumerate(records):
        record["json"] = json.dumps({"_id": f"mongo-{i}", "width": 7}).encode()
    demo.write_shard(src / "00000.tar", records)
    shutil.copytree(src, tmp_path / "pq")
    keys = [r["__key__"] for r in records]
    sidecar = pd.DataFrame({"key": keys, "_source": list("abcd")}, index=[9, 8, 7, 6])
    sidecar.to_parquet(tmp_path / "pq" / "00000.parquet")  # index stored as a column
    assert "__index_level_0__" in pq.read_schema(tmp_path / "pq" / "00000.parquet").names

    from_json = load(src).metadata.compute()
    assert from_json["_id"].tolist() == [f"mongo-{i}" for i in range(4)]
    ds = load(tmp_path / "pq")
    frame = ds.metadata.compute()
    assert "__index_level_0__" not in frame.columns
    assert frame["_source"].tolist() == list("abcd")
    ds.save_metadata()  # beside its tar: the column stays in the sidecar
    assert pq.read_table(tmp_path / "pq" / "00000.parquet").column_names == ["key", "_source"]
    ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=10)
    exported = pq.read_table(tmp_path / "out" / "00000.parquet")
    assert exported.column("_source").to_pylist() == list("abcd")


def test_sidecar_columns_named_like_bookkeeping_are_named_when_left_out(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    demo.write_shard(src / "00000.tar", demo.make_shard_records(0, 3))
    keys = [f"{i:09d}" for i in range(3)]
    pd.DataFrame(
        {"key": keys, "_shard": ["mine"] * 3, "_keep": [True] * 3, "x": [1, 2, 3]}
    ).to_parquet(src / "00000.parquet")
    with pytest.warns(ShardWarning, match=r"columns \['_shard', '_keep'\] have names the reader"):
        frame = load(src).metadata.compute()
    assert frame["x"].tolist() == [1, 2, 3] and set(frame["_shard"]) == {str(src / "00000.tar")}


def test_save_metadata_leaves_no_fragment_of_a_task_run_twice(demo_dir, tmp_path, monkeypatch):
    """A worker dies after writing a partition's fragment: Dask runs the task again, which
    writes another; the first, which nothing refers to, is removed too."""
    from dask_imgcurate import dataset as dataset_mod

    real = dataset_mod._MetadataWriter.__call__
    runs = []

    def twice(self, frame, groups=None, partition_info=None):
        if partition_info is not None and partition_info["number"] == 1 and not runs:
            runs.append(real(self, frame, groups, partition_info))  # lost with its worker
        return real(self, frame, groups, partition_info)

    monkeypatch.setattr(dataset_mod._MetadataWriter, "__call__", twice)
    written = load(demo_dir).save_metadata(str(tmp_path / "out"))
    assert runs and written["rows"].tolist() == [12, 12, 12]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"0000{i}.parquet" for i in range(3)
    ]

"""Export: to_webdataset / write_images, checked with independent readers on real bytes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
from pathlib import Path

import dask
import dask.dataframe as dd
import fsspec
import fsspec.implementations.local
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_imgcurate import ImageTextPairDataset, export
from dask_imgcurate.demo import make_demo_dataset, make_shard_records, write_shard
from dask_imgcurate.errors import (
    ColumnTypeConflict,
    CurateError,
    DuplicateKeyError,
    ShardChangedError,
    TooManyShards,
    WorkersKilled,
)
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io import writer
from dask_imgcurate.io.ranges import merge_ranges
from dask_imgcurate.io.writer import MAX_GAP, MAX_READ, MemberPlan, merged_reads, plan_shards


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_members(path) -> list[tuple[str, str]]:
    """(name, sha256) of every member, read with the standard library's tarfile."""
    with tarfile.open(path) as tf:
        return [(m.name, sha(tf.extractfile(m).read())) for m in tf.getmembers()]


def input_members(directory) -> dict[str, list[tuple[str, str]]]:
    """key -> [(extension, sha256)] over all input tars."""
    out: dict[str, list] = {}
    for tar in sorted(Path(directory).glob("*.tar")):
        for name, digest in tar_members(tar):
            key, _, ext = name.partition(".")
            out.setdefault(key, []).append((ext, digest))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """5 shards x 7 records with sidecar Parquet."""
    root = tmp_path_factory.mktemp("export-src")
    make_demo_dataset(root, n_shards=5, samples_per_shard=7, seed=3)
    return root


def keep_mask(frame: pd.DataFrame) -> pd.Series:
    return frame["width"] >= 200


def load_with_keep(source: Path) -> ImageTextPairDataset:
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    meta["keep"] = keep_mask(meta)
    ds.metadata = meta
    return ds


@pytest.mark.parametrize("per_shard", [1, 4, 7, 10, 100])
def test_to_webdataset_round_trip(source, tmp_path, per_shard):
    ds = load_with_keep(source)
    frame = ds.metadata.compute()
    kept = frame[keep_mask(frame)]
    out = tmp_path / "out"
    summary = ds.to_webdataset(
        str(out),
        filter_column="keep",
        samples_per_shard=per_shard,
        max_shards=3,
        old_id_col="old_key",
    )
    digits = math.ceil(math.log10(per_shard)) if per_shard > 1 else 0
    n_shards = math.ceil(len(kept) / per_shard)
    assert summary.records_in == len(frame)
    assert summary.records_out == len(kept)
    assert summary.dropped_by_filter == len(frame) - len(kept)
    assert summary.shards_written == n_shards
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [f"{n:03d}.tar" for n in range(n_shards)]
    originals = input_members(source)
    old_ids = kept["key"].tolist()  # input order: partitions in shard order, rows by id
    position = 0
    for n, tar in enumerate(tars):
        members = tar_members(tar)
        table = pq.read_table(tar.with_suffix(".parquet"))
        ids = table.column("key").to_pylist()
        expected_count = per_shard if n < n_shards - 1 else len(kept) - per_shard * n
        assert len(ids) == expected_count
        assert ids == [f"{n * 10**digits + i:0{3 + digits}d}" for i in range(len(ids))]
        assert table.column("old_key").to_pylist() == old_ids[position : position + len(ids)]
        # members in the order of the Parquet rows, bytes identical to the input's
        expected = []
        for new, old in zip(ids, table.column("old_key").to_pylist()):
            expected += [(f"{new}.{ext}", digest) for ext, digest in originals[old]]
        assert members == expected
        position += len(ids)
    assert position == len(kept)


@pytest.mark.parametrize("reshape", ["repartition", "sort_values"])
def test_reordered_metadata_exports_in_frame_order(source, tmp_path, reshape):
    """Partitions mixing records of several tars (repartitioned, or globally sorted by a
    score) export in the frame's order with every member's bytes intact."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    meta["score"] = meta["key"].map(lambda k: (int(k[:9]) * 7919) % 101, meta=("score", int))
    if reshape == "repartition":
        meta = meta.repartition(npartitions=2)
    else:
        meta = meta.sort_values("score", npartitions=3)
    frame = meta.compute()
    tars_per_partition = [part["_shard"].nunique() for part in dask.compute(*meta.to_delayed())]
    assert max(tars_per_partition) > 1
    summary = ds.with_metadata(meta).to_webdataset(
        str(tmp_path / "out"), samples_per_shard=8, old_id_col="old_key"
    )
    assert summary.records_out == len(frame)
    originals = input_members(source)
    got_old, got_members = [], []
    for tar in sorted((tmp_path / "out").glob("*.tar")):
        table = pq.read_table(tar.with_suffix(".parquet"))
        got_old += table.column("old_key").to_pylist()
        got_members += [digest for _, digest in tar_members(tar)]
    assert got_old == frame["key"].tolist()
    assert got_members == [d for old in got_old for _, d in originals[old]]


def test_gnu_tar_and_webdataset_read_output(source, tmp_path):
    ds = load_with_keep(source)
    out = tmp_path / "out"
    ds.to_webdataset(str(out), filter_column="keep", samples_per_shard=6, max_shards=2)
    tars = sorted(out.glob("*.tar"))
    for tar in tars:
        listing = subprocess.run(
            ["tar", "tf", str(tar)], capture_output=True, text=True, check=True
        )
        assert listing.stdout.split() == [name for name, _ in tar_members(tar)]
        extract = tmp_path / ("x-" + tar.stem)
        extract.mkdir()
        subprocess.run(["tar", "xf", str(tar), "-C", str(extract)], check=True)
        for name, digest in tar_members(tar):
            assert sha((extract / name).read_bytes()) == digest
    import webdataset as wds

    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    reference = [m for t in tars for m in tar_members(t)]
    got = [
        (f"{s['__key__']}.{ext}", sha(s[ext])) for s in samples for ext in ("jpg", "txt", "json")
    ]
    assert got == reference


def _dali_read(tars, idxs=None) -> list[tuple[str, str]]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, txt = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(i) for i in idxs] if idxs else None,
            ext=["jpg", "txt"],
            missing_component_behavior="error",
            name="reader",
        )
        return jpg, txt

    p = pipe()
    p.build()
    size = p.epoch_size("reader")
    out = []
    for _ in range(size):
        jpg, txt = p.run()
        out.append((sha(np.array(jpg[0]).tobytes()), sha(np.array(txt[0]).tobytes())))
    return out


def test_dali_reads_output_with_and_without_our_idx(source, tmp_path):
    ds = load_with_keep(source)
    out = tmp_path / "out"
    ds.to_webdataset(str(out), filter_column="keep", samples_per_shard=5, max_shards=2)
    tars = sorted(out.glob("*.tar"))
    idxs = [t.with_suffix(".idx") for t in tars]
    assert all(i.exists() for i in idxs)
    expected = []
    for t in tars:
        m = dict(tar_members(t))
        keys = sorted({name.split(".")[0] for name in m})
        expected += [(m[f"{k}.jpg"], m[f"{k}.txt"]) for k in keys]
    assert _dali_read(tars, idxs) == expected
    assert _dali_read(tars) == expected


def test_output_loads_back_as_dataset(source, tmp_path):
    ds = load_with_keep(source)
    out = tmp_path / "out"
    ds.to_webdataset(str(out), filter_column="keep", samples_per_shard=8, max_shards=4)
    back = ImageTextPairDataset.from_webdataset(str(out)).metadata.compute()
    frame = ds.metadata.compute()
    kept = frame[keep_mask(frame)].reset_index(drop=True)
    assert back["caption"].tolist() == kept["caption"].tolist()
    assert back["width"].tolist() == kept["width"].tolist()
    pd_frame = pd.read_parquet(out / "0000.parquet")  # pandas reads it too
    assert list(pd_frame["key"]) == [f"{i:05d}" for i in range(8)]


def test_partition_filtered_out_and_nothing_kept(source, tmp_path):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    meta["keep"] = meta["key"].str.slice(0, 9).astype(int) >= 14  # shards 0 and 1 drop out
    ds.metadata = meta
    out = tmp_path / "some"
    summary = ds.to_webdataset(str(out), filter_column="keep", samples_per_shard=10, max_shards=2)
    assert summary.records_out == 35 - 14
    assert pq.read_table(out / "00.parquet").column("key").to_pylist()[0] == "000"
    meta["none"] = False
    ds.metadata = meta
    empty = tmp_path / "none"
    with pytest.warns(UserWarning, match=r"no record of 35 was kept \(35 dropped by the filt"):
        summary = ds.to_webdataset(str(empty), filter_column="none")
    assert summary.records_out == 0 and summary.shards_written == 0
    assert not empty.exists() or not any(empty.iterdir())
    meta["error"] = "decode: broken"  # no filter, every record failed
    with pytest.warns(UserWarning, match=r"no record of 35 was kept \(35 for errors\)"):
        summary = ds.with_metadata(meta).to_webdataset(str(empty))
    assert summary.dropped_for_errors == 35 and summary.dropped_by_filter == 0


def test_filter_column_must_be_boolean_and_nulls_drop(source, tmp_path):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    for column in ("caption", "_image_size"):  # a string and an integer column
        with pytest.raises(TypeError, match=f"filter column '{column}' must be boolean"):
            ds.to_webdataset(str(tmp_path / column), filter_column=column)
        assert not (tmp_path / column).exists()
    meta = ds.metadata
    number = meta["key"].str.slice(0, 9).astype(int)
    meta["keep"] = (number % 3 == 0).astype("boolean").mask(number % 3 == 1)  # True/null/False
    ds.metadata = meta
    out = tmp_path / "out"
    summary = ds.to_webdataset(str(out), filter_column="keep", old_id_col="old")
    frame = ds.metadata.compute()
    expected = [k for k in frame["key"] if int(k[:9]) % 3 == 0]
    assert pq.read_table(out / "00000.parquet").column("old").to_pylist() == expected
    assert summary.records_out == len(expected) and summary.dropped_by_filter == 35 - len(expected)


def test_export_into_the_input_directory_is_refused(source, tmp_path):
    shutil.copytree(source, tmp_path / "in")
    (tmp_path / "link").symlink_to(tmp_path / "in")

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.glob("in/*")}

    before = digests()
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "in"))
    for target in (tmp_path / "in", tmp_path / "link", f"{tmp_path}/in/"):
        with pytest.raises(ValueError, match="holds this dataset's input shards"):
            ds.to_webdataset(str(target), samples_per_shard=5)
        with pytest.raises(ValueError, match="holds this dataset's input shards"):
            ds.write_images(str(target))
    assert digests() == before
    summary = ds.to_webdataset(str(tmp_path / "in" / "curated"), samples_per_shard=5)
    assert summary.records_out == 35


def test_export_beside_the_files_of_symlinked_tars_is_refused(source, tmp_path):
    """A directory of links to tars elsewhere (the hub cache's layout): exporting into the
    directory the links point to would replace the real input files."""
    shutil.copytree(source, tmp_path / "files")
    (tmp_path / "links").mkdir()
    for tar in sorted((tmp_path / "files").glob("*.tar")):
        (tmp_path / "links" / tar.name).symlink_to(tar)
    before = {p.name: sha(p.read_bytes()) for p in (tmp_path / "files").iterdir()}
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "links"))
    for export_to in (ds.to_webdataset, ds.write_images):
        with pytest.raises(ValueError, match=r"files holds this dataset's input shards \(e\.g\."):
            export_to(str(tmp_path / "files"))
    assert {p.name: sha(p.read_bytes()) for p in (tmp_path / "files").iterdir()} == before
    assert ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=5).records_out == 35


def test_export_beside_any_file_a_link_leads_to_is_refused(source, tmp_path):
    """A chain of links (``links/x.tar -> hop/x.tar -> files/x.tar``) and symlinked sidecars:
    every directory on the way holds files the input reads."""
    shutil.copytree(source, tmp_path / "files")
    for name in ("hop", "links", "sidecars", "mixed"):
        (tmp_path / name).mkdir()
    for f in sorted((tmp_path / "files").iterdir()):
        (tmp_path / "hop" / f.name).symlink_to(f)
        (tmp_path / "links" / f.name).symlink_to(Path("..") / "hop" / f.name)  # relative
        if f.suffix == ".parquet":
            f.rename(tmp_path / "sidecars" / f.name)  # the sidecars live elsewhere
            f.symlink_to(tmp_path / "sidecars" / f.name)
    before = _digest_dir(tmp_path / "sidecars")
    chained = ImageTextPairDataset.from_webdataset(str(tmp_path / "links"))
    for target in ("hop", "files", "sidecars"):
        with pytest.raises(ValueError, match=f"{target} holds this dataset's input shards"):
            chained.to_webdataset(str(tmp_path / target))
    assert _digest_dir(tmp_path / "sidecars") == before
    assert chained.to_webdataset(str(tmp_path / "out")).records_out == 35


@pytest.mark.parametrize("persisted", [False, True])
def test_export_into_the_directory_of_a_concatenated_dataset_is_refused(
    source, tmp_path, persisted
):
    """The second dataset's shards are inputs too, though only the first one's are the
    dataset's own: found in the frame's graph, or (persisted: no graph to read) in the rows'
    ``_shard`` values before anything is written."""
    for name in ("a", "b"):
        shutil.copytree(source, tmp_path / name)
    a, b = (ImageTextPairDataset.from_webdataset(str(tmp_path / n)) for n in ("a", "b"))
    frame = dd.concat([a.metadata, b.metadata])
    both = a.with_metadata(frame.persist() if persisted else frame)
    before = {p.name: sha(p.read_bytes()) for p in (tmp_path / "b").iterdir()}
    for export_to in (both.to_webdataset, both.write_images):
        with pytest.raises(ValueError, match="holds this dataset's input shards"):
            export_to(str(tmp_path / "b"))
    assert {p.name: sha(p.read_bytes()) for p in (tmp_path / "b").iterdir()} == before
    assert both.to_webdataset(str(tmp_path / "out")).records_out == 70


def test_write_images_refuses_repeated_ids_in_one_tar(source, tmp_path):
    for name in ("a", "b"):  # two datasets whose ids are the same
        shutil.copytree(source, tmp_path / name)
    tars = [str(tmp_path / name / "00000.tar") for name in ("a", "b")]
    ds = ImageTextPairDataset.from_webdataset(tars)
    with pytest.raises(DuplicateKeyError, match=r"would hold records \['000000000', ") as err:
        ds.write_images(str(tmp_path / "images"), images_per_tar=100)
    assert f"'000000000' comes from {tars}" in str(err.value)  # both inputs named
    assert not list((tmp_path / "images").glob("*.parquet"))
    per_copy = len(ds.metadata) // 2
    summary = ds.write_images(str(tmp_path / "split"), images_per_tar=per_copy)  # a copy a tar
    assert summary.records_out == 2 * per_copy and summary.shards_written == 2
    renamed = ds.to_webdataset(str(tmp_path / "renamed"), samples_per_shard=100)
    assert renamed.records_out == 2 * per_copy


@pytest.mark.parametrize(
    "bad",
    ["laion.000000003", "", None, "/abs/3", "a/../3", "dir/", "http://x.org/3.jpg", "a\x00b"],
)
def test_write_images_refuses_ids_readers_cannot_key_back(source, tmp_path, bad):
    """``write_images`` names members after ids: an id with a dot in its last part would be
    split there by WebDataset readers (one record read as another, or as several); an empty
    one makes dot-files readers skip. Refused before anything is written, naming the record
    and its shard."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    meta = meta.assign(key=meta["key"].where(meta["key"] != "000000003", bad))
    with pytest.raises(ValueError, match=r"00000\.tar: record id .* write_images names members"):
        ds.with_metadata(meta).write_images(str(tmp_path / "images"))
    assert not list((tmp_path / "images").glob("*.tar"))
    renamed = ds.with_metadata(meta).to_webdataset(str(tmp_path / "wds"))
    assert renamed.records_out == len(meta)


def test_categorical_ids_and_error_texts_export(source, tmp_path):
    """Text stored as categories is text: ids (write_images checks them) and errors."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    error = meta["key"].where(meta["key"].str.endswith("3"), None)
    meta = meta.assign(key=meta["key"].astype("category"), error=error.astype("category"))
    summary = ds.with_metadata(meta).write_images(str(tmp_path / "images"), images_per_tar=100)
    n_errors = int(error.compute().notna().sum())
    assert summary.dropped_for_errors == n_errors > 0
    assert summary.records_out == len(meta) - n_errors
    flags = ds.metadata.assign(
        error=ds.metadata["key"].map(lambda k: k.endswith("3"), meta=("error", object))
    )
    with pytest.raises(TypeError, match=r"\d{5}\.tar: the metadata's 'error' column is bool"):
        ds.with_metadata(flags).to_webdataset(str(tmp_path / "flags"))  # object of booleans


def test_categoricals_of_over_127_values_across_partitions_export(tmp_path):
    """pandas codes each partition's categories with the narrowest integers (int8 up to
    127): an output shard fed by two partitions of 64 categories each holds 128, which an
    int8 dictionary cannot (the export failed combining them, after writing pieces)."""
    src = tmp_path / "src"
    make_demo_dataset(src, n_shards=2, samples_per_shard=64, seed=1)
    ds = ImageTextPairDataset.from_webdataset(str(src))
    meta = ds.metadata
    text = meta["caption"] + " #" + meta["key"]  # 128 distinct values
    meta = meta.assign(key=meta["key"].astype("category"), text=text.astype("category"))
    ds = ds.with_metadata(meta)
    expected = ds.metadata.compute()
    with dask.config.set(scheduler="synchronous"):
        wds = ds.to_webdataset(str(tmp_path / "wds"), samples_per_shard=1000, old_id_col="old")
        images = ds.write_images(str(tmp_path / "images"), images_per_tar=1000)
    assert wds.records_out == images.records_out == 128
    table = pq.read_table(tmp_path / "wds" / "00000.parquet")  # readable back
    assert table.column("old").to_pylist() == expected["key"].astype(str).tolist()
    assert table.column("text").to_pylist() == expected["text"].astype(str).tolist()
    assert pa.types.is_dictionary(table.schema.field("text").type)
    ids = [name.split(".")[0] for name, _ in tar_members(tmp_path / "wds" / "00000.tar")]
    assert ids[::3] == table.column("key").to_pylist()
    (parquet,) = (tmp_path / "images").glob("*.parquet")
    assert pq.read_table(parquet).column("text").to_pylist() == table.column("text").to_pylist()
    assert not [p for p in (tmp_path / "wds").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("layout", ["webdataset", "images"])
def test_a_column_null_in_one_output_shard_has_the_others_type_there(source, tmp_path, layout):
    """pyarrow types a pandas object column per partition: all None there is Arrow null. An
    output shard of only such rows had that type in its Parquet, list<string> in the others,
    and reading the directory as one dataset failed (pyarrow, pandas: 'Unsupported cast from
    list<element: string> to null'; polars, duckdb alike). Every shard's Parquet now has the
    one type, and a re-run still skips them all."""
    seconds = pd.ArrowDtype(pa.timestamp("s"))
    ds = ImageTextPairDataset.from_webdataset(str(source))

    def add(frame: pd.DataFrame) -> pd.DataFrame:
        first = frame["_shard"].str.endswith("00000.tar").tolist()
        tags = [None if f else [k[-1], "x"] for k, f in zip(frame["key"], first)]
        seen = pd.Series([0] * len(frame), index=frame.index).astype(seconds)  # read as ms
        return frame.assign(tags=pd.Series(tags, index=frame.index, dtype=object), seen=seen)

    meta = ds.metadata._meta.assign(
        tags=pd.Series([], dtype=object), seen=pd.Series([], dtype=seconds)
    )
    ds = ds.with_metadata(ds.metadata.map_partitions(add, meta=meta))
    expected = ds.metadata.compute()
    out = tmp_path / "out"
    with dask.config.set(scheduler="synchronous"):

        def export():  # shard 0: the first tar's rows
            if layout == "webdataset":
                return ds.to_webdataset(str(out), samples_per_shard=7)
            return ds.write_images(str(out), images_per_tar=7)

        export()
        files = sorted(out.glob("*.parquet"))
        written = {p: p.read_bytes() for p in files}
        assert export().shards_skipped == len(files)
        assert {p: p.read_bytes() for p in files} == written
        files[0].unlink()  # written again, beside shards skipped: typed as they are
        assert export().shards_skipped == len(files) - 1
    assert len(files) == 5
    (kind,) = {pq.read_schema(p).field("tags").type for p in files}
    assert pa.types.is_list(kind) and kind.value_type == pa.string()
    table = pq.read_table(files)  # one dataset: the directory's Parquet files
    assert table.column("tags").to_pylist()[:7] == [None] * 7
    want = [None if t is None else list(t) for t in expected["tags"]]
    assert [None if t is None else list(t) for t in table.column("tags").to_pylist()] == want
    assert pd.read_parquet(files)["tags"].isna().sum() == 7
    assert dd.read_parquet(str(out / "*.parquet"))["tags"].isna().sum().compute() == 7


def test_write_images_keeps_ids_with_dots_in_directories(source, tmp_path):
    import webdataset as wds

    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    ds = ds.with_metadata(meta.assign(key="v1.2/" + meta["key"]))
    ds.write_images(str(tmp_path / "images"), images_per_tar=100)
    (tar,) = (tmp_path / "images").glob("*.tar")
    keys = [sample["__key__"] for sample in wds.WebDataset(str(tar), shardshuffle=False)]
    assert keys == ["v1.2/" + k for k in meta["key"].compute()]


def test_old_id_col_must_not_be_the_id_column(source, tmp_path):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    with pytest.raises(ValueError, match="old_id_col='key' is the id column"):
        ds.to_webdataset(str(tmp_path / "a"), old_id_col="key")
    assert not (tmp_path / "a").exists()
    for bookkeeping in ("_shard", "_keep"):  # which from_webdataset would leave out
        with pytest.raises(ValueError, match=f"old_id_col='{bookkeeping}' is a bookkeeping"):
            ds.to_webdataset(str(tmp_path / "a"), old_id_col=bookkeeping)
        assert not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="replaces the metadata column"):
        ds.to_webdataset(str(tmp_path / "b"), samples_per_shard=100, old_id_col="caption")
    table = pq.read_table(tmp_path / "b" / "00000.parquet")
    assert table.column_names[:2] == ["key", "caption"]
    assert table.column("caption").to_pylist() == ds.metadata["key"].compute().tolist()


def test_error_rows_are_dropped_and_counted(source, tmp_path):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    meta["error"] = meta["key"].where(meta["key"].str.endswith("3"), None)
    meta["error"] = meta["error"].astype("string")
    ds.metadata = meta
    summary = ds.to_webdataset(str(tmp_path / "o"), samples_per_shard=100)
    frame = meta.compute()
    n_errors = int(frame["error"].notna().sum())
    assert n_errors > 0
    assert summary.dropped_for_errors == n_errors
    assert summary.records_out == len(frame) - n_errors
    ds.metadata = meta.assign(error=False)  # someone's own flag: it would drop every row
    for export_to in (ds.to_webdataset, ds.write_images):
        with pytest.raises(TypeError, match="'error' column is bool: exports drop every"):
            export_to(str(tmp_path / "flag"))
    assert not (tmp_path / "flag").exists()


def test_plan_shards_exact_sizes():
    plan = plan_shards([3, 0, 5, 2], 4)
    assert plan == [[(0, 0, 3), (2, 0, 1)], [(2, 1, 5)], [(3, 0, 2)]]
    assert plan_shards([0, 0], 4) == []
    with pytest.raises(ValueError):
        plan_shards([1], 0)
    # planning as partitions arrive: complete shards only, from a given shard on
    assert plan_shards([3, 0, 5], 4, complete_only=True) == plan[:2]
    assert plan_shards([3, 0, 5, 2], 4, first_shard=1) == plan[1:]
    assert plan_shards([3, 0, 5], 4, first_shard=2, complete_only=True) == []


def test_merged_reads_rules():
    offsets = [0, 100, 200 + MAX_GAP + 1, 0, 0, 100, MAX_READ - 50]
    sizes = [100, 100, 10, 5, 100, 10, 100]
    plan = MemberPlan(
        sources=["a", "b"],
        source=np.array([0, 0, 0, 1, 0, 0, 0]),
        offsets=np.array(offsets),
        sizes=np.array(sizes),
        names=pa.array([str(i) for i in range(7)]),
    )
    # adjacent | gap too wide | other source | backwards | read would pass MAX_READ
    assert list(merged_reads(plan)) == [
        (0, 2, 0, 200),
        (2, 3, offsets[2], offsets[2] + 10),
        (3, 4, 0, 5),
        (4, 6, 0, 110),
        (6, 7, MAX_READ - 50, MAX_READ + 50),
    ]
    # the limits are parameters (remote sources merge wider gaps, read less at once)
    assert list(merged_reads(plan, max_gap=MAX_GAP + 1))[0] == (0, 3, 0, offsets[2] + 10)
    assert list(merged_reads(plan, max_read=150))[:2] == [(0, 1, 0, 100), (1, 2, 100, 200)]


def test_merge_ranges_rules():
    starts, ends = [0, 50, 100, 400, 300, 400, 650], [100, 80, 200, 410, 310, 600, 850]
    # inside the read | adjacent | gap 200 | backwards | gap 90 | read would pass 500
    assert list(merge_ranges(starts, ends, max_gap=100, max_read=500)) == [
        (0, 3, 0, 200),
        (3, 4, 400, 410),
        (4, 6, 300, 600),
        (6, 7, 650, 850),
    ]
    assert list(merge_ranges(starts, ends, 100, 500, breaks=[False, True, *[False] * 5]))[:2] == [
        (0, 1, 0, 100),
        (1, 3, 50, 200),
    ]
    assert list(merge_ranges([0], [5000], 0, 10)) == [(0, 1, 0, 5000)]  # alone, may exceed
    assert list(merge_ranges([], [], 0, 10)) == []


def test_merged_spans_sorts_and_maps_back():
    offsets, sizes = [900, 0, 100, 0, 5000], [100, 100, 50, 100, 10]
    spans = fsio.merged_spans(offsets, sizes, max_gap=1000, max_read=1000)
    assert spans == [(0, 1000, [1, 3, 2, 0]), (5000, 5010, [4])]


def test_pwrite_all_batches_and_resumes_short_writes(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    batches = []

    def short_pwritev(fd, buffers, offset):  # writes half of what it is given (a full disk)
        batches.append(len(buffers))
        data = b"".join(bytes(b) for b in buffers)
        return real_pwrite(fd, data[: max(1, len(data) // 2)], offset)

    monkeypatch.setattr(writer, "_IOV_MAX", 3)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    chunks = [b"abc", b"", memoryview(b"xdefgh")[1:], bytearray(b"ij"), b"k" * 1000, b"l"]
    expected = b"".join(bytes(c) for c in chunks)
    with open(tmp_path / "out", "wb", buffering=0) as f:
        f.write(b"head")
        end = writer._pwrite_all(f.fileno(), list(chunks), 4)
    assert end == 4 + len(expected)
    assert (tmp_path / "out").read_bytes() == b"head" + expected
    assert max(batches) == 3 and len(batches) > 3


def test_embedding_a_stale_frame_fails_instead_of_dropping_its_records(tmp_path):
    """embed -> export of a persisted frame whose tar changed: an error naming the tar, not
    an export that quietly counts that tar's records as errors."""
    from dask_imgcurate import ClipImageEmbedder

    make_demo_dataset(tmp_path / "data", n_shards=2, samples_per_shard=4, seed=0)
    make_demo_dataset(tmp_path / "other", n_shards=2, samples_per_shard=6, seed=1)
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "data"))
    ds = ds.with_metadata(ds.metadata.persist())
    changed = tmp_path / "data" / "00001.tar"
    shutil.copyfile(tmp_path / "other" / "00001.tar", changed)
    with pytest.warns(UserWarning, match="random weights"):
        embedder = ClipImageEmbedder("dask-imgcurate-tiny", pretrained=None, device="cpu")
    with (
        dask.config.set(scheduler="synchronous"),
        pytest.raises(ShardChangedError, match=str(changed)),
    ):
        embedder(ds).to_webdataset(str(tmp_path / "out"))


def test_resume_rewrites_shards_of_a_tar_rewritten_with_the_same_layout(tmp_path):
    """Same member names and sizes, other bytes: the finished shards of the earlier export
    hold the old bytes, so a resume must not keep them."""
    src = tmp_path / "src"
    src.mkdir()

    def shard(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with tarfile.open(src / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(6):
                data = rng.bytes(1000)
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    shard(1)
    out = tmp_path / "out"
    ImageTextPairDataset.from_webdataset(str(src)).to_webdataset(str(out), samples_per_shard=3)
    shard(2)  # same layout, new bytes (and a new modification time)
    again = ImageTextPairDataset.from_webdataset(str(src)).to_webdataset(
        str(out), samples_per_shard=3
    )
    assert (again.shards_written, again.shards_skipped) == (2, 0)
    digests = sorted(d for tar in sorted(out.glob("*.tar")) for _, d in tar_members(tar))
    assert digests == sorted(d for _, d in tar_members(src / "00000.tar"))


def test_versions_cast_to_float_are_an_error_not_a_change(source, tmp_path):
    """A 64-bit digest cast to float64 loses bits: every tar would look changed."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    ds = ds.with_metadata(meta.assign(_shard_version=meta["_shard_version"].astype("float64")))
    with pytest.raises(TypeError, match="'_shard_version' column is double, not int64"):
        ds.to_webdataset(str(tmp_path / "out"))


def test_source_truncated_since_indexing_is_an_error_without_versions_too(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_shard(src / "00000.tar", make_shard_records(0, 3, seed=1))
    ds = ImageTextPairDataset.from_webdataset(str(src))
    ds.metadata = ds.metadata.persist()  # indexed now: the tar then shrinks
    with open(src / "00000.tar", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ShardChangedError, match="changed after it was indexed"):
        ds.to_webdataset(str(tmp_path / "out"))
    ds.metadata = ds.metadata.drop(columns="_shard_version")  # no version to check: reads
    with (
        pytest.warns(UserWarning, match="no '_shard_version' column"),
        pytest.raises(OSError, match="short read at byte offset"),  # come up short
    ):
        ds.to_webdataset(str(tmp_path / "out"))


def test_too_many_shards_for_max_shards(source, tmp_path):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    with pytest.raises(
        TooManyShards, match="need at least 35 output shards, more than max_shards=1 digits"
    ):
        ds.to_webdataset(str(tmp_path / "o"), samples_per_shard=1, max_shards=1)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(samples_per_shard=1e4), "samples_per_shard must be an integer, not 10000.0"),
        (dict(samples_per_shard="100"), "samples_per_shard must be an integer, not '100'"),
        (dict(max_shards=5.0), "max_shards must be an integer, not 5.0"),
        (dict(samples_per_shard=True), "samples_per_shard must be an integer, not True"),
        (dict(samples_per_shard=0), "samples_per_shard must be >= 1, not 0"),
        (dict(images_per_tar=2.5), "images_per_tar must be an integer, not 2.5"),
    ],
)
def test_shard_sizes_are_checked_before_any_work(source, tmp_path, monkeypatch, options, error):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    monkeypatch.setattr(export.selection, "select_partition", None)  # nothing may be read
    method = ds.write_images if "images_per_tar" in options else ds.to_webdataset
    with pytest.raises((TypeError, ValueError), match=error):
        method(str(tmp_path / "o"), **options)
    assert export.guards.positive_int("n", np.int64(3)) == 3  # numpy integers are integers


@pytest.mark.parametrize("per_shard", [1, 3, 7, 50])
def test_streamed_planning_equals_planning_at_once(per_shard, monkeypatch):
    """Shards planned as partitions arrive (in batches of any size) are the ones planned
    from all of them, and each call looks only at partitions not yet fully planned."""
    monkeypatch.setattr(export.planning, "PIECE_BYTES", 40)
    rng = np.random.default_rng(per_shard)
    counts = rng.integers(0, 12, size=400)
    counts[[3, 4, 17, 18, 19]] = 0  # partitions filtered out entirely
    stats = [(rng.integers(1, 30, size=c), c, 0, "") for c in counts]
    whole = export.planning.plan_pieces(stats, per_shard)
    planner, streamed, known, windows = export.planning.Planner(per_shard), [], 0, []
    real_plan = export.planning.plan_pieces
    monkeypatch.setattr(
        export.planning,
        "plan_pieces",
        lambda s, *a, **k: windows.append(len(s)) or real_plan(s, *a, **k),
    )
    while known < len(stats):
        known = min(len(stats), known + int(rng.integers(1, 5)))
        streamed += planner.complete(stats, known)
    streamed += planner.rest(stats)
    assert streamed == whole and len(whole) == -(-int(counts.sum()) // per_shard)
    # linear: re-planning from the first partition each time would look at ~30,000 here
    assert sum(windows) - len(stats) <= 8 * len(stats)


def _digest_dir(directory: Path) -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for p in sorted(directory.iterdir())}


def test_pieces_of_any_size_give_identical_bytes(source, tmp_path, monkeypatch):
    """A shard filled by many piece tasks (a record each here) equals one written whole."""
    ds = load_with_keep(source)
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "whole"), filter_column="keep", samples_per_shard=10)
    plans = []
    real = export.planning.plan_pieces
    monkeypatch.setattr(export.planning, "PIECE_BYTES", 1)
    monkeypatch.setattr(
        export.planning, "plan_pieces", lambda *a: plans.append(real(*a)) or plans[-1]
    )
    with dask.config.set(scheduler="threads", num_workers=4):
        ds.to_webdataset(str(tmp_path / "pieces"), filter_column="keep", samples_per_shard=10)
    first = plans[0][0]
    assert [piece[2] - piece[1] for piece in first.pieces] == [1] * 10  # a record each
    assert [piece[3] for piece in first.pieces] == list(range(10))  # positions in the shard
    offsets = [piece[4] for piece in first.pieces] + [first.tar_size - 1024]
    assert np.diff(offsets).tolist() == [piece[5] for piece in first.pieces]
    assert _digest_dir(tmp_path / "whole") == _digest_dir(tmp_path / "pieces")


def test_a_full_disk_names_the_file_and_publishes_nothing(source, tmp_path, monkeypatch):
    import errno

    def full(fd, chunks, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "_pwrite_all", full)
    ds = ImageTextPairDataset.from_webdataset(str(source))
    out = tmp_path / "out"
    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError) as err:
        ds.to_webdataset(str(out))
    assert err.value.errno == errno.ENOSPC
    assert f"No space left on device: writing {out}/.00000.tar.tmp-" in str(err.value)
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]


def _disk_full(*args, **kwargs):
    import errno

    # as pyarrow says it: an errno, no file name
    raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space")


@pytest.mark.parametrize(
    ("where", "written"),
    [
        ("end-of-archive", r"\.0000[01]\.tar\.tmp-"),  # the commit ends the pieces' tar
        ("idx", r"\.0000[01]\.idx\.tmp-"),
        ("parquet", r"\.0000[01]\.parquet\.tmp-"),
        ("spilled columns", r"\.rows-00000\d\.arrow\.tmp-"),
    ],
)
def test_a_full_disk_while_committing_names_the_file(source, tmp_path, monkeypatch, where, written):
    """ENOSPC after the pieces (the tar's end blocks, its .idx, its Parquet), or while the
    selected rows' other columns are set aside, named no file: ``[Errno 28] No space left on
    device``, from os.pwrite, a text file's flush or pyarrow. Now it names the one being
    written; nothing is published, nothing is left behind, and a re-run after space is
    freed writes what a clean run writes."""
    import builtins
    import errno

    ds = ImageTextPairDataset.from_webdataset(str(source))
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "clean"), samples_per_shard=20)
    out = tmp_path / "out"
    if where == "end-of-archive":
        monkeypatch.setattr(writer.os, "pwrite", _disk_full)
    elif where == "idx":  # the text file's write (its flush, on a real full disk)
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if ".idx.tmp-" in str(file):
                f.write = _disk_full
            return f

        monkeypatch.setattr(builtins, "open", open_)
    elif where == "parquet":
        monkeypatch.setattr(writer.pq, "write_table", _disk_full)
    else:
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):  # fsio.write_file's (reads pass)
            return (_disk_full if "w" in mode else real_open)(file, mode, *args, **kwargs)

        monkeypatch.setattr(fsio, "open", open_, raising=False)
    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError) as err:
        ds.to_webdataset(str(out), samples_per_shard=20)
    assert err.value.errno == errno.ENOSPC
    assert re.search(f": writing {re.escape(str(out))}/{written}", str(err.value))
    assert not out.exists() or not list(out.iterdir())  # no file, no lock
    monkeypatch.undo()
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(out), samples_per_shard=20)
    assert _digest_dir(out) == _digest_dir(tmp_path / "clean")


def test_a_full_disk_in_save_metadata_names_the_file(source, tmp_path, monkeypatch):
    """pyarrow's ENOSPC names no file: save_metadata's error now names the Parquet it was
    writing; no file is published or left, and the next run writes them all."""
    import errno

    from dask_imgcurate import dataset as dataset_module

    ds = ImageTextPairDataset.from_webdataset(str(source))
    out = tmp_path / "meta"
    monkeypatch.setattr(dataset_module.pq, "write_table", _disk_full)
    with dask.config.set(scheduler="synchronous"), pytest.raises(OSError) as err:
        ds.save_metadata(str(out))
    assert err.value.errno == errno.ENOSPC
    assert re.search(rf": writing {re.escape(str(out))}/\.\.0000\d\.parquet\.tmp-", str(err.value))
    assert not out.exists() or not list(out.iterdir())
    monkeypatch.undo()
    with dask.config.set(scheduler="synchronous"):
        ds.save_metadata(str(out))
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.parquet" for i in range(5)]


@pytest.mark.parametrize("layout", ["webdataset", "images"])
@pytest.mark.parametrize("change", ["rewritten", "touched"])
def test_a_tar_changed_after_indexing_is_refused(source, tmp_path, layout, change):
    """Persisted metadata holds byte offsets: when a tar is rewritten afterwards (another
    run of the tool that made it), copying at those offsets would put other bytes under the
    old names. The export refuses that tar, naming it; after a reload it exports the new
    bytes. A tar only touched (same bytes, new mtime) is refused too: the check cannot tell."""
    data = tmp_path / "data"
    shutil.copytree(source, data)
    other = tmp_path / "other"
    make_demo_dataset(other, n_shards=5, samples_per_shard=7, seed=4)  # same keys, new bytes
    before = input_members(data)
    ds = ImageTextPairDataset.from_webdataset(str(data))
    ds = ds.with_metadata(ds.metadata.persist())
    changed = data / "00002.tar"
    if change == "rewritten":
        shutil.copyfile(other / "00002.tar", changed)  # not the same size: other images
        assert changed.stat().st_size != (source / "00002.tar").stat().st_size
    else:
        os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 1))

    def export(dataset, out):
        if layout == "webdataset":
            return dataset.to_webdataset(str(out), samples_per_shard=3)
        return dataset.write_images(str(out), images_per_tar=3)

    out = tmp_path / "out"
    with dask.config.set(scheduler="synchronous"), pytest.raises(ShardChangedError) as err:
        export(ds, out)
    assert isinstance(err.value, CurateError)
    assert str(err.value).startswith(f"{changed} changed after it was indexed (")
    old = {digest for members in before.values() for _, digest in members}
    for tar in out.glob("*.tar"):  # shards published before the error hold old bytes only
        assert {digest for _, digest in tar_members(tar)} <= old
    # loaded again: the new bytes, at their new offsets
    summary = export(ImageTextPairDataset.from_webdataset(str(data)), tmp_path / "again")
    assert summary.records_out == 35
    now = input_members(data)
    copied = {}
    for tar in sorted((tmp_path / "again").glob("*.tar")):
        for name, digest in tar_members(tar):
            copied.setdefault(name.partition(".")[0], []).append(digest)
    assert sorted(d for digests in copied.values() for d in digests) == sorted(
        d for members in now.values() for _, d in members
    )


def test_a_tar_removed_after_indexing_is_named_by_the_export(source, tmp_path):
    """A tar deleted after its rows were indexed: the error says what the file is and where
    it was looked for (a worker that does not share the client's disk)."""
    data = tmp_path / "data"
    shutil.copytree(source, data)
    ds = ImageTextPairDataset.from_webdataset(str(data))
    ds = ds.with_metadata(ds.metadata.persist())
    gone = data / "00002.tar"
    gone.unlink()
    with (
        dask.config.set(scheduler="synchronous"),
        pytest.raises(FileNotFoundError, match=f"^{gone}: a source tar of this export, is"),
    ):
        ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=3)


def test_pieces_written_into_different_files_never_make_one_tar(source, tmp_path, monkeypatch):
    """A retried piece (its worker died after an earlier commit renamed the shard's file)
    creates the temporary file anew: the commit finds its pieces in different files and
    writes the shard whole, instead of publishing a tar with a hole of zeros."""
    ds = load_with_keep(source)
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "clean"), filter_column="keep", samples_per_shard=10)
    monkeypatch.setattr(export.planning, "PIECE_BYTES", 1)  # a piece per record
    real = export.run._write_piece
    gone = []

    def piece(part, start, stop, n, position, span, tar_tmp, job):
        result = real(part, start, stop, n, position, span, tar_tmp, job)
        if n == 1 and not gone:  # the file the first piece wrote into goes away
            os.remove(tar_tmp)
            gone.append(tar_tmp)
        return result

    monkeypatch.setattr(export.run, "_write_piece", piece)
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "out"), filter_column="keep", samples_per_shard=10)
    assert gone
    assert _digest_dir(tmp_path / "out") == _digest_dir(tmp_path / "clean")


def test_a_commit_retried_after_it_ended_the_tar_publishes_the_shard(source, tmp_path, monkeypatch):
    """A worker killed in a commit after it wrote the end-of-archive blocks: Dask runs the
    commit again elsewhere, which finds those zeros past the members and must go on."""
    ds = load_with_keep(source)
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "clean"), filter_column="keep", samples_per_shard=10)
    real_commit, real_write = export.run._commit, writer.pq.write_table
    died = []

    class Died(Exception):
        pass

    def commit(parts, slices, n, tar_tmp, job, starts):
        if n == 1 and not died:
            left = []

            def dying(*args, **kwargs):  # the Parquet is written after the tar's end blocks
                left.append(open(tar_tmp, "rb").read())  # what a SIGKILL would leave there
                raise Died

            monkeypatch.setattr(writer.pq, "write_table", dying)
            with pytest.raises(Died):
                real_commit(parts, slices, n, tar_tmp, job, starts)
            monkeypatch.setattr(writer.pq, "write_table", real_write)
            Path(tar_tmp).write_bytes(left[0])  # (the error's clean-up removed it)
            died.append(len(left[0]))
        return real_commit(parts, slices, n, tar_tmp, job, starts)  # the retry

    monkeypatch.setattr(export.run, "_commit", commit)
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "out"), filter_column="keep", samples_per_shard=10)
    assert died == [(tmp_path / "clean" / "00001.tar").stat().st_size]  # ended, unpublished
    assert _digest_dir(tmp_path / "out") == _digest_dir(tmp_path / "clean")


def test_a_second_export_into_a_directory_being_written_is_refused(source, tmp_path):
    """It would remove the running export's temporary files (holes in its tars)."""
    ds = load_with_keep(source)
    out = tmp_path / "out"
    local = fsspec.filesystem("file")
    with fsio.writing_to(local, str(out)):  # as a running export holds it
        for export_to in (ds.to_webdataset, ds.write_images):
            with pytest.raises(
                CurateError, match="another export or save_metadata is writing there now"
            ):
                export_to(str(out))
        assert [p.name for p in out.iterdir()] == [fsio.LOCK_NAME]
    summary = ds.to_webdataset(str(out))  # once it is done
    assert summary.records_out == 35 and not list(out.glob(".*"))


def test_the_lock_is_taken_on_the_current_lock_file(tmp_path, monkeypatch):
    """A writer that opened the lock file just before its holder removed it (then unlocked
    it) must not hold the directory alongside one that made a new lock file: it retries."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    real, calls = fcntl.flock, []

    def flock(fd, operation):
        calls.append(fd)
        if len(calls) == 1:  # between our open and our flock: the file is replaced
            os.remove(out / fsio.LOCK_NAME)
            (out / fsio.LOCK_NAME).write_bytes(b"")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with fsio.writing_to(fsspec.filesystem("file"), str(out)):
        assert len(calls) == 2  # the first lock was on a file no longer at the path
        held = os.fstat(calls[-1]).st_ino
        assert os.stat(out / fsio.LOCK_NAME).st_ino == held
    assert not (out / fsio.LOCK_NAME).exists()


def test_two_process_cluster_gives_identical_bytes(source, tmp_path, monkeypatch, capfd):
    from distributed import Client, LocalCluster

    ds = load_with_keep(source)
    meta = ds.metadata  # sorted by a unique key: the same order in every computation
    meta = meta.assign(rank=-meta["width"] * 1000 - meta["key"].str.slice(6).astype(int))
    ranked = ds.with_metadata(meta.sort_values("rank"))
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "single"), filter_column="keep", samples_per_shard=6)
        ds.write_images(str(tmp_path / "single-img"), images_per_tar=6, filter_column="keep")
        ranked.to_webdataset(str(tmp_path / "single-ranked"), samples_per_shard=6)
    monkeypatch.setattr(
        export.planning, "PIECE_BYTES", 1
    )  # a shard's pieces spread over both workers
    early = []  # shards planned while partitions were still being selected
    real_complete = export.planning.Planner.complete

    def complete(*args):
        shards = real_complete(*args)
        early.extend(shards)
        return shards

    monkeypatch.setattr(export.planning.Planner, "complete", complete)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        with Client(c):
            summary = ds.to_webdataset(
                str(tmp_path / "cluster"), filter_column="keep", samples_per_shard=6
            )
            # on a cluster, shards are planned (and written) as partitions are selected
            assert early
            (tmp_path / "cluster" / "00001.parquet").unlink()  # as if killed before it
            again = ds.to_webdataset(
                str(tmp_path / "cluster"), filter_column="keep", samples_per_shard=6
            )
            assert (again.shards_written, again.shards_skipped) == (1, summary.shards_written - 1)
            ds.write_images(str(tmp_path / "cluster-img"), images_per_tar=6, filter_column="keep")
            with pytest.raises(ValueError, match="max_shards"):
                ds.to_webdataset(str(tmp_path / "too-many"), samples_per_shard=1, max_shards=1)
            # found while partitions came in: the shards written by then are removed
            assert not [p for p in (tmp_path / "too-many").glob("*") if p.name[0] != "."]
            # a sorted frame (a shuffle: dask's P2P default fails on nested Arrow columns)
            ranked.to_webdataset(str(tmp_path / "cluster-ranked"), samples_per_shard=6)
            ranked.save_metadata(str(tmp_path / "ranked-meta"))
            capfd.readouterr()
            # progress of the reading (what embeds and scores) comes from the workers' events
            ds.to_webdataset(str(tmp_path / "verbose"), samples_per_shard=6, verbose=True)
            ranked.save_metadata(str(tmp_path / "verbose-meta"), verbose=True)
            shown = capfd.readouterr().err.replace("\r", "\n")
    n, records = ds.metadata.npartitions, len(meta)
    assert "export: reading: 100%" in shown and f"{n}/{n}" in shown
    assert f"records={records}" in shown
    assert "save_metadata: 100%" in shown
    assert summary.shards_written == len(list((tmp_path / "single").glob("*.tar")))
    assert _digest_dir(tmp_path / "single") == _digest_dir(tmp_path / "cluster")
    assert _digest_dir(tmp_path / "single-img") == _digest_dir(tmp_path / "cluster-img")
    assert _digest_dir(tmp_path / "single-ranked") == _digest_dir(tmp_path / "cluster-ranked")
    first = pq.read_table(tmp_path / "single-ranked" / "00000.parquet").column("rank")
    assert first.to_pylist() == sorted(first.to_pylist()) and len(first) == 6
    saved = pq.read_table(tmp_path / "ranked-meta").column("key").to_pylist()
    assert sorted(saved) == sorted(meta.compute(scheduler="synchronous")["key"])


def _fail_after_first_shard(part: pd.DataFrame, bad: str, first: str) -> pd.DataFrame:
    """Raise for the partition of the tar ``bad`` once the file ``first`` exists."""
    if len(part) and part["_shard"].iloc[0].endswith(bad):
        for _ in range(600):
            if os.path.exists(first):
                raise ValueError(f"{bad}: cannot be read")
            time.sleep(0.05)
    return part


def test_a_failed_export_on_a_cluster_leaves_the_client_usable(source, tmp_path, caplog):
    """A shard that fails while earlier output shards are being written raises its error;
    cancelling the rest keeps the client's connection to the scheduler, and its results."""
    from distributed import Client, LocalCluster

    ds = ImageTextPairDataset.from_webdataset(str(source))
    out = tmp_path / "out"
    first = str(out / "00000.parquet")
    failing = ds.with_metadata(
        ds.metadata.map_partitions(_fail_after_first_shard, "00002.tar", first)
    )
    with LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            held = client.submit(sum, [1, 2], pure=False)
            assert held.result() == 3
            with pytest.raises(ValueError, match=r"00002\.tar: cannot be read"):
                failing.to_webdataset(str(out), samples_per_shard=4)
            summary = ds.to_webdataset(str(out), samples_per_shard=4)
            assert held.result(timeout=10) == 3  # not lost with the connection
    assert summary.records_out == 35
    assert "Exception while handling op" not in caplog.text


def _die_publishing(name: str, marker: str) -> None:
    """In a worker: the first publishing of a file named ``name`` kills the process (once,
    guarded by the file ``marker``)."""
    real = fsio.publish

    def publish(fs, tmp, path):
        if path.endswith(name) and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), 9)
        real(fs, tmp, path)

    fsio.publish = publish


@pytest.mark.parametrize("layout", ["webdataset", "images"])
def test_a_worker_killed_while_committing(source, tmp_path, layout):
    """kill -9 of a worker between publishing a shard's tar and its Parquet: the commit runs
    again elsewhere; the output equals a single-process run's, with no temporary file."""
    from distributed import Client, LocalCluster

    ds = ImageTextPairDataset.from_webdataset(str(source))

    def export_to(out: Path):
        if layout == "webdataset":
            return ds.to_webdataset(str(out), samples_per_shard=4)
        return ds.write_images(str(out), images_per_tar=4)

    with dask.config.set(scheduler="synchronous"):
        export_to(tmp_path / "single")
    marker = tmp_path / "killed"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with Client(cluster) as client:
            client.run(_die_publishing, "1.parquet", str(marker))  # output shard 1
            summary = export_to(tmp_path / "cluster")
    assert marker.exists()  # a worker died
    assert summary.shards_written == 9
    assert _digest_dir(tmp_path / "cluster") == _digest_dir(tmp_path / "single")


def _die_embedding(tar: str) -> None:
    """In a worker: embedding the partition of ``tar`` kills the process."""
    from dask_imgcurate.embed import ClipImageEmbedder

    def embed_partition(self, df, *args):
        if df["_shard"].str.endswith(tar).any():
            time.sleep(0.2)  # as a crash while decoding would come, after the read
            os.kill(os.getpid(), 9)
        raise AssertionError("only the deadly partition is embedded")

    ClipImageEmbedder.embed_partition = embed_partition


def test_a_partition_that_kills_every_worker_names_its_tar(source, tmp_path):
    """KilledWorker (each worker that ran a task died) becomes WorkersKilled naming the
    tars that task read, for exports and save_metadata alike."""
    from distributed import Client, LocalCluster

    from dask_imgcurate import ClipImageEmbedder
    from dask_imgcurate.errors import RandomWeightsWarning

    tar = str(source / "00003.tar")
    ds = ImageTextPairDataset.from_webdataset([tar])  # alone: no other task dies with it
    with pytest.warns(RandomWeightsWarning):
        embedder = ClipImageEmbedder(model_name="dask-imgcurate-tiny", pretrained=None)
    deadly = embedder(ds)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            with Client(cluster) as client:
                client.run(_die_embedding, "00003.tar")
                with pytest.raises(WorkersKilled, match=re.escape(tar)) as info:
                    deadly.to_webdataset(str(tmp_path / "out"), samples_per_shard=4)
                client.run(_die_embedding, "00003.tar")  # (the restarted worker too)
                with pytest.raises(WorkersKilled, match=re.escape(tar)):
                    deadly.save_metadata(str(tmp_path / "meta"))
    assert type(info.value.__cause__).__name__ == "KilledWorker"
    assert "out of memory" in str(info.value)


def test_write_images_layout_and_types(source, tmp_path):
    ds = load_with_keep(source)
    meta = ds.metadata
    meta["image_embedding"] = meta["width"].map_partitions(
        lambda s: pd.Series(
            pd.array([[float(w), 0.5] for w in s], dtype=pd.ArrowDtype(pa.list_(pa.float32()))),
            index=s.index,
        ),
        meta=("image_embedding", pd.ArrowDtype(pa.list_(pa.float32()))),
    )
    ds.metadata = meta
    s1 = ds.write_images(str(tmp_path / "a"), images_per_tar=10, filter_column="keep")
    s2 = ds.write_images(str(tmp_path / "b"), images_per_tar=10, filter_column="keep")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert _digest_dir(tmp_path / "a") == _digest_dir(tmp_path / "b")
    prefix = names[0].split("-")[1]
    assert len(prefix) == 16
    assert [n for n in names if n.endswith(".tar")] == [
        f"images-{prefix}-{i:06d}.tar" for i in range(s1.shards_written)
    ]
    table = pq.read_table(tmp_path / "a" / f"images-{prefix}-000000.parquet")
    assert table.column_names[:3] == ["key", "tar_file", "member_name"]
    assert set(table.column("tar_file").to_pylist()) == {f"images-{prefix}-000000.tar"}
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32())
    members = dict(tar_members(tmp_path / "a" / f"images-{prefix}-000000.tar"))
    originals = input_members(source)
    for key, member in zip(
        table.column("key").to_pylist(), table.column("member_name").to_pylist()
    ):
        assert member == f"{key}.jpg"  # ids and all members are kept
        assert members[member] == dict(originals[key])["jpg"]
        assert members[f"{key}.txt"] == dict(originals[key])["txt"]
    assert s1.records_out == s2.records_out
    random = ds.write_images(str(tmp_path / "c"), images_per_tar=10, deterministic_name=False)
    assert random.files and prefix not in random.files[0]


def test_write_images_of_its_own_output(source, tmp_path):
    """Reloaded ImageWriter output has ``tar_file`` / ``member_name`` columns: writing it
    again replaces them (one of each, naming the new files) and says so."""
    ImageTextPairDataset.from_webdataset(str(source)).write_images(
        str(tmp_path / "a"), images_per_tar=20
    )
    again = ImageTextPairDataset.from_webdataset(str(tmp_path / "a"))
    with pytest.warns(UserWarning, match=r"replaces the metadata columns \['tar_file', 'memb"):
        summary = again.write_images(str(tmp_path / "b"), images_per_tar=7)
    assert summary.records_out == 35
    for parquet in sorted((tmp_path / "b").glob("*.parquet")):
        table = pq.read_table(parquet)
        assert table.column_names.count("tar_file") == 1
        assert set(table.column("tar_file").to_pylist()) == {parquet.stem + ".tar"}
        assert table.column("member_name").to_pylist() == [
            f"{k}.jpg" for k in table.column("key").to_pylist()
        ]
    reloaded = ImageTextPairDataset.from_webdataset(str(tmp_path / "b")).metadata.compute()
    assert reloaded["key"].tolist() == [f"{i:09d}" for i in range(35)]


@pytest.mark.parametrize("piece_bytes", [export.planning.PIECE_BYTES, 1])  # 1: a piece per record
def test_members_of_any_kind_and_long_names_survive(tmp_path, monkeypatch, piece_bytes):
    monkeypatch.setattr(
        export.planning, "PIECE_BYTES", piece_bytes
    )  # pax headers move later pieces
    src = tmp_path / "src"
    src.mkdir()
    records = make_shard_records(0, 3, seed=1)
    long_key = "d" * 120
    records[1]["__key__"] = long_key
    records[2]["cls"] = b"7"
    records[2]["npy"] = np.arange(5).tobytes()
    write_shard(src / "00000.tar", records)
    ds = ImageTextPairDataset.from_webdataset(str(src))
    ds.write_images(str(tmp_path / "img"), images_per_tar=10)
    (tar,) = (tmp_path / "img").glob("*.tar")
    names = [n for n, _ in tar_members(tar)]
    assert f"{long_key}.jpg" in names  # > 100 bytes: pax header, read back by tarfile
    listing = subprocess.run(["tar", "tf", str(tar)], capture_output=True, text=True, check=True)
    assert f"{long_key}.jpg" in listing.stdout.split()
    assert dict(tar_members(tar))[f"{records[2]['__key__']}.npy"] == sha(np.arange(5).tobytes())
    ds.to_webdataset(str(tmp_path / "wds"), samples_per_shard=2, max_shards=1)
    # rows are sorted by id: 000000000, 000000002, ddd...; the second becomes "01"
    assert [n for n, _ in tar_members(tmp_path / "wds" / "0.tar")][3:] == [
        "01.jpg",
        "01.txt",
        "01.json",
        "01.cls",
        "01.npy",
    ]


def test_members_larger_than_a_read_are_copied_in_bounded_reads(tmp_path, monkeypatch):
    """A member over ``MAX_READ`` (a video, a large PNG) is streamed a read at a time, never
    held whole; the output is byte-identical to one written with reads that hold it."""
    src = tmp_path / "src"
    src.mkdir()
    records = make_shard_records(0, 4, seed=3)
    rng = np.random.default_rng(0)
    records[1]["mp4"] = rng.bytes(50_001)  # not a whole number of reads or blocks
    records[2]["mp4"] = rng.bytes(4 * 4096)  # exactly four reads
    write_shard(src / "00000.tar", records)
    ds = ImageTextPairDataset.from_webdataset(str(src))
    ds.to_webdataset(str(tmp_path / "held"), samples_per_shard=3)
    reads = []
    real_read = writer._RangeReader.read

    def read(self, source, start, end):
        reads.append(end - start)
        return real_read(self, source, start, end)

    monkeypatch.setattr(writer, "MAX_READ", 4096)
    monkeypatch.setattr(writer._RangeReader, "read", read)
    ds.to_webdataset(str(tmp_path / "streamed"), samples_per_shard=3)
    assert max(reads) == 4096 and reads.count(4096) >= 12 + 4
    assert _digest_dir(tmp_path / "streamed") == _digest_dir(tmp_path / "held")
    out = dict(tar_members(tmp_path / "streamed" / "00000.tar"))
    assert out["000001.mp4"] == sha(records[1]["mp4"])  # new ids: shard 0, position 1
    assert out["000002.mp4"] == sha(records[2]["mp4"])
    listing = subprocess.run(
        ["tar", "tvf", str(tmp_path / "streamed" / "00000.tar")], capture_output=True, text=True
    )
    assert listing.returncode == 0 and "50001" in listing.stdout


def test_resume_after_kill(source, tmp_path):
    """kill -9 mid-export leaves no partial file under a final name; a re-run completes it."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal, dask
        import dask_imgcurate.io.writer as writer
        from dask_imgcurate import ImageTextPairDataset
        real = writer._pwrite_all
        tars = set()
        def dying_write(fd, chunks, offset):
            end = real(fd, chunks, offset)
            tars.add(os.readlink(f"/proc/self/fd/{{fd}}"))
            if len(tars) == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # the fourth shard's tar: part written
            return end
        writer._pwrite_all = dying_write
        ds = ImageTextPairDataset.from_webdataset({str(source)!r})
        with dask.config.set(scheduler="synchronous"):
            ds.to_webdataset({str(out)!r}, samples_per_shard=4, max_shards=2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    finals = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    temps = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert temps, "the killed run should have left its temporary file behind"
    stems = sorted({n.split(".")[0] for n in finals})
    assert len(stems) == 3  # three shards finished before the kill, in the fourth
    assert finals == sorted(f"{s}.{ext}" for s in stems for ext in ("idx", "parquet", "tar"))
    for tar in out.glob("*.tar"):  # every final-named tar is complete and matches its Parquet
        keys = [n.split(".")[0] for n, _ in tar_members(tar)]
        assert (
            sorted(set(keys))
            == pq.read_table(tar.with_suffix(".parquet")).column("key").to_pylist()
        )
    before = {n: os.stat(out / n).st_mtime_ns for n in finals}
    ds = ImageTextPairDataset.from_webdataset(str(source))
    summary = ds.to_webdataset(str(out), samples_per_shard=4, max_shards=2)
    assert summary.shards_skipped == 3 and summary.shards_written == 6
    assert all(os.stat(out / n).st_mtime_ns == before[n] for n in finals)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    clean = tmp_path / "clean"
    ds.to_webdataset(str(clean), samples_per_shard=4, max_shards=2)
    assert _digest_dir(out) == _digest_dir(clean)


def test_resume_rewrites_shards_of_a_different_job(source, tmp_path):
    ds = load_with_keep(source)
    out = tmp_path / "out"
    ds.to_webdataset(str(out), samples_per_shard=5, max_shards=2)
    with pytest.warns(UserWarning, match="shard files this export did not write"):
        summary = ds.to_webdataset(
            str(out), filter_column="keep", samples_per_shard=5, max_shards=2
        )
    assert summary.shards_skipped == 0
    fresh = tmp_path / "fresh"
    ds.to_webdataset(str(fresh), filter_column="keep", samples_per_shard=5, max_shards=2)
    for p in fresh.iterdir():
        assert sha((out / p.name).read_bytes()) == sha(p.read_bytes())
    # the earlier export's shards past the new last one are left, and reported
    earlier = sorted(p.name for p in out.iterdir() if not (fresh / p.name).exists())
    assert earlier and [Path(f).name for f in summary.other_files] == earlier


def test_rewrite_without_idx_removes_the_stale_idx(source, tmp_path):
    ds = load_with_keep(source)
    out = tmp_path / "out"
    ds.to_webdataset(str(out), samples_per_shard=10)
    assert sorted(p.name for p in out.glob("*.idx")) == [f"0000{i}.idx" for i in range(4)]
    with pytest.warns(UserWarning, match="shard files this export did not write"):
        summary = ds.to_webdataset(
            str(out), filter_column="keep", samples_per_shard=10, write_idx=False
        )
    rewritten = {Path(t).stem for t in summary.files}
    assert rewritten and not any((out / f"{stem}.idx").exists() for stem in rewritten)
    # idx files of shards past the new last one are another export's, and reported as such
    left = sorted(p.name for p in out.glob("*.idx"))
    assert left and set(left) <= {Path(f).name for f in summary.other_files}


def test_resume_writes_missing_idx_files(source, tmp_path):
    """``write_idx`` is part of a shard's job, and a shard whose .idx went missing is not
    complete: re-runs write what is missing and skip only shards with every file."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    out = tmp_path / "out"
    ds.to_webdataset(str(out), samples_per_shard=10, write_idx=False)
    assert not list(out.glob("*.idx"))
    summary = ds.to_webdataset(str(out), samples_per_shard=10)
    assert (summary.shards_written, summary.shards_skipped) == (4, 0)
    assert sorted(p.name for p in out.glob("*.idx")) == [f"0000{i}.idx" for i in range(4)]
    again = ds.to_webdataset(str(out), samples_per_shard=10)
    assert (again.shards_written, again.shards_skipped) == (0, 4)
    (out / "00002.idx").unlink()
    repaired = ds.to_webdataset(str(out), samples_per_shard=10)
    assert (repaired.shards_written, repaired.shards_skipped) == (1, 3)
    assert [Path(r).name for r in repaired.files] == [f"0000{i}.tar" for i in range(4)]
    fresh = tmp_path / "fresh"
    ds.to_webdataset(str(fresh), samples_per_shard=10)
    assert _digest_dir(out) == _digest_dir(fresh)


def test_a_shard_that_cannot_have_an_idx_removes_an_earlier_one(tmp_path):
    """DALI's index format cannot hold a member name with a space: such a shard gets no
    .idx, says so, and an earlier export's .idx of that name (another tar) is removed."""
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir(), other.mkdir()
    records = make_shard_records(0, 4, seed=2)
    for record in records:
        record["my note.txt"] = f"note of {record['__key__']}"
    write_shard(src / "00000.tar", records)
    write_shard(other / "00000.tar", make_shard_records(0, 6, seed=4))
    out = tmp_path / "out"
    ImageTextPairDataset.from_webdataset(str(other)).to_webdataset(str(out), max_shards=5)
    assert (out / "00000.idx").exists()
    ds = ImageTextPairDataset.from_webdataset(str(src))
    with pytest.warns(UserWarning, match=r"1 output shards have no \.idx, e\.g\. 00000\.tar"):
        summary = ds.to_webdataset(str(out), max_shards=5)
    assert summary.records_out == 4 and not summary.other_files
    assert not (out / "00000.idx").exists()
    # read back by our loader (scanning the tar) and tarfile: the input's members, renamed
    reloaded = ImageTextPairDataset.from_webdataset(str(out)).metadata.compute()
    assert reloaded["key"].tolist() == [f"{i:09d}" for i in range(4)]
    written, read = tar_members(out / "00000.tar"), tar_members(src / "00000.tar")
    assert [d for _, d in written] == [d for _, d in read]
    assert [n for n, _ in written] == [n for n, _ in read]  # ids 0..3 keep their names here
    assert "000000001.my note.txt" in [n for n, _ in written]


@pytest.mark.parametrize("space", ["\u3000", "\xa0", "\v", "\x1c", "\x85"])
def test_ids_with_any_white_space_get_no_idx(tmp_path, space):
    """White space is what ``str.split`` splits on, Unicode's too (an ideographic space in a
    Japanese file name): write_images keeps such ids, so its shard gets no .idx (one would
    not parse), as write_dali_index refuses one, and loads back without a notice."""
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for key in (f"photo{space}1", "photo2"):
            for ext, data in (("jpg", b"\xff\xd8 image"), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"1 output shards have no \.idx"):
        ImageTextPairDataset.from_webdataset(str(src)).write_images(str(out))
    assert not list(out.glob("*.idx"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = ImageTextPairDataset.from_webdataset(str(out)).metadata.compute()
    assert sorted(reloaded["key"]) == sorted([f"photo{space}1", "photo2"])
    assert sorted(tar_members(next(out.glob("*.tar")))) == sorted(tar_members(src / "00000.tar"))


def test_resume_rewrites_shards_whose_metadata_changed(source, tmp_path, monkeypatch):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    out = tmp_path / "out"
    meta = ds.metadata
    meta["score"] = meta["key"].str.slice(0, 9).astype(int) * 1.0
    first = ds.with_metadata(meta).to_webdataset(str(out), samples_per_shard=10)
    same = ds.with_metadata(meta).to_webdataset(str(out), samples_per_shard=10)
    assert same.shards_skipped == first.shards_written == 4 and not same.other_files
    asked = []  # resume lists the output directory once, never asks shard by shard
    real_exists = fsspec.implementations.local.LocalFileSystem.exists
    monkeypatch.setattr(
        fsspec.implementations.local.LocalFileSystem,
        "exists",
        lambda self, path, **kw: asked.append(path) or real_exists(self, path, **kw),
    )
    meta["score"] = meta["score"].where(meta["key"] != "000000021", -1.0)  # one value
    changed = ds.with_metadata(meta).to_webdataset(str(out), samples_per_shard=10)
    assert (changed.shards_written, changed.shards_skipped) == (1, 3)
    assert not [p for p in asked if str(p).endswith(".parquet")]
    scores = pq.read_table(out / "00002.parquet").column("score").to_pylist()
    assert -1.0 in scores
    meta["extra"] = True  # a new column changes every shard's Parquet
    again = ds.with_metadata(meta).to_webdataset(str(out), samples_per_shard=10)
    assert again.shards_written == 4
    assert all("extra" in pq.read_schema(p).names for p in out.glob("*.parquet"))
    meta["caption"] = meta["caption"].astype("category")  # same values, another type
    recast = ds.with_metadata(meta).to_webdataset(str(out), samples_per_shard=10)
    assert recast.shards_written == 4
    for parquet in out.glob("*.parquet"):
        assert pa.types.is_dictionary(pq.read_schema(parquet).field("caption").type)


def test_record_without_json_keeps_int_columns_and_exports(tmp_path):
    """A null in an int column must not turn it into floats (schema clash at export)."""
    src = tmp_path / "src"
    src.mkdir()
    write_shard(src / "00000.tar", make_shard_records(0, 3, seed=5))
    records = make_shard_records(3, 3, seed=5)
    del records[1]["json"]
    write_shard(src / "00001.tar", records)
    ds = ImageTextPairDataset.from_webdataset(str(src))
    frame = ds.metadata.compute()
    assert str(frame["width"].dtype) == "Int64"
    assert frame["width"].isna().tolist() == [False, False, False, False, True, False]
    summary = ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=4)
    assert summary.records_out == 6
    table = pq.read_table(tmp_path / "out" / "00001.parquet")
    assert table.schema.field("width").type == pa.int64()
    assert table.column("width").to_pylist()[0] is None  # record 000000004, position 4


def test_a_piece_that_disagrees_with_the_plan_is_never_published(source, tmp_path, monkeypatch):
    """Offsets come from metadata (record_spans); a piece ending elsewhere is an error."""
    real = export.selection.record_spans
    monkeypatch.setattr(export.selection, "record_spans", lambda rows, keys: real(rows, keys) + 512)
    ds = load_with_keep(source)
    out = tmp_path / "out"
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="plan said"):
        ds.to_webdataset(str(out), filter_column="keep", samples_per_shard=6)
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_piece_cuts(monkeypatch):
    monkeypatch.setattr(export.planning, "PIECE_BYTES", 25)
    ends = np.cumsum([10] * 10)
    assert export.planning.piece_cuts(ends) == [0, 3, 6, 8, 10]  # each piece passes 25 bytes once
    assert export.planning.piece_cuts(np.cumsum([100, 1])) == [0, 1, 2]  # a record over the size
    assert export.planning.piece_cuts(np.cumsum([5, 5])) == [0, 2]  # all under the size: one piece


def test_progress_of_reading_and_writing_on_local_schedulers(source, tmp_path, capfd):
    ds = load_with_keep(source)
    n, records = ds.metadata.npartitions, len(ds.metadata)
    for scheduler in ("synchronous", "threads"):
        with dask.config.set(scheduler=scheduler):
            out = tmp_path / scheduler
            ds.to_webdataset(str(out), filter_column="keep", samples_per_shard=6, verbose=True)
            captured = capfd.readouterr()
            err = captured.err.replace("\r", "\n")
            assert "export: reading: 100%" in err and f"{n}/{n}" in err
            assert f"records={records}" in err  # every input record, kept or not
            assert "export: writing" in err and "100% Completed" in err
            assert captured.out == ""  # stdout stays the caller's
            ds.save_metadata(str(tmp_path / f"meta-{scheduler}"), verbose=True)
            assert "save_metadata: 100%" in capfd.readouterr().err
    ds.to_webdataset(str(tmp_path / "quiet"), samples_per_shard=6)  # verbose=False: nothing
    captured = capfd.readouterr()
    assert "export" not in captured.err + captured.out


def test_a_named_index_is_kept_as_a_column(source, tmp_path):
    """set_index moves a column into the index: exports and save_metadata keep it (last),
    as dd.to_parquet does, and an id column moved there still identifies the records."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    frame = ds.metadata.compute()
    by_url = ds.with_metadata(ds.metadata.set_index("url", sort=False))
    by_url.to_webdataset(str(tmp_path / "wds"), samples_per_shard=100, old_id_col="old")
    table = pq.read_table(tmp_path / "wds" / "00000.parquet")
    assert table.column_names[0] == "key" and table.column_names[-1] == "url"
    assert table.column("url").to_pylist() == frame["url"].tolist()
    assert table.column("old").to_pylist() == frame["key"].tolist()
    saved = by_url.save_metadata(str(tmp_path / "meta"))
    first = pq.read_table(saved["path"].iloc[0])
    assert first.column_names[0] == "key" and "url" in first.column_names
    by_key = ds.with_metadata(ds.metadata.set_index("key", sort=False))
    by_key.write_images(str(tmp_path / "img"), images_per_tar=100)
    (written,) = (tmp_path / "img").glob("*.parquet")
    table = pq.read_table(written)
    assert table.column_names[:3] == ["key", "tar_file", "member_name"]
    assert table.column("key").to_pylist() == frame["key"].tolist()
    assert [n.split(".")[0] for n, _ in tar_members(written.with_suffix(".tar"))][::3] == (
        frame["key"].tolist()
    )


def test_missing_id_or_bookkeeping_columns_are_refused_before_any_work(source, tmp_path):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    for frame, name in (
        (ds.metadata.drop(columns=["key"]), "'key'"),
        (ds.metadata.rename(columns={"key": "id"}), "'key'"),
        (ds.metadata.drop(columns=["_members"]), "'_members'"),
    ):
        with pytest.raises(KeyError, match=f"the metadata has no column {name}"):
            ds.with_metadata(frame).to_webdataset(str(tmp_path / "out"))
        with pytest.raises(KeyError, match=f"the metadata has no column {name}"):
            ds.with_metadata(frame).write_images(str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()
    for dropped in ("key", "_shard"):  # without _shard a repartitioned frame wrote nothing
        frame = ds.metadata.drop(columns=[dropped]).repartition(npartitions=2)
        with pytest.raises(
            KeyError, match=f"save_metadata: the metadata has no column '{dropped}'"
        ):
            ds.with_metadata(frame).save_metadata(str(tmp_path / "m"))


def test_rows_a_merge_added_without_a_record_are_an_error(source, tmp_path):
    ds = ImageTextPairDataset.from_webdataset(str(source))
    keys = ds.metadata["key"].compute().tolist()
    scores = pd.DataFrame({"key": [*keys, "999999999"], "score": range(len(keys) + 1)})
    merged = dd.merge(dd.from_pandas(scores, npartitions=2), ds.metadata, on="key", how="left")
    with pytest.raises(ValueError, match=r"rows to export are no record .*\['999999999'\]"):
        ds.with_metadata(merged).to_webdataset(str(tmp_path / "out"))
    inner = dd.merge(dd.from_pandas(scores, npartitions=2), ds.metadata, on="key", how="inner")
    summary = ds.with_metadata(inner).to_webdataset(str(tmp_path / "out"))
    assert summary.records_out == len(keys)


def test_fingerprints_ignore_how_the_rows_are_laid_out(source, tmp_path):
    """The same records exported from differently cut partitions give the same bytes:
    Parquet files too, whose footer holds the job's fingerprint (once an Arrow slice's
    IPC bytes made it differ), and a resume of one with the other skips every shard."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    meta = ds.metadata
    for name, frame in (("whole", meta), ("cut", meta.repartition(npartitions=7))):
        ds.with_metadata(frame).to_webdataset(str(tmp_path / name), samples_per_shard=4)
    assert _digest_dir(tmp_path / "whole") == _digest_dir(tmp_path / "cut")
    again = ds.with_metadata(meta.repartition(npartitions=3)).to_webdataset(
        str(tmp_path / "whole"), samples_per_shard=4
    )
    assert again.shards_written == 0 and again.shards_skipped == math.ceil(35 / 4)


def test_job_fingerprint_of_equal_values_in_other_buffers(tmp_path):
    n = 40
    table = pa.table(
        {
            "_shard": ["a.tar"] * n,
            "_members": [[{"name": f"{i}.jpg", "offset": 512 * i, "size": i}] for i in range(n)],
            "f": pa.array([None if i % 7 == 0 else float(i) for i in range(n)], pa.float32()),
            "s": [None if i % 5 == 0 else "x" * (i % 4) for i in range(n)],
            "l": pa.array([None if i % 6 == 0 else [1.0] * (i % 3) for i in range(n)]),
            "c": pa.array(["ab"[i % 2] for i in range(n)]).dictionary_encode(),
        }
    )
    for start in (0, 3, 13):
        sliced = table.slice(start, 20)
        fresh = pa.Table.from_pylist(sliced.to_pylist(), schema=table.schema)
        chunked = pa.concat_tables([sliced.slice(0, 9), sliced.slice(9)])
        values = sliced.column("c").combine_chunks().dictionary_decode()
        reencoded = sliced.set_column(5, "c", values.dictionary_encode())  # its own dictionary
        keys = [f"{i:04d}" for i in range(20)]
        prints = {
            writer.job_fingerprint(t, keys, {"p": 1}, t.select(["f", "s", "l", "c"]))
            for t in (sliced, fresh, chunked, reencoded)
        }
        assert len(prints) == 1


def test_a_partition_computed_again_is_counted_once(capfd):
    """A task run again (its worker died) ticks again: the bar counts each partition once,
    and a late tick after the bar closed is ignored."""
    from dask_imgcurate.progress import PartitionProgress, tick

    with dask.config.set(scheduler="synchronous"), PartitionProgress("reading", 3) as bar:
        for partition, records in ((0, 5), (1, 7), (0, 5), (2, 1)):
            tick(bar.topic, partition, records)
    tick(bar.topic, 1, 7)  # after close: nothing, no error
    assert bar.records == 13
    err = capfd.readouterr().err.replace("\r", "\n")
    assert "reading: 100%" in err and "3/3" in err and "records=13" in err
    assert "4/3" not in err


def test_selections_hold_only_what_planning_needs(source, tmp_path):
    """A held selection keeps its counts and record sizes (8 bytes a record); its kept rows
    (ids, member lists, captions, embeddings, scores: export memory would grow with them)
    wait in a hidden Arrow file until its shards are committed, then go."""
    import pickle

    import fsspec.implementations.local

    from dask_imgcurate.export import selection

    ds = load_with_keep(source)
    part = ds.metadata.partitions[1].compute()
    fs = fsspec.implementations.local.LocalFileSystem()
    spill = (fs, str(tmp_path), "run0")
    chosen = selection.select_partition(
        part, "keep", False, lambda t: np.full(t.num_rows, 9), "key", spill, None, {"number": 1}
    )
    assert chosen.table is None
    assert chosen.spilled.path == str(tmp_path / f".rows-000001.arrow{fsio.TEMP_MARK}run0")
    whole = selection.select_partition(part, "keep", False, lambda t: np.full(t.num_rows, 9), "key")
    kept = whole.table.num_rows
    assert kept == len(chosen.spans) == int(part["keep"].sum()) > 1
    assert chosen.rows(1, 4).equals(whole.table.slice(1, 3))
    assert chosen.rows(0, kept).equals(whole.table)
    assert whole.table.column_names == [c for c in part.columns]
    assert len(pickle.dumps(chosen)) < chosen.spans.nbytes + 1500 < len(pickle.dumps(whole))
    out = tmp_path / "out"
    ds.to_webdataset(str(out), filter_column="keep", samples_per_shard=4)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and "rows-" in p.name]
    # a worker that does not see the output directory another worker wrote it into
    os.remove(chosen.spilled.path)
    with pytest.raises(FileNotFoundError, match=r"\.rows-000001\.arrow.*written into the output"):
        chosen.rows(0, 1)
    gone = (fs, str(tmp_path / "not-here"), "run1")  # the output directory: not on this worker
    with pytest.raises(FileNotFoundError, match=r"not-here: the output directory, made by the"):
        selection.select_partition(
            part, "keep", False, lambda t: np.full(t.num_rows, 9), "key", gone
        )


def test_spilled_rows_are_read_by_the_segments_that_hold_them(tmp_path, monkeypatch):
    """A spilled selection is Arrow IPC segments of about ``SEGMENT_BYTES``: any slice
    comes back whole and typed, locally and from an object store, and an output shard that
    takes a few rows of a large partition reads only their segments (one ranged GET)."""
    import fsspec.implementations.local

    from dask_imgcurate.export import selection

    monkeypatch.setattr(selection, "SEGMENT_BYTES", 4096)
    n = 300
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "caption": pa.array([f"caption {i % 3}" for i in range(n)]).dictionary_encode(),
            "_members": [
                [{"name": f"{i:09d}.jpg", "offset": 512 * i, "size": i}] for i in range(n)
            ],
            "embedding": [np.full(8, i, dtype=np.float32) for i in range(n)],
        }
    )
    local = fsspec.implementations.local.LocalFileSystem()
    memory = fsspec.filesystem("memory")
    spilled = [
        selection.Spilled.write(table, local, str(tmp_path / "rows.arrow"), str(tmp_path)),
        selection.Spilled.write(table, memory, "/spill/rows.arrow", "/spill"),
    ]
    segments = len(spilled[0].starts) - 1
    assert 5 < segments < 40 and spilled[0].starts == spilled[1].starts
    size = (tmp_path / "rows.arrow").stat().st_size
    assert size - 64 < spilled[0].offsets[-1] + spilled[0].sizes[-1] <= size
    reads = []
    read_range = fsio.read_range
    monkeypatch.setattr(
        fsio,
        "read_range",
        lambda fs, path, at, end: reads.append(end - at) or read_range(fs, path, at, end),
    )
    cuts = sorted({0, 1, n - 1, n, *spilled[0].starts, *(s + 1 for s in spilled[0].starts[:-1])})
    for start, stop in [(a, b) for a in cuts for b in cuts if a <= b]:
        for rows in spilled:
            got = rows.read(start, stop)
            assert got.equals(table.slice(start, stop - start)), (start, stop)
            assert got.schema == table.schema
            buffers = [b for c in got.columns for a in c.chunks for b in a.buffers() if b]
            assert all(b.address % 8 == 0 for b in buffers)  # (Arrow's compute warns)
    largest = max(spilled[1].sizes)
    reads.clear()
    spilled[1].read(150, 160)  # a shard of 10 rows: one GET of at most two segments
    assert len(reads) == 1 and reads[0] <= 2 * largest + 64 < size / 3
    # a large dictionary (every segment holds it whole) makes segments larger, not the file
    categories = pa.array([f"category {i}" for i in range(150)])
    codes = pa.array(np.arange(n, dtype=np.int32) % 7)
    wide = table.append_column("kind", pa.DictionaryArray.from_arrays(codes, categories))
    alone = pa.BufferOutputStream()
    with pa.ipc.new_file(alone, wide.schema) as writer:
        writer.write_table(wide)
    dictionary = selection.Spilled.write(wide, local, str(tmp_path / "d.arrow"), str(tmp_path))
    assert len(dictionary.starts) > 2  # still segments
    size = (tmp_path / "d.arrow").stat().st_size
    assert size < 1.5 * alone.getvalue().size  # (2x when segments were sized by all bytes)
    assert dictionary.read(0, n).equals(wide) and dictionary.read(99, 211).equals(wide[99:211])
    memory.pipe_file("/spill/rows.arrow", b"short")  # replaced behind the export's back
    with pytest.raises(OSError, match=r"rows\.arrow: 5 bytes at byte offset 0, expected \d+: "):
        spilled[1].read(0, 1)


def _missing_file_message(path: str, what: str) -> str:
    with pytest.raises(FileNotFoundError) as info:
        with fsio.explain_missing(fsspec.implementations.local.LocalFileSystem(), what, path):
            open(path, "rb")
    return str(info.value)


def test_files_missing_on_a_worker_name_the_worker():
    """On a cluster, a file one worker wrote and another cannot see (no shared disk) says
    which worker missed it and that every worker must see the same paths."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            text = client.submit(_missing_file_message, "/out/.x", "a file").result()
            worker = next(iter(client.nthreads()))
    assert text.startswith(f"/out/.x: a file, is missing on Dask worker {worker} (")
    assert "every worker must see the input and output at the same paths" in text


def test_a_crash_between_renames_never_pairs_a_tar_with_another_exports_parquet(
    source, tmp_path, monkeypatch
):
    """Export A, then a different export B into the same directory dies right after
    publishing a tar: A's Parquet (its completion mark) must not vouch for B's tar, or
    re-running A would keep it (same size, other bytes)."""
    ds = ImageTextPairDataset.from_webdataset(str(source))
    clean, out = tmp_path / "clean", tmp_path / "out"
    ds.to_webdataset(str(clean), samples_per_shard=7)
    ds.to_webdataset(str(out), samples_per_shard=7)
    meta = ds.metadata
    k = meta["key"].astype(int)  # the same records per output shard, in reverse: same sizes
    reversed_ = ds.with_metadata(meta.assign(rank=k // 7 * 7 + 6 - k % 7).sort_values("rank"))
    real = fsio.publish

    def dies_after_a_tar(fs, tmp, final):
        real(fs, tmp, final)
        if final.endswith(".tar"):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(fsio, "publish", dies_after_a_tar)
    with dask.config.set(scheduler="synchronous"), pytest.raises(KeyboardInterrupt):
        reversed_.to_webdataset(str(out), samples_per_shard=7)
    monkeypatch.setattr(fsio, "publish", real)
    again = ds.to_webdataset(str(out), samples_per_shard=7)
    assert again.shards_written >= 1
    assert _digest_dir(out) == _digest_dir(clean)


def test_rows_of_another_store_in_a_persisted_frame_are_refused(source, tmp_path):
    """No graph to read loaders from: the rows' ``_shard`` values tell, before any write."""
    memory = fsspec.filesystem("memory")
    for f in sorted(source.glob("00000.*")):
        memory.pipe_file(f"/mixed/{f.name}", f.read_bytes())
    local = ImageTextPairDataset.from_webdataset(str(source))
    remote = ImageTextPairDataset.from_webdataset("memory://mixed")
    both = local.with_metadata(dd.concat([local.metadata, remote.metadata]).persist())
    with pytest.raises(
        ValueError, match=r"rows of shards on another filesystem \(e\.g\. memory://"
    ):
        both.to_webdataset(str(tmp_path / "out"))
    assert not list(tmp_path.glob("out/*.tar"))
    memory.rm("/mixed", recursive=True)
    plain, options = (
        ImageTextPairDataset.from_webdataset(str(source), storage_options=so)
        for so in (None, {"auto_mkdir": False})
    )  # two local filesystems, told apart by their options: one disk all the same
    two = plain.with_metadata(dd.concat([plain.metadata, options.metadata]))
    with pytest.raises(DuplicateKeyError):  # the same ids twice: refused for that, not the store
        two.write_images(str(tmp_path / "images"))
    assert two.to_webdataset(str(tmp_path / "wds")).records_out == 70


def _fd_limit_above_open(spare: int):
    """Lower this process's soft limit on open files so that ``spare`` more can be opened;
    returns the limits to restore."""
    resource = pytest.importorskip("resource")
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_fds = {int(fd) for fd in os.listdir("/proc/self/fd")}
    soft, free = 0, 0
    while free < spare:  # new descriptors take the lowest free numbers, below the limit
        free += soft not in open_fds
        soft += 1
    if before[0] != resource.RLIM_INFINITY and before[0] <= soft:
        pytest.skip("the open-file limit is already low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    return before


def test_piece_reading_many_tars_keeps_few_files_open(tmp_path):
    """A piece whose records come from many tars (a frame sorted by score, or a partition of
    many files) keeps at most ``MAX_OPEN_SOURCES`` of them open: it held every one until the
    piece was written, so 40 tars under a limit of 24 more open files (a sorted LAION frame
    under the usual 1024) failed with EMFILE. Same bytes as with every tar open."""
    src = tmp_path / "src"
    make_demo_dataset(src, n_shards=40, samples_per_shard=1, seed=5)
    ds = ImageTextPairDataset.from_webdataset(str(src), files_per_partition=40)
    assert ds.metadata.npartitions == 1
    with dask.config.set(scheduler="synchronous"):
        ds.to_webdataset(str(tmp_path / "reference"), samples_per_shard=100)
        import resource

        before = _fd_limit_above_open(24)
        try:
            summary = ds.to_webdataset(str(tmp_path / "limited"), samples_per_shard=100)
            images = ds.write_images(str(tmp_path / "images"), images_per_tar=100)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, before)
    assert summary.records_out == 40 and images.records_out == 40
    assert _digest_dir(tmp_path / "limited") == _digest_dir(tmp_path / "reference")


def test_delayed_call_passes_lists_of_delayed_back_as_lists():
    """``delayed_call`` (which spreads lists of Delayed into top-level arguments: dask
    optimises and culls Delayed nested in a list once per item, quadratic in the list)
    calls the function with the same arguments as ``dask.delayed`` would."""
    from dask_imgcurate.export.run import delayed_call

    parts = [dask.delayed(lambda i: i * 10)(i) for i in range(5)]
    one = dask.delayed(lambda: "x")()

    def func(a, b, c, d, e, f):
        return a, b, c, d, e, f

    task = delayed_call(func, parts, [(0, 1), (2, 3)], 7, one, [], parts[:2], key="k-1")
    assert task.key == "k-1"
    with dask.config.set(scheduler="synchronous"):
        (result,) = dask.compute(task, optimize_graph=False)
    assert result == ([0, 10, 20, 30, 40], [(0, 1), (2, 3)], 7, "x", [], [0, 10])


def test_one_output_shard_from_many_partitions_and_its_resume(tmp_path):
    """Every partition's records in one output shard, in order; a re-run skips it."""
    src = tmp_path / "src"
    for s in range(30):
        write_shard(src / f"{s:05d}.tar", make_shard_records(2 * s, 2, seed=s))
    ds = ImageTextPairDataset.from_webdataset(str(src))
    out = tmp_path / "out"
    summary = ds.to_webdataset(str(out), samples_per_shard=10**6, max_shards=1)
    assert summary.shards_written == 1 and summary.records_out == 60
    table = pq.read_table(out / "0.parquet")
    assert len(table) == 60
    originals = input_members(src)
    old = ds.metadata.compute()["key"].tolist()
    expected = []
    for new, key in zip(table.column("key").to_pylist(), old):
        expected += [(f"{new}.{ext}", digest) for ext, digest in originals[key]]
    assert tar_members(out / "0.tar") == expected
    again = ds.to_webdataset(str(out), samples_per_shard=10**6, max_shards=1)
    assert again.shards_skipped == 1 and again.shards_written == 0


@pytest.mark.parametrize("scheduler", ["synchronous", "distributed"])
def test_a_column_typed_differently_by_partition_is_an_error(source, tmp_path, scheduler):
    """An object column holding ints in one partition's rows and strings in another's gave
    Parquet files no reader takes as one dataset, or a bare ArrowTypeError from the commit
    of a shard spanning both: now an error naming the column, both types and a tar of each,
    before anything is published (exports on a cluster undo shards already written);
    save_metadata alike. Mixed values within one partition name its tar."""
    from distributed import Client, LocalCluster

    ds = ImageTextPairDataset.from_webdataset(str(source))

    def add(frame: pd.DataFrame) -> pd.DataFrame:
        last = frame["_shard"].str.endswith(f"{ds.metadata.npartitions - 1:05d}.tar").tolist()
        mixed = [k if f else len(k) for k, f in zip(frame["key"], last)]
        return frame.assign(mixed=pd.Series(mixed, index=frame.index, dtype=object))

    meta = ds.metadata._meta.assign(mixed=pd.Series([], dtype=object))
    mixed = ds.with_metadata(ds.metadata.map_partitions(add, meta=meta))
    # named in the order the partitions came in (on a cluster, as they complete)
    ints, strings = r"0000[0-3]\.tar", r"00004\.tar"
    message = (
        rf"column 'mixed' holds (int64 values in the rows of {ints} and string in those of "
        rf"{strings}|string values in the rows of {strings} and int64 in those of {ints})"
    )
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    sidecars = {p: p.read_bytes() for p in copy.glob("*.parquet")}
    with contextlib.ExitStack() as stack:
        if scheduler == "distributed":
            cluster = stack.enter_context(
                LocalCluster(n_workers=1, processes=False, dashboard_address=":0")
            )
            stack.enter_context(Client(cluster))
        else:
            stack.enter_context(dask.config.set(scheduler="synchronous"))
        for layout in ("wds", "images"):
            out = tmp_path / layout
            with pytest.raises(ColumnTypeConflict, match=message):
                if layout == "wds":
                    mixed.to_webdataset(str(out), samples_per_shard=3)  # shards span partitions
                else:
                    mixed.write_images(str(out), images_per_tar=3)
            assert not (out.exists() and list(out.iterdir())), layout
        with pytest.raises(ColumnTypeConflict, match="save_metadata: " + message):
            mixed.with_metadata(mixed.metadata).save_metadata(str(copy))
        assert {p: p.read_bytes() for p in copy.glob("*.parquet")} == sidecars

        def one_string(frame: pd.DataFrame) -> pd.DataFrame:  # among the first tar's ints
            values = frame["mixed"].tolist()
            values[1] = "x"
            return frame.assign(mixed=pd.Series(values, index=frame.index, dtype=object))

        within = mixed.metadata.partitions[0].map_partitions(one_string, meta=meta)
        with pytest.raises(ColumnTypeConflict, match=r"the rows of 00000.tar .*column mixed"):
            ds.with_metadata(within).to_webdataset(str(tmp_path / "within"))

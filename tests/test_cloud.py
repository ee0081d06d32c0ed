"""Object storage: the whole pipeline against a real S3 server on loopback, plus retries.

A ``moto`` S3 server (``ThreadedMotoServer`` on 127.0.0.1, an ephemeral port) is the store;
``s3fs`` is the client, configured only through ``storage_options`` (the endpoint) and the
standard AWS environment variables (the credentials). Transient errors are injected two
ways: a fault-injecting HTTP proxy in front of the S3 server (503 SlowDown answers, handled
by botocore's and then by our own retries), and a flaky in-memory fsspec filesystem.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dask
import dask.dataframe as dd
import distributed
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from dask_imgcurate import ImageTextPairDataset, export, write_dali_index
from dask_imgcurate.demo import make_demo_dataset
from dask_imgcurate.errors import ShardNotice
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.image_reader import DaliImageReader, PreprocessSpec
from dask_imgcurate.io.writer import _RangeReader

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

pytestmark = pytest.mark.filterwarnings("ignore:open_clip model .* has random weights")

BUCKET = "curate-bucket"
SECRET = "s3cr3t-Pa55-d0-not-log-me-6f1e"  # the secret key; must never reach a log
ACCESS_KEY = "AKIDTESTING0000"
OUTPUT_NAME = re.compile(r"^\d{5}\.(tar|parquet|idx)$")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 and credentials in the standard environment variables."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups
        mp.setenv("AWS_CONFIG_FILE", os.devnull)  # nothing from ~/.aws
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request lines on stderr
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield f"http://{host}:{port}"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def options(endpoint: str, **extra) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, **extra}


@pytest.fixture(scope="session")
def so(s3_endpoint) -> dict:
    return options(s3_endpoint)


@pytest.fixture(scope="session")
def s3(so) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**so)


@pytest.fixture(scope="session")
def local_data(tmp_path_factory) -> dict[str, Path]:
    """``pq``: 3 shards x 8 records with Parquet and .idx; ``nopq``: 2 x 6, tars only."""
    root = tmp_path_factory.mktemp("cloud-src")
    make_demo_dataset(root / "pq", n_shards=3, samples_per_shard=8, seed=5)
    for tar in sorted((root / "pq").glob("*.tar")):
        write_dali_index(str(tar))
    make_demo_dataset(root / "nopq", n_shards=2, samples_per_shard=6, with_parquet=False, seed=6)
    return {"pq": root / "pq", "nopq": root / "nopq"}


@pytest.fixture(scope="session")
def remote_data(s3, local_data) -> dict[str, str]:
    """The local datasets uploaded to ``s3://BUCKET/{pq,nopq}``."""
    s3.mkdir(BUCKET)
    out = {}
    for name, directory in local_data.items():
        for f in sorted(directory.iterdir()):
            s3.put_file(str(f), f"{BUCKET}/{name}/{f.name}")
        out[name] = f"s3://{BUCKET}/{name}"
    return out


@pytest.fixture(scope="session")
def heads(tmp_path_factory):
    from dask_imgcurate.models.builtin import make_demo_models

    return make_demo_models(tmp_path_factory.mktemp("heads"))


def make_embedder(heads):
    from dask_imgcurate import AestheticClassifier, ClipImageEmbedder, NsfwClassifier

    return ClipImageEmbedder(
        heads.clip_model,
        pretrained=None,
        batch_size=8,
        device="cpu",
        num_threads=1,
        classifiers=[
            AestheticClassifier(str(heads.aesthetic), embedding_dim=heads.embedding_dim),
            NsfwClassifier(str(heads.nsfw), embedding_dim=heads.embedding_dim),
        ],
    )


def embed(dataset, heads) -> ImageTextPairDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomWeightsWarning: expected here
        return make_embedder(heads)(dataset)


def frame_table(frame: pd.DataFrame, drop=("_shard", "_shard_version")) -> pa.Table:
    return pa.Table.from_pandas(frame.drop(columns=list(drop)), preserve_index=False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_members(data: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: sha(tf.extractfile(m).read()) for m in tf.getmembers()}


def local_members(directory: Path) -> dict[str, str]:
    out = {}
    for tar in sorted(directory.glob("*.tar")):
        out.update(tar_members(tar.read_bytes()))
    return out


def temp_parts() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("dask-imgcurate-")}


# --------------------------------------------------------------------------- S3 round trip


@pytest.mark.parametrize("name", ["pq", "nopq"])
def test_load_from_s3_equals_local(name, local_data, remote_data, so):
    local = ImageTextPairDataset.from_webdataset(str(local_data[name]))
    remote = ImageTextPairDataset.from_webdataset(remote_data[name], storage_options=so)
    assert len(remote.shards) == len(local.shards)
    assert remote.tar_files == [f"{remote_data[name]}/{Path(t).name}" for t in local.tar_files]
    assert (remote.shards[0].idx is not None) == (name == "pq")
    a, b = local.metadata.compute(), remote.metadata.compute()
    assert list(a.columns) == list(b.columns)
    assert frame_table(a).equals(frame_table(b))
    assert b["_shard"].str.startswith(f"s3://{BUCKET}/{name}/").all()
    assert b["_shard_version"].isna().all()  # checked on local files only
    # a glob and an explicit list of s3:// tars load the same records
    globbed = ImageTextPairDataset.from_webdataset(f"{remote_data[name]}/*.tar", storage_options=so)
    listed = ImageTextPairDataset.from_webdataset(remote.tar_files, storage_options=so)
    for other in (globbed, listed):
        assert frame_table(other.metadata.compute()).equals(frame_table(a))


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5500])
def test_download_of_any_size_reads_a_chunk_per_get(size, s3, so, remote_data, monkeypatch):
    """A remote file copied to a temporary file: the same bytes, every GET at most one
    chunk, at most a batch of them at once (an empty object, whose ranges S3 refuses,
    included). ``remote_data``: the bucket."""
    monkeypatch.setattr(fsio, "DOWNLOAD_CHUNK", 1000)
    monkeypatch.setattr(fsio, "DOWNLOAD_BATCH", 2)
    data = os.urandom(size)
    s3.pipe_file(f"{BUCKET}/download/{size}", data)
    fs = fsspec.filesystem("s3", **so)
    got, batches = [], []
    cat_file, cat_ranges = fs.cat_file, fs.cat_ranges
    monkeypatch.setattr(fs, "cat_file", lambda *a, **k: got.append(cat_file(*a, **k)) or got[-1])

    def ranges(paths, starts, ends, **kw):
        batches.append(len(paths))
        got.extend(out := cat_ranges(paths, starts, ends, **kw))
        return out

    monkeypatch.setattr(fs, "cat_ranges", ranges)
    with fsio.download(fs, f"{BUCKET}/download/{size}") as f:
        assert f.read() == data
        with fsio.mapped(f) as buffer:
            assert bytes(buffer) == data
    assert max(map(len, got), default=0) <= 1000 and max(batches, default=0) <= 2
    assert (got == []) == (size == 0)  # S3 refused the empty object's range: its size told
    assert len(batches) == -(-max(0, size - 1000) // 2000)


def test_a_file_that_shrinks_while_downloaded_is_an_error(flaky, monkeypatch):
    monkeypatch.setattr(fsio, "DOWNLOAD_CHUNK", 100)
    monkeypatch.setattr(flaky, "size", lambda path: 2000)  # listed as 2000, holds 1024
    with pytest.raises(OSError, match=r"^flakymem:///blob: 24 bytes at byte offset 1000 .*changed"):
        fsio.download(flaky, "/blob")


def test_a_remote_tar_is_indexed_a_chunk_at_a_time(local_data, remote_data, so, monkeypatch):
    """Without an .idx, a remote tar is scanned from a temporary copy: the records equal a
    local load's while no read brings more than a chunk into memory."""
    monkeypatch.setattr(fsio, "DOWNLOAD_CHUNK", 16 << 10)
    largest, real = [0], fsio.read_ranges

    def counted(fs, path, offsets, sizes, *args):
        largest[0] = max(largest[0], *sizes)
        return real(fs, path, offsets, sizes, *args)

    monkeypatch.setattr(fsio, "read_ranges", counted)
    local = ImageTextPairDataset.from_webdataset(str(local_data["nopq"]))
    remote = ImageTextPairDataset.from_webdataset(remote_data["nopq"], storage_options=so)
    with dask.config.set(scheduler="sync"):
        frame = remote.metadata.compute()
    assert frame_table(frame).equals(frame_table(local.metadata.compute()))
    tar_size = os.path.getsize(local.tar_files[0])
    assert tar_size > 4 * (16 << 10) and largest[0] == 16 << 10


def test_embed_reads_images_by_range_from_s3(local_data, remote_data, so, heads, monkeypatch):
    reads = []
    real = fsio.read_ranges

    def spy(fs, path, offsets, sizes, *merging):  # the image reader's (not an .idx check's)
        if sys._getframe(1).f_code.co_filename.endswith("image_reader.py"):
            reads.append((fsio.qualify(fs, path), list(map(int, sizes))))
        return real(fs, path, offsets, sizes, *merging)

    monkeypatch.setattr(fsio, "read_ranges", spy)
    local = embed(ImageTextPairDataset.from_webdataset(str(local_data["pq"])), heads)
    remote = embed(
        ImageTextPairDataset.from_webdataset(remote_data["pq"], storage_options=so), heads
    )
    with dask.config.set(scheduler="threads"):
        a, b = dask.compute(local.metadata, remote.metadata)
    assert b["error"].isna().all()
    assert frame_table(a).equals(frame_table(b))  # embeddings and scores identical
    image_reads = [sizes for url, sizes in reads if url.startswith("s3://")]
    assert image_reads and sorted(s for r in image_reads for s in r) == sorted(b["_image_size"])


def test_save_metadata_to_s3(local_data, remote_data, so, s3, heads):  # remote_data: the bucket
    for f in sorted(local_data["nopq"].iterdir()):  # a fresh copy (no s3-side listing cache)
        s3.put_file(str(f), f"{BUCKET}/meta-src/{f.name}")
    src = f"s3://{BUCKET}/meta-src"
    dataset = embed(ImageTextPairDataset.from_webdataset(src, storage_options=so), heads)
    frame = dataset.metadata.compute()
    written = dataset.save_metadata(f"s3://{BUCKET}/meta-out")
    assert list(written["path"]) == [f"s3://{BUCKET}/meta-out/0000{i}.parquet" for i in range(2)]
    back = pa.concat_tables(
        pq.read_table(p[len("s3://") :], filesystem=s3) for p in written["path"]
    )
    assert back.column("key").to_pylist() == list(frame["key"])
    assert back.column("aesthetic_score").to_pylist() == pytest.approx(
        list(frame["aesthetic_score"])
    )
    assert not any(c.startswith("_") for c in back.column_names)
    # path=None: Parquet files beside the s3 tars, used by the next load
    dataset.save_metadata(columns=["caption", "nsfw_score"])
    reloaded = ImageTextPairDataset.from_webdataset(src, storage_options=so).metadata.compute()
    assert reloaded["nsfw_score"].tolist() == pytest.approx(frame["nsfw_score"].tolist())
    assert sorted(s3.ls(src, detail=False)) == [
        f"{BUCKET}/meta-src/0000{i}.{ext}" for i in range(2) for ext in ("parquet", "tar")
    ]


def test_save_metadata_of_a_local_dataset_to_s3(local_data, remote_data, so, s3):  # the bucket
    """The output's own storage_options (a local dataset has none for S3)."""
    dataset = ImageTextPairDataset.from_webdataset(str(local_data["nopq"]))
    written = dataset.save_metadata(f"s3://{BUCKET}/from-local", storage_options=so)
    assert written["rows"].tolist() == [6, 6]
    s3.invalidate_cache()
    assert sorted(s3.ls(f"{BUCKET}/from-local", detail=False)) == [
        f"{BUCKET}/from-local/0000{i}.parquet" for i in range(2)
    ]


def test_save_metadata_to_s3_renames_its_fragments_concurrently(
    remote_data, so, s3, tmp_path, monkeypatch
):  # remote_data: the bucket
    """The client publishes the workers' fragments (a copy and a delete each on S3) many at a
    time, not one after another: with every rename 100 ms long, several are under way at
    once; each shard still gets its Parquet, and no fragment is left."""
    make_demo_dataset(tmp_path, n_shards=6, samples_per_shard=2, with_parquet=False, seed=9)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    move, in_flight, most, lock = fsio.move, [0], [0], threading.Lock()

    def slow_move(fs, source, target):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.1)
            move(fs, source, target)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(fsio, "move", slow_move)
    with dask.config.set(scheduler="synchronous"):
        written = dataset.save_metadata(f"s3://{BUCKET}/renamed", storage_options=so)
    assert written["rows"].tolist() == [2] * 6
    assert most[0] >= 4
    s3.invalidate_cache()
    assert sorted(s3.ls(f"{BUCKET}/renamed", detail=False)) == [
        f"{BUCKET}/renamed/0000{i}.parquet" for i in range(6)
    ]


def test_save_metadata_to_s3_from_a_cluster(local_data, remote_data, so, s3):
    """Worker processes write the fragments, the client publishes them: its filesystem's
    cached listing (from loading) must not hide them. A prefix with glob characters is
    used literally, and fragments an interrupted earlier run left are removed."""
    from distributed import Client, LocalCluster

    prefix = f"{BUCKET}/meta[1] x"
    for f in sorted(local_data["nopq"].iterdir()):
        s3.put_file(str(f), f"{prefix}/{f.name}")
    stale = f"{prefix}/.00000.parquet.tmp-0badc0de-part000000-00000000"
    s3.pipe_file(stale, b"left by a killed run")
    dataset = ImageTextPairDataset.from_webdataset(f"s3://{prefix}", storage_options=so)
    meta = dataset.metadata
    dataset = dataset.with_metadata(meta.assign(width2=meta["width"] * 2))
    expected = dataset.metadata.compute()
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster):
            written = dataset.save_metadata()
    assert written["rows"].tolist() == [6, 6]
    s3.invalidate_cache()
    assert sorted(s3.ls(prefix, detail=False)) == [
        f"{prefix}/0000{i}.{ext}" for i in range(2) for ext in ("parquet", "tar")
    ]  # no fragment left, the stale one removed
    reloaded = ImageTextPairDataset.from_webdataset(f"s3://{prefix}", storage_options=so)
    assert reloaded.metadata.compute()["width2"].tolist() == expected["width2"].tolist()


def test_export_to_s3_read_back_and_resume(local_data, remote_data, so, s3):
    before = temp_parts()
    dataset = ImageTextPairDataset.from_webdataset(remote_data["pq"], storage_options=so)
    meta = dataset.metadata
    meta["keep"] = meta["width"] >= 200
    dataset.metadata = meta
    out = f"s3://{BUCKET}/out-wds"
    kwargs = dict(filter_column="keep", samples_per_shard=5, old_id_col="old_key")
    summary = dataset.to_webdataset(out, storage_options=so, **kwargs)
    kept = int(meta["keep"].sum().compute())
    assert summary.records_out == kept and summary.shards_written == -(-kept // 5)
    assert summary.files[0] == f"{out}/00000.tar"

    names = sorted(fsio.basename(p) for p in s3.ls(out[len("s3://") :], detail=False))
    assert all(OUTPUT_NAME.match(n) for n in names), names  # no temporary objects
    assert len(names) == 3 * summary.shards_written
    inputs = local_members(local_data["pq"])
    records = 0
    for n in range(summary.shards_written):
        table = pq.read_table(f"{BUCKET}/out-wds/{n:05d}.parquet", filesystem=s3)
        members = tar_members(s3.cat_file(f"{BUCKET}/out-wds/{n:05d}.tar"))
        assert len(members) == 3 * table.num_rows  # jpg, txt, json per record
        for new, old in zip(table.column("key").to_pylist(), table.column("old_key").to_pylist()):
            for ext in ("jpg", "txt", "json"):
                assert members[f"{new}.{ext}"] == inputs[f"{old}.{ext}"]
        records += table.num_rows
    assert records == kept
    back = ImageTextPairDataset.from_webdataset(out, storage_options=so)
    assert all(s.idx is not None for s in back.shards)
    assert len(back.metadata.compute()) == kept

    # resume: a second run skips every finished shard ...
    again = dataset.to_webdataset(out, storage_options=so, **kwargs)
    assert (again.shards_written, again.shards_skipped) == (0, summary.shards_written)
    # ... and a run after a "crash" that lost the last Parquet rewrites only that shard
    tar_before = s3.cat_file(f"{BUCKET}/out-wds/00001.tar")
    s3.rm(f"{BUCKET}/out-wds/00001.parquet")
    third = dataset.to_webdataset(out, storage_options=so, **kwargs)
    assert (third.shards_written, third.shards_skipped) == (1, summary.shards_written - 1)
    assert s3.cat_file(f"{BUCKET}/out-wds/00001.tar") == tar_before
    assert s3.exists(f"{BUCKET}/out-wds/00001.parquet")
    assert temp_parts() <= before  # local upload staging files are gone


def test_a_second_load_sees_objects_written_since(local_data, remote_data, so, s3):
    """s3fs caches listings for the life of the process: a notebook that loads a prefix,
    lets another process add a shard and rewrite a sidecar, then loads it again must see
    them (not a stale listing, nor s3fs's FileExpired for the changed object)."""
    for f in sorted(local_data["pq"].glob("00000.*")):
        s3.put_file(str(f), f"{BUCKET}/grows/{f.name}")
    url = f"s3://{BUCKET}/grows"
    first = ImageTextPairDataset.from_webdataset(url, storage_options=so)
    assert len(first.metadata.compute()) == 8
    other = s3fs.S3FileSystem(**so, skip_instance_cache=True)  # "another process"
    for f in sorted(local_data["pq"].glob("00001.*")):
        other.put_file(str(f), f"{BUCKET}/grows/{f.name}")
    table = pq.read_table(local_data["pq"] / "00000.parquet")
    table = table.append_column("note", pa.array(["new"] * table.num_rows))
    other.pipe_file(f"{BUCKET}/grows/00000.parquet", _parquet_bytes(table))
    again = ImageTextPairDataset.from_webdataset(url, storage_options=so).metadata.compute()
    assert len(again) == 16 and again["note"].iloc[0] == "new"


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_object_store_outputs_that_name_other_keys_are_refused(local_data, remote_data, so, s3):
    """``bkt//out`` and ``bkt/x/../out`` are other keys on a store (no normalisation), and a
    key that is an object (a tar) is no directory."""
    dataset = ImageTextPairDataset.from_webdataset(remote_data["nopq"], storage_options=so)
    for odd in (f"s3://{BUCKET}//odd", f"s3://{BUCKET}/x/../odd", f"s3://{BUCKET}/odd/."):
        with pytest.raises(
            ValueError, match=rf"empty, '\.' or '\.\.' part .* write to s3://{BUCKET}/odd$"
        ):
            dataset.to_webdataset(odd, storage_options=so)
        with pytest.raises(ValueError, match="names other keys than it seems"):
            dataset.save_metadata(odd)
    with pytest.raises(NotADirectoryError, match=rf"s3://{BUCKET}/nopq/00000.tar is a file"):
        dataset.to_webdataset(f"{remote_data['nopq']}/00000.tar", storage_options=so)
    s3.invalidate_cache()
    assert not s3.exists(f"{BUCKET}/odd") and not s3.exists(f"{BUCKET}//odd")
    assert s3.isfile(f"{BUCKET}/nopq/00000.tar")


def test_rows_of_datasets_on_different_filesystems_are_refused(
    local_data, remote_data, so, tmp_path
):
    """A frame concatenating a local and an S3 dataset would read (and save) every row
    through the first one's filesystem: refused before anything is written."""
    remote = ImageTextPairDataset.from_webdataset(remote_data["nopq"], storage_options=so)
    local = ImageTextPairDataset.from_webdataset(str(local_data["pq"]))
    for first, second in ((remote, local), (local, remote)):
        both = first.with_metadata(dd.concat([first.metadata, second.metadata]))
        for method, args in (
            (both.to_webdataset, (str(tmp_path / "out"),)),
            (both.save_metadata, ()),
            (both.save_metadata, (str(tmp_path / "meta"),)),
        ):
            with pytest.raises(ValueError, match="rows of shards on another filesystem"):
                method(*args)
    assert not (tmp_path / "out").exists() and not (tmp_path / "meta").exists()
    assert not Path("s3:").exists()


def test_an_unreachable_endpoint_is_one_line(tmp_path):
    """botocore's connection errors are not OSErrors: explained all the same."""
    so = {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(OSError, match=r"^s3://any-bucket/shards: cannot reach the server") as info:
        ImageTextPairDataset.from_webdataset("s3://any-bucket/shards", storage_options=so)
    assert "\n" not in str(info.value)


def test_write_images_to_s3(local_data, remote_data, so, s3):
    dataset = ImageTextPairDataset.from_webdataset(remote_data["nopq"], storage_options=so)
    out = f"s3://{BUCKET}/out-images"
    summary = dataset.write_images(out, images_per_tar=5, storage_options=so)
    assert summary.records_out == 12 and summary.shards_written == 3
    inputs = local_members(local_data["nopq"])
    seen = {}
    for tar in sorted(s3.glob(f"{BUCKET}/out-images/*.tar")):
        seen.update(tar_members(s3.cat_file(tar)))
        table = pq.read_table(tar[: -len(".tar")] + ".parquet", filesystem=s3)
        assert set(table.column("tar_file").to_pylist()) == {fsio.basename(tar)}
        assert all(m.endswith(".jpg") for m in table.column("member_name").to_pylist())
    assert seen == inputs  # same names (ids kept), same bytes
    again = dataset.write_images(out, images_per_tar=5, storage_options=so)
    assert again.shards_skipped == 3 and again.shards_written == 0


def test_write_dali_index_on_s3(local_data, remote_data, so, s3, tmp_path):
    s3.copy(f"{BUCKET}/nopq/00001.tar", f"{BUCKET}/indexed/00001.tar")
    url = write_dali_index(f"s3://{BUCKET}/indexed/00001.tar", storage_options=so)
    assert url == f"s3://{BUCKET}/indexed/00001.idx"
    reference = write_dali_index(
        str(local_data["nopq"] / "00001.tar"), idx_path=str(tmp_path / "ref.idx")
    )
    assert s3.cat_file(url[len("s3://") :]) == Path(reference).read_bytes()
    dataset = ImageTextPairDataset.from_webdataset(f"s3://{BUCKET}/indexed", storage_options=so)
    assert dataset.shards[0].idx == f"{BUCKET}/indexed/00001.idx"
    local = ImageTextPairDataset.from_webdataset(str(local_data["nopq"] / "00001.tar"))
    assert frame_table(dataset.metadata.compute()).equals(frame_table(local.metadata.compute()))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "url, match",
    [
        ("s3://no-such-bucket-42/data", r"s3://no-such-bucket-42/data: no such bucket 'no-such"),
        (f"s3://{BUCKET}/no/such/prefix", rf"s3://{BUCKET}/no/such/prefix: no such key"),
        (f"s3://{BUCKET}/nopq/09999.tar", rf"s3://{BUCKET}/nopq/09999.tar: no such key"),
    ],
)
def test_missing_bucket_or_key_names_it(url, match, remote_data, so):
    with pytest.raises(FileNotFoundError, match=match) as info:
        ImageTextPairDataset.from_webdataset(url, storage_options=so)
    assert "\n" not in str(info.value)


def test_export_to_missing_bucket_is_an_error_not_a_new_bucket(remote_data, so, s3, monkeypatch):
    dataset = ImageTextPairDataset.from_webdataset(remote_data["nopq"], storage_options=so)
    monkeypatch.setattr(
        export.selection, "select_partition", None
    )  # said before any partition is read
    with pytest.raises(FileNotFoundError, match=r"^s3://typo-bucket-9/out: no such bucket"):
        dataset.to_webdataset("s3://typo-bucket-9/out", storage_options=so)
    s3.invalidate_cache()
    assert not s3.exists("typo-bucket-9")


@pytest.fixture
def restricted_credentials(s3_endpoint, s3, remote_data, monkeypatch):
    """Enforce IAM on the server; the environment's credentials may use BUCKET only.

    Yields the name of another bucket, which those credentials cannot read.
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint)
    private = "private-bucket-7"
    s3.mkdir(private)
    s3.pipe_file(f"{private}/data/00000.tar", b"\0" * 1024)
    iam.create_user(UserName="curator")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
            }
        ],
    }
    arn = iam.create_policy(PolicyName="curate-only", PolicyDocument=json.dumps(policy))
    iam.attach_user_policy(UserName="curator", PolicyArn=arn["Policy"]["Arn"])
    key = iam.create_access_key(UserName="curator")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3fs.S3FileSystem.clear_instance_cache()  # new clients pick up the new credentials

    def reset_auth(count: str) -> None:
        host, port = s3_endpoint[len("http://") :].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/moto-api/reset-auth", body=count.encode())
        assert conn.getresponse().status == 200
        conn.close()

    reset_auth("0")  # every request from now on is authenticated and authorised
    try:
        yield private
    finally:
        reset_auth("inf")
        s3fs.S3FileSystem.clear_instance_cache()


def test_unreadable_bucket_one_line_error(restricted_credentials, remote_data, so):
    private = restricted_credentials
    # the allowed bucket still works with these credentials
    dataset = ImageTextPairDataset.from_webdataset(remote_data["nopq"], storage_options=so)
    assert len(dataset.metadata.compute()) == 12
    for url in (f"s3://{private}/data", f"s3://{private}/data/00000.tar"):
        with pytest.raises(PermissionError, match=rf"^{url}: access denied") as info:
            ImageTextPairDataset.from_webdataset(url, storage_options=so)
        message = str(info.value)
        assert f"bucket {private!r}" in message and "\n" not in message
    with pytest.raises(PermissionError, match=f"bucket {private!r}") as info:
        dataset.to_webdataset(f"s3://{private}/out", storage_options=so)
    assert "\n" not in str(info.value)


def test_credentials_never_logged(remote_data, so, heads, caplog):
    caplog.set_level(logging.DEBUG)
    dataset = embed(
        ImageTextPairDataset.from_webdataset(remote_data["nopq"], storage_options=so), heads
    )
    dataset.save_metadata(f"s3://{BUCKET}/log-meta")
    summary = dataset.to_webdataset(f"s3://{BUCKET}/log-out", storage_options=so)
    with pytest.raises(FileNotFoundError) as info:
        ImageTextPairDataset.from_webdataset(f"s3://{BUCKET}/missing", storage_options=so)
    assert summary.records_out == 12
    assert any(r.name.startswith("botocore") for r in caplog.records)  # DEBUG really on
    assert any("exported 12 of 12" in r.getMessage() for r in caplog.records)
    texts = [caplog.text, repr(dataset), str(summary), str(info.value)]
    assert not any(SECRET in t for t in texts)


# --------------------------------------------------------------------------- transient errors


class FaultInjectingProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server.

    The first ``fail`` ranged GETs (``Range`` header: image, member and parquet reads) are
    answered ``503 SlowDown`` instead of being forwarded; everything else is forwarded.
    """

    def __init__(self, target: str):
        self.host, port = target[len("http://") :].split(":")
        self.port = int(port)
        self.fail = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    inject = self.command == "GET" and "Range" in self.headers and proxy.fail > 0
                    if inject:
                        proxy.fail -= 1
                        proxy.failed += 1
                if inject:
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_any

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # concurrent connections: none refused, none retried

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_s3_throttling_retried_by_botocore(local_data, remote_data, s3_endpoint, so, tmp_path):
    """With the client's defaults, 503 SlowDown answers are retried by botocore/s3fs."""
    with FaultInjectingProxy(s3_endpoint) as proxy:
        via = options(proxy.url)
        dataset = ImageTextPairDataset.from_webdataset(remote_data["pq"], storage_options=via)
        proxy.fail = 3
        summary = dataset.to_webdataset(str(tmp_path / "out"), samples_per_shard=100)
    assert proxy.failed == 3 and summary.records_out == 24
    with tarfile.open(tmp_path / "out" / "00000.tar") as tf:
        assert len(tf.getmembers()) == 3 * 24


class FlakyMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose reads fail with a transient error: the first ``fail``
    ones, and with ``fail_once`` (a set) the first read of every distinct range."""

    protocol = "flakymem"
    store: dict = {}
    pseudo_dirs = [""]
    fail = 0
    fail_once: set | None = None
    error: type[Exception] = ConnectionResetError
    calls = 0

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("flakymem://"):
            path = path[len("flakymem://") :]
        return super()._strip_protocol(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        cls = FlakyMemoryFileSystem
        cls.calls += 1
        first = cls.fail_once is not None and (path, start, end) not in cls.fail_once
        if cls.fail > 0 or first:
            cls.fail = max(0, cls.fail - 1)
            if first:
                cls.fail_once.add((path, start, end))
            raise cls.error(f"simulated transient failure reading {path}")
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _fail_first(self, path, kind: str) -> None:
        cls = FlakyMemoryFileSystem
        if cls.fail_once is not None and (path, kind, None) not in cls.fail_once:
            cls.fail_once.add((path, kind, None))
            raise cls.error(f"simulated transient failure ({kind}) of {path}")

    def pipe_file(self, path, value, **kwargs):
        self._fail_first(self._strip_protocol(path), "pipe")
        return super().pipe_file(path, value, **kwargs)

    def put_file(self, lpath, rpath, **kwargs):
        self._fail_first(self._strip_protocol(rpath), "put")
        return super().put_file(lpath, rpath, **kwargs)

    def rm_file(self, path):
        self._fail_first(self._strip_protocol(path), "rm")
        return super().rm_file(path)

    def _open(self, path, mode="rb", **kwargs):  # file objects: fail their first opening
        cls = FlakyMemoryFileSystem
        if "r" in mode and cls.fail_once is not None and (path, "open", None) not in cls.fail_once:
            cls.fail_once.add((path, "open", None))
            raise cls.error(f"simulated transient failure opening {path}")
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    monkeypatch.setattr(fsio, "RETRY_DELAY", 0.001)
    FlakyMemoryFileSystem.store.clear()
    FlakyMemoryFileSystem.fail = FlakyMemoryFileSystem.calls = 0
    monkeypatch.setattr(FlakyMemoryFileSystem, "fail_once", None)
    monkeypatch.setattr(FlakyMemoryFileSystem, "error", ConnectionResetError)
    fs = fsspec.filesystem("flakymem")
    fs.pipe_file("/blob", bytes(range(256)) * 4)
    yield fs
    FlakyMemoryFileSystem.store.clear()


@pytest.mark.parametrize("error", [ConnectionResetError, TimeoutError, OSError])
def test_read_ranges_retries_failed_ranges(flaky, error, monkeypatch, caplog):
    monkeypatch.setattr(FlakyMemoryFileSystem, "error", error)
    FlakyMemoryFileSystem.fail = 2
    assert fsio.read_ranges(flaky, "/blob", [0, 10, 1000], [4, 2, 24]) == [
        bytes([0, 1, 2, 3]),
        bytes([10, 11]),
        bytes(range(232, 256)),
    ]
    # first try: 3 ranges, 2 fail; second try: only those 2
    assert FlakyMemoryFileSystem.calls == 5
    assert "transient error on 2 of 3 byte ranges" in caplog.text


def test_read_ranges_of_several_files_in_one_call(flaky, tmp_path, caplog):
    """One path per range (an export's batch mixing source tars): the same bytes locally
    and remotely, a failed range retried alone and named by its own file."""
    flaky.pipe_file("/other", bytes(range(255, -1, -1)))
    paths, offsets, sizes = ["/blob", "/other", "/blob"], [0, 0, 300], [3, 2, 2]
    expected = [bytes([0, 1, 2]), bytes([255, 254]), bytes([44, 45])]
    FlakyMemoryFileSystem.fail_once = {("/blob", 0, 3), ("/blob", 300, 302)}  # failed already
    assert fsio.read_ranges(flaky, paths, offsets, sizes) == expected
    assert "flakymem:///other: transient error on 1 of 3 byte ranges" in caplog.text
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "other").write_bytes(bytes(range(255, -1, -1)))
    local = [str(tmp_path / p.lstrip("/")) for p in paths]
    assert fsio.read_ranges(fsspec.filesystem("file"), local, offsets, sizes) == expected


def test_concurrently_bounds_the_calls_and_raises_the_first_failure_in_order():
    running, most, started, lock = [0], [0], [], threading.Lock()

    def call(i: int, fail: bool = False) -> int:
        with lock:
            started.append(i)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if fail:
            raise ValueError(f"call {i}")
        return i * i

    calls = [functools.partial(call, i) for i in range(12)]
    assert fsio.concurrently(calls, at_once=4) == [i * i for i in range(12)]
    assert most[0] == 4
    started.clear()
    failing = [functools.partial(call, i, i in (1, 2)) for i in range(40)]
    with pytest.raises(ValueError, match="^call 1$"):  # not call 2, though it fails too
        fsio.concurrently(failing, at_once=2)
    assert len(started) < 40  # calls not yet started when it failed were never made


def test_retries_give_up_and_permanent_errors_are_not_retried(flaky):
    FlakyMemoryFileSystem.fail = 100
    with pytest.raises(ConnectionResetError, match="simulated"):
        fsio.read_ranges(flaky, "/blob", [0], [4])
    assert FlakyMemoryFileSystem.calls == fsio.RETRY_ATTEMPTS
    FlakyMemoryFileSystem.fail = FlakyMemoryFileSystem.calls = 0
    with pytest.raises(FileNotFoundError, match="^flakymem:///missing: no such file"):
        fsio.read_ranges(flaky, "/missing", [0], [4])
    assert FlakyMemoryFileSystem.calls == 1


def test_whole_file_and_range_reader_retry(flaky):
    FlakyMemoryFileSystem.fail = 3
    with fsio.open_buffer(flaky, "/blob") as buffer:
        assert bytes(buffer) == bytes(range(256)) * 4
    FlakyMemoryFileSystem.fail = 2
    reader = _RangeReader(flaky)
    assert reader.read("flakymem:///blob", 256, 260) == bytes([0, 1, 2, 3])
    assert FlakyMemoryFileSystem.calls == 3 + 1 + 2 + 1


def test_local_reads_are_never_retried(tmp_path):
    calls = []

    def failing():
        calls.append(1)
        raise ConnectionResetError("local")

    with pytest.raises(ConnectionResetError):
        fsio.retry(LocalFileSystem(), str(tmp_path / "x"), failing)
    assert calls == [1]


def load_flaky(flaky, monkeypatch, source: Path, name: str):
    """``source`` copied to ``flakymem://name``, whose first read of every range (and first
    opening of every file) then fails; loaded from there and from ``source``, equal."""
    for f in sorted(source.iterdir()):
        flaky.pipe_file(f"/{name}/{f.name}", f.read_bytes())
    monkeypatch.setattr(FlakyMemoryFileSystem, "fail_once", set())
    with dask.config.set(scheduler="sync"):
        remote = ImageTextPairDataset.from_webdataset(f"flakymem://{name}")
        local = ImageTextPairDataset.from_webdataset(str(source))
        assert frame_table(remote.metadata.compute()).equals(frame_table(local.metadata.compute()))
    return remote, local


def test_pipeline_over_a_flaky_store(flaky, local_data, tmp_path, monkeypatch):
    """Load (tar scan + .json/.txt reads) and export (ranged copies) while the first read of
    every byte range fails."""
    remote, _ = load_flaky(flaky, monkeypatch, local_data["nopq"], "data")
    with dask.config.set(scheduler="sync"):
        summary = remote.to_webdataset(str(tmp_path / "out"), samples_per_shard=100)
    assert summary.records_out == 12
    first_chunk = (0, fsio.DOWNLOAD_CHUNK)  # the scan's download; then members by range
    failed = {(path, (a, b) == first_chunk) for path, a, b in FlakyMemoryFileSystem.fail_once}
    assert failed == {(f"/data/0000{i}.tar", scan) for i in (0, 1) for scan in (True, False)}
    out = tar_members((tmp_path / "out" / "00000.tar").read_bytes())
    assert sorted(out.values()) == sorted(local_members(local_data["nopq"]).values())


def test_sidecars_and_save_metadata_over_a_flaky_store(flaky, local_data, monkeypatch):
    """Sidecar Parquet footers and tables, .idx files and saved fragments are read again
    after a transient failure: each first opening and whole-file read fails here."""
    remote, local = load_flaky(flaky, monkeypatch, local_data["pq"], "pq")
    with dask.config.set(scheduler="sync"):
        meta = remote.metadata.repartition(npartitions=5)  # shards' rows in several fragments
        written = remote.with_metadata(meta).save_metadata("flakymem://meta")
    assert written["rows"].tolist() == [8, 8, 8]
    failed = {(path, kind) for path, kind, _ in FlakyMemoryFileSystem.fail_once}
    assert ("/pq/00000.parquet", "open") in failed  # the footer read when loading
    assert ("/pq/00001.parquet", None) in failed  # a sidecar read whole
    FlakyMemoryFileSystem.fail_once = None
    saved = pq.read_table(io.BytesIO(flaky.cat_file("/meta/00001.parquet")))
    assert saved.column("key").to_pylist() == local.metadata.compute()["key"][8:16].tolist()


def test_an_export_to_a_flaky_store_retries_every_write(flaky, local_data, tmp_path, monkeypatch):
    """The first upload of every object, first delete, first read fails: the export's own
    hidden objects (the selected rows' other columns) and its deletes are retried like the
    shards' uploads; the output equals a local export and nothing hidden is left."""
    local = ImageTextPairDataset.from_webdataset(str(local_data["pq"]))
    with dask.config.set(scheduler="sync"):
        local.to_webdataset(str(tmp_path / "local"), samples_per_shard=5)
        monkeypatch.setattr(FlakyMemoryFileSystem, "fail_once", set())
        summary = local.to_webdataset("flakymem://out", samples_per_shard=5)
    assert summary.records_out == 24
    kinds = {kind for _, kind, _ in FlakyMemoryFileSystem.fail_once}
    assert {"pipe", "put", "rm"} <= kinds  # spilled columns, shards, an old Parquet's delete
    FlakyMemoryFileSystem.fail_once = None
    names = sorted(p.rsplit("/", 1)[-1] for p in flaky.ls("/out", detail=False))
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir())  # nothing hidden
    for name in names:
        assert flaky.cat_file(f"/out/{name}") == (tmp_path / "local" / name).read_bytes()


def test_staging_files_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """Uploads stage each file locally; a process killed meanwhile leaves its staging files,
    which the next process that stages one removes (not those of running processes)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fsio, "_swept", set())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    left = tmp_path / f"dask-imgcurate-{int(dead.stdout)}-abc.part"
    mine = tmp_path / f"dask-imgcurate-{os.getpid()}-def.part"
    other = tmp_path / "dask-imgcurate-notes.part"  # not a staging name: kept
    for path in (left, mine, other):
        path.write_bytes(b"x")
    staged = fsio.temp_path(fsspec.filesystem("memory"), "/bucket/00000.tar")
    assert Path(staged).parent == tmp_path and Path(staged).exists()
    assert not left.exists() and mine.exists() and other.exists()


def test_scratch_files_go_to_dasks_temporary_directory(flaky, tmp_path, monkeypatch):
    """Scratch files (a remote tar downloaded to be indexed, an upload's staging file) go to
    a worker's local directory in a worker, else to Dask's ``temporary-directory`` when set,
    else to ``TMPDIR``."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    for configured, expected in (
        (None, "tmpdir"),
        (str(tmp_path / "dask-scratch"), "dask-scratch"),
    ):
        with dask.config.set({"temporary-directory": configured}):
            with fsio.download(flaky, "/blob") as f:
                where = os.readlink(f"/proc/self/fd/{f.fileno()}")  # unlinked: "... (deleted)"
                assert where.startswith(str(tmp_path / expected) + "/"), where
                assert f.read() == flaky.cat_file("/blob")
            staged = fsio.temp_path(flaky, "/out/00000.tar")
            assert Path(staged).parent == tmp_path / expected
            os.remove(staged)
    local_directory = tmp_path / "worker-disk"
    with (
        distributed.LocalCluster(
            n_workers=1,
            processes=False,
            local_directory=str(local_directory),
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        in_worker = client.submit(fsio.scratch_dir, pure=False).result()
    assert Path(in_worker).is_relative_to(local_directory), in_worker


# --------------------------------------------------------------------------- HTTP(S)


class StaticFiles:
    """An HTTP server on loopback serving one directory's files, with byte ranges
    (``ranges=False``: whole files only, as ``python -m http.server``) and no directory
    listing (a directory is a 404, as on a CDN or the Hugging Face hub)."""

    def __init__(
        self,
        root: Path,
        ranges: bool = True,
        fail: dict | None = None,
        token: str | None = None,
        delay: float = 0.0,
    ):
        files = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
        fail = fail if fail is not None else {}  # file name -> statuses to answer first
        self.requests: list[tuple[str, str]] = []
        self.most_in_flight = 0  # requests being answered at once, at most
        self.spans: list[tuple[str, str, float, float]] = []  # (command, name, start, end)
        requests, in_flight, lock, server = self.requests, [0], threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle_one_request(self):
                with lock:
                    in_flight[0] += 1
                    server.most_in_flight = max(server.most_in_flight, in_flight[0])
                start, self.name = time.monotonic(), None
                try:
                    time.sleep(delay)  # a store's time to first byte
                    super().handle_one_request()
                finally:
                    with lock:
                        in_flight[0] -= 1
                        if self.name is not None:
                            server.spans.append((self.command, self.name, start, time.monotonic()))

            def _file(self) -> bytes | None:
                name = self.name = self.path.lstrip("/")
                requests.append((self.command, name))
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    self.send_error(401)
                    return None
                if fail.get(name):
                    self.send_error(fail[name].pop(0))
                    return None
                data = files.get(name)
                if data is None:
                    self.send_error(404)
                return data

            def do_HEAD(self):
                data = self._file()
                if data is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Accept-Ranges", "bytes" if ranges else "none")
                    self.end_headers()

            def do_GET(self):
                data = self._file()
                if data is None:
                    return
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if ranges and wanted:
                    start = int(wanted.group(1))
                    end = int(wanted.group(2)) + 1 if wanted.group(2) else len(data)
                    body = data[start:end]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # concurrent connections: none refused, none retried

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StaticFiles:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_urls_of_tars_load_and_export_like_local_files(local_data, tmp_path):
    """A list of https tar URLs (LAION-style datasets on a CDN or the hub, whose directories
    cannot be listed): each tar's sidecars are found by asking for them; records, metadata
    and exported bytes equal a local run's."""
    source = local_data["pq"]
    tars = sorted(p.name for p in source.glob("*.tar"))
    local = ImageTextPairDataset.from_webdataset(str(source))
    with dask.config.set(scheduler="synchronous"), StaticFiles(source) as http:
        remote = ImageTextPairDataset.from_webdataset([f"{http.url}/{name}" for name in tars])
        assert [(s.parquet is not None, s.idx is not None) for s in remote.shards] == [
            (True, True)
        ] * len(tars)
        a, b = local.metadata.compute(), remote.metadata.compute()
        assert frame_table(a).equals(frame_table(b))
        remote.to_webdataset(str(tmp_path / "remote"), samples_per_shard=5)
        with pytest.raises(ValueError, match="no directory listing to rely on: list the tars"):
            ImageTextPairDataset.from_webdataset(f"{http.url}/00000.parquet")
        read_only = rf"{re.escape(http.url)}/00000.tar is read-only \(HTTP\): write to"
        with pytest.raises(ValueError, match=r"save_metadata \(pass path=\): " + read_only):
            remote.save_metadata()
        with pytest.raises(ValueError, match=rf"export: {re.escape(http.url)}/out is read-only"):
            remote.to_webdataset(f"{http.url}/out")
        saved = remote.save_metadata(str(tmp_path / "meta"))  # elsewhere: fine
        assert saved["rows"].sum() == len(b)
    local.to_webdataset(str(tmp_path / "local"), samples_per_shard=5)
    for tar in sorted((tmp_path / "local").glob("*.tar")):
        assert (tmp_path / "remote" / tar.name).read_bytes() == tar.read_bytes()


def test_http_credentials_go_in_headers_not_in_the_url(local_data, tmp_path):
    """A hub needing a token: given as a header through storage_options, every request
    (listing sidecars, indexing, exporting) carries it; a signed URL is refused, naming it."""
    from dask_imgcurate.errors import StorageAccessDenied

    source = local_data["pq"]
    tars = sorted(p.name for p in source.glob("*.tar"))
    headers = {"client_kwargs": {"headers": {"Authorization": "Bearer s3cret"}}}
    with dask.config.set(scheduler="synchronous"), StaticFiles(source, token="s3cret") as http:
        urls = [f"{http.url}/{name}" for name in tars]
        with pytest.raises(StorageAccessDenied, match="00000"):
            ImageTextPairDataset.from_webdataset(urls)
        signed = f"{urls[0]}?X-Amz-Signature=abc"
        with pytest.raises(ValueError, match=re.escape(signed) + ": shard URLs with a query"):
            ImageTextPairDataset.from_webdataset([signed], storage_options=headers)
        remote = ImageTextPairDataset.from_webdataset(urls, storage_options=headers)
        assert all(s.parquet is not None for s in remote.shards)
        summary = remote.to_webdataset(str(tmp_path / "out"), samples_per_shard=5)
        assert summary.records_out == len(remote.metadata) > 0
    local = ImageTextPairDataset.from_webdataset(str(source))
    local.to_webdataset(str(tmp_path / "local"), samples_per_shard=5)
    for tar in sorted((tmp_path / "local").glob("*.tar")):
        assert (tmp_path / "out" / tar.name).read_bytes() == tar.read_bytes()


def _interleaved(frame):
    """One partition whose rows alternate between the source tars (keys sorted by their
    last digits), as a frame sorted by a score is."""
    one = frame.repartition(npartitions=1)
    return one.map_partitions(lambda f: f.sort_values("key", key=lambda k: k.str[::-1]))


@pytest.mark.parametrize("reorder", [None, _interleaved], ids=["in-order", "interleaved"])
def test_an_export_from_a_store_fetches_its_byte_ranges_concurrently(
    reorder, local_data, tmp_path, monkeypatch
):
    """Pieces read a remote source's members with concurrent ranged GETs (``cat_ranges``),
    ``REMOTE_BATCH`` bytes of them at a time, not one request after another, also when
    consecutive rows come from different tars: with every answer 20 ms away, many are in
    flight at once; a batch of one read puts them back in line. Output bytes equal a local
    export's either way."""
    from dask_imgcurate.io import writer

    source = local_data["pq"]
    tars = sorted(p.name for p in source.glob("*.tar"))
    reorder = reorder or (lambda frame: frame)
    local = ImageTextPairDataset.from_webdataset(str(source))
    local = local.with_metadata(reorder(local.metadata))
    local.to_webdataset(str(tmp_path / "local"), samples_per_shard=10)
    expected = {t.name: t.read_bytes() for t in (tmp_path / "local").glob("*.tar")}
    monkeypatch.setattr(writer, "REMOTE_MAX_GAP", 0)  # every member a read of its own
    members = sum(len(tar_members((source / name).read_bytes())) for name in tars)
    for batch in (writer.REMOTE_BATCH, 1):
        monkeypatch.setattr(writer, "REMOTE_BATCH", batch)
        out = tmp_path / f"batch-{batch}"
        with dask.config.set(scheduler="synchronous"), StaticFiles(source, delay=0.02) as http:
            remote = ImageTextPairDataset.from_webdataset([f"{http.url}/{n}" for n in tars])
            remote = remote.with_metadata(reorder(remote.metadata).persist())
            http.requests.clear()
            http.most_in_flight = 0
            remote.to_webdataset(str(out), samples_per_shard=10)
            ranged = [r for r in http.requests if r[0] == "GET"]
            assert len(ranged) == members  # one GET per member: nothing read twice
            if batch > 1:
                assert http.most_in_flight >= 4
            else:
                assert http.most_in_flight == 1
        assert {t.name: t.read_bytes() for t in out.glob("*.tar")} == expected


@pytest.mark.parametrize("with_idx", [True, False])
def test_loading_a_remote_shard_requests_its_files_at_once(with_idx, local_data, tmp_path):
    """A partition asks for a remote shard's .idx, tar size (HEAD) and sidecar Parquet at
    once, or without an .idx for the whole tar and the sidecar: each an answer 50 ms away,
    one after another they cost a round trip each. The metadata is a local load's."""
    source = tmp_path / "src"
    source.mkdir()
    for f in local_data["pq"].iterdir():
        if with_idx or f.suffix != ".idx":
            (source / f.name).write_bytes(f.read_bytes())
    tars = sorted(p.name for p in source.glob("*.tar"))
    expected = ImageTextPairDataset.from_webdataset(str(source)).metadata.compute()
    with dask.config.set(scheduler="synchronous"), StaticFiles(source, delay=0.05) as http:
        remote = ImageTextPairDataset.from_webdataset([f"{http.url}/{n}" for n in tars])
        http.spans.clear()
        frame = remote.metadata.compute()
        spans = list(http.spans)
    for tar in tars:
        stem = tar[: -len(".tar")]
        first = [("GET", stem + ".idx"), ("HEAD", tar)] if with_idx else [("GET", tar)]
        wanted = [*first, ("GET", stem + ".parquet")]
        found = [s for s in spans if (s[0], s[1]) in wanted]
        assert len(found) == len(wanted), (tar, found)
        assert max(s[2] for s in found) < min(s[3] for s in found), tar  # all at once
    assert frame_table(frame).equals(frame_table(expected))


def test_the_headers_an_index_is_checked_against_come_in_one_get(local_data, tmp_path):
    """A small remote tar's header blocks and tail, which an .idx is checked against, are
    read with one ranged GET (not one per block, some twenty); an index that does not
    describe its tar is still found out (and the tar read whole instead)."""
    source = tmp_path / "src"
    source.mkdir()
    for f in local_data["pq"].iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    idx = (source / "00001.idx").read_text()
    (source / "00001.idx").write_text(idx.replace(".jpg", ".jpeg", 1))  # the first member
    tars = sorted(p.name for p in source.glob("*.tar"))
    (source / "00001.idx").rename(source / "00001.idx.bad")
    expected = ImageTextPairDataset.from_webdataset(str(source)).metadata.compute()
    (source / "00001.idx.bad").rename(source / "00001.idx")
    with dask.config.set(scheduler="synchronous"), StaticFiles(source) as http:
        remote = ImageTextPairDataset.from_webdataset([f"{http.url}/{n}" for n in tars])
        http.requests.clear()
        with pytest.warns(ShardNotice, match="00001.tar: ignoring its index"):
            frame = remote.metadata.compute()
        gets = Counter(name for command, name in http.requests if command == "GET")
    assert gets["00000.tar"] == gets["00002.tar"] == 1, gets
    assert gets["00001.tar"] == 2  # the check, then the whole tar
    assert frame_table(frame).equals(frame_table(expected))


def test_listed_urls_and_their_sidecars_are_looked_up_concurrently(tmp_path):
    """A list of tar URLs: whether each tar, ``.parquet`` and ``.idx`` exists is asked with
    many requests at once (3 per shard, ~1.4 s per 1000 shards at 30 ms a request)."""
    make_demo_dataset(tmp_path, n_shards=12, samples_per_shard=1, seed=7)
    tars = sorted(p.name for p in tmp_path.glob("*.tar"))
    with StaticFiles(tmp_path, delay=0.05) as http:
        ds = ImageTextPairDataset.from_webdataset([f"{http.url}/{name}" for name in tars])
        heads = [r for r in http.requests if r[0] == "HEAD"]
    assert len(ds.shards) == 12 and all(s.parquet is not None for s in ds.shards)
    assert len(heads) >= 36 and http.most_in_flight > 16


def test_an_http_server_without_byte_ranges_is_named(local_data, tmp_path):
    source = local_data["nopq"]
    with dask.config.set(scheduler="synchronous"), StaticFiles(source, ranges=False) as http:
        with pytest.raises(OSError, match="the server does not serve byte ranges"):
            # loading reads captions and .json fields by range: the whole tar came back
            ImageTextPairDataset.from_webdataset(f"{http.url}/00000.tar").metadata.compute()


def test_http_errors_are_errors_and_5xx_are_retried(local_data, monkeypatch):
    """A sidecar the server refuses (403) is an error, not a missing sidecar (its saved
    metadata would be lost quietly); 5xx answers are retried; a server that ignores byte
    ranges stops an embedding instead of failing every image."""
    from dask_imgcurate.errors import RangeRequestsUnsupported, StorageAccessDenied

    monkeypatch.setattr(fsio, "RETRY_DELAY", 0.01)
    source = local_data["pq"]
    urls = lambda http: [f"{http.url}/{p.name}" for p in sorted(source.glob("*.tar"))]  # noqa: E731
    with StaticFiles(source, fail={"00001.parquet": [403] * 20}) as http:
        with pytest.raises(
            StorageAccessDenied, match=r"00001\.parquet: access denied \(HTTP 403\)"
        ):
            ImageTextPairDataset.from_webdataset(urls(http))
    flaky = {"00001.parquet": [500, 503], "00002.tar": [500]}
    with dask.config.set(scheduler="synchronous"), StaticFiles(source, fail=flaky) as http:
        dataset = ImageTextPairDataset.from_webdataset(urls(http))
        assert all(s.parquet is not None for s in dataset.shards)
        assert len(dataset.metadata.compute()) == 24
        assert not flaky["00001.parquet"] and not flaky["00002.tar"]  # asked for again
    with dask.config.set(scheduler="synchronous"), StaticFiles(source) as ranged:
        frame = ImageTextPairDataset.from_webdataset(urls(ranged)).metadata.compute()
    with StaticFiles(source, ranges=False) as whole:  # the same files, ranges ignored
        frame["_shard"] = frame["_shard"].str.replace(ranged.url, whole.url)
        reader = DaliImageReader(PreprocessSpec(size=(32, 32)), device="cpu")
        with pytest.raises(RangeRequestsUnsupported, match="does not serve byte ranges"):
            reader.read(frame)  # not 24 per-row errors that an export would drop
        sidecar = rf"{re.escape(whole.url)}/00000\.parquet: the server does not serve byte"
        with pytest.raises(RangeRequestsUnsupported, match=sidecar):  # its footer: a seek
            ImageTextPairDataset.from_webdataset(urls(whole))

"""Tests for the deterministic demo / test data generator."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dask_imgcurate import demo

REPO = Path(__file__).resolve().parents[1]


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("demo")
    return demo.make_demo_dataset(out, n_shards=2, samples_per_shard=6)


def test_photos_bundled() -> None:
    names = demo.photo_names()
    assert len(names) == 12
    assert "astronaut" in names and names == sorted(names)


def test_make_images_deterministic_and_sized() -> None:
    a = demo.make_images(8, seed=3)
    assert a == demo.make_images(8, seed=3)
    assert a != demo.make_images(8, seed=4)
    assert demo.make_images(3, seed=3) == a[:3]
    for data, width, height in a:
        assert (width, height) in demo.DEFAULT_SIZES
        im = _decode(data)
        assert im.format == "JPEG" and im.size == (width, height) and im.mode == "RGB"


def test_make_images_custom_sizes() -> None:
    for _, width, height in demo.make_images(5, sizes=((64, 48),)):
        assert (width, height) == (64, 48)


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("webp", "WEBP")])
def test_other_formats_decode(fmt: str, pil_format: str) -> None:
    jpegs = demo.make_images(4, seed=1)
    for (data, width, height), (_, jw, jh) in zip(
        demo.make_images(4, seed=1, fmt=fmt), jpegs, strict=True
    ):
        im = _decode(data)
        assert im.format == pil_format and im.size == (width, height) == (jw, jh)


def test_unknown_format_rejected() -> None:
    with pytest.raises(ValueError):
        demo.make_images(1, fmt="gif")


def test_records_match_images() -> None:
    records = demo.make_shard_records(10, 4, seed=0)
    images = demo.make_images(14, seed=0)[10:]
    assert [r["__key__"] for r in records] == [f"{i:09d}" for i in range(10, 14)]
    for rec, (data, width, height) in zip(records, images, strict=True):
        meta = rec["json"]
        assert rec["jpg"] == data
        assert meta["key"] == rec["__key__"] and meta["caption"] == rec["txt"]
        assert (meta["width"], meta["height"]) == (width, height)
        assert meta["url"].startswith("https://example.com/") and meta["status"] == "success"
        assert 0 < meta["original_width"] and 0 < meta["original_height"]
        assert isinstance(meta["similarity"], float)


def test_deterministic_files(tmp_path: Path) -> None:
    a = demo.make_demo_dataset(tmp_path / "a", n_shards=2, samples_per_shard=5)
    b = demo.make_demo_dataset(tmp_path / "b", n_shards=2, samples_per_shard=5)
    c = demo.make_demo_dataset(tmp_path / "c", n_shards=2, samples_per_shard=5, seed=1)
    assert [os.path.basename(p) for p in a] == ["00000.tar", "00001.tar"]
    assert all(os.path.isabs(p) for p in a)
    for pa_, pb, pc in zip(a, b, c, strict=True):
        assert _sha256(pa_) == _sha256(pb) != _sha256(pc)
        qa, qb = Path(pa_).with_suffix(".parquet"), Path(pb).with_suffix(".parquet")
        assert _sha256(qa) == _sha256(qb)


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs a tar executable")
def test_gnu_tar_lists_members_in_order(dataset: list[str]) -> None:
    for s, path in enumerate(dataset):
        listed = subprocess.run(
            ["tar", "tf", path], check=True, capture_output=True, text=True
        ).stdout.split()
        keys = [f"{s * 6 + p:09d}" for p in range(6)]
        assert listed == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]


def test_parquet_matches_tar(dataset: list[str]) -> None:
    all_keys = []
    for path in dataset:
        table = pq.read_table(Path(path).with_suffix(".parquet"))
        assert table.schema.names == ["key", "caption", "url", "width", "height", "status"]
        assert str(table.schema.field("width").type) == "int64"
        rows = table.to_pylist()
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert [r["key"] for r in rows] == sorted({n.split(".")[0] for n in members})
        for row in rows:
            key = row["key"]
            im = _decode(members[f"{key}.jpg"])
            assert im.size == (row["width"], row["height"])
            assert members[f"{key}.txt"].decode() == row["caption"]
            meta = json.loads(members[f"{key}.json"])
            assert meta["key"] == key and meta["url"] == row["url"]
        all_keys += [r["key"] for r in rows]
    assert all_keys == [f"{i:09d}" for i in range(12)]


def test_no_parquet_and_png_members(tmp_path: Path) -> None:
    tars = demo.make_demo_dataset(
        tmp_path, n_shards=1, samples_per_shard=2, with_parquet=False, image_format="png"
    )
    assert sorted(os.listdir(tmp_path)) == ["00000.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        assert names[0] == "000000000.png"
        assert _decode(tar.extractfile(names[0]).read()).format == "PNG"


def test_write_shard_extra_members_and_order(tmp_path: Path) -> None:
    records = demo.make_shard_records(0, 2, seed=0)
    records[0]["cls"] = "7"
    path = tmp_path / "x.tar"
    demo.write_shard(path, records, extra_members=[("notes/readme.txt", b"hi")])
    with tarfile.open(path) as tar:
        assert tar.getnames() == [
            "000000000.jpg",
            "000000000.txt",
            "000000000.json",
            "000000000.cls",
            "000000001.jpg",
            "000000001.txt",
            "000000001.json",
            "notes/readme.txt",
        ]
        assert {m.mtime for m in tar.getmembers()} == {demo.TAR_MTIME}


def test_corrupt_jpeg_does_not_decode() -> None:
    data = demo.make_images(1)[0][0]
    bad = demo.corrupt_jpeg(data)
    assert bad[:4] == data[:4] and bad[:2] == b"\xff\xd8"
    assert len(bad) == len(data) and bad != data
    assert demo.corrupt_jpeg(data) == bad
    with pytest.raises((OSError, SyntaxError, ValueError)):
        _decode(bad)
    with pytest.raises(ValueError):
        demo.corrupt_jpeg(b"\x89PNG\r\n\x1a\n")


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(REPO / "scripts" / "make_demo_dataset.py"), str(out)]
    args += ["--shards", "2", "--samples-per-shard", "3", "--no-parquet", "--seed", "5"]
    result = subprocess.run(args, check=True, capture_output=True, text=True, env=env)
    assert result.stdout.split() == [str(out / "00000.tar"), str(out / "00001.tar")]
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar"]
    expected = demo.make_demo_dataset(
        tmp_path / "api", n_shards=2, samples_per_shard=3, with_parquet=False, seed=5
    )
    assert _sha256(out / "00001.tar") == _sha256(expected[1])

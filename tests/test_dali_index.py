"""DALI v1.2 ``.idx`` files: byte-equal to DALI's own tools, parsed back, and read by DALI."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dask_imgcurate import ImageTextPairDataset, write_dali_index
from dask_imgcurate.errors import IndexFileError
from dask_imgcurate.io import shards as shards_mod
from dask_imgcurate.io.dali_index import format_dali_index, parse_dali_index
from dask_imgcurate.io.records import group_records
from dask_imgcurate.io.tarindex import scan_tar


def _long_name_tar(path: Path) -> Path:
    """A GNU-format tar whose member names need ``././@LongLink`` headers."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for r in range(5):
            for ext, size in (("jpg", 700 + 97 * r), ("txt", 30 + r)):
                info = tarfile.TarInfo(f"{'d' * 120}/{r:06d}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes((r + i) % 256 for i in range(size))))
    return path


def _scan(path: Path):
    return scan_tar(Path(path).read_bytes(), str(path))


# --- writing ------------------------------------------------------------------------------


def test_real_fixture_index_is_byte_identical(tmp_path, fixture_tar, fixture_idx):
    tar = tmp_path / fixture_tar.name
    shutil.copyfile(fixture_tar, tar)
    written = write_dali_index(str(tar))
    assert written == str(tmp_path / "nemo-curator-00000.idx")
    assert Path(written).read_bytes() == fixture_idx.read_bytes()


def test_demo_index_equals_wds2idx(tmp_path, demo_dir, demo_dir_nopq):
    wds2idx = pytest.importorskip("wds2idx")
    for tar in sorted(demo_dir.glob("*.tar")) + sorted(demo_dir_nopq.glob("*.tar")):
        ref = tmp_path / f"{tar.parent.name}-{tar.stem}.ref.idx"
        with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as creator:
            creator.create_index()
        ours = write_dali_index(str(tar), str(tmp_path / f"{tar.parent.name}-{tar.stem}.idx"))
        assert Path(ours).read_bytes() == ref.read_bytes()
    assert not list(demo_dir.glob("*.idx"))  # an explicit idx_path writes nowhere else


def test_write_is_atomic_and_overwrites(tmp_path, demo_dir):
    tar = tmp_path / "00000.tar"
    shutil.copyfile(demo_dir / "00000.tar", tar)
    (tmp_path / "00000.idx").write_text("stale junk")
    write_dali_index(str(tar))
    text = (tmp_path / "00000.idx").read_text()
    assert text.startswith("v1.2 12\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.idx", "00000.tar"]


def test_whitespace_in_member_name_is_refused(tmp_path):
    path = tmp_path / "ws.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("my photo.jpg")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(IndexFileError, match="white space"):
        format_dali_index(group_records(_scan(path)))


# --- parsing ------------------------------------------------------------------------------


def test_parse_real_fixture_index(fixture_tar, fixture_idx, tarfile_members):
    index = parse_dali_index(
        fixture_idx.read_text(), str(fixture_tar), tar_size=fixture_tar.stat().st_size
    )
    got = list(zip(index.names, index.offsets.tolist(), index.sizes.tolist(), strict=True))
    assert got == tarfile_members(fixture_tar)


@pytest.mark.parametrize("which", ["demo", "long-names"])
def test_round_trip(tmp_path, demo_dir, which):
    tar = demo_dir / "00002.tar" if which == "demo" else _long_name_tar(tmp_path / "l.tar")
    scanned = _scan(tar)
    parsed = parse_dali_index(format_dali_index(group_records(scanned)), str(tar))
    assert parsed.names == scanned.names
    np.testing.assert_array_equal(parsed.offsets, scanned.offsets)
    np.testing.assert_array_equal(parsed.sizes, scanned.sizes)
    regrouped, original = group_records(parsed), group_records(scanned)
    assert regrouped.keys == original.keys
    np.testing.assert_array_equal(regrouped.starts, original.starts)
    np.testing.assert_array_equal(regrouped.image_member, original.image_member)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not a DALI"),
        ("v1.1 1\njpg 512 3 a.jpg\n", "not a DALI"),
        ("v1.2 2\njpg 512 3 a.jpg\n", "header says 2"),
        ("v1.2 1\njpg 512 3\n", "groups of"),
        ("v1.2 1\njpg x 3 a.jpg\n", "not integers"),
    ],
)
def test_parse_rejects_malformed(text, match):
    with pytest.raises(IndexFileError, match=match):
        parse_dali_index(text, "s.tar")


def test_parse_rejects_index_past_end():
    with pytest.raises(IndexFileError, match="stale"):
        parse_dali_index("v1.2 1\njpg 512 1000 a.jpg\n", "s.tar", tar_size=1024)


# --- loading with an index ------------------------------------------------------------------


def _frame(path) -> pd.DataFrame:
    return ImageTextPairDataset.from_webdataset(str(path)).metadata.compute()


@pytest.mark.parametrize("layout", ["parquet", "no-parquet"])
def test_loading_with_index_equals_scanning(
    demo_dir, demo_dir_nopq, copy_dataset, monkeypatch, layout
):
    path = copy_dataset(demo_dir if layout == "parquet" else demo_dir_nopq)
    scanned = _frame(path)
    for tar in sorted(path.glob("*.tar")):
        write_dali_index(str(tar))

    def no_scan(*args, **kwargs):
        raise AssertionError("the tar was scanned although a valid .idx is present")

    monkeypatch.setattr(shards_mod, "scan_tar", no_scan)
    indexed = _frame(path)
    pd.testing.assert_frame_equal(indexed, scanned)
    assert len(indexed) > 0


def test_stale_index_is_ignored_with_warning(demo_dir_nopq, copy_dataset, caplog, tarfile_members):
    path = copy_dataset(demo_dir_nopq)
    write_dali_index(str(path / "00001.tar"))
    # Rewrite the tar smaller (its first 4 records), leaving the 10-record index behind.
    with tarfile.open(path / "00001.tar") as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()[:12]]
    with tarfile.open(path / "00001.tar", "w", format=tarfile.PAX_FORMAT) as dst:
        for m, data in members:
            dst.addfile(m, io.BytesIO(data))
    assert "v1.2 10" in (path / "00001.idx").read_text()

    with caplog.at_level(logging.WARNING, logger="dask_imgcurate"):
        frame = _frame(path)
    assert any(
        "ignoring index" in r.getMessage() and "00001.idx" in r.getMessage() for r in caplog.records
    )
    part = frame[frame["_shard"] == str(path / "00001.tar")]
    expected = tarfile_members(path / "00001.tar")
    assert list(part["key"]) == [f"{10 + i:09d}" for i in range(4)]
    assert list(part["_image_offset"]) == [off for n, off, _ in expected if n.endswith(".jpg")]


# --- DALI itself --------------------------------------------------------------------------


def _dali_read(tar: Path, n: int, idx: Path | None):
    """All ``n`` samples (jpg, txt bytes and source info) read by DALI's webdataset reader."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=0)
    def pipe():
        kwargs = {"index_paths": [str(idx)]} if idx is not None else {}
        jpg, txt = fn.readers.webdataset(
            paths=[str(tar)],
            ext=["jpg", "txt"],
            missing_component_behavior="error",
            random_shuffle=False,
            name="reader",
            **kwargs,
        )
        return jpg, txt, fn.get_property(jpg, key="source_info")

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n
    jpg, txt, info = p.run()
    samples = [
        (bytes(np.asarray(jpg.at(i))), bytes(np.asarray(txt.at(i))), bytes(np.asarray(info.at(i))))
        for i in range(n)
    ]
    del p
    return samples


def _tarfile_samples(tar: Path):
    with tarfile.open(tar) as t:
        data = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isreg()}
    keys = sorted({name.rsplit(".", 1)[0] for name in data})
    return [(data[f"{k}.jpg"], data[f"{k}.txt"]) for k in keys]


@pytest.mark.parametrize("which", ["demo", "gnu-long-names"])
def test_dali_reads_same_samples_with_our_index(tmp_path, demo_dir, which):
    if which == "demo":
        tar = tmp_path / "00000.tar"
        shutil.copyfile(demo_dir / "00000.tar", tar)
    else:
        tar = _long_name_tar(tmp_path / "long.tar")
    expected = _tarfile_samples(tar)
    n = len(expected)
    without = _dali_read(tar, n, None)
    idx = Path(write_dali_index(str(tar)))
    with_idx = _dali_read(tar, n, idx)
    assert with_idx == without
    assert [(j, t) for j, t, _ in with_idx] == expected

    # Control: DALI really follows the index. Point every member one block earlier (at its
    # header) and the bytes it returns change.
    lines = idx.read_text().splitlines()
    shifted = [lines[0]]
    for line in lines[1:]:
        f = line.split()
        for k in range(1, len(f), 4):
            f[k] = str(int(f[k]) - 512)
        shifted.append(" ".join(f))
    bad = tmp_path / "shifted.idx"
    bad.write_text("\n".join(shifted) + "\n")
    assert [(j, t) for j, t, _ in _dali_read(tar, n, bad)] != expected

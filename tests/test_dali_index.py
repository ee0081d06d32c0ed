"""DALI v1.2 ``.idx`` files: byte-equal to DALI's own tools, parsed back, and read by DALI."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from dask_imgcurate import ImageTextPairDataset, write_dali_index
from dask_imgcurate.errors import IndexFileError, ShardNotice, ShardWarning
from dask_imgcurate.io import shards as shards_mod
from dask_imgcurate.io.dali_index import (
    CHECKED_LONG_NAMES,
    CHECKED_MEMBERS,
    check_headers,
    check_tail,
    format_dali_index,
    members_end,
    members_to_check,
    parse_dali_index,
)
from dask_imgcurate.io.records import group_records
from dask_imgcurate.io.tarindex import TarIndex, scan_tar


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


def test_empty_extension_is_refused(tmp_path):
    """``KEY.`` is a member of record ``KEY`` with extension "": an index line's fields
    would not parse back (no index, rather than one every load rejects)."""
    path = tmp_path / "dot.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("000000.jpg", "000000."):
            tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    records = group_records(_scan(path))
    assert records.keys == ["000000"] and records.members.names == ["000000.jpg", "000000."]
    with pytest.raises(IndexFileError, match="'000000.' has an empty extension"):
        format_dali_index(records)


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
        ("v1.2 1\njpg 512 3\n", "line 2: expected groups of"),
        ("v1.2 1\njpg x 3 a.jpg\n", "line 2: offset/size not integers"),
        ("v1.2 2\njpg 512 3 a.jpg\n\njpg 1024 3\n", "line 4: expected groups of"),
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


def test_stale_index_is_ignored_with_warning(demo_dir_nopq, copy_dataset, tarfile_members):
    path = copy_dataset(demo_dir_nopq)
    write_dali_index(str(path / "00001.tar"))
    # Rewrite the tar smaller (its first 4 records), leaving the 10-record index behind.
    with tarfile.open(path / "00001.tar") as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()[:12]]
    with tarfile.open(path / "00001.tar", "w", format=tarfile.PAX_FORMAT) as dst:
        for m, data in members:
            dst.addfile(m, io.BytesIO(data))
    assert "v1.2 10" in (path / "00001.idx").read_text()

    with pytest.warns(ShardWarning, match=r"00001.tar: ignoring its index .*00001.idx .*stale"):
        frame = _frame(path)
    part = frame[frame["_shard"] == str(path / "00001.tar")]
    expected = tarfile_members(path / "00001.tar")
    assert list(part["key"]) == [f"{10 + i:09d}" for i in range(4)]
    assert list(part["_image_offset"]) == [off for n, off, _ in expected if n.endswith(".jpg")]


# --- an index must describe its tar ------------------------------------------------------------


def _records_tar(path: Path, keys, caption: str = "cap", fmt=tarfile.GNU_FORMAT) -> Path:
    """Records ``keys`` (jpg of varied sizes + txt), written by ``tarfile``."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for r, key in enumerate(keys):
            for ext, data in (("jpg", bytes(range(256)) * (3 + r)), ("txt", f"{caption} {key}")):
                data = data if isinstance(data, bytes) else data.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _scanned_frame(path: Path) -> pd.DataFrame:
    """The frame loaded without any .idx (moved aside while loading)."""
    aside = {}
    for idx in path.glob("*.idx"):
        aside[idx] = idx.read_bytes()
        idx.unlink()
    try:
        return _frame(path)
    finally:
        for idx, data in aside.items():
            idx.write_bytes(data)


def _load_ignoring_index(path: Path, why: str) -> pd.DataFrame:
    with pytest.warns(ShardWarning, match=f"ignoring its index .*{why}") as caught:
        frame = _frame(path)
    assert all("ignoring its index" in str(w.message) for w in caught)
    assert {w.category for w in caught} == {ShardNotice}
    return frame


def test_index_of_a_rewritten_tar_is_not_trusted(tmp_path):
    """The tar was rewritten (a record added before the old ones) after its .idx: the .idx
    still fits in the file, but its first member's header names another member."""
    _records_tar(tmp_path / "00000.tar", ["a1", "a2"], "old")
    write_dali_index(str(tmp_path / "00000.tar"))
    _records_tar(tmp_path / "00000.tar", ["a0", "a1", "a2", "a3"], "new")
    frame = _load_ignoring_index(tmp_path, "member 'a1.jpg' at data offset 512: its header names")
    assert list(frame["key"]) == ["a0", "a1", "a2", "a3"]
    assert list(frame["caption"]) == [f"new a{i}" for i in range(4)]
    pd.testing.assert_frame_equal(frame, _scanned_frame(tmp_path))


def _age(path: Path, seconds: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def test_index_older_than_its_tar_is_checked_against_every_header(tmp_path, monkeypatch):
    """A tar rewritten after its .idx with the same layout (one record renamed): every
    header the usual check samples agrees, so a tar modified after its index has all of
    its headers checked. An unchanged tar that is merely newer (a copy that did not keep
    times) is scanned, and loads with no notice."""
    keys = [f"{i:06d}" for i in range(40)]
    tar = _records_tar(tmp_path / "00000.tar", keys, "c")
    idx = Path(write_dali_index(str(tar)))
    renamed = [*keys[:17], "000071", *keys[18:]]
    _records_tar(tar, renamed, "c")
    _age(idx, 5)
    listed = parse_dali_index(idx.read_text(), str(tar))
    shards_mod._checked_against_tar(fsspec.filesystem("file"), str(tar), listed, tar.stat().st_size)
    frame = _load_ignoring_index(tmp_path, "modified after the index was written: member 34 is")
    assert sorted(frame["key"]) == sorted(renamed)

    write_dali_index(str(tar))
    expected = _frame(tmp_path)  # index newer than its tar: trusted, no scan
    _age(idx, 5)
    scans = []
    real_scan = shards_mod.scan_tar
    monkeypatch.setattr(
        shards_mod, "scan_tar", lambda *a, **k: scans.append(1) or real_scan(*a, **k)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pd.testing.assert_frame_equal(_frame(tmp_path), expected)
    assert scans  # every header read (loading may index a shard twice: meta, then data)


def test_index_of_another_shard_is_not_trusted(tmp_path):
    _records_tar(tmp_path / "00000.tar", ["x1", "x2", "x3"], "shard0")
    _records_tar(tmp_path / "00001.tar", ["y1", "y2", "y3"], "shard1")
    write_dali_index(str(tmp_path / "00001.tar"))
    shutil.copy(tmp_path / "00001.idx", tmp_path / "00000.idx")  # same sizes, other names
    frame = _load_ignoring_index(tmp_path, "00000.idx.*its header names 'x1.jpg'")
    assert list(frame["key"]) == ["x1", "x2", "x3", "y1", "y2", "y3"]
    assert list(frame["caption"])[:3] == ["shard0 x1", "shard0 x2", "shard0 x3"]


def test_wds2idx_offsets_of_gnu_long_names_are_not_trusted(tmp_path):
    """DALI's wds2idx points a GNU long-named member at its ``././@LongLink`` header: the
    block before that "data" is the long-name header, not a regular file's."""
    wds2idx = pytest.importorskip("wds2idx")
    if shutil.which("tar") is None:
        pytest.skip("wds2idx needs GNU tar")
    tar = _records_tar(tmp_path / "00000.tar", ["000001", "L" * 120, "000002"])
    with wds2idx.IndexCreator(str(tar), str(tmp_path / "00000.idx"), verbose=False) as creator:
        creator.create_index()
    theirs = parse_dali_index((tmp_path / "00000.idx").read_text(), str(tar))
    scanned = _scan(tar)
    assert theirs.names == scanned.names
    assert theirs.offsets.tolist() != scanned.offsets.tolist()  # the wds2idx bug
    frame = _load_ignoring_index(tmp_path, r"type b'L', not a regular file's")
    pd.testing.assert_frame_equal(frame, _scanned_frame(tmp_path))
    write_dali_index(str(tar))  # ours is trusted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pd.testing.assert_frame_equal(_frame(tmp_path), frame)


@pytest.mark.parametrize(
    ("odd", "locale"),
    [("000030-ключ", "C"), ("000030-a\\b", "C.UTF-8")],
    ids=["c-locale", "backslash"],
)
def test_wds2idx_escaped_names_are_not_trusted(tmp_path, monkeypatch, odd, locale):
    """DALI's wds2idx copies names from ``tar --list``, which escapes them (a non-ASCII byte
    as ``\\ooo`` in the C locale, a backslash as ``\\\\`` in any): where no sampled header
    shows it, such an index would rename records. Names with a backslash are checked
    against every header, so the index is ignored with a notice; ours is still used."""
    wds2idx = pytest.importorskip("wds2idx")
    if shutil.which("tar") is None:
        pytest.skip("wds2idx needs GNU tar")
    keys = sorted([f"{i:06d}" for i in range(60)] + [odd])
    tar = _records_tar(tmp_path / "00000.tar", keys)
    monkeypatch.setenv("LC_ALL", locale)
    with wds2idx.IndexCreator(str(tar), str(tmp_path / "00000.idx"), verbose=False) as creator:
        creator.create_index()
    theirs = parse_dali_index((tmp_path / "00000.idx").read_text(), str(tar))
    escaped = [i for i, name in enumerate(theirs.names) if name.startswith("000030-")]
    assert [theirs.names[i] for i in escaped] != [f"{odd}.jpg", f"{odd}.txt"]
    assert not set(escaped) & set(members_to_check(theirs).tolist())  # none sampled
    frame = _load_ignoring_index(tmp_path, r"names may be escaped .*: member 62 is")
    assert sorted(frame["key"]) == keys
    pd.testing.assert_frame_equal(frame, _scanned_frame(tmp_path))
    write_dali_index(str(tar))  # ours holds the names as they are: checked, and used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pd.testing.assert_frame_equal(_frame(tmp_path), frame)


def test_index_of_a_modified_tar_with_members_in_no_record_is_used(tmp_path):
    """An index lists records only: checked against every header of a tar modified after
    it, the tar's members in no record (``README``, dot-files) are no difference."""
    tar = _records_tar(tmp_path / "00000.tar", ["a1", "a2", "a3"])
    with tarfile.open(tar, "a") as archive:
        for name in ("README", "._a4.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"abc"))
    with pytest.warns(ShardNotice, match="ignored 2 members"):
        expected = _frame(tmp_path)
    with pytest.warns(ShardNotice, match="ignored 2 members"):
        idx = Path(write_dali_index(str(tar)))
    _age(idx, 5)  # the tar is newer: every header is checked
    with pytest.warns(ShardNotice) as caught:
        pd.testing.assert_frame_equal(_frame(tmp_path), expected)
    assert not [w for w in caught if "ignoring its index" in str(w.message)]


def test_index_written_by_dali_is_trusted(tmp_path, fixture_tar, fixture_idx, monkeypatch):
    shutil.copy(fixture_tar, tmp_path / "00000.tar")
    shutil.copy(fixture_idx, tmp_path / "00000.idx")
    expected = _scanned_frame(tmp_path)
    monkeypatch.setattr(shards_mod, "scan_tar", _no_scan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pd.testing.assert_frame_equal(_frame(tmp_path), expected)


def _no_scan(*args, **kwargs):
    raise AssertionError("the tar was scanned although a valid .idx is present")


def _edit(text: str, case: str) -> str:
    lines = text.splitlines()
    first = lines[1].split()
    if case == "no samples":
        return "v1.2 0\n"
    if case == "first sample only":
        return f"v1.2 1\n{lines[1]}\n"
    if case == "last sample only":
        return f"v1.2 1\n{lines[-1]}\n"
    if case == "negative size":
        return text.replace(f" {first[2]} ", " -5 ", 1)
    if case == "offset off by one":
        return text.replace(f" {first[1]} ", f" {int(first[1]) + 1} ", 1)
    if case == "last offset one block late":
        last = lines[-1].split()
        last[-3] = str(int(last[-3]) + 512)
        return "\n".join([*lines[:-1], " ".join(last)]) + "\n"
    if case == "samples swapped":
        return "\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n"
    if case == "size off by one":
        return text.replace(f" {first[2]} ", f" {int(first[2]) - 1} ", 1)
    raise AssertionError(case)


PLACE = ["_shard", "_shard_version"]  # where and when a tar was indexed: differ by store

IDX_EDITS = {
    "no samples": "holds more members than it lists: '000000.jpg' at byte offset 0",
    "first sample only": "holds more members than it lists: '000001.jpg'",
    "last sample only": "does not list: '000000.jpg' at byte offset 0",
    "negative size": "negative size",
    "offset off by one": "not a multiple of 512",
    "last offset one block late": "000003.txt' at data offset .*: the block before its data is not",
    "samples swapped": "out of order",
    "size off by one": "its header says 768 bytes, the index 767",
}


@pytest.mark.parametrize("case", list(IDX_EDITS))
def test_index_that_does_not_describe_its_tar_is_not_trusted(tmp_path, case):
    tar = _records_tar(tmp_path / "00000.tar", [f"{i:06d}" for i in range(4)])
    expected = _scanned_frame(tmp_path)
    good = Path(write_dali_index(str(tar))).read_text()
    (tmp_path / "00000.idx").write_text(_edit(good, case))
    frame = _load_ignoring_index(tmp_path, IDX_EDITS[case])
    pd.testing.assert_frame_equal(frame, expected)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("v1.2 1\njpg 512 -3 a.jpg\n", "negative size"),
        ("v1.2 1\njpg -512 3 a.jpg\n", "not a multiple of 512"),
        ("v1.2 1\njpg 0 3 a.jpg\n", "not a multiple of 512"),
        ("v1.2 1\njpg 700 3 a.jpg\n", "not a multiple of 512"),
        ("v1.2 2\njpg 1536 3 a.jpg\njpg 512 3 b.jpg\n", "out of order"),
        ("v1.2 2\njpg 512 600 a.jpg\njpg 1536 3 b.jpg\n", "overlapping"),
    ],
)
def test_parse_rejects_impossible_layouts(text, match):
    with pytest.raises(IndexFileError, match=match):
        parse_dali_index(text, "s.tar")
    assert len(parse_dali_index("v1.2 2\njpg 512 600 a.jpg\njpg 2048 3 b.jpg\n", "s.tar")) == 2


def test_members_to_check_are_few_and_spread(tmp_path):
    names = [f"{i:06d}.jpg" for i in range(1000)]
    names[500] = "L" * 120 + ".jpg"
    index = TarIndex("x", names, np.arange(1000) * 1024 + 512, np.full(1000, 100))
    rows = members_to_check(index)
    assert rows[0] == 0 and rows[-1] == 999 and 500 in rows
    assert len(rows) <= CHECKED_MEMBERS + CHECKED_LONG_NAMES
    assert np.diff(rows).max() < 1000 / (CHECKED_MEMBERS - 2)
    one = TarIndex("x", ["a.jpg"], np.array([512]), np.array([1]))
    assert members_to_check(one).tolist() == [0]
    assert members_to_check(TarIndex("x", [], np.zeros(0, int), np.zeros(0, int))).size == 0


def test_check_headers_on_real_headers(tmp_path):
    tar = _records_tar(
        tmp_path / "t.tar", ["000001", "p" * 90 + "/" + "q" * 40], fmt=tarfile.USTAR_FORMAT
    )
    index = _scan(tar)
    data = tar.read_bytes()
    rows = np.arange(len(index))
    blocks = [data[o - 512 : o] for o in index.offsets.tolist()]
    assert check_headers(index, rows, blocks) is None  # ustar prefix + name: checked too
    renamed = TarIndex("x", ["000009.jpg", *index.names[1:]], index.offsets, index.sizes)
    assert "header names '000001.jpg'" in check_headers(renamed, rows, blocks)
    resized = TarIndex("x", index.names, index.offsets, index.sizes + 1)
    assert "its header says 768 bytes, the index 769" in check_headers(resized, rows, blocks)
    corrupt = [blocks[0][:10] + b"?" + blocks[0][11:], *blocks[1:]]
    assert "not a tar header" in check_headers(index, rows, corrupt)


def test_check_tail_reads_the_end_like_a_scan(tmp_path):
    tar = _records_tar(tmp_path / "t.tar", ["000001", "000002"])
    data = tar.read_bytes()
    index = _scan(tar)
    end = members_end(index)
    assert check_tail(data[end:], end, len(data)) == (True, None)
    assert check_tail(data[end : end + 1024], end, len(data)) is None  # more is needed
    assert check_tail(b"", end, end) == (False, None)  # cut between members
    joined = data + data
    assert check_tail(joined[end:], end, len(joined)) == (True, len(data))
    assert _scan_bytes(joined).data_after_end == len(data)
    with pytest.raises(IndexFileError, match="padding"):
        check_tail(b"", end, end - 100)
    with pytest.raises(IndexFileError, match="more members than it lists: '000002.jpg'"):
        start = index.offsets[2] - 512
        check_tail(data[start:], int(start), len(data))


def _scan_bytes(data: bytes):
    return scan_tar(data, "x")


def test_index_keeps_reporting_a_cut_or_joined_tar(tmp_path, monkeypatch):
    """A tar cut between records, or with data after its end, warns when loaded through its
    .idx exactly as when scanned; writing the .idx warns too."""
    _records_tar(tmp_path / "00000.tar", ["a1", "a2"])
    whole = (tmp_path / "00000.tar").read_bytes()
    end = members_end(_scan(tmp_path / "00000.tar"))
    (tmp_path / "00000.tar").write_bytes(whole[:end])  # cut between records
    _records_tar(tmp_path / "b.tar", ["b1"])
    _records_tar(tmp_path / "c.tar", ["b2"])
    joined = (tmp_path / "b.tar").read_bytes() + (tmp_path / "c.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(joined)  # cat b.tar c.tar
    (tmp_path / "b.tar").unlink()
    (tmp_path / "c.tar").unlink()

    with warnings.catch_warnings(record=True) as scanned:
        warnings.simplefilter("always")
        expected = _frame(tmp_path)
    messages = sorted({str(w.message) for w in scanned})
    assert len(messages) == 2
    assert "00000.tar: ends after 4 members" in messages[0]
    assert (
        "00001.tar: data follows its end-of-archive blocks (from byte offset 10240" in messages[1]
    )
    for tar, message in zip(("00000.tar", "00001.tar"), messages):
        with pytest.warns(ShardWarning) as written:
            write_dali_index(str(tmp_path / tar))
        assert [str(w.message) for w in written] == [message]
    monkeypatch.setattr(shards_mod, "scan_tar", _no_scan)
    with warnings.catch_warnings(record=True) as indexed:
        warnings.simplefilter("always")
        frame = _frame(tmp_path)
    assert sorted({str(w.message) for w in indexed}) == messages
    assert {w.category for w in indexed} == {ShardWarning}
    pd.testing.assert_frame_equal(frame, expected)


def test_index_of_a_tar_ending_with_members_in_no_record_is_trusted(tmp_path, monkeypatch):
    """A tar whose last members are a link and a dot-file (which its .idx cannot list)."""
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
        for name, kind in [
            ("000001.jpg", tarfile.REGTYPE),
            ("000001.txt", tarfile.REGTYPE),
            ("000002.jpg", tarfile.SYMTYPE),
            ("._000002.jpg", tarfile.REGTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "000001.jpg" if kind == tarfile.SYMTYPE else ""
            data = b"" if kind == tarfile.SYMTYPE else name.encode() * 300
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.warns(ShardNotice):  # scanned: ignored and skipped members
        expected = _frame(tmp_path)
    with pytest.warns(ShardNotice) as written:
        write_dali_index(str(tar))
    notes = sorted(str(w.message).split(": ", 1)[1][:18] for w in written)
    assert notes == ["ignored 1 members ", "skipped 1 links or"]
    monkeypatch.setattr(shards_mod, "scan_tar", _no_scan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pd.testing.assert_frame_equal(_frame(tmp_path), expected)


def test_index_on_an_object_store_is_checked_with_ranged_reads(tmp_path, monkeypatch):
    """Remote tars are never downloaded to check an index: a batch of small ranges is."""
    mem = fsspec.filesystem("memory")
    root = f"/imgcurate-idx-{tmp_path.name}"
    for i, keys in enumerate((["a1", "a2"], ["b1", "b2", "b3"])):
        tar = _records_tar(tmp_path / f"0000{i}.tar", keys)
        mem.pipe(f"{root}/0000{i}.tar", tar.read_bytes())
        write_dali_index(str(tar))
        mem.pipe(f"{root}/0000{i}.idx", tar.with_suffix(".idx").read_bytes())
    try:
        expected = _frame(tmp_path)
        ranges = []
        real_cat_ranges = type(mem).cat_ranges

        def cat_ranges(self, paths, starts, ends, **kwargs):
            ranges.extend(zip(paths, starts, ends))
            return real_cat_ranges(self, paths, starts, ends, **kwargs)

        monkeypatch.setattr(type(mem), "cat_ranges", cat_ranges)
        monkeypatch.setattr(shards_mod, "scan_tar", _no_scan)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            frame = _frame(f"memory://{root}")
        pd.testing.assert_frame_equal(frame.drop(columns=PLACE), expected.drop(columns=PLACE))
        assert ranges and all(end - start <= 10240 for _, start, end in ranges)
        # a stale index: warned about, and the tar read whole instead
        mem.pipe(f"{root}/00000.idx", mem.cat_file(f"{root}/00001.idx"))
        monkeypatch.undo()
        frame = _load_ignoring_index(f"memory://{root}", "00000.idx")
        pd.testing.assert_frame_equal(frame.drop(columns=PLACE), expected.drop(columns=PLACE))
    finally:
        mem.rm(root, recursive=True)


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

"""``scan_tar`` and ``group_records`` against the stdlib ``tarfile`` and GNU ``tar``.

Every expected index comes from an independent reader (``tarfile``'s ``offset_data``), never
from hard-coded numbers, and every archive is real bytes written by ``tarfile`` or ``tar``.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from compute_helpers import write_tar
from fsspec.implementations.local import LocalFileSystem

from dask_imgcurate.errors import CompressedTarError, DuplicateKeyError, TarFormatError
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io import tarindex
from dask_imgcurate.io.records import group_records, split_key, split_keys
from dask_imgcurate.io.tarindex import _number, _walk_plain, scan_tar

GNU_TAR = shutil.which("tar")
needs_gnu_tar = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar not installed")


def ours(path: str | Path, *, strict: bool = True) -> list[tuple[str, int, int]]:
    """Our index of ``path``, scanned through an mmap as the loader does."""
    with fsio.open_buffer(LocalFileSystem(), str(path)) as buffer:
        index = scan_tar(buffer, str(path), strict=strict)
    return list(zip(index.names, index.offsets.tolist(), index.sizes.tolist(), strict=True))


def payload(i: int) -> bytes:
    """Deterministic payloads of varied sizes, some a multiple of 512 and some not."""
    n = (0, 1, 511, 512, 513, 4096, 7777)[i % 7] + i
    return bytes((i * 31 + j) % 251 for j in range(n))


# --- agreement with tarfile -------------------------------------------------------------


def test_demo_shards_match_tarfile(demo_dir, demo_dir_nopq, tarfile_members):
    tars = sorted(demo_dir.glob("*.tar")) + sorted(demo_dir_nopq.glob("*.tar"))
    assert len(tars) == 5
    for tar in tars:
        expected = tarfile_members(tar)
        assert len(expected) > 0
        assert ours(tar) == expected


def test_bytes_and_mmap_agree(demo_dir):
    tar = demo_dir / "00000.tar"
    from_bytes = scan_tar(tar.read_bytes(), "x")
    with fsio.open_buffer(LocalFileSystem(), str(tar)) as buffer:
        from_mmap = scan_tar(buffer, "x")
    assert from_bytes.names == from_mmap.names
    np.testing.assert_array_equal(from_bytes.offsets, from_mmap.offsets)
    np.testing.assert_array_equal(from_bytes.sizes, from_mmap.sizes)


def test_real_fixture_matches_tarfile(fixture_tar, tarfile_members):
    expected = tarfile_members(fixture_tar)
    assert [m[0] for m in expected] == ["0.jpg", "0.json", "0.txt"]
    assert ours(fixture_tar) == expected


LONG_DIR = "deep/" + "d" * 120
FORMAT_NAMES = {
    "ustar": [
        "000001.jpg",
        "000001.txt",
        # > 100 chars, but splittable into ustar prefix + name
        "p" * 90 + "/" + "q" * 60 + ".jpg",
        "nested/dir/000002.json",
    ],
    "gnu": [
        "000001.jpg",
        f"{LONG_DIR}/000002.jpg",  # GNU ././@LongLink
        f"{LONG_DIR}/000002.txt",
        "x" * 180 + ".cls",
    ],
    "pax": [
        "000001.jpg",
        "ünïcödé/фото.jpg",  # non-ASCII: pax "path" record
        f"{LONG_DIR}/000002.jpg",  # long: pax "path" record
        "日本/" + "長" * 80 + ".txt",
        "plain.txt",
    ],
}
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tarfile_formats(tmp_path, fmt, tarfile_members):
    names = FORMAT_NAMES[fmt]
    tar = write_tar(
        tmp_path / f"{fmt}.tar",
        [(n, payload(i)) for i, n in enumerate(names)],
        FORMATS[fmt],
    )
    expected = tarfile_members(tar)
    assert [m[0] for m in expected] == names
    assert ours(tar) == expected


def test_non_regular_members_are_skipped(tmp_path, tarfile_members):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in [
            ("dir", tarfile.DIRTYPE),
            ("dir/a.jpg", tarfile.REGTYPE),
            ("dir/link.jpg", tarfile.SYMTYPE),
            ("dir/hard.jpg", tarfile.LNKTYPE),
            ("dir/b.txt", tarfile.REGTYPE),
            ("fifo", tarfile.FIFOTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "dir/a.jpg"
            data = payload(3) if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = scan_tar(path.read_bytes(), str(path))
    assert ours(path) == tarfile_members(path)
    assert index.names == ["dir/a.jpg", "dir/b.txt"]
    assert "dir/hard.jpg" in index.skipped and "dir/link.jpg" in index.skipped


def _gnu_tar(cwd: Path, out: Path, *args: str) -> Path:
    subprocess.run([GNU_TAR, "cf", str(out), *args], cwd=cwd, check=True, capture_output=True)
    return out


@pytest.fixture
def gnu_tree(tmp_path) -> Path:
    src = tmp_path / "src"
    long_dir = src / "shard" / ("L" * 110) / ("M" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / "000001.jpg").write_bytes(payload(5))
    (long_dir / "000001.txt").write_bytes(b"a caption")
    (src / "shard" / "000002.jpg").write_bytes(payload(6))
    (src / "shard" / "ünï.txt").write_bytes(payload(1))
    (src / "shard" / "empty.json").write_bytes(b"")
    return src


@needs_gnu_tar
@pytest.mark.parametrize("fmt", [None, "gnu", "posix"])
def test_gnu_tar_formats(tmp_path, gnu_tree, fmt, tarfile_members):
    args = [] if fmt is None else [f"--format={fmt}"]
    tar = _gnu_tar(gnu_tree, tmp_path / f"gnu-{fmt}.tar", *args, "shard")
    expected = tarfile_members(tar)
    assert len(expected) == 5
    assert max(len(name) for name, _, _ in expected) > 100
    assert ours(tar) == expected


@needs_gnu_tar
def test_empty_tar_from_gnu_tar(tmp_path):
    tar = _gnu_tar(tmp_path, tmp_path / "empty.tar", "-T", "/dev/null")
    assert tar.stat().st_size > 0  # end-of-archive blocks only
    index = scan_tar(tar.read_bytes(), str(tar))
    assert len(index) == 0 and index.damage is None


def test_empty_inputs(tmp_path):
    path = write_tar(tmp_path / "none.tar", [])
    assert len(scan_tar(path.read_bytes(), "x")) == 0
    assert len(scan_tar(b"", "x")) == 0
    (tmp_path / "zero.tar").write_bytes(b"")
    assert ours(tmp_path / "zero.tar") == []  # 0-byte file: no mmap possible


def test_missing_end_of_archive_blocks_accepted(tmp_path, tarfile_members):
    path = write_tar(tmp_path / "a.tar", [(f"{i:03d}.txt", payload(i)) for i in range(4)])
    expected = tarfile_members(path)
    last_name, last_offset, last_size = expected[-1]
    end = last_offset + -(-last_size // 512) * 512
    data = path.read_bytes()
    assert data[end:] == bytes(len(data) - end)  # only zero blocks after the last member
    assert scan_tar(data[:end], "x").names == [m[0] for m in expected]


# --- numeric fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [0, 1, 0o7777, 8 * 2**30 - 1, 8 * 2**30, 10 * 2**30 + 12345, 2**62 + 3, 2**88 - 1]
)
def test_number_parses_octal_and_gnu_base256(value):
    # tarfile.itn writes octal when it fits and GNU base-256 otherwise: an independent encoder
    field = tarfile.itn(value, 12, tarfile.GNU_FORMAT)
    assert len(field) == 12
    if value >= 8 * 2**30:
        assert field[0] == 0x80  # base-256 marker
    assert _number(field) == value == tarfile.nti(field)


@pytest.mark.parametrize("value", [-1, -2, -(2**40)])
def test_number_parses_negative_base256(value):
    field = tarfile.itn(value, 12, tarfile.GNU_FORMAT)
    assert field[0] == 0xFF
    assert _number(field) == value == tarfile.nti(field)


def test_negative_size_is_a_format_error():
    info = tarfile.TarInfo("neg.jpg")
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    header[124:136] = tarfile.itn(-(2**40), 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)  # a valid checksum for the edited header
    assert tarfile.TarInfo.frombuf(bytes(header), "utf-8", "strict").size == -(2**40)
    with pytest.raises(TarFormatError, match="negative size") as err:
        scan_tar(bytes(header) + bytes(4096), "neg.tar")
    assert err.value.offset == 0


def _with_checksum(header: bytearray) -> bytes:
    """``header`` with its checksum field recomputed (after an edit)."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def test_signed_octal_size_never_walks_backwards():
    """``int(field, 8)`` accepts a sign: one corrupt byte ("-0000001130") must stop the fast
    walk, not send it back 600 bytes to walk the same headers forever."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("k0.jpg", payload(6)), ("k0.txt", b"x" * 600), ("k1.txt", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = bytearray(out.getvalue())
    header = data.index(b"k0.txt")
    assert data[header + 124 : header + 135] == b"00000001130"
    data[header + 124] = ord("-")  # one corrupt byte (the checksum no longer matches either)

    class Bounded(list):
        def append(self, item):
            assert len(self) < 100, "the walk went backwards"
            super().append(item)

    starts = Bounded()
    stop = _walk_plain(bytes(data), 0, len(data), starts, [])
    assert stop == header and starts == [0]  # left for the general loop, at the bad header
    for buffer in (bytes(data), memoryview(bytes(data))):
        with pytest.raises(TarFormatError) as err:
            scan_tar(buffer, "neg.tar")
        assert err.value.offset == header
        lenient = scan_tar(buffer, "neg.tar", strict=False)
        assert lenient.names == ["k0.jpg"] and lenient.damage.offset == header


@pytest.mark.parametrize("field", [b"-0000000001\x00", b"-1         \x00", b"     -1000 \x00"])
def test_signed_octal_size_with_valid_checksum_is_a_format_error(tmp_path, field):
    info = tarfile.TarInfo("k1.jpg")
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[124:136] = field
    rest = write_tar(tmp_path / "rest.tar", [("k1.txt", b"cap")], tarfile.USTAR_FORMAT)
    data = _with_checksum(header) + rest.read_bytes()
    path = tmp_path / "neg.tar"
    path.write_bytes(data)
    for buffer in (data, memoryview(data)):
        with pytest.raises(TarFormatError, match="negative size") as err:
            scan_tar(buffer, "neg.tar")
        assert err.value.offset == 0
    with pytest.raises(TarFormatError, match="negative size"):
        ours(path)  # through an mmap, as the loader reads it
    assert scan_tar(data, "neg.tar", strict=False).names == []


def test_number_octal_variants():
    assert _number(b"0000644\x00") == 0o644
    assert _number(b"   644 \x00") == 0o644
    assert _number(b"\x00" * 12) == 0
    with pytest.raises(ValueError):
        _number(b"12389\x00")


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_huge_member_size_is_read_from_header(fmt):
    # A real > 8 GiB member is impractical; a header describing one is not. GNU stores the
    # size in base-256, pax in a "size" record. The scanner must read 10 GiB and see that
    # the (absent) payload does not fit.
    big = 10 * 2**30 + 7
    info = tarfile.TarInfo("huge.npy")
    info.size = big
    header = info.tobuf(fmt, "utf-8", "surrogateescape")
    assert tarfile.open(fileobj=io.BytesIO(header + bytes(1024))).next().size == big
    with pytest.raises(TarFormatError, match=f"needs {big} bytes") as err:
        scan_tar(header + bytes(1024), "huge.tar")
    assert err.value.offset == len(header) - 512  # the member's own (ustar) header block
    lenient = scan_tar(header, "huge.tar", strict=False)
    assert len(lenient) == 0 and lenient.damage is not None


# --- damage -----------------------------------------------------------------------------


@pytest.fixture
def records_tar(tmp_path) -> Path:
    """8 records x 3 members (jpg, txt, json) written by tarfile."""
    members = []
    for r in range(8):
        for j, ext in enumerate(("jpg", "txt", "json")):
            members.append((f"{r:06d}.{ext}", payload(r * 3 + j) + b"x"))
    return write_tar(tmp_path / "00000.tar", members, tarfile.USTAR_FORMAT)


def test_truncated_mid_payload(records_tar, tarfile_members):
    expected = tarfile_members(records_tar)
    name, offset, size = expected[13]  # 000004.txt, second member of record 4
    assert name == "000004.txt" and size > 2
    data = records_tar.read_bytes()[: offset + size // 2]
    with pytest.raises(TarFormatError) as err:
        scan_tar(data, str(records_tar))
    header = offset - 512
    assert err.value.offset == header and err.value.source == str(records_tar)
    assert str(records_tar) in str(err.value) and f"byte offset {header}" in str(err.value)
    assert "truncated" in str(err.value)

    lenient = scan_tar(data, str(records_tar), strict=False)
    assert lenient.damage is not None and lenient.damage.offset == header
    got = list(zip(lenient.names, lenient.offsets.tolist(), lenient.sizes.tolist(), strict=True))
    assert got == expected[:13]
    records = group_records(lenient)
    assert records.keys == [f"{r:06d}" for r in range(4)]  # record 4 is incomplete: dropped
    assert records.dropped_incomplete == 1


def test_truncated_in_a_records_first_member_keeps_the_record_before(records_tar, tarfile_members):
    # Cut in the payload of 000005.jpg (a download cut in an image): its header, intact,
    # names record 5, so record 4 ended before it and is complete; record 5 is cut.
    expected = tarfile_members(records_tar)
    name, offset, size = expected[15]
    assert name == "000005.jpg"
    lenient = scan_tar(records_tar.read_bytes()[: offset + size // 2], "x", strict=False)
    assert lenient.names == [m[0] for m in expected[:15]]
    records = group_records(lenient)
    assert records.keys == [f"{r:06d}" for r in range(5)]
    assert records.dropped_incomplete == 1
    # a header that fails its checksum names nothing: record 4 may be incomplete
    data = bytearray(records_tar.read_bytes()[: offset + size // 2])
    data[offset - 512 + 3] ^= 0x01
    assert group_records(scan_tar(bytes(data), "x", strict=False)).keys == [
        f"{r:06d}" for r in range(4)
    ]


def test_truncated_mid_header(records_tar, tarfile_members):
    expected = tarfile_members(records_tar)
    name, offset, _ = expected[17]  # 000005.json
    header = offset - 512
    data = records_tar.read_bytes()[: header + 200]
    with pytest.raises(TarFormatError, match="truncated tar header") as err:
        scan_tar(data, "shard-x.tar")
    assert err.value.offset == header
    assert str(err.value).startswith("shard-x.tar: ") and f"byte offset {header}" in str(err.value)
    lenient = scan_tar(data, "shard-x.tar", strict=False)
    assert lenient.names == [m[0] for m in expected[:17]]
    assert group_records(lenient).keys == [f"{r:06d}" for r in range(5)]


def test_truncated_in_the_last_members_padding_names_the_files_end(records_tar, tarfile_members):
    """All of the last member's data is there, its padding is not: the error is at the
    file's end (not past it) and says what is missing; the last record may have had more
    members, so lenient scans drop it as at any other cut between members."""
    expected = tarfile_members(records_tar)
    name, offset, size = expected[17]
    assert size % 512
    data = records_tar.read_bytes()[: offset + size]
    short = -size % 512
    with pytest.raises(
        TarFormatError, match=rf"ends {short} bytes before the end of its last"
    ) as err:
        scan_tar(data, "shard-x.tar")
    assert err.value.offset == len(data)
    lenient = scan_tar(data, "shard-x.tar", strict=False)
    assert lenient.names == [m[0] for m in expected[:18]]
    assert group_records(lenient).keys == [f"{r:06d}" for r in range(5)]


def test_truncated_at_record_boundary_drops_the_unverifiable_last_record(
    records_tar, tarfile_members
):
    # Cut in the header of record 6's first member: nothing shows whether record 5 was
    # complete, so it is dropped too (it could have had more members after the cut).
    expected = tarfile_members(records_tar)
    _, offset, _ = expected[18]
    lenient = scan_tar(records_tar.read_bytes()[: offset - 300], "x", strict=False)
    assert lenient.names == [m[0] for m in expected[:18]]
    assert group_records(lenient).keys == [f"{r:06d}" for r in range(5)]


def test_corrupt_header_checksum(records_tar, tarfile_members):
    expected = tarfile_members(records_tar)
    _, offset, _ = expected[10]
    header = offset - 512
    data = bytearray(records_tar.read_bytes())
    data[header + 3] ^= 0x01  # one bit of the name field: only the checksum notices
    # the reference agrees the header is bad: tarfile silently stops listing there
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as ref:
        assert [m.name for m in ref.getmembers()] == [m[0] for m in expected[:10]]
    with pytest.raises(TarFormatError, match="checksum") as err:
        scan_tar(bytes(data), "bad.tar")
    assert err.value.offset == header and f"byte offset {header}" in str(err.value)
    lenient = scan_tar(bytes(data), "bad.tar", strict=False)
    assert lenient.names == [m[0] for m in expected[:10]]


def test_corrupt_header_before_truncation(records_tar, tarfile_members):
    # Two kinds of damage: a bad checksum early, a truncation later. The first one counts,
    # and no member from the corrupt header on may be kept.
    expected = tarfile_members(records_tar)
    header = expected[4][1] - 512
    data = bytearray(records_tar.read_bytes())
    data[header + 3] ^= 0x01
    damaged = bytes(data[: expected[20][1] + 5])
    with pytest.raises(TarFormatError, match="checksum") as err:
        scan_tar(damaged, "x.tar")
    assert err.value.offset == header
    lenient = scan_tar(damaged, "x.tar", strict=False)
    assert lenient.damage.offset == header
    assert lenient.names == [m[0] for m in expected[:4]]
    assert group_records(lenient).keys == ["000000"]


def test_corrupt_size_field(records_tar, tarfile_members):
    expected = tarfile_members(records_tar)
    _, offset, _ = expected[4]
    header = offset - 512
    data = bytearray(records_tar.read_bytes())
    data[header + 124 : header + 127] = b"9z9"  # not octal
    with pytest.raises(TarFormatError) as err:
        scan_tar(bytes(data), "bad.tar")
    assert err.value.offset == header


def test_not_a_tar():
    with pytest.raises(TarFormatError) as err:
        scan_tar(b"this is not a tar file at all\n" * 40, "notes.tar")
    assert err.value.offset == 0 and "notes.tar" in str(err.value)


@pytest.mark.parametrize(("mode", "kind"), [("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")])
def test_compressed_tar_refused(tmp_path, records_tar, mode, kind):
    path = tmp_path / "c.tar"
    with tarfile.open(records_tar) as src, tarfile.open(path, mode) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
    with pytest.raises(CompressedTarError, match="compressed") as err:
        ours(path)
    assert f"{kind}-compressed" in str(err.value) and str(path) in str(err.value)


def test_gzip_of_raw_bytes_refused(records_tar):
    with pytest.raises(CompressedTarError, match="gzip-compressed"):
        scan_tar(gzip.compress(records_tar.read_bytes()), "x.tar")


# --- records ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "ext"),
    [
        ("000042.jpg", "000042", "jpg"),
        ("dir/000042.seg.png", "dir/000042", "seg.png"),
        ("a.b/c.d/000042.JPG", "a.b/c.d/000042", "JPG"),
        ("noext", None, None),  # no extension: in no record
        ("dir/noext", None, None),
        ("dir/.hidden", None, None),  # dot-files: in no record
        ("._000001.jpg", None, None),  # macOS AppleDouble
        ("a.b/._000001.jpg", None, None),
        ("./000001.jpg", "./000001", "jpg"),
        ("dir/a.", "dir/a", ""),
        ("../../evil.jpg", "../../evil", "jpg"),
        ("/abs/x.jpg", "/abs/x", "jpg"),
    ],
)
def test_split_key(name, key, ext):
    assert split_key(name) == (key, ext)


def test_split_keys_matches_split_key():
    rng = np.random.default_rng(0)
    alphabet = list("ab./é画\n ")
    names = ["", ".", "/", "a.", "x/y\n.z", "a.b/.c.d", "k/", "é/画.légende", "._a.jpg", "noext"]
    names += ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(3000)]
    keys, exts = split_keys(pa.array(names))
    assert list(zip(keys.to_pylist(), exts.to_pylist())) == [split_key(n) for n in names]
    assert any(split_key(n)[0] is None for n in names)
    # when every name has a key and none has a "/" split_keys takes its fast path (split
    # at the first dot)
    plain = [n for n in names if "/" not in n and split_key(n)[0] is not None]
    assert len(plain) > 400 and any("." in n[n.index(".") + 1 :] for n in plain)
    keys, exts = split_keys(pa.array(plain))
    assert list(zip(keys.to_pylist(), exts.to_pylist())) == [split_key(n) for n in plain]
    keys, exts = split_keys(pa.array([], pa.string()))
    assert len(keys) == len(exts) == 0


def test_split_key_is_webdatasets_rule():
    """``webdataset``'s ``base_plus_ext`` decides which members form records; we follow it,
    except that its regular expression keys a dot-file in a directory by the directory
    (``dir/._x.jpg`` -> ``dir/``), which DALI's ``wds2idx`` ignores, as we do."""
    tariterators = pytest.importorskip("webdataset.tariterators")
    rng = np.random.default_rng(1)
    alphabet = list("ab./é画_ ")
    names = ["._000001.jpg", "000001.jpg", "dir/000001.seg.png", "noext", "dir/noext", "a.b/c"]
    names += ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(5000)]
    quirks = 0
    for name in names:
        theirs = tariterators.base_plus_ext(name)
        if theirs[0] is not None and theirs[0].endswith("/"):  # a dot-file in a directory
            assert name[len(theirs[0])] == "." and split_key(name) == (None, None)
            quirks += 1
        else:
            assert split_key(name) == theirs, name
    assert quirks and sum(split_key(n)[0] is None for n in names) > 500


def test_non_utf8_member_name_is_a_clear_error():
    info = tarfile.TarInfo("café.jpg")
    info.size = 3
    data = info.tobuf(tarfile.GNU_FORMAT, "latin-1", "strict") + b"abc".ljust(512, b"\0")
    index = scan_tar(data + bytes(1024), "latin.tar")
    assert index.names == ["caf\udce9.jpg"]  # kept as the bytes were, not guessed
    with pytest.raises(TarFormatError, match=r"latin.tar: member name .* is not UTF-8"):
        group_records(index)


def _mixed_tar() -> bytes:
    """Plain members around every header kind the general loop handles."""
    out = io.BytesIO()
    entries = [
        (tarfile.GNU_FORMAT, "000.jpg"),
        (tarfile.GNU_FORMAT, "x" * 120 + ".jpg"),  # GNU long name ("L")
        (tarfile.USTAR_FORMAT, "d" * 90 + "/" + "p" * 40 + ".txt"),  # ustar prefix
        (tarfile.PAX_FORMAT, "画像.jpg"),  # pax "path"
        (tarfile.GNU_FORMAT, "001.json"),
        (tarfile.GNU_FORMAT, "001.txt"),
    ]
    for fmt, name in entries:
        info = tarfile.TarInfo(name)
        payload = name.encode() * 3
        info.size = len(payload)
        out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        out.write(payload.ljust(-len(payload) % 512 + len(payload), b"\0"))
        if name == "000.jpg":
            link = tarfile.TarInfo("000.lnk")  # not a regular file: listed as skipped
            link.type, link.linkname = tarfile.SYMTYPE, "000.jpg"
            out.write(link.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    return out.getvalue() + bytes(1024)


def test_fast_walk_equals_general_loop_and_tarfile():
    data = _mixed_tar()
    fast = scan_tar(data, "m.tar")  # bytes: plain runs take the fast walk
    general = scan_tar(memoryview(data), "m.tar")  # memoryview: the general loop only
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
    for index in (fast, general):
        assert list(zip(index.names, index.offsets.tolist(), index.sizes.tolist())) == expected
    assert fast.skipped == general.skipped == ["000.lnk"]


def test_group_records_matches_split_key(demo_dir, tarfile_members):
    index = scan_tar((demo_dir / "00001.tar").read_bytes(), "x")
    records = group_records(index)
    expected_keys = []
    for name, _, _ in tarfile_members(demo_dir / "00001.tar"):
        key = split_key(name)[0]
        if not expected_keys or expected_keys[-1] != key:
            expected_keys.append(key)
    assert records.keys == expected_keys and len(records) == 12
    for r, key in enumerate(records.keys):
        names = index.names[records.starts[r] : records.stops[r]]
        assert names == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
        assert index.names[records.image_member[r]] == f"{key}.jpg"


def test_image_member_detection(tmp_path):
    members = [
        ("a.cls", b"1"),
        ("a.npy", b"\x93NUMPY"),
        ("a.JPG", b"img-a"),
        ("b.txt", b"no image"),
        ("c.json", b"{}"),
        ("c.webp", b"img-c"),
        ("c.png", b"second image"),
        ("d.seg.png", b"img-d"),
        ("e.depth.png", b"a depth map"),
        ("e.jpg", b"img-e"),
        ("f.0.jpg", b"img-f0"),
        ("f.1.JPG", b"img-f1"),
        ("g.HEIC.jpg", b"img-g"),
        ("h.jpg.txt", b"a caption"),
    ]
    index = scan_tar(write_tar(tmp_path / "x.tar", members).read_bytes(), "x")
    records = group_records(index)
    assert records.keys == ["a", "b", "c", "d", "e", "f", "g", "h"]
    images = [index.names[i] if i >= 0 else None for i in records.image_member.tolist()]
    # an extension ending in an image's counts (as webdataset decodes "0.jpg"), after plain ones
    assert images == ["a.JPG", None, "c.webp", "d.seg.png", "e.jpg", "f.0.jpg", "g.HEIC.jpg", None]


def test_duplicate_key_not_adjacent(tmp_path):
    members = [("a.jpg", b"1"), ("a.txt", b"2"), ("b.jpg", b"3"), ("a.json", b"{}")]
    index = scan_tar(write_tar(tmp_path / "dup.tar", members).read_bytes(), "dup.tar")
    with pytest.raises(DuplicateKeyError, match="'a'") as err:
        group_records(index)
    assert "dup.tar" in str(err.value) and "a.json" in str(err.value)


def test_duplicate_member_name(tmp_path):
    members = [("a.jpg", b"1"), ("b.jpg", b"2"), ("b.txt", b"3"), ("b.jpg", b"4")]
    index = scan_tar(write_tar(tmp_path / "dup.tar", members).read_bytes(), "dup.tar")
    with pytest.raises(DuplicateKeyError, match="'b.jpg'") as err:
        group_records(index)
    assert "dup.tar" in str(err.value)


def test_unsafe_names_are_plain_keys(tmp_path, tarfile_members):
    members = [
        ("/abs/x.jpg", b"abs image"),
        ("/abs/x.txt", b"abs caption"),
        ("../../evil.jpg", b"evil image"),
        ("../../evil.txt", b"evil caption"),
        ("ok/../../up.jpg", b"up"),
    ]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    path = write_tar(work / "unsafe.tar", members)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert ours(path) == tarfile_members(path)
    records = group_records(scan_tar(path.read_bytes(), str(path)))
    assert records.keys == ["/abs/x", "../../evil", "ok/../../up"]
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/abs/x.jpg").exists()
    assert not os.path.exists(work / "../../evil.jpg")


def test_tar_cut_between_members_is_kept_and_flagged(tmp_path):
    """Data that stops right after a member, without the end-of-archive blocks, is indexed
    like GNU tar reads it, but flagged: a cut between records looks exactly like that."""
    members = [(f"{i:03d}.{ext}", payload(i)) for i in range(4) for ext in ("jpg", "txt")]
    tar = write_tar(tmp_path / "whole.tar", members)
    with tarfile.open(tar) as ref:
        infos = ref.getmembers()
    cut = tmp_path / "cut.tar"
    end_of_member_5 = infos[5].offset_data + -(-infos[5].size // 512) * 512
    cut.write_bytes(tar.read_bytes()[:end_of_member_5])
    with fsio.open_buffer(LocalFileSystem(), str(tar)) as buffer:
        assert scan_tar(buffer, str(tar)).ends_marked
    with fsio.open_buffer(LocalFileSystem(), str(cut)) as buffer:
        index = scan_tar(buffer, str(cut))
    assert not index.ends_marked and index.damage is None
    assert ours(cut) == ours(tar)[:6]
    tar_listing = subprocess.run(["tar", "tf", str(cut)], capture_output=True, text=True)
    assert tar_listing.stdout.split() == index.names  # GNU tar reads the same members

    from dask_imgcurate import ImageTextPairDataset

    (tmp_path / "ds").mkdir()
    shutil.move(cut, tmp_path / "ds" / "00000.tar")
    with pytest.warns(UserWarning, match=r"00000.tar: ends after 6 members without the end-of"):
        frame = ImageTextPairDataset.from_webdataset(str(tmp_path / "ds")).metadata.compute()
    assert frame["key"].tolist() == ["000", "001", "002"]


def test_data_after_the_end_of_archive_is_flagged(tmp_path):
    first = write_tar(tmp_path / "a.tar", [("000.jpg", payload(1)), ("000.txt", b"a")])
    second = write_tar(tmp_path / "b.tar", [("001.jpg", payload(2)), ("001.txt", b"b")])
    (tmp_path / "ds").mkdir()
    joined = tmp_path / "ds" / "00000.tar"
    joined.write_bytes(first.read_bytes() + second.read_bytes())  # cat a.tar b.tar
    with fsio.open_buffer(LocalFileSystem(), str(first)) as buffer:
        assert scan_tar(buffer, str(first)).data_after_end is None
    with fsio.open_buffer(LocalFileSystem(), str(joined)) as buffer:
        index = scan_tar(buffer, str(joined))
    assert index.names == ["000.jpg", "000.txt"]  # what tar readers see, too
    assert index.data_after_end == first.stat().st_size
    listing = subprocess.run(["tar", "tf", str(joined)], capture_output=True, text=True)
    assert listing.stdout.split() == index.names

    from dask_imgcurate import ImageTextPairDataset

    with pytest.warns(
        UserWarning, match=f"data follows its end-of-archive blocks .*offset {first.stat().st_size}"
    ):
        frame = ImageTextPairDataset.from_webdataset(str(tmp_path / "ds")).metadata.compute()
    assert frame["key"].tolist() == ["000"]


# --- sparse members, Solaris pax headers, links ---------------------------------------------


@pytest.fixture
def sparse_tree(tmp_path) -> Path:
    """Records 000001 (jpg, npy with a 1 MiB hole, txt) and 000002 (jpg, txt)."""
    src = tmp_path / "sparse-src"
    src.mkdir()
    for key in ("000001", "000002"):
        (src / f"{key}.jpg").write_bytes(payload(6))
        (src / f"{key}.txt").write_bytes(f"caption {key}".encode())
    with open(src / "000001.npy", "wb") as f:  # a file with a hole, then data
        f.truncate(1 << 20)
        f.seek(1 << 20)
        f.write(b"tail-bytes")
    return src


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_member_is_a_clear_error(tmp_path, sparse_tree, fmt):
    """GNU tar --sparse stores only a sparse file's data, with a map (a type 'S' header, or
    pax GNU.sparse.* records): byte ranges cannot give its bytes, so it is damage."""
    files = ["000001.jpg", "000001.npy", "000001.txt", "000002.jpg", "000002.txt"]
    tar = tmp_path / f"{fmt}.tar"
    subprocess.run(
        [GNU_TAR, f"--format={fmt}", "--sparse", "-cf", str(tar), "-C", str(sparse_tree), *files],
        check=True,
    )
    with tarfile.open(tar) as ref:  # the reference sees a sparse member where we fail
        infos = ref.getmembers()
        assert [m.name for m in infos] == files and infos[1].issparse()
        expected = [(m.name, m.offset_data, m.size) for m in infos[:1]]
    with pytest.raises(
        TarFormatError, match=r"sparse member '000001.npy'.*without --sparse"
    ) as err:
        ours(tar)
    assert expected[0][1] + expected[0][2] <= err.value.offset < infos[1].offset_data
    assert str(tar) in str(err.value)
    lenient = scan_tar(tar.read_bytes(), str(tar), strict=False)
    assert list(zip(lenient.names, lenient.offsets.tolist(), lenient.sizes.tolist())) == expected
    assert lenient.damage.offset == err.value.offset
    records = group_records(lenient)
    assert records.keys == [] and records.dropped_incomplete == 1  # 000001 is incomplete


@pytest.mark.parametrize("kind", ["gnu-S", "pax-0.1"])
def test_crafted_sparse_members_are_refused(kind):
    first = tarfile.TarInfo("000000.txt")
    first.size = 3
    sparse = tarfile.TarInfo("000001.npy")
    if kind == "gnu-S":
        sparse.type = tarfile.GNUTYPE_SPARSE
        fmt = tarfile.GNU_FORMAT
    else:  # GNU sparse 0.1 in pax records; the ustar type stays regular
        sparse.pax_headers = {"GNU.sparse.size": "4096", "GNU.sparse.map": "0,0"}
        fmt = tarfile.PAX_FORMAT
    data = first.tobuf(fmt, "utf-8", "surrogateescape") + b"abc".ljust(512, b"\0")
    header_at = len(data)
    data += sparse.tobuf(fmt, "utf-8", "surrogateescape") + bytes(1024)
    with pytest.raises(TarFormatError, match="sparse member '000001.npy'") as err:
        scan_tar(data, "s.tar")
    assert header_at <= err.value.offset < len(data) - 1024
    assert scan_tar(data, "s.tar", strict=False).names == ["000000.txt"]


def test_solaris_extended_header_is_read_like_pax(tmp_path, tarfile_members):
    """Type 'X' is the Solaris / star spelling of a pax extended header ('x')."""
    path = write_tar(
        tmp_path / "x.tar",
        [("ünï/" + "p" * 120 + ".jpg", payload(4)), ("000001.txt", b"cap")],
        tarfile.PAX_FORMAT,
    )
    data = bytearray(path.read_bytes())
    assert data[156:157] == b"x"  # the first member's pax header
    data[156:157] = b"X"
    path.write_bytes(_with_checksum(data[:512]) + bytes(data[512:]))
    expected = tarfile_members(path)  # tarfile reads 'X' as a pax header too
    assert expected[0][0].startswith("ünï/p")
    assert ours(path) == expected
    assert scan_tar(memoryview(path.read_bytes()), "x").names == [m[0] for m in expected]


def test_skipped_links_are_named_with_their_long_names():
    out = io.BytesIO()
    long_name = "d" * 120 + "/000002.jpg"
    for name, kind in [("000001.jpg", tarfile.REGTYPE), (long_name, tarfile.LNKTYPE)]:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "000001.jpg" if kind == tarfile.LNKTYPE else ""
        info.size = 3 if kind == tarfile.REGTYPE else 0
        out.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        if kind == tarfile.REGTYPE:
            out.write(b"abc".ljust(512, b"\0"))
    index = scan_tar(out.getvalue() + bytes(1024), "l.tar")
    assert index.names == ["000001.jpg"] and index.skipped == [long_name]


def test_data_after_the_end_beyond_the_first_mebibyte():
    """The search for data after the end-of-archive blocks reads the rest chunk by chunk."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("000001.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    first = out.getvalue()
    for extra in (0, 1, (1 << 20) - len(first), (3 << 20) + 77):
        data = first + bytes(extra) + b"\x01" + bytes(600)
        assert scan_tar(data, "x").data_after_end == len(first) + extra
    assert scan_tar(first + bytes(3 << 20), "x").data_after_end is None


# --- members in no record, names that are not UTF-8 ------------------------------------------


def test_members_in_no_record_are_left_out(tmp_path):
    """macOS tar stores extended attributes as '._NAME' members before each file; webdataset
    and wds2idx ignore them, and members without an extension."""
    members = [
        ("._000001.jpg", b"apple double"),
        ("000001.jpg", b"img"),
        ("._000001.txt", b"apple double"),
        ("000001.txt", b"cap"),
        ("README", b"no extension"),
        ("dir/._000002.jpg", b"apple double"),
        ("dir/000002.jpg", b"img 2"),
    ]
    path = write_tar(tmp_path / "mac.tar", members)
    records = group_records(scan_tar(path.read_bytes(), str(path)))
    assert records.keys == ["000001", "dir/000002"]
    assert records.members.names == ["000001.jpg", "000001.txt", "dir/000002.jpg"]
    assert records.ignored == ["._000001.jpg", "._000001.txt", "README", "dir/._000002.jpg"]
    expected = {n: o for n, o, _ in ours(path)}
    assert records.members.offsets.tolist() == [expected[n] for n in records.members.names]
    assert records.stops.tolist() == [2, 3]
    assert [records.members.names[i] for i in records.image_member] == [
        "000001.jpg",
        "dir/000002.jpg",
    ]


def _latin1_tar(keys: list[str], *, cut: int | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for key in keys:
            for ext, data in (("jpg", payload(5)), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return out.getvalue() if cut is None else out.getvalue()[:cut]


def test_non_utf8_names_lenient_drop_their_records():
    data = _latin1_tar(["k1", "café", "k3", "ünï", "k5"])
    index = scan_tar(data, "latin.tar")
    with tarfile.open(fileobj=io.BytesIO(data), encoding="latin-1") as ref:
        bad_offset = next(m.offset_data for m in ref.getmembers() if m.name == "café.jpg")
    with pytest.raises(TarFormatError, match="not UTF-8") as err:
        group_records(index)
    assert err.value.offset == bad_offset
    records = group_records(index, strict=False)
    assert records.keys == ["k1", "k3", "k5"]
    assert records.undecodable == 2 and records.undecodable_offset == bad_offset
    assert records.members.names == ["k1.jpg", "k1.txt", "k3.jpg", "k3.txt", "k5.jpg", "k5.txt"]
    assert records.ignored == [] and records.dropped_incomplete == 0


def test_non_utf8_name_in_no_record_is_only_ignored():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for name in ("._café.jpg", "k1.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
    records = group_records(scan_tar(out.getvalue(), "x.tar"))  # strict: no error
    assert records.keys == ["k1"] and records.ignored == ["._caf\udce9.jpg"]


def test_non_utf8_record_cut_by_damage_counts_once():
    whole = _latin1_tar(["k1", "k2", "café"])
    with tarfile.open(fileobj=io.BytesIO(whole), encoding="latin-1") as ref:
        txt = ref.getmembers()[-1]
    index = scan_tar(whole[: txt.offset_data + 1], "cut.tar", strict=False)  # in café.txt
    assert index.damage is not None and index.names[-1] == "caf\udce9.jpg"
    records = group_records(index, strict=False)
    assert records.keys == ["k1", "k2"]  # k2 is complete: café was in progress at the damage
    assert records.dropped_incomplete == 1 and records.undecodable == 0


def test_a_view_outliving_its_mapping_never_fails_the_read(tmp_path):
    """On Dask workers a view of the mapped tar can outlive the read in a reference cycle:
    closing the mapping then must not raise (it is unmapped when the view goes)."""
    path = write_tar(tmp_path / "00000.tar", [("a.jpg", b"x" * 600)])
    with fsio.open_buffer(LocalFileSystem(), str(path)) as buffer:
        view = np.frombuffer(buffer, dtype=np.uint8)
        cycle = [view]
        cycle.append(cycle)  # only the collector frees it
    assert view[:5].tobytes() == path.read_bytes()[:5]
    del view, cycle


# --- resident memory of a memory-mapped scan --------------------------------------------


def _scan_mapped(path: Path, strict: bool = True):
    with fsio.open_buffer(LocalFileSystem(), str(path)) as buffer:
        index = scan_tar(buffer, str(path), strict=strict)
    names = list(zip(index.names, index.offsets.tolist(), index.sizes.tolist()))
    return names, index.skipped, str(index.damage), index.data_after_end, index.ends_marked


def test_pages_released_behind_the_scan_change_nothing(
    tmp_path, demo_dir, records_tar, monkeypatch
):
    """Releasing a mapped tar's pages after every member (the pages re-read from the page
    cache, the headers copied before) finds what one pass over the mapping does: plain runs,
    every special header, damage, data after the end."""
    mixed = tmp_path / "mixed.tar"
    mixed.write_bytes(_mixed_tar() + b"after the end")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(records_tar.read_bytes()[:5000])
    bad = bytearray(records_tar.read_bytes())
    bad[int(scan_tar(bytes(bad)).offsets[9]) - 512 + 148] ^= 1  # a later header's checksum
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    tars = [*sorted(demo_dir.glob("*.tar")), mixed, cut, tmp_path / "bad.tar"]
    whole = [_scan_mapped(t, strict=False) for t in tars]
    monkeypatch.setattr(tarindex, "RELEASE_EVERY", 1)
    assert [_scan_mapped(t, strict=False) for t in tars] == whole
    assert whole[-3][3] is not None and whole[-2][2] != "None" and whole[-1][2] != "None"
    with pytest.raises(TarFormatError, match="bad checksum"):
        _scan_mapped(tmp_path / "bad.tar")


_RSS_PROBE = """
import sys
from fsspec.implementations.local import LocalFileSystem
from dask_imgcurate.io import fs as fsio, tarindex

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) // 1024

tarindex.RELEASE_EVERY = int(sys.argv[2])
tarindex.scan_tar(b"")  # first-call costs
before = status("VmRSS:")
with fsio.open_buffer(LocalFileSystem(), sys.argv[1]) as buffer:
    members = len(tarindex.scan_tar(buffer).names)
print(members, status("VmHWM:") - before)
"""


def test_a_mapped_scan_keeps_few_pages_resident(tmp_path):
    """A 48 MB tar's scan (40 KB members: the kernel maps 64 KB around each header read)
    adds ~its size to the process's peak RSS when its pages stay mapped, and a few MB when
    they are released every 4 MB (Dask's memory monitor reads RSS)."""
    members = [(f"{i:06d}.bin", os.urandom(1000) * 40) for i in range(1200)]  # 40 KB each
    tar = write_tar(tmp_path / "big.tar", members, tarfile.USTAR_FORMAT)
    grown = {}
    for every in (4 << 20, 1 << 40):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, str(tar), str(every)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert int(out[0]) == 1200
        grown[every] = int(out[1])
    assert grown[1 << 40] >= 40 and grown[4 << 20] <= 12, grown

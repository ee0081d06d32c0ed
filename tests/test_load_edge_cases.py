"""Loading unusual but real tars with ``from_webdataset``: members in no record, links,
sparse files, names that are not UTF-8, huge JSON integers, awkward paths.

Every tar is real bytes written by ``tarfile`` or GNU ``tar``; expectations come from the
``webdataset`` library or ``tarfile`` where they can.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from compute_helpers import count_indexing, write_tar

from dask_imgcurate import ImageTextPairDataset
from dask_imgcurate.errors import CompressedTarError, ShardNotice, ShardWarning, TarFormatError

GNU_TAR = shutil.which("tar")
needs_gnu_tar = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar not installed")
IMAGE = bytes(range(256)) * 5  # the loader never decodes: any bytes do


def records(keys, extra=()) -> list[tuple[str, bytes]]:
    """jpg + txt members per key (and ``extra`` (ext, bytes) members)."""
    out = []
    for key in keys:
        out += [(f"{key}.jpg", IMAGE), (f"{key}.txt", f"caption {key}".encode())]
        out += [(f"{key}.{ext}", data) for ext, data in extra]
    return out


def load(path, **kwargs):
    return ImageTextPairDataset.from_webdataset(
        path if isinstance(path, list) else str(path), backend="pandas", **kwargs
    )


def frame_and_warnings(path, **kwargs):
    """The computed frame and the warnings of the compute alone (not of the loading)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load(path, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = dataset.metadata.compute()
    return frame, caught


def webdataset_keys(tar: Path) -> list[tuple[str, list[str]]]:
    wds = pytest.importorskip("webdataset")
    dataset = wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)
    return [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in dataset]


# --- members in no record -------------------------------------------------------------------


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(100)


def test_macos_dot_files_belong_to_no_record(tmp_path):
    """bsdtar on macOS writes an AppleDouble '._NAME' member before each file; webdataset
    (and DALI's wds2idx) ignore them. So do we, with one warning per shard."""
    members = []
    for key in ("000001", "000002"):
        for name, data in records([key]):
            members += [(f"._{name}", APPLE_DOUBLE), (name, data)]
    members.append(("README", b"a member without extension"))
    tar = write_tar(tmp_path / "ds" / "00000.tar", members)
    assert webdataset_keys(tar) == [("000001", ["jpg", "txt"]), ("000002", ["jpg", "txt"])]

    frame, caught = frame_and_warnings(tmp_path / "ds")
    assert list(frame["key"]) == ["000001", "000002"]
    assert list(frame["_image_member"]) == ["000001.jpg", "000002.jpg"]
    assert list(frame["caption"]) == ["caption 000001", "caption 000002"]
    assert [[m["name"] for m in ms] for ms in frame["_members"]] == [
        ["000001.jpg", "000001.txt"],
        ["000002.jpg", "000002.txt"],
    ]
    assert len(caught) == 1 and caught[0].category is ShardNotice
    message = str(caught[0].message)
    assert message.startswith(f"{tar}: ignored 5 members that belong to no record")
    assert "'._000001.jpg', '._000001.txt', '._000002.jpg', ..." in message

    # a sidecar Parquet with the real records' ids is no mismatch
    pq.write_table(
        pa.table({"key": ["000001", "000002"], "url": ["u1", "u2"]}), tar.with_suffix(".parquet")
    )
    with pytest.warns(ShardNotice):
        frame = load(tmp_path / "ds").metadata.compute()
    assert list(frame["url"]) == ["u1", "u2"]


# --- links ------------------------------------------------------------------------------------


@needs_gnu_tar
def test_hard_links_are_reported_not_followed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "000001.jpg").write_bytes(IMAGE)
    os.link(src / "000001.jpg", src / "000002.jpg")  # GNU tar stores a hard link ('1')
    os.symlink("000001.jpg", src / "000003.jpg")
    for key in ("000001", "000002", "000003"):
        (src / f"{key}.txt").write_text(f"caption {key}")
    (tmp_path / "ds").mkdir()
    tar = tmp_path / "ds" / "00000.tar"
    subprocess.run([GNU_TAR, "--sort=name", "-cf", str(tar), "-C", str(src), "."], check=True)
    with tarfile.open(tar) as ref:
        kinds = {m.name: m.type for m in ref.getmembers()}
    assert kinds["./000002.jpg"] == tarfile.LNKTYPE and kinds["./000003.jpg"] == tarfile.SYMTYPE

    frame, caught = frame_and_warnings(tmp_path / "ds")
    assert list(frame["key"]) == ["./000001", "./000002", "./000003"]
    assert list(frame["_image_member"].isna()) == [False, True, True]
    assert [w.category for w in caught] == [ShardNotice]
    message = str(caught[0].message)
    assert message.startswith(f"{tar}: skipped 2 links or other members")
    assert "links are not followed" in message and "'./000002.jpg', './000003.jpg'" in message


# --- sparse members ---------------------------------------------------------------------------


@needs_gnu_tar
def test_sparse_member_is_damage(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for key in ("000001", "000002", "000003"):
        (src / f"{key}.jpg").write_bytes(IMAGE)
        (src / f"{key}.txt").write_text(f"caption {key}")
    with open(src / "000002.npy", "wb") as f:  # a file with a hole
        f.truncate(1 << 20)
        f.write(b"head")
    (tmp_path / "ds").mkdir()
    tar = tmp_path / "ds" / "00000.tar"
    subprocess.run(
        [GNU_TAR, "--sparse", "--sort=name", "-cf", str(tar), "-C", str(src), "."], check=True
    )
    with pytest.raises(TarFormatError, match=r"sparse member './000002.npy'.*without --sparse"):
        load(tmp_path / "ds").metadata.compute()
    frame, caught = frame_and_warnings(tmp_path / "ds", strict=False)
    assert list(frame["key"]) == ["./000001"]  # 000002 is cut by the damage
    assert [w.category for w in caught] == [ShardWarning]
    assert "sparse member './000002.npy'" in str(caught[0].message)
    assert "kept the 1 complete records" in str(caught[0].message)


# --- names that are not UTF-8 -----------------------------------------------------------------


def test_non_utf8_names_lenient(tmp_path):
    tar = write_tar(
        tmp_path / "ds" / "00000.tar",
        records(["k1", "café", "k3"]),
        fmt=tarfile.GNU_FORMAT,
        encoding="latin-1",
    )
    with tarfile.open(tar, encoding="latin-1") as ref:
        offset = next(m.offset_data for m in ref.getmembers() if m.name == "café.jpg")
    with pytest.raises(TarFormatError, match=f"not UTF-8; its data starts at byte offset {offset}"):
        load(tmp_path / "ds").metadata.compute()

    frame, caught = frame_and_warnings(tmp_path / "ds", strict=False)
    assert list(frame["key"]) == ["k1", "k3"]
    assert [w.category for w in caught] == [ShardWarning]
    message = str(caught[0].message)
    assert message.startswith(f"{tar}: dropped 1 records whose member names are not UTF-8")
    assert f"byte offset {offset}" in message and "kept the other 2 records" in message

    # its sidecar row (whatever the id became) is dropped with it, and said so
    ids = ["k1", "café", "k3"]
    pq.write_table(pa.table({"key": ids, "n": [1, 2, 3]}), tar.with_suffix(".parquet"))
    frame, caught = frame_and_warnings(tmp_path / "ds", strict=False)
    assert list(frame["n"]) == [1, 3]
    assert "dropped the 1 sidecar Parquet rows" in str(caught[-1].message)


# --- JSON --------------------------------------------------------------------------------------


def test_json_integer_beyond_64_bits_is_kept_as_text(tmp_path):
    big = 18446744073709551557  # an unsigned 64-bit hash, say
    members = []
    for key, fields in (("000001", {"phash": big, "w": 1}), ("000002", {"phash": 42, "w": 2})):
        members += records([key], [("json", json.dumps(fields).encode())])
    tar = write_tar(tmp_path / "ds" / "00000.tar", members)
    frame, caught = frame_and_warnings(tmp_path / "ds")
    assert list(frame["phash"]) == [str(big), "42"]  # JSON text, like mixed types
    assert list(frame["w"]) == [1, 2]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{tar}: record '000001': .json field 'phash' holds an integer")
    assert str(big) in message and "kept as JSON text" in message


def test_json_fields_that_only_some_records_have(tmp_path):
    """Each field is null in the records whose .json lacks it, whatever record holds it first
    (the per-field columns are built once per shard, not once per value)."""
    members = []
    for key, fields in (
        ("000001", {"a": 1}),
        ("000002", {"b": "x"}),
        ("000003", {}),
        ("000004", {"a": 4, "b": "y", "c": 2.5}),
    ):
        members += records([key], [("json", json.dumps(fields).encode())])
    write_tar(tmp_path / "ds" / "00000.tar", members)
    frame, _ = frame_and_warnings(tmp_path / "ds")
    assert frame["a"].tolist() == [1, pd.NA, pd.NA, 4]
    assert frame["b"].tolist() == [pd.NA, "x", pd.NA, "y"]
    assert frame["c"].isna().tolist() == [True, True, True, False]
    assert frame["c"].iloc[3] == 2.5


def test_json_field_types_across_shards(tmp_path):
    """Another shard's values convert to the first shard's type where their meaning stays
    (numbers widen, anything is text in a string column); booleans and numbers do not mix."""

    def dataset(name, first, second):
        for n, value in enumerate((first, second)):
            fields = json.dumps({"v": value}).encode()
            write_tar(tmp_path / name / f"0000{n}.tar", records([f"{n}"], [("json", fields)]))
        return ImageTextPairDataset.from_webdataset(str(tmp_path / name)).metadata

    assert list(dataset("widen", 640.5, 640)["v"].compute()) == [640.5, 640.0]
    assert list(dataset("text", "cc-by", 3)["v"].compute()) == ["cc-by", "3"]
    for name, first, second in (("bool-int", True, 2), ("int-bool", 7, True)):
        with pytest.raises(TypeError, match=f"{name}/00001.tar: column 'v' is"):
            dataset(name, first, second).compute()


# --- paths -------------------------------------------------------------------------------------


def test_a_tar_listed_twice_is_refused(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", records(["a", "b"]))
    with pytest.raises(ValueError, match=r"00000\.tar is listed more than once"):
        ImageTextPairDataset.from_webdataset([str(tar), str(tmp_path / "." / "00000.tar")])


def test_paths_with_glob_characters_are_used_literally(tmp_path):
    write_tar(tmp_path / "laion[en]" / "00000.tar", records(["000001"]))
    write_tar(tmp_path / "laion[en]" / "00001.tar", records(["000002"]))
    write_tar(tmp_path / "part?1" / "00000.tar", records(["000003"]))
    assert len(load(tmp_path / "laion[en]").shards) == 2  # a directory
    assert len(load(tmp_path / "laion[en]" / "00001.tar").shards) == 1  # a tar
    assert list(load(tmp_path / "part?1" / "00000.tar").metadata.compute()["key"]) == ["000003"]
    globbed = load(tmp_path / "laion?en?" / "*.tar")  # what does not exist is a glob
    assert [Path(s.tar).name for s in globbed.shards] == ["00000.tar", "00001.tar"]


def test_compressed_tars_are_refused_by_name(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", records(["000001"]))
    gz = tmp_path / "gz" / "00000.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    (tmp_path / "gz" / "00001.tgz").write_bytes(gzip.compress(tar.read_bytes()))
    expected = f"{gz}: this shard is gzip-compressed; .* needs an uncompressed .tar"
    for path in (gz, [str(gz)]):
        with pytest.raises(CompressedTarError, match=expected):
            load(path)
    with pytest.raises(CompressedTarError, match=rf"{gz} \(and 1 more\): this shard is gzip"):
        load(gz.parent)  # a directory of compressed tars only
    with pytest.raises(CompressedTarError, match="gzip-compressed"):
        load(tmp_path / "gz" / "*")
    (tmp_path / "00000.tar.zst").write_bytes(b"(\xb5/\xfd not really")
    with pytest.raises(CompressedTarError, match="00000.tar.zst: this shard is zstd-compressed"):
        load(tmp_path / "00000.tar.zst")
    assert len(load(tmp_path).shards) == 1  # beside a .tar, compressed ones are not shards


def test_directories_named_like_tars(tmp_path):
    write_tar(tmp_path / "ds" / "00000.tar", records(["000001"]))
    (tmp_path / "ds" / "00001.tar").mkdir()  # a directory, not a shard
    dataset = load(tmp_path / "ds")
    assert [Path(s.tar).name for s in dataset.shards] == ["00000.tar"]
    assert list(dataset.metadata.compute()["key"]) == ["000001"]
    assert len(load(tmp_path / "ds" / "*.tar").shards) == 1
    with pytest.raises(IsADirectoryError, match=r"00001.tar: is a directory, not a .tar shard"):
        load([str(tmp_path / "ds" / "00000.tar"), str(tmp_path / "ds" / "00001.tar")])
    with pytest.raises(FileNotFoundError, match="no .tar shards"):  # named: a directory
        load(tmp_path / "ds" / "00001.tar")
    (tmp_path / "notes.txt").write_text("not a shard")
    with pytest.raises(ValueError, match=r"notes.txt: not a .tar shard"):
        load(tmp_path / "notes.txt")


def test_upper_case_tar_names_are_explained_not_skipped_silently(tmp_path):
    """Shard names end in '.tar' (case-sensitive, as WebDataset's): a directory of '.TAR'
    files is an error saying why, and '.TAR' files beside '.tar' shards get a warning."""
    only = tmp_path / "upper"
    write_tar(only / "00000.TAR", records(["000001"]))
    write_tar(only / "00001.Tar", records(["000002"]))
    case = r"shard names end in '\.tar', matched case-sensitively \(rename the files\)"
    with pytest.raises(FileNotFoundError, match=rf"00000\.TAR \(and 1 more\): {case}"):
        load(only)
    with pytest.raises(ValueError, match=rf"00000\.TAR: not a \.tar shard \(.*; {case}"):
        load(only / "00000.TAR")
    write_tar(only / "00002.tar", records(["000003"]))
    with pytest.warns(ShardWarning, match=rf"not read: .*00000\.TAR \(and 1 more\): {case}"):
        dataset = load(only)
    assert list(dataset.metadata.compute()["key"]) == ["000003"]


# --- each shard indexed once per compute ------------------------------------------------------


def test_each_shard_is_indexed_once_per_compute(tmp_path, monkeypatch):
    """A shard's warnings appear once per compute. Without sidecars the first shard is also
    indexed once when loading (for the schema), silently: the compute reports it."""
    for i in range(3):
        tar = write_tar(tmp_path / "ds" / f"0000{i}.tar", records([f"{i}a", f"{i}b"]))
        data = tar.read_bytes()
        tar.write_bytes(data[: data.rindex(b"caption") + 512])  # cut between records
    calls = count_indexing(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShardWarning)
        dataset = load(tmp_path / "ds")
    assert calls == ["00000.tar"]
    for _ in range(2):
        calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert len(dataset.metadata.compute()) == 6
        assert sorted(calls) == ["00000.tar", "00001.tar", "00002.tar"]
        shards = sorted(str(w.message).split(": ")[0].rsplit("/", 1)[1] for w in caught)
        assert shards == ["00000.tar", "00001.tar", "00002.tar"]
        assert all("ends after 4 members" in str(w.message) for w in caught)


def test_webdataset_brace_notation_names_shards(tmp_path):
    """``shards/{00000..00002}.tar`` as WebDataset users write it: the tars it expands to
    (sorted, as shards always are); a missing one is an error naming it; an existing path
    with braces in its name is used as it is."""
    from dask_imgcurate.demo import make_demo_dataset
    from dask_imgcurate.io.shards import expand_braces

    make_demo_dataset(tmp_path / "d", n_shards=3, samples_per_shard=2, seed=1)
    tars = [str(tmp_path / "d" / f"{i:05d}.tar") for i in range(3)]
    every = ImageTextPairDataset.from_webdataset(str(tmp_path / "d" / "{00000..00002}.tar"))
    assert every.tar_files == tars and all(s.parquet for s in every.shards)
    two = ImageTextPairDataset.from_webdataset(str(tmp_path / "d" / "0000{2,0}.tar"))
    assert two.tar_files == [tars[0], tars[2]]  # sorted, as every way of naming shards
    assert len(two.metadata.compute()) == 4
    with pytest.raises(FileNotFoundError, match=r"no such shard: .*00003\.tar"):
        ImageTextPairDataset.from_webdataset(str(tmp_path / "d" / "{00000..00003}.tar"))
    odd = tmp_path / "{x}"
    shutil.copytree(tmp_path / "d", odd)
    assert len(ImageTextPairDataset.from_webdataset(str(odd)).shards) == 3
    assert expand_braces("a/{8..10}-{x,y}.tar") == [
        "a/8-x.tar",
        "a/8-y.tar",
        "a/9-x.tar",
        "a/9-y.tar",
        "a/10-x.tar",
        "a/10-y.tar",
    ]


def test_brace_patterns_expand_as_braceexpand_does():
    from braceexpand import braceexpand

    from dask_imgcurate.io.shards import expand_braces

    patterns = [
        "s/{00000..00003}.tar",
        "{0000{0,1},00002}.tar",  # nested
        "{a..c}/{0..4..2}",  # letters, steps
        "{0..00002}",  # the widest end sets the padding
        "a{}b{x}c",  # no expansion: kept
        "{3..1}-{a,{b,c}}",
        "lit{00000..00001}/x.tar",
    ]
    for pattern in patterns:
        assert expand_braces(pattern) == list(braceexpand(pattern)), pattern


def test_a_directory_of_symlinked_tars_loads(tmp_path):
    """The Hugging Face hub's cache links every file of a snapshot (fsspec lists a link
    as "other")."""
    from dask_imgcurate.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "blobs", n_shards=2, samples_per_shard=3, seed=4)
    links = tmp_path / "snapshot"
    links.mkdir()
    for f in sorted((tmp_path / "blobs").iterdir()):
        (links / f.name).symlink_to(f)
    real = ImageTextPairDataset.from_webdataset(str(tmp_path / "blobs")).metadata.compute()
    for path in (links, links / "*.tar", links / "{00000..00001}.tar"):
        dataset = ImageTextPairDataset.from_webdataset(str(path))
        assert [s.parquet is not None for s in dataset.shards] == [True, True], path
        frame = dataset.metadata.compute()
        assert frame["key"].tolist() == real["key"].tolist()


def test_caption_that_is_not_utf8_is_reported(tmp_path):
    """A ``.txt`` member that is not UTF-8 (Latin-1, say) keeps its bytes in the tar, but
    its caption can only show them as U+FFFD: a ShardWarning names the shard and record."""
    members = [("000001.jpg", IMAGE), ("000001.txt", "café".encode("latin-1"))]
    members += records(["000002"])
    tar = write_tar(tmp_path / "ds" / "00000.tar", members)
    frame, caught = frame_and_warnings(tmp_path / "ds")
    assert list(frame["caption"]) == ["caf\ufffd", "caption 000002"]
    assert len(caught) == 1 and caught[0].category is ShardWarning
    message = str(caught[0].message)
    assert message.startswith(f"{tar}: 1 records' .txt member is not UTF-8 (e.g. record '000001')")


def test_sidecar_that_repeats_ids_names_them(tmp_path):
    """A sidecar with two rows for one record cannot be matched to the tar: the error lists
    the repeated ids, sorted, each once."""
    from dask_imgcurate.errors import MetadataMismatchError

    write_tar(tmp_path / "ds" / "00000.tar", records(["000001", "000002", "000003"]))
    ids = ["000003", "000001", "000003", "000002", "000001", "000003"]
    pq.write_table(pa.table({"key": ids}), tmp_path / "ds" / "00000.parquet")
    dataset = load(tmp_path / "ds")
    with pytest.raises(MetadataMismatchError, match=r"repeats ids \['000001', '000003'\]$"):
        dataset.metadata.compute(scheduler="sync")

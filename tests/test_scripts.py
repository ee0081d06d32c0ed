"""The batch examples in ``scripts/``, run as written (subprocesses) on demo data.

Outputs are checked with independent readers: the stdlib ``tarfile`` and ``pyarrow``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from readers import tar_records

from dask_imgcurate import write_dali_index
from dask_imgcurate.models.builtin import TINY_MODEL, make_demo_models

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SHARDS, PER_SHARD = 3, 8

# the tiny model runs with random weights on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


def script(name: str, *args, cwd: Path | None = None, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *[str(a) for a in args]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == code, proc.stderr
    return proc


def error_line(name: str, *args, code: int = 1) -> str:
    """Run a script that must fail: exit ``code``, no traceback; its last stderr line."""
    proc = script(name, *args, code=code)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def parquet_frame(directory: Path):
    tables = [pq.read_table(p) for p in sorted(directory.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pandas()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Made by ``scripts/make_demo_dataset.py`` itself. Read-only."""
    root = tmp_path_factory.mktemp("scripts") / "source"
    proc = script(
        "make_demo_dataset.py", root, "--shards", SHARDS, "--samples-per-shard", PER_SHARD
    )
    assert proc.stdout.split() == [str(root / f"{i:05d}.tar") for i in range(SHARDS)]
    return root


@pytest.fixture
def copy(source, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(source, dst)
    return dst


def test_make_demo_dataset(source):
    for i in range(SHARDS):
        records = tar_records(source / f"{i:05d}.tar")
        assert [k for k, _ in records] == [f"{i * PER_SHARD + j:09d}" for j in range(PER_SHARD)]
        assert all(set(m) == {"jpg", "txt", "json"} for _, m in records)
        keys = pq.read_table(source / f"{i:05d}.parquet").column("key").to_pylist()
        assert keys == [k for k, _ in records]


def test_make_idx(copy, tmp_path):
    proc = script("make_idx.py", copy)
    idx = sorted(copy.glob("*.idx"))
    assert [p.stem for p in idx] == [f"{i:05d}" for i in range(SHARDS)]
    assert proc.stdout.split() == [str(p) for p in idx]
    for path in idx:
        tar = path.with_suffix(".tar")
        lines = path.read_text().splitlines()
        assert lines[0] == f"v1.2 {PER_SHARD}"
        listed = [tuple(line.split()[i : i + 4]) for line in lines[1:] for i in (0, 4, 8)]
        with tarfile.open(tar) as tf:  # ext, data offset, size, name of every member
            members = [
                (m.name.split(".", 1)[1], str(m.offset_data), str(m.size), m.name)
                for m in tf.getmembers()
            ]
        assert listed == members
        reference = write_dali_index(str(tar), str(tmp_path / f"{tar.stem}.idx"))
        assert path.read_bytes() == Path(reference).read_bytes()
    again = script("make_idx.py", copy)  # existing files are kept unless --force
    assert "indexed 0 of 3 shards (3 had one, kept)" in again.stderr
    forced = script("make_idx.py", copy, "--force").stderr
    assert "indexed 3 of 3 shards (3 had one, rewritten)" in forced
    one = copy / "00001.tar"
    assert "indexed 1 of 1" in script("make_idx.py", one, "--force").stderr  # a tar named


def test_reshard_with_query_on_a_local_cluster(source, tmp_path):
    """Default settings: a LocalCluster of worker processes."""
    out = tmp_path / "out"
    args = ["--samples-per-shard", 5, "--query", "width >= 256", "--old-id-col", "old_key"]
    proc = script("reshard.py", source, out, *args)
    frame = parquet_frame(source)
    expected = frame[frame["width"] >= 256]["key"].tolist()
    assert 5 < len(expected) < len(frame)
    assert f"exported {len(expected)} of {len(frame)} records" in proc.stdout
    originals = {k: m for t in sorted(source.glob("*.tar")) for k, m in tar_records(t)}
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(len(tars))]
    seen = []
    for n, tar in enumerate(tars):
        records = tar_records(tar)
        assert len(records) == (5 if n < len(tars) - 1 else len(expected) - 5 * n)
        table = pq.read_table(tar.with_suffix(".parquet"))
        assert table.column("key").to_pylist() == [k for k, _ in records]
        assert "keep" not in table.column_names and "_keep" not in table.column_names
        assert [k for k, _ in records] == [f"{n * 10 + i:06d}" for i in range(len(records))]
        for old, (_, members) in zip(table.column("old_key").to_pylist(), records, strict=True):
            assert members == originals[old]  # bytes copied unchanged
            seen.append(old)
    assert seen == expected


def test_reshard_query_on_a_column_with_nulls(copy, tmp_path):
    """A record without a value (no .json field) does not match the query; no crash."""
    sidecar = copy / "00000.parquet"
    table = pq.read_table(sidecar)
    widths = table.column("width").to_pylist()
    widths[0] = None
    table = table.set_column(table.column_names.index("width"), "width", pa.array(widths))
    pq.write_table(table, sidecar)
    frame = parquet_frame(copy)
    expected = frame[frame["width"].fillna(0) >= 256]["key"].tolist()
    out = tmp_path / "out"
    args = ["--query", "width >= 256", "--n-workers", 0]
    proc = script("reshard.py", copy, out, *args)
    assert f"exported {len(expected)} of {len(frame)} records" in proc.stdout
    assert pq.read_table(out / "00000.parquet").num_rows == len(expected)


def test_curate_dataset(copy, tmp_path):
    from dask_imgcurate import ImageTextPairDataset
    from dask_imgcurate.embed import ClipImageEmbedder
    from dask_imgcurate.models.classifiers import AestheticClassifier, NsfwClassifier

    models = make_demo_models(tmp_path / "models")
    # thresholds that split this data: scores of the same model, computed here first
    heads = [
        AestheticClassifier(str(models.aesthetic), embedding_dim=models.embedding_dim),
        NsfwClassifier(str(models.nsfw), embedding_dim=models.embedding_dim),
    ]
    embedder = ClipImageEmbedder(TINY_MODEL, pretrained=None, batch_size=16, classifiers=heads)
    preview = embedder(ImageTextPairDataset.from_webdataset(str(copy))).metadata.compute()
    low = float(np.quantile(preview["aesthetic_score"], 0.3))
    high = float(np.quantile(preview["nsfw_score"], 0.8))

    out = tmp_path / "curated"
    args = [
        "--model", TINY_MODEL, "--pretrained", "none", "--batch-size", 16,
        "--aesthetic-model", models.aesthetic, "--nsfw-model", models.nsfw,
        "--min-aesthetic", repr(low), "--max-nsfw", repr(high), "--samples-per-shard", 6,
        "--n-workers", 0,
    ]  # fmt: skip
    proc = script("curate_dataset.py", copy, out, *args)
    assert f"scored {SHARDS * PER_SHARD} records in {SHARDS} shards" in proc.stdout

    saved = parquet_frame(copy)  # the script saved the scores as the shards' metadata
    assert {"image_embedding", "aesthetic_score", "nsfw_score", "error"} <= set(saved.columns)
    assert saved["error"].isna().all()
    passing = saved[(saved["aesthetic_score"] >= low) & (saved["nsfw_score"] < high)]
    expected = passing["key"].tolist()
    assert 0 < len(expected) < len(saved)
    kept = [
        json.loads(members["json"])["key"]  # copied bytes: the json holds the old key
        for tar in sorted(out.glob("*.tar"))
        for _, members in tar_records(tar)
    ]
    assert kept == expected
    out_table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    np.testing.assert_array_equal(
        out_table.column("aesthetic_score").to_numpy(), passing["aesthetic_score"].to_numpy()
    )


# Bad input: one line ``error: ...`` naming the path or value and exit 1 (argparse's usage
# errors: exit 2), as the dask-imgcurate CLI does; no traceback unless -v.


@pytest.fixture(scope="module")
def bad(source, tmp_path_factory) -> Path:
    """``not-a-tar/00000.tar`` (text), ``truncated/00000.tar`` (cut inside a record),
    ``a-file`` (a regular file). Read-only."""
    root = tmp_path_factory.mktemp("bad")
    (root / "not-a-tar").mkdir()
    (root / "not-a-tar" / "00000.tar").write_text("not a tar\n")
    (root / "truncated").mkdir()
    (root / "truncated" / "00000.tar").write_bytes((source / "00000.tar").read_bytes()[:3000])
    (root / "a-file").write_text("x\n")
    return root


def test_make_demo_dataset_bad_input(bad):
    line = error_line("make_demo_dataset.py", bad / "a-file", "--shards", 1)
    assert line.startswith("error: ") and str(bad / "a-file") in line
    # a usage error: argparse's exit 2
    line = error_line("make_demo_dataset.py", bad / "out", "--samples-per-shard", -1, code=2)
    assert "argument --samples-per-shard: must be >= 1, not -1" in line
    assert not (bad / "out").exists()


def test_make_idx_bad_input(bad):
    for name in ("not-a-tar", "truncated"):
        line = error_line("make_idx.py", bad / name)
        assert line.startswith(f"error: {bad / name / '00000.tar'}: ")
    verbose = script("make_idx.py", bad / "truncated", "-v", code=1)  # -v: the traceback
    assert "Traceback" in verbose.stderr and "TarFormatError" in verbose.stderr


def test_reshard_bad_input(copy, bad, tmp_path):
    out = tmp_path / "out"
    line = error_line("reshard.py", bad / "missing", out)
    assert line == f"error: no such file or directory: {bad / 'missing'}"
    line = error_line("reshard.py", copy, copy)  # would replace the shards it reads
    assert line.startswith(f"error: {copy} holds this dataset's input shards")
    for query in ("no_such_column > 1", "width + 1"):  # checked before any work
        line = error_line("reshard.py", copy, out, "--query", query)
        assert line.startswith(f"error: bad --query {query!r}: ")
    assert not out.exists()


def test_curate_dataset_bad_input(source, bad, tmp_path):
    models = ["--aesthetic-model", tmp_path / "a.pt", "--nsfw-model", tmp_path / "n.pt"]
    fast = ["--model", TINY_MODEL, "--pretrained", "none", "--n-workers", 0]
    line = error_line("curate_dataset.py", bad / "missing", tmp_path / "out", *models, *fast)
    assert line == f"error: no such file or directory: {bad / 'missing'}"
    line = error_line("curate_dataset.py", source, tmp_path / "out", *models, *fast)
    assert line.startswith("error: AestheticClassifier: ") and str(tmp_path / "a.pt") in line
    assert not (tmp_path / "out").exists()

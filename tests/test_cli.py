"""The ``dask-imgcurate`` command line, on demo data with the tiny built-in model.

Most commands run in-process with click's ``CliRunner`` (fast: the model loads once per
process); the README's main command (``demo``), real exit codes, stderr and Ctrl-C run as
subprocesses. Outputs are checked with independent readers: ``tarfile``, ``pyarrow``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from compute_helpers import count_indexing
from readers import tar_records

from dask_imgcurate import ImageTextPairDataset, cli, write_dali_index
from dask_imgcurate.cli import main
from dask_imgcurate.cluster import cluster_kind, quiet_third_party
from dask_imgcurate.demo import make_demo_dataset
from dask_imgcurate.models.builtin import TINY_MODEL, make_demo_models

EXE = shutil.which("dask-imgcurate") or str(Path(sys.executable).parent / "dask-imgcurate")
SHARDS, PER_SHARD = 3, 8

# the tiny model runs with random weights on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_dir(directory: Path) -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for p in sorted(Path(directory).iterdir())}


def run(*args: str, ok: bool = True):
    """Invoke the CLI in this process; check the exit code when ``ok``."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def table(stdout: str) -> dict[str, str]:
    """The summary table (``name  value`` lines) of a command's stdout."""
    rows = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition("  ")
        if sep and name and not name.startswith(" "):
            rows[name.strip()] = value.strip()
    return rows


def source_records(directory: Path) -> dict[str, dict[str, bytes]]:
    return {k: m for tar in sorted(directory.glob("*.tar")) for k, m in tar_records(tar)}


def exported_old_keys(out: Path, pattern: str = "*.tar") -> list[str]:
    """Old record keys of an export, in output order, from the ``.json`` members (their
    bytes are copied unchanged, so their ``key`` field is the source key)."""
    return [
        json.loads(members["json"])["key"]
        for tar in sorted(out.glob(pattern))
        for _, members in tar_records(tar)
    ]


def parquet_frame(directory: Path):
    """All rows of the shards' Parquet files, in shard then key order (pyarrow only)."""
    tables = [pq.read_table(p) for p in sorted(directory.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pandas()


def between(values, q: float) -> float:
    """A threshold strictly between two neighbouring values (no ties at the boundary)."""
    v = np.unique(np.asarray(values, dtype=np.float64))
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


def expect_one_error_line(stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_demo_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def model_args(models) -> list[str]:
    return [
        "--model",
        TINY_MODEL,
        "--pretrained",
        "none",
        "--aesthetic-model",
        str(models.aesthetic),
        "--nsfw-model",
        str(models.nsfw),
        "--batch-size",
        "16",
    ]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """3 shards x 8 records with sidecar Parquet. Read-only."""
    root = tmp_path_factory.mktemp("cli-source")
    make_demo_dataset(root, n_shards=SHARDS, samples_per_shard=PER_SHARD, seed=5)
    return root


@pytest.fixture(scope="module")
def scored(tmp_path_factory, source, model_args):
    """A copy of ``source`` after ``dask-imgcurate -v embed`` (in-process). Read-only."""
    root = tmp_path_factory.mktemp("cli-scored") / "data"
    shutil.copytree(source, root)
    result = run("-v", "embed", root, *model_args, "--n-workers", "0")
    return root, result


@pytest.fixture
def scores(scored):
    return parquet_frame(scored[0])


# ------------------------------------------------------------------ commands


def test_help_lists_commands_and_defaults():
    out = run("--help").output
    for command in ("index", "inspect", "embed", "export", "curate", "demo"):
        assert command in out
    help_text = " ".join(run("export", "--help").output.split())
    assert "one per CPU core" in help_text and "0: no cluster" in help_text
    assert "--scheduler-address" in help_text


def test_index_writes_the_same_idx_as_write_dali_index(source, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    result = run("index", data)
    assert table(result.stdout)["shards indexed"] == str(SHARDS)
    for tar in sorted(data.glob("*.tar")):
        expected = write_dali_index(str(tar), str(tmp_path / f"{tar.stem}.ref.idx"))
        assert tar.with_suffix(".idx").read_bytes() == Path(expected).read_bytes()


def test_index_indexes_every_good_shard_and_names_the_bad_ones(source, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    for name in ("00000.tar", "00002.tar"):  # two damaged shards of three
        tar = data / name
        tar.write_bytes(tar.read_bytes()[:5000])
    result = run("index", data, ok=False)
    assert result.exit_code == 1
    assert table(result.stdout)["shards indexed"] == "1"
    assert sorted(p.name for p in data.glob("*.idx")) == ["00001.idx"]
    for name in ("00000.tar", "00002.tar"):
        assert f"not indexed: {data / name}: truncated" in result.stderr
    assert "error: 2 of 3 shards could not be indexed" in result.stderr


def _cut_between_records(tar: Path) -> None:
    """Cut ``tar`` after its next-to-last record (no end-of-archive blocks)."""
    with tarfile.open(tar) as t:
        last = t.getmembers()[-4]  # the last member of the next-to-last record
    tar.write_bytes(tar.read_bytes()[: last.offset_data + -(-last.size // 512) * 512])


def test_index_names_suspect_shards_and_loading_still_reports_them(source, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    for sidecar in data.glob("*.parquet"):  # no sidecar to disagree: only the tar's end tells
        sidecar.unlink()
    _cut_between_records(data / "00000.tar")
    joined = data / "00002.tar"
    joined.write_bytes(joined.read_bytes() + (source / "00001.tar").read_bytes())  # cat a b
    scanned = run("inspect", data, "--rows", "0")
    result = run("index", data)
    rows = table(result.stdout)
    assert rows["shards indexed"] == "3" and rows["with warnings"] == "2"
    warned = sorted(line for line in result.stderr.splitlines() if line.strip())
    assert len(warned) == 2 and all(line.startswith("warning: ") for line in warned)
    assert f"{data / '00000.tar'}: ends after {3 * PER_SHARD - 3} members" in warned[0]
    assert f"{joined}: data follows its end-of-archive blocks" in warned[1]
    assert sorted(p.name for p in data.glob("*.idx")) == ["00000.idx", "00001.idx", "00002.idx"]
    indexed = run("inspect", data, "--rows", "0")
    assert table(indexed.stdout)["with .idx"] == "3"
    assert table(indexed.stdout)["damaged shards"] == "2"
    damage = sorted(line for line in indexed.stdout.splitlines() if line.startswith("damage:"))
    assert damage == sorted(
        line for line in scanned.stdout.splitlines() if line.startswith("damage:")
    )
    assert len(damage) == 2 and indexed.stderr == ""


def test_inspect_lists_notices_apart_from_damage(source, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    tar = data / "00001.tar"
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as dst:
        for member, payload in members:  # a macOS AppleDouble member before each file
            double = tarfile.TarInfo(f"._{member.name}")
            double.size = 82
            dst.addfile(double, io.BytesIO(bytes(82)))
            dst.addfile(member, io.BytesIO(payload))
    (data / "00002.idx").write_text("v1.2 0\n")  # an index that does not describe its tar
    result = run("inspect", data, "--rows", "0")
    rows = table(result.stdout)
    assert rows["damaged shards"] == "0" and rows["shard warnings"] == "2"
    assert rows["records"] == str(SHARDS * PER_SHARD)
    notices = sorted(line for line in result.stdout.splitlines() if line.startswith("warning: "))
    assert len(notices) == 2
    assert f"{tar}: ignored {len(members)} members that belong to no record" in notices[0]
    assert f"{data / '00002.tar'}: ignoring its index {data / '00002.idx'}" in notices[1]
    assert result.stderr == ""


def test_inspect_reads_each_shard_once(source, monkeypatch):
    """Its counts and sample rows come from one read of each shard (dask reads partitions
    again for ``head(npartitions=-1)`` computed beside other results)."""
    calls = count_indexing(monkeypatch)
    result = run("inspect", source, "--rows", "3")
    assert sorted(calls) == [f"{i:05d}.tar" for i in range(SHARDS)]
    assert table(result.stdout)["records"] == str(SHARDS * PER_SHARD)
    sample = result.stdout.split("\n\n")[-1].strip().splitlines()
    assert len(sample) == 1 + 3 and sample[1].split()[:2] == ["0", "000000000"]


def test_export_of_a_damaged_shard_fails_or_keeps_complete_records(source, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    tar = data / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])  # inside a member
    failed = run("export", data, tmp_path / "strict", "--n-workers", "0", ok=False)
    assert failed.exit_code == 1
    assert f"error: {tar}: truncated" in failed.stderr
    kept = ImageTextPairDataset.from_webdataset(str(data), strict=False).metadata
    with pytest.warns(UserWarning):
        expected = len(kept)
    assert SHARDS * PER_SHARD - PER_SHARD < expected < SHARDS * PER_SHARD
    with pytest.warns(UserWarning, match=f"{tar}: truncated.*kept the {expected - 16} complete"):
        result = run("export", data, tmp_path / "lenient", "--n-workers", "0", "--lenient")
    assert table(result.stdout)["records out"] == str(expected)


def test_embed_saves_embeddings_and_scores_as_parquet(scored):
    root, result = scored
    rows = table(result.stdout)
    assert rows["parquet files written"] == str(SHARDS)
    assert rows["records"] == str(SHARDS * PER_SHARD)
    assert rows["records with errors"] == "0"
    assert "save_metadata: 100%" in result.stderr  # -v shows the progress bar (3 of 3 shards)
    assert "3/3" in result.stderr
    for i in range(SHARDS):
        table_ = pq.read_table(root / f"{i:05d}.parquet")
        assert table_.num_rows == PER_SHARD
        for column in ("key", "caption", "width", "image_embedding", "aesthetic_score"):
            assert column in table_.column_names
        assert table_.column("error").null_count == PER_SHARD
        frame = table_.to_pandas()
        assert all(len(v) == 64 for v in frame["image_embedding"])
        assert np.isfinite(frame["aesthetic_score"]).all()
        assert ((frame["nsfw_score"] >= 0) & (frame["nsfw_score"] <= 1)).all()


def test_embed_counts_the_records_it_could_not_decode(source, model_args, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(source, root)
    tar = root / "00001.tar"
    with tarfile.open(tar) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
    with open(tar, "r+b") as handle:  # same size: the tar stays valid, the JPEG does not
        handle.seek(member.offset_data)
        handle.write(b"not a jpeg".ljust(member.size, b"!"))
    result = run("embed", root, *model_args, "--n-workers", "0")
    assert table(result.stdout)["records with errors"] == "1"
    assert "1 records could not be read or decoded" in result.stderr
    errors = pq.read_table(root / "00001.parquet").column("error").to_pylist()
    key = member.name.split(".")[0]
    keys = pq.read_table(root / "00001.parquet").column("key").to_pylist()
    assert [k for k, e in zip(keys, errors) if e is not None] == [key]


def test_embed_without_a_head_drops_the_earlier_runs_score(scored, tmp_path, monkeypatch):
    """Scores saved by an earlier embed belong to its embeddings: an embed that cannot
    compute one (no weights) removes it, with a warning, rather than keep a stale score."""
    root = tmp_path / "data"
    shutil.copytree(scored[0], root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))  # no cached head weights
    args = ["--model", TINY_MODEL, "--pretrained", "none", "--n-workers", "0"]
    with pytest.warns(UserWarning, match="dropped aesthetic_score and nsfw_score from the"):
        result = run("embed", root, *args)
    assert table(result.stdout)["columns added"] == "image_embedding, error"
    for i in range(SHARDS):
        columns = pq.read_schema(root / f"{i:05d}.parquet").names
        assert "image_embedding" in columns and "caption" in columns
        assert "aesthetic_score" not in columns and "nsfw_score" not in columns


def test_inspect_reports_counts(scored):
    result = run("inspect", scored[0], "--rows", "2")
    rows = table(result.stdout)
    assert rows["shards"] == str(SHARDS)
    assert rows["records"] == str(SHARDS * PER_SHARD)
    assert rows["with parquet"] == str(SHARDS)
    assert rows["records with errors"] == "0"
    assert rows["damaged shards"] == "0"
    assert "aesthetic_score" in result.stdout and "00002.tar" in result.stdout
    assert result.stdout.count(f"{PER_SHARD} records") == SHARDS


def test_export_with_thresholds_keeps_exactly_the_passing_records(scored, scores, source, tmp_path):
    low = between(scores["aesthetic_score"], 0.3)
    high = between(scores["nsfw_score"], 0.8)
    passing = scores[(scores["aesthetic_score"] >= low) & (scores["nsfw_score"] < high)]
    expected = passing["key"].tolist()
    assert 0 < len(expected) < len(scores)
    out = tmp_path / "out"
    args = ["--min-aesthetic", repr(low), "--max-nsfw", repr(high), "--samples-per-shard", "5"]
    result = run("export", scored[0], out, *args, "--n-workers", "0")
    rows = table(result.stdout)
    assert rows["records out"] == str(len(expected))
    assert rows["dropped by filter"] == str(len(scores) - len(expected))
    assert exported_old_keys(out) == expected
    originals = source_records(source)
    tars = sorted(out.glob("*.tar"))
    assert [len(tar_records(t)) for t in tars[:-1]] == [5] * (len(tars) - 1)
    for tar in tars:  # bytes copied unchanged; Parquet ids = tar keys, in the same order
        records = tar_records(tar)
        for _, members in records:
            original = originals[json.loads(members["json"])["key"]]
            assert members == original
        ids = pq.read_table(tar.with_suffix(".parquet")).column("key").to_pylist()
        assert ids == [k for k, _ in records]


def test_export_query_in_images_layout(scored, scores, tmp_path):
    high = between(scores["nsfw_score"], 0.5)
    query = f"width >= 256 and nsfw_score < {high!r}"
    expected = scores[(scores["width"] >= 256) & (scores["nsfw_score"] < high)]["key"].tolist()
    assert 0 < len(expected) < len(scores)
    out = tmp_path / "out"
    args = ["--query", query, "--layout", "images", "--images-per-tar", "4", "--n-workers", "0"]
    result = run("export", scored[0], out, *args)
    assert table(result.stdout)["records out"] == str(len(expected))
    tars = sorted(out.glob("images-*.tar"))
    assert len(tars) == -(-len(expected) // 4)
    keys = [k for tar in tars for k, _ in tar_records(tar)]  # the images layout keeps ids
    assert keys == expected
    parquet = pa.concat_tables([pq.read_table(t.with_suffix(".parquet")) for t in tars])
    assert parquet.column("key").to_pylist() == expected
    assert set(parquet.column("tar_file").to_pylist()) == {t.name for t in tars}


def test_export_query_on_json_fields_of_unscored_data(source, tmp_path):
    out = tmp_path / "out"
    run("export", source, out, "--query", "height > 200", "--n-workers", "0")
    frame = parquet_frame(source)
    assert exported_old_keys(out) == frame[frame["height"] > 200]["key"].tolist()


def test_curate_from_yaml_with_flags_overriding(scores, source, models, tmp_path):
    low = between(scores["aesthetic_score"], 0.25)
    expected = scores[scores["aesthetic_score"] >= low]["key"].tolist()
    config = tmp_path / "curate.yaml"
    config.write_text(
        "\n".join(
            [
                "model: nope-not-a-model  # overridden by --model",
                "pretrained: openai       # overridden by --pretrained none",
                f"aesthetic_model: {models.aesthetic}",
                f"min_aesthetic: {low!r}",
                "samples_per_shard: 100   # overridden by --samples-per-shard 4",
                "batch_size: 16",
                "n_workers: 0",
            ]
        )
    )
    out = tmp_path / "out"
    args = ["--config", config, "--model", TINY_MODEL, "--pretrained", "none"]
    result = run("curate", source, out, *args, "--samples-per-shard", "4")
    assert table(result.stdout)["records out"] == str(len(expected))
    assert exported_old_keys(out) == expected  # min_aesthetic from the YAML applied
    sizes = [len(tar_records(t)) for t in sorted(out.glob("*.tar"))]
    assert sizes[:-1] == [4] * (len(sizes) - 1) and 0 < sizes[-1] <= 4
    assert not list(source.glob("*.idx"))  # curate does not touch its input


def test_curate_from_flags_matches_embed_then_export(scored, scores, source, model_args, tmp_path):
    low = between(scores["aesthetic_score"], 0.5)
    high = between(scores["nsfw_score"], 0.7)
    flags = ["--min-aesthetic", repr(low), "--max-nsfw", repr(high), "--samples-per-shard", "6"]
    curated = tmp_path / "curated"
    run("curate", source, curated, *model_args, *flags, "--n-workers", "0")
    exported = tmp_path / "exported"
    run("export", scored[0], exported, *flags, "--n-workers", "0")
    assert exported_old_keys(curated) == exported_old_keys(exported)
    for a, b in zip(sorted(curated.glob("*.tar")), sorted(exported.glob("*.tar")), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_settings_precedence(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("model: from-yaml\nbatch_size: 7\npretrained: none\nmax_nsfw: 0.5\n")
    seen = {}

    def fake(input_path, output, settings):
        seen["config"] = settings
        raise KeyboardInterrupt  # stop before any work: also the Ctrl-C path

    monkeypatch.setattr(cli.commands, "run_curate", fake)
    result = run("curate", "in", "out", "--config", config, "--batch-size", "256", ok=False)
    assert result.exit_code == 130
    settings = seen["config"]
    assert settings.model == "from-yaml"  # not given as a flag: YAML wins over the default
    assert settings.batch_size == 256  # given, even if equal to the default: the flag wins
    assert settings.pretrained is None and settings.max_nsfw == 0.5
    assert settings.samples_per_shard == cli.CurateConfig().samples_per_shard
    expect_one_error_line(result.stderr, "interrupted")


def test_demo_end_to_end_in_a_subprocess(tmp_path):
    """The README's main command, on a real 2-process cluster, in an empty directory."""
    args = [EXE, "demo", "--dir", "out", "--shards", "2", "--samples-per-shard", "12"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    assert rows["records in"] == "24"
    assert float(rows["total seconds"]) > float(rows["export seconds"])  # scoring came first
    assert "LocalCluster" in rows["cluster"] and "(2 workers)" in rows["cluster"]
    # quiet: no distributed / open_clip logs, the random-weights warning exactly once
    expect_one_error_line(proc.stderr, "RandomWeightsWarning", TINY_MODEL)
    out = tmp_path / "out"
    kept = exported_old_keys(out / "curated")
    assert len(kept) == int(rows["records out"]) > 0
    frame = parquet_frame(out / "input")  # the scores were saved as the input's metadata
    meta = ImageTextPairDataset.from_webdataset(str(out / "input")).metadata
    low, high = meta["aesthetic_score"].quantile(0.3), meta["nsfw_score"].quantile(0.9)
    low, high = float(low.compute()), float(high.compute())  # as the demo computes them
    passing = frame[(frame["aesthetic_score"] >= low) & (frame["nsfw_score"] < high)]
    assert kept == passing["key"].tolist()


def test_demo_rerun_with_other_options_leaves_only_its_own_output(tmp_path):
    """The same options again: nothing rewritten. Fewer records: the earlier run's extra
    curated shard is removed, not left beside the new ones (readers would see it)."""
    demo = ["demo", "--dir", tmp_path / "d", "--n-workers", "0"]
    first = run(*demo, "--shards", "3", "--samples-per-shard", "64")
    assert table(first.stdout)["shards written"] == "2"
    curated = tmp_path / "d" / "curated"
    earlier = digest_dir(curated)
    again = run(*demo, "--shards", "3", "--samples-per-shard", "64")
    assert table(again.stdout)["shards already complete"] == "2"
    assert digest_dir(curated) == earlier
    fewer = run(*demo, "--shards", "1", "--samples-per-shard", "64")
    assert table(fewer.stdout)["shards written"] == "1"
    assert f"removed 3 shard files of an earlier demo run from {curated}" in fewer.stdout
    assert sorted(p.name for p in curated.iterdir()) == ["000.idx", "000.parquet", "000.tar"]
    kept = int(table(fewer.stdout)["records out"])
    assert len(exported_old_keys(curated)) == kept < 64


# ------------------------------------------------------------------ bad input


@pytest.fixture
def corrupt(source, tmp_path) -> Path:
    """A copy of ``source`` whose second shard ends in the middle of a member's data."""
    root = tmp_path / "corrupt"
    shutil.copytree(source, root)
    for p in root.glob("*.parquet"):
        p.unlink()
    tar = root / "00001.tar"
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    cut = members[len(members) // 2]
    tar.write_bytes(tar.read_bytes()[: cut.offset_data + cut.size // 2])
    return root


BAD_INPUT = {
    "missing path": (["inspect", "{missing}"], ["{missing}", "no such file"]),
    "missing path (export)": (["export", "{missing}", "{out}"], ["{missing}"]),
    "no shards": (["export", "{empty}", "{out}"], ["no .tar shards", "{empty}"]),
    "no shards (index)": (["index", "{empty}"], ["no .tar shards", "{empty}"]),
    "unknown yaml key": (["curate", "{source}", "{out}", "--config", "{bad_yaml}"],
                         ["bad.yaml", "'min_aestetic'", "did you mean 'min_aesthetic'"]),
    "wrong yaml type": (["curate", "{source}", "{out}", "--config", "{typo_yaml}"],
                        ["typo.yaml", "batch_size must be an integer"]),
    "yaml number read as text": (["curate", "{source}", "{out}", "--config", "{e_yaml}"],
                                 ["e.yaml", "min_aesthetic must be a number, not '1e3'",
                                  "write 1.0e3"]),
    "missing config": (["curate", "{source}", "{out}", "--config", "{missing}.yaml"],
                       ["config file not found", "{missing}.yaml"]),
    "missing head weights": (["embed", "{source_copy}", "TINY", "--aesthetic-model", "/nope.pt"],
                             ["/nope.pt", "aesthetic"]),
    "missing clip weights": (["curate", "{source}", "{out}", "--model", TINY_MODEL,
                              "--pretrained", "/nope/clip.pt"], ["/nope/clip.pt"]),
    "no head weights at all": (["curate", "{source}", "{out}", "TINY", "--min-aesthetic", "5"],
                               ["--aesthetic-model"]),
    "no scores to filter on": (["export", "{source}", "{out}", "--min-aesthetic", "5"],
                               ["aesthetic_score", "embed"]),
    "output is the input": (["export", "{source_copy}", "{source_copy}/"], ["OUTPUT", "another"]),
    "bad query": (["export", "{source}", "{out}", "--query", "nope > 1"], ["nope"]),
    "query not a condition": (["export", "{source}", "{out}", "--query", "width"],
                              ["'width'", "true/false", "width >= 256", "Int64"]),
    "NaN threshold": (["export", "{source}", "{out}", "--min-aesthetic", "nan"],
                      ["--min-aesthetic must be a number, not nan"]),
    "corrupt shard": (["inspect", "{corrupt}"], ["00001.tar", "byte offset"]),
    "corrupt shard (export)": (["export", "{corrupt}", "{out}"], ["00001.tar", "byte offset"]),
    "output is a file": (["export", "{source}", "{afile}"], ["{afile} is a file", "directory"]),
    "embed output is a file": (["embed", "{source}", "--output", "{afile}", "--model",
                                "no-such-model"],  # said before any model is looked for
                               ["{afile} is a file", "directory"]),
    "query fails on the data": (["export", "{source}", "{out}", "--query", "caption.astype('int64') > 0"],
                                ["--query", "failed on", "{source}/0000", "int"]),
    "sidecar lists other ids": (["export", "{mismatch}", "{out}"],
                                ["00000.tar: sidecar Parquet and tar disagree", "--on-mismatch drop"]),
}  # fmt: skip


def with_a_sidecar_row_missing(source: Path, root: Path) -> Path:
    """A copy of ``source`` whose first sidecar lacks its first record's row."""
    shutil.copytree(source, root)
    table = pq.read_table(root / "00000.parquet")
    pq.write_table(table.slice(1), root / "00000.parquet")
    return root


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(case, source, corrupt, tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_IMGCURATE_HOME", str(tmp_path / "no-cached-weights"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("min_aestetic: 5\n")
    (tmp_path / "typo.yaml").write_text("batch_size: lots\n")
    (tmp_path / "e.yaml").write_text("min_aesthetic: 1e3\n")
    source_copy = tmp_path / "source-copy"
    shutil.copytree(source, source_copy)
    (tmp_path / "afile").write_text("not a directory")
    mismatch = with_a_sidecar_row_missing(source, tmp_path / "mismatch")
    names = dict(
        afile=str(tmp_path / "afile"),
        mismatch=str(mismatch),
        missing=str(tmp_path / "does-not-exist"),
        out=str(tmp_path / "out"),
        empty=str(tmp_path / "empty"),
        source=str(source),
        source_copy=str(source_copy),
        corrupt=str(corrupt),
        bad_yaml=str(tmp_path / "bad.yaml"),
        typo_yaml=str(tmp_path / "typo.yaml"),
        e_yaml=str(tmp_path / "e.yaml"),
    )
    tiny = ["--model", TINY_MODEL, "--pretrained", "none", "--n-workers", "0"]
    template, needles = BAD_INPUT[case]
    args = []
    for a in template:
        args.extend(tiny if a == "TINY" else [a.format(**names)])
    before = digest_dir(source_copy), digest_dir(corrupt)
    result = run(*args, ok=False)
    assert result.exit_code == 1, (result.output, result.exception)
    line = expect_one_error_line(result.stderr, *[n.format(**names) for n in needles])
    assert line.startswith("error: ")
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
    assert (digest_dir(source_copy), digest_dir(corrupt)) == before


def test_bad_input_in_real_processes(source, tmp_path):
    """Exit codes and stderr of the real executable (three cases, run side by side)."""
    (tmp_path / "bad.yaml").write_text("min_aestetic: 5\nmodel: x\n")
    out = tmp_path / "out"
    cases = {
        "missing": ([EXE, "export", str(tmp_path / "nope"), str(out)], "nope"),
        "yaml": ([EXE, "curate", str(source), str(out), "--config", "bad.yaml"], "min_aestetic"),
        "weights": (
            [EXE, "curate", str(source), str(out), "--model", TINY_MODEL, "--pretrained",
             "none", "--aesthetic-model", "/nope.pt", "--min-aesthetic", "1"],
            "/nope.pt",
        ),
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, stderr)
        expect_one_error_line(stderr, "error: ", cases[name][1])
        assert stdout == ""
    assert not out.exists()


def test_corrupt_shard_with_lenient_is_reported(corrupt):
    result = run("inspect", corrupt, "--lenient", "--rows", "0")
    rows = table(result.stdout)
    assert rows["damaged shards"] == "1"
    damage = [line for line in result.stdout.splitlines() if line.startswith("damage:")]
    assert len(damage) == 1 and "00001.tar" in damage[0] and "byte offset" in damage[0]
    assert PER_SHARD * 2 <= int(rows["records"]) < PER_SHARD * 3
    assert result.stderr == ""


def test_shard_cut_between_records_is_reported_by_inspect(source, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    tar = data / "00002.tar"
    with tarfile.open(tar) as t:
        last = t.getmembers()[-4]  # the last member of the next-to-last record
    tar.write_bytes(tar.read_bytes()[: last.offset_data + -(-last.size // 512) * 512])
    for sidecar in data.glob("*.parquet"):  # no sidecar to disagree: only the tar's end tells
        sidecar.unlink()
    result = run("inspect", data, "--rows", "0")
    rows = table(result.stdout)
    assert rows["damaged shards"] == "1" and rows["records"] == str(3 * PER_SHARD - 1)
    damage = [line for line in result.stdout.splitlines() if line.startswith("damage:")]
    assert len(damage) == 1 and "00002.tar: ends after" in damage[0]
    assert result.stderr == ""


# ------------------------------------------------------------------ interrupts and clusters


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """4 shards x 48 records: with one record per output shard, an export takes a while."""
    root = tmp_path_factory.mktemp("cli-big")
    make_demo_dataset(root, n_shards=4, samples_per_shard=48, seed=9)
    return root


@pytest.mark.parametrize(
    ("workers", "signum", "code", "word"),
    [
        ("0", signal.SIGINT, 130, "interrupted"),
        ("2", signal.SIGINT, 130, "interrupted"),
        ("0", signal.SIGTERM, 143, "terminated"),
    ],
    ids=["ctrl-c", "ctrl-c-cluster", "sigterm"],
)
def test_interrupted_export_then_rerun_finishes(big, tmp_path, workers, signum, code, word):
    args = ["export", str(big), "--samples-per-shard", "1", "--max-shards", "3"]
    clean = tmp_path / "clean"
    run(*args[:2], clean, *args[2:], "--n-workers", "0")
    expected = digest_dir(clean)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [EXE, *args[:2], str(out), *args[2:], "--n-workers", workers],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if signum == signal.SIGINT:  # a terminal's Ctrl-C reaches the whole group: workers too
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    expect_one_error_line(stderr, word, "run the same command again")
    finals = {p.name: sha(p.read_bytes()) for p in out.iterdir() if not p.name.startswith(".")}
    assert 0 < len(finals) < len(expected)  # interrupted part-way
    for name, digest in finals.items():  # no partial file under a final name
        assert expected[name] == digest, name
    result = run(*args[:2], out, *args[2:], "--n-workers", "0")
    assert int(table(result.stdout)["shards already complete"]) > 0
    assert digest_dir(out) == expected  # finished, byte-identical, no temporary files left


def test_ctrl_c_while_a_local_cluster_starts_stops_the_command(big, tmp_path):
    """Ctrl-C to the process group once the workers' fork server runs (the cluster is
    starting): one line, exit 130, soon; no process of the group is left."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [EXE, "export", str(big), str(out), "--samples-per-shard", "1", "--max-shards", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def group() -> list[str]:
        found = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
        return found.stdout.split()

    deadline = time.monotonic() + 60
    while len(group()) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # this process, the resource tracker, the fork server: starting
    # the fork server is spawned with SIGINT ignored (for ~1 ms); then it imports distributed
    # (~1 s) before the workers fork and the cluster is up
    time.sleep(0.1)
    assert proc.poll() is None and not list(out.glob("*.tar"))
    interrupted = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert time.monotonic() - interrupted < 20  # not after the whole export
    expect_one_error_line(stderr, "interrupted")
    deadline = time.monotonic() + 10
    while group() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group()


def test_ctrl_c_while_the_command_line_loads_is_one_line():
    """SIGINT while the command's modules are imported (before any command runs)."""
    code = (
        "import os, signal, threading; import dask_imgcurate.cli as cli; "
        "threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start(); cli.run()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted\n" and not done.stdout


def test_importing_the_package_loads_no_heavy_modules():
    code = (
        "import sys, dask_imgcurate, dask_imgcurate.cli; "
        "print(sorted({'dask', 'pandas', 'pyarrow', 'torch', 'click'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
    names = subprocess.run(  # every public name resolves
        [
            sys.executable,
            "-c",
            "import dask_imgcurate as d; print([getattr(d, n) for n in d.__all__])",
        ],
        capture_output=True,
        text=True,
    )
    assert names.returncode == 0 and "ImageTextPairDataset" in names.stdout, names.stderr
    import dask_imgcurate

    package = Path(dask_imgcurate.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if (p / "__init__.py").exists()
    }
    assert dask_imgcurate._SUBMODULES == modules - {"__init__", "__main__"}
    errors = subprocess.run(  # a submodule after a bare import, as before the lazy imports
        [sys.executable, "-c", "import dask_imgcurate as d; print(d.errors.ShardNotice)"],
        capture_output=True,
        text=True,
    )
    assert "dask_imgcurate.errors.ShardNotice" in errors.stdout, errors.stderr


def test_scheduler_address_gives_identical_bytes(scored, scores, tmp_path):
    from distributed import LocalCluster

    low = between(scores["aesthetic_score"], 0.4)
    filters = ["--min-aesthetic", repr(low), "--query", "width < 500"]
    outputs = {}
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        for layout in ("webdataset", "images"):
            out = tmp_path / f"cluster-{layout}"
            flags = [
                *filters,
                "--layout",
                layout,
                "--samples-per-shard",
                "5",
                "--images-per-tar",
                "5",
            ]
            result = run(
                "export", scored[0], out, *flags, "--scheduler-address", cluster.scheduler_address
            )
            assert cluster.scheduler_address in table(result.stdout)["cluster"]
            outputs[layout] = out
    for layout, out in outputs.items():
        single = tmp_path / f"single-{layout}"
        flags = [*filters, "--layout", layout, "--samples-per-shard", "5", "--images-per-tar", "5"]
        run("export", scored[0], single, *flags, "--n-workers", "0")
        assert len(list(single.glob("*.tar"))) > 1
        assert digest_dir(out) == digest_dir(single)


def test_cluster_kind(monkeypatch):
    import importlib.util

    import dask_imgcurate.backend as backend

    assert cluster_kind("tcp://somewhere:8786", 0) == "existing"
    assert cluster_kind(None, 0) == "none"
    assert cluster_kind(None, None) in ("local", "local-cuda")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "dask_cuda" else real(name)
    )
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    assert cluster_kind(None, None) == "local-cuda"
    assert cluster_kind(None, 2) == "local-cuda"
    assert cluster_kind(None, 0) == "none"  # no cluster means no cluster, GPU or not
    with pytest.raises(ValueError):
        cluster_kind(None, -1)


def test_cli_restores_logging_and_warnings():
    """The CLI leaves the process's logging and warnings as it found them (in-process use)."""
    import logging
    import warnings

    root = logging.getLogger()
    before = (root.level, list(root.handlers), list(root.filters), list(warnings.filters))
    run("--help")
    run("inspect", "/definitely/not/here", ok=False)
    assert (root.level, list(root.handlers), list(root.filters), list(warnings.filters)) == before


def test_download_retries_are_not_logged_without_verbose():
    """Offline, huggingface_hub logs every retry of a weights download for about a minute;
    without -v only the one error line may reach stderr."""
    import logging

    from dask_imgcurate.cluster import quiet_third_party

    hub = logging.getLogger("huggingface_hub.utils._http")
    for verbose, shown in ((False, False), (True, True)):
        undo = quiet_third_party(verbose)
        try:
            assert hub.isEnabledFor(logging.WARNING) is shown
        finally:
            undo()
    assert hub.isEnabledFor(logging.WARNING)  # as it was


def test_on_mismatch_drop_keeps_the_records_in_both(source, tmp_path):
    root = with_a_sidecar_row_missing(source, tmp_path / "data")
    result = run("export", root, tmp_path / "out", "--n-workers", "0", "--on-mismatch", "drop")
    assert table(result.stdout)["records in"] == str(SHARDS * PER_SHARD - 1)
    result = run("inspect", root, "--on-mismatch", "drop")
    assert table(result.stdout)["records"] == str(SHARDS * PER_SHARD - 1)


def test_flags_that_do_not_apply_are_named(source, tmp_path):
    out = tmp_path / "images"
    args = ["--layout", "images", "--samples-per-shard", "5", "--n-workers", "0"]
    with pytest.warns(UserWarning, match="--samples-per-shard is ignored: it does not apply to "):
        result = run("export", source, out, *args)
    assert table(result.stdout)["records out"] == str(SHARDS * PER_SHARD)
    with pytest.warns(UserWarning, match="--images-per-tar is ignored: it does not apply to --l"):
        run("export", source, tmp_path / "wds", "--images-per-tar", "5", "--n-workers", "0")
    result = run("inspect", source, "--rows", "-1", ok=False)
    assert result.exit_code == 2 and "-1 is not in the range x>=0" in result.stderr


def test_huggingface_hub_stays_quiet_when_imported_after_the_setup(monkeypatch):
    """huggingface_hub sets its logger's level when its logging module is first imported
    (by open_clip's download, after the CLI's setup): offline, every retry was logged."""
    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)
    undo = quiet_third_party(verbose=False)
    env = dict(os.environ)
    undo()
    assert "HF_HUB_VERBOSITY" not in os.environ
    code = (
        "import logging, huggingface_hub.utils.logging; "
        "print(logging.getLogger('huggingface_hub').getEffectiveLevel())"
    )
    level = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert level.stdout.strip() == str(logging.ERROR), level.stderr


def _sigint_ignored() -> bool:
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_local_cluster_workers_ignore_sigint_also_after_a_restart():
    """Ctrl-C reaches a terminal's whole process group: workers leave it to the client,
    which closes the cluster (they printed a traceback each); a restarted worker too."""
    from dask_imgcurate.cluster import dask_client

    with dask_client(n_workers=1, quiet=True) as client:
        assert all(client.run(_sigint_ignored).values())
        client.restart()
        assert all(client.run(_sigint_ignored).values())
    assert not _sigint_ignored()  # this process handles it


def test_local_workers_fit_the_gpus():
    from dask_imgcurate.cluster import local_workers

    assert local_workers("local", None, 0) == (None, "")  # CPU: one per core
    assert local_workers("local", 3, 0) == (3, "")
    assert local_workers("local-cuda", None, 4) == (None, "")  # dask-cuda: one per GPU
    assert local_workers("local-cuda", 2, 4) == (2, "")
    n, why = local_workers("local-cuda", 2, 1)  # the demo's default on a 1-GPU machine
    assert n == 1 and why == "2 workers asked for, 1 GPU here: 1 worker (one per GPU)"
    n, why = local_workers("local", None, 2)  # GPUs, no dask-cuda: not a worker per core
    assert n == 1 and "GPUs but no dask-cuda: one worker process, on GPU 0" in why
    n, why = local_workers("local", 4, 2)
    assert n == 4 and "all 4 workers use GPU 0" in why

"""The NeMo Curator-style stage API (``dask_imgcurate.stages`` + ``Pipeline``), end to end.

The seed's pipeline runs as written on a demo dataset with the built-in tiny open_clip model
(random weights) and random-weight heads from ``make_demo_models``. Its output is checked
with independent tools: the expected records come from the same model and heads applied to
PIL-decoded images with open_clip's own transform (no DALI, no ``ClipImageEmbedder``, no
classifier wrappers), the tars are read with the stdlib ``tarfile`` and the Parquet files
with ``pyarrow``.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
import warnings
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import open_clip
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dask_imgcurate import ImageTextPairDataset, demo
from dask_imgcurate.models import classifiers as clf_mod
from dask_imgcurate.models import clip as clip_mod
from dask_imgcurate.models.builtin import make_demo_models
from dask_imgcurate.models.classifiers import (
    AestheticClassifier,
    AestheticMLP,
    NsfwClassifier,
    NsfwMLP,
)
from dask_imgcurate.models.clip import RandomWeightsWarning, load_clip
from dask_imgcurate.pipeline import Pipeline
from dask_imgcurate.stages import (
    KEEP_COLUMN,
    FilePartitioningStage,
    ImageAestheticFilterStage,
    ImageEmbeddingStage,
    ImageNSFWFilterStage,
    ImageReaderStage,
    ImageWriterStage,
    PipelineState,
    Stage,
    gpu_task_keys,
    gpu_task_resources,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::dask_imgcurate.models.clip.RandomWeightsWarning",
    "ignore:No pretrained weights loaded:UserWarning",
)

SHARDS, PER_SHARD, SEED = 3, 12, 3
CORRUPT_SHARD, CORRUPT_INDEX = 1, 4
OUTPUT_NAME = re.compile(r"^images-[0-9a-f]{16}-\d{6}\.(tar|parquet|idx)$")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A demo dataset (3 x 12 records) in which one record's JPEG is corrupt."""
    root = tmp_path_factory.mktemp("stages-input")
    demo.make_demo_dataset(root, n_shards=SHARDS, samples_per_shard=PER_SHARD, seed=SEED)
    records = demo.make_shard_records(CORRUPT_SHARD * PER_SHARD, PER_SHARD, SEED)
    bad = records[CORRUPT_INDEX]
    bad["jpg"] = demo.corrupt_jpeg(bad["jpg"])
    demo.write_shard(root / f"{CORRUPT_SHARD:05d}.tar", records)
    demo.write_parquet(root / f"{CORRUPT_SHARD:05d}.parquet", records)
    return root, bad["__key__"]


def tar_members(path: Path) -> dict[str, bytes]:
    """``{member name: bytes}`` of a tar, read with the stdlib."""
    with tarfile.open(path, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}


@pytest.fixture(scope="module")
def input_members(data) -> dict[str, bytes]:
    root, _ = data
    out: dict[str, bytes] = {}
    for tar in sorted(root.glob("*.tar")):
        out.update(tar_members(tar))
    return out


def load_head(head_type, path: Path, dim: int) -> torch.nn.Module:
    head = head_type(dim)
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return head.eval()


@pytest.fixture(scope="module")
def reference(models, input_members, data) -> pd.DataFrame:
    """Scores of every decodable image: PIL + open_clip's transform + the model + the heads."""
    _, corrupt_key = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        clip = load_clip(models.clip_model, None, "cpu")
    aesthetic = load_head(AestheticMLP, models.aesthetic, models.embedding_dim)
    nsfw = load_head(NsfwMLP, models.nsfw, models.embedding_dim)
    rows = []
    for name, blob in input_members.items():
        if not name.endswith(".jpg"):
            continue
        key = name[: -len(".jpg")]
        if key == corrupt_key:
            with pytest.raises(OSError):
                Image.open(io.BytesIO(blob)).load()
            continue
        pixels = clip.transform(Image.open(io.BytesIO(blob))).unsqueeze(0)
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(clip.model.encode_image(pixels), dim=-1)
            rows.append((key, float(aesthetic(emb)), float(nsfw(emb))))
    ref = pd.DataFrame(rows, columns=["key", "aesthetic", "nsfw"]).set_index("key")
    assert len(ref) == SHARDS * PER_SHARD - 1
    return ref


def threshold_in_gap(scores: pd.Series, low: float = 0.2, high: float = 0.8) -> tuple[float, float]:
    """A threshold in the widest gap between sorted scores within the given quantile range.

    Returns ``(threshold, margin)``: every score is at least ``margin`` away from it, so
    small numeric differences between decoders cannot move a record across it.
    """
    values = np.sort(scores.to_numpy(dtype=np.float64))
    lo, hi = int(len(values) * low), int(len(values) * high)
    gaps = np.diff(values[lo : hi + 1])
    i = lo + int(np.argmax(gaps))
    return float((values[i] + values[i + 1]) / 2), float((values[i + 1] - values[i]) / 2)


def run_seed_pipeline(input_dir, out_dir, models, aesthetic_threshold, nsfw_threshold, client=None):
    """The seed's pipeline, as written (module paths and model arguments are ours)."""
    pipeline = Pipeline(name="image_curation")
    pipeline.add_stage(
        FilePartitioningStage(
            file_paths=str(input_dir), files_per_partition=1, file_extensions=[".tar"]
        )
    )
    pipeline.add_stage(
        ImageReaderStage(task_batch_size=100, verbose=True, num_threads=8, num_gpus_per_worker=0.25)
    )
    pipeline.add_stage(ImageEmbeddingStage(model_name=models.clip_model, pretrained=None))
    pipeline.add_stage(
        ImageAestheticFilterStage(
            score_threshold=aesthetic_threshold, model_path=str(models.aesthetic)
        )
    )
    pipeline.add_stage(
        ImageNSFWFilterStage(score_threshold=nsfw_threshold, model_path=str(models.nsfw))
    )
    pipeline.add_stage(
        ImageWriterStage(output_dir=str(out_dir), images_per_tar=1000, deterministic_name=True)
    )
    return pipeline.run(client=client) if client is not None else pipeline.run()


@pytest.fixture(scope="module")
def seed_run(data, models, reference, tmp_path_factory: pytest.TempPathFactory):
    root, _ = data
    a_threshold, a_margin = threshold_in_gap(reference["aesthetic"])
    n_threshold, n_margin = threshold_in_gap(reference["nsfw"])
    expected = reference.index[
        (reference["aesthetic"] >= a_threshold) & (reference["nsfw"] < n_threshold)
    ]
    out = tmp_path_factory.mktemp("stages-output") / "curated"
    state = run_seed_pipeline(root, out, models, a_threshold, n_threshold)
    return dict(
        out=out,
        state=state,
        expected=sorted(expected),
        thresholds=(a_threshold, n_threshold),
        margins=(a_margin, n_margin),
    )


# --------------------------------------------------------------------------- the seed


def test_seed_pipeline_output(seed_run, reference, input_members, data, models) -> None:
    _, corrupt_key = data
    expected = seed_run["expected"]
    a_threshold, n_threshold = seed_run["thresholds"]
    # the thresholds split the records three ways: some pass both, some fail each
    assert 0 < len(expected) < len(reference)
    assert (reference["aesthetic"] < a_threshold).any()
    assert (reference["nsfw"] >= n_threshold).any()

    summary = seed_run["state"].summary
    assert summary.records_in == SHARDS * PER_SHARD
    assert summary.records_out == len(expected)
    assert summary.dropped_for_errors == 1  # the corrupt JPEG
    assert summary.dropped_by_filter == len(reference) - len(expected)
    assert summary.shards_written == 1

    out: Path = seed_run["out"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and all(OUTPUT_NAME.match(f) for f in files), files
    tar_path = next(out.glob("*.tar"))
    assert summary.files == [str(tar_path)] or Path(summary.files[0]).name == tar_path.name

    # tar: exactly the expected records, every member byte-identical to the input's
    members = tar_members(tar_path)
    keys = sorted({name.split(".", 1)[0] for name in members})
    assert keys == expected
    assert corrupt_key not in keys
    for key in keys:
        assert sorted(n for n in members if n.startswith(key + ".")) == [
            f"{key}.jpg",
            f"{key}.json",
            f"{key}.txt",
        ]
    for name, blob in members.items():
        assert hashlib.sha256(blob).hexdigest() == hashlib.sha256(input_members[name]).hexdigest()

    # Parquet: one row per record in tar order, scores float32, embeddings list<float32>
    table = pq.read_table(tar_path.with_suffix(".parquet"))
    schema = table.schema
    assert schema.field("image_embedding").type == pa.list_(pa.float32())
    assert schema.field("aesthetic_score").type == pa.float32()
    assert schema.field("nsfw_score").type == pa.float32()
    tar_order = [n.split(".", 1)[0] for n in members if n.endswith(".jpg")]
    assert table.column("key").to_pylist() == tar_order
    assert table.column("tar_file").to_pylist() == [tar_path.name] * len(keys)
    assert table.column("member_name").to_pylist() == [f"{k}.jpg" for k in tar_order]
    assert table.column("error").null_count == len(keys)
    assert all(table.column(KEEP_COLUMN).to_pylist())
    df = table.to_pandas().set_index("key")
    assert (df["aesthetic_score"] >= a_threshold).all()
    assert (df["nsfw_score"] < n_threshold).all()
    # stored scores agree with the independent PIL reference (closer than the threshold gaps)
    a_margin, n_margin = seed_run["margins"]
    ref = reference.loc[df.index]
    assert np.abs(df["aesthetic_score"] - ref["aesthetic"]).max() < a_margin
    assert np.abs(df["nsfw_score"] - ref["nsfw"]).max() < n_margin
    # ... and are the heads applied to the stored (normalised) embeddings
    emb = torch.from_numpy(
        np.stack([np.asarray(v, dtype=np.float32) for v in df["image_embedding"]])
    )
    assert emb.shape == (len(keys), models.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(keys)))
    with torch.inference_mode():
        aesthetic = load_head(AestheticMLP, models.aesthetic, models.embedding_dim)(emb)
        nsfw = load_head(NsfwMLP, models.nsfw, models.embedding_dim)(emb)
    np.testing.assert_allclose(df["aesthetic_score"], aesthetic.reshape(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(df["nsfw_score"], nsfw.reshape(-1).numpy(), rtol=1e-5)


@pytest.mark.slow
def test_client_run_is_byte_identical(seed_run, data, models, tmp_path: Path) -> None:
    """A 2-process LocalCluster writes exactly the bytes the local scheduler wrote."""
    distributed = pytest.importorskip("distributed")
    root, _ = data
    a_threshold, n_threshold = seed_run["thresholds"]
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        state = run_seed_pipeline(root, tmp_path, models, a_threshold, n_threshold, client=client)
        loads = client.run(lambda: clip_mod.clip_cache_info()["loads"])
    assert sum(loads.values()) >= 1  # the workers, not this process, ran the model
    assert state.summary.records_out == seed_run["state"].summary.records_out
    first: Path = seed_run["out"]
    names = sorted(p.name for p in first.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for name in names:
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name


# --------------------------------------------------------------------------- filters


class AssignScores(Stage):
    """Stand-in for an embedding stage: scores by record position, one row with an error."""

    def __init__(self, aesthetic, nsfw, error_at: int | None = None):
        self.aesthetic, self.nsfw, self.error_at = aesthetic, nsfw, error_at

    def apply(self, state: PipelineState) -> PipelineState:
        meta = state.dataset.metadata

        def assign(df: pd.DataFrame) -> pd.DataFrame:
            pos = df["key"].astype(int).to_numpy()
            a = np.asarray(self.aesthetic, np.float32)[pos]
            n = np.asarray(self.nsfw, np.float32)[pos]
            error = pd.array([None] * len(df), dtype=pd.StringDtype("pyarrow"))
            if self.error_at is not None and self.error_at in pos:
                i = int(np.flatnonzero(pos == self.error_at)[0])
                a[i] = n[i] = np.nan
                error[i] = "decode: broken"
            return df.assign(aesthetic_score=a, nsfw_score=n, error=error)

        out_meta = meta._meta.assign(
            aesthetic_score=np.float32(0),
            nsfw_score=np.float32(0),
            error=pd.Series([], dtype=pd.StringDtype("pyarrow")),
        )
        state.dataset = state.dataset.with_metadata(meta.map_partitions(assign, meta=out_meta))
        return state


@pytest.mark.parametrize("threshold", [float("nan"), "0.5", None, True])
def test_a_threshold_that_is_no_number_is_refused_when_built(threshold) -> None:
    """NaN compares False with every score (every record dropped); a string fails only
    when the writer computes: both refused up front, as the CLI refuses them."""
    for stage in (ImageAestheticFilterStage, ImageNSFWFilterStage):
        with pytest.raises(ValueError, match=f"{stage.__name__}: score_threshold must be a"):
            stage(score_threshold=threshold, model_path="unused.pt")


def test_filter_thresholds_are_inclusive_for_aesthetic_exclusive_for_nsfw(
    data, tmp_path: Path
) -> None:
    root, _ = data
    n = SHARDS * PER_SHARD
    aesthetic = np.tile(np.float32([0.25, 0.5, 0.75]), n // 3)
    nsfw = np.repeat(np.float32([0.25, 0.5, 0.75]), n // 3)
    stages = [
        FilePartitioningStage(str(root)),
        AssignScores(aesthetic, nsfw, error_at=0),
        ImageAestheticFilterStage(score_threshold=0.5, model_path="unused.pt"),
        ImageNSFWFilterStage(score_threshold=0.5, model_path="unused.pt"),
    ]
    state = Pipeline("filters", stages).run()
    meta = state.dataset.metadata.compute().set_index("key")
    pos = meta.index.astype(int)
    want = (aesthetic[pos] >= 0.5) & (nsfw[pos] < 0.5)
    want[0] = False  # the failed image has no scores; the writer counts it as an error
    np.testing.assert_array_equal(meta[KEEP_COLUMN].to_numpy(), want)
    # boundary values: aesthetic == threshold passes, nsfw == threshold fails
    assert meta.loc[f"{1:09d}", KEEP_COLUMN]  # aesthetic 0.5, nsfw 0.25
    assert not meta.loc[f"{n // 3 + 2:09d}", KEEP_COLUMN]  # aesthetic 0.75, nsfw 0.5

    summary = ImageWriterStage(str(tmp_path / "out"), images_per_tar=5, verbose=False)
    summary = summary.apply(state).summary
    assert summary.records_in == n
    assert summary.dropped_for_errors == 1
    assert summary.records_out == int(want[1:].sum()) == 8
    assert summary.dropped_by_filter == n - 1 - 8
    assert summary.shards_written == 2
    written = set()
    for tar in sorted((tmp_path / "out").glob("*.tar")):
        written |= {name.split(".", 1)[0] for name in tar_members(tar)}
    assert written == {f"{i:09d}" for i in np.flatnonzero(want) if i != 0}


# --------------------------------------------------------------------------- order, laziness


def test_stage_order_errors(data, models) -> None:
    root, _ = data
    with pytest.raises(ValueError, match="no stages"):
        Pipeline("empty").run()
    with pytest.raises(ValueError, match="first stage must be a FilePartitioningStage"):
        Pipeline("p", [ImageReaderStage(), FilePartitioningStage(str(root))]).run()
    with pytest.raises(ValueError, match="ImageWriterStage must be the last stage"):
        Pipeline(
            "p", [FilePartitioningStage(str(root)), ImageWriterStage("out"), ImageReaderStage()]
        ).run()
    with pytest.raises(ValueError, match="ImageReaderStage must come before"):
        Pipeline(
            "p",
            [
                FilePartitioningStage(str(root)),
                ImageEmbeddingStage(models.clip_model, None),
                ImageReaderStage(),
            ],
        ).run()
    with pytest.raises(ValueError, match="more than one FilePartitioningStage"):
        Pipeline("p", [FilePartitioningStage(str(root))] * 2).run()
    with pytest.raises(TypeError, match="not a stage"):
        Pipeline("p").add_stage("FilePartitioningStage")
    # stages used on their own say what is missing
    with pytest.raises(ValueError, match="needs a FilePartitioningStage before it"):
        ImageEmbeddingStage(models.clip_model, None).apply(PipelineState())
    with pytest.raises(ValueError, match="needs an ImageEmbeddingStage before it"):
        Pipeline(
            "p",
            [FilePartitioningStage(str(root)), ImageNSFWFilterStage(model_path=str(models.nsfw))],
        ).run()
    # loading options reach from_webdataset
    stage = FilePartitioningStage(str(root), strict=False, on_mismatch="nope")
    with pytest.raises(ValueError, match="on_mismatch must be 'raise' or 'drop'"):
        stage.apply(PipelineState())
    with pytest.raises(ValueError, match="only .tar shards"):
        FilePartitioningStage(str(root), file_extensions=[".zip"])
    with pytest.raises(ValueError, match="num_gpus_per_worker"):
        ImageReaderStage(num_gpus_per_worker=-1)


def test_stages_compute_nothing_until_the_writer(data, models, monkeypatch, tmp_path) -> None:
    root, _ = data
    clip_mod.clear_clip_cache()
    clf_mod.clear_classifier_cache()
    created: list[str] = []
    real_create = open_clip.create_model_and_transforms

    def counting_create(*args, **kwargs):
        created.append(args[0] if args else kwargs["model_name"])
        return real_create(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", counting_create)
    heads: list[str] = []
    real_load = clf_mod.EmbeddingClassifier.load

    def counting_load(self):
        heads.append(type(self).__name__)
        return real_load(self)

    monkeypatch.setattr(clf_mod.EmbeddingClassifier, "load", counting_load)

    def no_compute(*args, **kwargs):
        raise AssertionError("a stage before the writer computed something")

    stages = [
        FilePartitioningStage(str(root)),
        ImageReaderStage(task_batch_size=5, num_threads=2),
        ImageEmbeddingStage(models.clip_model, None, device="cpu"),
        ImageAestheticFilterStage(-1e9, model_path=str(models.aesthetic)),
        ImageNSFWFilterStage(1e9, model_path=str(models.nsfw)),
    ]
    state = PipelineState()
    with dask.config.set(scheduler=no_compute):
        for stage in stages:
            state = stage.apply(state)
    assert created == [] and heads == []
    assert isinstance(state.dataset.metadata, dd.DataFrame)
    assert {"image_embedding", "aesthetic_score", "nsfw_score", "error", KEEP_COLUMN} <= set(
        state.dataset.metadata.columns
    )
    assert state.gpu_share == 0  # device="cpu": no GPU resource requested anywhere

    summary = ImageWriterStage(str(tmp_path / "out"), verbose=False).apply(state).summary
    assert summary.records_out == SHARDS * PER_SHARD - 1
    assert summary.dropped_for_errors == 1
    # one model and one of each head per process, for all partitions
    assert created == [models.clip_model]
    assert sorted(set(heads)) == ["AestheticClassifier", "NsfwClassifier"]


def test_filters_score_new_embeddings_not_saved_scores(data, models, reference) -> None:
    """Scores saved earlier (say, with other heads) in the metadata are not what a pipeline
    that embeds the images again filters on: each filter scores the new embeddings with its
    head, unless the embedding stage's own classifiers scored them."""
    root, corrupt_key = data
    n = SHARDS * PER_SHARD
    stale = np.full(n, 99.0, np.float32)  # would pass any aesthetic threshold, fail nsfw
    threshold, _ = threshold_in_gap(reference["aesthetic"])
    for own_heads in (False, True):
        options = dict(num_threads=2)  # an embedder option the reader stage also sets
        if own_heads:
            head = dict(embedding_dim=models.embedding_dim, device="cpu")
            options["classifiers"] = [
                AestheticClassifier(model_path=str(models.aesthetic), **head),
                NsfwClassifier(model_path=str(models.nsfw), **head),
            ]
        stages = [
            FilePartitioningStage(str(root)),
            AssignScores(stale, stale),
            ImageReaderStage(task_batch_size=5),
            ImageEmbeddingStage(models.clip_model, None, device="cpu", **options),
            ImageAestheticFilterStage(threshold, model_path=str(models.aesthetic)),
            ImageNSFWFilterStage(1e9, model_path=str(models.nsfw)),
        ]
        meta = Pipeline("rescore", stages).run().dataset.metadata.compute().set_index("key")
        good = meta.drop(index=corrupt_key)
        np.testing.assert_allclose(
            good["aesthetic_score"], reference.loc[good.index, "aesthetic"], atol=1e-3
        )
        np.testing.assert_array_equal(
            good[KEEP_COLUMN], reference.loc[good.index, "aesthetic"] >= threshold
        )
        assert not meta.loc[corrupt_key, KEEP_COLUMN]
        assert 0 < good[KEEP_COLUMN].sum() < len(good)


def test_a_keep_column_loaded_with_the_metadata_is_not_this_pipelines_verdict(
    data, tmp_path: Path
) -> None:
    """An earlier run's ``keep`` saved in the sidecars neither filters a new pipeline's
    filter stages nor, without any, the writer (each with a warning)."""
    root = tmp_path / "in"
    shutil.copytree(data[0], root)
    ds = ImageTextPairDataset.from_webdataset(str(root))
    meta = ds.metadata
    ds.with_metadata(meta.assign(keep=meta["width"] < 0)).save_metadata()  # keeps nothing
    n = SHARDS * PER_SHARD
    everything = np.full(n, 0.5, np.float32)
    stages = [
        FilePartitioningStage(str(root)),
        AssignScores(everything, everything),
        ImageNSFWFilterStage(score_threshold=2.0, model_path="unused.pt"),  # all pass
        ImageWriterStage(str(tmp_path / "filtered"), verbose=False),
    ]
    with pytest.warns(UserWarning, match="replaces the 'keep' column the metadata was loaded"):
        summary = Pipeline("stale", stages).run().summary
    assert summary.records_out == n and summary.dropped_by_filter == 0
    stages = [FilePartitioningStage(str(root)), ImageWriterStage(str(tmp_path / "all"))]
    with pytest.warns(UserWarning, match="no filter stage ran: writing every record"):
        summary = Pipeline("no filters", stages).run().summary
    assert summary.records_out == n


def test_a_filters_output_column_is_what_it_thresholds(data, models, reference) -> None:
    root, corrupt_key = data
    n = SHARDS * PER_SHARD
    stale = np.full(n, 99.0, np.float32)  # saved scores under the default name
    threshold, _ = threshold_in_gap(reference["aesthetic"])
    stages = [
        FilePartitioningStage(str(root)),
        AssignScores(stale, stale),
        ImageEmbeddingStage(models.clip_model, None, device="cpu", num_threads=2),
        ImageAestheticFilterStage(
            threshold, model_path=str(models.aesthetic), output_column="aesthetic_new"
        ),
    ]
    meta = Pipeline("renamed", stages).run().dataset.metadata.compute().set_index("key")
    good = meta.drop(index=corrupt_key)
    np.testing.assert_allclose(
        good["aesthetic_new"], reference.loc[good.index, "aesthetic"], atol=1e-3
    )
    assert (meta["aesthetic_score"] == 99.0).all()  # the saved column is left alone
    np.testing.assert_array_equal(good[KEEP_COLUMN], good["aesthetic_new"] >= threshold)
    assert 0 < good[KEEP_COLUMN].sum() < len(good)


def test_stage_options_are_checked_when_the_stage_is_built(data, models) -> None:
    with pytest.raises(TypeError, match=r"ImageEmbeddingStage: unknown option\(s\) \['model_inf"):
        ImageEmbeddingStage(models.clip_model, None, model_inference_batch_size=32)
    with pytest.raises(TypeError, match=r"ImageAestheticFilterStage: unknown option\(s\) \['bach"):
        ImageAestheticFilterStage(0.5, model_path="a.pt", bach_size=8)
    with pytest.raises(TypeError, match=r"ImageNSFWFilterStage: unknown option\(s\) \['embeding"):
        ImageNSFWFilterStage(0.5, model_path="a.pt", embeding_dim=64)
    ImageNSFWFilterStage(0.5, model_path="a.pt", embedding_dim=64, batch_size=8)  # known ones
    root, _ = data
    with pytest.raises(ValueError, match="ImageAestheticFilterStage comes before the ImageEmb"):
        Pipeline(
            "p",
            [
                FilePartitioningStage(str(root)),
                ImageAestheticFilterStage(0.5, model_path=str(models.aesthetic)),
                ImageEmbeddingStage(models.clip_model, None),
            ],
        ).validate()


def test_an_embedding_batch_size_of_zero_is_refused_not_replaced(data, models) -> None:
    """``batch_size=0`` is no batch size: an error, not the reader stage's silently."""
    root, _ = data
    stages = [
        FilePartitioningStage(str(root)),
        ImageReaderStage(task_batch_size=5, num_threads=2),
        ImageEmbeddingStage(models.clip_model, None, batch_size=0, device="cpu"),
    ]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        Pipeline("p", stages).run()


def test_wrong_head_weights_name_the_file(models, tmp_path: Path) -> None:
    head = dict(embedding_dim=models.embedding_dim, device="cpu")
    with pytest.raises(ValueError, match=f"AestheticClassifier: {models.nsfw} holds weights of"):
        AestheticClassifier(model_path=str(models.nsfw), **head).load()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=f"NsfwClassifier: {junk} is not a torch state dict"):
        NsfwClassifier(model_path=str(junk), **head).load()
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        NsfwClassifier(model_path=str(listed), **head).load()


# --------------------------------------------------------------------------- GPU share


class FakeClient:
    def __init__(self, *resources: dict):
        self.resources = resources

    def scheduler_info(self, n_workers: int = -1):
        workers = {f"tcp://w{i}": {"resources": r} for i, r in enumerate(self.resources)}
        return {"workers": workers}


def test_gpu_task_resources() -> None:
    # local schedulers and CPU clusters: no annotation (tasks could never run)
    assert gpu_task_resources(0.25) == {}
    assert gpu_task_resources(0.25, FakeClient({}, {})) == {}
    assert gpu_task_resources(0.25, FakeClient({"MEMORY": 10})) == {}
    # a cluster with a GPU worker: the task asks for its share
    assert gpu_task_resources(0.25, FakeClient({}, {"GPU": 1})) == {"GPU": 0.25}
    assert gpu_task_resources(1, FakeClient({"GPU": 2})) == {"GPU": 1.0}
    assert gpu_task_resources(0, FakeClient({"GPU": 1})) == {}
    with pytest.raises(ValueError, match="exceeds the GPU resource of every worker"):
        gpu_task_resources(2, FakeClient({"GPU": 1}))
    with pytest.raises(ValueError, match="finite number"):
        gpu_task_resources(float("nan"))


def _embedding_pipeline(root, models, out, share: float) -> Pipeline:
    return Pipeline(
        "gpu-share",
        [
            FilePartitioningStage(str(root)),
            ImageReaderStage(task_batch_size=16, num_threads=2, num_gpus_per_worker=share),
            ImageEmbeddingStage(models.clip_model, None),
            ImageAestheticFilterStage(-1e9, model_path=str(models.aesthetic)),
            ImageNSFWFilterStage(1e9, model_path=str(models.nsfw)),
            ImageWriterStage(str(out), verbose=False),
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize("worker_gpus", [1, None], ids=["gpu-workers", "cpu-workers"])
def test_gpu_share_reaches_the_scheduler(data, models, tmp_path, worker_gpus) -> None:
    """Embedding tasks carry ``resources={"GPU": share}`` only where workers have GPUs."""
    distributed = pytest.importorskip("distributed")
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Restrictions(SchedulerPlugin):
        def __init__(self, scheduler):
            self.scheduler = scheduler
            self.seen: dict = {}

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "processing":
                self.seen[key] = self.scheduler.tasks[key].resource_restrictions or {}

    root, _ = data
    share = 0.5
    resources = {"GPU": worker_gpus} if worker_gpus else None
    pipeline = _embedding_pipeline(root, models, tmp_path / "out", share)
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=False,
            resources=resources,
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        plugin = Restrictions(cluster.scheduler)
        cluster.scheduler.add_plugin(plugin)
        state = pipeline.run(client=client)
    assert state.summary.records_out == SHARDS * PER_SHARD - 1  # every task could run
    keys = gpu_task_keys(state.dataset.metadata)
    assert len(keys) == SHARDS  # one (fused) read + embed + score task per shard
    if worker_gpus:  # annotated tasks keep their keys (without, export fuses its selection in)
        assert keys <= set(plugin.seen)
    for key, restrictions in plugin.seen.items():
        if worker_gpus and key in keys:
            assert restrictions == {"GPU": share}, key
        else:
            assert restrictions == {}, key

"""CLIP embedding stage and classifier heads, with a tiny random-weight open_clip model."""

from __future__ import annotations

import io
import os
import random
import re
import warnings
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import open_clip
import pandas as pd
import pyarrow as pa
import pytest
import torch
from compute_helpers import (
    TINY_EMBED_DIM,
    FakeDataset,
    encode,
    partition_from_tar,
    register_tiny_clip,
    save_random_head,
    synthetic_image,
    write_tar,
)
from PIL import Image

from dask_imgcurate.embed import EMBEDDING_DTYPE, ERROR_DTYPE, ClipImageEmbedder
from dask_imgcurate.models import clip as clip_mod
from dask_imgcurate.models.classifiers import (
    AestheticClassifier,
    NsfwClassifier,
    clear_classifier_cache,
    embeddings_to_numpy,
)
from dask_imgcurate.models.clip import RandomWeightsWarning, clip_cache_info, load_clip

pytestmark = pytest.mark.filterwarnings("ignore::dask_imgcurate.models.clip.RandomWeightsWarning")


@pytest.fixture(scope="module")
def tiny() -> str:
    return register_tiny_clip()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Two shards: one written in shuffled key order, one with a corrupt image and a record
    without an image. Returns {tar path: {key: image bytes}} (good images only)."""
    root = tmp_path_factory.mktemp("shards")
    out: dict[str, dict[str, bytes]] = {}
    images = {
        f"a{i:02d}": encode(synthetic_image(i, (70 + 9 * i, 96 - 5 * i)), "JPEG", quality=92)
        for i in range(7)
    }
    order = list(images)
    random.Random(1).shuffle(order)
    members = [m for k in order for m in ((f"{k}.txt", b"caption"), (f"{k}.jpg", images[k]))]
    out[str(write_tar(root / "shard-00000.tar", members))] = images
    images = {
        "b00": encode(synthetic_image(20, (64, 90)), "PNG"),
        "b01": encode(synthetic_image(21, (90, 64), "RGBA"), "WEBP", quality=95),
        "b03": encode(synthetic_image(23, (120, 80)), "JPEG"),
    }
    members = [
        ("b00.png", images["b00"]),
        ("b01.webp", images["b01"]),
        ("b02.jpg", b"\xff\xd8\xff\xe0 corrupt jpeg header" * 4),
        ("b03.jpg", images["b03"]),
        ("b04.txt", b"no image here"),
    ]
    out[str(write_tar(root / "shard-00001.tar", members))] = images
    return out


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("heads")
    return {
        "aesthetic": save_random_head(AestheticClassifier, root / "aesthetic.pth", seed=1),
        "nsfw": save_random_head(NsfwClassifier, root / "nsfw.pth", seed=2),
    }


def embedder(tiny: str, **kwargs) -> ClipImageEmbedder:
    kwargs.setdefault("pretrained", None)
    kwargs.setdefault("batch_size", 3)
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("num_threads", 2)
    return ClipImageEmbedder(tiny, **kwargs)


def reference_embedding(tiny: str, data: bytes) -> np.ndarray:
    """The same model on the PIL-decoded image, preprocessed by open_clip's own transform."""
    clip = load_clip(tiny, None, "cpu")
    pixels = clip.transform(Image.open(io.BytesIO(data))).unsqueeze(0)
    with torch.inference_mode():
        vec = clip.model.encode_image(pixels)
    return torch.nn.functional.normalize(vec, dim=-1)[0].numpy()


def as_matrix(column: pd.Series) -> dict[int, np.ndarray]:
    return {
        i: np.asarray(v, dtype=np.float32)
        for i, v in column.items()
        if v is not None and v is not pd.NA
    }


def test_embeddings_match_open_clip_reference(tiny: str, shards) -> None:
    path, images = next(iter(shards.items()))
    part = partition_from_tar(path)
    out = embedder(tiny).embed_partition(part)
    assert out["image_embedding"].dtype == EMBEDDING_DTYPE
    assert out["error"].isna().all()
    for key, vec in zip(out["key"], out["image_embedding"]):
        vec = np.asarray(vec, dtype=np.float32)
        assert vec.shape == (TINY_EMBED_DIM,)
        assert abs(np.linalg.norm(vec) - 1) < 1e-4
        ref = reference_embedding(tiny, images[key])
        cos = float(vec @ ref / np.linalg.norm(ref))
        assert cos > 0.99, (key, cos)


def test_images_over_the_pixel_limit_get_an_error(tiny: str, shards) -> None:
    path, images = next(iter(shards.items()))
    part = partition_from_tar(path)
    sizes = {k: Image.open(io.BytesIO(v)).size for k, v in images.items()}
    limit = sorted(w * h for w, h in sizes.values())[len(sizes) // 2]  # about half pass
    out = embedder(tiny, max_image_pixels=limit).embed_partition(part)
    too_large = {k for k, (w, h) in sizes.items() if w * h > limit}
    assert too_large and too_large != set(sizes)
    refused = out[out["error"].notna()]
    assert set(refused["key"]) == too_large
    assert refused["error"].str.contains("exceeds max_image_pixels").all()
    assert refused["image_embedding"].isna().all()
    assert out.loc[out["error"].isna(), "image_embedding"].notna().all()


def test_rows_match_keys_not_positions(tiny: str, shards) -> None:
    """Embedding a row alone or among others (any frame order) gives the same vector."""
    path, _ = next(iter(shards.items()))
    part = partition_from_tar(path)
    emb = embedder(tiny)
    full = emb.embed_partition(part.sample(frac=1.0, random_state=2))
    for _, row in part.iloc[[0, 3, 6]].iterrows():
        alone = emb.embed_partition(row.to_frame().T.astype(part.dtypes.to_dict()))
        got = full.loc[full["key"] == row["key"], "image_embedding"].iloc[0]
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(alone["image_embedding"].iloc[0]), atol=1e-5
        )
    assert full.index.equals(part.sample(frac=1.0, random_state=2).index)


def test_repeated_ids_in_a_partition(tiny: str, shards) -> None:
    """Two shards numbered alike in one partition (``files_per_partition``, ``repartition``):
    each row gets its own image's embedding or error, matched by position."""
    first, second = (partition_from_tar(p) for p in shards)
    second = second.assign(key=first["key"].iloc[: len(second)].to_numpy())  # ids repeat
    both = pd.concat([first, second], ignore_index=True)
    assert both["key"].duplicated().any()
    emb = embedder(tiny)
    out = emb.embed_partition(both)
    alone = pd.concat([emb.embed_partition(first), emb.embed_partition(second)], ignore_index=True)
    assert out["error"].fillna("").tolist() == alone["error"].fillna("").tolist()
    assert out["error"].notna().sum() == 2  # the corrupt image and the record without one
    got, expected = as_matrix(out["image_embedding"]), as_matrix(alone["image_embedding"])
    assert got.keys() == expected.keys() and len(got) == len(both) - 2
    for row, vector in got.items():
        np.testing.assert_allclose(vector, expected[row], atol=1e-5)


def test_dask_stage_with_classifiers(tiny: str, shards, heads) -> None:
    paths = list(shards)
    ddf = dd.from_map(partition_from_tar, paths)
    classifiers = [
        AestheticClassifier(heads["aesthetic"], embedding_dim=TINY_EMBED_DIM, device="cpu"),
        NsfwClassifier(heads["nsfw"], embedding_dim=TINY_EMBED_DIM, device="cpu"),
    ]
    ds = embedder(tiny, classifiers=classifiers)(FakeDataset(ddf))
    meta = ds.metadata._meta
    assert meta["image_embedding"].dtype == EMBEDDING_DTYPE
    assert meta["aesthetic_score"].dtype == np.float32
    assert meta["nsfw_score"].dtype == np.float32
    assert meta["error"].dtype == ERROR_DTYPE
    df = ds.metadata.compute(scheduler="threads")
    assert df.dtypes.to_dict() == meta.dtypes.to_dict()
    assert len(df) == 7 + 5
    by_key = df.set_index("key")
    assert by_key.loc["b02", "error"].startswith("decode: ")
    assert by_key.loc["b04", "error"] == "no image"
    for bad in ("b02", "b04"):
        assert pd.isna(by_key.loc[bad, "image_embedding"])
        assert np.isnan(by_key.loc[bad, "aesthetic_score"])
        assert np.isnan(by_key.loc[bad, "nsfw_score"])
    good = by_key.drop(index=["b02", "b04"])
    assert good["error"].isna().all()
    assert good["image_embedding"].notna().all()
    assert np.isfinite(good["aesthetic_score"]).all()
    assert ((good["nsfw_score"] >= 0) & (good["nsfw_score"] <= 1)).all()
    # scores are the heads applied to the stored embeddings
    matrix = np.stack([np.asarray(v, dtype=np.float32) for v in good["image_embedding"]])
    np.testing.assert_allclose(good["aesthetic_score"], classifiers[0].score(matrix), rtol=1e-5)
    # embeddings of the second shard match the single-image reference, key by key
    for key, data in shards[paths[1]].items():
        ref = reference_embedding(tiny, data)
        vec = np.asarray(by_key.loc[key, "image_embedding"], dtype=np.float32)
        assert float(vec @ ref) > 0.99, key


def test_model_created_once_per_process(tiny: str, shards, monkeypatch) -> None:
    calls = []
    real = open_clip.create_model_and_transforms

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("model_name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", counting)
    clip_mod.clear_clip_cache()
    loads_before = clip_cache_info()["loads"]
    ddf = dd.from_map(partition_from_tar, list(shards) * 2)  # 4 partitions
    ds = embedder(tiny)(FakeDataset(ddf))
    for scheduler in ("threads", "sync"):
        with dask.config.set(scheduler=scheduler):
            assert len(ds.metadata.compute()) == 24
    assert calls == [tiny]
    assert clip_cache_info()["loads"] == loads_before + 1


def test_random_weights_warn_and_checkpoint_loads(tiny: str, tmp_path: Path) -> None:
    clip_mod.clear_clip_cache()
    with pytest.warns(RandomWeightsWarning, match="meaningless"):
        random_model = load_clip(tiny, None, "cpu")
    assert load_clip(tiny, None, "cpu") is random_model
    clip_mod.clear_clip_cache()  # another process builds the very same random model
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(
        load_clip(tiny, None, "cpu").encode_images(x), random_model.encode_images(x)
    )
    ckpt = tmp_path / "tiny.pt"
    torch.save(random_model.model.state_dict(), ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        loaded = load_clip(tiny, str(ckpt), "cpu")
    assert loaded is not random_model
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.encode_images(x), random_model.encode_images(x))
    assert loaded.embed_dim == TINY_EMBED_DIM
    assert loaded.preprocess.size == (64, 64)
    # a file that is not this model's checkpoint: a ValueError naming it (CLI: one line)
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3)}, wrong)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    passwd = tmp_path / "passwd"  # text that torch.load gets further into (an IndexError)
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/false\n")
    a_list = tmp_path / "list.pt"  # a torch file holding no state dict (AttributeError)
    torch.save([1, 2, 3], a_list)
    for bad in (wrong, text, passwd, a_list):
        with pytest.raises(ValueError, match=f"{bad}: not a checkpoint of open_clip model"):
            load_clip(tiny, str(bad), "cpu")


def test_classifier_scores(heads) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, TINY_EMBED_DIM)).astype(np.float32)
    aesthetic = AestheticClassifier(heads["aesthetic"], embedding_dim=TINY_EMBED_DIM, device="cpu")
    nsfw = NsfwClassifier(heads["nsfw"], embedding_dim=TINY_EMBED_DIM, device="cpu", batch_size=3)
    a = aesthetic.score(emb)
    n = nsfw.score(emb)
    assert a.shape == n.shape == (10,)
    assert a.dtype == n.dtype == np.float32
    assert np.isfinite(a).all()
    assert ((n >= 0) & (n <= 1)).all()
    # inputs are L2-normalised first: scale does not matter
    np.testing.assert_allclose(aesthetic.score(emb * 7), a, rtol=1e-5)
    np.testing.assert_allclose(nsfw.score(torch.from_numpy(emb)), n, rtol=1e-5)
    assert aesthetic.score(np.zeros((0, TINY_EMBED_DIM))).shape == (0,)
    assert aesthetic.output_column == "aesthetic_score"
    assert nsfw.output_column == "nsfw_score"


def test_classifier_size_mismatch(heads, tiny: str) -> None:
    aesthetic = AestheticClassifier(heads["aesthetic"], embedding_dim=TINY_EMBED_DIM, device="cpu")
    with pytest.raises(ValueError, match=r"got 16-d.*expects 32-d"):
        aesthetic.score(np.zeros((4, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="2-d"):
        aesthetic.score(np.zeros(TINY_EMBED_DIM, dtype=np.float32))
    # weights for 32-d embeddings, classifier configured for 768-d
    wrong = NsfwClassifier(heads["nsfw"], embedding_dim=768, device="cpu")
    with pytest.raises(ValueError, match=r"expect 32-d embeddings but embedding_dim=768"):
        wrong.score(np.zeros((2, 768), dtype=np.float32))
    # the embedder refuses a classifier whose size differs from the model's, before computing
    with pytest.raises(ValueError, match=r"expects 768-d embeddings but .* produces 32-d"):
        embedder(tiny, classifiers=[wrong])(FakeDataset(dd.from_pandas(pd.DataFrame({"key": []}))))


def test_classifier_needs_weights_or_permission(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DASK_IMGCURATE_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="allow_download=True"):
        AestheticClassifier()
    with pytest.raises(ValueError, match="allow_download=True"):
        NsfwClassifier()
    missing = tmp_path / "typo.pth"  # said when built, not on a worker after the CLIP model
    with pytest.raises(FileNotFoundError, match=f"AestheticClassifier: model_path {missing}"):
        AestheticClassifier(model_path=str(missing))
    # a file already in the cache directory is used without downloading
    save_random_head(NsfwClassifier, tmp_path / NsfwClassifier.filename, embedding_dim=768)
    clf = NsfwClassifier(device="cpu")
    assert clf.weights_path() == str(tmp_path / NsfwClassifier.filename)
    assert clf.score(np.ones((1, 768), dtype=np.float32)).shape == (1,)


def test_relative_weights_paths_are_the_clients(tiny: str, shards, tmp_path, monkeypatch) -> None:
    """Relative head weights and checkpoint paths name the files of the directory where the
    embedder is built (the client's), not those of a worker's current directory: an
    external cluster's workers, started elsewhere, read other weights of the same name
    (silently) or none."""
    client_dir, worker_dir = tmp_path / "client", tmp_path / "worker"
    (client_dir / "w").mkdir(parents=True)
    (worker_dir / "w").mkdir(parents=True)
    save_random_head(AestheticClassifier, client_dir / "w" / "head.pth", seed=1)
    save_random_head(AestheticClassifier, worker_dir / "w" / "head.pth", seed=2)  # other weights
    torch.save(load_clip(tiny, None, "cpu").model.state_dict(), client_dir / "w" / "tiny.pt")
    monkeypatch.chdir(client_dir)
    head = AestheticClassifier("w/head.pth", embedding_dim=TINY_EMBED_DIM, device="cpu")
    emb = embedder(tiny, pretrained="w/tiny.pt", classifiers=[head])
    part = partition_from_tar(next(iter(shards)))
    expected = emb.embed_partition(part)["aesthetic_score"].to_numpy()
    monkeypatch.chdir(worker_dir)  # a worker's directory: no tiny.pt, another head.pth
    got = emb.embed_partition(part)["aesthetic_score"].to_numpy()
    np.testing.assert_array_equal(got, expected)
    assert head.model_path == str(client_dir / "w" / "head.pth")
    assert emb.pretrained == str(client_dir / "w" / "tiny.pt")
    # an open_clip tag stays a tag, even with a file of that name here
    (worker_dir / "openai").write_bytes(b"")
    assert embedder("ViT-B-32", pretrained="openai").pretrained == "openai"


def test_replaced_weights_files_are_loaded_again(tiny: str, tmp_path) -> None:
    """A process keeps models by path (once per worker), but a file replaced since it was
    loaded is loaded again: a long-lived worker of an external cluster scored later runs
    with the old weights."""
    path = tmp_path / "head.pth"
    emb = np.random.default_rng(0).normal(size=(4, TINY_EMBED_DIM)).astype(np.float32)
    save_random_head(AestheticClassifier, path, seed=1)
    head = AestheticClassifier(str(path), embedding_dim=TINY_EMBED_DIM, device="cpu")
    first = head.score(emb)
    np.testing.assert_array_equal(head.score(emb), first)  # cached
    save_random_head(AestheticClassifier, path, seed=2)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = head.score(emb)
    assert not np.allclose(second, first)
    fresh = AestheticClassifier(str(path), embedding_dim=TINY_EMBED_DIM, device="cpu")
    clear_classifier_cache()
    np.testing.assert_array_equal(fresh.score(emb), second)
    # the same for a CLIP checkpoint
    ckpt = tmp_path / "tiny.pt"
    model = load_clip(tiny, None, "cpu").model
    torch.save(model.state_dict(), ckpt)
    loaded = load_clip(tiny, str(ckpt), "cpu")
    assert load_clip(tiny, str(ckpt), "cpu") is loaded
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(changed, ckpt)
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    reloaded = load_clip(tiny, str(ckpt), "cpu")
    assert reloaded is not loaded
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(reloaded.encode_images(x), loaded.encode_images(x))
    assert clip_cache_info()["cached"].count((tiny, str(ckpt), "cpu", "fp32")) == 1


def test_reference_architectures() -> None:
    aesthetic = AestheticClassifier(allow_download=True).build()
    shapes = {k: tuple(v.shape) for k, v in aesthetic.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip
    nsfw = NsfwClassifier(allow_download=True).build()
    shapes = {k: tuple(v.shape) for k, v in nsfw.state_dict().items()}
    assert shapes == {
        "norm.mean": (768,), "norm.variance": (768,),
        "linear_1.weight": (64, 768), "linear_1.bias": (64,),
        "linear_2.weight": (512, 64), "linear_2.bias": (512,),
        "linear_3.weight": (256, 512), "linear_3.bias": (256,),
        "linear_4.weight": (1, 256), "linear_4.bias": (1,),
    }  # fmt: skip


def test_classifier_on_dataset_with_null_embeddings(heads) -> None:
    rng = np.random.default_rng(1)
    vectors = [rng.normal(size=TINY_EMBED_DIM).astype(np.float32).tolist() for _ in range(4)]
    vectors[2] = None
    emb = pd.Series(pd.arrays.ArrowExtensionArray(pa.array(vectors, pa.list_(pa.float32()))))
    pdf = pd.DataFrame({"key": list("abcd"), "image_embedding": emb})
    ds = FakeDataset(dd.from_pandas(pdf, npartitions=2))
    clf = AestheticClassifier(heads["aesthetic"], embedding_dim=TINY_EMBED_DIM, device="cpu")
    out = clf(ds).metadata.compute()
    assert out["aesthetic_score"].dtype == np.float32
    assert np.isnan(out["aesthetic_score"].iloc[2])
    valid = [0, 1, 3]
    want = clf.score(np.array([vectors[i] for i in valid], dtype=np.float32))
    np.testing.assert_allclose(out["aesthetic_score"].iloc[valid], want, rtol=1e-5)
    with pytest.raises(KeyError, match="ClipImageEmbedder"):
        clf(FakeDataset(dd.from_pandas(pdf[["key"]], npartitions=1)))


def test_embeddings_to_numpy() -> None:
    col = pd.Series(
        pd.arrays.ArrowExtensionArray(pa.array([[1, 2], None, [3, 4]], pa.list_(pa.float32())))
    )
    matrix, valid = embeddings_to_numpy(col, 2)
    np.testing.assert_array_equal(valid, [True, False, True])
    np.testing.assert_array_equal(matrix, [[1, 2], [0, 0], [3, 4]])
    matrix, valid = embeddings_to_numpy(pd.Series([[1.0, 2.0], None], dtype=object))
    np.testing.assert_array_equal(valid, [True, False])
    with pytest.raises(ValueError, match="mismatch"):
        embeddings_to_numpy(col, 3)


def test_existing_error_column_is_kept(tiny: str, shards) -> None:
    """Another stage's (or the user's, or another embedding's) error stays; on a re-run of
    the same embedding, an image error it recorded before is replaced by this run's result."""
    path = list(shards)[1]
    part = partition_from_tar(path).set_index("key", drop=False)
    assert list(part.index) == ["b00", "b01", "b02", "b03", "b04"]
    previous = ["download: 404", "decode: old", "read: old", "no image", "user: skip"]
    part["error"] = pd.array(previous, dtype=ERROR_DTYPE)
    other = embedder(tiny).embed_partition(part)  # no image_embedding yet: another model's
    assert other["error"].tolist() == previous
    part["image_embedding"] = None  # an earlier run of this embedding
    out = embedder(tiny).embed_partition(part)
    assert out.loc["b00", "error"] == "download: 404"  # kept, though the image is fine now
    assert out.loc["b00", "image_embedding"] is not None
    assert pd.isna(out.loc["b01", "error"])  # an earlier run's: this run decoded it
    assert out.loc["b02", "error"].startswith("decode: ") and out.loc["b02", "error"] != "read: old"
    assert pd.isna(out.loc["b03", "error"]) and out.loc["b03", "image_embedding"] is not None
    assert out.loc["b04", "error"] == "user: skip"


def test_re_embedding_a_fixed_image_clears_its_error(tiny: str, tmp_path: Path) -> None:
    """Embed, save, fix the broken image, load and embed again: the saved error is gone and
    the record has its embedding (and is exported)."""
    from dask_imgcurate import ImageTextPairDataset

    good = encode(synthetic_image(30, (80, 60)), "JPEG")
    shard = tmp_path / "data" / "00000.tar"
    write_tar(shard, [("a.jpg", good), ("b.jpg", good[: len(good) // 2])])
    with dask.config.set(scheduler="synchronous"):
        embedder(tiny)(ImageTextPairDataset.from_webdataset(str(shard.parent))).save_metadata()
        saved = ImageTextPairDataset.from_webdataset(str(shard.parent)).metadata.compute()
        assert saved.set_index("key")["error"]["b"].startswith("decode: ")
        write_tar(shard, [("a.jpg", good), ("b.jpg", good)])
        again = embedder(tiny)(ImageTextPairDataset.from_webdataset(str(shard.parent)))
        out = again.metadata.compute().set_index("key")
        summary = again.to_webdataset(str(tmp_path / "out"))
    assert out["error"].isna().all()
    assert out["image_embedding"].notna().all()
    assert summary.dropped_for_errors == 0


INVALID_EMBEDDER_OPTIONS = [
    {"batch_size": 0},
    {"num_threads": 0},
    {"source": "bogus"},
    {"prefetch": -1},
    {"max_image_pixels": 0},
    {"max_image_pixels": -1},
]


@pytest.mark.parametrize("option", INVALID_EMBEDDER_OPTIONS, ids=lambda o: f"{o}")
def test_invalid_reader_options_are_refused_up_front(tiny: str, option: dict) -> None:
    """Refused by the constructor with the reader's own message, not when computing."""
    from dask_imgcurate.io.image_reader import DaliImageReader, PreprocessSpec

    with pytest.raises(ValueError) as by_reader:
        DaliImageReader(PreprocessSpec(), **option)
    with pytest.raises(ValueError, match=f"^{re.escape(str(by_reader.value))}$"):
        embedder(tiny, **option)


def test_end_to_end_image_text_pair_dataset(tiny: str, shards, heads) -> None:
    dataset_mod = pytest.importorskip("dask_imgcurate.dataset")
    root = Path(next(iter(shards))).parent
    ds = dataset_mod.ImageTextPairDataset.from_webdataset(str(root))
    clf = AestheticClassifier(heads["aesthetic"], embedding_dim=TINY_EMBED_DIM, device="cpu")
    out = embedder(tiny, classifiers=[clf])(ds).metadata.compute()
    id_col = ds.id_col
    assert len(out) == 12
    by_key = out.set_index(id_col)
    assert by_key.loc["b02", "error"].startswith("decode: ")
    assert by_key.loc["b04", "error"] == "no image"
    assert by_key["image_embedding"].notna().sum() == 10
    key, data = next(iter(shards[str(root / "shard-00000.tar")].items()))
    vec = np.asarray(by_key.loc[key, "image_embedding"], dtype=np.float32)
    assert float(vec @ reference_embedding(tiny, data)) > 0.99


@pytest.mark.parametrize("spelling", ["none", "None", ""])
def test_the_command_lines_spelling_of_no_weights_works_in_python(tiny: str, spelling) -> None:
    with pytest.warns(RandomWeightsWarning, match="random weights"):
        embedder = ClipImageEmbedder(tiny, pretrained=spelling, device="cpu")
    assert embedder.pretrained is None

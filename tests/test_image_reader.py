"""DALI image reader: preprocessing parity with open_clip, key alignment, bad images."""

from __future__ import annotations

import io
import random
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from compute_helpers import encode, partition_from_tar, synthetic_image, write_tar
from open_clip.transform import image_transform
from PIL import Image

from dask_imgcurate.io.image_reader import DaliImageReader, ImageBatch, PreprocessSpec

SPEC = PreprocessSpec(size=(64, 64))
# (W, H): odd sizes and ratios whose resize / crop offsets round differently in DALI and
# torchvision unless computed exactly (384x303 -> 81 wide, offset 8.5 -> 8; 600x405 -> 94.8)
SIZES = [(97, 71), (384, 303), (600, 405), (71, 97), (64, 64), (200, 30), (33, 250)]


def reference(spec: PreprocessSpec, data: bytes) -> torch.Tensor:
    """open_clip's own eval transform on the PIL-decoded image."""
    size = spec.size[0] if spec.size[0] == spec.size[1] else spec.size
    transform = image_transform(
        size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
        fill_color=spec.fill_color,
    )
    img = Image.open(io.BytesIO(data))
    if img.mode in ("P", "PA", "1"):
        # PIL resizes palette images with nearest neighbour; DALI decodes to RGB first
        img = img.convert("RGB")
    return transform(img)


def by_key(batch: ImageBatch) -> dict[str, torch.Tensor]:
    return dict(zip(batch.keys, batch.images))


def reader(**kwargs) -> DaliImageReader:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("num_threads", 2)
    kwargs.setdefault("device", "cpu")
    return DaliImageReader(kwargs.pop("spec", SPEC), **kwargs)


@pytest.fixture(scope="module")
def png_shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """One PNG per size in SIZES (lossless, so only the preprocessing can differ)."""
    images = {f"{i:03d}": encode(synthetic_image(i, size), "PNG") for i, size in enumerate(SIZES)}
    members = []
    for key, data in images.items():
        members += [(f"{key}.png", data), (f"{key}.txt", f"caption {key}".encode())]
    path = write_tar(tmp_path_factory.mktemp("png") / "shard-000.tar", members)
    return path, images


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(size=(64, 64)),
        PreprocessSpec(size=(224, 224)),
        PreprocessSpec(size=(64, 64), interpolation="bilinear"),
        PreprocessSpec(size=(64, 64), resize_mode="squash"),
        PreprocessSpec(size=(64, 64), resize_mode="longest", fill_color=0),
        PreprocessSpec(size=(48, 80)),
        PreprocessSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ],
    ids=["shortest64", "shortest224", "bilinear", "squash", "longest", "nonsquare", "meanstd"],
)
def test_matches_open_clip_transform(png_shard, spec: PreprocessSpec) -> None:
    path, images = png_shard
    batch = reader(spec=spec).read(partition_from_tar(path))
    assert batch.errors == {}
    assert sorted(batch.keys) == sorted(images)
    assert batch.images.dtype == torch.float32
    assert tuple(batch.images.shape) == (len(images), 3, *spec.size)
    for key, got in by_key(batch).items():
        want = reference(spec, images[key])
        diff = (got - want).abs()
        # resampling kernels differ slightly (DALI vs PIL); geometry must be exact
        assert diff.mean() < 0.01, (key, diff.mean())
        assert diff.max() < 0.5, (key, diff.max())


def test_spec_from_open_clip_cfg() -> None:
    spec = PreprocessSpec.from_open_clip(
        {"size": 224, "mean": (0.5, 0.5, 0.5), "std": 0.5, "interpolation": "bilinear"}
    )
    assert spec == PreprocessSpec(
        size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
    )
    with pytest.raises(ValueError):
        PreprocessSpec(resize_mode="fit")


@pytest.fixture(scope="module")
def shuffled_shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """JPEG records written in a shuffled key order (the frame is sorted by key)."""
    images = {f"{i:03d}": encode(synthetic_image(100 + i, (80 + i, 60)), "JPEG") for i in range(11)}
    order = list(images)
    random.Random(3).shuffle(order)
    assert order != sorted(order)
    members = []
    for key in order:
        members += [(f"{key}.txt", b"c"), (f"{key}.jpg", images[key])]
    return write_tar(tmp_path_factory.mktemp("shuffled") / "shard.tar", members), images


def assert_aligned(batch: ImageBatch, images: dict[str, bytes]) -> None:
    """Every key's tensor is its own image's reference, and clearly not another key's."""
    refs = {key: reference(SPEC, data) for key, data in images.items()}
    got = by_key(batch)
    assert sorted(got) == sorted(images)
    for key, tensor in got.items():
        errs = {k: float((tensor - ref).abs().mean()) for k, ref in refs.items()}
        assert min(errs, key=errs.get) == key, errs
        assert errs[key] < 0.03


@pytest.mark.parametrize("source", ["range", "webdataset"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_key_alignment_when_tar_order_differs(shuffled_shard, source: str, batch_size: int) -> None:
    path, images = shuffled_shard
    part = partition_from_tar(path)
    assert part["key"].tolist() == sorted(images)
    batches = list(reader(source=source, batch_size=batch_size).iter_batches(part))
    assert all(len(b.keys) <= batch_size for b in batches)
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == len(set(keys)) == len(images)
    assert_aligned(
        ImageBatch(keys, torch.cat([b.images for b in batches]), {}),
        images,
    )


def test_frame_row_order_does_not_matter(shuffled_shard) -> None:
    path, images = shuffled_shard
    part = partition_from_tar(path).sample(frac=1.0, random_state=5).reset_index(drop=True)
    assert_aligned(reader().read(part), images)


def test_webdataset_source_with_idx_and_filtered_frame(shuffled_shard, tmp_path: Path) -> None:
    src, images = shuffled_shard
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes())
    try:
        from dask_imgcurate.io import write_dali_index
    except ImportError:
        from dask_imgcurate.io.shards import write_dali_index
    idx = write_dali_index(str(path))
    assert Path(idx).is_file()
    part = partition_from_tar(path)
    subset = part.iloc[[1, 4, 7]]
    batch = reader(source="webdataset").read(subset)
    assert sorted(batch.keys) == subset["key"].tolist()
    assert_aligned(batch, {k: images[k] for k in subset["key"]})


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """Good images in several formats, a corrupt one, a truncated one, an empty one, a GIF
    named .png (DALI cannot decode it, PIL can) and a record without an image."""
    good = synthetic_image(7, (90, 70))
    jpeg = encode(good, "JPEG", quality=95)
    images = {
        "a_jpeg": jpeg,
        "b_png_rgba": encode(synthetic_image(8, (70, 90), "RGBA"), "PNG"),
        "c_png_gray": encode(synthetic_image(9, (64, 80), "L"), "PNG"),
        "d_png_palette": encode(synthetic_image(10, (80, 64), "P"), "PNG"),
        "e_webp": encode(synthetic_image(11, (100, 66)), "WEBP", quality=90),
        "f_webp_lossless_rgba": encode(
            synthetic_image(12, (66, 100), "RGBA"), "WEBP", lossless=True
        ),
        "g_jpeg_gray": encode(synthetic_image(13, (77, 77), "L"), "JPEG"),
        "h_gif_as_png": encode(synthetic_image(14, (70, 70), "P"), "GIF"),
    }
    bad = {
        "x_corrupt": b"this is not an image at all" * 20,
        "y_truncated": jpeg[: len(jpeg) // 3],
        "z_empty": b"",
    }
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "png"}
    members = []
    for key, data in images.items():
        members.append((f"{key}.{ext[key.split('_')[1]]}", data))
    for key, data in bad.items():
        members.append((f"{key}.jpg", data))
    members.append(("n_noimage.txt", b"just text"))
    members.append(("n_noimage.json", b"{}"))
    return write_tar(tmp_path_factory.mktemp("mixed") / "shard.tar", members), images


@pytest.mark.parametrize("batch_size", [4, 32])
def test_bad_images_do_not_kill_the_shard(mixed_shard, batch_size: int) -> None:
    path, images = mixed_shard
    part = partition_from_tar(path)
    batch = reader(batch_size=batch_size).read(part)
    assert sorted(batch.keys) == sorted(images)
    assert set(batch.errors) == {"x_corrupt", "y_truncated", "z_empty", "n_noimage"}
    assert batch.errors["n_noimage"] == "no image"
    for key in ("x_corrupt", "y_truncated", "z_empty"):
        assert batch.errors[key].startswith("decode: "), batch.errors[key]
    assert "BytesIO" not in batch.errors["x_corrupt"]
    for key, tensor in by_key(batch).items():
        assert torch.isfinite(tensor).all()
        want = reference(SPEC, images[key])
        assert (tensor - want).abs().mean() < 0.03, key


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring ``width`` x ``height`` pixels, with one tiny IDAT
    (a decompression bomb's header without the work of making one)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def test_oversized_images_are_refused_before_decoding(tmp_path: Path) -> None:
    small = encode(synthetic_image(1, (40, 30)), "JPEG")
    medium = encode(synthetic_image(2, (120, 100)), "PNG")
    members = [("a.jpg", small), ("b.png", medium), ("c.png", png_declaring(100_000, 100_000))]
    part = partition_from_tar(write_tar(tmp_path / "bomb.tar", members))
    batch = reader().read(part)  # the default limit: PIL's 89.5 MP
    assert sorted(batch.keys) == ["a", "b"]
    assert batch.errors == {
        "c": "decode: 100000x100000 image (10000 MP) exceeds max_image_pixels=89478485"
    }
    batch = reader(max_image_pixels=120 * 100 - 1).read(part.iloc[:2])
    assert batch.keys == ["a"]
    assert batch.errors == {"b": "decode: 120x100 image (0.012 MP) exceeds max_image_pixels=11999"}
    assert sorted(reader(max_image_pixels=None).read(part.iloc[:2]).keys) == ["a", "b"]


def test_extreme_aspect_ratios_are_refused_before_resizing(tmp_path: Path) -> None:
    """Few pixels, but resized so that the short side is the model's: 1 x 30000 would
    become 64 x 1920000 (123 MP) before the crop. Refused like a bomb; 1 x 300 is fine."""
    thin = encode(synthetic_image(3, (1, 30_000)), "PNG")
    narrow = encode(synthetic_image(4, (300, 1)), "PNG")
    members = [("thin.png", thin), ("narrow.png", narrow)]
    part = partition_from_tar(write_tar(tmp_path / "thin.tar", members))
    assert SPEC.size == (64, 64)
    batch = reader().read(part)
    assert batch.keys == ["narrow"] and tuple(batch.images.shape[1:]) == (3, 64, 64)
    assert batch.errors == {
        "thin": "decode: 1x30000 image would resize to 123 MP before its center crop "
        "(aspect ratio 30000:1), over max_image_pixels=89478485"
    }
    assert sorted(reader(max_image_pixels=None).read(part).keys) == ["narrow", "thin"]
    for mode in ("longest", "squash"):  # these never grow past the model's size
        assert PreprocessSpec(size=(64, 64), resize_mode=mode).resized_pixels(1, 30_000) == 4096


def test_pil_fallback_can_be_disabled(mixed_shard) -> None:
    path, _ = mixed_shard
    part = partition_from_tar(path)
    part = part[part["key"].isin(["a_jpeg", "h_gif_as_png"])]
    batch = reader(pil_fallback=False).read(part)
    assert batch.keys == ["a_jpeg"]
    assert batch.errors["h_gif_as_png"].startswith("decode: ")


@pytest.mark.parametrize("source", ["range", "webdataset"])
def test_read_errors_are_per_row(shuffled_shard, tmp_path: Path, source: str) -> None:
    src, images = shuffled_shard
    part = partition_from_tar(src)
    cut = tmp_path / "cut.tar"
    data = src.read_bytes()
    last = int(part["_image_offset"].max())
    cut.write_bytes(data[: last + 10])  # the last image in tar order is cut short
    part["_shard"] = str(cut)
    batch = reader(source=source).read(part)  # (a missing tar: ..._removed_after_indexing)
    cut_key = part.loc[part["_image_offset"] == last, "key"].item()
    assert batch.errors[cut_key].startswith("read: truncated shard")
    assert len(batch.errors) == 1 and len(batch.keys) == len(images) - 1


def test_every_row_exactly_once_and_unique_keys(mixed_shard) -> None:
    path, _ = mixed_shard
    part = partition_from_tar(path)
    seen: list[str] = []
    for b in reader(batch_size=3, prefetch=2).iter_batches(part):
        assert b.images.shape[0] == len(b.keys)
        seen += b.keys + list(b.errors)
    assert sorted(seen) == sorted(part["key"])
    with pytest.raises(ValueError, match="unique"):
        list(reader().iter_batches(pd.concat([part, part.iloc[:1]])))


def test_empty_partition_and_abandoned_iterator(shuffled_shard) -> None:
    path, _ = shuffled_shard
    part = partition_from_tar(path)
    empty = reader().read(part.iloc[:0])
    assert empty.keys == [] and empty.errors == {} and tuple(empty.images.shape) == (0, 3, 64, 64)
    it = reader(batch_size=2, prefetch=1).iter_batches(part)
    first = next(it)
    assert len(first.keys) == 2
    it.close()  # the background thread stops; nothing hangs


def test_prefetch_and_inline_agree(shuffled_shard) -> None:
    path, _ = shuffled_shard
    part = partition_from_tar(path)
    a = reader(prefetch=0).read(part)
    b = reader(prefetch=3).read(part)
    assert a.keys == b.keys
    assert torch.equal(a.images, b.images)


def test_real_fixture_shard(fixture_tar: Path) -> None:
    part = partition_from_tar(fixture_tar)
    batch = reader(spec=PreprocessSpec(size=(224, 224))).read(part)
    assert batch.keys == ["0"] and batch.errors == {}
    with open(fixture_tar, "rb") as f:
        f.seek(int(part["_image_offset"].iloc[0]))
        data = f.read(int(part["_image_size"].iloc[0]))
    want = reference(PreprocessSpec(size=(224, 224)), data)
    assert (batch.images[0] - want).abs().mean() < 0.03


INVALID_READER_OPTIONS = [
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
    ({"num_threads": 0}, ValueError, "num_threads must be >= 1, got 0"),
    ({"prefetch": -1}, ValueError, "prefetch must be >= 0, got -1"),
    ({"max_image_pixels": 0}, ValueError, "max_image_pixels must be >= 1, got 0"),
    ({"max_image_pixels": -5}, ValueError, "max_image_pixels must be >= 1, got -5"),
    ({"max_image_pixels": 1e6}, TypeError, "max_image_pixels must be an integer, got 1000000.0"),
    ({"num_threads": True}, TypeError, "num_threads must be an integer, got True"),
    ({"source": "tfrecord"}, ValueError, "source must be one of"),
    ({"num_threads": 20000}, ValueError, "num_threads must be <= 1024, got 20000"),  # aborted
    ({"batch_size": 10**20}, ValueError, f"batch_size must be <= {2**31 - 1}, got {10**20}"),
]


@pytest.mark.parametrize(("option", "error", "message"), INVALID_READER_OPTIONS)
def test_invalid_reader_options(option: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        reader(**option)


def test_invalid_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    assert reader(prefetch=0, max_image_pixels=1).prefetch == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        reader(device="cuda")
    assert reader(device="auto").decoder_device == "cpu"


def test_decoded_values_are_exact_for_uniform_image(tmp_path: Path) -> None:
    """A flat colour survives decode + resize + normalise exactly: (v/255 - mean) / std."""
    color = (200, 100, 50)
    img = Image.new("RGB", (90, 70), color)
    path = write_tar(tmp_path / "flat.tar", [("k.png", encode(img, "PNG"))])
    batch = reader().read(partition_from_tar(path))
    want = (np.array(color) / 255.0 - np.array(SPEC.mean)) / np.array(SPEC.std)
    got = batch.images[0].mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("source", ["range", "webdataset"])
def test_a_tar_changed_after_indexing_is_an_error(tmp_path: Path, source: str) -> None:
    """Rows indexed before their tar was rewritten are not decoded from whatever now lies at
    their offsets: the read fails, naming the tar (not per-row errors, which a filter would
    drop quietly). Rows without a version (null, NaN) are not checked."""
    from dask_imgcurate import ImageTextPairDataset
    from dask_imgcurate.demo import make_demo_dataset
    from dask_imgcurate.errors import ShardChangedError

    make_demo_dataset(tmp_path / "data", n_shards=2, samples_per_shard=4, seed=0)
    make_demo_dataset(tmp_path / "other", n_shards=2, samples_per_shard=6, seed=1)
    frame = ImageTextPairDataset.from_webdataset(str(tmp_path / "data")).metadata.compute()
    assert frame["_shard_version"].notna().all()
    changed = tmp_path / "data" / "00001.tar"
    stale = frame[frame["_shard"] == str(changed)]
    assert len(reader(source=source).read(stale).keys) == 4  # unchanged yet: decodes
    for unknown in (pd.Series(pd.NA, dtype="Int64", index=stale.index), float("nan")):
        batch = reader(source=source).read(stale.assign(_shard_version=unknown))
        assert sorted(batch.keys) == sorted(stale["key"])  # no version: not a change
    changed.write_bytes((tmp_path / "other" / "00001.tar").read_bytes())
    with pytest.raises(ShardChangedError, match=f"^{changed} changed after it was indexed"):
        reader(source=source).read(frame)
    fresh = frame[frame["_shard"] != str(changed)]
    assert sorted(reader(source=source).read(fresh).keys) == sorted(fresh["key"])


@pytest.mark.parametrize("source", ["range", "webdataset"])
def test_a_tar_removed_after_indexing_is_an_error(tmp_path: Path, source: str) -> None:
    """Rows of a tar deleted after they were indexed fail the read, naming the tar, instead
    of getting a read error each, which exports would drop quietly as "errors"."""
    from dask_imgcurate import ImageTextPairDataset
    from dask_imgcurate.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "data", n_shards=2, samples_per_shard=4, seed=0)
    frame = ImageTextPairDataset.from_webdataset(str(tmp_path / "data")).metadata.compute()
    gone = tmp_path / "data" / "00001.tar"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"^{gone}: a file of this shard"):
        reader(source=source).read(frame)
    kept = frame[frame["_shard"] != str(gone)]
    assert sorted(reader(source=source).read(kept).keys) == sorted(kept["key"])
    if source == "range":  # read ahead in a thread of a Dask worker's task: names the worker
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                worker = next(iter(client.nthreads()))
                with pytest.raises(FileNotFoundError, match=f"is missing on Dask worker {worker}"):
                    client.submit(reader(source=source).read, frame).result()


def test_a_machine_failure_is_raised_not_recorded_per_image(shuffled_shard, monkeypatch) -> None:
    """A pipeline DALI cannot build (an old driver, no device) or an out-of-memory error is
    no image's fault: recorded per row, every record would be dropped quietly as an error."""
    import dask_imgcurate.io.preprocess as preprocess
    from dask_imgcurate.errors import DecoderUnavailable

    path, images = shuffled_shard
    part = partition_from_tar(path)

    def no_driver(*args, **kwargs):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    preprocess.clear_pipeline_cache()
    monkeypatch.setattr(preprocess, "build_pipeline", no_driver)
    with pytest.raises(DecoderUnavailable, match="cannot build DALI's decoding pipeline on cpu"):
        reader().read(part)
    monkeypatch.undo()

    def out_of_memory(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DaliImageReader, "_to_torch", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        reader().read(part)
    monkeypatch.undo()
    assert sorted(reader().read(part).keys) == sorted(images)  # and it recovers


def grey_pngs(bits: int) -> tuple[bytes, bytes]:
    """The same greyscale picture as an 8-bit PNG and as a PNG of ``bits`` (16) bits per
    sample holding each value v as v * 257 (what scaling 8 bits up to 16 gives)."""
    grey = np.asarray(synthetic_image(5, (90, 70), "L"))
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    assert bits == 16 and wide.mode == "I;16"
    return encode(Image.fromarray(grey), "PNG"), encode(wide, "PNG")


def test_pil_fallback_reduces_16_bit_grey_as_dali_does(tmp_path: Path) -> None:
    """A 16-bit PNG that DALI refuses (its IEND cut off) but PIL decodes gives the 8-bit
    picture, as DALI's own decode of the whole PNG does, not white (``convert("RGB")``
    clips 16-bit values)."""
    png8, png16 = grey_pngs(16)
    members = [("a8.png", png8), ("b16.png", png16), ("c16_cut.png", png16[:-10])]
    part = partition_from_tar(write_tar(tmp_path / "grey16.tar", members))
    assert reader(pil_fallback=False).read(part).keys == ["a8", "b16"]  # DALI refuses the cut
    batch = reader().read(part)
    assert batch.errors == {}
    got = by_key(batch)
    assert torch.equal(got["b16"], got["a8"])  # DALI: 16 bits as their high byte
    assert torch.equal(got["c16_cut"], got["a8"])  # and the PIL fallback alike


def test_pil_decode_of_16_bit_samples_in_mode_i() -> None:
    """Mode ``I`` holds 16-bit samples (a 16-bit PGM; a 16-bit PNG in older Pillows) or
    32-bit ones (a TIFF): the file's bit depth decides, never the values."""
    from dask_imgcurate.io.pil_decode import pil_decode

    grey = np.asarray(synthetic_image(5, (90, 70), "L"))
    pgm16 = b"P5 90 70 65535\n" + (grey.astype(np.uint16) * 257).astype(">u2").tobytes()
    pgm12 = b"P5 90 70 4080\n" + (grey.astype(np.uint16) * 16).astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm16)).mode == "I"
    for data in (pgm16, pgm12):
        pixels = pil_decode(data, None, SPEC)
        assert pixels.dtype == np.uint8 and pixels.shape == (70, 90, 3)
        np.testing.assert_array_equal(pixels, np.repeat(grey[:, :, None], 3, axis=2))
    dark = grey.astype(np.int32) * 257  # 16-bit values, but in a 32-bit TIFF
    with pytest.raises(ValueError, match=r"^unsupported pixel format: 32-bit .* \(mode I\)$"):
        pil_decode(encode(Image.fromarray(dark), "TIFF"), None, SPEC)
    floats = encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF")
    with pytest.raises(ValueError, match=r"^unsupported pixel format: floating-point .*"):
        pil_decode(floats, None, SPEC)


def test_pil_fallback_refuses_32_bit_samples(tmp_path: Path) -> None:
    """A 32-bit integer TIFF (DALI refuses it): its range is unknown, so an error, not a
    picture clipped to white."""
    grey = np.asarray(synthetic_image(6, (60, 50), "L"))
    tiff = encode(Image.fromarray(grey.astype(np.int32) * 65793), "TIFF")
    batch = reader().read(partition_from_tar(write_tar(tmp_path / "i32.tar", [("i.jpg", tiff)])))
    assert batch.keys == []
    assert batch.errors["i"].startswith(
        "decode: unsupported pixel format: 32-bit or signed integer samples (mode I) (DALI: "
    )


def test_floating_point_tiffs_are_refused_not_decoded_by_dali(tmp_path: Path) -> None:
    """DALI decodes a floating-point TIFF as if its samples were in [0, 1]: one holding
    0..255 would be embedded as a white picture, with no error. Its range is unknown, so it
    gets the PIL fallback's error instead (with or without the fallback)."""
    grey = np.asarray(synthetic_image(6, (60, 50), "L"))
    floats = encode(Image.fromarray(grey.astype(np.float32)), "TIFF")
    jpeg = encode(synthetic_image(7, (60, 50)), "JPEG")
    part = partition_from_tar(write_tar(tmp_path / "f.tar", [("a.jpg", jpeg), ("f.png", floats)]))
    for pil_fallback in (True, False):
        batch = reader(pil_fallback=pil_fallback).read(part)
        assert batch.keys == ["a"]
        assert batch.errors == {
            "f": "decode: unsupported pixel format: floating-point samples (mode F)"
        }


def test_junk_before_a_jpeg_marker_does_not_bypass_the_limit(tmp_path: Path) -> None:
    """libjpeg skips bytes where a marker is expected; so does the header check."""
    jpeg = encode(synthetic_image(2, (120, 100)), "JPEG")
    app0_end = 4 + (jpeg[4] << 8 | jpeg[5])
    junk = jpeg[:app0_end] + b"\x00\x00" + jpeg[app0_end:]
    part = partition_from_tar(write_tar(tmp_path / "junk.tar", [("j.jpg", junk)]))
    assert reader().read(part).keys == ["j"]
    batch = reader(max_image_pixels=11_999).read(part)
    assert batch.errors == {"j": "decode: 120x100 image (0.012 MP) exceeds max_image_pixels=11999"}


def test_pil_fallback_enforces_the_limit_the_header_check_missed(tmp_path, monkeypatch) -> None:
    """Whatever a header parser misses, the PIL fallback checks the size before decoding,
    with the header check's text (a GIF: DALI cannot decode it, PIL can)."""
    import dask_imgcurate.io.pixel_limits as pixel_limits

    gif = encode(synthetic_image(14, (120, 100), "P"), "GIF")
    part = partition_from_tar(write_tar(tmp_path / "gif.tar", [("g.jpg", gif)]))
    want = {"g": "decode: 120x100 image (0.012 MP) exceeds max_image_pixels=11999"}
    assert reader(max_image_pixels=11_999).read(part).errors == want  # the header check's
    monkeypatch.setattr(pixel_limits, "image_dimensions", lambda data: None)  # a parser gap
    assert reader(max_image_pixels=12_000).read(part).keys == ["g"]
    assert reader(max_image_pixels=11_999).read(part).errors == want


def test_pillows_own_limit_is_named_with_how_to_raise_it(tmp_path, monkeypatch) -> None:
    """With ``max_image_pixels`` above Pillow's own limit (2 x MAX_IMAGE_PIXELS), Pillow
    still refuses to read a TIFF's header or to decode in the PIL fallback (a GIF): the
    error says which limit refused the image and how to raise it."""
    import dask_imgcurate.io.pixel_limits as pixel_limits

    members = [
        ("tiff.jpg", encode(synthetic_image(3, (60, 50)), "TIFF")),
        ("gif.jpg", encode(synthetic_image(4, (60, 50), "P"), "GIF")),
    ]
    part = partition_from_tar(write_tar(tmp_path / "pil.tar", members))
    assert sorted(reader(max_image_pixels=10**6).read(part).keys) == ["gif", "tiff"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3000 pixels: over 2 x 1000
    want = (
        "decode: 3000 pixel image refused by Pillow's own limit of 2000 pixels "
        "(2 x PIL.Image.MAX_IMAGE_PIXELS); raise PIL.Image.MAX_IMAGE_PIXELS where images are "
        "decoded to allow it"
    )
    batch = reader(max_image_pixels=10**6).read(part)  # TIFF: the header check's (via PIL)
    assert batch.errors == {"gif": want, "tiff": want}
    monkeypatch.setattr(pixel_limits, "image_dimensions", lambda data: None)  # a parser gap
    batch = reader(max_image_pixels=10**6).read(part)
    assert batch.keys == ["tiff"] and batch.errors == {"gif": want}  # DALI decodes the TIFF


@pytest.mark.parametrize("source", ["range", "webdataset"])
def test_empty_image_error_is_the_same_for_both_sources(tmp_path: Path, source: str) -> None:
    members = [("a.jpg", encode(synthetic_image(1, (40, 30)), "JPEG")), ("z.jpg", b"")]
    part = partition_from_tar(write_tar(tmp_path / "empty.tar", members))
    batch = reader(source=source).read(part)
    assert batch.keys == ["a"] and batch.errors == {"z": "decode: empty image data"}


def test_nvimagecodec_status_17_is_named(tmp_path: Path) -> None:
    """A PNG cut short: DALI reports nvImageCodec status 17 (an extension's internal error)."""
    png = encode(synthetic_image(1, (256, 192)), "PNG")
    part = partition_from_tar(write_tar(tmp_path / "cut.tar", [("c.png", png[:-100])]))
    batch = reader(pil_fallback=False).read(part)
    assert batch.errors == {"c": "decode: codec extension internal error"}


def test_an_unparsable_image_in_a_large_batch_does_not_crash_the_process(tmp_path: Path) -> None:
    """DALI 2.4 dies (SIGSEGV) in about every other batch of 64 whose first sample has a
    header its parser rejects; such samples are decoded alone. In a child process, where a
    crash is an exit status, not the end of the test run: 4 such batches."""
    good = encode(synthetic_image(0, (64, 48)), "JPEG")
    members = []
    for b in range(4):
        members.append((f"b{b}-00.jpg", b"\xff\xd8"))  # a JPEG that ends after its first marker
        members += [(f"b{b}-{i:02d}.jpg", good) for i in range(1, 64)]
    tar = write_tar(tmp_path / "unparsable.tar", members)
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from compute_helpers import partition_from_tar\n"
        "from dask_imgcurate.io.image_reader import DaliImageReader, PreprocessSpec\n"
        "reader = DaliImageReader(PreprocessSpec(size=(64, 64)), batch_size=64, num_threads=1,"
        " device='cpu', prefetch=0)\n"
        f"batch = reader.read(partition_from_tar({str(tar)!r}))\n"
        "print(len(batch.keys), sorted(batch.errors.items()))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-2000:]
    errors = [
        (f"b{b}-00", "decode: cannot identify image file (DALI: bad code stream)") for b in range(4)
    ]
    assert child.stdout.strip() == f"252 {errors}"


def test_a_large_non_image_is_not_copied_for_pil(tmp_path: Path) -> None:
    """A 20 MB member of random bytes under a .jpg name: read once; PIL's header check and
    its fallback read it in place (each made a copy: 2 x its size more)."""
    size = 20_000_000
    junk = random.Random(0).randbytes(size)
    good = encode(synthetic_image(1, (40, 30)), "JPEG")
    part = partition_from_tar(write_tar(tmp_path / "junk.tar", [("a.jpg", good), ("j.jpg", junk)]))
    warm = reader(prefetch=0)
    warm.read(part)  # builds the DALI pipelines (~10 MB of Python objects) before tracing
    tracemalloc.start()
    try:
        batch = warm.read(part)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert batch.keys == ["a"] and batch.errors["j"].startswith("decode: cannot identify image")
    assert size <= peak < 1.2 * size  # the member as read, once


def test_helper_picks_the_image_member_the_library_does(tmp_path: Path) -> None:
    """compute_helpers follows the README: the first image member in tar order, a web image
    extension (any case) before another format's, before one that only ends in one."""
    from dask_imgcurate import ImageTextPairDataset

    png, jpg = encode(synthetic_image(1, (20, 20)), "PNG"), encode(synthetic_image(2), "JPEG")
    members = [
        ("a.png", png),
        ("a.jpg", jpg),
        ("b.seg.png", png),
        ("b.JPG", jpg),
        ("c.webp", png),
        ("c.jpeg", jpg),
        ("d.0.jpg", jpg),
        ("d.1.png", png),
        ("e.tif", png),
        ("e.0.jpg", jpg),
        ("f.json", b"{}"),
        ("f.mask.bmp", png),
        ("f.GIF", png),
        ("g.txt", b"no image"),
        ("g.tiff.txt", b"no image either"),
    ]
    path = write_tar(tmp_path / "pick.tar", members)
    columns = ["key", "_image_member", "_image_offset", "_image_size"]
    library = ImageTextPairDataset.from_webdataset(str(path)).metadata.compute()
    helper = partition_from_tar(path)
    picked = helper["_image_member"].tolist()
    assert picked[:6] == ["a.png", "b.JPG", "c.webp", "d.0.jpg", "e.tif", "f.GIF"]
    assert pd.isna(picked[6])  # g has no image

    def plain(frame: pd.DataFrame) -> pd.DataFrame:  # NaN / <NA> alike: None
        frame = frame[columns].reset_index(drop=True).astype(object)
        return frame.where(frame.notna(), None)

    pd.testing.assert_frame_equal(plain(helper), plain(library))


@pytest.mark.parametrize("source", ["range", "webdataset"])
def test_other_image_formats_are_decoded(tmp_path: Path, source: str) -> None:
    """TIFF, BMP, PNM and JPEG 2000 (DALI), GIF and AVIF (the PIL fallback) are images too:
    each decodes like PIL + open_clip's transform, and a record with a JPEG and a TIFF
    embeds the JPEG."""
    rgb = synthetic_image(21, (97, 71))
    images = {
        "a": ("tif", encode(rgb, "TIFF")),
        "b": ("TIFF", encode(rgb, "TIFF", compression="tiff_lzw")),
        "c": ("bmp", encode(rgb, "BMP")),
        "d": ("ppm", encode(rgb, "PPM")),
        "e": ("pgm", encode(rgb.convert("L"), "PPM")),
        "f": ("jp2", encode(rgb, "JPEG2000")),
        "g": ("gif", encode(rgb.convert("P"), "GIF")),
        "h": ("avif", encode(rgb, "AVIF", quality=90)),
    }
    jpeg = encode(rgb, "JPEG", quality=95)
    members = [(f"{key}.{ext}", data) for key, (ext, data) in images.items()]
    members += [("i.tif", encode(synthetic_image(22, (50, 50)), "TIFF")), ("i.jpg", jpeg)]
    path = write_tar(tmp_path / "formats.tar", members)
    partition = partition_from_tar(path)
    batch = reader(source=source).read(partition)
    assert batch.errors == {}
    assert sorted(batch.keys) == [*images, "i"]
    got = by_key(batch)
    for key, (_, data) in [*images.items(), ("i", ("jpg", jpeg))]:
        diff = (got[key] - reference(SPEC, data)).abs()
        assert diff.mean() < 0.01, (key, diff.mean())


def test_formats_dali_cannot_decode_go_to_pil_without_a_failed_dali_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GIF or an AVIF costs no DALI run on its encoded bytes (each failure rebuilds the
    pipeline); without the PIL fallback its error is DALI's as before."""
    rgb = synthetic_image(23, (80, 60))
    members = [
        ("a.gif", encode(rgb.convert("P"), "GIF")),
        ("b.avif", encode(rgb, "AVIF")),
        ("c.jpg", encode(rgb, "JPEG")),
        ("d.gif", b"GIF89a" + bytes(20)),
    ]
    partition = partition_from_tar(write_tar(tmp_path / "pil.tar", members))
    encoded_runs: list[int] = []
    run = DaliImageReader._run

    def counting(self, ids, datas, raw):
        if not raw:
            encoded_runs.append(len(ids))
        return run(self, ids, datas, raw)

    monkeypatch.setattr(DaliImageReader, "_run", counting)
    batch = reader().read(partition)
    assert encoded_runs == [1]  # the JPEG's batch
    assert sorted(batch.keys) == ["a", "b", "c"]
    assert batch.errors == {
        "d": "decode: cannot identify image file (DALI: unsupported or unrecognised image format)"
    }
    without = reader(pil_fallback=False).read(partition)
    assert without.keys == ["c"]
    assert set(without.errors.values()) == {"decode: unsupported or unrecognised image format"}

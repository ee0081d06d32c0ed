"""Benchmark: decode + embed from shards vs. the model alone on pre-decoded tensors.

Measures, in one process and one run, with the same open_clip model and batch size:

- **model only**: ``ClipModel.encode_images`` on batches that were decoded and preprocessed
  before the timer started (the ceiling: pure model throughput);
- **decode + embed**: ``ClipImageEmbedder(...)(dataset).metadata`` computed (Dask, ``sync``
  scheduler) over WebDataset shards built with ``dask_imgcurate.demo.make_demo_dataset``:
  metadata load, reads by byte range, DALI decode + resize + crop + normalise (a background
  thread decodes the next batch while the model runs), the model, embeddings into the frame;
- **read + decode only**: the DALI image reader over the same shards, no model (where the
  non-model time goes).

``ratio`` is decode + embed images/s divided by model-only images/s: 1.0 means reading and
decoding are entirely hidden behind the model. The two are timed shard by shard, interleaved
(alternating which goes first), so load from other processes and clock drift hit both alike;
the model-only run feeds the model exactly the batch sizes the embedder feeds it.

Weights are random (``pretrained=None``; the configs ship with open_clip, nothing is
downloaded): throughput does not depend on the weights. Run from the repository root::

    python benchmarks/bench_embed.py                                  # ViT-B-32, CPU
    python benchmarks/bench_embed.py --model dask-imgcurate-tiny --images 2048
    python benchmarks/bench_embed.py --device cuda --images 20000 --batch-size 256

On CUDA the model runs in fp16 (``--precision fp16``) and DALI decodes on the GPU
(``mixed``). Shards are cached under ``--data`` (git-ignored ``bench-data/embed``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from dask_imgcurate import demo  # noqa: E402
from dask_imgcurate.dataset import ImageTextPairDataset  # noqa: E402
from dask_imgcurate.device import resolve_device  # noqa: E402
from dask_imgcurate.embed import ClipImageEmbedder  # noqa: E402
from dask_imgcurate.io.image_reader import DaliImageReader  # noqa: E402
from dask_imgcurate.models.clip import RandomWeightsWarning, load_clip  # noqa: E402

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- set-up


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    text = (
        f"{cpu_model()}, nproc={nproc or os.cpu_count()}, torch threads={torch.get_num_threads()}"
    )
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def build(data: Path, n_shards: int, per_shard: int, seed: int = 0) -> Path:
    """Demo shards (cached: reused when ``manifest.json`` matches the settings)."""
    settings = {"n_shards": n_shards, "per_shard": per_shard, "seed": seed}
    path = data / f"{n_shards}x{per_shard}-seed{seed}"
    manifest = path / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == settings:
        return path
    t0 = time.perf_counter()
    demo.make_demo_dataset(path, n_shards=n_shards, samples_per_shard=per_shard, seed=seed)
    manifest.write_text(json.dumps(settings))
    print(f"built {n_shards} x {per_shard} images in {path} ({time.perf_counter() - t0:.0f} s)")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- runs


def batch_sizes(partition_sizes: list[int], batch_size: int) -> list[int]:
    """The batch sizes the embedder feeds the model: full batches per partition, then the rest."""
    out: list[int] = []
    for n in partition_sizes:
        out += [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return out


def model_only(clip, pool: torch.Tensor, sizes: list[int], device: torch.device) -> float:
    """Seconds to embed batches of ``sizes`` images cut from the pre-decoded ``pool``."""
    sync(device)
    t0 = time.perf_counter()
    start = 0
    for n in sizes:
        if start + n > len(pool):
            start = 0
        vectors = clip.encode_images(pool[start : start + n])
        vectors.cpu()  # the embedder copies every batch back to the host, too
        start += n
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    parser.add_argument("--images", type=int, default=512, help="images to embed")
    parser.add_argument("--shards", type=int, default=8, help="shards (= Dask partitions)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--precision", default=None, help="open_clip precision (default: fp16 on CUDA, else fp32)"
    )
    parser.add_argument(
        "--num-threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI threads"
    )
    parser.add_argument("--data", type=Path, default=Path("bench-data/embed"))
    parser.add_argument(
        "--pool-batches", type=int, default=8, help="distinct pre-decoded batches (cycled)"
    )
    args = parser.parse_args(argv)
    command = shlex.join(
        ["python", "benchmarks/bench_embed.py", *(sys.argv[1:] if argv is None else argv)]
    )
    load_before = os.getloadavg()[0]

    device = resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    per_shard = math.ceil(args.images / args.shards)
    images = per_shard * args.shards
    path = build(args.data, args.shards, per_shard)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        clip = load_clip(args.model, None, device, precision)
    print(f"Machine: {machine(device)}")
    print(f"Model: {args.model} (random weights), {precision}, device {device}")

    dataset = ImageTextPairDataset.from_webdataset(str(path))
    partitions = [p.compute() for p in dataset.metadata.to_delayed()]
    embedder = ClipImageEmbedder(
        args.model,
        None,
        batch_size=args.batch_size,
        device=str(device),
        num_threads=args.num_threads,
        precision=precision,
    )
    reader = DaliImageReader(
        clip.preprocess,
        batch_size=args.batch_size,
        num_threads=args.num_threads,
        device=device,
        prefetch=1,
    )

    # pre-decoded pool (outside any timer) + warm-up of model, DALI pipelines and caches
    pool_rows = partitions[0].head(min(len(partitions[0]), args.pool_batches * args.batch_size))
    pool = reader.read(pool_rows).images
    embedder.embed_partition(partitions[0].head(args.batch_size))
    model_only(clip, pool, [args.batch_size], device)

    # Interleaved per shard (alternating which goes first), so that load from other
    # processes and clock drift hit both measurements alike.
    embedded = embedder(dataset).metadata
    model_s = pipeline_s = 0.0
    shard_ratios: list[float] = []
    outs: list[pd.DataFrame] = []

    def run_pipeline(i: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with dask.config.set(scheduler="sync"):  # one task at a time: the model has the machine
            outs.append(embedded.get_partition(i).compute())
        sync(device)
        return time.perf_counter() - t0

    for i, part in enumerate(partitions):
        sizes = batch_sizes([len(part)], args.batch_size)
        if i % 2 == 0:
            m = model_only(clip, pool, sizes, device)
            p = run_pipeline(i)
        else:
            p = run_pipeline(i)
            m = model_only(clip, pool, sizes, device)
        model_s += m
        pipeline_s += p
        shard_ratios.append(m / p)
    out = pd.concat(outs)

    if len(out) != images or out["error"].notna().any():
        raise SystemExit(f"embedder returned {len(out)} rows, errors: {out['error'].dropna()[:5]}")
    valid = out["image_embedding"].notna().sum()
    if valid != images:
        raise SystemExit(f"{images - valid} images have no embedding")

    sync(device)
    t0 = time.perf_counter()
    decoded = 0
    for part in partitions:
        for batch in reader.iter_batches(part):
            decoded += len(batch.keys)
    sync(device)
    decode_s = time.perf_counter() - t0
    if decoded != images:
        raise SystemExit(f"reader decoded {decoded} of {images} images")

    model_rate = images / model_s
    rows = [
        ("model only (pre-decoded tensors)", model_s),
        ("decode + embed from shards (ClipImageEmbedder)", pipeline_s),
        ("read + decode only (DALI reader, no model)", decode_s),
    ]
    ratio = (images / pipeline_s) / model_rate
    print()
    print("| | |")
    print("|---|---|")
    print(f"| command | `{command}` |")
    print(f"| machine | {machine(device)} |")
    print(
        f"| model | {args.model} (random weights), {precision}, {device.type}, "
        f"batch {args.batch_size}, DALI threads {args.num_threads} |"
    )
    print(f"| images | {images} in {args.shards} shards (demo JPEGs, 96x128 .. 512x384) |")
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"| load average (1 min) | {load} |")
    print()
    print("| run | seconds | images/s | ratio to model only |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows:
        rate = images / seconds
        print(f"| {name} | {seconds:.2f} | {rate:.1f} | {rate / model_rate:.2f}x |")
    print()
    print(
        f"decode + embed / model only = {ratio:.2f}x (goal >= 0.85x); per shard: median "
        f"{statistics.median(shard_ratios):.2f}x, {min(shard_ratios):.2f}x .. "
        f"{max(shard_ratios):.2f}x"
    )
    if device.type == "cuda":
        print(f"decode + embed: {images / pipeline_s:.0f} images/s (goal on one H100: 2000)")


if __name__ == "__main__":
    main()

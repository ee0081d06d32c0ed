#!/usr/bin/env python
"""Curate a WebDataset with the Python API: embed, score, save the scores, filter, export.

The steps of ``dask-imgcurate curate``, written out: load the shards, add CLIP embeddings
and aesthetic / NSFW scores, save them as the shards' Parquet metadata (so later runs can
filter again without recomputing), keep the records that pass the thresholds, and export
them as new tar + Parquet shards.

Examples::

    # real models (ViT-L-14 weights are fetched by open_clip; the heads are local files)
    python scripts/curate_dataset.py shards/ curated/ \\
        --aesthetic-model sac+logos+ava1-l14-linearMSE.pth --nsfw-model nsfw.pth \\
        --min-aesthetic 5 --max-nsfw 0.2

    # offline, on the demo data, with the tiny built-in model and random heads
    dask-imgcurate demo --dir demo-output
    python scripts/curate_dataset.py demo-output/input curated/ \\
        --model dask-imgcurate-tiny --pretrained none \\
        --aesthetic-model demo-output/models/aesthetic-random-64d.pt \\
        --nsfw-model demo-output/models/nsfw-random-64d.pt --n-workers 2
"""

from __future__ import annotations

import argparse
import sys

from _common import positive_int, reported_errors

from dask_imgcurate import (
    AestheticClassifier,
    ClipImageEmbedder,
    ImageTextPairDataset,
    NsfwClassifier,
)
from dask_imgcurate.cluster import dask_client
from dask_imgcurate.models.clip import clip_embed_dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="directory (or glob, or URL) of the *.tar shards")
    parser.add_argument("output", help="directory for the curated shards")
    parser.add_argument("--model", default="ViT-L-14", help="open_clip model (ViT-L-14)")
    parser.add_argument(
        "--pretrained", default="openai", help="open_clip tag or checkpoint; 'none': random"
    )
    parser.add_argument("--aesthetic-model", required=True, help="aesthetic head weights")
    parser.add_argument("--nsfw-model", required=True, help="NSFW head weights")
    parser.add_argument("--min-aesthetic", type=float, default=None, help="keep score >= this")
    parser.add_argument("--max-nsfw", type=float, default=None, help="keep nsfw_score < this")
    parser.add_argument("--samples-per-shard", type=positive_int, default=10000)
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument(
        "--n-workers", type=int, default=None, help="local worker processes (0: threads)"
    )
    parser.add_argument("--scheduler-address", default=None, help="a running Dask cluster")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks, Dask logs")
    args = parser.parse_args(argv)
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained

    with reported_errors(args.verbose):  # bad input: one line `error: ...`, exit 1
        # the shards and the heads' weights are checked here, before a cluster starts
        dataset = ImageTextPairDataset.from_webdataset(args.input)
        dim = clip_embed_dim(args.model) or 768  # the heads must match the CLIP embedding size
        embedder = ClipImageEmbedder(
            model_name=args.model,
            pretrained=pretrained,
            batch_size=args.batch_size,
            classifiers=[
                AestheticClassifier(args.aesthetic_model, embedding_dim=dim),
                NsfwClassifier(args.nsfw_model, embedding_dim=dim),
            ],
        )
        with dask_client(args.scheduler_address, args.n_workers, quiet=not args.verbose):
            # 1. embed and score (lazy), then save: NNNNN.parquet beside every NNNNN.tar
            written = embedder(dataset).save_metadata()
            print(f"scored {int(written['rows'].sum())} records in {len(written)} shards")

            # 2. reload (cheap: the scores are metadata now), filter, export
            dataset = ImageTextPairDataset.from_webdataset(args.input)
            meta = dataset.metadata
            keep = meta["error"].isna()
            if args.min_aesthetic is not None:
                keep &= meta["aesthetic_score"] >= args.min_aesthetic
            if args.max_nsfw is not None:
                keep &= meta["nsfw_score"] < args.max_nsfw
            dataset.metadata = meta.assign(keep=keep)
            summary = dataset.to_webdataset(
                args.output, filter_column="keep", samples_per_shard=args.samples_per_shard
            )
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The click option groups shared by the ``dask-imgcurate`` commands."""

from __future__ import annotations

import click

from dask_imgcurate.cli.config import _DEFAULTS
from dask_imgcurate.cluster import default_n_workers


def _options(*decorators):
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


storage_option = click.option(
    "--storage-options",
    default=None,
    help='fsspec storage options as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\'.',
)

lenient_option = _options(
    click.option(
        "--lenient",
        is_flag=True,
        help="Keep the complete records of damaged (truncated or corrupt) shards, with a "
        "warning naming each, instead of failing.",
    ),
    click.option(
        "--on-mismatch",
        type=click.Choice(["raise", "drop"]),
        default=_DEFAULTS.on_mismatch,
        show_default=True,
        help="When a sidecar Parquet lists other ids than its tar holds: fail, or keep the "
        "records in both.",
    ),
)

with_cluster_options = _options(
    click.option(
        "--scheduler-address",
        default=None,
        help="Use the running Dask cluster at this address (tcp://host:8786).",
    ),
    click.option(
        "--n-workers",
        type=click.IntRange(min=0),
        default=None,
        help=f"Worker processes of the local cluster [default: {default_n_workers()}]; "
        "0: no cluster, threads in this process.",
    ),
)

with_model_options = _options(
    click.option("--model", default=_DEFAULTS.model, show_default=True, help="open_clip model."),
    click.option(
        "--pretrained",
        default=_DEFAULTS.pretrained,
        show_default=True,
        help="open_clip pretrained tag or local checkpoint; 'none' for random weights.",
    ),
    click.option("--aesthetic-model", default=None, help="Aesthetic head weights (torch file)."),
    click.option("--nsfw-model", default=None, help="NSFW head weights (torch file)."),
    click.option(
        "--allow-download",
        is_flag=True,
        help="Download missing aesthetic / NSFW head weights into the cache.",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=_DEFAULTS.batch_size,
        show_default=True,
        help="Images per model batch.",
    ),
    click.option(
        "--num-threads",
        type=click.IntRange(min=1),
        default=_DEFAULTS.num_threads,
        show_default=True,
        help="DALI decoder threads per worker.",
    ),
)

with_filter_options = _options(
    click.option("--min-aesthetic", type=float, default=None, help="Keep aesthetic_score >= this."),
    click.option("--max-nsfw", type=float, default=None, help="Keep nsfw_score < this."),
    click.option(
        "--query",
        default=None,
        help="Keep rows where this pandas expression is true, e.g. 'width >= 256'.",
    ),
)

with_layout_options = _options(
    click.option(
        "--layout",
        type=click.Choice(["webdataset", "images"]),
        default=_DEFAULTS.layout,
        show_default=True,
        help="webdataset: renumbered NNNNN.tar shards; images: ImageWriter layout, ids kept.",
    ),
    click.option(
        "--samples-per-shard",
        type=click.IntRange(min=1),
        default=_DEFAULTS.samples_per_shard,
        show_default=True,
        help="Records per output shard (webdataset layout).",
    ),
    click.option(
        "--max-shards",
        type=click.IntRange(min=1),
        default=_DEFAULTS.max_shards,
        show_default=True,
        help="Digits of output shard numbers (webdataset layout).",
    ),
    click.option(
        "--images-per-tar",
        type=click.IntRange(min=1),
        default=_DEFAULTS.images_per_tar,
        show_default=True,
        help="Records per output tar (images layout).",
    ),
)

#!/bin/sh
# A full disk while an export commits a shard (its end blocks, .idx, Parquet), while it sets
# the selected rows' columns aside (on a cluster), or while save_metadata writes, named no
# file:   OSError: [Errno 28] No space left on device
#         OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device
# (piece writes did name theirs). Fixed: "...: writing /mnt/small/out/.00000.parquet.tmp-...".
# Needs root (a tmpfs). Run from the repository root.
set -e
mkdir -p /mnt/small && mount -t tmpfs -o size=3m tmpfs /mnt/small
trap 'umount /mnt/small' EXIT
TMP=$(mktemp -d)
PYTHONPATH=. python scripts/make_demo_dataset.py "$TMP/src" --shards 4 --samples-per-shard 64 >/dev/null
PYTHONPATH=. python - "$TMP/src" <<'PY'
import sys, warnings
warnings.simplefilter("ignore")
from dask_imgcurate import ImageTextPairDataset
ds = ImageTextPairDataset.from_webdataset(sys.argv[1])
meta = ds.metadata
meta["caption"] = meta["caption"].str.repeat(400)  # big sidecars
ds.metadata = meta
with open("/mnt/small/filler", "wb", buffering=0) as f:  # leave ~40 KB
    f.write(b"x" * (3 * 2**20 - 40 * 2**10))
try:
    ds.save_metadata("/mnt/small/meta")
except OSError as err:
    print("save_metadata:", err)
PY
rm -rf "$TMP"

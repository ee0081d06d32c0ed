#!/bin/bash
# A long-lived external cluster keeps a score head cached by its path: after the weights
# file at that path is replaced, `embed` still scores with the OLD weights (silently).
# Needs a running scheduler at ${SCHED:-tcp://127.0.0.1:8786} with workers.
set -e
export PYTHONPATH=${PYTHONPATH:-/work/probe-cluster}
PY=${PY:-/work/venv/bin/python}
D=$(mktemp -d); cd $D
$PY /work/probe-cluster/scripts/make_demo_dataset.py input --shards 2 --samples-per-shard 8 >/dev/null
$PY -c "from dask_imgcurate.models.builtin import make_demo_models; make_demo_models('$D/models', seed=0)"
embed() { $PY -m dask_imgcurate embed input --model dask-imgcurate-tiny --pretrained none \
  --aesthetic-model $D/models/aesthetic-random-64d.pt --scheduler-address ${SCHED:-tcp://127.0.0.1:8786} >/dev/null 2>&1
  $PY -c "import pandas as pd; print(pd.read_parquet('input/00000.parquet')['aesthetic_score'].head(3).tolist())"; }
echo "seed 0 weights:"; embed
$PY -c "from dask_imgcurate.models.builtin import make_demo_models; make_demo_models('$D/models', seed=1)"
echo "seed 1 weights (same path) on the same cluster:"; embed
echo "seed 1 weights, no cluster (expected):"
$PY -m dask_imgcurate embed input --model dask-imgcurate-tiny --pretrained none \
  --aesthetic-model $D/models/aesthetic-random-64d.pt --n-workers 0 >/dev/null 2>&1
$PY -c "import pandas as pd; print(pd.read_parquet('input/00000.parquet')['aesthetic_score'].head(3).tolist())"
rm -rf $D

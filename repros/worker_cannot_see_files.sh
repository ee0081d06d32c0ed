#!/bin/bash
# A worker that does not see the client's files (no shared disk; simulated with a private
# mount namespace, needs root + unshare): before the fix the export failed with
# "[Errno 2] No such file or directory: '.../.rows-000001.arrow.tmp-...'" (an internal
# hidden file, no hint), embedding with a bare errno about the tar. Now each names the
# file, the worker, and that workers must see the same paths.
set -e
export PYTHONPATH=${PYTHONPATH:-/work/probe-cluster}
PY=${PY:-/work/venv/bin/python}; DASK=$(dirname $PY)/dask
D=$(mktemp -d); mkdir -p $D/data $D/out $D/wd; cd $D/data
$PY /work/probe-cluster/scripts/make_demo_dataset.py input --shards 6 --samples-per-shard 8 >/dev/null
cd $D/wd
$DASK scheduler --port 8797 --dashboard-address :0 2>/dev/null & S=$!
sleep 3
$DASK worker tcp://127.0.0.1:8797 --nthreads 1 --dashboard-address :0 2>/dev/null & W1=$!
unshare --mount --propagation private bash -c "mount -t tmpfs none $D/out && mount -t tmpfs none $D/data && exec $DASK worker tcp://127.0.0.1:8797 --nthreads 1 --dashboard-address :0" 2>/dev/null & W2=$!
sleep 8
cd $D/data
$PY -m dask_imgcurate export input $D/out/curated --samples-per-shard 4 --scheduler-address tcp://127.0.0.1:8797 || true
kill $W1 $W2; sleep 2; kill $S; wait 2>/dev/null; rm -rf $D

"""Relative head weights (and --pretrained checkpoint) paths are resolved in each WORKER's
current directory, not the client's: the client checks that ``models/aesthetic.pt`` exists
(in its cwd), the workers of an external cluster started elsewhere open their own
``models/aesthetic.pt`` -- a FileNotFoundError naming the worker's path, or, when a file of
that name exists there, silently other weights.

Starts its own scheduler + 1 worker whose cwd is a different directory.
Run: PYTHONPATH=/work/probe-cluster /work/venv/bin/python repros/relative_model_path_worker_cwd.py
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from dask_imgcurate import AestheticClassifier, ClipImageEmbedder, ImageTextPairDataset
from dask_imgcurate.demo import make_demo_dataset
from dask_imgcurate.models.builtin import make_demo_models

if __name__ == "__main__":
    from distributed import Client

    root = tempfile.mkdtemp()
    client_dir, worker_dir = os.path.join(root, "client"), os.path.join(root, "worker")
    make_demo_dataset(os.path.join(client_dir, "input"), n_shards=1, samples_per_shard=6)
    tiny = make_demo_models(os.path.join(client_dir, "models"), seed=0)
    make_demo_models(os.path.join(worker_dir, "models"), seed=1)  # other weights, same name
    port = 8799
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--port", str(port), "--dashboard-address", ":0"],
            cwd=worker_dir,
            stderr=subprocess.DEVNULL,
        ),
    ]
    time.sleep(3)
    procs.append(
        subprocess.Popen(
            [
                dask,
                "worker",
                f"tcp://127.0.0.1:{port}",
                "--nthreads",
                "1",
                "--dashboard-address",
                ":0",
            ],
            cwd=worker_dir,
            stderr=subprocess.DEVNULL,
        )
    )
    try:
        os.chdir(client_dir)

        def scores(client):
            embedder = ClipImageEmbedder(
                tiny.clip_model,
                pretrained=None,
                batch_size=8,
                classifiers=[
                    AestheticClassifier("models/aesthetic-random-64d.pt", embedding_dim=64)
                ],
            )
            ds = embedder(ImageTextPairDataset.from_webdataset("input"))
            return (
                ds.metadata["aesthetic_score"]
                .compute(scheduler=client.get if client else "sync")
                .to_numpy()
            )

        expected = scores(None)
        with Client(f"tcp://127.0.0.1:{port}", timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            got = scores(client)
        print("client-cwd weights:", expected[:3])
        print("on the cluster    :", got[:3])
        print("BUG: worker used other weights" if not np.allclose(expected, got) else "OK")
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=20)

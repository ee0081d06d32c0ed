"""Divergence (not fixed): the webdataset library skips members matching its ``skip_meta``
pattern ``__[^/]*__($|/)`` (e.g. ``__meta__/info.json``); dask_imgcurate makes them a record
(key ``__meta__/info``), as DALI's reader and ``wds2idx`` do. The README says members in no
record are skipped "as the webdataset library skips them", so the record counts differ.

Run: PYTHONPATH=/work/probe-tars /work/venv/bin/python repros/wds_skip_meta_divergence.py
"""

import io
import tarfile
import tempfile
from pathlib import Path

import webdataset as wds

from dask_imgcurate import ImageTextPairDataset

tar = Path(tempfile.mkdtemp()) / "00000.tar"
with tarfile.open(tar, "w") as tf:
    for name in ("000.jpg", "000.txt", "__meta__/info.json", "001.jpg", "001.txt"):
        info = tarfile.TarInfo(name)
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
ours = ImageTextPairDataset.from_webdataset(str(tar)).metadata.compute()["key"].tolist()
theirs = [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)]
print("ours:", ours, "webdataset:", theirs)

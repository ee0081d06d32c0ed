"""Repro: a .txt caption that is not UTF-8 (say Latin-1 "café") became "caf\ufffd" in the
caption column without any warning (the webdataset library's text decoder raises on it).

Run: PYTHONPATH=/work/probe-tars /work/venv/bin/python repros/non_utf8_caption_silently_replaced.py
"""

import io
import tarfile
import tempfile
import warnings
from pathlib import Path

from dask_imgcurate import ImageTextPairDataset

d = Path(tempfile.mkdtemp())
with tarfile.open(d / "00000.tar", "w") as tf:
    for name, data in (("000.jpg", b"\xff\xd8"), ("000.txt", "café".encode("latin-1"))):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    caption = ImageTextPairDataset.from_webdataset(str(d)).metadata.compute()["caption"][0]
print(repr(caption), "warnings:", [str(w.message) for w in caught] or "NONE (silent)")

"""Repro: an .idx written by DALI's ``wds2idx`` holds GNU tar's *escaped* member names
(``tar --list`` quotes non-ASCII bytes as ``\\ooo`` in the C locale, and a backslash as
``\\\\`` in any locale). The index check samples ~18 headers, so when an escaped member is
not sampled the index is trusted and the record's key comes out wrong (silently).

Run: PYTHONPATH=/work/probe-tars /work/venv/bin/python repros/wds2idx_escaped_names.py
"""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

from dask_imgcurate import ImageTextPairDataset

WDS2IDX = shutil.which("wds2idx") or str(Path(sys.executable).with_name("wds2idx"))

tmp = Path(tempfile.mkdtemp())
for label, odd, env in (
    ("non-ASCII name, C locale", "0250-ключ", {**os.environ, "LC_ALL": "C"}),
    ("backslash in a name, any locale", "0250-a\\b", dict(os.environ)),
):
    d = tmp / label.replace(" ", "_").replace(",", "")
    d.mkdir()
    keys = sorted(f"{i:04d}" if i != 250 else odd for i in range(500))
    with tarfile.open(d / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for key in keys:
            for ext, data in (("jpg", b"\xff\xd8 not really a jpeg"), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    subprocess.run(
        [WDS2IDX, str(d / "00000.tar"), str(d / "00000.idx")],
        env=env,
        check=True,
        capture_output=True,
    )
    os.utime(d / "00000.tar", (1_700_000_000, 1_700_000_000))  # the index is newer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ImageTextPairDataset.from_webdataset(str(d)).metadata.compute()["key"].tolist()
    wrong = sorted(set(got) - set(keys))
    print(f"{label}: {'WRONG KEYS ' + repr(wrong) if wrong else 'ok'}")
shutil.rmtree(tmp)

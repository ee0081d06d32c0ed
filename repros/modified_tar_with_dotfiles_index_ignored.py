"""Repro: an index (ours) of a tar holding members in no record (README, ._ dot-files) is
ignored with a misleading "the tar was modified after the index was written: the tar has
5 members, the index lists 3" notice once the tar is newer than its index (copied without
-p, touched): the full-header check compared the index's record members with *all* the
scanned members. The result is right (scanned), the notice wrong and the index unused.

Run: PYTHONPATH=/work/probe-tars /work/venv/bin/python repros/modified_tar_with_dotfiles_index_ignored.py
"""

import io
import os
import tarfile
import tempfile
import warnings
from pathlib import Path

from dask_imgcurate import ImageTextPairDataset, write_dali_index

d = Path(tempfile.mkdtemp())
with tarfile.open(d / "00000.tar", "w") as tf:
    for name in ("a1.jpg", "a1.txt", "a2.jpg", "README", "._a2.jpg"):
        info = tarfile.TarInfo(name)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    write_dali_index(str(d / "00000.tar"))
st = os.stat(d / "00000.idx")
os.utime(d / "00000.idx", ns=(st.st_atime_ns, st.st_mtime_ns - 5 * 10**9))  # tar newer
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ImageTextPairDataset.from_webdataset(str(d)).metadata.compute()
ignoring = [str(w.message) for w in caught if "ignoring its index" in str(w.message)]
print("BUG: " + ignoring[0] if ignoring else "ok: index used")

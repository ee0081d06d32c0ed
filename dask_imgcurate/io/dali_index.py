"""DALI WebDataset index files (``.idx``, format v1.2, as written by DALI's ``wds2idx``).

Layout: a first line ``v1.2 <samples>``, then one line per sample listing each member as
``<ext> <data offset> <size> <name>``, all space-separated.
"""

from __future__ import annotations

import numpy as np

from dask_imgcurate.errors import IndexFileError
from dask_imgcurate.io.records import RecordIndex, split_key
from dask_imgcurate.io.tarindex import TarIndex

VERSION = "v1.2"


def format_dali_index(records: RecordIndex) -> str:
    """Render ``records`` as the text of a v1.2 ``.idx`` file."""
    members = records.members
    lines = [f"{VERSION} {len(records)}"]
    for start, stop in zip(records.starts.tolist(), records.stops.tolist()):
        parts = []
        for i in range(start, stop):
            name = members.names[i]
            if any(ch.isspace() for ch in name):
                raise IndexFileError(
                    f"{members.source}: member name {name!r} contains white space, which a "
                    f"DALI index cannot represent"
                )
            parts.append(f"{split_key(name)[1]} {members.offsets[i]} {members.sizes[i]} {name}")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


def parse_dali_index(text: str, source: str, tar_size: int | None = None) -> TarIndex:
    """Parse v1.2 ``.idx`` text into a member index; check it fits a tar of ``tar_size``."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != VERSION:
        raise IndexFileError(f"{source}: not a DALI {VERSION} index (first line {lines[:1]!r})")
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != int(head[1]):
        raise IndexFileError(f"{source}: header says {head[1]} samples, found {len(body)}")
    for lineno, line in enumerate(body, start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise IndexFileError(f"{source}:{lineno}: expected groups of 'ext offset size name'")
        for j in range(0, len(fields), 4):
            try:
                offsets.append(int(fields[j + 1]))
                sizes.append(int(fields[j + 2]))
            except ValueError:
                raise IndexFileError(f"{source}:{lineno}: offset/size not integers") from None
            names.append(fields[j + 3])
    index = TarIndex(
        source=source,
        names=names,
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
    )
    if tar_size is not None and len(index) and int((index.offsets + index.sizes).max()) > tar_size:
        raise IndexFileError(
            f"{source}: index points past the end of its tar ({tar_size} bytes); it is stale, "
            f"rewrite it with write_dali_index"
        )
    return index

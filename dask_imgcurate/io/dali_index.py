"""DALI WebDataset index files (``.idx``, format v1.2, as written by DALI's ``wds2idx``).

Layout: a first line ``v1.2 <samples>``, then one line per sample listing each member as
``<ext> <data offset> <size> <name>``, all space-separated.

An index is only trusted once it is checked against its tar (``members_to_check``,
``check_headers``, ``check_tail``): a few header blocks and the bytes after the last
member, read in one batch, must agree with it.
"""

from __future__ import annotations

import numpy as np

from dask_imgcurate.errors import CompressedTarError, IndexFileError
from dask_imgcurate.io.records import RecordIndex, split_key
from dask_imgcurate.io.tarindex import (
    BLOCK,
    TarIndex,
    _number,
    _text,
    bad_checksums,
    scan_tar,
)

VERSION = "v1.2"
CHECKED_MEMBERS = 18
"""Members whose headers are checked: the first, the last and others spread evenly."""
CHECKED_LONG_NAMES = 8
"""More members checked among those named by an extended header (over 100 bytes)."""
CHECKED_GAPS = 8
"""Gaps between listed members (where the tar holds something else) whose first block is
checked: the one before the first member, and others spread evenly."""
TAIL_READ = 64 * 1024
"""Bytes read after the last member: the end-of-archive blocks and the padding after them
(10 KiB records for GNU tar and bsdtar)."""
_OCTAL_LIMIT = 8**11  # sizes from here on need base-256 or a pax "size" record
_REGULAR = (b"0", b"\x00", b"7")
_USTAR = b"ustar\x0000"


def format_dali_index(records: RecordIndex) -> str:
    """Render ``records`` as the text of a v1.2 ``.idx`` file."""
    members = records.members
    lines = [f"{VERSION} {len(records)}"]
    for start, stop in zip(records.starts.tolist(), records.stops.tolist()):
        parts = []
        for i in range(start, stop):
            name = members.names[i]
            ext = split_key(name)[1]
            if any(ch.isspace() for ch in name) or not ext:
                what = "contains white space" if ext else "has an empty extension"
                raise IndexFileError(
                    f"{members.source}: member name {name!r} {what}, which a DALI index "
                    f"cannot represent"
                )
            parts.append(f"{ext} {members.offsets[i]} {members.sizes[i]} {name}")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


def parse_dali_index(text: str, source: str, tar_size: int | None = None) -> TarIndex:
    """Parse v1.2 ``.idx`` text into a member index; check that it can describe a tar (of
    ``tar_size`` bytes): members in order, data block-aligned, never overlapping."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != VERSION:
        raise IndexFileError(f"{source}: not a DALI {VERSION} index (first line {lines[:1]!r})")
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    body = [(lineno, line) for lineno, line in enumerate(lines[1:], start=2) if line.strip()]
    if len(body) != int(head[1]):
        raise IndexFileError(f"{source}: header says {head[1]} samples, found {len(body)}")
    for lineno, line in body:  # "line N" of the index file, not of the tar
        fields = line.split()
        if len(fields) % 4:
            raise IndexFileError(
                f"{source}: line {lineno}: expected groups of 'ext offset size name'"
            )
        for j in range(0, len(fields), 4):
            try:
                offsets.append(int(fields[j + 1]))
                sizes.append(int(fields[j + 2]))
            except ValueError:
                raise IndexFileError(f"{source}: line {lineno}: offset/size not integers") from None
            names.append(fields[j + 3])
    index = TarIndex(
        source=source,
        names=names,
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
    )
    _check_layout(index, source)
    if tar_size is not None and len(index) and int((index.offsets + index.sizes).max()) > tar_size:
        raise IndexFileError(
            f"{source}: index points past the end of its tar ({tar_size} bytes): it is stale"
        )
    return index


def _check_layout(index: TarIndex, source: str) -> None:
    """Raise ``IndexFileError`` unless the members could lie in a tar in this order."""
    offsets, sizes = index.offsets, index.sizes
    what = None
    if (sizes < 0).any():
        what = "a negative size"
    elif (offsets < BLOCK).any() or (offsets % BLOCK).any():
        what = "a data offset that is not a multiple of 512 after the first header"
    elif (offsets[:-1] + _padded(sizes[:-1]) + BLOCK > offsets[1:]).any():
        what = "members out of order or overlapping"
    if what is not None:
        raise IndexFileError(f"{source}: index lists {what}: it does not describe a tar")


def _padded(sizes):
    return sizes + -sizes % BLOCK


def members_end(index: TarIndex) -> int:
    """Where the tar's next header (or its end-of-archive blocks) is due after the index's
    last member."""
    if not len(index):
        return 0
    return int(index.offsets[-1] + _padded(index.sizes[-1]))


def members_to_check(index: TarIndex) -> np.ndarray:
    """Members whose header blocks ``check_headers`` needs: the first, the last and others
    spread evenly (``CHECKED_MEMBERS`` in all), plus up to ``CHECKED_LONG_NAMES`` of those
    with names over 100 bytes (DALI's ``wds2idx`` points these at the GNU long-name header
    instead of the data)."""
    n = len(index)
    spread = np.linspace(0, n - 1, min(n, CHECKED_MEMBERS)).round().astype(np.int64)
    names = index.names
    lengths = np.fromiter(map(len, names), dtype=np.int64, count=n)
    long = [
        i
        for i in np.flatnonzero(lengths > 25).tolist()  # 100 bytes need 26+ characters
        if len(names[i].encode("utf-8", "surrogateescape")) > 100
    ]
    if long:
        picks = np.linspace(0, len(long) - 1, min(len(long), CHECKED_LONG_NAMES))
        spread = np.union1d(spread, np.asarray(long)[picks.round().astype(np.int64)])
    return np.unique(spread)


def gaps_to_check(index: TarIndex) -> np.ndarray:
    """Offsets of the first blocks of gaps between the index's members (the tar holds
    something there that the index does not list: extended headers, directories, links,
    dot-files, or members it forgot) that ``check_gaps`` needs: up to ``CHECKED_GAPS``."""
    if not len(index):
        return np.zeros(0, dtype=np.int64)
    due = np.concatenate([[0], index.offsets[:-1] + _padded(index.sizes[:-1])])
    gaps = due[due < index.offsets - BLOCK]
    if len(gaps) > CHECKED_GAPS:
        picks = np.linspace(0, len(gaps) - 1, CHECKED_GAPS).round().astype(np.int64)
        gaps = gaps[picks]
    return gaps.astype(np.int64)


def check_gaps(starts: np.ndarray, blocks: list[bytes]) -> str | None:
    """Why the gaps at ``starts`` (first blocks ``blocks``) show the index is incomplete: a
    regular member that belongs to a record, named by its own header; or None."""
    for start, block in zip(starts.tolist(), blocks):
        if len(block) == BLOCK and _listable_header(block):
            return (
                f"the tar holds members it does not list: {_header_name(block)!r} at byte "
                f"offset {start}"
            )
    return None


def check_headers(index: TarIndex, rows: np.ndarray, blocks: list[bytes]) -> str | None:
    """Why ``blocks`` (the 512 bytes before each of the members ``rows``' data) are not
    their tar headers, or None: each must have a valid checksum, a regular-file type, the
    index's size (when the size field can hold it) and its name (when the name is ASCII,
    fits in 100 bytes and needs no extended header)."""
    if any(len(block) != BLOCK for block in blocks):
        return "a member's data offset is not after a header block"
    if not len(blocks):
        return None
    headers = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(-1, BLOCK)
    bad = bad_checksums(headers)
    if len(bad):
        return _at(index, rows[bad[0]], "the block before its data is not a tar header")
    for row, block in zip(rows.tolist(), blocks):
        name, size = index.names[row], int(index.sizes[row])
        typeflag = block[156:157]
        if typeflag not in _REGULAR:
            return _at(index, row, f"its header has type {typeflag!r}, not a regular file's")
        try:
            header_size = _number(block[124:136])
        except ValueError:
            header_size = None
        if header_size is not None and header_size != size and size < _OCTAL_LIMIT:
            return _at(index, row, f"its header says {header_size} bytes, the index {size}")
        header_name = _header_name(block)
        if name.isascii() and len(name) <= 100 and header_name != name:
            return _at(index, row, f"its header names {header_name!r}")
    return None


def _header_name(block: bytes) -> str:
    """The member name a ustar header block holds by itself (with its prefix)."""
    name = _text(block[:100])
    if block[257:265] == _USTAR and block[345] != 0:
        name = f"{_text(block[345:500])}/{name}"
    return name


def _at(index: TarIndex, row: int, what: str) -> str:
    return f"member {index.names[row]!r} at data offset {int(index.offsets[row])}: {what}"


def check_tail(
    tail: bytes, end: int, tar_size: int, source: str = "<tail>"
) -> tuple[bool, int | None] | None:
    """Check the bytes ``tail`` found from ``end`` (the index's ``members_end``) on.

    Returns ``(ends_marked, data_after_end)`` as ``scan_tar`` would set them, or None when
    ``tail`` stops before the file does and more of it is needed. Raises
    ``IndexFileError`` when the tar goes on with members the index does not list.
    """
    if end > tar_size:
        raise IndexFileError("the tar ends inside its last member's padding")
    if end == tar_size:
        return False, None  # cut between members, as a scan would find it
    whole = len(tail) >= tar_size - end
    block = bytes(tail[:BLOCK])
    if len(block) == BLOCK and not any(block):  # end-of-archive
        nonzero = np.flatnonzero(np.frombuffer(tail, dtype=np.uint8))
        if len(nonzero):
            return True, end + int(nonzero[0])
        return (True, None) if whole else None
    if len(block) == BLOCK and _listable_header(block):
        raise IndexFileError(
            f"the tar holds more members than it lists: {_header_name(block)!r} at byte "
            f"offset {end}"
        )
    if not whole:
        return None
    try:
        rest = scan_tar(memoryview(tail), source, strict=False)  # e.g. links, dot-files
    except CompressedTarError:  # gzip magic in a header's name field: no tar header
        rest = None
    listed = [] if rest is None else [n for n in rest.names if split_key(n)[0] is not None]
    if rest is None or rest.damage is not None or listed:
        what = f"more members than it lists ({listed[0]!r}, ...)" if listed else "no tar header"
        raise IndexFileError(f"the tar holds {what} from byte offset {end} on")
    after = rest.data_after_end
    return rest.ends_marked, None if after is None else end + after


def _listable_header(block: bytes) -> bool:
    """Whether ``block`` is a valid header of a regular member that belongs to a record
    (named by itself, not by an extended header)."""
    header = np.frombuffer(block, dtype=np.uint8).reshape(1, BLOCK)
    if len(bad_checksums(header)) or block[156:157] not in _REGULAR:
        return False
    return split_key(_header_name(block))[0] is not None

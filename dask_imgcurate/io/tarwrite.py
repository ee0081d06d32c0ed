"""Encode tar headers (pure functions). Output is deterministic: fixed owner, mode, mtime.

Names that fit in 100 UTF-8 bytes get a plain ustar header; longer ones are preceded by a
pax extended header carrying the full ``path``, as GNU tar and Python's tarfile write.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.io.tarindex import BLOCK

MTIME = 1577836800  # 2020-01-01T00:00:00Z: fixed, so the same export gives the same bytes
END_OF_ARCHIVE = bytes(2 * BLOCK)
_MAGIC = b"ustar\x0000"


def padding(size: int) -> bytes:
    """Zero bytes that pad a payload of ``size`` to a whole block."""
    return bytes(-size % BLOCK)


def _numeric(value: int, width: int) -> bytes:
    digits = width - 1
    if value < 8**digits:
        return b"%0*o\x00" % (digits, value)
    return b"\x80" + value.to_bytes(width - 1, "big")  # GNU base-256 for huge sizes


@functools.cache
def _fixed_fields(typeflag: bytes, mode: int) -> tuple[bytes, bytes, bytes, int]:
    """The fields that do not depend on name and size: mode + uid + gid (offset 100), mtime
    (136), typeflag to the end of the block (156), and the sum of their bytes plus eight
    spaces (the checksum field while it is summed)."""
    ids = b"%07o\x00" % mode + b"0000000\x00" * 2
    mtime = _numeric(MTIME, 12)
    tail = typeflag + bytes(100) + _MAGIC + bytes(BLOCK - 265)
    return ids, mtime, tail, sum(ids) + sum(mtime) + 8 * ord(" ") + sum(tail)


def ustar_header(name: bytes, size: int, typeflag: bytes = b"0", mode: int = 0o644) -> bytes:
    """One 512-byte ustar header block for ``name`` (at most 100 bytes)."""
    if len(name) > 100:
        raise ValueError(f"ustar name longer than 100 bytes: {name!r}")
    ids, mtime, tail, fixed_sum = _fixed_fields(typeflag, mode)
    size_field = _numeric(size, 12)
    checksum = fixed_sum + sum(name) + sum(size_field)
    return b"".join(
        (name.ljust(100, b"\x00"), ids, size_field, mtime, b"%06o\x00 " % checksum, tail)
    )


def pax_record(key: str, value: str) -> bytes:
    """One ``"<len> key=value\\n"`` pax record (the length counts itself)."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def member_header(name: str, size: int) -> bytes:
    """Header block(s) for a regular file ``name`` of ``size`` bytes."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= 100:
        return ustar_header(encoded, size)
    record = pax_record("path", name)
    short = encoded[:100].decode("utf-8", "ignore").encode()
    return (
        ustar_header(b"PaxHeaders/" + short[:89], len(record), typeflag=b"x")
        + record
        + padding(len(record))
        + ustar_header(short, size)
    )


_USTAR_MAX_SIZE = 8**11  # sizes from here on need base-256 (the scalar path writes them)


@functools.cache
def _template() -> np.ndarray:
    """A regular-file ustar header with an empty name, size 0 and the checksum field as
    eight spaces (its value while the checksum is summed)."""
    block = np.frombuffer(ustar_header(b"", 0), dtype=np.uint8).copy()
    block[148:156] = ord(" ")
    return block


def header_length(name_bytes: int) -> int:
    """Bytes of ``member_header`` for a name of ``name_bytes`` UTF-8 bytes (any size)."""
    if name_bytes <= 100:
        return BLOCK
    record = len(pax_record("path", "x" * name_bytes))  # its length depends on the length only
    return 2 * BLOCK + record + -record % BLOCK


def header_lengths(name_bytes: np.ndarray) -> np.ndarray:
    """``header_length`` of many names at once."""
    name_bytes = np.asarray(name_bytes, dtype=np.int64)
    lengths = np.full(len(name_bytes), BLOCK, dtype=np.int64)
    for i in np.flatnonzero(name_bytes > 100).tolist():
        lengths[i] = header_length(int(name_bytes[i]))
    return lengths


def member_headers(names: pa.Array, sizes: np.ndarray) -> tuple[memoryview, np.ndarray]:
    """``member_header`` for many members at once: their header bytes, concatenated, and
    ``starts`` (``len(names) + 1`` offsets: header ``i`` is ``[starts[i], starts[i+1])``).

    Names of at most 100 bytes with ustar-sized payloads (nearly all) are encoded with numpy
    in one pass; the rest go through ``member_header``.
    """
    count = len(names)
    sizes = np.asarray(sizes, dtype=np.int64)
    binary = names.cast(pa.binary())
    name_bytes = pc.binary_length(binary).to_numpy(zero_copy_only=False).astype(np.int64)
    simple = (name_bytes <= 100) & (sizes < _USTAR_MAX_SIZE)
    lengths = np.full(count, BLOCK, dtype=np.int64)
    blocks = np.empty((count, BLOCK), dtype=np.uint8)
    if count:
        blocks[:] = _template()
        fixed = np.array(binary.to_pylist(), dtype="S100")  # NUL-padded to the name field
        blocks[:, :100] = fixed.view(np.uint8).reshape(count, 100)
        shifts = np.arange(30, -1, -3, dtype=np.int64)  # 11 octal digits, most significant first
        digits = ((sizes[:, None] >> shifts) & 7) + ord("0")
        blocks[:, 124:135] = digits
        name_sums = blocks[:, :100].sum(axis=1, dtype=np.int64)
        checksum = int(_template().sum()) + name_sums + (digits - ord("0")).sum(axis=1)
        blocks[:, 148:154] = ((checksum[:, None] >> np.arange(15, -1, -3)) & 7) + ord("0")
        blocks[:, 154] = 0
    special = np.flatnonzero(~simple).tolist()
    if not special:
        return memoryview(blocks.reshape(-1)), np.concatenate([[0], np.cumsum(lengths)])
    pieces: list[bytes] = []
    done = 0
    for i in special:
        pieces.append(blocks[done:i].tobytes())
        header = member_header(names[i].as_py(), int(sizes[i]))
        pieces.append(header)
        lengths[i] = len(header)
        done = i + 1
    pieces.append(blocks[done:].tobytes())
    return memoryview(b"".join(pieces)), np.concatenate([[0], np.cumsum(lengths)])

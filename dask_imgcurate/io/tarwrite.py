"""Encode tar headers (pure functions). Output is deterministic: fixed owner, mode, mtime.

Names that fit in 100 UTF-8 bytes get a plain ustar header; longer ones are preceded by a
pax extended header carrying the full ``path``, as GNU tar and Python's tarfile write.
"""

from __future__ import annotations

import functools

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

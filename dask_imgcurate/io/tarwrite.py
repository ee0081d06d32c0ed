"""Encode tar headers (pure functions). Output is deterministic: fixed owner, mode, mtime.

Names that fit in 100 UTF-8 bytes get a plain ustar header; longer ones are preceded by a
pax extended header carrying the full ``path``, as GNU tar and Python's tarfile write.
"""

from __future__ import annotations

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


def ustar_header(name: bytes, size: int, typeflag: bytes = b"0", mode: int = 0o644) -> bytes:
    """One 512-byte ustar header block for ``name`` (at most 100 bytes)."""
    if len(name) > 100:
        raise ValueError(f"ustar name longer than 100 bytes: {name!r}")
    header = bytearray(BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"%07o\x00" % mode
    header[108:116] = b"0000000\x00"
    header[116:124] = b"0000000\x00"
    header[124:136] = _numeric(size, 12)
    header[136:148] = _numeric(MTIME, 12)
    header[148:156] = b"        "
    header[156:157] = typeflag
    header[257:265] = _MAGIC
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


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

"""Index a tar's members from their headers alone, never touching payload bytes.

``scan_tar`` walks header blocks in a bytes-like buffer (an ``mmap`` of a local file, or
the bytes of a remote one) and jumps over each payload by its size. It understands ustar,
GNU long names (``L``) and pax extended headers (``x``, and Solaris ``X``; ``path`` and
``size``). Sparse members (GNU ``S``, pax ``GNU.sparse.*``) cannot be copied by byte range:
they are damage. Header checksums are verified for all headers at once with numpy after
the walk, so the walk itself stays a tight loop.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

import numpy as np

from dask_imgcurate.errors import CompressedTarError, TarFormatError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# name(100) mode uid gid(24) size(12) mtime chksum(20) typeflag(1) linkname(100) magic(8)
# uname gname devmajor devminor(80) prefix (first byte; read in full only when set)
_HEADER = struct.Struct("100s24x12s20xc100x8s80xc")
_REGULAR = (b"0", b"\x00", b"7")
_PLAIN_TYPES = frozenset((ord("0"), 0, ord("7")))
_EXTENDED = (b"x", b"X")  # pax extended header (X: the Solaris / star spelling)
# Not regular files: links, devices, FIFOs, multi-volume continuations (listed in
# ``TarIndex.skipped``); directories, global headers, volume labels and long link names
# (skipped quietly)
_SKIPPED_TYPES = (b"1", b"2", b"3", b"4", b"6", b"M")
_QUIET_TYPES = (b"5", b"D", b"g", b"K", b"V")
_USTAR = b"ustar\x0000"


@dataclass
class TarIndex:
    """Regular-file members of one tar, in archive order.

    ``offsets`` are payload (data) offsets, as in DALI's index files. ``damage`` is set
    (instead of raising) when the tar was scanned with ``strict=False`` and is damaged:
    the members before the damage are listed, the rest is lost.
    """

    source: str
    names: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    damage: TarFormatError | None = None
    # links and other special files, which are not regular files and are not read
    skipped: list[str] = field(default_factory=list)
    # False when the data stops after a member without the end-of-archive blocks every tar
    # writer adds when it finishes: a write or download may have been cut between members
    ends_marked: bool = True
    # where non-zero data follows the end-of-archive blocks (``cat a.tar b.tar``: readers,
    # GNU tar without --ignore-zeros included, stop at the first end), else None
    data_after_end: int | None = None
    # the regular member whose data the damage cuts short, named by its intact header
    cut_member: str | None = None

    def __len__(self) -> int:
        return len(self.names)


def _text(field_bytes: bytes) -> str:
    """A NUL-terminated header string."""
    return field_bytes.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _number(field_bytes: bytes) -> int:
    """Parse a numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        return value - (1 << (8 * (len(field_bytes) - 1))) if field_bytes[0] & 0x40 else value
    return int(field_bytes.strip(b" \x00") or b"0", 8)


def _own_name(buffer, pos: int, name_b: bytes, magic: bytes, has_prefix: bytes) -> str:
    """The member name the header at ``pos`` holds by itself (with its ustar prefix)."""
    try:
        name = name_b.partition(b"\x00")[0].decode()
    except UnicodeDecodeError:
        name = _text(name_b)
    if has_prefix != b"\x00" and magic == _USTAR:
        name = f"{_text(bytes(buffer[pos + 345 : pos + 500]))}/{name}"
    return name


def parse_pax(data: bytes) -> dict[str, str]:
    """Parse pax extended-header records (``"<len> <key>=<value>\\n"``)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("pax record length is not positive")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def scan_tar(buffer, source: str = "<tar>", *, strict: bool = True) -> TarIndex:
    """Index the regular files of the tar held in ``buffer`` (bytes, mmap, memoryview).

    Raises ``CompressedTarError`` for gzip/bzip2/xz/zstd input and ``TarFormatError``
    (naming ``source`` and the byte offset) for truncated or corrupt input, unless
    ``strict=False``, which returns the members before the damage with ``damage`` set.
    """
    _refuse_compressed(buffer, source)
    size_total = len(buffer)
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    header_starts: list[int] = []  # every header block, for the checksum pass
    skipped: list[str] = []
    unpack = _HEADER.unpack_from
    add_name, add_offset, add_size = names.append, offsets.append, sizes.append
    add_header = header_starts.append
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    pending = False  # a long name or pax header applies to the next member
    damage: TarFormatError | None = None
    ends_marked = True
    data_after_end: int | None = None
    cut_member: str | None = None
    plain: list[int] = []  # indices into names of members named later, from their headers
    plain_rows: list[int] = []  # ... and their headers' indices into header_starts
    walk = _walk_plain if isinstance(buffer, (bytes, bytearray, mmap.mmap)) else None
    pages = _ReleasedPages(buffer, header_starts)
    try:
        while True:
            if pos >= pages.next_release:
                pages.release(pos)
            if walk is not None and not pending:
                first = len(header_starts)
                pos = walk(buffer, pos, size_total, header_starts, sizes, pages.next_release)
                added = len(header_starts) - first
                if added:
                    plain.extend(range(len(names), len(names) + added))
                    plain_rows.extend(range(first, first + added))
                    names.extend([""] * added)
                    offsets.extend([start + BLOCK for start in header_starts[first:]])
            if pos + BLOCK > size_total:
                if pos == size_total and not pending:
                    ends_marked = False  # accepted, like GNU tar; reported by the caller
                    break
                if pos > size_total:  # the last member's data is whole, its padding is not
                    raise TarFormatError(
                        source,
                        size_total,
                        f"truncated tar: the file ends {pos - size_total} bytes before the "
                        f"end of its last member's padding to a {BLOCK}-byte block",
                    )
                raise TarFormatError(source, pos, "truncated tar header")
            name_b, size_b, typeflag, magic, has_prefix = unpack(buffer, pos)
            if name_b[0] == 0 and buffer[pos : pos + BLOCK] == _ZERO_BLOCK:
                data_after_end = _data_after(buffer, pos)
                break
            add_header(pos)
            try:
                size = int(size_b[:11], 8) if size_b[11] == 0 else _number(size_b)
            except ValueError:
                try:
                    size = _number(size_b)
                except ValueError:
                    raise TarFormatError(
                        source, pos, "corrupt tar header (bad size field)"
                    ) from None
            data = pos + BLOCK
            if pending and "size" in pax:
                size = int(pax["size"])
            if size < 0:
                raise TarFormatError(source, pos, "corrupt tar header (negative size)")
            if data + size > size_total:
                if typeflag in _REGULAR:
                    named = long_name if long_name is not None else pax.get("path")
                    cut_member = (pending and named) or _own_name(
                        buffer, pos, name_b, magic, has_prefix
                    )
                raise TarFormatError(
                    source, pos, f"truncated tar member (needs {size} bytes, file ends first)"
                )
            if typeflag in _REGULAR:
                if pending:
                    name = long_name if long_name is not None else pax.get("path")
                    if any(key.startswith("GNU.sparse.") for key in pax):
                        real = pax.get("GNU.sparse.name") or name or _text(name_b)
                        raise _sparse(source, pos, real)
                    long_name, pax, pending = None, {}, False
                else:
                    name = None
                if name is None:
                    name = _own_name(buffer, pos, name_b, magic, has_prefix)
                add_name(name)
                add_offset(data)
                add_size(size)
            elif typeflag in _EXTENDED:
                pax = parse_pax(bytes(buffer[data : data + size]))
                pending = True
            elif typeflag == b"L":
                long_name = _text(bytes(buffer[data : data + size]))
                pending = True
            elif typeflag in _SKIPPED_TYPES:
                skipped.append(long_name or pax.get("path") or _text(name_b))
                long_name, pax, pending = None, {}, False
            elif typeflag in _QUIET_TYPES:
                long_name, pax, pending = None, {}, False
            elif typeflag == b"S":
                raise _sparse(source, pos, long_name or pax.get("path") or _text(name_b))
            else:
                raise TarFormatError(source, pos, f"corrupt tar header (type {typeflag!r})")
            pos = data + ((size + BLOCK - 1) & ~(BLOCK - 1))
    except TarFormatError as err:
        damage = err
    except (ValueError, UnicodeDecodeError) as err:  # malformed pax / long-name payload
        damage = TarFormatError(source, pos, f"corrupt extended header ({err})")
    headers = pages.header_blocks()
    try:
        # Also when the walk stopped early: the headers read before the damage must be
        # intact too, and a bad one among them is the first damage.
        _verify_checksums(headers, header_starts, source)
    except TarFormatError as err:
        damage, cut_member = err, None  # a header that fails its checksum names nothing
    if plain:
        _name_plain(names, plain, headers[plain_rows, :100])
    if damage is not None:
        if strict:
            raise damage from None
        keep = int(np.searchsorted(np.asarray(offsets, dtype=np.int64), damage.offset))
        names, offsets, sizes = names[:keep], offsets[:keep], sizes[:keep]
    return TarIndex(
        source=source,
        names=names,
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
        damage=damage,
        skipped=skipped,
        ends_marked=ends_marked or damage is not None,
        data_after_end=data_after_end if damage is None else None,
        cut_member=cut_member,
    )


_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def _sparse(source: str, pos: int, name: str | None) -> TarFormatError:
    return TarFormatError(
        source,
        pos,
        f"sparse member {name!r} (cannot be read by byte range; re-create the tar without "
        f"--sparse)",
    )


_CHUNK = 1 << 20


def _data_after(buffer, end: int) -> int | None:
    """The offset of the first non-zero byte from ``end`` on (past the end-of-archive
    blocks and the zero padding to the tar's record size), or None; reads 1 MiB at a time."""
    view = np.frombuffer(buffer, dtype=np.uint8)
    found = None
    for start in range(end, len(view), _CHUNK):
        # ndarray.nonzero, not np.flatnonzero: a Python-level function whose frame (held a
        # moment by, say, a Dask worker's profiler) would keep a view of the mmap alive
        nonzero = view[start : start + _CHUNK].nonzero()[0]
        if len(nonzero):
            found = start + int(nonzero[0])
            break
    del view  # release the buffer export so an mmap can be closed
    return found


def _refuse_compressed(buffer, source: str) -> None:
    head = bytes(buffer[:6])
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise CompressedTarError(
                f"{source}: this shard is {kind}-compressed; dask_imgcurate reads members by "
                f"byte range and needs an uncompressed .tar (decompress it first)"
            )


def _walk_plain(
    buffer, pos: int, end: int, header_starts: list[int], sizes: list[int], stop: int | None = None
) -> int:
    """Walk the run of plain members from ``pos`` (regular files, octal size, no ustar
    prefix: nearly every WebDataset member) appending their header offsets and sizes; stop
    at anything else (end of archive, extended headers, damage) for ``scan_tar``'s general
    loop, or at the first header at or after ``stop``, and return where. Names are read
    afterwards, for all at once."""
    add_header, add_size = header_starts.append, sizes.append
    stop = end if stop is None else stop
    while pos + BLOCK <= end and pos < stop:
        if buffer[pos] == 0 or buffer[pos + 156] not in _PLAIN_TYPES:
            break
        if buffer[pos + 135] not in (0, 32) or buffer[pos + 345] != 0:
            break
        try:
            size = int(buffer[pos + 124 : pos + 135], 8)
        except ValueError:
            break
        data = pos + BLOCK
        if size < 0 or data + size > end:  # int() accepts a sign: "-0000001130"
            break
        add_header(pos)
        add_size(size)
        pos = data + ((size + BLOCK - 1) & ~(BLOCK - 1))
    return pos


RELEASE_EVERY = 4 << 20
"""Bytes of a memory-mapped tar scanned between releases of its pages behind the scan (as
fast as keeping them mapped here; releasing every 16 – 64 MB was 20 % slower, the page
tables then cold in the CPU's caches)."""


class _ReleasedPages:
    """Keeps a memory-mapped tar's resident pages to about ``RELEASE_EVERY`` bytes while
    ``scan_tar`` walks it (else the whole tar would be resident, counted in the process's
    RSS, which Dask's memory monitor reads): ``release(pos)`` copies the header blocks found
    so far and drops the pages before ``pos`` from the mapping (the page cache keeps them).
    Other buffers are left alone."""

    def __init__(self, buffer, header_starts: list[int]):
        self.buffer, self.header_starts = buffer, header_starts
        self.next_release = RELEASE_EVERY if isinstance(buffer, mmap.mmap) else len(buffer) + 1
        self.copied: list[np.ndarray] = []  # header blocks copied before a release
        self.done = 0  # header_starts copied
        self.released = 0  # bytes of the mapping released

    def release(self, pos: int) -> None:
        self.copied.append(_header_blocks(self.buffer, self.header_starts[self.done :]))
        self.done = len(self.header_starts)
        end = pos - pos % mmap.PAGESIZE
        if end > self.released:
            self.buffer.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end
        self.next_release = pos + RELEASE_EVERY

    def header_blocks(self) -> np.ndarray:
        """Every header block found, in order, one row each."""
        rest = _header_blocks(self.buffer, self.header_starts[self.done :])
        return np.concatenate([*self.copied, rest]) if self.copied else rest


def _header_blocks(buffer, header_starts: list[int]) -> np.ndarray:
    """A copy of the header blocks at ``header_starts``, one row each."""
    starts = np.asarray(header_starts, dtype=np.int64)
    view = np.frombuffer(buffer, dtype=np.uint8)
    blocks = view[: len(view) // BLOCK * BLOCK].reshape(-1, BLOCK)
    headers = blocks[starts // BLOCK]
    del view, blocks  # release the buffer export so an mmap can be closed
    return headers


def _name_plain(names: list, plain: list[int], name_fields: np.ndarray) -> None:
    """Set ``names[plain[k]]`` from the 100-byte header name field ``name_fields[k]``."""
    raw = np.ascontiguousarray(name_fields).view("S100").ravel().tolist()
    for i, value in zip(plain, raw):
        try:
            names[i] = value.partition(b"\x00")[0].decode()
        except UnicodeDecodeError:
            names[i] = _text(value)


def _verify_checksums(headers: np.ndarray, header_starts: list[int], source: str) -> None:
    """Check every header's checksum in one vectorised pass; raise at the first bad one."""
    if not header_starts:
        return
    bad = bad_checksums(headers)
    if len(bad):
        starts = np.asarray(header_starts, dtype=np.int64)
        raise TarFormatError(source, int(starts[bad[0]]), "corrupt tar header (bad checksum)")


def bad_checksums(headers: np.ndarray) -> np.ndarray:
    """Rows of ``headers`` (uint8, one 512-byte header block each) whose checksum field
    matches neither the unsigned nor the (old writers') signed byte sum."""
    chk = headers[:, 148:156].astype(np.int64)
    expected = np.zeros(len(headers), dtype=np.int64)
    is_digit = (chk >= 48) & (chk <= 55)
    for col in range(8):
        expected = np.where(is_digit[:, col], expected * 8 + chk[:, col] - 48, expected)
    unsigned = headers.sum(axis=1, dtype=np.uint32).astype(np.int64) - chk.sum(axis=1) + 8 * 32
    mismatch = np.flatnonzero(expected != unsigned)
    if not len(mismatch):
        return mismatch
    rows = headers[mismatch].view(np.int8).astype(np.int64)
    signed = rows.sum(axis=1) - rows[:, 148:156].sum(axis=1) + 8 * 32
    return mismatch[expected[mismatch] != signed]

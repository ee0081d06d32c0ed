"""Tar header encoders: byte-equal to a plain reference encoder and to ``tarfile``."""

from __future__ import annotations

import io
import random
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from dask_imgcurate.io.tarwrite import (
    MTIME,
    header_length,
    header_lengths,
    member_header,
    member_headers,
    pax_record,
    ustar_header,
)

HUGE = 8**11  # the first size that needs GNU base-256


def reference_ustar(name: bytes, size: int, typeflag: bytes = b"0") -> bytes:
    """The ustar layout, field by field (checksum summed over the filled block)."""
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:124] = b"0000644\x00" + b"0000000\x00" * 2
    if size < HUGE:
        header[124:136] = b"%011o\x00" % size
    else:
        header[124:136] = b"\x80" + size.to_bytes(11, "big")
    header[136:148] = b"%011o\x00" % MTIME
    header[148:156] = b" " * 8
    header[156:157] = typeflag
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def reference_member(name: str, size: int) -> bytes:
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= 100:
        return reference_ustar(encoded, size)
    record = pax_record("path", name)
    short = encoded[:100].decode("utf-8", "ignore").encode()
    pax = reference_ustar(b"PaxHeaders/" + short[:89], len(record), b"x")
    return pax + record + bytes(-len(record) % 512) + reference_ustar(short, size)


def random_cases(n: int) -> list[tuple[str, int]]:
    rng = random.Random(0)
    alphabet = "ab/._-09 éßкир画像😀"
    cases = []
    for _ in range(n):
        length = rng.choice([0, 1, 13, 50, 98, 99, 100, 101, 120, 300, 700])
        name = "".join(rng.choice(alphabet) for _ in range(length))
        size = rng.choice(
            [0, 1, 511, 512, 513, rng.randrange(HUGE), HUGE - 1, HUGE, rng.randrange(HUGE, 2**88)]
        )
        cases.append((name, size))
    return cases


def test_member_header_matches_reference_encoder():
    for name, size in random_cases(20000):
        assert member_header(name, size) == reference_member(name, size), (name, size)


@pytest.mark.parametrize("typeflag", [b"0", b"x"])
def test_ustar_header_matches_reference_encoder(typeflag):
    for name in (b"", b"a", b"\xff" * 100, "画像.jpg".encode()):
        for size in (0, 777, HUGE - 1, HUGE, 2**88 - 1):
            assert ustar_header(name, size, typeflag) == reference_ustar(name, size, typeflag)
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        ustar_header(b"a" * 101, 0)


def test_short_names_match_tarfile_ustar():
    for name, size in random_cases(3000):
        if len(name.encode()) > 100 or size >= HUGE:
            continue
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, MTIME, 0o644, "", ""
        assert member_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8"), name


@pytest.mark.parametrize(
    ("name", "size"),
    [("d" * 120 + ".jpg", 5), ("é" * 60 + ".txt", 3), ("画像" * 17, 0), ("x.npy", HUGE + 3)],
)
def test_tarfile_reads_long_names_and_huge_sizes(name, size):
    header = member_header(name, size)
    data = b"z" * min(size, 7)
    if size > len(data):  # a huge member: check the header only
        assert tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").size == size
        return
    blob = header + data + bytes(-len(data) % 512) + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.size, tar.extractfile(member).read()) == (name, size, data)


def test_member_headers_match_member_header_and_header_lengths():
    names = ["a.jpg", "x" * 100, "y" * 101 + ".jpg", "ü/é.txt", "画" * 40 + ".json", "", "big.bin"]
    sizes = np.array([0, 1, 12345, 8**11 - 1, 77, 5, 8**11], dtype=np.int64)
    headers, starts = member_headers(pa.array(names), sizes)
    expected = [member_header(n, int(s)) for n, s in zip(names, sizes)]
    assert bytes(headers) == b"".join(expected)
    assert np.diff(starts).tolist() == [len(h) for h in expected]
    name_bytes = np.array([len(n.encode()) for n in names])
    assert header_lengths(name_bytes).tolist() == [len(h) for h in expected]
    for n in range(95, 700, 7):  # the pax record's length digits change along the way
        assert header_length(n) == len(member_header("n" * n, 1))

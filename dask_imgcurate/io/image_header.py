"""Image dimensions from the first bytes of encoded data, without decoding.

Used to refuse decompression bombs (a few KB of PNG or JPEG that decode to gigabytes)
before a decoder allocates their pixels. JPEG, PNG, GIF and WebP headers are parsed
here in microseconds; other formats go through PIL's lazy ``Image.open`` (headers only).
``decoder_reads_header`` asks DALI's own parser (nvImageCodec) whether it reads a header;
``dali_lacks_decoder`` names the formats DALI cannot decode at all.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import warnings

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic ...): not DHT
# (C4), JPG (C8) or DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length


def image_dimensions(data) -> tuple[int, int] | None:
    """``(width, height)`` declared by an encoded image's header, or None when the data is
    not an image this function or PIL recognises (or its header is cut short). Raises
    ``ImageTooLarge`` where PIL refuses to read a size beyond twice its own pixel limit."""
    data = memoryview(data).cast("B")  # bytes, or a uint8 array: indexing gives ints
    head = bytes(data[:32])
    try:
        if head.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
    except (struct.error, IndexError):
        return None
    return _pil(data)


def _jpeg(data) -> tuple[int, int] | None:
    data = bytes(data)
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:  # extraneous bytes before a marker: libjpeg skips them
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE or marker == 0x00:  # 0x00: a stuffed 0xFF, no marker
            pos += 2
            continue
        if marker in _SOF:
            if pos + 9 > end:
                return None
            height, width = struct.unpack(">HH", bytes(data[pos + 5 : pos + 9]))
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit sizes minus one
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _pil(data) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(BufferFile(data)).size
    except Image.DecompressionBombError as err:  # PIL's own limit: report it as a size
        raise ImageTooLarge(pillow_limit_message(err)) from None
    except Exception:  # noqa: BLE001 - not an image PIL knows: the decoder will say
        return None


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def pillow_limit_message(err: Exception) -> str:
    """What Pillow's ``DecompressionBombError`` ``err`` means here: Pillow's own limit (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``) refused the image, whatever ``max_image_pixels`` says."""
    match = _BOMB_PIXELS.search(str(err))
    size = f"{match.group(1)} pixel image" if match else "image"
    limit = f" of {match.group(2)} pixels" if match else ""
    return (
        f"{size} refused by Pillow's own limit{limit} (2 x PIL.Image.MAX_IMAGE_PIXELS); "
        "raise PIL.Image.MAX_IMAGE_PIXELS where images are decoded to allow it"
    )


def decoder_reads_header(data) -> bool:
    """Whether nvImageCodec, the library DALI decodes with, parses the header of encoded
    ``data`` (bytes or a uint8 array; not copied). True where its Python package is missing."""
    nvimgcodec = _nvimgcodec()
    if nvimgcodec is None:
        return True
    try:
        return nvimgcodec.CodeStream(data).width > 0  # parsing is lazy: reading a field parses
    except RuntimeError:  # "Failed to get image info"
        return False


def dali_lacks_decoder(data) -> bool:
    """Whether encoded ``data`` is a GIF or an ISO base media file (AVIF, HEIC): formats
    DALI has no decoder for."""
    head = bytes(memoryview(data).cast("B")[:12])
    return head[:6] in (b"GIF87a", b"GIF89a") or head[4:8] == b"ftyp"


@functools.cache
def _nvimgcodec():
    try:
        from nvidia import nvimgcodec
    except ImportError:  # DALI without the nvidia-nvimgcodec package
        return None
    return nvimgcodec


class BufferFile(io.RawIOBase):
    """A read-only file over a buffer (bytes, a uint8 array), without copying it as
    ``io.BytesIO`` copies anything but bytes: PIL reads a header, not the whole image."""

    def __init__(self, data) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if start + offset < 0:
            raise ValueError(f"negative seek position {start + offset}")
        self._pos = start + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class ImageTooLarge(ValueError):
    """An image refused for its size before its pixels are decoded (by Pillow's own limit,
    or by the reader's ``max_image_pixels``)."""

"""Image dimensions read from headers equal what PIL decodes, for every format we parse."""

from __future__ import annotations

import io

import numpy as np
import pytest
from compute_helpers import synthetic_image
from PIL import Image

from dask_imgcurate.io.image_header import ImageTooLarge, image_dimensions

SIZE = (173, 91)  # odd, non-square, distinct per axis


def encoded(fmt: str, mode: str = "RGB", size=SIZE, **save) -> bytes:
    buffer = io.BytesIO()
    synthetic_image(3, size, mode).save(buffer, fmt, **save)
    return buffer.getvalue()


def exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 20000  # a 20 KB APP1 segment before the frame header
    exif[0x0112] = 6  # rotated: the header's size is still the stored one
    return encoded("JPEG", exif=exif.tobytes())


CASES = {
    "jpeg": lambda: encoded("JPEG"),
    "jpeg-progressive": lambda: encoded("JPEG", progressive=True),
    "jpeg-gray": lambda: encoded("JPEG", "L"),
    "jpeg-cmyk": lambda: encoded("JPEG", "CMYK"),
    "jpeg-exif": exif_jpeg,
    "png": lambda: encoded("PNG"),
    "png-rgba": lambda: encoded("PNG", "RGBA"),
    "png-palette": lambda: encoded("PNG", "P"),
    "png-16bit": lambda: encoded("PNG", "I;16"),
    "gif": lambda: encoded("GIF", "P"),
    "webp-lossy": lambda: encoded("WEBP", quality=80),
    "webp-lossless": lambda: encoded("WEBP", lossless=True),
    "webp-alpha": lambda: encoded("WEBP", "RGBA", quality=80),  # extended (VP8X)
    "tiff": lambda: encoded("TIFF"),  # through PIL
    "bmp": lambda: encoded("BMP"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dimensions_match_pil(name):
    data = CASES[name]()
    want = Image.open(io.BytesIO(data)).size
    assert want == SIZE
    assert image_dimensions(data) == want
    assert image_dimensions(np.frombuffer(data, dtype=np.uint8)) == want  # as readers hold it


def test_large_and_odd_sizes():
    for size in [(1, 1), (16383, 2), (2, 16383)]:
        for fmt in ("JPEG", "PNG", "WEBP"):
            data = encoded(fmt, size=size)
            assert image_dimensions(data) == size, (fmt, size)


def test_not_images_or_cut_short():
    jpeg = CASES["jpeg-exif"]()
    for data in [b"", b"not an image at all", jpeg[:100], b"\xff\xd8\xff", b"\x89PNG\r\n"]:
        assert image_dimensions(data) is None


def test_beyond_pils_own_limit_is_an_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so a small TIFF is "a bomb" to PIL
    with pytest.raises(ImageTooLarge) as raised:
        image_dimensions(encoded("TIFF"))
    assert str(raised.value) == (
        "15743 pixel image refused by Pillow's own limit of 2000 pixels "
        "(2 x PIL.Image.MAX_IMAGE_PIXELS); raise PIL.Image.MAX_IMAGE_PIXELS where images are "
        "decoded to allow it"
    )
    assert image_dimensions(encoded("PNG")) == SIZE  # parsed here: no PIL limit involved


def test_jpeg_bytes_before_a_marker_are_skipped_as_libjpeg_does():
    """Junk between segments (which libjpeg and PIL skip) must not hide the frame header: it
    would let a decompression bomb past ``max_image_pixels``."""
    jpeg = CASES["jpeg-exif"]()
    app0_end = 4 + (jpeg[4] << 8 | jpeg[5])
    for junk in (b"\x00\x00", b"junk", b"\xff\x00"):
        data = jpeg[:app0_end] + junk + jpeg[app0_end:]
        assert Image.open(io.BytesIO(data)).size == SIZE
        assert image_dimensions(data) == SIZE, junk
    assert image_dimensions(jpeg[:app0_end] + b"\x00" * 64) is None  # no marker follows

"""The PIL fallback for images DALI cannot decode (e.g. GIF data behind a ``.png`` name):
it checks ``max_image_pixels`` on the size PIL reads before decoding, keeps the high byte of
16-bit greyscale (as DALI does) and refuses 32-bit integer and floating-point samples, whose
range is unknown."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from dask_imgcurate.io.image_header import BufferFile, ImageTooLarge, pillow_limit_message
from dask_imgcurate.io.pixel_limits import oversize_reason

if TYPE_CHECKING:
    from dask_imgcurate.io.preprocess import PreprocessSpec


def pil_decode(data, limit: int | None, spec: PreprocessSpec) -> np.ndarray:
    """HWC uint8 RGB pixels of ``data`` (bytes or a uint8 array, not copied) decoded by
    PIL, EXIF orientation applied. Raises ``ImageTooLarge`` before decoding an image over
    ``limit`` pixels (as ``oversize_reason``) or over Pillow's own limit; ``ValueError`` for
    pixel formats of unknown range (32-bit integer, float)."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():  # the limit that applies is ``limit``
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(BufferFile(data))
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(pillow_limit_message(err)) from None
    with opened as im:
        reason = None if limit is None else oversize_reason(*im.size, limit, spec)
        if reason is not None:
            raise ImageTooLarge(reason)
        sixteen_bits = _sixteen_bits(im)
        unknown = _unknown_range(im)
        if unknown is not None:
            raise ValueError(unknown)
        im.load()
        im = ImageOps.exif_transpose(im)
        if sixteen_bits:
            return _grey16_to_rgb(np.asarray(im))
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF


def float_tiff_reason(data) -> str | None:
    """``pil_decode``'s error for a TIFF of floating-point samples ``data``, from its header
    (DALI decodes them as if in [0, 1], but their range is unknown); None for other data."""
    if bytes(memoryview(data).cast("B")[:4]) not in _TIFF_MAGIC:
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BufferFile(data)) as im:
                return _unknown_range(im) if im.mode == "F" else None
    except Exception:  # noqa: BLE001 - not a TIFF PIL reads: the decoders will say
        return None


def _unknown_range(im) -> str | None:
    """Why the samples of opened (not loaded) image ``im`` have no known range: 32-bit
    integer or floating-point; None when they have one."""
    if im.mode not in ("I", "F") or _sixteen_bits(im):
        return None
    kind = "floating-point" if im.mode == "F" else "32-bit or signed integer"
    return f"unsupported pixel format: {kind} samples (mode {im.mode})"


def _sixteen_bits(im) -> bool:
    """Whether opened (not loaded) image ``im`` holds unsigned 16-bit samples."""
    return im.mode.startswith("I;16") or (im.mode == "I" and _holds_16_bits(im))


_UINT16_RAWMODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def _holds_16_bits(im) -> bool:
    """Whether mode ``I`` image ``im`` holds unsigned 16-bit samples, by what PIL decodes it
    from (call before ``load()``, which drops its tiles): a 16-bit raw mode (a 16-bit PNG in
    older Pillows, a 16-bit PNM) or PNM's decoder, which scales any maxval to 16 bits."""
    if not im.tile:
        return False
    codec, args = im.tile[0][0], im.tile[0][3]
    rawmode = args if isinstance(args, str) else (args[0] if args else None)
    return codec in ("ppm", "ppm_plain") or rawmode in _UINT16_RAWMODES


def _grey16_to_rgb(grey: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB of 16-bit grey samples: their high byte, as DALI decodes 16-bit PNGs."""
    high = (np.clip(grey, 0, 0xFFFF).astype(np.uint16) >> 8).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(high[:, :, None], 3, axis=2))

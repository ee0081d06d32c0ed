"""Images refused before decoding: decompression bombs, and extreme aspect ratios whose
resize would allocate gigabytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dask_imgcurate.io.image_header import ImageTooLarge, image_dimensions
from dask_imgcurate.io.reasons import short

if TYPE_CHECKING:
    from dask_imgcurate.io.preprocess import PreprocessSpec

# Images declaring more pixels are refused before decoding (decompression bombs): PIL's
# default Image.MAX_IMAGE_PIXELS, 89.5 megapixels (a 9459 x 9459 image).
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def oversized(data: np.ndarray, limit: int, spec: PreprocessSpec) -> str | None:
    """Why the image ``data`` is refused before a decoder or a resize allocates its pixels:
    its header declares more than ``limit`` pixels, or it resizes to more (``spec``:
    extreme aspect ratios); None when it is not."""
    try:
        size = image_dimensions(data)
    except ImageTooLarge as err:
        return short(str(err))
    return None if size is None else oversize_reason(*size, limit, spec)


def oversize_reason(width: int, height: int, limit: int, spec: PreprocessSpec) -> str | None:
    """Why a ``width`` x ``height`` image is refused under ``limit`` pixels, counting its
    resize (``spec``) before the center crop; None when it is not."""
    if width * height > limit:
        return (
            f"{width}x{height} image ({megapixels(width * height)} MP) exceeds "
            f"max_image_pixels={limit}"
        )
    resized = spec.resized_pixels(width, height)
    if resized > limit:
        return (
            f"{width}x{height} image would resize to {megapixels(resized)} MP before its "
            f"center crop (aspect ratio {max(width, height) / max(min(width, height), 1):.0f}:1), "
            f"over max_image_pixels={limit}"
        )
    return None


def megapixels(pixels: float) -> str:
    """``pixels`` in megapixels: whole from 100 MP, else to 3 significant digits."""
    mp = pixels / 1e6
    if mp >= 100:
        return f"{mp:.0f}"
    return np.format_float_positional(mp, precision=3, fractional=False, trim="-")

"""The model input transform (``PreprocessSpec``, from an open_clip model's preprocess
config) as a DALI pipeline: ``fn.external_source`` (encoded bytes, or pixels a fallback
decoded, plus a row id per sample) -> ``fn.decoders.image`` (``"mixed"`` on CUDA, ``"cpu"``
with ``device_id=None`` otherwise) -> ``fn.resize`` -> ``fn.slice`` (center crop / pad) ->
``fn.crop_mirror_normalize``. Built pipelines are pooled per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessSpec:
    """Model input preprocessing: output ``size`` (H, W), per-channel ``mean``/``std`` in [0, 1]."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = _OPENAI_MEAN
    std: tuple[float, float, float] = _OPENAI_STD
    interpolation: str = "bicubic"  # or "bilinear"
    resize_mode: str = "shortest"  # "shortest" (resize + center crop), "longest" (+ pad), "squash"
    fill_color: int = 0  # padding value for resize_mode="longest"

    def resized_pixels(self, width: int, height: int) -> float:
        """Pixels of a ``width`` x ``height`` image once resized, before the crop: for
        "shortest", the short side becomes the model's, so an image of extreme aspect ratio
        (1 x 100000) grows to gigabytes however few pixels it declares."""
        out_h, out_w = self.size
        if self.resize_mode != "shortest" or not width or not height:
            return float(out_h * out_w)
        ratio = min(height / out_h, width / out_w)
        return width * height / ratio**2

    def __post_init__(self) -> None:
        if self.interpolation not in ("bicubic", "bilinear", "random"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r}")

    @classmethod
    def from_open_clip(cls, model_or_cfg: Any) -> PreprocessSpec:
        """Spec from an open_clip model (its ``visual.preprocess_cfg``) or such a dict."""
        if isinstance(model_or_cfg, dict):
            cfg = model_or_cfg
        else:
            import open_clip

            cfg = open_clip.get_model_preprocess_cfg(model_or_cfg)
        size = cfg.get("size", 224)
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)[-2:]

        def triple(v: Any, default: tuple[float, ...]) -> tuple[float, float, float]:
            v = default if v is None else v
            v = (v,) * 3 if isinstance(v, (int, float)) else tuple(v)
            return tuple(float(x) for x in v)  # type: ignore[return-value]

        return cls(
            size=size,  # type: ignore[arg-type]
            mean=triple(cfg.get("mean"), _OPENAI_MEAN),
            std=triple(cfg.get("std"), _OPENAI_STD),
            interpolation=cfg.get("interpolation") or "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill_color=int(cfg.get("fill_color") or 0),
        )


def build_pipeline(
    spec: PreprocessSpec, device_id: int | None, batch_size: int, num_threads: int, raw: bool
):
    """A DALI pipeline: encoded bytes (or, with ``raw``, HWC uint8 pixels) -> CHW float32."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    gpu = device_id is not None
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_dynamic=True,  # _preprocess reads GPU outputs' shapes (older DALIs: not default)
    )
    with pipe:
        ids = fn.external_source(name="ids", dtype=types.INT64, ndim=1)
        if raw:
            images = fn.external_source(name="data", dtype=types.UINT8, ndim=3, layout="HWC")
            if gpu:
                images = images.gpu()
        else:
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(
                data,
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                jpeg_fancy_upsampling=True,  # what libjpeg (PIL) does by default
            )
        pipe.set_outputs(_preprocess(images, spec), ids)
    pipe.build()
    return pipe


def _preprocess(images, spec: PreprocessSpec):
    """DALI ops reproducing open_clip's eval transform geometry exactly, then normalising.

    The output size and the crop/pad offsets are computed per sample from the decoded shape
    with torchvision's integer arithmetic (``Resize``: long side ``int(S * long / short)``;
    ``CenterCrop``: offset ``int(round((n - S) / 2))``, half to even), because DALI's own
    ``resize_shorter`` / ``crop_pos`` round differently and shift some images by a pixel.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    out_h, out_w = spec.size
    shape = images.shape(dtype=types.FLOAT64)
    h, w = shape[0], shape[1]

    def _round_half_even(x):  # Python's round()
        r = dmath.floor(x + 0.5)
        return r - ((x + 0.5) == r) * ((r - 2 * dmath.floor(r / 2)) == 1)

    if spec.resize_mode == "squash":
        new_h, new_w = h * 0 + out_h, w * 0 + out_w
    elif spec.resize_mode == "shortest" and out_h == out_w:
        # torchvision Resize(int): short side -> S, long side -> int(S * long / short)
        portrait = w <= h
        new_long = dmath.floor(out_h * dmath.max(h, w) / dmath.min(h, w))
        new_w = portrait * out_w + (1 - portrait) * new_long
        new_h = portrait * new_long + (1 - portrait) * out_h
    else:
        # open_clip ResizeKeepRatio: scale by the min ("shortest") or max ("longest") ratio
        ratio_h, ratio_w = h / out_h, w / out_w
        pick = dmath.max if spec.resize_mode == "longest" else dmath.min
        ratio = pick(ratio_h, ratio_w)
        new_h, new_w = _round_half_even(h / ratio), _round_half_even(w / ratio)

    def offset(n, target: int):
        # torchvision center_crop (pads first when the image is smaller than the target)
        d = n - target
        crop = dmath.floor(d / 2) + ((d - 4 * dmath.floor(d / 4)) == 3)  # round(d / 2), half even
        pad = -dmath.floor(-d / 2)  # -(target - n) // 2
        fits = d >= 0
        return fits * crop + (1 - fits) * pad

    interp = types.INTERP_LINEAR if spec.interpolation == "bilinear" else types.INTERP_CUBIC
    images = fn.resize(
        images,
        resize_x=fn.cast(new_w, dtype=types.FLOAT),
        resize_y=fn.cast(new_h, dtype=types.FLOAT),
        interp_type=interp,
        antialias=True,
    )
    if spec.resize_mode != "squash":
        anchor = fn.cast(fn.stack(offset(new_h, out_h), offset(new_w, out_w)), dtype=types.FLOAT)
        size = fn.cast(fn.stack(h * 0 + out_h, w * 0 + out_w), dtype=types.FLOAT)
        images = fn.slice(
            images,
            anchor,
            size,
            axis_names="HW",
            normalized_anchor=False,
            normalized_shape=False,
            out_of_bounds_policy="pad",
            fill_values=[float(spec.fill_color)] * 3,
        )
    return fn.crop_mirror_normalize(
        images,
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


class PipelinePool:
    """Process-wide free lists of built pipelines, so partitions reuse them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple, list] = {}

    def acquire(self, key: tuple):
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return build_pipeline(*key)

    def release(self, key: tuple, pipe) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(pipe)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


POOL = PipelinePool()


def clear_pipeline_cache() -> None:
    """Drop the cached DALI pipelines of this process."""
    POOL.clear()

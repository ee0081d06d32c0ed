"""Short failure reasons for the per-record error texts of image reading, and which
failures are the machine's rather than an image's."""

from __future__ import annotations

import re

from dask_imgcurate.errors import DecoderUnavailable

_DALI_REASON = re.compile(r"encountered:\s*(.*?)\s*(?:Current pipeline object|$)", re.S)
OBJECT_REPR = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")


def short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# nvimgcodecStatus_t values (nvimgcodec.h) in DALI decoder errors ("nvImageCodec failure: '#4'")
_NVIMGCODEC_STATUS = {
    2: "invalid parameter",
    3: "bad code stream",
    4: "unsupported or unrecognised image format",
    5: "allocator failure",
    6: "execution failed",
    17: "codec extension internal error",  # e.g. a PNG cut short
}
UNSUPPORTED_FORMAT = _NVIMGCODEC_STATUS[4]
_STATUS_RE = re.compile(r"nvImageCodec failure: '#(\d+)'")
_SAMPLE_RE = re.compile(r"Failed to decode sample #\d+\s*:?\s*")


def dali_reason(err: BaseException) -> str:
    """A short reason from a DALI pipeline error (the text after "encountered:")."""
    message = str(err)
    match = _DALI_REASON.search(message)
    reason = match.group(1) if match and match.group(1).strip() else message.splitlines()[0]
    reason = _STATUS_RE.sub(
        lambda m: _NVIMGCODEC_STATUS.get(int(m.group(1)), f"nvImageCodec status {m.group(1)}"),
        reason,
    )
    reason = _SAMPLE_RE.sub("failed to decode image data ", reason)
    reason = reason.strip().rstrip(":").strip()
    return short(reason or type(err).__name__)


def machine_failure(err: BaseException) -> bool:
    """Whether a decoding failure is the machine's (no pipeline, memory, CUDA), not an
    image's."""
    if isinstance(err, (DecoderUnavailable, MemoryError)) or type(err).__name__ in (
        "OutOfMemoryError",  # torch.OutOfMemoryError
        "AcceleratorError",  # torch's CUDA errors
    ):
        return True
    text = str(err).lower()
    return any(s in text for s in ("out of memory", "cuda error", "cudaerror", "cuda driver"))

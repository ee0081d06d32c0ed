"""Decode and preprocess the images of a metadata partition with NVIDIA DALI.

Design
------
Encoded bytes come from one of two *sources*, then go through one *decode pipeline*:

* ``source="range"`` (default): the bytes of each image are read by byte range
  (``_shard``, ``_image_offset``, ``_image_size`` from the metadata frame) through fsspec:
  ``pread`` locally, ``cat_ranges`` on object stores. Only the rows of the partition are
  read, so a filtered frame costs only its own images, and remote shards work.
* ``source="webdataset"``: DALI's ``fn.readers.webdataset`` reads local shards (with the
  shard's ``.idx`` sibling when one exists). The reader has no key output, but every sample
  it returns carries ``source_info()`` ``"<tar path>:<data offset>:<member name>"``; rows
  are matched on that data offset against ``_image_offset`` (and the member name against
  ``_image_member``). The reader always reads whole shards, wraps around at the end of an
  epoch (duplicates are dropped) and only serves local files; rows it does not return
  (remote shards, images it groups differently, any row after the reader itself fails,
  e.g. on a damaged tar) are read by byte range instead.

The decode pipeline is ``fn.external_source`` (encoded bytes + a row id per sample) ->
``fn.decoders.image`` (``"mixed"`` on CUDA, ``"cpu"`` with ``device_id=None`` otherwise) ->
``fn.resize`` -> ``fn.slice`` (center crop / pad) -> ``fn.crop_mirror_normalize``. Decoding is deliberately *not* chained to
``fn.readers.webdataset`` in one pipeline: an undecodable image fails the whole DALI batch
("Critical error in pipeline ... Current pipeline object is no longer valid"), and a reader
that has already moved on cannot say which samples were lost. With ``external_source`` the
caller knows every sample it fed, so a failed batch is retried one sample at a time (each
failure discards the pipeline and builds a fresh one) and only the bad images are lost.
Samples whose header nvImageCodec (DALI's decoding library) cannot parse never join a batch:
in one of about 30 or more, DALI 2.4 can crash the process on them (SIGSEGV).
Images DALI cannot decode (e.g. GIF data behind a ``.png`` name) are retried with PIL when
``pil_fallback`` is on (:mod:`~dask_imgcurate.io.pil_decode`) and then resized and
normalised by the same DALI ops (:mod:`~dask_imgcurate.io.preprocess`). Images too large
to decode are refused first (:mod:`~dask_imgcurate.io.pixel_limits`).
Floating-point TIFFs are refused too: DALI decodes them as if their samples were in [0, 1].

Row ids travel through the pipeline next to the pixels and are checked on the way out;
callers match results to metadata rows by key, never by position. Preprocessing follows
the open_clip model's preprocess config (size, mean, std, interpolation, resize mode) so
that it matches open_clip's own torchvision eval transform: resize (shortest side by
default, antialiased), center crop, scale to [0, 1], normalise. Output sizes and crop
offsets use torchvision's integer arithmetic, so only the resampling kernels differ
(mean absolute difference about 0.002 in normalised units on test images). Like open_clip it converts
to RGB; unlike plain PIL it honours EXIF orientation (DALI does; the PIL fallback too).

Errors are strings: ``"no image"``, ``"read: <reason>"`` or ``"decode: <reason>"``.
"""

from __future__ import annotations

import contextvars
import logging
import numbers
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from dask_imgcurate.device import dali_decoder_device, dali_device_id, resolve_device
from dask_imgcurate.errors import DecoderUnavailable, RangeRequestsUnsupported
from dask_imgcurate.io import fs as fsio
from dask_imgcurate.io.image_header import (
    ImageTooLarge,
    dali_lacks_decoder,
    decoder_reads_header,
)
from dask_imgcurate.io.pil_decode import float_tiff_reason, pil_decode
from dask_imgcurate.io.pixel_limits import MAX_IMAGE_PIXELS, oversized
from dask_imgcurate.io.preprocess import POOL, PreprocessSpec, clear_pipeline_cache
from dask_imgcurate.io.reasons import (
    OBJECT_REPR,
    UNSUPPORTED_FORMAT,
    dali_reason,
    machine_failure,
    short,
)
from dask_imgcurate.io.shards import check_unchanged, version_type_error

__all__ = [  # PreprocessSpec, MAX_IMAGE_PIXELS, clear_pipeline_cache: imported from here too
    "EMPTY_IMAGE",
    "MAX_IMAGE_PIXELS",
    "NO_IMAGE",
    "DaliImageReader",
    "ImageBatch",
    "PreprocessSpec",
    "check_reader_options",
    "clear_pipeline_cache",
    "is_reader_error",
]

log = logging.getLogger(__name__)

NO_IMAGE = "no image"
EMPTY_IMAGE = "decode: empty image data"  # a zero-byte member, with either source
SOURCES = ("range", "webdataset")
MAX_THREADS = 1024  # DALI threads per pipeline (far more abort the process)
_LISTED = "a file of this shard, listed when the dataset was loaded"  # a tar gone since


@dataclass
class ImageBatch:
    """Preprocessed images ``(N, 3, H, W)`` float32 for ``keys``; ``errors`` maps key -> reason.

    ``errors`` holds the rows of this batch that produced no image; they are not in ``keys``.
    """

    keys: list[str]
    images: torch.Tensor
    errors: dict[str, str] = field(default_factory=dict)


def is_reader_error(error: str) -> bool:
    """Whether ``error`` is one of the texts this reader records for a row."""
    return error == NO_IMAGE or error.startswith(("read: ", "decode: "))


def check_reader_options(
    batch_size: int, num_threads: int, source: str, prefetch: int, max_image_pixels: int | None
) -> None:
    """Raise ``TypeError`` / ``ValueError`` for the first reader option out of its range
    (the upper bounds: what DALI's C++ takes, and threads a process can start)."""
    for name, value, least, most in (
        ("batch_size", batch_size, 1, 2**31 - 1),
        ("num_threads", num_threads, 1, MAX_THREADS),
        ("prefetch", prefetch, 0, 2**31 - 1),
        ("max_image_pixels", max_image_pixels, 1, None),
    ):
        if value is None and name == "max_image_pixels":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
        if most is not None and value > most:
            raise ValueError(f"{name} must be <= {most}, got {value}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


class DaliImageReader:
    """Read, decode and preprocess the images of metadata partitions with DALI.

    ``device`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (resolved when the
    reader is created, i.e. on the worker). Output tensors live on that device.
    ``prefetch`` batches are read and decoded ahead in a background thread (0: inline).
    Images whose headers declare more than ``max_image_pixels`` pixels (default: PIL's
    limit, 89.5 MP; None: no limit) are refused before decoding, as per-row errors.
    """

    def __init__(
        self,
        preprocess: PreprocessSpec,
        *,
        batch_size: int = 256,
        num_threads: int = 4,
        device: str | torch.device = "auto",
        source: str = "range",
        pil_fallback: bool = True,
        storage_options: dict | None = None,
        prefetch: int = 1,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        check_reader_options(batch_size, num_threads, source, prefetch, max_image_pixels)
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.num_threads = int(num_threads)
        self.device = resolve_device(device)
        self.decoder_device = dali_decoder_device(self.device)
        self.source = source
        self.pil_fallback = pil_fallback
        self.storage_options = dict(storage_options or {})
        self.prefetch = int(prefetch)
        self.max_image_pixels = max_image_pixels
        self._device_id = dali_device_id(self.device)

    # ---- public API

    def iter_batches(self, partition: pd.DataFrame, id_col: str = "key") -> Iterator[ImageBatch]:
        """Yield :class:`ImageBatch` es covering every row of ``partition`` exactly once.

        Each row ends up either in some batch's ``keys`` (with its image) or in some
        batch's ``errors``. Keys in ``partition[id_col]`` must be unique.
        """
        keys = partition[id_col].astype(str).tolist()
        if len(set(keys)) != len(keys):
            dup = pd.Series(keys)[pd.Series(keys).duplicated()].iloc[0]
            raise ValueError(f"{id_col!r} must be unique within a partition; {dup!r} repeats")
        if self.prefetch == 0:
            yield from self._produce(partition, keys)
            return
        yield from _prefetched(self._produce(partition, keys), self.prefetch)

    def read(self, partition: pd.DataFrame, id_col: str = "key") -> ImageBatch:
        """All of ``partition`` as one :class:`ImageBatch` (for small partitions and tests)."""
        keys: list[str] = []
        images: list[torch.Tensor] = []
        errors: dict[str, str] = {}
        for batch in self.iter_batches(partition, id_col):
            keys.extend(batch.keys)
            images.append(batch.images)
            errors.update(batch.errors)
        return ImageBatch(keys, torch.cat(images) if images else self._empty(), errors)

    # ---- encoded bytes

    def _refusal(self, data: np.ndarray) -> str | None:
        """Why an image is refused before decoding (too many pixels; floating-point TIFF,
        which DALI would decode as if in [0, 1]); None when it is not."""
        reason = None
        if self.max_image_pixels is not None:
            reason = oversized(data, self.max_image_pixels, self.preprocess)
        reason = reason or float_tiff_reason(data)
        return None if reason is None else f"decode: {reason}"

    def _produce(self, partition: pd.DataFrame, keys: list[str]) -> Iterator[ImageBatch]:
        for ids, datas, errors in self._encoded_batches(partition):
            batch_errors = {keys[i]: reason for i, reason in errors.items()}
            ids, datas, refused = _refuse(ids, datas, self._refusal)
            batch_errors.update({keys[i]: reason for i, reason in refused.items()})
            if ids:
                out_ids, images, decode_errors = self._decode(ids, datas)
                batch_errors.update({keys[i]: reason for i, reason in decode_errors.items()})
            else:
                out_ids, images = [], self._empty()
            yield ImageBatch([keys[i] for i in out_ids], images, batch_errors)

    def _encoded_batches(
        self, partition: pd.DataFrame
    ) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
        """Yield ``(row ids, encoded images, {row id: error})`` chunks of at most batch_size."""
        n = len(partition)
        offsets = _int_column(partition, "_image_offset")
        sizes = _int_column(partition, "_image_size")
        shards = partition["_shard"].astype(object).to_numpy() if n else np.array([], object)
        members = (
            partition["_image_member"].astype(object).to_numpy()
            if "_image_member" in partition
            else np.full(n, None, dtype=object)
        )
        has_member = "_image_member" in partition
        missing = {
            i: NO_IMAGE
            for i in range(n)
            if offsets[i] < 0 or sizes[i] < 0 or (has_member and _isnull(members[i]))
        }
        missing.update({i: EMPTY_IMAGE for i in range(n) if sizes[i] == 0 and i not in missing})
        if missing:
            yield [], [], missing
        by_shard: dict[str, list[int]] = {}
        for i in range(n):
            if i not in missing:
                by_shard.setdefault(str(shards[i]), []).append(i)
        versions = np.full(n, None, dtype=object)
        if "_shard_version" in partition:
            column = partition["_shard_version"]
            if not pd.api.types.is_integer_dtype(column.dtype) and column.notna().any():
                raise version_type_error(str(column.dtype))
            versions = column.astype(object).to_numpy()
        for shard, rows in by_shard.items():
            self._check_unchanged(shard, {versions[i] for i in rows if not _isnull(versions[i])})
            rows.sort(key=lambda i: offsets[i])  # sequential reads
            if self.source == "webdataset":
                yield from self._webdataset_batches(shard, rows, offsets, sizes, members)
            else:
                yield from self._range_batches(shard, rows, offsets, sizes)

    def _check_unchanged(self, shard: str, indexed: set) -> None:
        """``ShardChangedError`` when the local tar ``shard`` changed since rows at its
        ``indexed`` versions were indexed: their offsets may point at other bytes (not a
        per-row error: the whole frame is stale, and a filter would drop the rows quietly)."""
        if not indexed:
            return
        try:
            fs, path = fsio.url_to_fs(shard, self.storage_options)
            now = os.stat(path) if fsio.is_local(fs) else None
        except OSError:  # e.g. gone: reading says so
            return
        check_unchanged(shard, indexed, now)

    def _range_batches(
        self, shard: str, rows: list[int], offsets: np.ndarray, sizes: np.ndarray
    ) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
        try:
            fs, path = fsio.url_to_fs(shard, self.storage_options)
        except Exception as err:  # noqa: BLE001 - any failure to open is a per-row error
            yield [], [], {i: f"read: {short(str(err) or type(err).__name__)}" for i in rows}
            return
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            try:
                blobs = fsio.read_ranges(fs, path, offsets[chunk], sizes[chunk])
            except RangeRequestsUnsupported:  # the server's, not the rows': stop the run
                raise
            except FileNotFoundError:  # the whole tar: per-row errors would drop it quietly
                with fsio.explain_missing(fs, _LISTED, path):
                    raise
            except Exception as err:  # noqa: BLE001
                yield [], [], {i: f"read: {short(str(err) or type(err).__name__)}" for i in chunk}
                continue
            ids, datas, errors = [], [], {}
            for i, blob in zip(chunk, blobs):
                if len(blob) != sizes[i]:
                    errors[i] = f"read: truncated shard (got {len(blob)} of {sizes[i]} bytes)"
                else:
                    ids.append(i)
                    datas.append(np.frombuffer(blob, dtype=np.uint8))
            yield ids, datas, errors

    def _webdataset_batches(
        self,
        shard: str,
        rows: list[int],
        offsets: np.ndarray,
        sizes: np.ndarray,
        members: np.ndarray,
    ) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
        try:
            fs, path = fsio.url_to_fs(shard, self.storage_options)
            local = fsio.is_local(fs) and os.path.isfile(path)
        except Exception:  # noqa: BLE001 - the byte-range path reports it per row
            local = False
        if not local:
            log.info("%s is not a local file; reading its images by byte range", shard)
            yield from self._range_batches(shard, rows, offsets, sizes)
            return
        by_offset = {int(offsets[i]): i for i in rows}
        seen: set[int] = set()
        pending_ids: list[int] = []
        pending: list[np.ndarray] = []
        try:
            for offset, member, data in _iter_webdataset(path, self.batch_size, self.num_threads):
                i = by_offset.get(offset)
                if i is None or i in seen:
                    continue
                if not _isnull(members[i]) and member and member != members[i]:
                    continue  # same offset, another member: not our image (never expected)
                if len(data) != sizes[i]:
                    continue  # disagrees with the index: let the byte-range path decide
                seen.add(i)
                pending_ids.append(i)
                pending.append(data)
                if len(pending_ids) == self.batch_size:
                    yield pending_ids, pending, {}
                    pending_ids, pending = [], []
        except Exception as err:  # noqa: BLE001 - e.g. a damaged tar: fall back per row
            log.warning(
                "DALI webdataset reader failed on %s (%s); reading by byte range",
                shard,
                dali_reason(err),
            )
        if pending_ids:
            yield pending_ids, pending, {}
        rest = [i for i in rows if i not in seen]
        if rest:
            yield from self._range_batches(shard, rest, offsets, sizes)

    # ---- decoding

    def _empty(self) -> torch.Tensor:
        h, w = self.preprocess.size
        return torch.empty((0, 3, h, w), dtype=torch.float32, device=self.device)

    def _key(self, raw: bool) -> tuple:
        return (self.preprocess, self._device_id, self.batch_size, self.num_threads, raw)

    def _run(self, ids: Sequence[int], datas: Sequence[np.ndarray], raw: bool) -> torch.Tensor:
        """Run one pipeline batch; raise on any failure (the pipeline is then discarded)."""
        key = self._key(raw)
        try:
            pipe = POOL.acquire(key)
        except Exception as err:  # not the images': the machine's (driver, device, memory)
            raise DecoderUnavailable(
                f"cannot build DALI's decoding pipeline on {self.device} "
                f"({short(str(err) or type(err).__name__)})"
            ) from err
        try:
            pipe.feed_input("data", list(datas))
            pipe.feed_input("ids", [np.array([i], dtype=np.int64) for i in ids])
            images, out_ids = pipe.run()
            got = [int(np.asarray(t)[0]) for t in out_ids]
            if got != list(ids):
                raise RuntimeError(f"DALI returned row ids {got}, expected {list(ids)}")
            tensor = self._to_torch(images)
        except BaseException:
            del pipe  # a failed pipeline is not reused
            raise
        POOL.release(key, pipe)
        return tensor

    def _to_torch(self, images) -> torch.Tensor:
        if self._device_id is None:
            return torch.from_numpy(np.array(images.as_tensor(), dtype=np.float32, copy=True))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        feed_ndarray(dense, out, cuda_stream=stream)
        stream.synchronize()
        return out

    def _attempt(
        self, ids: Sequence[int], datas: Sequence[np.ndarray], raw: bool
    ) -> tuple[torch.Tensor | None, str]:
        """``_run``: its tensor, or None and why its images failed. Failures of the machine
        (no pipeline, out of memory, CUDA errors) are raised: they are no image's fault, and
        recorded per record they would drop every record quietly."""
        try:
            return self._run(ids, datas, raw), ""
        except Exception as err:  # noqa: BLE001 - sorted here
            if machine_failure(err):
                raise
            return None, dali_reason(err)

    def _decode(
        self, ids: list[int], datas: list[np.ndarray]
    ) -> tuple[list[int], torch.Tensor, dict[int, str]]:
        """Decode a batch. Samples whose header DALI's parser cannot read are decoded one by
        one (in a batch of about 30 or more, DALI 2.4 can crash the process on one: SIGSEGV),
        and so are all samples of a batch that fails, to isolate the bad ones; GIF and AVIF
        go to the PIL fallback directly (a failed DALI run costs a pipeline rebuild)."""
        readable = [decoder_reads_header(data) for data in datas]
        batch_ids = [i for i, ok in zip(ids, readable) if ok]
        batch = [data for data, ok in zip(datas, readable) if ok]
        images, batch_reason = self._attempt(batch_ids, batch, raw=False) if batch else (None, "")
        if images is None and len(batch) > 1:
            log.debug("DALI batch of %d failed (%s); retrying one by one", len(batch), batch_reason)
        ok_ids = batch_ids if images is not None else []
        tensors = [images] if images is not None else []
        errors: dict[int, str] = {}
        for i, data, ok in zip(ids, datas, readable):
            if ok and images is not None:
                continue
            failed = batch_reason if ok and len(batch) == 1 else None  # already run alone
            if not ok and dali_lacks_decoder(data):  # a run alone would fail: skip it
                failed = UNSUPPORTED_FORMAT
            tensor, error = self._decode_one(i, data, failed)
            if tensor is None:
                errors[i] = error
            else:
                tensors.append(tensor)
                ok_ids.append(i)
        return ok_ids, torch.cat(tensors) if tensors else self._empty(), errors

    def _decode_one(
        self, i: int, data: np.ndarray, failed: str | None
    ) -> tuple[torch.Tensor | None, str]:
        """Decode sample ``i`` alone with DALI (unless ``failed`` already says why DALI
        could not), then with the PIL fallback: its tensor, or None and its error."""
        tensor, reason = (None, failed) if failed is not None else self._attempt([i], [data], False)
        if tensor is None and self.pil_fallback:
            try:
                pixels = pil_decode(data, self.max_image_pixels, self.preprocess)
            except ImageTooLarge as err:  # not decoded: the header check's text
                return None, f"decode: {short(str(err))}"
            except Exception as pil_err:  # noqa: BLE001
                message = OBJECT_REPR.sub("", str(pil_err)) or type(pil_err).__name__
                return None, f"decode: {short(message)} (DALI: {reason})"
            tensor, reason = self._attempt([i], [pixels], raw=True)
        if tensor is None:
            return None, f"decode: {reason}"
        return tensor, ""


def _refuse(
    ids: list[int], datas: list[np.ndarray], reason_of: Callable[[np.ndarray], str | None]
) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
    """Keep the images that ``reason_of`` has no reason to refuse; the others become
    errors (that reason)."""
    kept_ids, kept, errors = [], [], {}
    for i, data in zip(ids, datas):
        reason = reason_of(data)
        if reason is None:
            kept_ids.append(i)
            kept.append(data)
        else:
            errors[i] = reason
    return kept_ids, kept, errors


def _int_column(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df:
        raise KeyError(f"metadata partition lacks column {name!r}")
    return pd.to_numeric(df[name], errors="coerce").fillna(-1).astype(np.int64).to_numpy()


def _isnull(value: Any) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


_SOURCE_INFO = re.compile(r"^(?:.*?:)?(\d+):(.*)$", re.S)


def _iter_webdataset(
    path: str, batch_size: int, num_threads: int
) -> Iterator[tuple[int, str, np.ndarray]]:
    """``(data offset, member name, bytes)`` for every image of a local tar, via DALI."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    from dask_imgcurate.io.records import IMAGE_EXTENSIONS

    path = os.path.abspath(path)
    idx = path[: -len(".tar")] + ".idx" if path.endswith(".tar") else path + ".idx"
    pipe = Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=1
    )
    with pipe:
        data = fn.readers.webdataset(
            paths=[path],
            index_paths=[idx] if os.path.isfile(idx) else None,
            ext=[";".join(IMAGE_EXTENSIONS)],
            case_sensitive_extensions=False,
            missing_component_behavior="skip",
            name="reader",
        )
        pipe.set_outputs(data)
    pipe.build()
    total = pipe.reader_meta("reader")["epoch_size"]
    produced = 0
    prefix = path + ":"
    while produced < total:
        (batch,) = pipe.run()
        for j in range(len(batch)):
            info = batch[j].source_info()  # "<tar path>:<data offset>:<member name>"
            match = _SOURCE_INFO.match(info[len(prefix) :] if info.startswith(prefix) else info)
            if match is None:
                raise RuntimeError(f"unexpected DALI source_info {info!r} for {path}")
            offset, member = int(match.group(1)), match.group(2)
            yield offset, member, np.array(batch.at(j), dtype=np.uint8, copy=True)
        produced += len(batch)


_DONE = object()


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            put((None, err))

    context = contextvars.copy_context()  # the task's: errors name its Dask worker
    thread = threading.Thread(target=context.run, args=(work,), name="dali-image-reader")
    thread.daemon = True
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()

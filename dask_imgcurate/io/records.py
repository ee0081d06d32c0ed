"""Group tar members into WebDataset records.

A member's key is its path up to the first dot of its basename and its extension is the
rest (``dir/000042.seg.png`` -> key ``dir/000042``, extension ``seg.png``). Consecutive
members with the same key form one record. Keys are only ever used as strings: a key such
as ``../etc/x`` is never turned into a filesystem path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.errors import DuplicateKeyError, TarFormatError
from dask_imgcurate.io.tarindex import TarIndex

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_IMAGE_SET = frozenset(IMAGE_EXTENSIONS)
_KEY_DOT_EXT = r"(?s)^(?P<key>(?:.*/)?[^/.][^/.]*)\.(?P<ext>[^/]*)$"  # split_key's rule


def split_key(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) by the WebDataset rule."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no extension, or a dot-file: the whole name is the key
        return name, ""
    return name[:dot], name[dot + 1 :]


def split_keys(names: pa.Array) -> tuple[pa.Array, pa.Array]:
    """``split_key`` over a string array: (keys, extensions), as arrays."""
    if not pc.any(pc.match_substring(names, "/")).as_py():
        dot = pc.find_substring(names, ".")
        if not pc.any(pc.equal(dot, 0)).as_py():  # no dot-files: split at the first dot
            dotted = pc.if_else(
                pc.greater(dot, 0), names, pc.binary_join_element_wise(names, ".", "")
            )
            parts = pc.split_pattern(dotted, ".", max_splits=1)
            return pc.list_element(parts, 0), pc.list_element(parts, 1)
    parts = pc.extract_regex(names, _KEY_DOT_EXT)  # null where the whole name is the key
    keys = pc.coalesce(pc.struct_field(parts, [0]), names)
    return keys, pc.fill_null(pc.struct_field(parts, [1]), "")


@dataclass
class RecordIndex:
    """Records of one shard, in tar order: member ranges ``[starts[i], stops[i])``."""

    members: TarIndex
    keys: list[str]
    starts: np.ndarray
    stops: np.ndarray
    image_member: np.ndarray  # index into members of the record's image, -1 if none
    dropped_incomplete: int = 0  # records cut by damage (strict=False), not listed

    def __len__(self) -> int:
        return len(self.keys)


def group_records(index: TarIndex) -> RecordIndex:
    """Group ``index``'s members into records; raise on duplicate keys or member names.

    When the index carries damage, the record in progress at the damage is dropped (it may
    be missing members) and counted in ``dropped_incomplete``.
    """
    names = index.names
    count = len(names)
    key_array, ext_array = split_keys(_name_array(index))
    member_keys = np.asarray(key_array.to_numpy(zero_copy_only=False), dtype=object)
    new_record = np.ones(count, dtype=bool)
    new_record[1:] = member_keys[1:] != member_keys[:-1]
    starts = np.flatnonzero(new_record).tolist()
    keys = member_keys[starts].tolist()
    lower = pc.utf8_lower(ext_array)
    is_image = pc.is_in(lower, value_set=pa.array(IMAGE_EXTENSIONS)).to_numpy(zero_copy_only=False)
    candidates = np.where(is_image, np.arange(count), count)
    images = np.minimum.reduceat(candidates, starts) if starts else np.zeros(0, np.int64)
    bounds = np.append(starts, count)
    images = np.where(images < bounds[1:], images, -1).tolist()
    if len(set(keys)) != len(keys) or len(set(names)) != len(names):
        _raise_duplicate(index, keys, starts)
    stops = starts[1:] + [len(names)]
    dropped = 0
    if index.damage is not None and keys:
        keys, starts, stops, images = keys[:-1], starts[:-1], stops[:-1], images[:-1]
        dropped = 1
    return RecordIndex(
        members=index,
        keys=keys,
        starts=np.asarray(starts, dtype=np.int64),
        stops=np.asarray(stops, dtype=np.int64),
        image_member=np.asarray(images, dtype=np.int64),
        dropped_incomplete=dropped,
    )


def _name_array(index: TarIndex) -> pa.Array:
    """The member names as an Arrow array; a name that is not UTF-8 is a clear error."""
    try:
        return pa.array(index.names, pa.string())
    except UnicodeEncodeError:
        for i, name in enumerate(index.names):
            try:
                name.encode()
            except UnicodeEncodeError:
                raise TarFormatError(
                    index.source,
                    int(index.offsets[i]),
                    f"member name {name!r} is not UTF-8; its data starts",
                ) from None
        raise


def _raise_duplicate(index: TarIndex, keys: list[str], starts: list[int]) -> None:
    names = index.names
    first_name: dict[str, str] = {}
    for name in names:
        if name in first_name:
            raise DuplicateKeyError(f"{index.source}: member {name!r} occurs twice")
        first_name[name] = name
    first_start: dict[str, int] = {}
    for key, start in zip(keys, starts):
        if key in first_start:
            raise DuplicateKeyError(
                f"{index.source}: record key {key!r} occurs twice (members "
                f"{names[first_start[key]]!r} and {names[start]!r}, not adjacent); a "
                f"record's members must be consecutive, as WebDataset readers expect: "
                f"write tars in name order (GNU tar: --sort=name)"
            )
        first_start[key] = start

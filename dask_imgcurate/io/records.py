"""Group tar members into WebDataset records.

A member's key is its path up to the first dot of its basename and its extension is the
rest (``dir/000042.seg.png`` -> key ``dir/000042``, extension ``seg.png``). Consecutive
members with the same key form one record. A member whose basename has no dot or starts
with one (``README``, macOS ``._000042.jpg``) belongs to no record and is ignored, as the
``webdataset`` library ignores it (and DALI's ``wds2idx`` dot-files). Keys are only ever
used as strings: a key such as ``../etc/x`` is never turned into a filesystem path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dask_imgcurate.errors import DuplicateKeyError, TarFormatError
from dask_imgcurate.io.tarindex import TarIndex

WEB_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""What img2dataset writes: picked over the other image formats in a record."""
OTHER_IMAGE_EXTENSIONS = (
    "avif", "bmp", "gif", "j2k", "jp2", "pbm", "pgm", "pnm", "ppm", "tif", "tiff",
)  # fmt: skip
"""Formats DALI decodes (BMP, JPEG 2000, PNM, TIFF) or the PIL fallback does (AVIF, GIF)."""
IMAGE_EXTENSIONS = WEB_IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS
_KEY_DOT_EXT = r"(?s)^(?P<key>(?:.*/)?[^/.][^/.]*)\.(?P<ext>[^/]*)$"  # split_key's rule


def split_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """Split a member name into (key, extension) by the WebDataset rule; (None, None) when
    it belongs to no record: its basename has no dot, or starts with one.

    This is ``webdataset``'s ``base_plus_ext`` except for a dot-file in a directory
    (``dir/._x.jpg``), which its regular expression keys ``dir/`` and ``wds2idx`` ignores.
    """
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no extension, or a dot-file
        return None, None
    return name[:dot], name[dot + 1 :]


def split_keys(names: pa.Array) -> tuple[pa.Array, pa.Array]:
    """``split_key`` over a string array: (keys, extensions), null where ``split_key``
    gives None."""
    if not pc.any(pc.match_substring(names, "/")).as_py():
        first_dot = pc.min(pc.find_substring(names, ".")).as_py()
        if first_dot is None or first_dot > 0:  # every name has a key: split at its first dot
            parts = pc.split_pattern(names, ".", max_splits=1)
            return pc.list_element(parts, 0), pc.list_element(parts, 1)
    parts = pc.extract_regex(names, _KEY_DOT_EXT)  # null where the name is in no record
    return pc.struct_field(parts, [0]), pc.struct_field(parts, [1])


@dataclass
class RecordIndex:
    """Records of one shard, in tar order: member ranges ``[starts[i], stops[i])``.

    ``members`` lists the records' members only: the members that belong to no record are
    named in ``ignored``.
    """

    members: TarIndex
    keys: list[str]
    starts: np.ndarray
    stops: np.ndarray
    image_member: np.ndarray  # index into members of the record's image, -1 if none
    dropped_incomplete: int = 0  # records cut by damage (strict=False), not listed
    ignored: list[str] = field(default_factory=list)  # members in no record (dot-files, ...)
    undecodable: int = 0  # records not listed (strict=False): a member name is not UTF-8
    undecodable_offset: int | None = None  # data offset of the first such member
    version: int | None = None  # of the tar when indexed (``fsio.file_version``)

    def __len__(self) -> int:
        return len(self.keys)


def group_records(index: TarIndex, *, strict: bool = True) -> RecordIndex:
    """Group ``index``'s members into records; raise on duplicate keys or member names.

    Members that belong to no record are left out (named in ``ignored``). A record with a
    member name that is not UTF-8 raises ``TarFormatError``; with ``strict=False`` the
    record is left out and counted in ``undecodable``. When the index carries damage, the
    record in progress at the damage is dropped (it may be missing members) and counted in
    ``dropped_incomplete``; the last record listed is kept when an intact header shows that
    the damage cut a member of a later record (``TarIndex.cut_member``).
    """
    cut = _cuts_last_record(index)
    names_array, index, ignored, undecodable, damaged_dropped = _decodable(index, strict, cut)
    key_array, ext_array = split_keys(names_array)
    if key_array.null_count:
        in_record = key_array.is_valid()
        ignored += names_array.filter(pc.invert(in_record)).to_pylist()
        rows = np.flatnonzero(in_record.to_numpy(zero_copy_only=False))
        index = _subset(index, rows)
        key_array, ext_array = key_array.filter(in_record), ext_array.filter(in_record)
    names = index.names
    count = len(names)
    member_keys = np.asarray(key_array.to_numpy(zero_copy_only=False), dtype=object)
    new_record = np.ones(count, dtype=bool)
    new_record[1:] = member_keys[1:] != member_keys[:-1]
    starts = np.flatnonzero(new_record).tolist()
    keys = member_keys[starts].tolist()
    images = _image_members(ext_array, starts).tolist()
    if len(set(keys)) != len(keys) or len(set(names)) != len(names):
        _raise_duplicate(index, keys, starts)
    stops = starts[1:] + [len(names)]
    dropped = 0
    if index.damage is not None and (keys or damaged_dropped):
        if cut and not damaged_dropped:  # else the record in progress is gone already
            keys, starts, stops, images = keys[:-1], starts[:-1], stops[:-1], images[:-1]
        dropped = 1
    return RecordIndex(
        members=index,
        keys=keys,
        starts=np.asarray(starts, dtype=np.int64),
        stops=np.asarray(stops, dtype=np.int64),
        image_member=np.asarray(images, dtype=np.int64),
        dropped_incomplete=dropped,
        ignored=ignored,
        undecodable=undecodable[0],
        undecodable_offset=undecodable[1],
    )


def _image_members(extensions: pa.Array, starts: list[int]) -> np.ndarray:
    """Each record's image: the position of its first member with a web image's extension
    (``jpg``), else another image format's (``tif``), else one whose extension's last part
    is a web image's (``0.jpg``; ``seg.png`` is not picked over a ``jpg``), else another's;
    -1 when none. ``extensions`` are the members', in tar order; records start at
    ``starts``."""
    count = len(extensions)
    if not starts:
        return np.zeros(0, dtype=np.int64)
    lower = pc.utf8_lower(extensions)
    last = pc.replace_substring_regex(lower, pattern=r"^.*\.", replacement="")
    rank = np.full(count, 4, dtype=np.int64)  # 4: not an image
    for tier, (values, names) in enumerate(
        [
            (lower, WEB_IMAGE_EXTENSIONS),
            (lower, OTHER_IMAGE_EXTENSIONS),
            (last, WEB_IMAGE_EXTENSIONS),
            (last, OTHER_IMAGE_EXTENSIONS),
        ]
    ):
        found = pc.is_in(values, value_set=pa.array(names)).to_numpy(zero_copy_only=False)
        rank = np.where(found & (rank == 4), tier, rank)
    best = np.minimum.reduceat(rank * count + np.arange(count), starts)
    return np.where(best < 4 * count, best % count, -1)


def _subset(index: TarIndex, rows: np.ndarray) -> TarIndex:
    """``index`` with only its members ``rows``."""
    names = index.names
    return dataclasses.replace(
        index,
        names=[names[i] for i in rows.tolist()],
        offsets=index.offsets[rows],
        sizes=index.sizes[rows],
    )


def _cuts_last_record(index: TarIndex) -> bool:
    """Whether ``index``'s damage may have cut its last record short: unless the damage cut a
    member of another record, named by its intact header."""
    if index.damage is None:
        return False
    cut = None if index.cut_member is None else split_key(index.cut_member)[0]
    last = next((k for k, _ in map(split_key, reversed(index.names)) if k is not None), None)
    return cut is None or cut == last


def _decodable(
    index: TarIndex, strict: bool, cut: bool
) -> tuple[pa.Array, TarIndex, list[str], tuple[int, int | None], bool]:
    """The member names as an Arrow array, once the members whose names are not UTF-8 are
    gone: (names, index, ignored, (records dropped, first offset), whether the last record
    was dropped; ``cut``: whether the damage cut it). A name that is not UTF-8 is a clear
    error in a record (with ``strict``; else its record is dropped) and ignored in no
    record."""
    try:
        return pa.array(index.names, pa.string()), index, [], (0, None), False
    except UnicodeEncodeError:
        pass
    names = index.names
    bad = [i for i, name in enumerate(names) if not _is_utf8(name)]
    record_of: list[int | None] = []  # consecutive members with one key, skipping the rest
    record, previous = -1, None
    for name in names:
        key = split_key(name)[0]
        if key is not None and key != previous:
            record, previous = record + 1, key
        record_of.append(None if key is None else record)
    in_records = [i for i in bad if record_of[i] is not None]
    if in_records and strict:
        first = in_records[0]
        raise TarFormatError(
            index.source,
            int(index.offsets[first]),
            f"member name {names[first]!r} is not UTF-8; its data starts",
        )
    dropped = {record_of[i] for i in in_records}
    ignored = [names[i] for i in bad if record_of[i] is None]
    keep = [r not in dropped and (r is not None or _is_utf8(n)) for r, n in zip(record_of, names)]
    # a last record the damage cut is dropped anyway (it may be incomplete): not counted here
    last_dropped = cut and record in dropped
    counted = [i for i in in_records if not (last_dropped and record_of[i] == record)]
    offset = int(index.offsets[counted[0]]) if counted else None
    index = _subset(index, np.flatnonzero(keep))
    undecodable = (len(dropped) - last_dropped, offset)
    return pa.array(index.names, pa.string()), index, ignored, undecodable, last_dropped


def _is_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


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

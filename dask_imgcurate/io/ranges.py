"""Byte ranges grouped into fewer, larger reads (pure functions)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def merge_ranges(
    starts: Sequence[int],
    ends: Sequence[int],
    max_gap: int,
    max_read: int,
    breaks: Sequence[bool] | None = None,
) -> Iterator[tuple[int, int, int, int]]:
    """Group ranges ``[starts[i], ends[i])``, in the order given, into reads ``(first, stop,
    start, end)`` that cover ranges ``first:stop``. A range joins the read before it when it
    starts inside that read or at most ``max_gap`` bytes after its end, and the read then
    spans at most ``max_read`` bytes (one range alone may span more). ``breaks[i]`` true:
    range ``i`` starts a new read (it is in another file). Offsets are Python ints."""
    if not len(starts):
        return
    first, start, end = 0, starts[0], ends[0]
    cut = breaks if breaks is not None else [False] * len(starts)
    for i, (s, e, new_file) in enumerate(zip(starts, ends, cut)):
        if new_file or s < start or s - end > max_gap or (e if e > end else end) - start > max_read:
            if i:
                yield first, i, start, end
            first, start, end = i, s, e
        elif e > end:
            end = e
    yield first, len(starts), start, end

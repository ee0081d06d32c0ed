"""Output shards planned from the partitions' kept-row counts and sizes (prefix sums): each
shard's row slices and its ~``PIECE_BYTES`` pieces with their byte offsets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dask_imgcurate.io.tarwrite import END_OF_ARCHIVE
from dask_imgcurate.io.writer import plan_shards

PIECE_BYTES = 64 << 20  # target bytes per piece task of a local output shard


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its rows as partition slices, and its pieces."""

    n: int
    slices: list[tuple[int, int, int]]  # (partition, start, stop)
    # (partition, start, stop, position in the shard, byte offset in its tar, bytes)
    pieces: list[tuple[int, int, int, int, int, int]]
    tar_size: int

    def inputs(self, selections: Sequence) -> tuple[list, list[tuple[int, int, int]]]:
        """The selections this shard reads, and its slices indexing into them."""
        used = sorted({p for p, _, _ in self.slices})
        where = {p: i for i, p in enumerate(used)}  # (not used.index: quadratic in partitions)
        slices = [(where[p], start, stop) for p, start, stop in self.slices]
        return [selections[p] for p in used], slices


def plan_pieces(
    stats: list[tuple],
    per_shard: int,
    first_shard: int = 0,
    complete_only: bool = False,
    first_partition: int = 0,
    rows_before: int = 0,
) -> list[ShardPlan]:
    """Output shards of ``per_shard`` records (see ``plan_shards``), each cut into pieces of
    about ``PIECE_BYTES`` that never cross an input partition, with their byte offsets.
    ``stats`` may start at partition ``first_partition``, after ``rows_before`` rows."""
    shards = []
    counts = [len(s[0]) for s in stats]
    planned = plan_shards(counts, per_shard, first_shard, complete_only, rows_before)
    for n, local in enumerate(planned, start=first_shard):
        slices = [(p + first_partition, start, stop) for p, start, stop in local]
        pieces, position, offset = [], 0, 0
        for p, start, stop in local:
            ends = np.cumsum(stats[p][0][start:stop])
            cuts = piece_cuts(ends)
            for a, b in zip(cuts, cuts[1:]):
                size = int(ends[b - 1] - (ends[a - 1] if a else 0))
                piece = (p + first_partition, start + a, start + b, position + a, offset, size)
                pieces.append(piece)
                offset += size
            position += stop - start
        shards.append(ShardPlan(n, slices, pieces, offset + len(END_OF_ARCHIVE)))
    return shards


class Planner:
    """Plans output shards while partitions' stats arrive in order (``run._stream``), looking
    only at partitions whose rows are not yet in a planned shard: planning stays linear in
    the number of partitions however they arrive."""

    def __init__(self, per_shard: int):
        self.per_shard = per_shard
        self.planned = 0  # output shards planned so far
        self.base = 0  # the first partition with rows not in a planned shard ...
        self.rows_before = 0  # ... and the rows before it

    def complete(self, stats: list, known: int) -> list[ShardPlan]:
        """The full shards not planned yet among partitions ``0 .. known - 1``, whose
        ``stats`` are in (more partitions may follow)."""
        return self._take(stats, known, complete_only=True)

    def rest(self, stats: list) -> list[ShardPlan]:
        """Every shard not planned yet, once all partitions' stats are in ``stats``."""
        return self._take(stats, len(stats), complete_only=False)

    def _take(self, stats: list, end: int, complete_only: bool) -> list[ShardPlan]:
        window = stats[self.base : end]
        shards = plan_pieces(
            window, self.per_shard, self.planned, complete_only, self.base, self.rows_before
        )
        self.planned += len(shards)
        next_row = self.planned * self.per_shard
        while self.base < end and self.rows_before + len(stats[self.base][0]) <= next_row:
            self.rows_before += len(stats[self.base][0])
            self.base += 1
        return shards


def piece_cuts(ends: np.ndarray) -> list[int]:
    """Row boundaries that cut rows whose bytes end at ``ends`` into ~``PIECE_BYTES`` pieces."""
    marks = range(PIECE_BYTES, int(ends[-1]), PIECE_BYTES)
    cuts = np.searchsorted(ends, marks, side="right") + 1  # each piece passes a mark once
    return sorted({0, *cuts.tolist(), len(ends)})

"""``Pipeline``: run stages in order (the NeMo Curator-style API)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from dask_imgcurate.stages import (
    FilePartitioningStage,
    ImageEmbeddingStage,
    ImageReaderStage,
    ImageWriterStage,
    PipelineState,
    Stage,
    _ScoreFilterStage,
)

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)


class Pipeline:
    """An ordered list of stages. ``run`` applies them and returns the final state.

    Stages before the writer only build a lazy Dask graph, so the images are decoded and
    embedded once, when the writer computes.
    """

    def __init__(self, name: str = "pipeline", stages: list[Stage] | None = None):
        self.name = name
        self.stages: list[Stage] = []
        for stage in stages or []:
            self.add_stage(stage)

    def add_stage(self, stage: Stage) -> Pipeline:
        """Append ``stage``; returns the pipeline (calls chain)."""
        if not isinstance(stage, Stage):
            raise TypeError(f"not a stage: {stage!r}")
        self.stages.append(stage)
        return self

    def validate(self) -> None:
        """Raise ``ValueError`` when the stage order cannot work (checked before any work).

        The first stage must be the one ``FilePartitioningStage``; an ``ImageReaderStage``
        must come before the ``ImageEmbeddingStage`` it configures, and so must the score
        filters (before it, they would filter on scores saved earlier, not on the new
        embeddings); ``ImageWriterStage``, if any, must be last.
        """
        if not self.stages:
            raise ValueError(f"pipeline {self.name!r} has no stages")
        names = [type(s).__name__ for s in self.stages]
        if not isinstance(self.stages[0], FilePartitioningStage):
            raise ValueError(
                f"pipeline {self.name!r}: the first stage must be a FilePartitioningStage "
                f"(it finds the input shards), got {names[0]}; stages: {names}"
            )
        if sum(isinstance(s, FilePartitioningStage) for s in self.stages) > 1:
            raise ValueError(f"pipeline {self.name!r}: more than one FilePartitioningStage")
        for i, stage in enumerate(self.stages):
            if isinstance(stage, ImageReaderStage) and any(
                isinstance(s, ImageEmbeddingStage) for s in self.stages[:i]
            ):
                raise ValueError(
                    f"pipeline {self.name!r}: ImageReaderStage must come before the "
                    f"ImageEmbeddingStage whose images it reads; stages: {names}"
                )
            if isinstance(stage, ImageEmbeddingStage):
                early = [
                    type(s).__name__ for s in self.stages[:i] if isinstance(s, _ScoreFilterStage)
                ]
                if early:
                    raise ValueError(
                        f"pipeline {self.name!r}: {early[0]} comes before the ImageEmbeddingStage: "
                        f"it would filter on scores saved earlier, not on the new embeddings; "
                        f"put the filters after it; stages: {names}"
                    )
            if isinstance(stage, ImageWriterStage) and i != len(self.stages) - 1:
                raise ValueError(
                    f"pipeline {self.name!r}: ImageWriterStage must be the last stage "
                    f"(it computes and writes); stages: {names}"
                )

    def run(self, client: distributed.Client | None = None) -> PipelineState:
        """Apply every stage; with ``client`` (a ``distributed.Client``) compute on it.

        Without ``client`` Dask's current scheduler is used (a default ``Client`` if one
        exists, else the local threaded scheduler).
        """
        self.validate()
        state = PipelineState()
        context = client.as_current() if client is not None else contextlib.nullcontext()
        with context:
            for stage in self.stages:
                log.info("%s: %s", self.name, stage)
                state = stage.apply(state)
        if state.summary is not None:  # (the export logged it at INFO already)
            log.debug("%s: %s", self.name, state.summary)
        return state

    def __repr__(self) -> str:
        inner = "".join(f"\n  {s!r}," for s in self.stages)
        return f"Pipeline({self.name!r}, [{inner}\n])"

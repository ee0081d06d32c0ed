"""``Pipeline``: run stages in order (the NeMo Curator-style API)."""

from __future__ import annotations

import contextlib
import logging

from dask_imgcurate.stages import PipelineState, Stage

log = logging.getLogger(__name__)


class Pipeline:
    """An ordered list of stages. ``run`` applies them and returns the final state.

    Stages before the writer only build a lazy Dask graph, so the images are decoded and
    embedded once, when the writer computes.
    """

    def __init__(self, name: str = "pipeline", stages: list[Stage] | None = None):
        self.name = name
        self.stages: list[Stage] = list(stages or [])

    def add_stage(self, stage: Stage) -> Pipeline:
        if not isinstance(stage, Stage):
            raise TypeError(f"not a stage: {stage!r}")
        self.stages.append(stage)
        return self

    def run(self, client=None) -> PipelineState:
        """Apply every stage; with ``client`` (a ``distributed.Client``) compute on it."""
        if not self.stages:
            raise ValueError(f"pipeline {self.name!r} has no stages")
        state = PipelineState()
        context = client.as_current() if client is not None else contextlib.nullcontext()
        with context:
            for stage in self.stages:
                log.info("%s: %s", self.name, stage)
                state = stage.apply(state)
        if state.summary is not None:
            log.info("%s: %s", self.name, state.summary)
        return state

    def __repr__(self) -> str:
        inner = "".join(f"\n  {s!r}," for s in self.stages)
        return f"Pipeline({self.name!r}, [{inner}\n])"

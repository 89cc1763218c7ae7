"""Trials one after another in this process: for debugging and fast tests.

Memory peaks are approximate here: the allocator keeps freed heap from earlier trials, so a
trial's peak RSS can include its predecessors'. Use the local backend for clean measurements.
"""

from __future__ import annotations

from collections.abc import Iterator

from lorasweep.records import Trial, TrialResult
from lorasweep.run.backends.base import RunContext


class InProcessBackend:
    def warm_up(self) -> None:
        """Nothing to start: trials import torch in this process on first use."""

    def close(self) -> None:
        """Nothing to release."""

    def run(self, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]:
        from lorasweep.training.trial import train_trial

        for trial in trials:
            ctx.on_start(trial)
            yield train_trial(
                trial,
                ctx.trial_dir(trial),
                cache_root=ctx.cache_root,
                progress=ctx.on_progress,
                context=ctx.trial_context(trial),
            )

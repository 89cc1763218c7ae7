"""The backend protocol and the context a backend runs trials in (no torch, no backend imports)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lorasweep.records import Trial, TrialResult


@dataclass
class RunContext:
    out_dir: Path
    cache_root: Path
    name: str = "sweep"
    on_start: Callable[[Trial], None] = lambda t: None
    on_progress: Callable[[str, int, int], None] = lambda tid, step, total: None
    extra: dict[str, Any] = field(default_factory=dict)
    # trial id -> {"stop_at": step or None, "resume_from": checkpoint or None} (pruning rungs)
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    # trial id -> the estimator's peak bytes (run.estimates): what packing trials onto a GPU reads
    estimates: dict[str, float] = field(default_factory=dict)
    # a result a backend records before it runs the trial again (an OOM beside other trials,
    # retried alone): not yielded, so each trial is yielded once; the sweep keeps the trial
    # pending with the reason, so a sweep stopped before the retry still re-runs it
    on_requeue: Callable[[TrialResult], None] = lambda r: None

    def trial_dir(self, trial: Trial) -> Path:
        return self.out_dir / "trials" / trial.id

    def trial_context(self, trial: Trial, threads: int | None = None) -> dict[str, Any]:
        ctx = {"name": self.name, "threads": threads, "out_dir": str(self.out_dir), **self.extra}
        if trial.id in self.segments:
            ctx["segment"] = self.segments[trial.id]
        return ctx


class Backend(Protocol):
    """Where trials run. ``warm_up`` may start workers early (their imports then overlap the
    parent's checks); ``close`` releases what the backend started. Both may do nothing."""

    def warm_up(self) -> None: ...

    def run(self, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]: ...

    def close(self) -> None: ...

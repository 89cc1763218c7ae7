"""Backends run trials and yield their results; the parent process writes them to the store.

One protocol, interchangeable implementations::

    backend.run(trials, ctx) -> Iterator[TrialResult]

``ctx`` is a RunContext: where trials write their files, the data cache, progress callbacks.
Results are yielded as trials finish (in any order), so the parent records each one at once
and a crash of the parent loses at most the trials that were still running.
"""

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

    def trial_dir(self, trial: Trial) -> Path:
        return self.out_dir / "trials" / trial.id

    def trial_context(self, trial: Trial, threads: int | None = None) -> dict[str, Any]:
        ctx = {"name": self.name, "threads": threads, "out_dir": str(self.out_dir), **self.extra}
        if trial.id in self.segments:
            ctx["segment"] = self.segments[trial.id]
        return ctx


class Backend(Protocol):
    def run(self, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]: ...


def get_backend(name: str, *, jobs: int = 1, address: str | None = None) -> Backend:
    if name == "inprocess":
        from lorasweep.run.backends.inprocess import InProcessBackend

        return InProcessBackend()
    if name == "local":
        from lorasweep.run.backends.local import LocalBackend

        return LocalBackend(jobs=jobs)
    if name == "ray":
        from lorasweep.run.backends.ray import RayBackend

        return RayBackend(address=address, jobs=jobs)
    raise ValueError(f"--backend: unknown backend {name!r}; choose inprocess, local or ray")

"""Backends run trials and yield their results; the parent process writes them to the store.

One protocol, interchangeable implementations::

    backend.run(trials, ctx) -> Iterator[TrialResult]

``ctx`` is a RunContext: where trials write their files, the data cache, progress callbacks.
Results are yielded as trials finish (in any order), so the parent records each one at once
and a crash of the parent loses at most the trials that were still running.
"""

from __future__ import annotations

from lorasweep.run.backends.base import Backend, RunContext

__all__ = ["Backend", "RunContext", "get_backend"]


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

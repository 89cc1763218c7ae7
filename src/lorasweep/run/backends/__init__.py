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


def get_backend(name: str, *, jobs: int | str = 1, address: str | None = None,
                per_gpu: int | None = None, shared_folder: bool = False) -> Backend:  # fmt: skip
    """``jobs``: trials at once, or ``"auto"`` (local and Ray: as many as the GPUs' memory holds
    by the estimator, one at a time on CPU); ``per_gpu``: that many trials per GPU;
    ``shared_folder`` (Ray): trials read and write the run folder directly."""
    if shared_folder and name != "ray":
        raise ValueError("--shared-folder: only with --backend ray")
    if name == "inprocess" and (jobs == "auto" or per_gpu is not None):
        raise ValueError(f"--jobs auto / --per-gpu: the {name} backend runs one trial at a time")
    if name == "inprocess":
        from lorasweep.run.backends.inprocess import InProcessBackend

        return InProcessBackend()
    if name == "local":
        from lorasweep.run.backends.local import LocalBackend

        return LocalBackend(jobs=jobs, per_gpu=per_gpu)
    if name == "ray":
        from lorasweep.run.backends.ray import RayBackend

        return RayBackend(address=address, jobs=jobs, per_gpu=per_gpu, shared_folder=shared_folder)
    raise ValueError(f"--backend: unknown backend {name!r}; choose inprocess, local or ray")

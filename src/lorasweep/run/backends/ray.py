"""Each trial a Ray task on a Ray cluster (``--backend ray [--address auto|HOST:PORT]``).

The only module that imports ray (extra ``lorasweep[ray]``). Results come back to the parent as
plain dicts and the parent writes them to its store, as with the other backends.

Resources: on a cluster with GPUs each trial asks for one GPU (Ray sets CUDA_VISIBLE_DEVICES);
on CPUs each asks for ``max(1, cpus // jobs)`` CPUs, capped at the largest node, and trains with
that many threads. ``--jobs`` is the number of trials in flight at once. Each Ray worker process
runs one trial and exits (``max_calls=1``), so memory peaks are clean as with the local backend.

Requirements on a multi-node cluster: lorasweep (same version) installed on every node, and the
run folder on a filesystem every node sees (trials read the tokenized data cache from it and write
their adapters into it).

Failures: errors inside a trial come back as stored statuses from ``train_trial``. A task that
Ray's memory monitor killed is ``oom``; a worker or node that died for another reason leaves the
trial ``pending`` (interrupted, re-run on resume), like a SIGKILLed local worker. Ray's own task
retries are off (``max_retries=0``): lorasweep decides what is re-run.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from typing import Any

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.backends.base import RunContext

# environment passed to every task: offline switches and caches must hold on remote nodes too
_FORWARD_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "LORASWEEP_CACHE",
    "TOKENIZERS_PARALLELISM",
)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:  # a usage error (the CLI prints it as one line), not a crash
        raise ValueError(
            "--backend ray needs Ray: pip install 'lorasweep[ray]' (or 'ray[default]')"
        ) from None
    return ray


def _ray_trial(
    trial_dict: dict[str, Any],
    workdir: str,
    cache_root: str,
    context: dict[str, Any],
    env: dict[str, str],
) -> dict[str, Any]:
    """The Ray task: one trial in a fresh worker process; returns TrialResult.to_dict()."""
    os.environ.update(env)
    if context.get("threads"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(context["threads"])
        import torch

        torch.set_num_threads(int(context["threads"]))
    from lorasweep.training.trial import train_trial

    trial = Trial.from_dict(trial_dict)
    result = train_trial(trial, workdir, cache_root=cache_root, context=context)
    return result.to_dict()


class RayBackend:
    def __init__(self, address: str | None = None, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"--jobs: must be >= 1, got {jobs}")
        self.address = address
        self.jobs = jobs

    def _resources(self, ray: Any) -> tuple[dict[str, float], int | None]:
        """Ray resources of one trial task, and its thread count (None: leave it to torch)."""
        total = ray.cluster_resources()
        if total.get("GPU", 0) >= 1:
            return {"num_gpus": 1, "num_cpus": 1}, None
        cpus = int(total.get("CPU", 1))
        largest = max(
            (int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")),
            default=cpus,
        )
        per_trial = max(1, min(cpus // self.jobs, largest))
        return {"num_cpus": per_trial, "num_gpus": 0}, per_trial

    def run(self, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]:
        ray = _import_ray()
        if not ray.is_initialized():
            # address None starts a local Ray instance (or joins RAY_ADDRESS if set)
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(
                    f"--address: cannot reach a Ray cluster at {self.address!r}: {first}"
                ) from None
            self._started = True  # shut down in close(): a pruned sweep calls run() per rung
        yield from self._run(ray, trials, ctx)

    def warm_up(self) -> None:
        """Nothing to start early: Ray is initialised by the first ``run``."""

    def close(self) -> None:
        """Shut down the Ray instance this backend started (a joined cluster is left alone)."""
        if getattr(self, "_started", False):
            _import_ray().shutdown()
            self._started = False

    def _run(self, ray: Any, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]:
        resources, threads = self._resources(ray)
        task = ray.remote(max_calls=1, max_retries=0)(_ray_trial).options(**resources)
        env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
        queue = list(trials)
        running: dict[Any, Trial] = {}  # ObjectRef -> trial
        try:
            while queue or running:
                while queue and len(running) < self.jobs:
                    trial = queue.pop(0)
                    ctx.on_start(trial)
                    ref = task.remote(
                        trial.to_dict(),
                        str(ctx.trial_dir(trial)),
                        str(ctx.cache_root),
                        ctx.trial_context(trial, threads),
                        env,
                    )
                    running[ref] = trial
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in done:
                    trial = running.pop(ref)
                    yield _collect(ray, ref, trial)
        finally:
            for ref in running:  # the parent is going away: stop what it started
                ray.cancel(ref, force=True)


def _collect(ray: Any, ref: Any, trial: Trial) -> TrialResult:
    """The task's result, or the stored status of how the task died."""
    exc = ray.exceptions
    try:
        return TrialResult.from_dict(ray.get(ref))
    except exc.OutOfMemoryError as e:
        return TrialResult(
            trial.id, TrialStatus.OOM, error=_tail(f"killed by Ray's memory monitor: {e}")
        )
    except (exc.WorkerCrashedError, exc.NodeDiedError, exc.TaskCancelledError) as e:
        return TrialResult(
            trial.id,
            TrialStatus.PENDING,
            error=_tail(f"interrupted: {type(e).__name__}: {e}; the trial is re-run on resume"),
        )
    except exc.RayTaskError as e:  # an error outside train_trial's own handling (an import)
        return TrialResult(trial.id, TrialStatus.FAILED, error=_tail(str(e)))
    except exc.RayError:
        return TrialResult(trial.id, TrialStatus.FAILED, error=_tail(traceback.format_exc()))


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

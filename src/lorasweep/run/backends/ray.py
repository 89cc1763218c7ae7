"""Each trial a Ray task on a Ray cluster (``--backend ray [--address auto|HOST:PORT]``).

The only module that imports ray (extra ``lorasweep[ray]``). Results come back to the parent as
plain dicts and the parent writes them to its store, as with the other backends.

Resources: on a cluster with GPUs each trial asks for one GPU (Ray sets CUDA_VISIBLE_DEVICES).
With packing (``jobs="auto"`` or ``per_gpu``) it asks for a share of one instead
(``packing.gpu_fraction``): ``1 / per_gpu``, or its estimated peak memory grown by 10 % over the
smallest GPU's memory in the cluster (read once per backend by a tiny probe task on each GPU node;
a trial without an estimate, or a probe that does not answer, gets a whole GPU), and Ray puts
several trials on one GPU. A trial that runs out of memory on a shared GPU is run again alone on a
whole one (``ctx.on_requeue`` gets the first result). On CPUs each asks for ``max(1, cpus //
jobs)`` CPUs, capped at the largest node, and trains with that many threads. ``jobs`` is the
number of trials in flight at once (``auto``: as many as the cluster's GPUs hold at the smallest
share, Ray queueing the rest; with ``per_gpu``: GPUs x per_gpu; one at a time on CPUs). Each Ray
worker process runs one trial and exits (``max_calls=1``), so memory peaks are clean as with the
local backend.

Files. By default (``shared_folder=False``) they travel through Ray's object store and no node
but the parent's needs the run folder: the parent sends each node the tokenized data cache once
per run and a resumed segment its checkpoint, and a task returns a tar of what it wrote with its
result, which the parent installs into the run folder. ``transport`` (plain Python, its
docstring has the details) packs and unpacks, keeps each node's data cache and installs a
trial's files; this module is the Ray side: the tasks, what they ask for, the scheduling loop.

Sizes: a LoRA adapter and its checkpoint (adapter weights, optimizer state) are MBs; the data
cache can be GBs for a large instruction set, and travels once per node per run. Everything sent
is held in memory while packed and counts against the object store (spilled to disk beyond it),
so for big checkpoints (a large ``modules_to_save`` head, a big model's) or a big data cache on
a cluster that has a shared filesystem, use ``shared_folder=True``: tasks then read the cache
from the run folder and write into it directly.

Requirements on a multi-node cluster: lorasweep (same version) installed on every node, and the
model reachable from every node (a hub id each node can load, or a local folder at the same path
on every node). The dataset source need not be: trials read the tokenized cache. With
``shared_folder=True`` the run folder must also be on a filesystem every node sees, at the same
path. W&B and MLflow local stores are written on the node a task ran on.

Failures: errors inside a trial come back as stored statuses from ``train_trial``. A task that
Ray's memory monitor killed is ``oom``; a worker or node that died for another reason leaves the
trial ``pending`` (interrupted, re-run on resume), like a SIGKILLed local worker. Ray's own task
retries are off (``max_retries=0``): lorasweep decides what is re-run.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.backends.base import RunContext
from lorasweep.run.backends.transport import (
    data_fingerprints,
    data_folders,
    file_task_args,
    node_data,
    pack,
    pack_dir,
    receive,
    unpack,
)
from lorasweep.run.packing import check_jobs, gpu_fraction

# environment passed to every task: offline switches and caches must hold on remote nodes too
_FORWARD_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "LORASWEEP_CACHE",
    "TOKENIZERS_PARALLELISM",
)
_PROBE_TIMEOUT = 120.0  # seconds the GPU-memory probes may take (a worker start, torch import)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:  # a usage error (the CLI prints it as one line), not a crash
        raise ValueError(
            "--backend ray needs Ray: pip install 'lorasweep[ray]' (or 'ray[default]')"
        ) from None
    return ray


def _set_threads(context: dict[str, Any]) -> None:
    if context.get("threads"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(context["threads"])
        import torch

        torch.set_num_threads(int(context["threads"]))


def _ray_trial(
    trial_dict: dict[str, Any],
    workdir: str,
    cache_root: str,
    context: dict[str, Any],
    env: dict[str, str],
) -> dict[str, Any]:
    """The Ray task with a shared folder: one trial in a fresh worker process, reading and
    writing the run folder directly; returns TrialResult.to_dict()."""
    os.environ.update(env)
    _set_threads(context)
    from lorasweep.training.trial import train_trial

    trial = Trial.from_dict(trial_dict)
    result = train_trial(trial, workdir, cache_root=cache_root, context=context)
    return result.to_dict()


def _ray_trial_files(
    trial_dict: dict[str, Any],
    context: dict[str, Any],
    env: dict[str, str],
    data: tuple[str, list[Any]] | None,
    resume: tuple[str, bytes] | None,
) -> dict[str, Any]:
    """The Ray task without a shared folder: one trial in a fresh worker process, in node-local
    temp folders only.

    ``data``: (content hash, [the data cache tar or its ObjectRef]), None when there is no cache
    to send (the trial then tokenizes itself); the ref sits in a list so that Ray does not fetch
    it before this task knows its node lacks it. ``resume``: (checkpoint folder name, its tar)
    for a resumed segment. Returns {"result": TrialResult.to_dict(), "root": the temp run folder
    the result's paths point into, "files": a tar of that folder}.
    """
    os.environ.update(env)
    _set_threads(context)
    from lorasweep.training.trial import train_trial

    trial = Trial.from_dict(trial_dict)
    tmp = Path(tempfile.mkdtemp(prefix=f"lorasweep-{trial.id}-"))
    try:
        root = tmp / "run"  # laid out like a run folder: trials/<id>, tensorboard/
        cache_root = node_data(data[0], lambda: _get(data[1][0])) if data else tmp / "cache"
        context = {**context, "out_dir": str(root)}
        if resume is not None:
            name, blob = resume
            unpack(_get(blob), tmp / "resume")
            context["segment"] = {**context["segment"], "resume_from": str(tmp / "resume" / name)}
        workdir = root / "trials" / trial.id
        result = train_trial(trial, workdir, cache_root=cache_root, context=context)
        return {"result": result.to_dict(), "root": str(root), "files": pack_dir(root)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _probe_gpu_memory() -> float:
    """A probe task: the memory of the GPU Ray gave it, in bytes (0 where none is visible)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return float(torch.cuda.get_device_properties(0).total_memory)


def _get(box: Any) -> bytes:
    """The bytes in ``box``: bytes themselves, or an ObjectRef (fetched from the object store)."""
    if isinstance(box, bytes | bytearray | memoryview):
        return bytes(box)
    return _import_ray().get(box)


def _task_resources(
    has_gpus: bool,
    estimate: float | None,
    capacity: float | None,
    per_gpu: int | None = None,
    threads: int | None = None,
    pack: bool = True,
) -> dict[str, float]:
    """Ray resources of one trial task.

    CPUs only: ``threads`` CPUs and no GPU. With GPUs: one CPU and a whole GPU, or with
    ``pack`` a share of one (``packing.gpu_fraction``: ``1 / per_gpu``, else the estimate grown
    by the margin over ``capacity``, the smallest GPU's memory in bytes; a whole GPU when either
    is unknown). A share is cut to 4 decimals, Ray's resource granularity, rounding down so that
    ``per_gpu`` shares fit one GPU.
    """
    if not has_gpus:
        return {"num_cpus": threads or 1, "num_gpus": 0}
    share = 1.0
    if pack and (per_gpu is not None or capacity):
        share = gpu_fraction(estimate, float(capacity or 0.0), per_gpu=per_gpu)
        if share < 1:
            share = max(0.0001, math.floor(round(share * 10_000, 6)) / 10_000)
    return {"num_cpus": 1, "num_gpus": share}


class RayBackend:
    """Trials as Ray tasks. ``shared_folder=False`` (default): files travel through Ray's object
    store (see the module docstring); True: every node reads and writes the run folder, which
    must be on a filesystem all of them see. ``jobs``: trials in flight, or ``"auto"``;
    ``per_gpu``: that many trials share each GPU."""

    def __init__(
        self,
        address: str | None = None,
        jobs: int | str = 1,
        *,
        shared_folder: bool = False,
        per_gpu: int | None = None,
    ):
        check_jobs(jobs, per_gpu)
        self.address = address
        self.jobs = jobs
        self.shared_folder = shared_folder
        self.per_gpu = per_gpu
        self._capacity: float | None = None  # smallest GPU memory in the cluster, once probed

    def _cluster(self, ray: Any) -> tuple[float, int | None]:
        """(GPUs in the cluster, threads per trial on CPUs; None on GPUs: left to torch)."""
        total = ray.cluster_resources()
        gpus = float(total.get("GPU", 0))
        if gpus >= 1:
            return gpus, None
        cpus = int(total.get("CPU", 1))
        largest = max(
            (int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")),
            default=cpus,
        )
        jobs = self.jobs if isinstance(self.jobs, int) else 1
        return 0.0, max(1, min(cpus // jobs, largest))

    def _gpu_capacity(self, ray: Any) -> float:
        """The smallest GPU memory in the cluster in bytes, 0 when unknown: one probe task per
        alive GPU node (a hundredth of a GPU, so busy GPUs answer too), once per backend. A node
        that does not answer in time makes it unknown (trials then get whole GPUs)."""
        if self._capacity is not None:
            return self._capacity
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(max_calls=1, max_retries=0)(_probe_gpu_memory)
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
        if not nodes:
            self._capacity = 0.0
            return self._capacity
        refs = [
            probe.options(
                num_gpus=0.01,
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote()
            for n in nodes
        ]
        sizes: list[float] = []
        try:
            ready, late = ray.wait(refs, num_returns=len(refs), timeout=_PROBE_TIMEOUT)
            for ref in late:
                ray.cancel(ref, force=True)
            sizes = [float(s) for s in ray.get(ready)] if not late else []
        except ray.exceptions.RayError:
            sizes = []
        self._capacity = min(sizes) if sizes and min(sizes) > 0 else 0.0
        return self._capacity

    def _in_flight(self, gpus: float, shares: list[float]) -> int:
        """Tasks submitted at once: ``jobs``; with ``auto`` or ``per_gpu`` on GPUs, as many as
        the cluster's GPUs hold at the smallest share (Ray queues what does not fit yet)."""
        packed = self.jobs == "auto" or self.per_gpu is not None
        if packed and gpus >= 1:
            return max(1, int(gpus / min(shares or [1.0]) + 1e-6))
        return self.jobs if isinstance(self.jobs, int) else 1

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

    def _submitter(
        self, ray: Any, trials: list[Trial], ctx: RunContext, threads: int | None
    ) -> tuple[Callable[[Trial, dict[str, float]], Any], Callable[[Any, Trial], TrialResult]]:
        """(submit a trial with resources -> ObjectRef, collect an ObjectRef's result)."""
        env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
        if self.shared_folder:
            task = ray.remote(max_calls=1, max_retries=0)(_ray_trial)

            def submit(trial: Trial, res: dict[str, float]) -> Any:
                return task.options(**res).remote(
                    trial.to_dict(),
                    str(ctx.trial_dir(trial)),
                    str(ctx.cache_root),
                    ctx.trial_context(trial, threads),
                    env,
                )

            return submit, lambda ref, trial: _collect(ray, ref, trial)

        prints = data_fingerprints(trials, ctx)
        folders = data_folders(trials, ctx, prints)
        data = None
        if folders:  # else each trial tokenizes on its node (it needs the source there)
            blob = pack(folders)
            data = (hashlib.sha256(blob).hexdigest()[:32], [ray.put(blob)])
            del blob
        task = ray.remote(max_calls=1, max_retries=0)(_ray_trial_files)

        def submit_files(trial: Trial, res: dict[str, float]) -> Any:
            args = file_task_args(trial, ctx, threads, env, data, prints.get(trial.id))
            return task.options(**res).remote(*args)

        def collect(ref: Any, trial: Trial) -> TrialResult:
            return _collect(ray, ref, trial, lambda p: receive(p, trial, ctx))

        return submit_files, collect

    def _run(self, ray: Any, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]:
        if not trials:
            return
        gpus, threads = self._cluster(ray)
        estimates: dict[str, float] = getattr(ctx, "estimates", None) or {}
        pack = gpus >= 1 and (self.jobs == "auto" or self.per_gpu is not None)
        capacity = None
        if pack and self.per_gpu is None and any(estimates.get(t.id) for t in trials):
            capacity = self._gpu_capacity(ray)
        resources = {
            t.id: _task_resources(
                gpus >= 1, estimates.get(t.id), capacity, self.per_gpu, threads, pack
            )
            for t in trials
        }
        in_flight = self._in_flight(gpus, [r["num_gpus"] for r in resources.values()])
        submit, collect = self._submitter(ray, trials, ctx, threads)
        on_requeue = getattr(ctx, "on_requeue", None)
        queue = list(trials)
        alone: set[str] = set()  # out of memory on a shared GPU: run again on a whole one
        running: dict[Any, tuple[Trial, dict[str, float]]] = {}  # ObjectRef -> trial, resources
        try:
            while queue or running:
                # a trial re-run alone goes first, and nothing shared starts beside it until it
                # has ended (Ray does not keep order across different resource requests)
                lone = any(t.id in alone for t, _ in running.values())
                while queue and len(running) < in_flight:
                    if lone or (queue[0].id not in alone and any(t.id in alone for t in queue)):
                        break
                    trial = queue.pop(0)
                    res = resources[trial.id]
                    if trial.id in alone:
                        res = {**res, "num_gpus": 1}
                    ctx.on_start(trial)
                    running[submit(trial, res)] = (trial, res)
                    if trial.id in alone:
                        break
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in done:
                    trial, res = running.pop(ref)
                    result = collect(ref, trial)
                    shared = 0 < res.get("num_gpus", 0) < 1
                    if result.status == TrialStatus.OOM and shared and trial.id not in alone:
                        result.error = (
                            f"out of memory on a shared GPU ({res['num_gpus']:g} of one); run "
                            f"again alone. {result.error or ''}"
                        ).strip()
                        if on_requeue is not None:
                            on_requeue(result)
                        alone.add(trial.id)
                        queue.insert(0, trial)
                        continue
                    yield result
        finally:
            for ref in running:  # the parent is going away: stop what it started
                ray.cancel(ref, force=True)


def _collect(
    ray: Any, ref: Any, trial: Trial, receive: Callable[[Any], TrialResult] | None = None
) -> TrialResult:
    """The task's result (``receive`` turns the task's return value into it; default: a
    TrialResult dict), or the stored status of how the task died."""
    exc = ray.exceptions
    try:
        value = ray.get(ref)
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
    try:
        return receive(value) if receive is not None else TrialResult.from_dict(value)
    except Exception:  # noqa: BLE001 - files that cannot be installed fail this trial only
        return TrialResult(trial.id, TrialStatus.FAILED, error=_tail(traceback.format_exc()))


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

"""A fresh process per trial, forked from a forkserver that preloaded torch/transformers/peft.

Why: a trial in its own process gives clean memory peaks and crash isolation (an OOM kill or a
segfault fails one trial, not the sweep). A plainly spawned interpreter pays 8-10 s of imports per
trial; the forkserver imports once and forks in well under a second. The server never touches
CUDA (it only imports), so each child can pick its own GPU with CUDA_VISIBLE_DEVICES.

``jobs`` workers run at once. On CUDA each gets its own GPU; on CPU each gets cores // jobs threads
(oversubscribed threads were 1.5x slower than sequential trials on 2 cores). With ``jobs="auto"``
(or ``per_gpu``) on GPUs, trials share GPUs: ``run.packing`` starts each where the estimator's
peak fits (or N per GPU), and a trial that runs out of memory beside others is recorded with the
reason (``RunContext.on_requeue``: pending, so a stopped sweep still re-runs it) and run again
alone, before anything new starts.

A worker that dies without a result is classified honestly (see ``_died``): killed by the kernel's
OOM killer -> ``oom``; killed by SIGKILL with no OOM kill recorded by the kernel (a user, a job
scheduler) -> the trial was interrupted, not answered: it goes back to ``pending`` and a plain
resume re-runs it; any other death (a segfault, an abort) -> ``failed``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.backends.base import RunContext
from lorasweep.run.packing import Device, Packer, check_jobs

# the guard first: it ties the server's life to the sweep's before the slow imports start
_PRELOAD = ["lorasweep.run.backends._forkserver_guard", "lorasweep.training.trial"]
_SWEEP_PID_ENV = "LORASWEEP_SWEEP_PID"  # read by _forkserver_guard (never import it here: it
# arms a death signal in whatever process imports it)
_PROGRESS_EVERY = 0.5  # seconds between progress messages from a child


_JOIN_AFTER_RESULT = 30.0  # seconds a worker may take to exit after sending its result


def _watch_parent(ppid: int, sweep_pid: int) -> None:
    """End this worker when the sweep dies.

    The worker's parent is the forkserver, which exits when the sweep process does, so the worker
    is re-parented; the sweep's own pid is checked too, in case the forkserver outlives it.
    """
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid or not _alive(sweep_pid):
            os._exit(3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def oom_kill_count() -> int | None:
    """The kernel's count of OOM kills since boot (Linux ``/proc/vmstat``), None where unknown.

    It counts every OOM kill on the machine (cgroup limits included), so a rise while a worker
    ran is evidence, not proof, that the worker was the victim; the error text says so.
    """
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _child(
    trial_dict: dict[str, Any],
    workdir: str,
    cache_root: str,
    context: dict[str, Any],
    gpu: str | None,
    conn: Connection,
    sweep_pid: int,
) -> None:
    threading.Thread(target=_watch_parent, args=(os.getppid(), sweep_pid), daemon=True).start()
    # Ctrl-C on the terminal reaches the whole process group: only the sweep acts on it (it stops
    # the workers and leaves their trials to be re-run), so a worker never records it as a failure
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything touches CUDA in this process
    if context.get("threads"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(context["threads"])
        import torch  # preloaded by the forkserver; set before the trial records its environment

        torch.set_num_threads(int(context["threads"]))
    last = [0.0]

    def progress(tid: str, step: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_EVERY or step >= total:
            last[0] = now
            conn.send(("progress", tid, step, total))

    try:
        from lorasweep.training.trial import train_trial

        trial = Trial.from_dict(trial_dict)
        result = train_trial(
            trial, workdir, cache_root=cache_root, progress=progress, context=context
        )
    except Exception:  # noqa: BLE001 - train_trial stores its own failures; this is the rest
        tb = traceback.format_exc().strip().splitlines()
        result = TrialResult(trial_dict["id"], TrialStatus.FAILED, error="\n".join(tb[-12:]))
    conn.send(("result", result.to_dict()))
    conn.close()


def _gpu_ids() -> list[str]:
    """The GPUs this sweep may use, as CUDA_VISIBLE_DEVICES entries (the parent's own mask kept)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not n:
        return []
    mask = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return mask[:n] if len(mask) >= n else [str(i) for i in range(n)]


def gpu_capacities(ids: list[str]) -> list[float]:
    """Total memory (bytes) of the visible GPUs, in order; torch reads it without allocating.
    Packing assumes the GPUs are otherwise free."""
    import torch

    return [float(torch.cuda.get_device_properties(i).total_memory) for i in range(len(ids))]


class LocalBackend:
    """``jobs`` workers at once, one GPU each; or, with ``jobs="auto"`` or ``per_gpu`` on GPUs,
    as many trials per GPU as fit by the estimator (``run.packing``): a trial that runs out of
    memory beside others is recorded with the reason and run again alone. ``jobs="auto"`` on
    CPU: one trial at a time with every core."""

    def __init__(self, jobs: int | str = 1, per_gpu: int | None = None):
        check_jobs(jobs, per_gpu)
        if per_gpu is not None and not _gpu_ids():  # before any run folder is made
            raise ValueError("--per-gpu: no GPU is visible (CUDA_VISIBLE_DEVICES, drivers)")
        self.jobs, self.per_gpu = jobs, per_gpu
        self.max_running = 0  # most trials that ran at once (benchmarks, tests)
        self._mp = mp.get_context("forkserver")
        self._mp.set_forkserver_preload(_PRELOAD)

    def warm_up(self) -> None:
        """Start the forkserver now: its imports (8-10 s) overlap the parent's validation and
        tokenization instead of delaying the first trial."""
        os.environ[_SWEEP_PID_ENV] = str(os.getpid())
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def close(self) -> None:
        """The forkserver is kept: a second sweep in this process (a notebook) starts its trials
        without re-importing torch; it exits with the process."""

    def packer(self) -> Packer | None:
        """A Packer over the visible GPUs when trials share them, else None."""
        gpus = _gpu_ids()
        if not gpus or (self.jobs != "auto" and self.per_gpu is None):
            return None
        caps = gpu_capacities(gpus)
        return Packer([Device(g, c) for g, c in zip(gpus, caps, strict=True)],
                      per_gpu=self.per_gpu)  # fmt: skip

    def _slots(self) -> tuple[list[str | None], int | None]:
        jobs = 1 if self.jobs == "auto" else int(self.jobs)
        gpus = _gpu_ids()
        if gpus:
            if jobs > len(gpus):
                raise ValueError(f"--jobs: {jobs} workers but only {len(gpus)} GPUs visible")
            return list(gpus[:jobs]), None
        threads = max(1, (os.cpu_count() or 1) // jobs)
        return [None] * jobs, threads

    def width(self, trials: list[Trial], estimates: dict[str, float]) -> int:
        """How many trials will run at once, for the progress display's ETA."""
        packer = self.packer()
        if packer is None:
            return len(self._slots()[0])
        placed = sum(packer.place(t.id, estimates.get(t.id)) is not None for t in trials)
        return max(1, placed)

    def run(self, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]:
        os.environ[_SWEEP_PID_ENV] = str(os.getpid())  # read by the forkserver it starts
        packer = self.packer()
        if packer is not None:
            yield from self._run_packed(trials, ctx, packer)
            return
        gpus, threads = self._slots()
        free = list(range(len(gpus)))
        queue = list(trials)
        running: dict[int, _Running] = {}
        try:
            while queue or running:
                while queue and free:
                    slot = free.pop(0)
                    trial = queue.pop(0)
                    running.update(self._start(trial, ctx, gpus[slot], threads, slot))
                for run, res in self._finished(running, ctx):
                    free.append(run.slot)
                    yield res
        finally:
            _stop(running)

    def _run_packed(self, trials: list[Trial], ctx: RunContext,
                    packer: Packer) -> Iterator[TrialResult]:  # fmt: skip
        """Trials share GPUs by estimated memory; an OOM beside others is run again alone."""
        queue: list[tuple[Trial, bool]] = [(t, False) for t in trials]  # (trial, alone)
        running: dict[int, _Running] = {}
        crowded: dict[str, int] = {}  # trial id -> most other trials beside it on its GPU
        try:
            while queue or running:
                # a trial waiting to run alone goes first: nothing new starts until it has
                waiting = [item for item in queue if item[1]] or list(queue)
                for item in waiting:
                    trial, alone = item
                    gpu = packer.place(trial.id, ctx.estimates.get(trial.id), alone=alone)
                    if gpu is None:
                        continue
                    queue.remove(item)
                    running.update(self._start(trial, ctx, gpu, None, 0))
                    beside = [r.trial.id for r in running.values()
                              if packer.where[r.trial.id].id == gpu]  # fmt: skip
                    for tid in beside:
                        crowded[tid] = max(crowded.get(tid, 0), len(beside) - 1)
                for run, res in self._finished(running, ctx):
                    packer.release(run.trial.id)
                    others = crowded.pop(run.trial.id, 0)
                    if res.status == TrialStatus.OOM and others:
                        res.error = (
                            f"out of memory beside {others} other trial(s) on GPU "
                            f"{run.gpu}; run again alone. {res.error or ''}"
                        ).strip()
                        ctx.on_requeue(res)
                        queue.insert(0, (run.trial, True))
                        continue
                    yield res
        finally:
            _stop(running)

    def _start(self, trial: Trial, ctx: RunContext, gpu: str | None, threads: int | None,
               slot: int) -> dict[int, _Running]:  # fmt: skip
        ctx.on_start(trial)
        parent_conn, child_conn = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(
            target=_child,
            args=(trial.to_dict(), str(ctx.trial_dir(trial)), str(ctx.cache_root),
                  ctx.trial_context(trial, threads), gpu, child_conn, os.getpid()),
            name=f"lorasweep-{trial.id}",
        )  # fmt: skip
        proc.start()
        child_conn.close()
        return {proc.sentinel: _Running(proc, parent_conn, trial, slot, oom_kill_count(), gpu)}

    def _finished(self, running: dict[int, _Running],
                  ctx: RunContext) -> Iterator[tuple[_Running, TrialResult]]:  # fmt: skip
        """Wait up to a second; each worker that ended, with its result (or how it died)."""
        self.max_running = max(self.max_running, len(running))
        ready = wait([r.conn for r in running.values()] + list(running), timeout=1.0)
        results: dict[int, TrialResult] = {}
        for sentinel, run in list(running.items()):
            if run.conn in ready or sentinel in ready:
                res = _drain(run.conn, ctx)
                if res is not None:
                    results[sentinel] = res
            if sentinel in ready or sentinel in results:
                run.proc.join(timeout=_JOIN_AFTER_RESULT if sentinel in results else 5)
                if run.proc.exitcode is None:
                    if sentinel not in results:
                        continue
                    run.proc.kill()  # it sent its result but hangs on exit
                    run.proc.join(timeout=5)
                res = (
                    results.get(sentinel)
                    or _drain(run.conn, ctx)
                    or _died(run.trial, run.proc, run.ooms)
                )
                run.conn.close()
                del running[sentinel]
                yield run, res


@dataclass
class _Running:
    """A worker process and what the backend tracks of it."""

    proc: Any
    conn: Connection
    trial: Trial
    slot: int
    ooms: int | None  # the kernel's OOM-kill count when it started
    gpu: str | None


def _stop(running: dict[int, _Running]) -> None:
    """The parent is going away: stop the workers."""
    for run in running.values():
        run.proc.kill()
        run.proc.join(timeout=5)


def _drain(conn: Connection, ctx: RunContext) -> TrialResult | None:
    """Read every pending message; return the result if one arrived."""
    result = None
    try:
        while conn.poll():
            msg = conn.recv()
            if msg[0] == "progress":
                ctx.on_progress(msg[1], msg[2], msg[3])
            elif msg[0] == "result":
                result = TrialResult.from_dict(msg[1])
    except (EOFError, OSError):
        pass
    return result


def _died(trial: Trial, proc: Any, ooms_before: int | None = None) -> TrialResult:
    """A worker that exited without a result.

    - SIGKILL and the kernel counted an OOM kill meanwhile (or we cannot tell, off Linux): ``oom``,
      kept and re-run only with ``--retry oom`` (it would most likely be killed again).
    - SIGKILL with no OOM kill counted: someone stopped the worker; the trial has no answer, so it
      goes back to ``pending`` (with the reason in ``error``) and a plain resume re-runs it.
    - any other signal or exit code (segfault, abort): ``failed``.
    """
    code = proc.exitcode
    pid = getattr(proc, "pid", "?")
    if code is not None and code < 0 and -code == signal.SIGKILL:
        ooms_after = oom_kill_count()
        if ooms_before is not None and ooms_after is not None and ooms_after == ooms_before:
            return TrialResult(
                trial_id=trial.id,
                status=TrialStatus.PENDING,
                error=f"interrupted: worker process {pid} was killed by SIGKILL and the kernel "
                "recorded no OOM kill meanwhile; the trial is re-run on resume",
            )
        why = (
            f"the kernel recorded {ooms_after - ooms_before} OOM kill(s) while it ran"
            if ooms_before is not None and ooms_after is not None
            else "the OS out-of-memory killer, or a user (no OOM-kill counter on this system)"
        )
        return TrialResult(
            trial_id=trial.id,
            status=TrialStatus.OOM,
            error=f"worker process {pid} killed by SIGKILL: {why}",
        )
    if code is not None and code < 0:
        error = f"worker process {pid} killed by {signal.Signals(-code).name}"
    else:
        error = f"worker process {pid} exited with code {code} and no result"
    return TrialResult(trial_id=trial.id, status=TrialStatus.FAILED, error=error)

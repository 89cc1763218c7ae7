"""A fresh process per trial, forked from a forkserver that preloaded torch/transformers/peft.

Why: a trial in its own process gives clean memory peaks and crash isolation (an OOM kill or a
segfault fails one trial, not the sweep). A plainly spawned interpreter pays 8-10 s of imports per
trial; the forkserver imports once and forks in well under a second. The server never touches
CUDA (it only imports), so each child can pick its own GPU with CUDA_VISIBLE_DEVICES.

``jobs`` workers run at once. On CUDA each gets its own GPU; on CPU each gets cores // jobs threads
(oversubscribed threads were 1.5x slower than sequential trials on 2 cores).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from lorasweep.backends import RunContext
from lorasweep.results import Trial, TrialResult, TrialStatus

_PRELOAD = ["lorasweep.trial"]
_PROGRESS_EVERY = 0.5  # seconds between progress messages from a child


def _watch_parent(ppid: int) -> None:
    """End this worker when the sweep dies (the forkserver exits and we are re-parented)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(3)


def _child(
    trial_dict: dict[str, Any],
    workdir: str,
    cache_root: str,
    context: dict[str, Any],
    gpu: int | None,
    conn: Connection,
) -> None:
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if context.get("threads"):
        os.environ["OMP_NUM_THREADS"] = str(context["threads"])
    from lorasweep.trial import train_trial

    trial = Trial.from_dict(trial_dict)
    last = [0.0]

    def progress(tid: str, step: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_EVERY or step >= total:
            last[0] = now
            conn.send(("progress", tid, step, total))

    result = train_trial(trial, workdir, cache_root=cache_root, progress=progress, context=context)
    conn.send(("result", result.to_dict()))
    conn.close()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class LocalBackend:
    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"--jobs: must be >= 1, got {jobs}")
        self.jobs = jobs
        self._mp = mp.get_context("forkserver")
        self._mp.set_forkserver_preload(_PRELOAD)

    def _slots(self) -> tuple[list[int | None], int | None]:
        gpus = _gpu_count()
        if gpus:
            if self.jobs > gpus:
                raise ValueError(f"--jobs: {self.jobs} workers but only {gpus} GPUs visible")
            return list(range(self.jobs)), None
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        return [None] * self.jobs, threads

    def run(self, trials: list[Trial], ctx: RunContext) -> Iterator[TrialResult]:
        gpus, threads = self._slots()
        free = list(range(self.jobs))
        queue = list(trials)
        running: dict[int, tuple[Any, Connection, Trial, int]] = {}  # sentinel -> worker
        try:
            while queue or running:
                while queue and free:
                    slot = free.pop(0)
                    trial = queue.pop(0)
                    ctx.on_start(trial)
                    parent_conn, child_conn = self._mp.Pipe(duplex=False)
                    proc = self._mp.Process(
                        target=_child,
                        args=(
                            trial.to_dict(),
                            str(ctx.trial_dir(trial)),
                            str(ctx.cache_root),
                            ctx.trial_context(threads),
                            gpus[slot],
                            child_conn,
                        ),
                        name=f"lorasweep-{trial.id}",
                    )
                    proc.start()
                    child_conn.close()
                    running[proc.sentinel] = (proc, parent_conn, trial, slot)
                conns = [w[1] for w in running.values()]
                ready = wait(conns + list(running), timeout=1.0)
                results: dict[int, TrialResult] = {}
                for sentinel, (proc, conn, trial, slot) in list(running.items()):
                    if conn in ready or sentinel in ready:
                        res = _drain(conn, ctx)
                        if res is not None:
                            results[sentinel] = res
                    if sentinel in ready or sentinel in results:
                        proc.join(timeout=None if sentinel in results else 5)
                        if proc.exitcode is None:
                            continue
                        res = results.get(sentinel) or _drain(conn, ctx) or _died(trial, proc)
                        conn.close()
                        del running[sentinel]
                        free.append(slot)
                        yield res
        finally:
            for proc, conn, _, _ in running.values():  # the parent is going away: stop workers
                proc.kill()
                proc.join(timeout=5)


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


def _died(trial: Trial, proc: Any) -> TrialResult:
    """A worker that exited without a result: killed (likely by the OOM killer) or crashed."""
    code = proc.exitcode
    if code is not None and code < 0:
        sig = signal.Signals(-code).name
        status = TrialStatus.OOM if -code == signal.SIGKILL else TrialStatus.FAILED
        error = f"worker process killed by {sig}" + (
            " (the OS out-of-memory killer, or a user)" if status == TrialStatus.OOM else ""
        )
    else:
        status, error = TrialStatus.FAILED, f"worker process exited with code {code} and no result"
    return TrialResult(trial_id=trial.id, status=status, error=error)

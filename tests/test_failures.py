"""Failure states (oom, diverged, failed), retries, and killing workers or the sweep itself.

The contract under test: every trial ends in exactly one stored state, the sweep goes on past a
bad trial, a kill never corrupts the store or loses a finished trial, and no process outlives
the sweep that started it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from lorasweep.records import Trial, TrialStatus
from lorasweep.run.backends.local import _died, oom_kill_count
from lorasweep.run.sweep import load_spec, run_sweep
from lorasweep.store import open_store


def _spec(model_dir: Path, csv: Path, **over: object) -> dict:
    spec = {
        "name": "failures",
        "task": "classification",
        "model": str(model_dir),
        "dataset": {"source": str(csv), "max_length": 32, "max_eval_examples": 40},
        "training": {
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 8,
            "max_steps": 4,
            "logging_steps": 1,
        },
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.0},
        "grid": {"rank": [2]},
        "seeds": [0],
    }
    spec.update(over)
    return spec


def _by_rank(run: Path) -> dict[int, dict]:
    with open_store(run) as store:
        return {t["rank"]: t for t in store.trials()}


# ------------------------------------------------------------------------------------------
# diverged


def test_nan_loss_is_stored_as_diverged_and_listed_in_the_report(tiny_bert_dir, tiny_csv, tmp_path):
    # lr 1e6 only sends this tiny model's loss to ~1e6 (finite); 1e20 overflows at step 2
    variants = {"ok": {}, "huge-lr": {"training": {"learning_rate": 1e20}}}
    spec = _spec(
        tiny_bert_dir,
        tiny_csv,
        variants=variants,
        training={
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 8,
            "max_steps": 8,
            "logging_steps": 1,
        },
    )
    out = run_sweep(spec, tmp_path / "run", backend="local", quiet=True)
    assert out.ran == 2 and out.statuses == {"complete": 1, "diverged": 1}
    with open_store(tmp_path / "run") as store:
        rows = {t["variant"]: t for t in store.trials()}
        curve = store.curves_of(rows["huge-lr"]["id"])["train_loss"]
    bad = rows["huge-lr"]
    assert bad["status"] == "diverged"
    assert "non-finite" in bad["error"]
    # it stopped early: the last logged loss is the non-finite one, before max_steps
    assert curve[-1][1] is None or curve[-1][1] != curve[-1][1]
    assert curve[-1][0] < 8
    html = (tmp_path / "run" / "report.html").read_text()
    problems = html[html.index('id="problems"') :]
    assert bad["id"] in problems and "diverged" in problems
    # diverged is final: a resume, even with --retry, does not run it again
    again = run_sweep(spec, tmp_path / "run", backend="local", retry=("failed", "oom"), quiet=True)
    assert again.ran == 0


# ------------------------------------------------------------------------------------------
# oom and failed raised inside the trial; --retry


def test_oom_and_failed_are_stored_and_retried_only_when_asked(
    tiny_bert_dir, tiny_csv, tmp_path, monkeypatch
):
    import torch

    import lorasweep.training.trial as trial_mod

    real_trainer = trial_mod.Trainer

    class Flaky(real_trainer):
        def train(self, *a, **kw):  # noqa: ANN002, ANN003
            r = self.model.peft_config["default"].r
            if r == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if r == 4:
                raise RuntimeError("boom: something else went wrong")
            return super().train(*a, **kw)

    monkeypatch.setattr(trial_mod, "Trainer", Flaky)
    spec = _spec(tiny_bert_dir, tiny_csv, grid={"rank": [2, 4, 8]})
    run = tmp_path / "run"
    out = run_sweep(spec, run, backend="inprocess", quiet=True, report=False)
    assert out.ran == 3 and out.statuses == {"oom": 1, "failed": 1, "complete": 1}
    rows = _by_rank(run)
    assert rows[2]["status"] == "oom" and "out of memory" in rows[2]["error"]
    assert rows[4]["status"] == "failed"
    assert "Traceback" in rows[4]["error"] or "line" in rows[4]["error"]
    assert rows[4]["error"].splitlines()[-1] == "RuntimeError: boom: something else went wrong"

    # a plain resume re-runs neither
    assert run_sweep(spec, run, backend="inprocess", quiet=True, report=False).ran == 0

    monkeypatch.setattr(trial_mod, "Trainer", real_trainer)  # the cause is gone
    out = run_sweep(spec, run, backend="inprocess", retry=("failed",), quiet=True, report=False)
    assert out.ran == 1 and out.statuses == {"oom": 1, "complete": 2}
    out = run_sweep(
        spec, run, backend="inprocess", retry=("failed", "oom"), quiet=True, report=False
    )
    assert out.ran == 1 and out.statuses == {"complete": 3}
    rows = _by_rank(run)
    assert [rows[r]["attempts"] for r in (2, 4, 8)] == [2, 2, 1]
    assert all(rows[r]["error"] is None for r in (2, 4, 8))


def test_unknown_retry_status_is_refused(tiny_bert_dir, tiny_csv, tmp_path):
    with pytest.raises(ValueError, match="--retry"):
        run_sweep(_spec(tiny_bert_dir, tiny_csv), tmp_path / "r", retry=("diverged",), quiet=True)


# ------------------------------------------------------------------------------------------
# how a worker that died without a result is classified


def _trial() -> Trial:
    return Trial(config={"x": 1}, variant="lora", rank=2, seed=0)


def test_dead_worker_classification():
    killed = SimpleNamespace(exitcode=-signal.SIGKILL, pid=123)
    now = oom_kill_count()
    if now is not None:
        # SIGKILL with no OOM kill counted meanwhile: interrupted, back to pending
        res = _died(_trial(), killed, now)
        assert res.status == TrialStatus.PENDING and res.error.startswith("interrupted")
        # the kernel counted an OOM kill while it ran: oom
        res = _died(_trial(), killed, now - 1)
        assert res.status == TrialStatus.OOM and "OOM kill" in res.error
    # no counter (not Linux): cannot tell, so the conservative oom
    assert _died(_trial(), killed, None).status == TrialStatus.OOM
    segv = SimpleNamespace(exitcode=-signal.SIGSEGV, pid=1)
    assert _died(_trial(), segv).status == TrialStatus.FAILED
    assert "SIGSEGV" in _died(_trial(), segv).error
    assert _died(_trial(), SimpleNamespace(exitcode=1, pid=1)).status == TrialStatus.FAILED


# ------------------------------------------------------------------------------------------
# SIGKILL of a worker mid-trial


@pytest.mark.skipif(oom_kill_count() is None, reason="needs Linux /proc/vmstat oom_kill")
def test_worker_sigkill_mid_trial_is_rerun_on_resume(
    tiny_bert_dir, tiny_csv, tmp_path, monkeypatch
):
    import lorasweep.run.progress as progress_mod

    spec = _spec(
        tiny_bert_dir,
        tiny_csv,
        seeds=[0, 1],
        training={"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_steps": 10},
    )
    run = tmp_path / "run"
    killed: dict[str, int] = {}
    real_progress = progress_mod.Progress.progress

    def progress(self, trial_id, step, total):  # noqa: ANN001
        real_progress(self, trial_id, step, total)
        if not killed and 1 <= step < total:  # the first trial, mid-training
            # a worker that already exited (this message read late, on a loaded machine) is
            # not there to kill: the next trial's progress fires the hook instead
            worker = next(
                (p for p in mp.active_children() if p.name == f"lorasweep-{trial_id}"), None
            )
            if worker is not None:
                killed[trial_id] = worker.pid
                os.kill(worker.pid, signal.SIGKILL)

    monkeypatch.setattr(progress_mod.Progress, "progress", progress)
    out = run_sweep(spec, run, backend="local", quiet=True, report=False)
    assert len(killed) == 1, "the kill hook never fired"
    (victim,) = killed
    assert out.ran == 2 and out.statuses == {"pending": 1, "complete": 1}
    with open_store(run) as store:
        before = {t["id"]: t for t in store.trials()}
    assert before[victim]["status"] == "pending"
    assert before[victim]["error"].startswith("interrupted: worker process")
    assert not psutil.pid_exists(killed[victim])
    (other,) = set(before) - {victim}

    monkeypatch.setattr(progress_mod.Progress, "progress", real_progress)
    out = run_sweep(spec, run, backend="local", quiet=True, report=False)  # a plain resume
    assert out.ran == 1 and out.skipped == 1 and out.statuses == {"complete": 2}
    with open_store(run) as store:
        after = {t["id"]: t for t in store.trials()}
    assert after[victim]["status"] == "complete" and after[victim]["attempts"] == 2
    assert after[victim]["error"] is None
    assert after[other] == before[other]  # nothing else touched


# ------------------------------------------------------------------------------------------
# SIGKILL of the sweep (parent) at random points, five times, then resume to the end


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        time.sleep(0.1)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _decisions(run: Path) -> list:
    if not (run / "lorasweep.db").exists():
        return []
    with open_store(run) as store:
        return (store.meta().get("prune") or {}).get("decisions", [])


def _snapshot(run: Path) -> dict[str, dict]:
    if not (run / "lorasweep.db").exists():
        return {}
    with open_store(run) as store:
        return {t["id"]: t for t in store.trials()}


@pytest.mark.slow  # five kills at random points of a real sweep, then the resume: minutes
@pytest.mark.parametrize("prune", [False, True], ids=["plain", "pruned"])
def test_parent_sigkill_five_times_then_resume(tiny_bert_dir, tiny_csv, tmp_path, prune):
    """With --prune the kills also land between rung segments, checkpoint moves and rung
    decisions: every trial still ends once, and a decision once stored never changes."""
    spec = _spec(tiny_bert_dir, tiny_csv, grid={"rank": [2, 4]}, seeds=[0, 1])
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lorasweep",
        "run",
        str(spec_path),
        "--out",
        str(run),
        "--backend",
        "local",
        "--quiet",
    ] + (["--prune", "--prune-min-steps", "2"] if prune else [])  # one rung, at step 2 of 4
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rng = random.Random(20240601)
    finished: dict[str, dict] = {}  # trial id -> its row when first seen finished
    decisions: list = []  # the first stored rung decisions
    log = []
    for i in range(5):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the pruned sweep is done in ~15 s: shorter delays land its kills mid-work
        delay = rng.uniform(1.0, 14.0 if prune else 30.0)
        seen: set[int] = set()
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            seen |= _descendants(proc.pid)  # the forkserver, workers, resource tracker
            time.sleep(0.05)
        seen |= _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the workers notice within 0.5 s and the forkserver at once; the deadline is only for
        # a failure, generous because a loaded 2-core machine may not schedule them for seconds
        stray = _wait_gone(seen, timeout=30)
        assert not stray, f"kill {i}: processes outlived the sweep: {stray}"
        rows = _snapshot(run)
        log.append((round(delay, 1), sorted(t["status"] for t in rows.values())))
        for tid, t in rows.items():
            if t["status"] in ("complete", "pruned"):
                finished.setdefault(tid, t)
                assert t == finished[tid], "a finished trial changed"  # never run twice
        decisions = _decisions(run) or decisions
        assert _decisions(run)[: len(decisions)] == decisions, "a rung decision changed"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _snapshot(run)
    planned = {t.id for t in load_spec(spec).trials()}
    assert set(rows) == planned and len(rows) == 4
    final = {"complete", "pruned"} if prune else {"complete"}
    assert all(t["status"] in final for t in rows.values()), log
    assert not list(run.glob("trials/*/checkpoints/*")), "a rung checkpoint was left behind"
    if prune:
        assert [d["step"] for d in _decisions(run)] == [2]
        assert _decisions(run)[: len(decisions)] == decisions
        assert all(t["metrics"]["train_segments"] == 2 for t in rows.values()
                   if t["status"] == "complete")  # fmt: skip
    for tid, t in finished.items():
        assert rows[tid] == t, "a finished trial was re-run or changed"
    with open_store(run) as store:
        assert store.integrity_check() == "ok"
        n = store._db.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM trials").fetchone()
        assert tuple(n) == (4, 4)
    print("kills (delay s, statuses after):", log)

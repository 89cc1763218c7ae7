"""Packing trials onto GPUs by estimated memory, with simulated devices: the rules of
``run.packing.Packer``, the local backend's scheduling and its OOM retry (scripted workers), and
a real sweep on CPU whose "GPUs" are simulated (the children train on CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.backends import RunContext, get_backend
from lorasweep.run.backends.local import LocalBackend, _Running
from lorasweep.run.packing import Device, Packer, gpu_fraction
from lorasweep.run.sweep import run_sweep
from lorasweep.store import open_store

GiB = 1024**3


def _devices(*gib: float) -> list[Device]:
    return [Device(str(i), g * GiB) for i, g in enumerate(gib)]


def test_memory_mode_fills_a_gpu_by_estimates_and_margin() -> None:
    p = Packer(_devices(24))
    assert [p.place(t, 10 * GiB) for t in "abc"] == ["0", "0", None]  # 11 + 11 <= 24 < 33
    p.release("a")
    assert p.place("c", 10 * GiB) == "0"
    q = Packer(_devices(24), margin=0.25)  # 12.5 + 12.5 > 24
    assert [q.place(t, 10 * GiB) for t in "ab"] == ["0", None]


def test_the_least_loaded_gpu_first_and_later_trials_backfill() -> None:
    p = Packer(_devices(24, 80))
    assert p.place("a", 30 * GiB) == "1"  # fits only the big one
    assert p.place("b", 5 * GiB) == "1"  # 80 - 33 free there, more than 24
    assert p.place("c", 50 * GiB) is None  # no room now: waits
    assert p.place("d", 5 * GiB) == "1"  # a later trial that fits may start meanwhile
    assert p.place("e", 40 * GiB) is None and p.place("f", 20 * GiB) == "1"


def test_unknown_or_oversized_trials_run_alone_and_alone_is_exclusive() -> None:
    p = Packer(_devices(24))
    assert p.place("big", 40 * GiB) == "0"  # would not fit even an empty GPU: tries alone
    assert p.place("small", 1 * GiB) is None  # nothing joins an exclusive GPU
    p.release("big")
    assert p.place("small", 1 * GiB) == "0"
    assert p.place("unknown", None) is None  # no estimate: waits for an empty GPU
    assert p.place("retry", 1 * GiB, alone=True) is None
    p.release("small")
    assert p.place("retry", 1 * GiB, alone=True) == "0"
    assert p.place("small2", 1 * GiB) is None


def test_count_mode_ignores_estimates() -> None:
    p = Packer(_devices(24, 24), per_gpu=2)
    assert [p.place(t, 100 * GiB) for t in "abcde"] == ["0", "1", "0", "1", None]
    assert p.slots == 4
    with pytest.raises(ValueError, match="--per-gpu"):
        Packer(_devices(24), per_gpu=0)


def test_gpu_fraction_for_ray() -> None:
    assert gpu_fraction(10 * GiB, 80 * GiB) == pytest.approx(0.14)  # 11 / 80 = 0.1375 -> 0.14
    assert gpu_fraction(None, 80 * GiB) == 1.0
    assert gpu_fraction(90 * GiB, 80 * GiB) == 1.0
    assert gpu_fraction(10 * GiB, 80 * GiB, per_gpu=4) == 0.25


def test_backend_options_are_checked() -> None:
    with pytest.raises(ValueError, match="--jobs: must be >= 1 or auto"):
        LocalBackend(jobs="many")
    with pytest.raises(ValueError, match="--per-gpu: sets the trials per GPU"):
        LocalBackend(jobs=2, per_gpu=2)
    with pytest.raises(ValueError, match="the inprocess backend runs one trial at a time"):
        get_backend("inprocess", jobs="auto")


# -- the local backend's schedule, with scripted workers ------------------------------------


class _Scripted(LocalBackend):
    """Workers replaced by a script: a trial OOMs when more than ``room`` trials share its GPU
    when it ends; every start is logged as (trial id, gpu, trials then running)."""

    def __init__(self, room: int, **kw: object) -> None:
        super().__init__(**kw)
        self.room, self.log, self.on_gpu = room, [], {}

    def _start(self, trial, ctx, gpu, threads, slot):  # noqa: ANN001, ANN202
        ctx.on_start(trial)
        self.on_gpu[trial.id] = gpu
        run = _Running(None, None, trial, slot, None, gpu)
        self.log.append((trial.id, gpu, len(self.on_gpu)))
        return {len(self.log): run}

    def _finished(self, running, ctx) -> Iterator[tuple[_Running, TrialResult]]:  # noqa: ANN001
        self.max_running = max(self.max_running, len(running))
        key = min(running)  # the oldest ends first
        run = running.pop(key)
        crowd = sum(g == run.gpu for g in self.on_gpu.values())
        del self.on_gpu[run.trial.id]
        status = TrialStatus.OOM if crowd > self.room else TrialStatus.COMPLETE
        yield run, TrialResult(run.trial.id, status, error="CUDA out of memory" if crowd > 1
                               and status == TrialStatus.OOM else None)  # fmt: skip


def _trials(n: int) -> list[Trial]:
    return [Trial(config={"i": i}, variant="lora", rank=2, seed=0) for i in range(n)]


def _ctx(tmp_path: Path, estimates: dict[str, float], stored: list) -> RunContext:
    return RunContext(out_dir=tmp_path, cache_root=tmp_path, estimates=estimates,
                      on_requeue=stored.append)  # fmt: skip


def test_packed_schedule_and_an_oom_beside_others_is_stored_then_retried_alone(
    monkeypatch, tmp_path
) -> None:
    import lorasweep.run.backends.local as local

    monkeypatch.setattr(local, "_gpu_ids", lambda: ["0"])
    monkeypatch.setattr(local, "gpu_capacities", lambda ids: [24 * GiB])
    be = _Scripted(room=1, jobs="auto")  # the estimates say 2 fit; the "GPU" holds only 1
    stored: list[TrialResult] = []
    trials = _trials(3)
    results = list(be.run(trials, _ctx(tmp_path, {t.id: 10 * GiB for t in trials}, stored)))
    assert be.max_running == 2
    t0 = trials[0].id
    assert [r.trial_id for r in stored] == [t0]  # recorded, then run again alone
    assert stored[0].status == TrialStatus.OOM
    assert "out of memory beside 1 other trial(s) on GPU 0; run again alone" in stored[0].error
    assert sorted(r.trial_id for r in results) == sorted(t.id for t in trials)  # once each
    final = {r.trial_id: r.status for r in results}
    assert set(final.values()) == {TrialStatus.COMPLETE}  # t0 alone fits; t1 ended alone
    retry = [entry for entry in be.log if entry[0] == t0][-1]
    assert retry[2] == 1  # nothing else ran on the GPU beside the retry
    assert be.width(trials, {t.id: 10 * GiB for t in trials}) == 2


def test_an_oom_alone_is_final_and_per_gpu_forces_the_count(monkeypatch, tmp_path) -> None:
    import lorasweep.run.backends.local as local

    monkeypatch.setattr(local, "_gpu_ids", lambda: ["0", "1"])
    monkeypatch.setattr(local, "gpu_capacities", lambda ids: [24 * GiB, 24 * GiB])
    be = _Scripted(room=0, per_gpu=3)
    stored: list[TrialResult] = []
    results = list(be.run(_trials(6), _ctx(tmp_path, {}, stored)))
    assert be.max_running == 6  # 3 per GPU, no estimates needed
    assert {r.status for r in results} == {TrialStatus.OOM}  # alone too: stored as it is
    assert len(stored) == 6 and len(results) == 6


def test_jobs_auto_on_cpu_is_one_at_a_time(monkeypatch) -> None:
    import lorasweep.run.backends.local as local

    monkeypatch.setattr(local, "_gpu_ids", lambda: [])
    be = LocalBackend(jobs="auto")
    assert be.packer() is None and len(be._slots()[0]) == 1
    with pytest.raises(ValueError, match="--per-gpu: no GPU is visible"):
        LocalBackend(per_gpu=2)  # at construction: before any run folder is made


# -- a real sweep whose GPUs are simulated ----------------------------------------------------


def test_a_real_sweep_packed_on_simulated_gpus_matches_one_at_a_time(
    monkeypatch, tiny_bert_dir, tiny_csv, tmp_path
) -> None:
    """Workers train on CPU (CUDA_VISIBLE_DEVICES names a GPU this machine does not have);
    the parent packs them by the estimator's CPU figures on a simulated 4 GiB GPU."""
    import lorasweep.run.backends.local as local

    spec = {
        "name": "packed", "task": "classification", "model": str(tiny_bert_dir),
        "dataset": {"source": str(tiny_csv), "max_length": 32, "max_eval_examples": 40},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_steps": 3},
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.0},
        "grid": {"rank": [2, 4]}, "seeds": [0],
    }  # fmt: skip
    run_sweep(spec, tmp_path / "one", backend="local", jobs=1, quiet=True, report=False)
    monkeypatch.setattr(local, "_gpu_ids", lambda: ["0"])
    monkeypatch.setattr(local, "gpu_capacities", lambda ids: [4 * GiB])
    out = run_sweep(spec, tmp_path / "packed", backend="local", jobs="auto", quiet=True,
                    report=False)  # fmt: skip
    assert out.statuses == {"complete": 2}
    with open_store(tmp_path / "one") as a, open_store(tmp_path / "packed") as b:
        one = {t["id"]: t["metrics"] for t in a.trials()}
        packed = {t["id"]: t["metrics"] for t in b.trials()}
        (s1, f1), (s2, f2) = [(t["started"], t["finished"]) for t in b.trials()]
    assert s1 < f2 and s2 < f1  # they ran at the same time on the one "GPU"
    for tid, m in one.items():
        assert packed[tid]["accuracy"] == pytest.approx(m["accuracy"], abs=1e-4)
        assert packed[tid]["estimated_peak_bytes"] < 2 * GiB  # both fit the 4 GiB "GPU"


def test_the_store_keeps_the_oom_then_the_retry(monkeypatch, tiny_bert_dir, tiny_csv,
                                                tmp_path) -> None:  # fmt: skip
    """Through run_sweep and the real store: the OOM beside others is recorded, the trial is
    marked running again, and its retry alone replaces it (two attempts)."""
    import lorasweep.run.backends.local as local
    import lorasweep.run.sweep as sweep

    monkeypatch.setattr(local, "_gpu_ids", lambda: ["0"])
    monkeypatch.setattr(local, "gpu_capacities", lambda ids: [4 * GiB])
    monkeypatch.setattr(sweep, "get_backend", lambda *a, **k: _Scripted(room=1, jobs="auto"))
    spec = {
        "name": "oom", "task": "classification", "model": str(tiny_bert_dir),
        "dataset": {"source": str(tiny_csv), "max_length": 32},
        "training": {"max_steps": 1}, "lora": {"target_modules": ["query", "value"]},
        "grid": {"rank": [2, 4]}, "seeds": [0],
    }  # fmt: skip
    out = run_sweep(spec, tmp_path / "run", jobs="auto", quiet=True, report=False)
    assert out.statuses == {"complete": 2}
    with open_store(tmp_path / "run") as store:
        attempts = sorted(t["attempts"] for t in store.trials())
    assert attempts == [1, 2]


def test_an_oom_before_a_retry_keeps_what_earlier_rungs_recorded(tmp_path) -> None:
    """What the sweep records before a retry alone (``on_requeue``): pending with the reason, so
    a stopped sweep re-runs it, with an earlier rung's metrics and artifacts kept."""
    trial = _trials(1)[0]
    with open_store(tmp_path, create=True) as store:
        store.add_trials([trial])
        store.mark_running(trial.id)
        store.save_result(TrialResult(trial.id, TrialStatus.PENDING, metrics={"accuracy": 0.7},
                                      artifacts={"paused": {"step": 4}}))  # fmt: skip
        store.mark_interrupted(trial.id, "out of memory beside 1 other trial(s) on GPU 0")
        row = store.trials()[0]
        assert store.status_of(trial.id).is_active  # a plain resume selects it again
    assert row["status"] == "pending" and row["metrics"] == {"accuracy": 0.7}
    assert row["artifacts"] == {"paused": {"step": 4}} and "beside 1 other" in row["error"]

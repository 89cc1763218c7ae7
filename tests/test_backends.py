"""Backends are interchangeable: local (--jobs, GPU pinning, threads) and Ray give the same
stored results as each other for the same seeds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lorasweep.run.backends import get_backend
from lorasweep.run.backends.local import LocalBackend
from lorasweep.run.sweep import run_sweep
from lorasweep.store import open_store

# metrics that depend only on the seed and the data, not on timing or the machine's load
DETERMINISTIC = (
    "accuracy",
    "f1",
    "eval_loss",
    "train_loss",
    "train_loss_mean",
    "trainable_params",
    "effective_rank",
)


def _spec(model_dir: Path, csv: Path, **over: object) -> dict:
    spec = {
        "name": "backends",
        "task": "classification",
        "model": str(model_dir),
        "dataset": {"source": str(csv), "max_length": 32, "max_eval_examples": 40},
        "training": {
            "learning_rate": 5e-3,
            "per_device_train_batch_size": 8,
            "max_steps": 4,
            "logging_steps": 1,
        },
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.0},
        "grid": {"rank": [2, 4]},
        "seeds": [0],
    }
    spec.update(over)
    return spec


def _stored(run: Path) -> dict[str, dict]:
    with open_store(run) as store:
        return {t["id"]: {**t, "curves": store.curves_of(t["id"])} for t in store.trials()}


def _assert_same_results(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert set(a) == set(b)
    for tid in a:
        ta, tb = a[tid], b[tid]
        assert ta["status"] == tb["status"] == "complete", (ta["error"], tb["error"])
        for k in DETERMINISTIC:
            assert ta["metrics"][k] == pytest.approx(tb["metrics"][k], abs=1e-6, rel=1e-6), k
        la, lb = ta["curves"]["train_loss"], tb["curves"]["train_loss"]
        assert [s for s, _ in la] == [s for s, _ in lb]
        assert [v for _, v in la] == pytest.approx([v for _, v in lb], abs=1e-6)


# ------------------------------------------------------------------------------------------
# local backend


def test_unknown_backend_and_bad_jobs():
    with pytest.raises(ValueError, match="--backend"):
        get_backend("slurm")
    with pytest.raises(ValueError, match="--jobs"):
        LocalBackend(jobs=0)


def test_local_slots_pin_one_gpu_each_and_keep_the_parents_mask(monkeypatch):
    import lorasweep.run.backends.local as local

    monkeypatch.setattr(local, "_gpu_ids", lambda: ["3", "5"])
    assert LocalBackend(jobs=2)._slots() == (["3", "5"], None)
    with pytest.raises(ValueError, match="only 2 GPUs"):
        LocalBackend(jobs=3)._slots()

    import torch

    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert local._gpu_ids() == ["4", "6"]  # the physical ids the parent was given
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert local._gpu_ids() == ["0", "1"]


def test_local_cpu_threads_are_a_share_of_the_cores(monkeypatch):
    import lorasweep.run.backends.local as local

    monkeypatch.setattr(local, "_gpu_ids", lambda: [])
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert LocalBackend(jobs=2)._slots() == ([None, None], 4)
    assert LocalBackend(jobs=3)._slots() == ([None] * 3, 2)
    assert LocalBackend(jobs=16)._slots()[1] == 1


def test_local_jobs_2_same_results_as_jobs_1(tiny_bert_dir, tiny_csv, tmp_path):
    """Two workers at once, each with its share of the cores; numbers match one at a time."""
    spec = _spec(tiny_bert_dir, tiny_csv)
    run_sweep(spec, tmp_path / "j1", backend="local", jobs=1, quiet=True, report=False)
    out = run_sweep(spec, tmp_path / "j2", backend="local", jobs=2, quiet=True, report=False)
    assert out.statuses == {"complete": 2}
    a, b = _stored(tmp_path / "j1"), _stored(tmp_path / "j2")
    cores = os.cpu_count() or 1
    assert {t["environment"]["torch_threads"] for t in b.values()} == {max(1, cores // 2)}
    assert {t["environment"]["torch_threads"] for t in a.values()} == {cores}
    # thread count changes the order of float reductions: equal to float32 noise, not bitwise
    for tid in a:
        for k in ("accuracy", "eval_loss", "train_loss"):
            assert a[tid]["metrics"][k] == pytest.approx(b[tid]["metrics"][k], abs=1e-4), k


# ------------------------------------------------------------------------------------------
# Ray backend


def test_ray_missing_is_one_clear_line(monkeypatch, tmp_path):
    from lorasweep.run.backends import RunContext
    from lorasweep.run.backends.ray import RayBackend

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'lorasweep\[ray\]'"):
        next(RayBackend().run([], RunContext(out_dir=tmp_path, cache_root=tmp_path)))


def test_ray_unreachable_address_is_one_clear_line(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from lorasweep.run.backends import RunContext
    from lorasweep.run.backends.ray import RayBackend

    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # "auto" joins any Ray cluster running on this machine (found in `ps` or in the temp dir's
    # ray_current_cluster): on a shared machine, another engineer's test run. Hide them, so
    # "no cluster" is what this test sees whatever else runs here.
    from ray._private import services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    if hasattr(services, "_find_address_from_flag"):  # the `ps` scan behind find_gcs_addresses
        monkeypatch.setattr(services, "_find_address_from_flag", lambda flag: set())
    with pytest.raises(ValueError, match="--address: cannot reach a Ray cluster at 'auto'"):
        next(RayBackend(address="auto").run([], RunContext(out_dir=tmp_path, cache_root=tmp_path)))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance started (and stopped) by the test: all CPUs, no dashboard.

    address="local" always starts a new instance: never joins RAY_ADDRESS or a cluster that
    someone else started on this machine."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


def test_ray_same_stored_results_as_local(local_ray, tiny_bert_dir, tiny_csv, tmp_path):
    spec = _spec(tiny_bert_dir, tiny_csv)
    local = run_sweep(spec, tmp_path / "local", backend="local", quiet=True, report=False)
    ray_out = run_sweep(spec, tmp_path / "ray", backend="ray", quiet=True, report=False)
    assert local.statuses == ray_out.statuses == {"complete": 2}
    a, b = _stored(tmp_path / "local"), _stored(tmp_path / "ray")
    _assert_same_results(a, b)
    # each Ray task ran in its own worker process with the same thread share as a local worker
    assert [t["environment"]["torch_threads"] for t in b.values()] == [
        t["environment"]["torch_threads"] for t in a.values()
    ]
    # resume through Ray: nothing left to run
    assert run_sweep(spec, tmp_path / "ray", backend="ray", quiet=True, report=False).ran == 0


def test_ray_and_local_pruned_trials_resume_across_processes(
    local_ray, tiny_bert_dir, tiny_csv, tmp_path
):
    """--prune with one rung (step 2 of 4): each trial pauses in one worker process and resumes
    from its checkpoint in another (a fork, a Ray task); the numbers equal an unpaused run."""
    from lorasweep.run.pruning import PruneSettings

    spec = _spec(tiny_bert_dir, tiny_csv, seeds=[0, 1])  # 2 ranks: one configuration alone
    # would skip its rungs (nothing to compare)
    prune = PruneSettings(min_steps=2)
    plain = _stored_run(spec, tmp_path / "plain", backend="inprocess")
    for backend in ("local", "ray"):
        out = run_sweep(spec, tmp_path / backend, backend=backend, quiet=True, report=False,
                        prune=prune)  # fmt: skip
        assert out.statuses == {"complete": 4} and out.ran == 8  # 4 trials x 2 segments
        got = _stored(tmp_path / backend)
        _assert_same_results(plain, got)
        for t in got.values():
            assert t["metrics"]["train_segments"] == 2 and t["attempts"] == 2
            assert [s for s, _ in t["curves"]["eval_accuracy"]] == [2, 4]


def _stored_run(spec: dict, out: Path, backend: str) -> dict[str, dict]:
    run_sweep(spec, out, backend=backend, quiet=True, report=False)
    return _stored(out)


def test_ray_worker_death_is_classified(local_ray):
    from lorasweep.records import Trial, TrialStatus
    from lorasweep.run.backends.ray import _collect

    ray = local_ray
    trial = Trial(config={"x": 1}, variant="lora", rank=2, seed=0)

    @ray.remote(max_retries=0)
    def die() -> None:
        os._exit(1)

    @ray.remote(max_retries=0)
    def boom() -> None:
        raise RuntimeError("outside train_trial")

    res = _collect(ray, die.remote(), trial)
    assert res.status == TrialStatus.PENDING and res.error.startswith("interrupted")
    res = _collect(ray, boom.remote(), trial)
    assert res.status == TrialStatus.FAILED and "outside train_trial" in res.error

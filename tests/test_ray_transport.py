"""Ray without a shared filesystem: trials get the tokenized data and their checkpoint through
Ray's object store, and return their files with their result; the parent writes them into the
run folder (``transport``, plain Python; the Ray tasks in ``ray``). Also the GPU share each Ray
task asks for when trials are packed onto GPUs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.backends import RunContext
from lorasweep.run.backends import ray as rb
from lorasweep.run.backends import transport as tr
from lorasweep.run.packing import gpu_fraction

GB = 1e9


def _trial(rank: int = 2) -> Trial:
    return Trial(config={"x": rank}, variant="lora", rank=rank, seed=0)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------
# files: pack, install into the run folder, rewrite the result's paths (no Ray needed)


def test_install_replaces_this_trials_entries_only_and_rewrites_paths(tmp_path):
    trial, other = _trial(2), _trial(4)
    out = tmp_path / "run"
    ctx = RunContext(out_dir=out, cache_root=out / "cache")
    mine = ctx.trial_dir(trial)
    _write(mine / "adapter" / "stale.bin", "from an earlier attempt")
    _write(mine / "checkpoints" / "step-2" / "state", "the rung before: kept until replaced")
    _write(ctx.trial_dir(other) / "adapter" / "a.bin", "another trial's")
    _write(out / "tensorboard" / "other" / "events", "another trial's events")

    root = tmp_path / "worker" / "run"  # the worker's temp run folder
    work = root / "trials" / trial.id
    _write(work / "adapter" / "adapter_model.safetensors", "weights")
    _write(work / "checkpoints" / "step-4" / "state", "this rung")
    _write(root / "tensorboard" / "s" / "lora" / "events", "mine")
    _write(root / "trials" / other.id / "adapter" / "a.bin", "must not land")
    result = TrialResult(
        trial.id,
        TrialStatus.PENDING,
        metrics={"accuracy": 0.5},
        environment={"python": "/usr/bin/python3", "near": f"{root}x/y"},
        artifacts={
            "adapter_dir": str(work / "adapter"),
            "paused": {"step": 4, "checkpoint": str(work / "checkpoints" / "step-4")},
            "listed": [str(work / "adapter"), 3],
        },
    )
    payload = {"result": result.to_dict(), "root": str(root), "files": tr.pack_dir(root)}
    shutil.rmtree(tmp_path / "worker")  # the task deletes its temp folder before returning

    got = tr.receive(payload, trial, ctx)
    assert got.status == TrialStatus.PENDING and got.metrics == {"accuracy": 0.5}
    assert got.artifacts["adapter_dir"] == str(mine / "adapter")
    assert got.artifacts["paused"] == {"step": 4, "checkpoint": str(mine / "checkpoints/step-4")}
    assert got.artifacts["listed"] == [str(mine / "adapter"), 3]
    assert got.environment == result.environment  # not under the worker's folder: unchanged
    assert (mine / "adapter" / "adapter_model.safetensors").read_text() == "weights"
    assert not (mine / "adapter" / "stale.bin").exists()  # the entry is replaced, not merged
    assert (mine / "checkpoints" / "step-4" / "state").read_text() == "this rung"
    assert (mine / "checkpoints" / "step-2" / "state").exists()  # the sweep removes it later
    assert (ctx.trial_dir(other) / "adapter" / "a.bin").read_text() == "another trial's"
    assert (out / "tensorboard" / "s" / "lora" / "events").read_text() == "mine"
    assert (out / "tensorboard" / "other" / "events").exists()
    assert [p.name for p in mine.iterdir() if p.name.startswith(".")] == []  # staging gone


def test_transport_imports_without_ray():
    code = (
        "import sys; sys.modules['ray'] = None\n"  # import ray -> ImportError
        "import lorasweep.run.backends.transport\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_unpack_refuses_paths_out_of_the_destination(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError):
        tr.unpack(buf.getvalue(), tmp_path / "dest")
    assert not (tmp_path / "evil").exists()


def test_task_arguments_hold_no_run_folder_path(tmp_path):
    """What travels to a task: the trial, its context without the run folder, the checkpoint's
    bytes for a resumed segment; never a path a remote node would have to see."""
    trial = _trial()
    out = tmp_path / "run"
    ckpt = _write(out / "trials" / trial.id / "checkpoints" / "step-2" / "optimizer.pt", "adam")
    ctx = RunContext(
        out_dir=out,
        cache_root=out / "cache",
        segments={trial.id: {"stop_at": 4, "resume_from": str(ckpt.parent)}},
        extra={"data_fingerprint": "f00d"},
    )
    args = tr.file_task_args(trial, ctx, 2, {"HF_HUB_OFFLINE": "1"}, None, "f00d")
    trial_dict, context, env, data, resume = args
    assert str(out) not in repr((trial_dict, context, env, data))
    assert context["segment"] == {"stop_at": 4, "resume_from": None}
    assert context["data_fingerprint"] == "f00d" and context["threads"] == 2
    assert "out_dir" not in context
    name, blob = resume
    assert name == "step-2"
    tr.unpack(blob, tmp_path / "got")
    assert (tmp_path / "got" / "step-2" / "optimizer.pt").read_text() == "adam"
    # the shared-folder task still gets the run folder, as before
    assert ctx.trial_context(trial, 2)["out_dir"] == str(out)


def test_the_task_trains_in_node_temp_folders_and_resumes_from_the_sent_checkpoint(
    tmp_path, monkeypatch
):
    """The task body, run here with a stand-in for train_trial: the data cache is extracted
    once per node and reused, the checkpoint is unpacked locally, the trial writes only under
    the task's temp folder (deleted afterwards), and the parent gets the files and paths."""
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(node_tmp))
    trial = _trial()
    out = tmp_path / "run"
    _write(out / "cache" / "data-k1" / "info.json", '{"num_labels": 2}')
    _write(out / "cache" / "data-k1" / "train" / "data.arrow", "rows")
    ckpt = _write(out / "trials" / trial.id / "checkpoints" / "step-2" / "trainer_state.json", "{}")
    ctx = RunContext(
        out_dir=out,
        cache_root=out / "cache",
        segments={trial.id: {"stop_at": 4, "resume_from": str(ckpt.parent)}},
    )
    stale = node_tmp / tr.NODE_DIR / "data" / "old"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * tr.STALE_AFTER,) * 2)
    seen: list[dict[str, Any]] = []

    def fake_train_trial(trial, workdir, *, cache_root, context):
        workdir = Path(workdir)
        resume = Path(context["segment"]["resume_from"])
        seen.append({"workdir": workdir, "cache_root": Path(cache_root), "resume": resume,
                     "out_dir": context["out_dir"]})  # fmt: skip
        assert json.loads((Path(cache_root) / "data-k1" / "info.json").read_text())
        assert (resume / "trainer_state.json").read_text() == "{}"
        _write(workdir / "adapter" / "adapter_model.safetensors", "weights")
        step4 = workdir / "checkpoints" / "step-4"
        _write(step4 / "trainer_state.json", '{"step": 4}')
        return TrialResult(trial.id, TrialStatus.PENDING,
                           artifacts={"paused": {"step": 4, "checkpoint": str(step4)}})  # fmt: skip

    fake = types.ModuleType("lorasweep.training.trial")
    fake.train_trial = fake_train_trial
    monkeypatch.setitem(sys.modules, "lorasweep.training.trial", fake)

    blob = tr.pack({"data-k1": out / "cache" / "data-k1"})
    data = ("d1", [blob])  # bytes stand in for the ObjectRef
    args = tr.file_task_args(trial, ctx, None, {}, data, None)
    payload = rb._ray_trial_files(*args)
    first = seen[0]
    for p in (first["workdir"], first["cache_root"], first["resume"], Path(first["out_dir"])):
        assert not p.is_relative_to(out) and p.is_relative_to(node_tmp), p
    assert first["cache_root"] == node_tmp / tr.NODE_DIR / "data" / "d1"
    # the task's temp folder is gone; the node's data cache stays for the next task, the
    # stale one went
    assert sorted(p.name for p in node_tmp.iterdir()) == [tr.NODE_DIR]
    assert sorted(p.name for p in (node_tmp / tr.NODE_DIR / "data").iterdir()) == ["d1"]

    got = tr.receive(payload, trial, ctx)
    step4 = ctx.trial_dir(trial) / "checkpoints" / "step-4"
    assert got.artifacts["paused"] == {"step": 4, "checkpoint": str(step4)}
    assert (step4 / "trainer_state.json").read_text() == '{"step": 4}'
    assert (ctx.trial_dir(trial) / "adapter" / "adapter_model.safetensors").exists()

    # a second task on this node reuses the extraction: garbage instead of the tar is never read
    rb._ray_trial_files(*tr.file_task_args(trial, ctx, None, {}, ("d1", [b"not a tar"]), None))
    assert seen[1]["cache_root"] == first["cache_root"]


# ------------------------------------------------------------------------------------------
# GPU shares (packing) and the scheduling loop, on a simulated cluster


def test_task_resources():
    assert rb._task_resources(False, 5 * GB, 80 * GB, None, 4) == {"num_cpus": 4, "num_gpus": 0}
    assert rb._task_resources(True, 5 * GB, 80 * GB, pack=False) == {"num_cpus": 1, "num_gpus": 1}
    # by memory: the estimate grown by 10 % over the smallest GPU, up to a hundredth
    share = rb._task_resources(True, 10 * GB, 80 * GB)["num_gpus"]
    assert share == gpu_fraction(10 * GB, 80 * GB) == 0.14
    # N per GPU: shares cut to Ray's 4 decimals, so N of them fit one GPU
    third = rb._task_resources(True, None, None, per_gpu=3)["num_gpus"]
    assert third == 0.3333 and 3 * third <= 1
    assert rb._task_resources(True, None, None, per_gpu=2)["num_gpus"] == 0.5
    # unknown estimate or capacity, or a trial that would not fit: a whole GPU
    assert rb._task_resources(True, None, 80 * GB)["num_gpus"] == 1
    assert rb._task_resources(True, 10 * GB, None)["num_gpus"] == 1
    assert rb._task_resources(True, 10 * GB, 0.0)["num_gpus"] == 1
    assert rb._task_resources(True, 90 * GB, 80 * GB)["num_gpus"] == 1


def test_jobs_and_per_gpu():
    assert rb.RayBackend(jobs="auto")._in_flight(2.0, [0.25, 0.5]) == 8
    assert rb.RayBackend(per_gpu=4)._in_flight(2.0, [0.25] * 3) == 8
    assert rb.RayBackend(jobs="auto")._in_flight(0.0, [0.0]) == 1  # CPUs: one at a time
    assert rb.RayBackend(jobs=3)._in_flight(2.0, [1.0]) == 3
    with pytest.raises(ValueError, match="--jobs"):
        rb.RayBackend(jobs=0)
    with pytest.raises(ValueError, match="--per-gpu"):
        rb.RayBackend(jobs=2, per_gpu=2)
    with pytest.raises(ValueError, match="--per-gpu"):
        rb.RayBackend(per_gpu=0)
    assert not rb.RayBackend().shared_folder  # the object store unless asked


_N1, _N2 = "a1" * 28, "b2" * 28  # Ray node ids: 28 bytes in hex


class _FakeRay:
    """Two GPU nodes (80 and 40 GB); tasks run when submitted, results from ``answer``."""

    def __init__(self, answer):
        import ray

        self.exceptions = ray.exceptions
        self.answer, self.calls, self.values = answer, [], {}

    def cluster_resources(self):
        return {"GPU": 2.0, "CPU": 16.0}

    def nodes(self):
        return [{"NodeID": n, "Alive": True, "Resources": {"GPU": 1.0, "CPU": 8.0}}
                for n in (_N1, _N2)]  # fmt: skip

    def remote(self, **kw):
        return lambda fn: _FakeTask(self, fn, kw)

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return [self.values[r] for r in ref] if isinstance(ref, list) else self.values[ref]

    def cancel(self, ref, force=False):
        pass


class _FakeTask:
    def __init__(self, ray, fn, opts):
        self.ray, self.fn, self.opts = ray, fn, opts

    def options(self, **kw):
        return _FakeTask(self.ray, self.fn, {**self.opts, **kw})

    def remote(self, *args):
        ref = object()
        self.ray.calls.append((self.fn.__name__, self.opts, args))
        self.ray.values[ref] = self.ray.answer(self.fn.__name__, self.opts, args)
        return ref


def test_packed_trials_ask_for_gpu_shares_and_an_oom_beside_others_runs_alone(tmp_path):
    small, big = _trial(2), _trial(4)
    sizes = {_N1: 80 * GB, _N2: 40 * GB}

    def answer(name, opts, args):
        if name == "_probe_gpu_memory":
            return sizes[opts["scheduling_strategy"].node_id]
        tid = args[0]["id"]
        if tid == big.id and opts["num_gpus"] < 1:  # out of memory while sharing a GPU
            return TrialResult(tid, TrialStatus.OOM, error="CUDA out of memory").to_dict()
        return TrialResult(tid, TrialStatus.COMPLETE, metrics={"gpu": opts["num_gpus"]}).to_dict()

    ray = _FakeRay(answer)
    requeued, started = [], []
    ctx = RunContext(out_dir=tmp_path, cache_root=tmp_path / "cache", on_start=started.append,
                     estimates={small.id: 3 * GB, big.id: 12 * GB},
                     on_requeue=requeued.append)  # fmt: skip
    be = rb.RayBackend(jobs="auto", shared_folder=True)
    results = {r.trial_id: r for r in be._run(ray, [small, big], ctx)}

    probes = [o for n, o, _ in ray.calls if n == "_probe_gpu_memory"]
    assert len(probes) == 2 and {p["num_gpus"] for p in probes} == {0.01}
    assert be._capacity == 40 * GB  # the smallest GPU
    trials = [(a[0]["id"], o) for n, o, a in ray.calls if n == "_ray_trial"]
    assert trials[0] == (small.id, {"max_calls": 1, "max_retries": 0, "num_cpus": 1,
                                    "num_gpus": gpu_fraction(3 * GB, 40 * GB)})  # fmt: skip
    assert trials[1][1]["num_gpus"] == gpu_fraction(12 * GB, 40 * GB) < 0.5
    assert trials[2] == (big.id, {**trials[1][1], "num_gpus": 1})  # again, on a whole GPU
    assert [r.status for r in requeued] == [TrialStatus.OOM]
    assert "shared GPU" in requeued[0].error and "CUDA out of memory" in requeued[0].error
    assert results[big.id].status == TrialStatus.COMPLETE and results[big.id].metrics["gpu"] == 1
    assert [t.id for t in started] == [small.id, big.id, big.id]

    # a second run (the next pruning rung) reuses the probed capacity; whole GPUs unpacked
    ray.calls.clear()
    list(be._run(ray, [small], ctx))
    assert [n for n, _, _ in ray.calls] == ["_ray_trial"]
    ray.calls.clear()
    list(rb.RayBackend(jobs=2, shared_folder=True)._run(ray, [small, big], ctx))
    assert [o["num_gpus"] for _, o, _ in ray.calls] == [1, 1]


# ------------------------------------------------------------------------------------------
# end to end on a local Ray instance


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of this test module (never joins someone else's cluster)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@contextmanager
def _nothing_shared(run: Path, source: Path):
    """Once the parent has put the data in the object store, make the run folder and the data
    source useless to a worker: the source and the run's cache move away, and ``trials`` is a
    file (a worker writing its trial folder there fails, even as root), except while the parent
    installs a trial's files."""
    hidden: list[tuple[Path, Path]] = []
    patch = pytest.MonkeyPatch()

    def hide(path: Path) -> None:
        if path.exists():
            path.rename(path.with_name(path.name + ".hidden"))
            hidden.append((path.with_name(path.name + ".hidden"), path))

    def block() -> None:
        hide(run / "trials")
        (run / "trials").write_text("not a folder")

    def unblock() -> None:
        (run / "trials").unlink()
        real = run / "trials.hidden"
        if real.exists():
            real.rename(run / "trials")
            hidden.remove((real, run / "trials"))

    submitter, install = rb.RayBackend._submitter, tr.install

    def submitter_then_hide(self, *args):
        out = submitter(self, *args)
        hide(source)
        hide(run / "cache")
        block()
        return out

    def install_unblocked(files, trial, ctx):
        unblock()
        try:
            install(files, trial, ctx)
        finally:
            block()

    patch.setattr(rb.RayBackend, "_submitter", submitter_then_hide)
    patch.setattr(tr, "install", install_unblocked)
    try:
        yield
    finally:
        patch.undo()
        if (run / "trials").is_file():
            unblock()
        for moved, back in hidden:
            moved.rename(back)


def test_object_store_sweep_equals_shared_folder_sweep(local_ray, tiny_bert_dir, tiny_csv,
                                                       tmp_path, monkeypatch):  # fmt: skip
    from safetensors.torch import load_file

    import lorasweep.run.sweep as sweep_mod
    from lorasweep.run.sweep import run_sweep
    from lorasweep.store import open_store

    csv = Path(shutil.copy(tiny_csv, tmp_path / "reviews.csv"))
    spec = {
        "name": "transport",
        "task": "classification",
        "model": str(tiny_bert_dir),
        "dataset": {"source": str(csv), "max_length": 32, "max_eval_examples": 40},
        "training": {
            "learning_rate": 5e-3,
            "per_device_train_batch_size": 8,
            "max_steps": 3,
            "logging_steps": 1,
        },
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.0},
        "grid": {"rank": [2]},
        "seeds": [0],
    }
    runs = {}
    for mode in ("shared", "objects"):
        out = tmp_path / mode
        shared = mode == "shared"
        monkeypatch.setattr(
            sweep_mod,
            "get_backend",
            lambda *a, shared=shared, **k: rb.RayBackend(shared_folder=shared),
        )
        if shared:
            done = run_sweep(spec, out, backend="ray", quiet=True, report=False)
        else:
            with _nothing_shared(out, csv):
                done = run_sweep(spec, out, backend="ray", quiet=True, report=False)
        assert done.statuses == {"complete": 1}, mode
        with open_store(out) as store:
            runs[mode] = store.trials()[0]

    a, b = runs["shared"], runs["objects"]
    assert b["status"] == "complete", b["error"]
    for k in ("accuracy", "f1", "eval_loss", "train_loss", "trainable_params", "adapter_bytes"):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], abs=1e-6, rel=1e-6), k
    adapter = b["artifacts"]["adapter_dir"]
    assert adapter == a["artifacts"]["adapter_dir"] == f"trials/{b['id']}/adapter"
    wa = load_file(tmp_path / "shared" / adapter / "adapter_model.safetensors")
    wb = load_file(tmp_path / "objects" / adapter / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].allclose(wb[name], atol=1e-6), name

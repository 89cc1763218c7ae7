"""Experiment tracking: one run per trial named after its config and seed, grouped per sweep,
with lorasweep's final metrics; MLflow (local file store), TensorBoard and W&B offline, no
network."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorasweep.training import tracking


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds.

    For files another process (the W&B service) writes on its own schedule: on a loaded machine
    it may lag behind the call that returned, so the test waits for exactly what it asserts."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No tracker variables from the outside; MLflow in a file store under tmp_path."""
    for key in (
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        "WANDB_RUN_GROUP",
        "WANDB_PROJECT",
        "TENSORBOARD_LOGGING_DIR",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking, "_SET", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores else
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _mlflow_runs(tmp_path: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id])


def _tb_scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------- units


def test_active_drops_none_and_unknown() -> None:
    assert tracking.active(["none"]) == []
    assert tracking.active(None) == []
    assert tracking.active("mlflow") == ["mlflow"]
    assert tracking.active(["tensorboard", "none", "wandb"]) == ["tensorboard", "wandb"]


def test_configure_groups_per_sweep_and_keeps_user_values(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tracking.configure(
        ["mlflow", "wandb", "tensorboard"],
        sweep="s1",
        run_name="s1/lora/r=8/seed=0",
        tensorboard_root=clean_env / "tb",
    )
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "s1"
    assert os.environ["WANDB_RUN_GROUP"] == "s1"
    assert os.environ["WANDB_PROJECT"] == "lorasweep"
    tb = Path(env["TENSORBOARD_LOGGING_DIR"])
    assert tb == clean_env / "tb" / "s1" / "lora" / "r=8" / "seed=0" and tb.is_dir()
    # a second sweep in the same process gets its own group; a user's own value is kept
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    tracking.configure(["mlflow", "wandb"], sweep="s2", run_name="s2/lora/r=8/seed=0")
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "s2"
    assert os.environ["WANDB_RUN_GROUP"] == "s2"
    assert os.environ["WANDB_PROJECT"] == "mine"


def test_check_tracking_names_the_problem(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking.check_tracking(["none"]) == []
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setattr(tracking, "_mlflow_major", lambda: 3)
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    (err,) = tracking.check_tracking(["mlflow"])
    assert err.startswith("report_to: MLFLOW_TRACKING_URI=file:") and "sqlite" in err
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    (err,) = tracking.check_tracking(["wandb"])
    assert err == (
        "report_to: wandb is not installed: pip install 'lorasweep[track]' (or pip install wandb)"
    )


def test_log_final_metrics_mlflow(clean_env: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    tracking.configure(["mlflow"], sweep="unit", run_name="unit/lora/r=2/seed=0")
    with mlflow.start_run(run_name="unit/lora/r=2/seed=0"):
        mlflow.log_metric("loss", 0.7, step=1)
    done = tracking.log_final_metrics(
        ["mlflow"],
        "unit/lora/r=2/seed=0",
        {"accuracy": 0.75, "f1": 0.7, "train_steps": 4.0, "bad": float("nan"), "note": "x"},
        status="complete",
        tags={"lorasweep.trial_id": "abc"},
    )
    assert done == ["mlflow"]
    (run,) = _mlflow_runs(clean_env, "unit")
    assert run.data.metrics["final/accuracy"] == 0.75
    assert run.data.metrics["final/f1"] == 0.7
    assert "final/bad" not in run.data.metrics and "final/note" not in run.data.metrics
    assert run.data.tags["lorasweep.status"] == "complete"
    assert run.data.tags["lorasweep.trial_id"] == "abc"
    assert mlflow.active_run() is None


def test_log_final_metrics_closes_a_run_left_open_by_a_failed_trial(clean_env: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    tracking.configure(["mlflow"], sweep="unit", run_name="unit/lora/r=4/seed=0")
    mlflow.start_run(run_name="unit/lora/r=4/seed=0")  # the Trainer raised before ending it
    done = tracking.log_final_metrics(
        ["mlflow"], "unit/lora/r=4/seed=0", {"train_seconds": 1.5}, status="failed"
    )
    assert done == ["mlflow"]
    assert mlflow.active_run() is None
    (run,) = _mlflow_runs(clean_env, "unit")
    assert run.info.status == "FAILED"
    assert run.data.metrics["final/train_seconds"] == 1.5


def test_log_final_metrics_tensorboard(clean_env: Path) -> None:
    pytest.importorskip("tensorboard")
    root = clean_env / "tb"
    done = tracking.log_final_metrics(
        ["tensorboard"],
        "unit/lora/r=2/seed=1",
        {"accuracy": 0.5, "train_steps": 3},
        tensorboard_root=root,
    )
    assert done == ["tensorboard"]
    scalars = _tb_scalars(root / "unit" / "lora" / "r=2" / "seed=1")
    assert scalars["final/accuracy"] == [0.5]


def test_log_final_metrics_wandb_offline(clean_env: Path) -> None:
    wandb = pytest.importorskip("wandb")
    run = wandb.init(project="lorasweep", name="unit/lora/r=2/seed=0", group="unit")
    run.log({"loss": 0.9})
    done = tracking.log_final_metrics(
        ["wandb"], "unit/lora/r=2/seed=0", {"accuracy": 0.625}, status="complete"
    )
    assert done == ["wandb"]
    assert wandb.run is None  # finished: the next in-process trial gets a run of its own
    # wandb.finish() returns once the service has the run's records, not once its writer has
    # flushed them to the offline .wandb file (under load that file was read with only its
    # header). Shutting the service down waits for its writers; the poll covers a service this
    # process does not own (teardown then returns at once).
    wandb.teardown()

    pattern = "wandb/offline-run-*/run-*.wandb"

    def logged() -> bool:
        return any(b"final/accuracy" in f.read_bytes() for f in clean_env.glob(pattern))

    wait_for(logged, f"final/accuracy in {clean_env / pattern}")
    assert len(list(clean_env.glob(pattern))) == 1  # one run, one file


def test_a_tracker_error_never_raises(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> bool:
        raise RuntimeError("tracker down")

    monkeypatch.setattr(tracking, "_mlflow", boom)
    with pytest.warns(UserWarning, match="tracker down"):
        assert tracking.log_final_metrics(["mlflow"], "x/y", {"accuracy": 1.0}) == []


# ----------------------------------------------------------------------------- a real sweep


def test_sweep_logs_one_run_per_trial_to_mlflow_and_tensorboard(
    clean_env: Path, tiny_bert_dir: Path, tiny_csv: Path
) -> None:
    """2 trials (ranks 2 and 4, one seed, 3 steps) in process, reported to MLflow and
    TensorBoard: one MLflow run per trial named <sweep>/<variant>/r=<r>/seed=<s> in the sweep's
    experiment, with the Trainer's training loss and lorasweep's final metrics."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from lorasweep.run.sweep import run_sweep
    from lorasweep.store import open_store
    from lorasweep.training import trial as trial_mod

    spec = {
        "name": "tracked",
        "task": "classification",
        "model": str(tiny_bert_dir),
        "dataset": {"source": str(tiny_csv), "max_length": 32, "max_eval_examples": 24},
        "training": {"per_device_train_batch_size": 8, "max_steps": 3},
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.0},
        "grid": {"rank": [2], "learning_rate": [1e-3, 2e-3]},
        "seeds": [0],
        "report_to": ["mlflow", "tensorboard"],
    }
    out = clean_env / "run"
    outcome = run_sweep(spec, out, backend="inprocess", quiet=True, report=False)
    assert outcome.statuses == {"complete": 2}
    with open_store(out) as store:
        trials = {f"tracked/{t['label']}": t for t in store.trials()}

    runs = _mlflow_runs(clean_env, "tracked")
    by_name = {r.info.run_name: r for r in runs}
    assert (
        sorted(by_name)
        == sorted(trials)
        == ["tracked/lora/r=2/lr=0.001/seed=0", "tracked/lora/r=2/lr=0.002/seed=0"]
    )
    for name, run in by_name.items():
        assert run.info.status == "FINISHED"
        assert "loss" in run.data.metrics  # logged by the Trainer's MLflowCallback
        assert "train_loss" in run.data.metrics

    if getattr(trial_mod, "tracking", None) is not tracking:
        pytest.skip(
            "trial.py does not call lorasweep.training.tracking yet (final metrics, TB folder)"
        )
    for name, run in by_name.items():
        acc = trials[name]["metrics"]["accuracy"]
        assert run.data.metrics["final/accuracy"] == pytest.approx(acc)
        assert run.data.tags["lorasweep.status"] == "complete"
        assert run.data.tags["lorasweep.trial_id"] == trials[name]["id"]
        lr = trials[name]["config"]["training"]["learning_rate"]  # the grid's setting, tagged
        assert run.data.tags["lorasweep.learning_rate"] == str(lr)
        # TensorBoard: out/tensorboard/<sweep>/<variant>/r=<r>/seed=<s>, kept after the trial
        scalars = _tb_scalars(out / "tensorboard" / name)
        assert "train/loss" in scalars
        assert scalars["final/accuracy"] == [pytest.approx(acc)]

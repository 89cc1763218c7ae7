"""Experiment tracking: one run per trial named after its config and seed, grouped per sweep,
with lorasweep's final metrics; MLflow (local file store), TensorBoard and W&B offline, no
network."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No tracker variables from the outside; MLflow in a file store under tmp_path. W&B is
    torn down after the test: its process-wide settings (WANDB_DIR, silence) are read once."""
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
    yield tmp_path
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


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


def _tb_hparams(log_dir: Path) -> tuple[dict[str, Any], int]:
    """The HParams session of a TensorBoard run: its parameters and its end status."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    params = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return params, end.status


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``),
    then LevelDB-log chunks in 32 KiB blocks: crc32, length, type (1 full, 2 first, 3 middle,
    4 last), each a piece of a serialized ``Record``. W&B has no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and n == 0):  # the block's padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _wandb_config(path: Path) -> dict[str, Any]:
    """The top-level config of an offline W&B run, as the run's records set it."""
    config: dict[str, Any] = {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        updates = (
            r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        )
        for item in updates:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


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


def test_configure_silences_wandb_unless_the_user_chose(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B reads the environment once per process: the settings go to its set-up too, so a
    second sweep in the same process gets its own group, and the banner stays off."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_SILENT")
    tracking.configure(["wandb"], sweep="s1", run_name="s1/lora/r=8/seed=0")
    assert wandb.setup().settings.silent is True
    tracking.configure(["wandb"], sweep="s2", run_name="s2/lora/r=8/seed=0")
    assert wandb.setup().settings.run_group == "s2"
    wandb.teardown()
    monkeypatch.setenv("WANDB_SILENT", "false")  # the user's choice is kept
    tracking.configure(["wandb"], sweep="s3", run_name="s3/lora/r=8/seed=0")
    assert wandb.setup().settings.silent is False


def test_trial_params_name_the_configuration() -> None:
    from lorasweep.plan import plan
    from lorasweep.spec import parse_spec

    spec = parse_spec(
        {
            "name": "p",
            "task": "classification",
            "model": "builtin:minilm-l6",
            "dataset": {"source": "builtin:rotten-tomatoes"},
            "training": {"max_steps": 10, "learning_rate": 2e-3},
            "lora": {"target_modules": ["query", "value"], "alpha": "2*rank"},
            "grid": {"rank": [4], "dropout": [0.0, 0.1]},
            "seeds": [3],
            "variants": {
                "lora": {},
                "ada": {"method": "adalora", "init_r": 12, "target_r": 8},
                "pat": {"rank_pattern": {"attention": 6, "mlp": 10}},
                "q": {"quantization": "4bit", "alpha": 16},
            },
        }
    )
    trials = {t.label: t for t in plan(spec)}
    params = {label: tracking.trial_params(t, "p") for label, t in trials.items()}
    assert params["lora/r=4/dropout=0.1/seed=3"] == {
        "dropout": 0.1,  # the grid's setting
        "rank": 4,
        "alpha": 8.0,
        "alpha_policy": "2*rank",
        "scale": 2.0,
        "method": "lora",
        "variant": "lora",
        "learning_rate": 2e-3,
        "seed": 3,
        "sweep": "p",
        "trial_id": trials["lora/r=4/dropout=0.1/seed=3"].id,
        "target_modules": "query,value",
    }
    assert params["ada/r=8/dropout=0/seed=3"]["rank"] == 8  # AdaLoRA's target rank
    assert params["ada/r=8/dropout=0/seed=3"]["method"] == "adalora"
    assert params["pat/r=-/dropout=0/seed=3"]["rank"] == "-"
    assert params["q/r=4/dropout=0/seed=3"]["quantization"] == "4bit"
    assert params["q/r=4/dropout=0/seed=3"]["alpha_policy"] == "fixed:16"
    assert "quantization" not in params["lora/r=4/dropout=0/seed=3"]


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
        # as the Trainer's MLflowCallback does (asynchronously); MLflow params are immutable
        mlflow.log_params({"learning_rate": 0.001, "seed": 0}, synchronous=False)
    done = tracking.log_final_metrics(
        ["mlflow"],
        "unit/lora/r=2/seed=0",
        {"accuracy": 0.75, "f1": 0.7, "train_steps": 4.0, "bad": float("nan"), "note": "x"},
        status="complete",
        tags={"lorasweep.trial_id": "abc"},
        params={"rank": 2, "variant": "lora", "learning_rate": 0.002, "seed": 0},
    )
    assert done == ["mlflow"]
    (run,) = _mlflow_runs(clean_env, "unit")
    assert run.data.metrics["final/accuracy"] == 0.75
    assert run.data.metrics["final/f1"] == 0.7
    assert "final/bad" not in run.data.metrics and "final/note" not in run.data.metrics
    assert run.data.tags["lorasweep.status"] == "complete"
    assert run.data.tags["lorasweep.trial_id"] == "abc"
    assert mlflow.active_run() is None
    assert run.data.params == {
        "rank": "2",
        "variant": "lora",
        "seed": "0",  # the Trainer's, the same value: not logged twice
        "learning_rate": "0.001",  # the Trainer's, kept ...
        "lorasweep.learning_rate": "0.002",  # ... and lorasweep's other value beside it
    }


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
        status="failed",
        params={"rank": 2, "variant": "lora", "quantization": None, "use_dora": False},
        tensorboard_root=root,
    )
    assert done == ["tensorboard"]
    from tensorboard.plugins.hparams import api_pb2

    run = root / "unit" / "lora" / "r=2" / "seed=1"
    assert _tb_scalars(run)["final/accuracy"] == [0.5]
    # one HParams session per run folder, beside the final scalars it is compared on
    params, status = _tb_hparams(run)
    assert params == {"rank": 2.0, "variant": "lora", "quantization": "-", "use_dora": False}
    assert status == api_pb2.STATUS_FAILURE


def test_log_final_metrics_wandb_offline(clean_env: Path) -> None:
    wandb = pytest.importorskip("wandb")
    run = wandb.init(project="lorasweep", name="unit/lora/r=2/seed=0", group="unit")
    run.log({"loss": 0.9})
    run.config.update({"peft_config": {"default": {"r": 2}}})  # the Trainer's: rank nested
    done = tracking.log_final_metrics(
        ["wandb"],
        "unit/lora/r=2/seed=0",
        {"accuracy": 0.625},
        status="complete",
        params={"rank": 2, "variant": "lora"},
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
    (path,) = clean_env.glob(pattern)  # one run, one file
    config = _wandb_config(path)
    assert config["rank"] == 2 and config["variant"] == "lora"  # top level, beside the Trainer's
    assert config["peft_config"] == {"default": {"r": 2}}


def test_a_tracker_error_never_raises(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> bool:
        raise RuntimeError("tracker down")

    monkeypatch.setattr(tracking, "_mlflow", boom)
    with pytest.warns(UserWarning, match="tracker down"):
        assert tracking.log_final_metrics(["mlflow"], "x/y", {"accuracy": 1.0}) == []


# ----------------------------------------------------------------------------- a real sweep


def test_sweep_logs_one_run_per_trial_to_each_tracker(
    clean_env: Path,
    tiny_bert_dir: Path,
    tiny_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """2 trials (rank 2, learning rates 1e-3 and 2e-3, one seed, 3 steps) in process, reported
    to MLflow, TensorBoard and W&B (offline): one run per trial named
    <sweep>/<variant>/r=<r>/<setting>/seed=<s>, with the Trainer's training loss, lorasweep's
    final metrics and the trial's configuration (MLflow params, TensorBoard hparams, W&B
    config), and not a line of W&B's on the terminal."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_SILENT")  # lorasweep silences W&B itself
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
        "report_to": ["mlflow", "tensorboard", "wandb"],
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
        # ... with an HParams session in the same folder, so the dashboard compares ranks
        params, _ = _tb_hparams(out / "tensorboard" / name)
        assert params["rank"] == 2 and params["learning_rate"] == pytest.approx(lr)
        assert params["trial_id"] == trials[name]["id"] and params["alpha_policy"] == "2*rank"

    # MLflow: the configuration as params, so runs filter by rank and by the grid's settings
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{clean_env / 'mlruns'}")
    exp = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs(
        [exp.experiment_id], filter_string="params.rank = '2' and params.learning_rate = '0.002'"
    )
    name = "tracked/lora/r=2/lr=0.002/seed=0"
    assert run.info.run_name == name
    assert {k: run.data.params.get(k) for k in ("variant", "alpha_policy", "alpha", "seed")} == {
        "variant": "lora",
        "alpha_policy": "2*rank",
        "alpha": "4.0",
        "seed": "0",
    }
    assert run.data.params["trial_id"] == trials[name]["id"]
    assert run.data.params["sweep"] == "tracked"
    assert run.data.params["target_modules"] == "query,value"
    assert not [k for k in run.data.params if k.startswith("lorasweep.")]  # no clash
    assert "per_device_train_batch_size" in run.data.params  # the Trainer's, still there
    assert len(client.search_runs([exp.experiment_id], filter_string="params.rank = '2'")) == 2

    # W&B (offline): one run file per trial, the configuration at the top level of its config
    wandb = sys.modules["wandb"]
    wandb.teardown()  # waits for the service's writers (see test_log_final_metrics_wandb_offline)
    pattern = "wandb/offline-run-*/run-*.wandb"
    wait_for(lambda: len(list(clean_env.glob(pattern))) == 2, f"2 runs in {pattern}")

    def configs() -> dict[str, dict[str, Any]]:
        found = (_wandb_config(f) for f in clean_env.glob(pattern))
        return {c["trial_id"]: c for c in found if "trial_id" in c}

    wait_for(lambda: len(configs()) == 2, "the trial config in both W&B runs")
    for name, t in trials.items():
        config = configs()[t["id"]]
        assert config["rank"] == 2 and config["variant"] == "lora" and config["seed"] == 0
        assert config["learning_rate"] == t["config"]["training"]["learning_rate"]

    # the terminal: no W&B banner or run summary after a trial
    captured = capfd.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert not [line for line in lines if line.startswith("wandb:")]

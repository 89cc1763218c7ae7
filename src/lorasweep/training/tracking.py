"""Experiment trackers (W&B, MLflow, TensorBoard): one run per trial, grouped per sweep.

The HF Trainer's own integrations (``report_to``) log the training curve. This module does the
three things they do not:

1. ``configure`` sets, before the Trainer is built, what groups the runs of a sweep: the W&B
   group and project, the MLflow experiment, and a TensorBoard folder per run (the Trainer's
   default is inside its ``output_dir``, which lorasweep deletes after every trial).
2. ``log_final_metrics`` sends lorasweep's own results (accuracy, F1, perplexity, times, memory:
   computed outside ``Trainer.evaluate``, so the Trainer never logs them) to the same run, as
   ``final/<name>``, and closes what the Trainer left open (a W&B run stays open after training,
   and the next in-process trial would log into it).
3. ``check_tracking`` finds set-up problems before any trial runs, one line each.

Tracking never fails a trial: ``log_final_metrics`` warns and goes on when a tracker errs.

Offline use, no network: W&B with ``WANDB_MODE=offline`` (runs are written under ``./wandb``;
``wandb sync`` uploads them later); MLflow with a local store, ``MLFLOW_TRACKING_URI=sqlite:///
mlflow.db`` (MLflow's default) or ``file:<dir>`` (MLflow 3 needs ``MLFLOW_ALLOW_FILE_STORE=true``
for a file store); TensorBoard always writes local event files.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

INTEGRATIONS = ("wandb", "mlflow", "tensorboard")
PREFIX = "final/"
# values configure() set, so a later sweep in the same process replaces them (a user's own
# value, set before, is kept)
_SET: dict[str, str] = {}


def active(report_to: Iterable[str] | str | None) -> list[str]:
    """The integrations in ``report_to`` that lorasweep handles ("none" and empties dropped)."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    return [x for x in items if x in INTEGRATIONS]


def check_tracking(report_to: Iterable[str] | str | None) -> list[str]:
    """Problems that would make every trial fail or lose its logs; one line each, no imports
    of the trackers themselves (fast)."""
    errors = []
    for name in active(report_to):
        if importlib.util.find_spec(name) is None:
            errors.append(
                f"report_to: {name} is not installed: pip install 'lorasweep[track]' "
                f"(or pip install {name})"
            )
    if "mlflow" in active(report_to):
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        is_file = uri.startswith("file:") or (uri and "://" not in uri)
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
        if is_file and not allowed and _mlflow_major() >= 3:
            errors.append(
                f"report_to: MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 refuses; "
                "use sqlite:///mlflow.db or set MLFLOW_ALLOW_FILE_STORE=true"
            )
    return errors


def _mlflow_major() -> int:
    try:
        from importlib.metadata import version

        return int(version("mlflow").split(".")[0])
    except Exception:  # noqa: BLE001 - unknown version: assume the strictest
        return 3


def tensorboard_dir(root: str | Path, run_name: str) -> Path:
    """Where a run's TensorBoard events go: ``root/<sweep>/<variant>/r=<r>/seed=<s>``, so
    ``tensorboard --logdir root`` lists one run per trial under its config and seed."""
    return Path(root) / run_name


def configure(
    report_to: Iterable[str] | str | None,
    *,
    sweep: str,
    run_name: str,
    tensorboard_root: str | Path | None = None,
) -> dict[str, str]:
    """Set the environment the Trainer's integrations read; call before building the Trainer.

    A value the user set (``WANDB_PROJECT``, ``WANDB_RUN_GROUP``, ``MLFLOW_EXPERIMENT_NAME``)
    is kept; TensorBoard's folder is always set, as it differs per run. Returns what it set.
    """
    names = active(report_to)
    env: dict[str, str] = {}

    def default(key: str, value: str) -> None:
        current = os.environ.get(key)
        if not current or _SET.get(key) == current:  # unset, or set by an earlier sweep here
            env[key] = value

    if "wandb" in names:
        default("WANDB_RUN_GROUP", sweep)
        default("WANDB_PROJECT", "lorasweep")
    if "mlflow" in names:
        default("MLFLOW_EXPERIMENT_NAME", sweep)
    if "tensorboard" in names and tensorboard_root is not None:
        path = tensorboard_dir(tensorboard_root, run_name)
        path.mkdir(parents=True, exist_ok=True)
        env["TENSORBOARD_LOGGING_DIR"] = str(path)
    os.environ.update(env)
    _SET.update(env)
    return env


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def log_final_metrics(
    report_to: Iterable[str] | str | None,
    run_name: str,
    metrics: Mapping[str, Any],
    *,
    status: str | None = None,
    step: int | None = None,
    tags: Mapping[str, str] | None = None,
    tensorboard_root: str | Path | None = None,
) -> list[str]:
    """Log a trial's final metrics as ``final/<name>`` to its tracker runs and close them.

    Call once per trial after lorasweep's evaluation (also for a failed trial, with what was
    measured and its ``status``). Non-numeric and non-finite values are skipped. Never raises;
    a tracker that errs gives a warning. Returns the integrations that received the metrics.

    Args:
        report_to: the spec's ``report_to``.
        run_name: the run's name, ``<sweep>/<variant>/r=<r>/seed=<s>`` (TrainingArguments.run_name).
        metrics: lorasweep's metrics of the trial (the store's columns).
        status: the trial status (complete, failed, ...), recorded as a tag / summary value.
        step: the step to log at (default: the last training step, if known, else 0).
        tags: extra string tags (MLflow tags, W&B summary values), e.g. the trial id.
        tensorboard_root: the folder given to ``configure``; default ``TENSORBOARD_LOGGING_DIR``.
    """
    values = {PREFIX + k: v for k, v in _numeric(metrics).items()}
    if step is None:
        step = int(_numeric(metrics).get("train_steps", 0))
    all_tags = {"lorasweep.run_name": run_name, **(tags or {})}
    if status is not None:
        all_tags["lorasweep.status"] = status
    done = []
    for name in active(report_to):
        try:
            if name == "mlflow":
                ok = _mlflow(run_name, values, step, all_tags)
            elif name == "tensorboard":
                ok = _tensorboard(run_name, values, step, tensorboard_root)
            else:
                ok = _wandb(run_name, values, step, all_tags)
        except Exception as e:  # noqa: BLE001 - tracking never fails a trial
            warnings.warn(f"{name}: final metrics not logged: {e}", stacklevel=2)
            ok = False
        if ok:
            done.append(name)
    return done


def _mlflow(run_name: str, values: dict[str, float], step: int, tags: dict[str, str]) -> bool:
    import mlflow
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    run_id = None
    active_run = mlflow.active_run()
    if active_run is not None and active_run.info.run_name == run_name:
        run_id = active_run.info.run_id
    last = mlflow.last_active_run()
    if run_id is None and last is not None and last.info.run_name == run_name:
        run_id = last.info.run_id
    client = MlflowClient()
    if run_id is None:  # another process or an unusual order: look it up by name
        exp = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default")
        if exp is not None:
            escaped = run_name.replace("'", "\\'")
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`mlflow.runName` = '{escaped}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        warnings.warn(f"mlflow: no run named {run_name!r}; final metrics not logged", stacklevel=3)
        return False
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, step) for k, v in values.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
        synchronous=True,
    )
    # a trial that failed inside trainer.train() leaves its run active: close it, or the next
    # in-process trial would log into it
    if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
        failed = tags.get("lorasweep.status") not in (None, "complete")
        mlflow.end_run(status="FAILED" if failed else "FINISHED")
    return True


def _tensorboard(
    run_name: str, values: dict[str, float], step: int, root: str | Path | None
) -> bool:
    from torch.utils.tensorboard import SummaryWriter

    if root is not None:
        log_dir = tensorboard_dir(root, run_name)
    elif os.environ.get("TENSORBOARD_LOGGING_DIR"):
        log_dir = Path(os.environ["TENSORBOARD_LOGGING_DIR"])
    else:
        warnings.warn("tensorboard: no folder for final metrics (TENSORBOARD_LOGGING_DIR unset)")
        return False
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for k, v in values.items():
            writer.add_scalar(k, v, step)
    finally:
        writer.close()
    return True


def _wandb(run_name: str, values: dict[str, float], step: int, tags: dict[str, str]) -> bool:
    import wandb

    run = wandb.run
    if run is None:
        return False
    try:
        if run.name != run_name:
            warnings.warn(f"wandb: the open run is {run.name!r}, not {run_name!r}", stacklevel=3)
            return False
        run.summary.update({**values, **tags})
        run.log(values)
        return True
    finally:
        failed = tags.get("lorasweep.status") not in (None, "complete")
        wandb.finish(exit_code=1 if failed else 0)

"""Experiment trackers (W&B, MLflow, TensorBoard): one run per trial, grouped per sweep.

The HF Trainer's own integrations (``report_to``) log the training curve. This module does the
three things they do not:

1. ``configure`` sets, before the Trainer is built, what groups the runs of a sweep: the W&B
   group and project, the MLflow experiment, and a TensorBoard folder per run (the Trainer's
   default is inside its ``output_dir``, which lorasweep deletes after every trial).
   It also silences W&B's own lines (a banner per run), unless ``WANDB_SILENT`` or
   ``WANDB_QUIET`` is set.
2. ``log_final_metrics`` sends lorasweep's own results (accuracy, F1, perplexity, times, memory:
   computed outside ``Trainer.evaluate``, so the Trainer never logs them) to the same run, as
   ``final/<name>``, with the trial's configuration (``trial_params``: rank, alpha, variant,
   seed, the grid's settings, ...) as first-class MLflow params, W&B config and TensorBoard
   hparams, and closes what the Trainer left open (a W&B run stays open after training, and the
   next in-process trial would log into it).
3. ``check_tracking`` finds set-up problems before any trial runs, one line each.

Tracking never fails a trial: ``log_final_metrics`` warns and goes on when a tracker errs.

Offline use, no network: W&B with ``WANDB_MODE=offline`` (runs are written under ``./wandb``;
``wandb sync`` uploads them later); MLflow with a local store, ``MLFLOW_TRACKING_URI=sqlite:///
mlflow.db`` (MLflow's default) or ``file:<dir>`` (MLflow 3 needs ``MLFLOW_ALLOW_FILE_STORE=true``
for a file store); TensorBoard always writes local event files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorasweep.records import Trial

INTEGRATIONS = ("wandb", "mlflow", "tensorboard")
PREFIX = "final/"
# where a configuration key is logged when the Trainer's MLflowCallback already logged that name
# with another value (MLflow params are immutable)
PARAM_PREFIX = "lorasweep."
ParamValue = str | int | float | bool
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
    if "wandb" in names:
        _wandb_setup()
    return env


def _wandb_setup() -> None:
    """W&B's process-wide settings: no banner and summary panel after every trial (they would
    bury lorasweep's own lines) unless the user chose (``WANDB_SILENT`` / ``WANDB_QUIET`` set),
    and the sweep's group. Passed as settings, not only the environment: once W&B is set up in a
    process (an earlier sweep, a notebook) it ignores a changed environment."""
    overrides: dict[str, Any] = {}
    if "WANDB_SILENT" not in os.environ and "WANDB_QUIET" not in os.environ:
        overrides["silent"] = True
    if os.environ.get("WANDB_RUN_GROUP"):
        overrides["run_group"] = os.environ["WANDB_RUN_GROUP"]
    try:
        import wandb

        wandb.setup(settings=wandb.Settings(**overrides))
    except Exception as e:  # noqa: BLE001 - tracking never fails a trial
        warnings.warn(f"wandb: settings not applied: {e}", stacklevel=3)


def _plain(value: Any) -> ParamValue:
    """A value every tracker takes: numbers, strings and booleans as they are, ``None`` as
    ``-``, a list as ``a,b``, anything else as its text."""
    if value is None:
        return "-"
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _default_learning_rate() -> float:
    from transformers import TrainingArguments

    return TrainingArguments.__dataclass_fields__["learning_rate"].default


def trial_params(trial: Trial, sweep: str) -> dict[str, ParamValue]:
    """A trial's configuration as flat tracker parameters (MLflow params, W&B config,
    TensorBoard hparams), so runs can be filtered and compared by rank.

    ``rank`` (the AdaLoRA target rank; ``-`` for a rank pattern), ``alpha``, ``alpha_policy``,
    ``scale``, ``method``, ``variant``, ``learning_rate``, every setting the grid or search
    varies (``trial.point``, e.g. ``dropout``), ``seed``, ``sweep``, ``trial_id``,
    ``target_modules`` and ``quantization`` when set. A point setting of the same name as a
    resolved one (``alpha: 2*rank`` on a grid) gives way to it (``alpha_policy`` keeps the
    policy).
    """
    ad = trial.config.get("adapter") or {}
    training = trial.config.get("training") or {}
    lr = training.get("learning_rate")
    params = {str(k): _plain(v) for k, v in trial.point.items()}
    params.update(
        rank=_plain(trial.rank),
        alpha=_plain(ad.get("alpha")),
        alpha_policy=_plain(ad.get("alpha_policy")),
        scale=_plain(ad.get("scale")),
        method=_plain(ad.get("method", "lora")),
        variant=trial.variant,
        learning_rate=_plain(_default_learning_rate() if lr is None else lr),
        seed=trial.seed,
        sweep=sweep,
        trial_id=trial.id,
        target_modules=_plain(ad.get("target_modules") or "default"),
    )
    if ad.get("quantization"):
        params["quantization"] = _plain(ad["quantization"])
    return params


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
    params: Mapping[str, ParamValue] | None = None,
    tensorboard_root: str | Path | None = None,
) -> list[str]:
    """Log a trial's final metrics as ``final/<name>`` and its configuration to its tracker
    runs, and close them.

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
        params: the trial's configuration (``trial_params``): MLflow params, W&B config,
            TensorBoard hparams linked to the final metrics.
        tensorboard_root: the folder given to ``configure``; default ``TENSORBOARD_LOGGING_DIR``.
    """
    values = {PREFIX + k: v for k, v in _numeric(metrics).items()}
    if step is None:
        step = int(_numeric(metrics).get("train_steps", 0))
    all_tags = {"lorasweep.run_name": run_name, **(tags or {})}
    if status is not None:
        all_tags["lorasweep.status"] = status
    config = {k: _plain(v) for k, v in (params or {}).items()}
    done = []
    for name in active(report_to):
        try:
            if name == "mlflow":
                ok = _mlflow(run_name, values, step, all_tags, config)
            elif name == "tensorboard":
                ok = _tensorboard(run_name, values, step, tensorboard_root, config, status)
            else:
                ok = _wandb(run_name, values, step, all_tags, config)
        except Exception as e:  # noqa: BLE001 - tracking never fails a trial
            warnings.warn(f"{name}: final metrics not logged: {e}", stacklevel=2)
            ok = False
        if ok:
            done.append(name)
    return done


def _mlflow(
    run_name: str,
    values: dict[str, float],
    step: int,
    tags: dict[str, str],
    params: dict[str, ParamValue],
) -> bool:
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
    try:
        _mlflow_params(client, run_id, params)
    except Exception as e:  # noqa: BLE001 - the metrics are in; the run must still be closed
        warnings.warn(f"mlflow: trial parameters not logged: {e}", stacklevel=3)
    # a trial that failed inside trainer.train() leaves its run active: close it, or the next
    # in-process trial would log into it
    if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
        failed = tags.get("lorasweep.status") not in (None, "complete")
        mlflow.end_run(status="FAILED" if failed else "FINISHED")
    return True


def _mlflow_params(client: Any, run_id: str, params: dict[str, ParamValue]) -> None:
    """Log the trial's configuration as params of its run under their plain names
    (``params.rank = '4'``). MLflow params are immutable and the Trainer's MLflowCallback
    already logged its TrainingArguments and the model's config: a name it logged with the same
    value is skipped, one it logged with another value goes under ``lorasweep.<name>``."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    if not params:
        return
    with contextlib.suppress(Exception):  # the Trainer logs its params asynchronously
        mlflow.flush_async_logging()
    logged = client.get_run(run_id).data.params
    batch = []
    for key, v in params.items():
        value = str(v)[:MAX_PARAM_VAL_LENGTH]
        if logged.get(key, value) != value:
            key = PARAM_PREFIX + key
        if logged.get(key) != value:
            batch.append(Param(key, value))
    if batch:
        client.log_batch(run_id, params=batch, synchronous=True)


def _tensorboard(
    run_name: str,
    values: dict[str, float],
    step: int,
    root: str | Path | None,
    params: dict[str, ParamValue] | None = None,
    status: str | None = None,
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
        if params:
            for summary in _hparams_summaries(params, status):
                writer.file_writer.add_summary(summary, step)
    finally:
        writer.close()
    return True


def _hparams_summaries(params: dict[str, ParamValue], status: str | None) -> list[Any]:
    """The HParams plugin's session start and end, for the run folder that also holds the
    Trainer's curves and the ``final/`` scalars: the HParams dashboard then lists one session
    per trial with its configuration and metrics (all of its scalars).

    No experiment summary: without one, the dashboard builds the experiment from all sessions
    (the union of their parameters); with one per trial it would take an arbitrary trial's."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import (
        HParamsPluginData,
        SessionEndInfo,
        SessionStartInfo,
    )

    now = time.time()
    start = SessionStartInfo(start_time_secs=now)
    for k, v in params.items():
        if isinstance(v, bool):
            start.hparams[k].bool_value = v
        elif isinstance(v, int | float):
            start.hparams[k].number_value = float(v)
        else:
            start.hparams[k].string_value = str(v)
    ok = status in (None, "complete", "pending")  # pending: paused at a pruning rung
    end = SessionEndInfo(
        status=api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE, end_time_secs=now
    )
    return [
        Summary(
            value=[
                Summary.Value(
                    tag=tag,
                    metadata=metadata.create_summary_metadata(data),
                    tensor=metadata.NULL_TENSOR,
                )
            ]
        )
        for tag, data in (
            (metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start)),
            (metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=end)),
        )
    ]


def _wandb(
    run_name: str,
    values: dict[str, float],
    step: int,
    tags: dict[str, str],
    params: dict[str, ParamValue] | None = None,
) -> bool:
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
        if params:  # top-level keys (the Trainer's own config has the rank only in peft_config)
            run.config.update(params, allow_val_change=True)
        return True
    finally:
        failed = tags.get("lorasweep.status") not in (None, "complete")
        wandb.finish(exit_code=1 if failed else 0)

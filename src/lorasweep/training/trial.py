"""train_trial(trial) -> TrialResult: one LoRA configuration, one seed, measured.

Reads top to bottom: seed, load data and model, wrap with peft, train with the HF Trainer, evaluate
(on the eval split; then once on the test split when the data has one), save the adapter, measure.
Every failure becomes a stored status (failed / oom / diverged) instead of an exception, so a
sweep never loses a night to one bad trial.
"""

from __future__ import annotations

import math
import os
import shutil
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from lorasweep.records import (
    Paused,
    Trial,
    TrialResult,
    TrialStatus,
    encode_outcomes,
    eval_curve,
)
from lorasweep.training import data as data_mod
from lorasweep.training import models, tracking
from lorasweep.training.callbacks import (
    AdaLoraState,
    CountingCollator,
    Diverged,
    PauseAt,
    ProgressFn,
    Recorder,
)
from lorasweep.training.evaluate import (
    as_test_metrics,
    causal_eval_outcomes,
    classification_metrics,
    classification_outcomes,
)
from lorasweep.training.measure import Monitor, environment
from lorasweep.training.peft_setup import (
    adalora_allocation,
    build_peft_config,
    lora_scales,
    total_steps,
)

if "TRANSFORMERS_VERBOSITY" not in os.environ:
    # the expected "classifier weights newly initialized" load report would bury the progress
    # display; set TRANSFORMERS_VERBOSITY=warning to see transformers' messages again
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per trial
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _training_args(trial: Trial, workdir: Path, device: str, context: dict[str, Any]) -> Any:
    cfg, ad = trial.config, trial.config["adapter"]
    user = dict(cfg.get("training") or {})
    n_steps = user.get("max_steps", 0) or 0
    defaults = {
        "logging_steps": max(1, n_steps // 40) if n_steps else 10,
        "per_device_eval_batch_size": user.get("per_device_train_batch_size", 8) * 2,
        "lr_scheduler_type": "linear",
    }
    precision = ad.get("precision", "fp32")
    if precision == "fp16" and device != "cuda":
        raise ValueError(f"precision: fp16 needs a CUDA GPU, this trial runs on {device}")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision: bf16 is not supported by this GPU; use fp16 or fp32")
    report_to = [r for r in cfg.get("report_to") or [] if r != "none"] or "none"
    return TrainingArguments(
        **{**defaults, **user},
        output_dir=str(workdir / "hf"),
        seed=trial.seed,
        data_seed=trial.seed,
        report_to=report_to,
        run_name=_run_name(trial, context),
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the divergence check
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=0,
    )


def train_trial(
    trial: Trial,
    workdir: Path,
    *,
    cache_root: Path | None = None,
    progress: ProgressFn | None = None,
    context: dict[str, Any] | None = None,
) -> TrialResult:
    """Train and evaluate one trial; never raises for a trial-level failure."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    context = context or {}
    device = models.pick_device()
    monitor = Monitor(device)
    result = TrialResult(trial_id=trial.id, status=TrialStatus.RUNNING)
    try:
        result.environment = environment(device)
        with monitor:
            _run(trial, workdir, device, monitor, result, cache_root, progress, context)
        result.metrics.update(monitor.metrics())
    except Diverged as e:
        result.status, result.error = TrialStatus.DIVERGED, str(e)
        result.metrics.update(monitor.metrics())
    except Exception as e:  # noqa: BLE001 - every failure is stored, the sweep goes on
        result.status = TrialStatus.OOM if _is_oom(e) else TrialStatus.FAILED
        tb = traceback.format_exc().strip().splitlines()
        result.error = "\n".join(tb[-12:])
        result.metrics.update(monitor.metrics())
    finally:
        if tracking.active(trial.config.get("report_to")):
            # lorasweep's own metrics (accuracy, memory, times) go to the trial's run too
            tracking.log_final_metrics(
                trial.config["report_to"],
                _run_name(trial, context),
                result.metrics,
                status=result.status.value,
                tags={"lorasweep.trial_id": trial.id, **_point_tags(trial)},
                params=tracking.trial_params(trial, context.get("name", "sweep")),
                tensorboard_root=_tensorboard_root(workdir, context),
            )
        shutil.rmtree(workdir / "hf", ignore_errors=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(e).lower()


@dataclass
class _Loaded:
    """What the load phase hands to training: data, model, arguments, parameter counts."""

    tokenizer: Any
    train_ds: Any
    eval_ds: Any
    info: dict[str, Any]
    model: Any
    args: TrainingArguments
    trainable: int
    total: int
    test_ds: Any = None  # None when the data has no test split


def _run(
    trial: Trial,
    workdir: Path,
    device: str,
    monitor: Monitor,
    result: TrialResult,
    cache_root: Path | None,
    progress: ProgressFn | None,
    context: dict[str, Any],
) -> None:
    """The trial, phase by phase: load, train, evaluate, then pause at a rung or save."""
    # long: the recipe reads top to bottom (torchtune's rule); each phase's detail is a helper
    cfg, ad = trial.config, trial.config["adapter"]
    if context.get("threads"):
        torch.set_num_threads(int(context["threads"]))
    tracking.configure(
        cfg.get("report_to"),
        sweep=context.get("name", "sweep"),
        run_name=_run_name(trial, context),
        tensorboard_root=_tensorboard_root(workdir, context),
    )
    with monitor.timer("load"):
        loaded = _load(trial, workdir, device, result, cache_root, context)

    collator = CountingCollator(_inner_collator(cfg["task"], loaded.tokenizer))
    recorder = Recorder(trial.id, progress, adalora=ad if ad["method"] == "adalora" else None)
    # a pruning segment: run up to ``stop_at`` (then pause) and/or continue from a checkpoint
    segment = context.get("segment") or {}
    stop_at, resume_from = segment.get("stop_at"), segment.get("resume_from")
    callbacks: list[TrainerCallback] = [recorder]
    if stop_at:
        callbacks.append(PauseAt(int(stop_at)))
    if ad["method"] == "adalora" and (stop_at or resume_from):
        callbacks.append(AdaLoraState(resume_from))
    trainer = Trainer(model=loaded.model, args=loaded.args, train_dataset=loaded.train_ds,
                      data_collator=collator, callbacks=callbacks)  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # progress goes to lorasweep's display instead

    # -- train: the training loop alone is timed
    monitor.mark_train(True)
    with monitor.timer("train"):
        train_out = trainer.train(resume_from_checkpoint=resume_from)
    monitor.mark_train(False)
    result.curves["train_loss"] = recorder.loss_curve
    if recorder.diverged_at is not None:
        result.metrics.update(train_seconds=monitor.timings["train"])
        raise Diverged(f"training loss became non-finite at step {recorder.diverged_at}")
    step = trainer.state.global_step
    paused = bool(stop_at) and step == stop_at and step < trainer.state.max_steps
    examples, tokens = collator.consumed(
        (step - recorder.start_step) * loaded.args.gradient_accumulation_steps
    )

    # -- evaluate (at a rung too: the same evaluation as the final one, on the first
    # ``eval_examples`` examples of the eval set when pruning asks for a cheaper rung)
    rung_n = segment.get("eval_examples") if paused else None
    eval_ds = loaded.eval_ds
    scored = eval_ds.select(range(min(int(rung_n), len(eval_ds)))) if rung_n else eval_ds
    with monitor.timer("rung_eval" if paused else "eval"):
        metrics, outcomes = _evaluate(cfg["task"], trainer, scored)
    for k, v in metrics.items():  # eval_accuracy, eval_f1, eval_loss, eval_perplexity
        if k not in ("eval_tokens", "majority_rate"):
            result.curves[eval_curve(k)] = [[float(step), v]]
    if not all(math.isfinite(v) for v in metrics.values()):
        raise Diverged(f"evaluation is not finite at step {step}: {metrics}")
    train_secs = monitor.timings["train"]
    result.metrics.update(metrics)
    result.metrics.update(
        train_loss=recorder.loss_curve[-1][1] if recorder.loss_curve else train_out.training_loss,
        train_loss_mean=float(train_out.training_loss),
        train_steps=float(step),
        train_examples=float(examples),
        train_tokens=float(tokens),
        train_segments=1.0,
        examples_per_second=examples / train_secs,
        tokens_per_second=tokens / train_secs,
        trainable_params=float(loaded.trainable),
        total_params=float(loaded.total),
        trainable_percent=100.0 * loaded.trainable / loaded.total,
    )
    if paused:
        result.metrics["rung_eval_examples"] = float(len(scored))
        _pause(workdir, loaded.args, step, result)
    else:
        if outcomes is not None:  # per eval example, for paired comparisons across trials
            result.artifacts["eval_outcomes"] = outcomes
        if loaded.test_ds is not None:
            _evaluate_test(cfg["task"], trainer, loaded.test_ds, monitor, result)
        _save(workdir, loaded, ad, result)


def _load(
    trial: Trial,
    workdir: Path,
    device: str,
    result: TrialResult,
    cache_root: Path | None,
    context: dict[str, Any],
) -> _Loaded:
    """Data (the cached tokenized sets), the model, the Trainer's arguments, the peft wrap."""
    cfg, ad, task = trial.config, trial.config["adapter"], trial.config["task"]
    tokenizer = models.load_tokenizer(cfg["model"])
    # the parent's fingerprint: every trial of a sweep uses the data the parent prepared
    train_ds, eval_ds, test_ds, info = data_mod.prepare_splits(
        cfg["dataset"], task, cfg["model"], tokenizer, cache_root,
        fingerprint=context.get("data_fingerprint"),
    )  # fmt: skip
    result.environment["data_fingerprint"] = info.get("fingerprint")
    set_seed(trial.seed)  # fixes the classifier head and adapter init
    model = models.load_model(
        cfg["model"],
        task,
        num_labels=info.get("num_labels", 2),
        quantization=ad.get("quantization"),
        compute_dtype=ad.get("compute_dtype"),
        device=device,
        pad_token_id=tokenizer.pad_token_id,
    )
    args = _training_args(trial, workdir, device, context)
    steps = total_steps(args, len(train_ds))
    if ad.get("quantization") == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(args.gradient_checkpointing)
        )
    from peft import get_peft_model

    set_seed(trial.seed)
    model = get_peft_model(model, build_peft_config(model, ad, task, steps))
    trainable, total = model.get_nb_trainable_parameters()
    return _Loaded(tokenizer, train_ds, eval_ds, info, model, args, trainable, total, test_ds)


def _evaluate(task: str, trainer: Trainer, scored: Any) -> tuple[dict[str, float], Any]:
    """The eval metrics, and the per-example outcomes (``records.encode_outcomes``); None when
    the eval loader does not keep the eval set's order (length-grouped, or dropping a batch)."""
    if task == "classification":
        pred = trainer.predict(scored)
        metrics = classification_metrics(pred.predictions, pred.label_ids)
        kind, arrays = "correct", classification_outcomes(pred.predictions, pred.label_ids)
    else:
        (metrics, arrays), kind = causal_eval_outcomes(trainer, scored), "nll"
    args = trainer.args  # transformers < 5 says group_by_length=True
    grouped = getattr(args, "train_sampling_strategy", None) == "group_by_length"
    grouped = grouped or bool(getattr(args, "group_by_length", False))
    if grouped or any(len(a) != len(scored) for a in arrays.values()):
        return metrics, None
    return metrics, encode_outcomes(kind, **arrays)


def _evaluate_test(
    task: str, trainer: Trainer, test_ds: Any, monitor: Monitor, result: TrialResult
) -> None:
    """Score the test split once, after the final eval: the ``test_*`` metrics (timed apart as
    ``test_seconds``) and the per-example ``test_outcomes``, encoded like ``eval_outcomes``.
    Curves, rungs and selection never read it."""
    with monitor.timer("test"):
        metrics, outcomes = _evaluate(task, trainer, test_ds)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise Diverged(f"evaluation on the test split is not finite: {metrics}")
    result.metrics.update(as_test_metrics(metrics))
    if outcomes is not None:
        result.artifacts["test_outcomes"] = outcomes


def _inner_collator(task: str, tokenizer: Any) -> Any:
    if task == "classification":
        return DataCollatorWithPadding(tokenizer)
    from lorasweep.training.formats import CausalCollator

    return CausalCollator(tokenizer)


def _pause(workdir: Path, args: TrainingArguments, step: int, result: TrialResult) -> None:
    """Keep the rung's checkpoint outside the Trainer's output folder (deleted at the end) and
    leave the trial pending, paused at ``step``."""
    ckpt = workdir / "checkpoints" / f"step-{step}"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(Path(args.output_dir) / f"checkpoint-{step}"), str(ckpt))
    result.artifacts["paused"] = Paused(step=step, checkpoint=str(ckpt))
    result.status = TrialStatus.PENDING


def _save(workdir: Path, loaded: _Loaded, ad: dict[str, Any], result: TrialResult) -> None:
    """Save the adapter and measure it: bytes, the scales applied, AdaLoRA's allocation."""
    model, m = loaded.model, result.metrics
    adapter_dir = workdir / "adapter"
    model.save_pretrained(str(adapter_dir))
    m["adapter_bytes"] = float(sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file()))
    # the scale read back from the model; one number unless a rank pattern gives groups their own
    scales = lora_scales(model)
    result.artifacts["lora_scales"] = scales
    if len(set(scales.values())) == 1:
        m["lora_scale"] = next(iter(scales.values()))
    if ad["method"] == "adalora":
        # peft counts init_r everywhere; what the run ends with is the allocated ranks
        ranks, allocated = adalora_allocation(model)
        non_lora = loaded.trainable - sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
        )
        m["initial_trainable_params"] = float(loaded.trainable)
        m["trainable_params"] = float(allocated + non_lora)
        m["trainable_percent"] = 100.0 * m["trainable_params"] / loaded.total
        result.artifacts["adalora_final_ranks"] = ranks
    result.artifacts["adapter_dir"] = str(adapter_dir)
    result.artifacts["data"] = {k: v for k, v in loaded.info.items() if k != "label_names"}
    _spectrum_summary(adapter_dir, result)
    result.status = TrialStatus.COMPLETE


def _spectrum_summary(adapter_dir: Path, result: TrialResult) -> None:
    """Effective rank of the trained adapter (issue 5); never fails the trial."""
    try:
        from lorasweep.tools.spectrum import adapter_spectrum

        spec = adapter_spectrum(adapter_dir)
    except Exception as e:  # noqa: BLE001 - analysis is extra information
        result.artifacts["spectrum_error"] = f"{type(e).__name__}: {e}"
        return
    if spec.get("mean_effective_rank") is not None:
        result.metrics["effective_rank"] = float(spec["mean_effective_rank"])
    result.artifacts["spectrum"] = spec


def _run_name(trial: Trial, context: dict[str, Any]) -> str:
    """The tracking run of a trial: ``<sweep>/<variant>/r=<r>/seed=<s>``."""
    return f"{context.get('name', 'sweep')}/{trial.label}"


def _tensorboard_root(workdir: Path, context: dict[str, Any]) -> Path:
    """``<run folder>/tensorboard``: outside the Trainer's output_dir, which is deleted."""
    return Path(context.get("out_dir") or workdir.parent.parent) / "tensorboard"


def _point_tags(trial: Trial) -> dict[str, str]:
    """The grid or search settings of this trial (``lorasweep.learning_rate``), so that a
    tracker's runs can be grouped by them; rank, variant and seed are in the run name."""
    return {f"lorasweep.{k}": str(v) for k, v in trial.point.items()}

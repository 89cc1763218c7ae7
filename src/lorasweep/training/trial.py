"""train_trial(trial) -> TrialResult: one LoRA configuration, one seed, measured.

Reads top to bottom: seed, load data and model, wrap with peft, train with the HF Trainer, evaluate,
save the adapter, measure. Every failure becomes a stored status (failed / oom / diverged) instead
of an exception, so a sweep never loses a night to one bad trial.
"""

from __future__ import annotations

import math
import os
import shutil
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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

from lorasweep.records import Trial, TrialResult, TrialStatus, eval_curve
from lorasweep.spec import adalora_schedule, planned_steps
from lorasweep.training import data as data_mod
from lorasweep.training import models, tracking
from lorasweep.training.measure import Monitor, environment

if "TRANSFORMERS_VERBOSITY" not in os.environ:
    # the expected "classifier weights newly initialized" load report would bury the progress
    # display; set TRANSFORMERS_VERBOSITY=warning to see transformers' messages again
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per trial
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ProgressFn = Callable[[str, int, int], None]  # (trial_id, step, max_steps)


class Diverged(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------
# Trainer callbacks


class _Recorder(TrainerCallback):
    """Loss curve, NaN/inf detection (stops the run), progress reports, AdaLoRA allocation."""

    def __init__(self, trial_id: str, progress: ProgressFn | None, adalora: dict | None):
        self.trial_id, self.progress = trial_id, progress
        self.adalora = adalora  # the trial's adapter block when the method is AdaLoRA
        self.loss_curve: list[list[float]] = []
        self.diverged_at: int | None = None
        self.start_step = 0  # > 0 when resumed from a checkpoint

    def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
        self.start_step = state.global_step
        # AdaLoRA's budget schedule was built from an estimate of the run's length; the
        # Trainer's own count is the truth (peft's allocator reads this same config object).
        if self.adalora:
            cfg = model.peft_config["default"]
            if cfg.total_step != state.max_steps:
                cfg.tinit, cfg.tfinal, cfg.deltaT = adalora_schedule(
                    state.max_steps, self.adalora["tinit"], self.adalora["tfinal"],
                    self.adalora["deltaT"],
                )  # fmt: skip
                cfg.total_step = state.max_steps

    def on_optimizer_step(self, args, state, control, model=None, **kw):  # noqa: ANN001
        # AdaLoRA re-allocates ranks from the gradients: after optimizer.step, before zero_grad.
        # global_step counts finished steps, so peft sees 0..total_step-1 as in its examples.
        if self.adalora:
            model.base_model.update_and_allocate(state.global_step)

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        if self.progress is not None:
            self.progress(self.trial_id, state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        self.loss_curve.append([state.global_step, float(loss)])
        if not math.isfinite(loss):
            self.diverged_at = state.global_step
            control.should_training_stop = True


class _PauseAt(TrainerCallback):
    """Stop at a pruning rung with a full checkpoint (adapter, optimizer, scheduler, RNG states).

    The learning-rate schedule stays the full run's, so a run paused and resumed at rungs takes
    exactly the steps of an unpaused run (tested to 1e-6).
    """

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


class _AdaLoraState(TrainerCallback):
    """AdaLoRA's rank allocator keeps its importance scores in Python dicts that a Trainer
    checkpoint does not hold; saved beside the checkpoint and restored on resume, so a paused
    AdaLoRA trial allocates the same ranks as an unpaused one."""

    FILE = "lorasweep_adalora_state.pt"
    KEYS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, resume_from: str | None):
        self.resume_from = resume_from
        self._pattern: Any = None

    def on_step_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
        # peft saves AdaLoRA weights cut to the current rank pattern; the checkpoint must keep
        # all init_r rows (masked ones can come back), so the pattern is lifted during the save
        if control.should_save:
            cfg = model.peft_config["default"]
            self._pattern, cfg.rank_pattern = cfg.rank_pattern, None

    def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
        path = Path(self.resume_from or "") / self.FILE
        if self.resume_from and path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            alloc = model.base_model.rankallocator
            dev = next(model.parameters()).device
            for k in self.KEYS:
                setattr(alloc, k, {n: t.to(dev) for n, t in saved[k].items()})
            model.peft_config["default"].rank_pattern = saved["rank_pattern"]

    def on_save(self, args, state, control, model=None, **kw):  # noqa: ANN001
        alloc = model.base_model.rankallocator
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        saved = {k: {n: t.detach().cpu() for n, t in getattr(alloc, k).items()} for k in self.KEYS}
        saved["rank_pattern"] = self._pattern
        torch.save(saved, folder / self.FILE)
        model.peft_config["default"].rank_pattern = self._pattern


class _CountingCollator:
    """Wraps a collator to record each batch's examples and non-padding tokens.

    The Trainer fetches batches ahead of the step that uses them, so the totals are taken over
    the first ``steps x gradient_accumulation_steps`` batches only (``consumed``).
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.batches.append((len(features), int(batch["attention_mask"].sum())))
        return batch

    def consumed(self, n_batches: int) -> tuple[int, int]:
        used = self.batches[:n_batches]
        return sum(b[0] for b in used), sum(b[1] for b in used)


# ------------------------------------------------------------------------------------------
# peft wrapping


def _targets(model: Any, targets: Any) -> Any:
    if targets is None:
        return None  # peft's default for the architecture
    from lorasweep.training.targets import resolve_targets

    return resolve_targets(model, targets).target_modules


def build_peft_config(model: Any, ad: dict[str, Any], task: str, total_steps: int) -> Any:
    """The peft config of a trial's adapter block (see spec.adapter_config)."""
    from peft import AdaLoraConfig, LoraConfig, TaskType

    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    common = dict(
        lora_alpha=ad["alpha"],
        lora_dropout=ad["dropout"],
        bias=ad["bias"],
        task_type=task_type,
        use_rslora=ad["use_rslora"],
    )
    if ad["method"] == "adalora":
        tinit, tfinal, delta_t = adalora_schedule(
            total_steps, ad["tinit"], ad["tfinal"], ad["deltaT"]
        )
        return AdaLoraConfig(
            init_r=ad["init_r"],
            target_r=ad["target_r"],
            tinit=tinit,
            tfinal=tfinal,
            deltaT=delta_t,
            orth_reg_weight=ad["orth_reg_weight"],
            total_step=total_steps,
            target_modules=_targets(model, ad["target_modules"]),
            **common,
        )
    target_modules = _targets(model, ad["target_modules"])
    rank_pattern, alpha_pattern = ad.get("rank_pattern"), ad.get("alpha_pattern")
    if rank_pattern:
        from lorasweep.training.targets import rank_pattern_for_groups

        target_modules, rank_pattern, alpha_pattern = rank_pattern_for_groups(
            model, rank_pattern, alpha_pattern
        )
    return LoraConfig(
        r=ad["r"],
        target_modules=target_modules,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        use_dora=ad["method"] == "dora",
        **common,
    )


def _total_steps(args: TrainingArguments, n_train: int) -> int:
    """Optimizer steps of the run, as the Trainer counts them (checked again at train begin)."""
    keys = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
            "dataloader_drop_last", "num_train_epochs")  # fmt: skip
    return planned_steps({k: getattr(args, k) for k in keys}, n_train)


def adalora_allocation(model: Any) -> tuple[dict[str, int], int]:
    """Final per-module ranks and the allocated parameter count of an AdaLoRA model.

    peft's final rank pattern maps ``<module>.lora_E`` (names relative to the peft model's
    ``model``) to a keep-mask over the init_r singular values; a module without an entry
    keeps all init_r.
    """
    from peft.tuners.adalora import AdaLoraLayer

    pattern = model.peft_config["default"].rank_pattern or {}
    kept = {k.removesuffix(".lora_E"): int(sum(v)) for k, v in pattern.items()}
    ranks, params = {}, 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, AdaLoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"], module.lora_B["default"]
            k = kept.get(name, int(a.shape[0]))
            ranks[name] = k
            params += k * (a.shape[1] + b.shape[0] + 1)  # A: k x in, B: out x k, E: k
    return ranks, params


def lora_scales(model: Any) -> dict[str, float]:
    """The scale actually multiplied into each adapter's update, by module name inside a block.

    LoRA/DoRA: ``scaling`` (alpha/r, or alpha/sqrt(r) with rsLoRA). AdaLoRA divides by
    ``ranknum`` (init_r) in its forward, so its scale is alpha/init_r, also after pruning.
    """
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    from lorasweep.training.targets import _short_name

    scales: dict[str, float] = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            scale = float(module.scaling["default"])
            if isinstance(module, AdaLoraLayer):
                scale /= float(module.ranknum["default"])
            scales.setdefault(_short_name(name), round(scale, 6))
    return scales


# ------------------------------------------------------------------------------------------
# evaluation


def _classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and the mean cross-entropy, all from the logits.

    The loss is computed here rather than taken from the model: peft's AdaLoRA adds its
    orthogonality penalty to every loss its forward returns, in eval mode too.
    """
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - logits[np.arange(len(labels)), labels]
    pred = logits.argmax(-1)
    f1s = []
    for c in np.unique(np.concatenate([labels, pred])):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "accuracy": float(np.mean(pred == labels)),
        "f1": float(np.mean(f1s)),
        "eval_loss": float(nll.mean()),
    }


@torch.no_grad()
def _causal_eval(trainer: Trainer, eval_ds: Any) -> dict[str, float]:
    """Perplexity = exp(total NLL / total target tokens) over the whole eval set."""
    from lorasweep.training.formats import causal_lm_metrics, token_nll_sum

    model = trainer.model
    model.eval()
    nll, tokens = 0.0, 0
    for batch in trainer.get_eval_dataloader(eval_ds):
        batch = trainer._prepare_inputs(batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        s, n = token_nll_sum(logits.float(), labels)
        nll += float(s)
        tokens += int(n)
    return causal_lm_metrics(nll, tokens)


# ------------------------------------------------------------------------------------------
# the trial


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
                tags={"lorasweep.trial_id": trial.id},
                tensorboard_root=_tensorboard_root(workdir, context),
            )
        shutil.rmtree(workdir / "hf", ignore_errors=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(e).lower()


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
    cfg, ad, task = trial.config, trial.config["adapter"], trial.config["task"]
    if context.get("threads"):
        torch.set_num_threads(int(context["threads"]))
    tracking.configure(
        cfg.get("report_to"),
        sweep=context.get("name", "sweep"),
        run_name=_run_name(trial, context),
        tensorboard_root=_tensorboard_root(workdir, context),
    )

    # -- load: data (cached tokenized), model, peft wrap
    with monitor.timer("load"):
        tokenizer = models.load_tokenizer(cfg["model"])
        # the parent's fingerprint: every trial of a sweep uses the data the parent prepared
        train_ds, eval_ds, info = data_mod.prepare(
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
        total_steps = _total_steps(args, len(train_ds))
        if ad.get("quantization") == "4bit":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(args.gradient_checkpointing)
            )
        from peft import get_peft_model

        set_seed(trial.seed)
        model = get_peft_model(model, build_peft_config(model, ad, task, total_steps))
        trainable, total = model.get_nb_trainable_parameters()

    if task == "classification":
        inner = DataCollatorWithPadding(tokenizer)
    else:
        from lorasweep.training.formats import CausalCollator

        inner = CausalCollator(tokenizer)
    collator = _CountingCollator(inner)
    recorder = _Recorder(trial.id, progress, adalora=ad if ad["method"] == "adalora" else None)
    # a pruning segment: run up to ``stop_at`` (then pause) and/or continue from a checkpoint
    segment = context.get("segment") or {}
    stop_at, resume_from = segment.get("stop_at"), segment.get("resume_from")
    callbacks: list[TrainerCallback] = [recorder]
    if stop_at:
        callbacks.append(_PauseAt(int(stop_at)))
    if ad["method"] == "adalora" and (stop_at or resume_from):
        callbacks.append(_AdaLoraState(resume_from))
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, data_collator=collator, callbacks=callbacks
    )
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
        (step - recorder.start_step) * args.gradient_accumulation_steps
    )

    # -- evaluate (at a rung too: the same evaluation as the final one, on the first
    # ``eval_examples`` examples of the eval set when pruning asks for a cheaper rung)
    rung_n = segment.get("eval_examples") if paused else None
    scored = eval_ds.select(range(min(int(rung_n), len(eval_ds)))) if rung_n else eval_ds
    with monitor.timer("rung_eval" if paused else "eval"):
        if task == "classification":
            pred = trainer.predict(scored)
            metrics = _classification_metrics(pred.predictions, pred.label_ids)
        else:
            metrics = _causal_eval(trainer, scored)
    for k, v in metrics.items():  # eval_accuracy, eval_f1, eval_loss, eval_perplexity
        if k != "eval_tokens":
            result.curves[eval_curve(k)] = [[float(step), v]]
    if not all(math.isfinite(v) for v in metrics.values()):
        raise Diverged(f"evaluation is not finite at step {step}: {metrics}")
    train_secs = monitor.timings["train"]
    m = result.metrics
    m.update(metrics)
    m.update(
        train_loss=recorder.loss_curve[-1][1] if recorder.loss_curve else train_out.training_loss,
        train_loss_mean=float(train_out.training_loss),
        train_steps=float(step),
        train_examples=float(examples),
        train_tokens=float(tokens),
        train_segments=1.0,
        examples_per_second=examples / train_secs,
        tokens_per_second=tokens / train_secs,
        trainable_params=float(trainable),
        total_params=float(total),
        trainable_percent=100.0 * trainable / total,
    )
    if paused:
        m["rung_eval_examples"] = float(len(scored))
        # keep the checkpoint outside the Trainer's output folder, which is deleted at the end
        ckpt = workdir / "checkpoints" / f"step-{step}"
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(args.output_dir) / f"checkpoint-{step}"), str(ckpt))
        result.artifacts["paused"] = {"step": step, "checkpoint": str(ckpt)}
        result.status = TrialStatus.PENDING
        return

    # -- save the adapter and measure it
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
        non_lora = trainable - sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
        )
        m["initial_trainable_params"] = float(trainable)
        m["trainable_params"] = float(allocated + non_lora)
        m["trainable_percent"] = 100.0 * m["trainable_params"] / total
        result.artifacts["adalora_final_ranks"] = ranks
    result.artifacts["adapter_dir"] = str(adapter_dir)
    result.artifacts["data"] = {k: v for k, v in info.items() if k != "label_names"}
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

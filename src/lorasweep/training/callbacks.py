"""What the HF Trainer calls back into during a trial: the loss curve and divergence check,
progress, a pause at a pruning rung, AdaLoRA's allocator state, and batch counting."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorasweep.plan import adalora_schedule

ProgressFn = Callable[[str, int, int], None]  # (trial_id, step, max_steps)


class Diverged(RuntimeError):
    """The training loss (or the evaluation) became non-finite: stored as ``diverged``."""


class Recorder(TrainerCallback):
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


class PauseAt(TrainerCallback):
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


class AdaLoraState(TrainerCallback):
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


class CountingCollator:
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

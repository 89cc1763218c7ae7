"""A trial's adapter block (see plan.adapter_config) as a peft config, and what peft's wrapped
model says back: the run's step count, AdaLoRA's final allocation, the scales applied."""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from lorasweep.plan import adalora_schedule, planned_steps


def _resolved_targets(model: Any, targets: Any) -> dict[str, Any]:
    if targets is None:
        return {"target_modules": None}  # peft's default for the architecture
    from lorasweep.training.targets import resolve_targets

    return resolve_targets(model, targets).peft_kwargs()


def build_peft_config(model: Any, ad: dict[str, Any], task: str, total_steps: int) -> Any:
    """The peft config of a trial's adapter block (see plan.adapter_config)."""
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
            **_resolved_targets(model, ad["target_modules"]),
            **common,
        )
    rank_pattern, alpha_pattern = ad.get("rank_pattern"), ad.get("alpha_pattern")
    if rank_pattern:  # the pattern names the layers: target_modules do not apply
        from lorasweep.training.targets import rank_pattern_for_groups

        tm, rank_pattern, alpha_pattern = rank_pattern_for_groups(
            model, rank_pattern, alpha_pattern
        )
        targets = {"target_modules": tm}
    else:
        targets = _resolved_targets(model, ad["target_modules"])
    return LoraConfig(
        r=ad["r"],
        **targets,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        use_dora=ad["method"] == "dora",
        **common,
    )


def total_steps(args: TrainingArguments, n_train: int) -> int:
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

    from lorasweep.training.targets import short_name

    scales: dict[str, float] = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            scale = float(module.scaling["default"])
            if isinstance(module, AdaLoraLayer):
                scale /= float(module.ranknum["default"])
            scales.setdefault(short_name(name), round(scale, 6))
    return scales

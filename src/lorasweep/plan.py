"""Grid x variants x seeds -> trials: every trial's fully resolved configuration.

Also the step arithmetic the plan and the trials share (``planned_steps``, AdaLoRA's
``adalora_schedule``). Imports nothing from ``spec`` at run time: it reads the pydantic models by
attribute, so ``spec`` can import it.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

from lorasweep.records import Trial, canonical_json
from lorasweep.space import (
    describe_size,
    grid_points,
    lora_axes,
    search_points,
    split_point,
    varying_keys,
)

if TYPE_CHECKING:
    from lorasweep.spec import AdapterSpec, AlphaPolicy, SweepSpec

DEFAULT_RSLORA_ALPHA = 16.0
# dataset keys added after 0.1: left out of a trial's config while unset, so that the trial ids
# of runs recorded before they existed do not change
LATER_DATASET_KEYS = ("test_fraction", "test_split", "eval_file", "test_file", "max_test_examples")


def dataset_config(dataset: dict[str, Any]) -> dict[str, Any]:
    """The ``dataset`` block of a trial config: the spec's, without later keys left unset."""
    return {k: v for k, v in dataset.items() if not (k in LATER_DATASET_KEYS and v is None)}


def planned_steps(training: dict, n_train: int) -> int:
    """Optimizer steps of a run, counted as the HF Trainer counts them.

    ``training`` holds TrainingArguments names (missing ones take the Trainer's defaults);
    ``n_train`` is the number of training examples.
    """
    max_steps = int(training.get("max_steps") or 0)
    if max_steps > 0:
        return max_steps
    bs = int(training.get("per_device_train_batch_size", 8))
    accum = int(training.get("gradient_accumulation_steps", 1))
    batches = n_train // bs
    if not training.get("dataloader_drop_last", False) and n_train % bs:
        batches += 1
    per_epoch = max(1, math.ceil(batches / accum))
    return int(math.ceil(per_epoch * float(training.get("num_train_epochs", 3.0))))


def adalora_schedule(
    total_step: int, tinit: int | None, tfinal: int | None, delta_t: int | None
) -> tuple[int, int, int]:
    """(tinit, tfinal, deltaT) of AdaLoRA's budget schedule for a run of ``total_step`` steps.

    peft calls ``update_and_allocate(step)`` with steps 0..total_step-1: ranks stay at init_r
    up to ``tinit``, shrink on a cubic schedule every ``deltaT`` steps, are fixed at step
    ``total_step - tfinal`` and stay masked until the end. That needs tfinal >= 1 (else the
    final allocation never happens) and tinit < total_step - tfinal (a pruning phase).
    Defaults scale with the run: 1/5 warm-up, 1/3 final, about 10 re-allocations between.

    Raises:
        ValueError: the run is too short, or the given values leave no pruning phase.
    """
    if total_step < 2:
        raise ValueError(f"AdaLoRA needs at least 2 training steps, got {total_step}")
    final = tfinal if tfinal is not None else max(1, total_step // 3)
    init = tinit if tinit is not None else total_step // 5
    if tinit is None and init >= total_step - final:
        init = max(0, total_step - final - 1)
    if init >= total_step - final:
        raise ValueError(
            f"AdaLoRA needs tinit + tfinal < the number of training steps, got tinit={init}, "
            f"tfinal={final}, steps={total_step}"
        )
    delta = delta_t or max(1, (total_step - final - init) // 10)
    return init, final, delta


# --------------------------------------------------------------------------------------------
# Plan: grid x variants x seeds -> trials


def resolve_alpha(policy: AlphaPolicy | None, r: int) -> tuple[str, float, bool, float]:
    """Turn an alpha policy into (policy name, lora_alpha, use_rslora, scale) for rank r."""
    if policy is None:
        policy = 16.0
    if isinstance(policy, int | float):
        alpha = float(policy)
        return f"fixed:{alpha:g}", alpha, False, alpha / r
    if policy == "rank":
        return "rank", float(r), False, 1.0
    if policy == "2*rank":
        return "2*rank", 2.0 * r, False, 2.0
    alpha = float(policy.split(":", 1)[1]) if ":" in policy else DEFAULT_RSLORA_ALPHA
    return f"rslora:{alpha:g}", alpha, True, alpha / math.sqrt(r)


def merge_adapter(base: AdapterSpec, over: AdapterSpec) -> dict[str, Any]:
    """The variant's settings over the ``lora:`` defaults (only keys the variant sets)."""
    merged = base.model_dump(exclude_none=True)
    merged.update(over.model_dump(exclude_none=True, exclude_unset=True))
    if "training" in merged and "training" in base.model_dump(exclude_none=True):
        merged["training"] = {**(base.training or {}), **(over.training or {})}
    return merged


def is_standalone(adapter: dict[str, Any]) -> bool:
    """A variant that fixes its own ranks does not cross the rank grid."""
    return bool(
        adapter.get("rank") or adapter.get("rank_pattern") or adapter.get("method") == "adalora"
    )


def adapter_config(adapter: dict[str, Any], r: int | None) -> dict[str, Any]:
    """The resolved adapter block of a trial config: everything the trial needs, explicit."""
    method = adapter.get("method", "lora")
    out: dict[str, Any] = {
        "method": method,
        "target_modules": adapter.get("target_modules"),
        "dropout": adapter.get("dropout", 0.05),
        "bias": adapter.get("bias", "none"),
        "quantization": adapter.get("quantization"),
        "compute_dtype": adapter.get("compute_dtype"),
        "precision": adapter.get("precision", "fp32"),
    }
    if method == "adalora":
        init_r = adapter.get("init_r", 12)
        target_r = adapter.get("target_r", 8)
        out.update(
            init_r=init_r,
            target_r=target_r,
            tinit=adapter.get("tinit"),
            tfinal=adapter.get("tfinal"),
            deltaT=adapter.get("deltaT"),
            orth_reg_weight=adapter.get("orth_reg_weight", 0.5),
        )
        r_for_alpha = init_r  # peft's AdaLoRA scales by alpha / init_r, also after pruning
    else:
        pattern = adapter.get("rank_pattern")
        r = adapter.get("rank") or r
        if r is None:  # a pattern-only variant: the base r is the largest pattern rank
            r = max(pattern.values())
        out.update(r=r, rank_pattern=pattern, alpha_pattern=adapter.get("alpha_pattern"))
        r_for_alpha = r
    policy, alpha, rslora, scale = resolve_alpha(adapter.get("alpha"), r_for_alpha)
    out.update(alpha_policy=policy, alpha=alpha, use_rslora=rslora, scale=scale)
    if out.get("rank_pattern"):
        out.update(_pattern_alphas(adapter.get("alpha"), out["rank_pattern"], out["alpha_pattern"]))
    return out


def _pattern_alphas(
    policy: AlphaPolicy | None, ranks: dict[str, int], explicit: dict[str, float] | None
) -> dict[str, Any]:
    """Per-group alpha and scale of a rank pattern under an alpha policy.

    ``rank`` and ``2*rank`` follow each group's rank (the scale is the same everywhere);
    a fixed alpha and rsLoRA keep one alpha, so the scale differs per group. An explicit
    ``alpha_pattern`` entry wins over the policy. ``scale`` is None when groups differ.
    """
    alphas, scales = {}, {}
    for group, r in ranks.items():
        _, a, rslora, sc = resolve_alpha(policy, r)
        if explicit and group in explicit:
            a = float(explicit[group])
            sc = a / math.sqrt(r) if rslora else a / r
        alphas[group], scales[group] = a, sc
    uniform = len(set(scales.values())) == 1
    return {
        "alpha_pattern": alphas,
        "scale_pattern": scales,
        "scale": next(iter(scales.values())) if uniform else None,
    }


def plan(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep, in a deterministic order (variant, rank, point, seed).
    # long: the crossing rules (standalone variants, settings a variant fixes) in one place

    A trial's config is fully resolved (defaults applied), so its id changes exactly when
    something that affects its result changes, and not when the sweep is renamed. A point (one
    value per grid axis other than rank, times one search sample) goes into the adapter or the
    training arguments; a variant that sets a key itself does not cross that axis, one with its
    own rank (or AdaLoRA, or a rank pattern) does not cross the ranks.
    """
    variants = spec.variants or {"lora": type(spec.lora)()}  # the default variant
    common = {
        "task": spec.task,
        "model": spec.model,
        "dataset": dataset_config(spec.dataset.model_dump()),
    }
    lora = lora_axes(type(spec.lora))
    sampled = (
        search_points(spec.search.method, spec.search.n, spec.search.seed, spec.search.space)
        if spec.search
        else [{}]
    )
    points = [{**g, **s} for g in grid_points(spec.grid.axes()) for s in sampled]
    searched_rank = spec.search is not None and "rank" in spec.search.space
    rows: list[tuple[str, int | None, dict[str, Any], dict[str, Any]]] = []
    for vname, vspec in variants.items():
        base = merge_adapter(spec.lora, vspec)
        base_training = {**spec.training, **(base.pop("training", None) or {})}
        own = vspec.model_fields_set | set(vspec.training or {})
        standalone = is_standalone(base)
        ranks: list[int | None] = [None] if standalone or searched_rank else list(spec.grid.rank)
        seen: set[str] = set()
        for r, pt in itertools.product(ranks, points):
            pt = {k: v for k, v in pt.items() if k not in own}
            r = None if standalone else pt.pop("rank", r)
            marker = canonical_json([r, pt])
            if marker in seen:  # the variant fixes a key that told two points apart
                continue
            seen.add(marker)
            lora_pt, training_pt = split_point(pt, lora)
            ad = adapter_config({**base, **lora_pt}, r)
            row_rank = None if base.get("rank_pattern") else ad.get("r", ad.get("target_r"))
            cfg = {
                **common,
                "variant": vname,
                "training": {**base_training, **training_pt},
                "adapter": ad,
                "report_to": spec.report_to,
            }
            rows.append((vname, row_rank, cfg, pt))
    shown = varying_keys(pt for *_, pt in rows)
    return [
        Trial(
            config=cfg,
            variant=vname,
            rank=r,
            seed=seed,
            point={k: pt[k] for k in shown if k in pt},
        )
        for vname, r, cfg, pt in rows
        for seed in spec.seeds
    ]


def describe_plan(spec: SweepSpec, trials: list[Trial]) -> str:
    """``4 ranks x 3 learning_rate x 3 seeds -> 36 trials``: the size of the plan, in words."""
    axes = {k: len(v) for k, v in spec.grid.axes().items() if isinstance(v, list)}
    searched_rank = spec.search is not None and "rank" in spec.search.space
    ranks = None if searched_rank else len(spec.grid.rank)
    samples = spec.search.n if spec.search else None
    n_variants = len(spec.variants or {"lora": None})
    return describe_size(n_variants, ranks, axes, samples, len(spec.seeds), len(trials))

"""Exact LoRA parameter counts and a training-memory breakdown per rank, from a config alone.

Counts are peft's own (``estimate_model``: the meta model wrapped with the LoraConfig a trial
builds, so mixture-of-experts weights, encoders' poolers, rank patterns, seq2seq and
vision-language models count exactly as peft adapts them); memory is ``estimate_memory``'s
model of one training step's peak, its CUDA terms fitted to published measurements
(``benchmarks/bench_estimate.py``). ``estimate`` checks every argument first (one line naming
it), ``format_table`` is the terminal table, ``analysis.tool_plots.plot_estimate`` the figure.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from lorasweep.analysis.units import fmt_bytes_short, fmt_count_short
from lorasweep.tools.estimate_memory import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    LOSS_COPIES,
    OPTIMIZERS,
    WORKSPACE_FRACTION,
    activation_bytes,
    arch_of,
    base_bytes,
    qlora_saves_inputs,
)
from lorasweep.tools.estimate_model import TASKS, Adapted, count, model_task
from lorasweep.training.models import SHIPPED, load_config

GiB = 1024**3
DEFAULT_RANKS = [4, 8, 16, 32, 64, 128, 256]
# Cards by their nominal size, with the memory torch reports as their total (GiB, not the
# nominal GB): 16 GB (V100 15.8; T4 14.7), 24 GB (RTX 4090 23.6; A10G, L4 22.1), 40 GB (A100
# 39.4), 48 GB (A6000 47.5; L40S 44.4), 80 GB (H100 79.2, A100 79.3), 141 GB (H200 139.8).
DEFAULT_GPUS = {"16 GB": 15.6, "24 GB": 23.6, "40 GB": 39.4, "48 GB": 47.5, "80 GB": 79.2,
                "141 GB": 139.8}  # fmt: skip
DEFAULT_MARGIN = 0.10  # a card fits when the estimate plus this share of it is within its memory
VARIANTS = ("lora", "dora", "qlora")
__all__ = ["SHIPPED", "EstimateResult", "estimate", "format_table", "load_model_config"]


def load_model_config(model_ref: str) -> Any:
    """``models.load_config(model_ref, shipped=True)``: a shipped config by its name or hub id
    first (offline, no gated repository), else a builtin, local folder or config.json, or any
    hub id (config.json only). ModelError (a ValueError), one line, when there is none."""
    return load_config(model_ref, shipped=True)


@dataclass
class EstimateResult:
    """Counts and memory per rank. ``rows`` hold one dict per rank (bytes and counts)."""

    model: str
    model_type: str
    task: str
    variant: str
    target_modules: list[str] | str | None  # as passed to peft's LoraConfig
    target_parameters: list[str]
    adapted_modules: list[str]  # every weight peft adapts, fully qualified
    n_target_modules: int
    base_params: int
    dtype: str
    batch: int
    seq: int
    optimizer: str
    gradient_checkpointing: bool
    device: str
    gpus: dict[str, float]
    margin: float
    rank_pattern: dict[str, int] | None = None
    assumptions: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable."""
        return asdict(self)

    def format_table(self) -> str:
        """A terminal table: counts, memory parts and the GPUs each rank fits."""
        return format_table(self)


# -- the estimate ------------------------------------------------------------------------------


def estimate(
    model_ref: str,
    *,
    ranks: list[int] | None = None,
    targets: str | list[str] = "default",
    variant: str = "lora",
    task: str | None = None,
    batch: int = 1,
    seq: int = 512,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    gpus: dict[str, float] | None = None,
    margin: float = DEFAULT_MARGIN,
    device: str = "cuda",
    lora_dropout: float = 0.05,
    num_labels: int = 2,
    double_quant: bool = False,
    weights_dtype: str | None = None,
    rank_pattern: dict[str, int] | None = None,
    qlora_saved_inputs: bool | None = None,
) -> EstimateResult:
    """Estimate LoRA parameter counts and training memory for each rank.

    Args:
        model_ref: builtin (``builtin:minilm-l6``), shipped name (``mistral-7b``) or its hub id,
            local directory or config.json, or any hub id (fetches config.json only).
        ranks: LoRA ranks (default 4 ... 256); ignored with ``rank_pattern``.
        targets: ``"default"`` (peft's per model type), a group (``attention``, ``mlp``,
            ``experts``, ``language``, ``vision``, ``all-linear``), suffixes, or a
            comma-separated string of them.
        variant: ``lora``, ``dora`` or ``qlora`` (NF4 base weights).
        task: ``causal-lm``, ``classification``, ``seq2seq`` or ``image-text-to-text``; None
            infers it from the config.
        dtype: activations and base weights (``fp32``, ``bf16``, ``fp16``); for QLoRA the
            compute dtype. ``weights_dtype`` overrides the weights' dtype (e.g. fp32 weights
            trained with bf16 autocast).
        optimizer: ``adamw``, ``adamw-8bit`` or ``sgd``.
        gpus: name -> GiB for the "fits" verdicts (default: 16, 24, 40, 48, 80 and 141 GB
            cards at the memory torch reports for them, e.g. 79.2 GiB for an 80 GB H100).
        margin: a card fits when ``total x (1 + margin)`` is within its memory.
        device: ``cuda`` or ``cpu``: which runtime overhead and attention kernels to model.
        double_quant: QLoRA with bitsandbytes double quantization of the absmax constants.
        rank_pattern: group or suffix -> rank (``{"attention": 8, "mlp": 16}``): the layers and
            ranks of a manual rank pattern, one row.
        qlora_saved_inputs: 4-bit layers keep their inputs for backward (bitsandbytes before
            0.43.2); None: as the installed bitsandbytes does.

    Raises:
        ValueError: one line naming the argument and its value, or the model or target that
            cannot be built or wrapped.
    """
    ranks = _check_args(**locals())
    config = load_model_config(model_ref)
    task = task or model_task(config)
    adapted = _count(model_ref, config, task, targets, variant, rank_pattern, num_labels)
    arch = arch_of(config, adapted.module_types)
    p_w = DTYPE_BYTES[weights_dtype or dtype]
    gpus = dict(DEFAULT_GPUS if gpus is None else gpus)
    shared = _Shared(
        arch=arch, adapted=adapted, base_bytes=base_bytes(adapted, variant, p_w, double_quant),
        p_act=DTYPE_BYTES[dtype], p_w=p_w, batch=batch, seq=seq, device=device,
        checkpointing=gradient_checkpointing, lora_dropout=lora_dropout, variant=variant,
        task=task, optimizer=optimizer, gpus=gpus, margin=margin,
        saved_inputs=qlora_saves_inputs() if qlora_saved_inputs is None else qlora_saved_inputs,
    )  # fmt: skip
    notes = _notes(config.model_type, arch.heads is None, adapted, variant, task)
    return EstimateResult(
        model=model_ref, model_type=config.model_type, task=task, variant=variant,
        target_modules=copy.deepcopy(adapted.target_modules),
        target_parameters=list(adapted.target_parameters),
        adapted_modules=list(adapted.modules), n_target_modules=len(adapted.layers),
        base_params=adapted.base, dtype=dtype, batch=batch, seq=seq, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, device=device, gpus=gpus, margin=margin,
        rank_pattern=dict(rank_pattern) if rank_pattern else None,
        assumptions=_assumptions(shared, weights_dtype or dtype, double_quant),
        versions=_versions(), notes=notes,
        rows=[_rank_row(r, shared) | ({"rank": None} if rank_pattern else {})
              for r in ([1] if rank_pattern else ranks)],
    )  # fmt: skip


def _notes(model_type: str, no_attention: bool, adapted: Adapted, variant: str,
           task: str) -> list[str]:  # fmt: skip
    """What the estimate of this model does not model, or models against expectation."""
    notes = []
    if no_attention:
        notes.append(f"activations of {model_type} (no attention) are not modelled: "
                     "totals are lower bounds and fits are unknown")  # fmt: skip
    if variant == "qlora" and adapted.experts:
        notes.append(
            f"{fmt_count_short(adapted.experts)} fused expert weights stay unquantized: "
            "transformers 5 quantizes nn.Linear layers only, and prepare_model_for_kbit_training "
            f"upcasts them to fp32 ({fmt_bytes_short(4 * adapted.experts)}); transformers 4, "
            "with a linear layer per expert, quantized them"
        )
    if task == "image-text-to-text":
        notes.append("language tower activations of a text-only batch; image tokens add more")
    return notes


def _count(model_ref: str, config: Any, task: str, targets: Any, variant: str,
           rank_pattern: dict[str, int] | None, num_labels: int) -> Adapted:  # fmt: skip
    """``estimate_model.count``, cached for shipped and builtin models (their configs do not
    change within a process)."""
    if model_ref.lower().removeprefix("builtin:") in SHIPPED or model_ref.startswith("builtin:"):
        key = (tuple(targets) if isinstance(targets, list) else targets,
               tuple(sorted((rank_pattern or {}).items())))  # fmt: skip
        return _cached_count(model_ref.lower(), task, key, variant, num_labels)
    return count(config, task, targets, variant, rank_pattern, num_labels)


@lru_cache(maxsize=16)
def _cached_count(model_ref: str, task: str, key: tuple, variant: str, num_labels: int) -> Adapted:
    targets, pattern = key
    return count(load_model_config(model_ref), task,
                 list(targets) if isinstance(targets, tuple) else targets, variant,
                 dict(pattern) or None, num_labels)  # fmt: skip


def _check_args(**a: Any) -> list[int]:
    """Every argument of ``estimate``, one line naming the first bad one; the sorted ranks."""
    _check(a["variant"], VARIANTS, "variant")
    _check(a["dtype"], DTYPE_BYTES, "dtype")
    _check(a["weights_dtype"] or a["dtype"], DTYPE_BYTES, "weights_dtype")
    _check(a["optimizer"], OPTIMIZERS, "optimizer")
    _check(a["device"], ("cuda", "cpu"), "device")
    if a["task"] is not None:
        _check(a["task"], TASKS, "task")
    ranks = list(DEFAULT_RANKS if a["ranks"] is None else a["ranks"])
    for name, values in (("ranks", ranks), ("rank_pattern", (a["rank_pattern"] or {}).values()),
                         ("batch", [a["batch"]]), ("seq", [a["seq"]]),
                         ("num_labels", [a["num_labels"]])):  # fmt: skip
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad or (name == "ranks" and not ranks):
            raise ValueError(f"{name} must be positive integers, got {bad[0] if bad else ranks!r}")
    if a["rank_pattern"] and a["targets"] != "default":
        raise ValueError(
            f"targets: a rank pattern names its own layers ({', '.join(a['rank_pattern'])}); "
            f"give targets or rank_pattern, not both (got targets {a['targets']!r})"
        )
    if not 0 <= a["lora_dropout"] < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {a['lora_dropout']!r}")
    if not (isinstance(a["margin"], (int, float)) and 0 <= a["margin"] < 1):
        raise ValueError(f"margin must be a fraction in [0, 1), got {a['margin']!r}")
    for name, gib in (a["gpus"] or {}).items():
        if not isinstance(gib, (int, float)) or not math.isfinite(gib) or gib <= 0:
            raise ValueError(f"gpus: {name!r} needs a positive memory in GiB, got {gib!r}")
    return sorted(dict.fromkeys(int(r) for r in ranks))


def _check(value: str, allowed: Any, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class _Shared:
    """What every rank's row of one estimate shares."""

    arch: Any
    adapted: Adapted
    base_bytes: int
    p_act: int  # bytes per activation value
    p_w: int  # bytes per base weight
    batch: int
    seq: int
    device: str
    checkpointing: bool
    lora_dropout: float
    variant: str
    task: str
    optimizer: str
    gpus: dict[str, float]
    margin: float
    saved_inputs: bool  # QLoRA: 4-bit layers keep their inputs (bitsandbytes < 0.43.2)


def _rank_row(r: int, s: _Shared) -> dict[str, Any]:
    """Counts and memory parts (bytes) of one rank."""
    ad = s.adapted
    lora, trainable, total_params = (ad.at(pair, r) for pair in (ad.lora, ad.trainable, ad.total))
    head = trainable - lora
    act = {
        gc: activation_bytes(s.arch, ad, r, batch=s.batch, seq=s.seq, p=s.p_act,
                             device=s.device, checkpointing=gc, lora_dropout=s.lora_dropout,
                             variant=s.variant, task=s.task, saved_inputs=s.saved_inputs)
        for gc in (False, True)
    }  # fmt: skip
    activations = act[s.checkpointing]
    runtime = CPU_RUNTIME_BYTES if s.device == "cpu" else CUDA_CONTEXT_BYTES
    mem = {
        "base_weights_bytes": s.base_bytes,
        "lora_weights_bytes": lora * 4 + head * s.p_w,
        "gradient_bytes": lora * 4 + head * s.p_w,
        "optimizer_bytes": int(trainable * OPTIMIZERS[s.optimizer]),
        "activation_bytes": activations,
        "overhead_bytes": int(runtime + WORKSPACE_FRACTION[s.device] * (activations or 0)),
    }
    total = sum(v or 0 for v in mem.values())
    known = activations is not None
    return {
        "rank": r,
        "lora_params": lora,
        "trainable_params": trainable,
        "total_params": total_params,
        "trainable_percent": 100.0 * trainable / total_params,
        "adapter_bytes_fp32": lora * 4,
        "adapter_bytes_dtype": lora * s.p_act,
        **mem,
        "activation_bytes_no_checkpointing": act[False],
        "activation_bytes_checkpointing": act[True],
        "total_bytes": total,
        # what torch's allocator reports (max_memory_reserved): all but the CUDA context
        "allocator_peak_bytes": total - (runtime if s.device == "cuda" else 0),
        "fits": {
            name: (total * (1 + s.margin) <= gib * GiB if known else None)
            for name, gib in s.gpus.items()
        },  # fmt: skip
    }


def _assumptions(s: _Shared, weights_dtype: str, double_quant: bool) -> dict[str, Any]:
    return {
        "weights_dtype": "nf4 (linear and expert weights), fp32 (the rest)"
        if s.variant == "qlora" else weights_dtype,
        "double_quant": double_quant if s.variant == "qlora" else None,
        "qlora_saved_inputs": s.saved_inputs if s.variant == "qlora" else None,
        "activations_dtype": next(k for k, v in DTYPE_BYTES.items() if v == s.p_act),
        "adapter_dtype": "fp32 (weights, gradients, optimizer states)",
        "optimizer_state_bytes_per_param": OPTIMIZERS[s.optimizer],
        "lora_dropout": s.lora_dropout,
        "attention": "math path" if s.device == "cpu" and s.arch.attn_dropout > 0
        else "fused kernel (sdpa/flash)",
        "loss": f"{LOSS_COPIES} fp32 copies of the logits" if s.task != "classification"
        else "classification head",
        "workspace_fraction_of_activations": WORKSPACE_FRACTION[s.device],
        "runtime_bytes": CPU_RUNTIME_BYTES if s.device == "cpu" else CUDA_CONTEXT_BYTES,
        "fits_margin": s.margin,
        "sequence": f"every sequence {s.seq} tokens (padding to the longest counts as tokens)",
    }  # fmt: skip


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("lorasweep", "torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# -- output ------------------------------------------------------------------------------------


def format_table(result: EstimateResult) -> str:
    """The per-rank table shown by ``lorasweep estimate``."""
    cols = ["rank", "LoRA params", "% trainable", "adapter", "base", "LoRA+grad+optim",
            "activations", "overhead", "total", "fits"]  # fmt: skip
    lines = []
    for row in result.rows:
        fits = [name for name, ok in row["fits"].items() if ok]
        unknown = row["activation_bytes"] is None
        lines.append([
            "pattern" if row["rank"] is None else str(row["rank"]),
            fmt_count_short(row["lora_params"]),
            f"{row['trainable_percent']:.3f}", fmt_bytes_short(row["adapter_bytes_fp32"]),
            fmt_bytes_short(row["base_weights_bytes"]),
            fmt_bytes_short(row["lora_weights_bytes"] + row["gradient_bytes"]
                            + row["optimizer_bytes"]),
            "?" if unknown else fmt_bytes_short(row["activation_bytes"]),
            fmt_bytes_short(row["overhead_bytes"]),
            (">" if unknown else "") + fmt_bytes_short(row["total_bytes"]),
            "unknown" if unknown else ", ".join(fits) or "none",
        ])  # fmt: skip
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    tm = result.target_modules
    targets = [tm] if isinstance(tm, str) else list(tm or [])
    targets += [f"{p} (parameter)" for p in result.target_parameters]
    pattern = ""
    if result.rank_pattern:
        pattern = " ranks " + ", ".join(f"{k}={v}" for k, v in result.rank_pattern.items())
    header = (
        f"{result.model} ({result.model_type}, {result.task}, "
        f"{fmt_count_short(result.base_params)} params) {result.variant} on "
        f"{result.n_target_modules} weights [{', '.join(targets) or 'peft default'}]{pattern}\n"
        f"{result.device}, {result.dtype}, batch {result.batch} x seq {result.seq}, "
        f"{result.optimizer}, gradient checkpointing "
        f"{'on' if result.gradient_checkpointing else 'off'}; memory at a training step's "
        f"peak; fits: total + {result.margin:.0%} within the card's memory"
    )
    fmt = "  ".join(f"{{:>{w}}}" for w in widths[:-1]) + "  {}"
    body = [fmt.format(*cols)] + [fmt.format(*line) for line in lines]
    notes = [f"note: {n}" for n in result.notes]
    return "\n".join([header, *body, *notes])

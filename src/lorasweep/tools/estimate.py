"""Exact LoRA parameter counts and a training-memory breakdown per rank, from a config alone.

The model is built on the meta device (no weights, no network beyond config.json), the targets
are resolved against its real module names, and counts come from the targeted layers' shapes:
LoRA adds ``r * (in + out)`` per layer (DoRA also a magnitude vector of ``out``), and a
classification head is trained in full (peft's ``modules_to_save`` copy). Tests check these
numbers against peft's own ``get_nb_trainable_parameters`` on real instantiations.

Memory, in bytes, for one training step at its peak (the end of the forward pass):

- base weights: ``dtype`` bytes per parameter; QLoRA stores the targetable linear weights as NF4
  (0.5 byte plus one fp32 absmax per 64 weights, or 8-bit absmax with double quantization) and
  keeps the rest in fp32 (``prepare_model_for_kbit_training`` upcasts them);
- LoRA weights, gradients and optimizer states: fp32 (peft upcasts adapters by default); AdamW
  keeps two states, 8-bit AdamW two bytes, SGD none;
- activations: what autograd saves for the backward pass with a frozen base (a frozen linear
  saves nothing; norms, attention, activation functions, dropout masks and the LoRA path do), per
  layer and summed over layers, or with gradient checkpointing one input per layer plus one
  layer recomputed; causal LMs add the fp32 logits of the loss. The formulas were checked
  against the tensors autograd actually saves (``saved_tensors_hooks``) on MiniLM;
- overhead: the runtime (CPU: the RSS of python + torch + transformers + peft, since the trial's
  CPU peak is process RSS; CUDA: the context) plus working memory of the backward pass and
  allocator slack, a fraction of the activations calibrated on measured CPU runs.

The config comes from ``training.models.load_config`` (shipped configs first); the table is
``format_table``, the figure ``analysis.tool_plots.plot_estimate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from lorasweep.analysis.units import fmt_bytes_short, fmt_count_short
from lorasweep.training.models import SHIPPED, infer_task, load_config
from lorasweep.training.targets import build_meta_model, linear_module_names, resolve_targets

GiB = 1024**3
MiB = 1024**2
DEFAULT_RANKS = [4, 8, 16, 32, 64, 128, 256]
# Nominal memory of common GPUs, GiB.
DEFAULT_GPUS = {"RTX 3090": 24.0, "RTX 4090": 24.0, "A100 40GB": 40.0, "A100 80GB": 80.0,
                "H100 80GB": 80.0}  # fmt: skip
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = {"adamw": 8.0, "adamw-8bit": 2.0, "sgd": 0.0}  # state bytes per trainable param
VARIANTS = ("lora", "dora", "qlora")
# Runtime baselines: RSS after importing torch, transformers, peft and the Trainer (measured here,
# torch 2.13 CPU, see docs/benchmarks.md); the CUDA context and cuBLAS workspace.
CPU_RUNTIME_BYTES = 530 * MiB
CUDA_RUNTIME_BYTES = 600 * MiB
# Backward-pass working memory and allocator slack as a fraction of the saved activations: on
# CPU (glibc keeps freed chunks) fitted to MiniLM runs at 0.5k-4k tokens per batch (0.6-1.0);
# for CUDA's caching allocator an assumption, not yet calibrated on a GPU.
WORKSPACE_FRACTION = {"cpu": 0.7, "cuda": 0.3}

_SEQ_CLS_HEADS = ("classifier", "score")  # peft's modules_to_save for SEQ_CLS


def load_model_config(model_ref: str) -> Any:
    """``models.load_config(model_ref, shipped=True)``: a shipped config by its name or hub id
    first (offline, no gated repository), else a builtin, local folder or config.json, or any
    hub id (config.json only). ModelError (a ValueError), one line, when there is none."""
    return load_config(model_ref, shipped=True)


# -- shapes ------------------------------------------------------------------------------------


@dataclass
class _Arch:
    """What the memory formulas need, read from the config and the meta model."""

    layers: int
    hidden: int
    heads: int
    q_dim: int
    kv_dim: int
    inter: int
    vocab: int
    gated: bool
    norms_per_layer: int
    rms_norm: bool
    hidden_dropout: float
    attn_dropout: float


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    return default


def _in_out(module: Any) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # transformers Conv1D (GPT-2)


def _layer_index(name: str) -> int | None:
    nums = [int(p) for p in name.split(".") if p.isdigit()]
    return nums[0] if nums else None


def _arch(config: Any, model: Any) -> _Arch:
    hidden = _cfg(config, "hidden_size", "n_embd")
    heads = _cfg(config, "num_attention_heads", "n_head")
    head_dim = _cfg(config, "head_dim", default=hidden // heads)
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    names = linear_module_names(model)
    block = ""  # the first repeated block, e.g. "model.layers.0"
    for n in names:
        parts = n.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        if digits:
            block = ".".join(parts[: digits[0] + 1])
            break
    norms = [type(m).__name__ for n, m in model.named_modules()
             if n.startswith(block + ".") and "norm" in type(m).__name__.lower()]  # fmt: skip
    return _Arch(
        layers=_cfg(config, "num_hidden_layers", "n_layer"),
        hidden=hidden,
        heads=heads,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        inter=_cfg(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        vocab=config.vocab_size,
        gated=any(n.endswith(("gate_proj", "gate_up_proj", ".w1")) for n in names),
        norms_per_layer=max(len(norms), 1),
        rms_norm=any("rms" in n.lower() for n in norms),
        hidden_dropout=_cfg(config, "hidden_dropout_prob", "resid_pdrop", "dropout", default=0.0),
        attn_dropout=_cfg(
            config, "attention_probs_dropout_prob", "attn_pdrop", "attention_dropout", default=0.0
        ),
    )


@dataclass
class _Targets:
    target_modules: list[str] | str
    n_modules: int
    sum_in_out: int  # sum over targeted layers of in + out
    sum_out: int
    # per transformer block: (sum of in, sum of out, number of layers, sum of in * out)
    per_block: dict[int | None, tuple[int, int, int, int]]


def _targets(model: Any, targets: Any) -> _Targets:
    resolved = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    per_block: dict[int | None, list[int]] = {}
    s_io = s_out = 0
    for name in resolved.modules:
        i, o = _in_out(modules[name])
        s_io += i + o
        s_out += o
        acc = per_block.setdefault(_layer_index(name), [0, 0, 0, 0])
        for k, v in enumerate((i, o, 1, i * o)):
            acc[k] += v
    return _Targets(resolved.target_modules, len(resolved.modules), s_io, s_out,
                    {k: tuple(v) for k, v in per_block.items()})  # fmt: skip


def _head_params(model: Any, task: str) -> int:
    if task != "classification":
        return 0
    for name in _SEQ_CLS_HEADS:
        head = getattr(model, name, None)
        if head is not None:
            return sum(p.numel() for p in head.parameters())
    return 0


def _quantized_params(model: Any) -> int:
    """Weights bitsandbytes stores in 4 bit: every linear layer outside the task head."""
    modules = dict(model.named_modules())
    return sum(modules[n].weight.numel() for n in linear_module_names(model))


# -- the estimate ------------------------------------------------------------------------------


@dataclass
class EstimateResult:
    """Counts and memory per rank. ``rows`` hold one dict per rank (bytes and counts)."""

    model: str
    model_type: str
    task: str
    variant: str
    target_modules: list[str] | str
    n_target_modules: int
    base_params: int
    dtype: str
    batch: int
    seq: int
    optimizer: str
    gradient_checkpointing: bool
    device: str
    gpus: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable."""
        return asdict(self)

    def format_table(self) -> str:
        """A terminal table: counts, memory parts and the GPUs each rank fits."""
        return format_table(self)


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
    device: str = "cuda",
    lora_dropout: float = 0.05,
    num_labels: int = 2,
    double_quant: bool = False,
    weights_dtype: str | None = None,
) -> EstimateResult:
    """Estimate LoRA parameter counts and training memory for each rank.

    Args:
        model_ref: builtin (``builtin:minilm-l6``), shipped name (``mistral-7b``) or its hub id,
            local directory or config.json, or any hub id (fetches config.json only).
        ranks: LoRA ranks (default 4 ... 256).
        targets: ``"default"`` (peft's per model type), a group (``attention``, ``mlp``,
            ``all-linear``), suffixes, or a comma-separated string of them.
        variant: ``lora``, ``dora`` or ``qlora`` (NF4 base weights).
        task: ``classification`` or ``causal-lm``; None infers it from the config.
        dtype: activations and base weights (``fp32``, ``bf16``, ``fp16``); for QLoRA the
            compute dtype. ``weights_dtype`` overrides the weights' dtype (e.g. fp32 weights
            trained with bf16 autocast).
        optimizer: ``adamw``, ``adamw-8bit`` or ``sgd``.
        gpus: name -> GiB for the "fits" column (default: RTX 3090/4090, A100 40/80, H100).
        device: ``cuda`` or ``cpu``: which runtime overhead and attention kernels to model.
        double_quant: QLoRA with bitsandbytes double quantization of the absmax constants.
    """
    ranks = list(ranks or DEFAULT_RANKS)
    _check(variant, VARIANTS, "variant")
    _check(dtype, DTYPE_BYTES, "dtype")
    _check(weights_dtype or dtype, DTYPE_BYTES, "weights_dtype")
    _check(optimizer, OPTIMIZERS, "optimizer")
    _check(device, ("cuda", "cpu"), "device")
    if not ranks or any(int(r) < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    config = load_model_config(model_ref)
    task = task or infer_task(config) or "causal-lm"
    model = _meta_model(model_ref, config, task, num_labels)
    arch = _arch(config, model)
    tg = _targets(model, targets)
    base = sum(p.numel() for p in model.parameters())
    p_w = DTYPE_BYTES[weights_dtype or dtype]
    if variant == "qlora":
        quant = _quantized_params(model)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
        base_bytes = int(quant * per_weight) + (base - quant) * 4
    else:
        base_bytes = base * p_w
    gpus = dict(DEFAULT_GPUS if gpus is None else gpus)
    shared = _Shared(
        arch=arch, tg=tg, base=base, head=_head_params(model, task),
        base_bytes=base_bytes, p_act=DTYPE_BYTES[dtype], p_w=p_w, batch=batch, seq=seq,
        device=device, checkpointing=gradient_checkpointing, lora_dropout=lora_dropout,
        variant=variant, task=task, optimizer=optimizer, gpus=gpus,
    )  # fmt: skip
    return EstimateResult(
        model=model_ref, model_type=config.model_type, task=task, variant=variant,
        target_modules=tg.target_modules, n_target_modules=tg.n_modules, base_params=base,
        dtype=dtype, batch=batch, seq=seq, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, device=device, gpus=gpus,
        rows=[_rank_row(r, shared) for r in sorted(int(r) for r in ranks)],
    )  # fmt: skip


@dataclass(frozen=True)
class _Shared:
    """What every rank's row of one estimate shares."""

    arch: _Arch
    tg: _Targets
    base: int  # base model parameters
    head: int  # classification head parameters, trained in full
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


def _rank_row(r: int, s: _Shared) -> dict[str, Any]:
    """Counts and memory parts (bytes) of one rank."""
    lora = r * s.tg.sum_in_out + (s.tg.sum_out if s.variant == "dora" else 0)
    trainable = lora + s.head
    total_params = s.base + lora + s.head
    act = {
        gc: _activation_bytes(s.arch, s.tg, r, s.batch, s.seq, s.p_act, s.device, gc,
                              s.lora_dropout, s.variant, s.task)
        for gc in (False, True)
    }  # fmt: skip
    activations = act[s.checkpointing]
    mem = {
        "base_weights_bytes": s.base_bytes,
        "lora_weights_bytes": lora * 4 + s.head * s.p_w,
        "gradient_bytes": lora * 4 + s.head * s.p_w,
        "optimizer_bytes": int(trainable * OPTIMIZERS[s.optimizer]),
        "activation_bytes": activations,
        "overhead_bytes": int(
            (CPU_RUNTIME_BYTES if s.device == "cpu" else CUDA_RUNTIME_BYTES)
            + WORKSPACE_FRACTION[s.device] * activations
        ),
    }
    total = sum(mem.values())
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
        "fits": {name: total <= gib * GiB for name, gib in s.gpus.items()},
    }


def _check(value: str, allowed: Any, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def _meta_model(model_ref: str, config: Any, task: str, num_labels: int) -> Any:
    if model_ref.lower().removeprefix("builtin:") in SHIPPED or model_ref.startswith("builtin:"):
        return _cached_meta_model(model_ref.lower(), task, num_labels)
    return build_meta_model(config, task, num_labels)


@lru_cache(maxsize=8)
def _cached_meta_model(model_ref: str, task: str, num_labels: int) -> Any:
    return build_meta_model(load_model_config(model_ref), task, num_labels)


def _activation_bytes(
    a: _Arch, tg: _Targets, r: int, batch: int, seq: int, p: int, device: str,
    checkpointing: bool, lora_dropout: float, variant: str, task: str,
) -> int:  # fmt: skip
    """Bytes autograd keeps for backward at the end of the forward pass (frozen base)."""
    t = batch * seq  # tokens
    # CPU dropout keeps a float mask (same dtype as its input); CUDA a bool mask.
    mask = p if device == "cpu" else 1
    norms = a.norms_per_layer * t * a.hidden * (4 if a.rms_norm else p)
    attn = t * (a.q_dim + 2 * a.kv_dim) * p  # q, k, v kept by the attention kernel
    if device == "cpu" and a.attn_dropout > 0:  # math path: probs, dropout mask, dropped probs
        attn += batch * a.heads * seq * seq * (2 * p + mask)
    else:  # fused kernel: output and log-sum-exp
        attn += t * a.q_dim * p + batch * a.heads * seq * 4
    mlp = (3 if a.gated else 1) * t * a.inter * p  # act input (and gate/up outputs if gated)
    dropout = (2 * t * a.hidden * mask) if a.hidden_dropout > 0 else 0
    per_layer = norms + attn + mlp + dropout

    def lora_path(block: tuple[int, int, int, int]) -> int:
        s_in, s_out, n, s_io = block
        # fp32 dropout output saved by lora_A (+ its mask), lora_A output saved by lora_B
        out = t * s_in * 4 + (t * s_in * (4 if device == "cpu" else 1) if lora_dropout else 0)
        out += n * t * r * 4
        if variant == "dora":  # the combined weight (for its norm) and the base output
            out += s_io * 4 + t * s_out * 4
        return out

    blocks = {k: per_layer * (k is not None) + lora_path(v) for k, v in tg.per_block.items()}
    adapted = max((k for k in tg.per_block if k is not None), default=None)
    first = min((k for k in tg.per_block if k is not None), default=0)
    # Layers from the first adapted one on keep activations; earlier ones need no gradient.
    n_layers = a.layers - first if adapted is not None else 0
    heaviest = max(blocks.values(), default=0)
    plain = n_layers - sum(1 for k in blocks if k is not None)
    if checkpointing:
        body = n_layers * t * a.hidden * p + heaviest + blocks.get(None, 0)
    else:
        body = sum(blocks.values()) + plain * per_layer
    head = 3 * t * a.vocab * 4 if task == "causal-lm" else 0  # fp32 log-softmax and its grads
    return int(body + head)


# -- output ------------------------------------------------------------------------------------


def format_table(result: EstimateResult) -> str:
    """The per-rank table shown by ``lorasweep estimate``."""
    cols = ["rank", "LoRA params", "% trainable", "adapter", "base", "LoRA+grad+optim",
            "activations", "overhead", "total", "fits"]  # fmt: skip
    lines = []
    for row in result.rows:
        fits = [name for name, ok in row["fits"].items() if ok]
        lines.append([
            str(row["rank"]), fmt_count_short(row["lora_params"]),
            f"{row['trainable_percent']:.3f}", fmt_bytes_short(row["adapter_bytes_fp32"]),
            fmt_bytes_short(row["base_weights_bytes"]),
            fmt_bytes_short(row["lora_weights_bytes"] + row["gradient_bytes"]
                       + row["optimizer_bytes"]),
            fmt_bytes_short(row["activation_bytes"]), fmt_bytes_short(row["overhead_bytes"]),
            fmt_bytes_short(row["total_bytes"]), ", ".join(fits) or "none",
        ])  # fmt: skip
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    tm = result.target_modules
    params = fmt_count_short(result.base_params)
    header = (
        f"{result.model} ({result.model_type}, {result.task}, {params} "
        f"params) {result.variant} on {result.n_target_modules} layers "
        f"[{tm if isinstance(tm, str) else ', '.join(tm)}]\n"
        f"{result.device}, {result.dtype}, batch {result.batch} x seq {result.seq}, "
        f"{result.optimizer}, gradient checkpointing "
        f"{'on' if result.gradient_checkpointing else 'off'}; memory per training step"
    )
    fmt = "  ".join(f"{{:>{w}}}" for w in widths[:-1]) + "  {}"
    body = [fmt.format(*cols)] + [fmt.format(*line) for line in lines]
    return header + "\n" + "\n".join(body)

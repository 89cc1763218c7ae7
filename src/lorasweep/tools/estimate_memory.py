"""Training memory at the peak of one step, from a config and peft's adapted layers.

In bytes:

- base weights: ``dtype`` bytes per parameter; QLoRA stores the linear layers as NF4 (0.5 byte
  plus one fp32 absmax per 64 weights, or an 8-bit absmax and a second level with double
  quantization) and keeps the rest in fp32 (``prepare_model_for_kbit_training`` upcasts them),
  fused mixture-of-experts weights included: transformers 5's bitsandbytes integration
  quantizes nn.Linear layers only;
- LoRA weights, gradients and optimizer states: fp32 (peft upcasts adapters by default); AdamW
  keeps two states, 8-bit AdamW two bytes, SGD none; a classification head in ``dtype``;
- activations: what autograd saves for the backward pass with a frozen base (a frozen linear
  saves nothing; norms, attention, activation functions, dropout masks and the LoRA path do), per
  layer and summed over layers, or with gradient checkpointing one input per layer plus one
  layer recomputed; causal LMs add the fp32 logits of the loss. The formulas were checked
  against the tensors autograd actually saves (``saved_tensors_hooks``) on MiniLM and Llama;
  mixture-of-experts layers keep the activations of ``num_experts_per_tok`` experts per token
  (and of a shared expert); an encoder-decoder counts both stacks at ``seq`` tokens and the
  decoder's cross-attention; a vision-language model its language tower (a text-only batch);
- overhead: the runtime (CPU: the RSS of python + torch + transformers + peft; CUDA: the
  context, outside what torch's allocator reports) plus working memory of the backward pass and
  allocator slack, a fraction of the activations (CPU: fitted to measured runs; CUDA: fitted to
  published peaks, see ``benchmarks/bench_estimate.py`` and docs/benchmarks.md).

State-space models (Mamba) have no attention heads: their activations are not modelled, and an
estimate says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorasweep.tools.estimate_model import Adapted
from lorasweep.training.targets import tower

MiB = 1024**2
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = {"adamw": 8.0, "adamw-8bit": 2.0, "sgd": 0.0}  # state bytes per trainable param
# Runtime baselines: RSS after importing torch, transformers, peft and the Trainer (measured here,
# torch 2.13 CPU, see docs/benchmarks.md); the CUDA context, which torch's allocator statistics
# (max_memory_reserved) do not include.
CPU_RUNTIME_BYTES = 530 * MiB
CUDA_CONTEXT_BYTES = 500 * MiB
# Backward-pass working memory and allocator slack as a fraction of the saved activations: on
# CPU (glibc keeps freed chunks) fitted to MiniLM runs at 0.5k-4k tokens per batch (0.6-1.0);
# on CUDA (the caching allocator's reserved memory) fitted to published peaks.
WORKSPACE_FRACTION = {"cpu": 0.7, "cuda": 0.06}
# fp32 copies of the logits alive at the loss (the upcast logits, log-softmax, its gradient)
LOSS_COPIES = 3


@dataclass
class Arch:
    """What the activation formulas need, read from the (text) config and the meta model."""

    layers: int  # blocks that run on every token (encoder + decoder for seq2seq)
    decoder_layers: int  # of which with cross-attention
    hidden: int
    heads: int | None  # None: no attention (state-space models), activations not modelled
    q_dim: int
    kv_dim: int
    mlp_width: int  # feed-forward activations per token (top-k experts + a shared expert)
    vocab: int
    gated: bool
    norms_per_layer: int
    rms_norm: bool
    hidden_dropout: float
    attn_dropout: float
    moe: bool
    top_k: int  # experts per token (1 for dense models)


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    return default


def arch_of(config: Any, model_modules: list[tuple[str, str]]) -> Arch:
    """``model_modules``: (name, class name) of the meta model's modules."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _cfg(text, "hidden_size", "n_embd", "d_model")
    heads = _cfg(text, "num_attention_heads", "n_head", "num_heads")
    head_dim = _cfg(text, "head_dim", "d_kv", default=hidden // heads if heads else 0)
    kv_heads = _cfg(text, "num_key_value_heads", default=heads) or 0
    layers = _cfg(text, "num_hidden_layers", "n_layer", "num_layers", default=1)
    decoder = _cfg(text, "num_decoder_layers", default=layers) if text.is_encoder_decoder else 0
    top_k = _cfg(text, "num_experts_per_tok", "moe_topk", default=0)
    moe = bool(top_k) and _cfg(text, "num_local_experts", "num_experts", default=1) > 1
    inter = _cfg(text, "intermediate_size", "ffn_dim", "n_inner", "d_ff", default=4 * hidden)
    width = inter
    if moe:
        width = top_k * _cfg(text, "moe_intermediate_size", default=inter)
        width += _cfg(text, "shared_expert_intermediate_size", default=0)
    names = [n for n, _ in model_modules]
    # the first repeated block of the language model (a vision tower's blocks come first in
    # vision-language models, with other norms)
    block = next((".".join(n.split(".")[: i + 1]) for n in names if tower(n) == "language"
                  for i, p in enumerate(n.split(".")) if p.isdigit()), "")  # fmt: skip
    norms = [c for n, c in model_modules if n.startswith(block + ".") and "norm" in c.lower()]
    return Arch(
        layers=layers + decoder,
        decoder_layers=decoder,
        hidden=hidden,
        heads=heads,
        q_dim=(heads or 0) * head_dim,
        kv_dim=kv_heads * head_dim,
        mlp_width=width,
        vocab=text.vocab_size,
        gated=any(n.endswith(("gate_proj", "gate_up_proj", ".w1", "wi_0")) for n in names) or moe,
        norms_per_layer=max(len(norms), 1),
        rms_norm=any("rms" in c.lower() for c in norms) or text.model_type.startswith("t5"),
        hidden_dropout=_cfg(
            text, "hidden_dropout_prob", "resid_pdrop", "dropout_rate", "dropout", default=0.0
        ),  # fmt: skip
        attn_dropout=_cfg(
            text, "attention_probs_dropout_prob", "attn_pdrop", "attention_dropout", default=0.0
        ),  # fmt: skip
        moe=moe,
        top_k=top_k if moe else 1,
    )


def base_bytes(adapted: Adapted, variant: str, p_w: int, double_quant: bool) -> int:
    """Bytes of the frozen base weights."""
    if variant != "qlora":
        return adapted.base * p_w
    per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    return int(adapted.quantizable * per_weight) + (adapted.base - adapted.quantizable) * 4


def qlora_saves_inputs() -> bool:
    """Whether the installed bitsandbytes keeps each 4-bit linear layer's input for backward:
    releases before 0.43.2 did (its MatMul4Bit saved ``A``; bitsandbytes PR #1270, "fix QLoRA
    mem bug: delete useless buffered activation", removed it). False when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("bitsandbytes").split(".")[:3]
    except PackageNotFoundError:
        return False
    nums = tuple(int("".join(c for c in x if c.isdigit()) or 0) for x in parts)
    return nums < (0, 43, 2)


def activation_bytes(a: Arch, adapted: Adapted, r: int, *, batch: int, seq: int, p: int,
                     device: str, checkpointing: bool, lora_dropout: float, variant: str,
                     task: str, saved_inputs: bool = False) -> int | None:  # fmt: skip
    """Bytes autograd keeps for backward at the end of the forward pass (frozen base); None
    for an architecture without attention (not modelled). ``saved_inputs``: QLoRA with a
    bitsandbytes that keeps every 4-bit layer's input (``qlora_saves_inputs``)."""
    if a.heads is None:
        return None
    t = batch * seq  # tokens
    mask = p if device == "cpu" else 1  # CPU dropout keeps a float mask, CUDA a bool one
    norms = a.norms_per_layer * t * a.hidden * (4 if a.rms_norm else p)
    attn = t * (a.q_dim + 2 * a.kv_dim) * p  # q, k, v kept by the attention kernel
    if device == "cpu" and a.attn_dropout > 0:  # math path: probs, dropout mask, dropped probs
        attn += batch * a.heads * seq * seq * (2 * p + mask)
    else:  # fused kernel: output and log-sum-exp
        attn += t * a.q_dim * p + batch * a.heads * seq * 4
    mlp = (3 if a.gated else 1) * t * a.mlp_width * p  # act input (and gate/up outputs if gated)
    if a.moe:  # router logits and the tokens gathered per expert
        mlp += t * a.hidden * p + t * 64 * 4
    dropout = (2 * t * a.hidden * mask) if a.hidden_dropout > 0 else 0
    per_layer = norms + attn + mlp + dropout
    if variant == "qlora" and saved_inputs:  # the norms' outputs, o_proj's and down_proj's inputs
        per_layer += t * (a.norms_per_layer * a.hidden + a.q_dim + a.mlp_width) * p

    blocks: dict[int | None, int] = {}
    for x in adapted.layers:
        if tower(x.name) == "vision":  # a text-only batch does not run the vision tower
            continue
        # fused experts: each routed token passes one expert's adapter (top-k per token)
        tk = t * (a.top_k if x.experts > 1 else 1)
        # fp32 dropout output saved by lora_A (+ its mask), lora_A output saved by lora_B
        dropped = lora_dropout and not x.parameter
        b = tk * x.d_in * 4 + (tk * x.d_in * (4 if device == "cpu" else 1) if dropped else 0)
        b += tk * x.rank(r) * 4
        if variant == "dora":  # the combined weight (for its norm) and the base output
            b += x.d_in * x.d_out * 4 + tk * x.d_out * 4
        blocks[x.block] = blocks.get(x.block, 0) + b
    adapted_blocks = [k for k in blocks if k is not None]
    first = min(adapted_blocks, default=0)
    # Blocks from the first adapted one on keep activations; earlier ones need no gradient.
    n_layers = a.layers - first if adapted_blocks else 0
    cross = a.decoder_layers * t * (a.q_dim + 2 * a.kv_dim) * p if a.decoder_layers else 0
    full = {k: per_layer + v for k, v in blocks.items() if k is not None}
    plain = n_layers - len(full)
    if checkpointing:
        body = n_layers * t * a.hidden * p + max(full.values(), default=0) + blocks.get(None, 0)
    else:
        body = sum(full.values()) + plain * per_layer + blocks.get(None, 0) + cross
    head = LOSS_COPIES * t * a.vocab * 4 if task != "classification" else 0
    return int(body + head)

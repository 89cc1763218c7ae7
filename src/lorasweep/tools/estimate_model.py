"""What a LoRA adapter adds to a model, counted by peft itself on the meta device.

The model is built from its config alone on the meta device (no weights, no memory) with the
auto class of its kind: causal LM, sequence classification, seq2seq (T5, BART) or
image-text-to-text (LLaVA, Qwen2-VL, Gemma 3); state-space models (Mamba) are causal LMs. It is
then wrapped with the same ``LoraConfig`` a trial builds (``training.peft_setup``), so the
counts are peft's own: mixture-of-experts weights adapted through ``target_parameters`` (and
peft's ``all-linear``, which adds the router and the fused experts), an encoder's pooler,
DoRA's magnitude vectors, a ``rank_pattern``, a classification head trained in full.

Every count is affine in the rank (each adapted weight adds ``rank x (in + out)``, per expert
for fused experts; DoRA's magnitudes do not depend on it; a rank pattern's fixed ranks have
slope 0), so two wraps, at r=1 and r=2, give every rank exactly. The adapted layers' shapes and
ranks feed the activation model (``estimate_memory``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from lorasweep.training.targets import (
    AUTO_CLASSES,
    build_meta_model,
    expert_parameters,
    linear_module_names,
)

TASKS = tuple(AUTO_CLASSES)
_PEFT_TASK = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM",
              "image-text-to-text": "CAUSAL_LM"}  # fmt: skip


def model_task(config: Any) -> str:
    """The kind of model a config builds: ``image-text-to-text`` for a vision-language config,
    ``seq2seq`` for an encoder-decoder, else ``classification`` or ``causal-lm``
    (``models.infer_task``)."""
    from transformers.models.auto import modeling_auto as auto

    from lorasweep.training.models import infer_task

    model_type = getattr(config, "model_type", None)
    if getattr(config, "vision_config", None) is not None and model_type in (
        auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    ):
        return "image-text-to-text"
    if getattr(config, "is_encoder_decoder", False) and model_type in (
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    ):
        return "seq2seq"
    return infer_task(config) or "causal-lm"


@dataclass(frozen=True)
class AdaptedLayer:
    """One weight peft adapts: a linear layer, or one fused experts parameter."""

    name: str
    block: int | None  # index of its repeated block (layer), None outside the blocks
    d_in: int
    d_out: int
    rank1: int  # its LoRA rank when LoraConfig.r = 1
    rank2: int  # ... and when r = 2
    experts: int = 1  # fused experts share one adapter of rank x experts
    parameter: bool = False  # adapted through target_parameters (peft: no dropout there)

    def rank(self, r: int) -> int:
        return self.rank1 + (r - 1) * (self.rank2 - self.rank1)


@dataclass
class Adapted:
    """peft's counts for one model and adapter, at any rank."""

    task: str
    target_modules: list[str] | str | None  # as passed to LoraConfig
    target_parameters: list[str]
    layers: list[AdaptedLayer]
    base: int  # parameters of the model without the adapter
    lora: tuple[int, int]  # LoRA parameters at r=1 and r=2
    trainable: tuple[int, int]
    total: tuple[int, int]
    quantizable: int  # weights bitsandbytes stores in 4 bit (linear layers, not fused experts)
    experts: int = 0  # fused expert weights (3-D parameters), which bitsandbytes leaves as they are
    modules: list[str] = field(default_factory=list)  # what peft adapted, fully qualified
    module_types: list[tuple[str, str]] = field(default_factory=list)  # the base model's

    @staticmethod
    def at(pair: tuple[int, int], r: int) -> int:
        return pair[0] + (r - 1) * (pair[1] - pair[0])

    @property
    def head(self) -> int:
        """Parameters trained in full besides the adapter (a classification head)."""
        return self.trainable[0] - self.lora[0]


def lora_block(targets: Any, variant: str, rank_pattern: dict[str, int] | None,
               dropout: float, r: int) -> dict[str, Any]:  # fmt: skip
    """A trial's adapter block (plan.adapter_config's keys) for peft_setup.build_peft_config."""
    return {"method": "dora" if variant == "dora" else "lora", "r": r, "alpha": 2 * r,
            "dropout": dropout, "bias": "none", "use_rslora": False,
            "target_modules": targets, "rank_pattern": rank_pattern or None}  # fmt: skip


def count(config: Any, task: str, targets: Any, variant: str = "lora",
          rank_pattern: dict[str, int] | None = None, num_labels: int = 2) -> Adapted:  # fmt: skip
    """Wrap the meta model at r=1 and r=2 and read peft's counts and the adapted layers (no
    dropout: it adds no parameters, and peft refuses it on fused expert weights).

    Raises:
        ValueError: one line: transformers cannot build the model, a target matches nothing,
            or peft cannot wrap it.
    """
    wrapped = [_wrap(config, task, targets, variant, rank_pattern, num_labels, r)
               for r in (1, 2)]  # fmt: skip
    (m1, cfg1, base, quant, experts, types), (m2, *_) = wrapped
    l1, l2 = _layers(m1), {x.name: x for x in _layers(m2)}
    layers = [AdaptedLayer(x.name, x.block, x.d_in, x.d_out, x.rank1, l2[x.name].rank1,
                           x.experts, x.parameter) for x in l1]  # fmt: skip
    counts = [_peft_counts(m) for m in (m1, m2)]
    tm = cfg1.target_modules
    return Adapted(
        task=task,
        target_modules=sorted(tm) if isinstance(tm, set) else tm,
        target_parameters=sorted(cfg1.target_parameters or []),
        layers=layers,
        base=base,
        lora=(counts[0][0], counts[1][0]),
        trainable=(counts[0][1], counts[1][1]),
        total=(counts[0][2], counts[1][2]),
        quantizable=quant,
        experts=experts,
        modules=[x.name for x in layers],
        module_types=types,
    )


def _wrap(config: Any, task: str, targets: Any, variant: str, rank_pattern: Any,
          num_labels: int, r: int) -> tuple[Any, Any, int, int, int, list]:  # fmt: skip
    from peft import TaskType, get_peft_model

    from lorasweep.training.models import first_line
    from lorasweep.training.peft_setup import build_peft_config

    try:
        model = build_meta_model(config, task, num_labels)
    except Exception as e:  # noqa: BLE001 - any architecture transformers cannot build
        raise ValueError(
            f"transformers cannot build a {task} model of type "
            f"{getattr(config, 'model_type', '?')!r} from this config: {first_line(e)}"
        ) from e
    base = sum(p.numel() for p in model.parameters())
    types = [(n, type(m).__name__) for n, m in model.named_modules() if n]
    modules = dict(model.named_modules())
    quant = sum(modules[n].weight.numel() for n in quantized_linear(model, task))
    experts = sum(model.get_parameter(n).numel() for n in expert_parameters(model))
    block = lora_block(targets, variant, rank_pattern, 0.0, r)
    try:
        peft_config = build_peft_config(model, block, task, 0)
    except ValueError as e:
        raise ValueError(f"LoRA targets: {first_line(e)}") from e
    peft_config.task_type = TaskType(_PEFT_TASK[task])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = get_peft_model(model, peft_config)
    except Exception as e:  # noqa: BLE001 - peft's refusal, one line
        raise ValueError(
            f"peft cannot wrap {type(model).__name__} with these targets: {first_line(e)}"
        ) from e
    return wrapped, wrapped.peft_config["default"], base, quant, experts, types


def quantized_linear(model: Any, task: str) -> list[str]:
    """The layers transformers' bitsandbytes integration makes 4-bit: nn.Linear / Conv1D only
    (not fused 3-D expert weights), minus the modules a trial keeps in full precision
    (``models.quant_skip_modules``: the head, an encoder's pooler)."""
    from lorasweep.training.models import quant_skip_modules

    skip = quant_skip_modules(task)
    return [n for n in linear_module_names(model)
            if not any(part in skip for part in n.split("."))]  # fmt: skip


def _peft_counts(model: Any) -> tuple[int, int, int]:
    """(LoRA parameters, trainable, total) as peft reports them."""
    trainable, total = model.get_nb_trainable_parameters()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return lora, trainable, total


def _layers(model: Any) -> list[AdaptedLayer]:
    """The adapted weights of a wrapped model (names without peft's prefixes)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.r:
            continue
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        param = getattr(module, "parameter_name", None)
        if param:
            clean = f"{clean}.{param}"
        nums = [int(p) for p in clean.split(".") if p.isdigit()]
        experts = int(getattr(module, "num_experts", 1) or 1)
        out.append(AdaptedLayer(clean, nums[0] if nums else None, int(module.in_features),
                                int(module.out_features), int(module.r["default"]), 0,
                                experts, bool(param)))  # fmt: skip
    return out

"""Which linear layers a LoRA adapter targets: module groups, peft ``target_modules`` and
per-group ``rank_pattern`` / ``alpha_pattern``.

A target is a module-name suffix (``"query"``, ``"attention.output.dense"``), a group name
(``"attention"``, ``"mlp"``, ``"all-linear"``) or ``"default"`` (peft's default per model type).
Everything is resolved against the real module names of a model, usually one built on the meta
device from a config (``build_meta_model``: no weights, milliseconds even for 7B models), and a
target that matches nothing is an error, never a silent no-op.

Groups come from one generic rule over the module path, checked in the tests on BERT, RoBERTa,
Llama, Mistral, Qwen2, Gemma2, Phi-3, GPT-2 and OPT:

- ``attention``: a path component contains ``attn`` or ``attention`` (``self_attn.q_proj``,
  ``attn.c_attn``, BERT's ``attention.self.query`` and ``attention.output.dense``);
- ``mlp``: otherwise a component contains ``mlp``, ``intermediate``, ``ffn``, ``feed_forward``,
  ``moe`` or ``DenseReluDense``, the layer is a known feed-forward leaf (OPT's ``fc1``/``fc2``),
  or it is BERT's ``layer.N.output.dense`` (an ``output`` directly under a layer index);
- ``experts``: the fused mixture-of-experts weights (3-D parameters of a block's ``experts``
  module, transformers 5), adapted through peft's ``target_parameters``; ``mlp`` includes them;
- output layers (``classifier``, ``score``, ``lm_head``, ...) are never targets; ``all-linear``
  alone is passed to peft as its keyword, so it adapts what peft's does (an encoder's pooler,
  and on Mixtral-style mixture-of-experts models the router and the experts).

peft matching semantics (0.21, read from its source): a list ``target_modules`` matches a module
when ``name == t`` or ``name.endswith("." + t)``; a string is ``re.fullmatch``-ed; a
``rank_pattern`` key ``k`` matches when ``re.match(rf"(.*\\.)?({k})$", name)`` and the *first*
matching key wins. So BERT's plain ``"output.dense"`` would also hit ``attention.output.dense``;
every key and suffix produced here is checked to match exactly the intended modules.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

GROUPS = ("attention", "mlp", "experts", "language", "vision", "all-linear")
# Output layers no LoRA target includes (peft's all-linear also skips the output embeddings and
# the sequence-classification head); an encoder's pooler is not among them: peft adapts it.
HEAD_NAMES = frozenset(
    {"classifier", "score", "lm_head", "qa_outputs", "cls", "embed_out", "output_layer"}
)
# peft has no LoRA default for these model types; the same spirit as its q/v defaults.
_EXTRA_DEFAULTS = {"phi3": ["qkv_proj"]}

_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|intermediate|ffn|feed_?forward|moe|densereludense", re.IGNORECASE)
_VISION = re.compile(r"vision|visual|image|vit$|patch_embed", re.IGNORECASE)
_MLP_LEAF = re.compile(r"fc\d|fc_in|fc_out|c_fc|lin[12]|dense_h_to_4h|dense_4h_to_h|w[123]")


@dataclass
class ResolvedTargets:
    """Targets resolved against one model.

    Attributes:
        target_modules: what to pass as peft's ``LoraConfig(target_modules=...)``: a list of
            suffixes when suffixes select exactly ``modules``, otherwise one regex string.
        modules: fully qualified names of the targeted linear layers, in model order.
        requested: the targets as given (group names and suffixes).
        target_parameters: peft ``target_parameters`` (fused mixture-of-experts weights, e.g.
            ``experts.gate_up_proj``), empty for dense models.
    """

    target_modules: list[str] | str
    modules: list[str]
    requested: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.modules) + len(self.target_parameters)

    def peft_kwargs(self) -> dict:
        """``target_modules`` and ``target_parameters`` for ``LoraConfig``."""
        if not self.target_parameters:
            return {"target_modules": self.target_modules}
        return {"target_modules": self.target_modules or [],
                "target_parameters": self.target_parameters}  # fmt: skip


# task -> the transformers auto class that builds its model
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "classification": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "image-text-to-text": "AutoModelForImageTextToText",
}


def build_meta_model(config, task: str, num_labels: int = 2) -> nn.Module:
    """Build a transformers model from ``config`` on the meta device (no weights, no memory).

    Args:
        config: a ``transformers.PretrainedConfig``.
        task: ``"classification"`` (AutoModelForSequenceClassification), ``"causal-lm"``, and
            for the estimator ``"seq2seq"`` or ``"image-text-to-text"`` (see AUTO_CLASSES).
        num_labels: classes of the classification head.
    """
    import transformers

    if task not in AUTO_CLASSES:
        raise ValueError(f"task must be one of {', '.join(AUTO_CLASSES)}, got {task!r}")
    if task == "classification":
        config = copy.deepcopy(config)
        config.num_labels = num_labels
    auto = getattr(transformers, AUTO_CLASSES[task])
    with torch.device("meta"):
        return auto.from_config(config)


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _is_head(name: str) -> bool:
    parts = name.split(".")
    return any(p in HEAD_NAMES or p.startswith("lora_") for p in parts)


def linear_module_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the nn.Linear / Conv1D layers, task heads excluded."""
    return [n for n, m in model.named_modules() if n and _is_linear(m) and not _is_head(n)]


def module_group(name: str) -> str | None:
    """``"attention"``, ``"mlp"`` or None for one linear layer's fully qualified name."""
    parts = name.split(".")
    if any(_ATTN.search(p) for p in parts):
        return "attention"
    if any(_MLP.search(p) for p in parts) or _MLP_LEAF.fullmatch(parts[-1]):
        return "mlp"
    if len(parts) >= 3 and parts[-2] == "output" and parts[-3].isdigit():
        return "mlp"  # BERT/RoBERTa: layer.N.output.dense is the FFN's second projection
    return None


def module_groups(model: nn.Module) -> dict[str, list[str]]:
    """Linear layers by group: ``attention``, ``mlp``, ``all-linear`` and ``other``.

    ``other`` holds layers outside the repeated blocks that fit neither group (OPT-350m's
    ``project_in``/``project_out``); they belong to ``all-linear`` only.

    Raises:
        ValueError: a linear layer inside a numbered block fits neither group (an architecture
            the generic rule does not know): name its targets as suffixes instead.
    """
    names = linear_module_names(model)
    groups: dict[str, list[str]] = {"attention": [], "mlp": [], "all-linear": names, "other": []}
    unknown = []
    for n in names:
        g = module_group(n)
        if g is not None:
            groups[g].append(n)
        elif any(p.isdigit() for p in n.split(".")):
            unknown.append(n)
        else:
            groups["other"].append(n)
    if unknown:
        raise ValueError(
            f"cannot tell attention from mlp for {len(unknown)} linear layers of "
            f"{type(model).__name__} (e.g. {unknown[0]}); name the targets as module suffixes"
        )
    return groups


def suffix_matches(names: Iterable[str], suffix: str) -> list[str]:
    return [n for n in names if n == suffix or n.endswith("." + suffix)]


def tower(name: str) -> str:
    """``vision`` for a layer of a vision-language model's vision tower (its multimodal projector
    included), else ``language``."""
    parts = name.split(".")
    vision = any(_VISION.search(p) or "projector" in p for p in parts)
    return "vision" if vision else "language"


def short_name(name: str) -> str:
    """The part of a module name after its last numeric component (its name inside a block)."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1 :]) if idx else name


def default_targets(model: nn.Module) -> list[str]:
    """peft's default LoRA target suffixes for the model's ``config.model_type``."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    found = MAP.get(model_type) or _EXTRA_DEFAULTS.get(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if not found and text is not None and text is not config:  # a vision-language model
        found = MAP.get(text.model_type) or _EXTRA_DEFAULTS.get(text.model_type)
    if not found:
        raise ValueError(
            f"peft has no default LoRA targets for model type {model_type!r}; "
            f"pass targets (module suffixes or one of {', '.join(GROUPS)})"
        )
    return list(found)


def _split(targets: str | Sequence[str]) -> list[str]:
    items = [targets] if isinstance(targets, str) else list(targets)
    out = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not out:
        raise ValueError("LoRA targets are empty")
    return out


def expert_parameters(model: nn.Module) -> list[str]:
    """Fully qualified names of fused mixture-of-experts weights: the 3-D parameters (experts x
    out x in) transformers 5 keeps in a block's ``experts`` module instead of one linear layer per
    expert. peft adapts them through ``target_parameters``."""
    return [
        f"{mod_name}.{p_name}"
        for mod_name, module in model.named_modules()
        if "expert" in mod_name.rsplit(".", 1)[-1]
        for p_name, param in module.named_parameters(recurse=False)
        if param.dim() == 3
    ]


def _expert_suffixes(names: Sequence[str]) -> list[str]:
    """``experts.gate_up_proj``-style suffixes (peft's target_parameters match name suffixes)."""
    return list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))


def _select(
    model: nn.Module, targets: str | Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """(requested items, selected linear layers in model order, selected expert parameters)."""
    requested = _split(targets)
    linear = linear_module_names(model)
    experts = expert_parameters(model)
    groups: dict[str, list[str]] | None = None
    chosen: set[str] = set()
    params: set[str] = set()
    for t in requested:
        if t in ("attention", "mlp"):
            groups = groups or module_groups(model)
            if t == "mlp":
                params.update(experts)
            if not groups[t] and not (t == "mlp" and experts):
                raise ValueError(
                    f"LoRA target group {t!r} matches no linear layer of {type(model).__name__}"
                )
            chosen.update(groups[t])
        elif t == "experts":
            if not experts:
                raise ValueError(
                    f"LoRA target group 'experts' matches nothing: {type(model).__name__} has "
                    "no fused mixture-of-experts weights"
                )
            params.update(experts)
        elif t == "all-linear":
            chosen.update(linear)
        elif t in ("language", "vision"):
            hits = [n for n in linear if tower(n) == t]
            if not hits or (t == "language" and len(hits) == len(linear)):
                raise ValueError(
                    f"LoRA target group {t!r} needs a vision-language model; "
                    f"{type(model).__name__} has no vision tower"
                )
            chosen.update(hits)
        elif t == "default":
            towers = {tower(n) for n in linear}
            hits = [n for s in default_targets(model) for n in suffix_matches(linear, s)
                    if len(towers) == 1 or tower(n) == "language"]  # fmt: skip
            if not hits:
                raise ValueError(
                    f"peft's default LoRA targets {default_targets(model)} match "
                    f"no linear layer of {type(model).__name__}"
                )
            chosen.update(hits)
        elif hits := suffix_matches(experts, t):
            params.update(hits)
        else:
            hits = suffix_matches(linear, t)
            if not hits:
                available = list(dict.fromkeys(short_name(n) for n in linear))
                more = ", ..." if len(available) > 8 else ""
                raise ValueError(
                    f"LoRA target {t!r} matches no linear layer of {type(model).__name__}; "
                    f"available: {', '.join(available[:8])}{more}, or a group: {', '.join(GROUPS)}"
                )
            chosen.update(hits)
    return requested, [n for n in linear if n in chosen], [n for n in experts if n in params]


def _generalize(parts: Sequence[str]) -> str:
    """Regex for a run of name components: dots escaped, layer indices become ``\\d+``."""
    return r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts)


def _pattern_keys(selected: Sequence[str], all_names: Sequence[str]) -> list[str]:
    """Shortest rank_pattern keys that, under peft's ``re.match(rf"(.*\\.)?({k})$", name)``,
    match every name in ``selected`` and no other module of the model."""
    selected_set = set(selected)
    keys: list[str] = []
    for name in selected:
        if any(re.match(rf"(.*\.)?({k})$", name) for k in keys):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            key = _generalize(parts[-k:])
            rx = re.compile(rf"(.*\.)?({key})$")
            if all(n in selected_set for n in all_names if rx.match(n)):
                keys.append(key)
                break
        else:  # pragma: no cover - the full name always matches only itself
            keys.append(re.escape(name))
    return keys


def _plain_suffix(name: str, all_names: Sequence[str], selected: set[str]) -> str | None:
    """Shortest suffix of ``name`` without a layer index matching only modules in ``selected``."""
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        if parts[-k].isdigit():
            return None
        suffix = ".".join(parts[-k:])
        if set(suffix_matches(all_names, suffix)) <= selected:
            return suffix
    return None


def compact_target_modules(selected: Sequence[str], model: nn.Module) -> list[str] | str:
    """peft ``target_modules`` selecting exactly ``selected``: plain suffixes when some suffix
    without a layer index is unambiguous for every module, else one regex (fullmatch)."""
    all_names = [n for n, _ in model.named_modules() if n]
    selected_set = set(selected)
    suffixes: list[str] = []
    for name in selected:
        if any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        suffix = _plain_suffix(name, all_names, selected_set)
        if suffix is None:
            break
        suffixes.append(suffix)
    else:
        return suffixes
    keys = _pattern_keys(selected, all_names)
    regex = rf"(?:.*\.)?(?:{'|'.join(keys)})"
    assert {n for n in all_names if re.fullmatch(regex, n)} == selected_set
    return regex


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> ResolvedTargets:
    """Resolve targets (suffixes, group names, ``"default"``, or a comma-separated string of
    them) against ``model``.

    Raises:
        ValueError: one line naming a target that matches no linear layer, with available names.
    """
    requested, selected, params = _select(model, targets)
    if requested == ["all-linear"]:
        # peft's own keyword: on the mixture-of-experts models whose transformers 4 layout peft
        # converts (Mixtral, OLMoE) it also adapts the router and the fused experts, which a
        # list would miss
        return ResolvedTargets("all-linear", selected, requested)
    target_modules = compact_target_modules(selected, model) if selected else []
    return ResolvedTargets(target_modules, selected, requested, _expert_suffixes(params))


def partition(model: nn.Module, values: dict[str, float]) -> dict[str, float]:
    """module name -> value. Precedence: all-linear < attention/mlp < explicit suffixes."""

    def order(key: str) -> int:
        return 0 if key == "all-linear" else 1 if key in GROUPS else 2

    out: dict[str, float] = {}
    for key in sorted(values, key=order):
        _, names, params = _select(model, key)
        if params:
            raise ValueError(
                f"rank groups cannot include mixture-of-experts weights yet ({key!r}): "
                "give the experts one rank with the 'experts' target"
            )
        for name in names:
            out[name] = values[key]
    return out


def _patterns(model: nn.Module, per_module: dict[str, float], cast) -> dict[str, float]:
    all_names = [n for n, _ in model.named_modules() if n]
    pattern: dict[str, float] = {}
    for value in dict.fromkeys(per_module.values()):
        selected = [n for n, v in per_module.items() if v == value]
        for key in _pattern_keys(selected, all_names):
            pattern[key] = cast(value)
    return pattern


def rank_pattern_for_groups(
    model: nn.Module,
    groups: dict[str, int],
    alpha_groups: dict[str, float] | None = None,
) -> tuple[list[str] | str, dict[str, int], dict[str, float]]:
    """peft ``target_modules``, ``rank_pattern`` and ``alpha_pattern`` giving each group its rank.

    ``groups`` maps group names or suffixes to ranks, e.g. ``{"attention": 6, "mlp": 10}``;
    ``all-linear`` yields to named groups and those to explicit suffixes. The rank pattern covers
    every targeted layer, so ``LoraConfig.r`` does not matter; its keys match only their own
    layers (BERT's mlp ``output.dense`` becomes ``\\d+\\.output\\.dense``). Layers absent from
    ``alpha_groups`` keep ``LoraConfig.lora_alpha``.
    """
    if not groups:
        raise ValueError("rank groups are empty")
    ranks = partition(model, groups)
    order = [n for n in linear_module_names(model) if n in ranks]
    ranks = {n: ranks[n] for n in order}
    target_modules = compact_target_modules(order, model)
    rank_pattern = _patterns(model, ranks, int)
    alpha_pattern: dict[str, float] = {}
    if alpha_groups:
        alphas = partition(model, alpha_groups)
        stray = [n for n in alphas if n not in ranks]
        if stray:
            raise ValueError(f"alpha given for layers that are not targeted, e.g. {stray[0]}")
        alpha_pattern = _patterns(model, {n: alphas[n] for n in order if n in alphas}, float)
    return target_modules, rank_pattern, alpha_pattern

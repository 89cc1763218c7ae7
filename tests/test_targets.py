"""Module groups and peft target/rank patterns, checked on real peft instantiations."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    RobertaConfig,
)

from lorasweep.training.targets import (
    build_meta_model,
    linear_module_names,
    module_groups,
    rank_pattern_for_groups,
    resolve_targets,
)

_DEC = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=128,
)
_ENC = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128
)

CONFIGS = {
    "bert": lambda: BertConfig(**_ENC),
    "roberta": lambda: RobertaConfig(**_ENC),
    "llama": lambda: LlamaConfig(**_DEC),
    "mistral": lambda: MistralConfig(**_DEC),
    "qwen2": lambda: Qwen2Config(**_DEC),
    "gemma2": lambda: Gemma2Config(**_DEC, head_dim=8),
    "phi3": lambda: Phi3Config(**_DEC, pad_token_id=0),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, bos_token_id=0,
                               eos_token_id=0),
    "opt": lambda: OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             ffn_dim=64, vocab_size=128, word_embed_proj_dim=16),
}  # fmt: skip

# Per architecture: the module names (after the layer index) of each group.
EXPECTED = {
    "bert": (
        {"attention.self.query", "attention.self.key", "attention.self.value",
         "attention.output.dense"},
        {"intermediate.dense", "output.dense"},
    ),
    "llama": (
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
        {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    ),
    "phi3": ({"self_attn.qkv_proj", "self_attn.o_proj"}, {"mlp.gate_up_proj", "mlp.down_proj"}),
    "gpt2": ({"attn.c_attn", "attn.c_proj"}, {"mlp.c_fc", "mlp.c_proj"}),
    "opt": (
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
        {"fc1", "fc2"},
    ),
}  # fmt: skip
EXPECTED["roberta"] = EXPECTED["bert"]
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["gemma2"] = EXPECTED["llama"]

TASK = {"bert": "classification", "roberta": "classification"}


def _short(name: str) -> str:
    parts = name.split(".")
    i = max(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[i + 1 :])


def _real_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[arch]()
    if TASK.get(arch) == "classification":
        cfg.num_labels = 2
        return AutoModelForSequenceClassification.from_config(cfg)
    return AutoModelForCausalLM.from_config(cfg)


def _lora_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Fully qualified base-model name -> rank actually instantiated (lora_A out features)."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            base_name = name.removeprefix("base_model.model.")
            out[base_name] = module.lora_A["default"].weight.shape[0]
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_groups_resolve_to_the_right_modules(arch: str) -> None:
    model = build_meta_model(CONFIGS[arch](), TASK.get(arch, "causal-lm"))
    groups = module_groups(model)
    attn, mlp = EXPECTED[arch]
    assert {_short(n) for n in groups["attention"]} == attn
    assert {_short(n) for n in groups["mlp"]} == mlp
    assert len(groups["attention"]) == 2 * len(attn)
    assert len(groups["mlp"]) == 2 * len(mlp)
    assert set(groups["attention"]).isdisjoint(groups["mlp"])
    for name in linear_module_names(model):  # an encoder's pooler is adapted, as peft does
        assert not any(h in name for h in ("classifier", "score", "lm_head"))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_rank_pattern_gives_each_group_its_rank_in_real_peft(arch: str) -> None:
    model = _real_model(arch)
    groups = module_groups(model)
    target_modules, rank_pattern, alpha_pattern = rank_pattern_for_groups(
        model, {"attention": 6, "mlp": 10}, {"attention": 12.0}
    )
    task_type = "SEQ_CLS" if TASK.get(arch) == "classification" else "CAUSAL_LM"
    config = LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=target_modules,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=task_type,
    )
    peft_model = get_peft_model(model, config)
    ranks = _lora_ranks(peft_model)
    expected = {n: 6 for n in groups["attention"]} | {n: 10 for n in groups["mlp"]}
    assert ranks == expected
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            short = name.removeprefix("base_model.model.")
            want = 12.0 / 6 if short in groups["attention"] else 5 / 10
            assert module.scaling["default"] == pytest.approx(want)


def test_bert_mlp_output_dense_is_not_attention_output_dense() -> None:
    model = _real_model("bert")
    resolved = resolve_targets(model, "mlp")
    assert all("attention" not in n for n in resolved.modules)
    assert len(resolved.modules) == 4
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=resolved.target_modules, task_type="SEQ_CLS")
    )
    assert set(_lora_ranks(peft_model)) == set(resolved.modules)

    # a single rank for all-linear, overridden for attention only
    model = _real_model("bert")
    target_modules, rank_pattern, _ = rank_pattern_for_groups(
        model, {"all-linear": 8, "attention": 2}
    )
    ranks = _lora_ranks(
        get_peft_model(
            model,
            LoraConfig(r=1, target_modules=target_modules, rank_pattern=rank_pattern,
                       task_type="SEQ_CLS"),
        )
    )  # fmt: skip
    for name, r in ranks.items():
        assert r == (2 if ".attention." in name else 8), name
    # 6 linear layers x 2 blocks and the pooler (peft's all-linear adapts it), not the classifier
    assert len(ranks) == 13 and ranks["bert.pooler.dense"] == 8


@pytest.mark.parametrize(
    ("arch", "targets", "n"),
    [
        ("bert", ["query", "value"], 4),
        ("bert", "query,value", 4),
        ("bert", "default", 4),
        ("bert", ["attention", "intermediate.dense"], 10),
        ("bert", "all-linear", 13),  # with the pooler, as peft's all-linear
        ("llama", "default", 4),
        ("gpt2", "default", 2),
        ("opt", "all-linear", 14),  # project_in/out are linear but in neither group
        ("phi3", "default", 2),
    ],
)
def test_resolved_targets_select_exactly_in_peft(arch, targets, n) -> None:
    model = _real_model(arch)
    resolved = resolve_targets(model, targets)
    assert len(resolved) == n
    task_type = "SEQ_CLS" if TASK.get(arch) == "classification" else "CAUSAL_LM"
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=resolved.target_modules, task_type=task_type)
    )
    assert sorted(_lora_ranks(peft_model)) == sorted(resolved.modules)


def test_unknown_target_raises_with_its_name() -> None:
    model = build_meta_model(CONFIGS["llama"](), "causal-lm")
    with pytest.raises(ValueError, match=r"'qproj' matches no linear layer.*q_proj"):
        resolve_targets(model, ["qproj", "v_proj"])
    with pytest.raises(ValueError, match="'nonsense'"):
        rank_pattern_for_groups(model, {"attention": 4, "nonsense": 8})
    with pytest.raises(ValueError, match="empty"):
        resolve_targets(model, [])


def test_unclassifiable_layers_raise_for_groups_only() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = nn.Linear(4, 4)

    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    model = Weird()
    with pytest.raises(ValueError, match="cannot tell attention from mlp.*layers.0.mixer"):
        resolve_targets(model, "attention")
    assert resolve_targets(model, "all-linear").modules == ["layers.0.mixer", "layers.1.mixer"]
    assert resolve_targets(model, "mixer").target_modules == ["mixer"]

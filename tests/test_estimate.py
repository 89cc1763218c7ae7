"""The estimator: exact counts against peft's own on real small models, activation bytes against
what autograd really saves, the shipped configs, speed, and the outputs."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    Phi3Config,
    RobertaConfig,
)

from lorasweep.analysis.tool_plots import plot_estimate
from lorasweep.tools.estimate import SHIPPED, estimate, load_model_config

_DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=128)  # fmt: skip
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=128)  # fmt: skip
CONFIGS = {
    "bert": lambda: BertConfig(**_ENC),
    "roberta": lambda: RobertaConfig(**_ENC),
    "llama": lambda: LlamaConfig(**_DEC, tie_word_embeddings=True),
    "gemma2": lambda: Gemma2Config(**_DEC, head_dim=8),
    "phi3": lambda: Phi3Config(**_DEC, pad_token_id=0),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, bos_token_id=0,
                               eos_token_id=0, pad_token_id=0),
    "opt": lambda: OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             ffn_dim=64, vocab_size=128, word_embed_proj_dim=16),
}  # fmt: skip


def _save(arch: str, tmp_path) -> tuple[str, object]:
    cfg = CONFIGS[arch]()
    cfg.save_pretrained(tmp_path / arch)
    return str(tmp_path / arch), cfg


def _peft_counts(cfg, task: str, target_modules, r: int, variant: str) -> tuple[int, int, int]:
    torch.manual_seed(0)
    if task == "classification":
        cfg.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    config = LoraConfig(
        r=r,
        target_modules=target_modules,
        use_dora=variant == "dora",
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return lora, trainable, total


@pytest.mark.parametrize(
    ("arch", "task", "targets", "variant"),
    [
        ("bert", "classification", "default", "lora"),
        ("bert", "classification", "mlp", "dora"),
        ("roberta", "classification", "all-linear", "lora"),
        ("llama", "causal-lm", "all-linear", "lora"),
        ("llama", "causal-lm", "default", "dora"),
        ("llama", "classification", "attention", "lora"),
        ("gemma2", "causal-lm", "mlp", "lora"),
        ("phi3", "causal-lm", "all-linear", "dora"),
        ("gpt2", "causal-lm", "all-linear", "lora"),
        ("gpt2", "classification", "default", "lora"),
        ("opt", "causal-lm", "all-linear", "lora"),
    ],
)
def test_counts_equal_peft_on_real_models(tmp_path, arch, task, targets, variant) -> None:
    path, cfg = _save(arch, tmp_path)
    result = estimate(path, ranks=[1, 4, 16], targets=targets, variant=variant, task=task)
    for row in result.rows:
        got = (row["lora_params"], row["trainable_params"], row["total_params"])
        assert got == _peft_counts(cfg, task, result.target_modules, row["rank"], variant)
        assert row["trainable_percent"] == pytest.approx(
            100 * row["trainable_params"] / row["total_params"]
        )
        assert row["adapter_bytes_fp32"] == 4 * row["lora_params"]


def _saved_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct tensors autograd saves in one forward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize(("arch", "task"), [("bert", "classification"), ("llama", "causal-lm")])
def test_activation_bytes_match_what_autograd_saves(tmp_path, arch, task) -> None:
    cfg = CONFIGS[arch]()
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 128, 512, 1000
    cfg.save_pretrained(tmp_path / arch)
    b, s = 8, 32
    result = estimate(str(tmp_path / arch), ranks=[8], targets="default", task=task, batch=b,
                      seq=s, dtype="fp32", device="cpu", lora_dropout=0.05)  # fmt: skip
    torch.manual_seed(0)
    if task == "classification":
        cfg.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(cfg)
        labels = torch.zeros(b, dtype=torch.long)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
        labels = torch.randint(0, 1000, (b, s))
    lora = LoraConfig(r=8, lora_dropout=0.05, target_modules=result.target_modules,
                      task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora).train()
    batch = {"input_ids": torch.randint(0, 1000, (b, s)), "labels": labels}
    measured = _saved_activation_bytes(model, batch)
    estimated = result.rows[0]["activation_bytes"]
    if task == "causal-lm":  # the estimate adds the loss's transient gradients (2 x logits)
        estimated -= 2 * b * s * cfg.vocab_size * 4
    assert estimated == pytest.approx(measured, rel=0.15)


# Public parameter counts of the shipped models (their model cards / config.json arithmetic).
PUBLIC_PARAMS = {
    "mistral-7b": 7.24e9,
    "llama-3-8b": 8.03e9,
    "llama-2-7b": 6.74e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "mixtral-8x7b": 46.7e9,
    "qwen2.5-7b": 7.62e9,
    "gemma-2-9b": 9.24e9,
    "phi-3-mini": 3.82e9,
    "opt-350m": 331e6,
    "gpt2": 124e6,
    "smollm2-135m": 134.5e6,
}


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAMS))
def test_shipped_configs_have_their_public_sizes(name) -> None:
    result = estimate(name, ranks=[8], task="causal-lm")
    assert result.base_params == pytest.approx(PUBLIC_PARAMS[name], rel=0.01)
    assert set(PUBLIC_PARAMS) <= set(SHIPPED) | {"bert-base", "roberta-base"}


def test_hub_ids_and_builtins_resolve_offline() -> None:
    assert load_model_config("mistralai/Mistral-7B-v0.1").model_type == "mistral"
    assert load_model_config("builtin:smollm2-135m").num_hidden_layers == 30
    assert load_model_config("builtin:minilm-l6").hidden_size == 384
    for name in ("bert-base", "roberta-base"):
        result = estimate(name, ranks=[8])
        assert result.task == "classification"
        assert result.target_modules == ["query", "value"]
        assert result.rows[0]["lora_params"] == 12 * 2 * 8 * (768 + 768)
    with pytest.raises(ValueError, match="cannot get the config of 'nobody/no-such-model'"):
        load_model_config("nobody/no-such-model")
    with pytest.raises(ValueError, match="variant must be one of"):
        estimate("gpt2", ranks=[8], variant="ia3")
    with pytest.raises(ValueError, match="'qproj' matches no linear layer"):
        estimate("llama-2-7b", ranks=[8], targets="qproj")


def test_seven_ranks_of_a_7b_model_in_under_5_seconds() -> None:
    """The estimator builds the model on the meta device and counts: no weights, nothing per
    rank (about 0.1 s here). Timed after a warm-up on another 7B config, so the one-time imports
    of transformers' model code (about 4 s of a cold first call on 2 cores) are not what is
    measured, and in CPU seconds of this process, so a busy shared machine cannot fail it; a
    real allocation of 7B parameters would take far more than 5 CPU seconds."""
    estimate("llama-2-7b", ranks=[8], targets="all-linear")  # warm-up, not timed
    start = time.process_time()
    result = estimate("mistralai/Mistral-7B-v0.1", ranks=[4, 8, 16, 32, 64, 128, 256],
                      targets="all-linear")  # fmt: skip
    assert time.process_time() - start < 5
    # all-linear on Mistral-7B: r * sum(in + out) over 32 layers x 7 projections
    per_layer = (4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3
    assert [row["lora_params"] for row in result.rows] == [
        r * 32 * per_layer for r in (4, 8, 16, 32, 64, 128, 256)
    ]


def test_memory_parts_behave() -> None:
    kw = dict(ranks=[8, 64], targets="all-linear", batch=2, seq=1024)
    lora = estimate("llama-3-8b", **kw).rows
    qlora = estimate("llama-3-8b", variant="qlora", **kw).rows
    dora = estimate("llama-3-8b", variant="dora", **kw).rows
    ckpt = estimate("llama-3-8b", gradient_checkpointing=True, **kw).rows
    sgd = estimate("llama-3-8b", optimizer="sgd", **kw).rows
    assert lora[0]["base_weights_bytes"] == 2 * 8_030_261_248
    # NF4 linears; embeddings and lm_head upcast to fp32 by prepare_model_for_kbit_training
    assert qlora[0]["base_weights_bytes"] < lora[0]["base_weights_bytes"] / 1.9
    assert dora[0]["activation_bytes"] > lora[0]["activation_bytes"]
    assert ckpt[0]["activation_bytes"] < lora[0]["activation_bytes"] / 3
    assert ckpt[0]["activation_bytes"] == lora[0]["activation_bytes_checkpointing"]
    assert sgd[0]["optimizer_bytes"] == 0
    assert lora[0]["optimizer_bytes"] == 8 * lora[0]["trainable_params"]
    for rows in (lora, qlora, dora, ckpt):
        assert rows[1]["total_bytes"] > rows[0]["total_bytes"]
        assert rows[0]["total_bytes"] == sum(
            v for k, v in rows[0].items()
            if k.endswith("_bytes") and k.split("_")[0] in
            ("base", "lora", "gradient", "optimizer", "activation", "overhead")
            and "checkpointing" not in k
        )  # fmt: skip
    assert lora[0]["fits"]["80 GB"] and not lora[0]["fits"]["24 GB"]


def test_outputs(tmp_path) -> None:
    result = estimate("builtin:minilm-l6", ranks=[2, 32], batch=32, seq=64, dtype="fp32",
                      device="cpu", gpus={"small": 1.0, "big": 8.0})  # fmt: skip
    data = json.loads(json.dumps(result.to_dict()))
    assert [row["rank"] for row in data["rows"]] == [2, 32]
    assert data["rows"][0]["fits"] == {"small": False, "big": True}
    table = result.format_table()
    assert "builtin:minilm-l6" in table and "\n   2 " in table
    out = plot_estimate(result, tmp_path / "mem.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_qlora_base_and_saved_inputs_follow_bitsandbytes(tmp_path) -> None:
    """NF4 for nn.Linear layers only (what transformers' bitsandbytes integration converts), the
    rest fp32; bitsandbytes before 0.43.2 also kept each 4-bit layer's input for backward."""
    path, cfg = _save("llama", tmp_path)
    kw = dict(ranks=[8], targets="all-linear", batch=2, seq=16, variant="qlora")
    old = estimate(path, qlora_saved_inputs=True, **kw).rows[0]
    new = estimate(path, qlora_saved_inputs=False, **kw)
    model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)  # fmt: skip
    base = sum(p.numel() for p in model.parameters())
    assert new.rows[0]["base_weights_bytes"] == int(linear * (0.5 + 4 / 64)) + (base - linear) * 4
    assert new.assumptions["qlora_saved_inputs"] is False
    t, h, layers = 2 * 16, cfg.hidden_size, cfg.num_hidden_layers
    extra = layers * t * (2 * h + cfg.num_attention_heads * (h // 4) + cfg.intermediate_size) * 2
    assert old["activation_bytes"] - new.rows[0]["activation_bytes"] == extra


def test_mixtral_qlora_keeps_its_fused_experts_unquantized() -> None:
    result = estimate("mixtral-8x7b", ranks=[8], targets="attention", variant="qlora")
    experts = 32 * 8 * 3 * 4096 * 14336  # layers x experts x (gate, up, down) x hidden x inter
    assert result.rows[0]["base_weights_bytes"] > 4 * experts
    assert any("45.10B fused expert weights stay unquantized" in n for n in result.notes)
    assert estimate("mixtral-8x7b", ranks=[8], targets="attention").notes == []

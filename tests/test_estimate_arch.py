"""The estimator beyond dense decoders: mixture-of-experts (Mixtral, OLMoE, Qwen2-MoE), encoders'
poolers (BERT, DeBERTa-v2), rank patterns, seq2seq (T5, BART), vision-language models (LLaVA,
Qwen2-VL, Gemma 3) and state-space models (Mamba). The reference is always peft itself on a
real, tiny, randomly initialised CPU model, wrapped with the LoraConfig a user would write; a
model or target that cannot be counted is one ValueError line, from the API and the CLI."""

from __future__ import annotations

import copy
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    CLIPVisionConfig,
    DebertaV2Config,
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    MambaConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen2VLConfig,
    SiglipVisionConfig,
    T5Config,
)

from lorasweep.cli import main
from lorasweep.tools.estimate import estimate

RANKS = [1, 4, 16]
_DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=128)  # fmt: skip
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=128)  # fmt: skip
_TXT = dict(_DEC, num_hidden_layers=1)
_VIS = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8)  # fmt: skip

CONFIGS = {
    "mixtral": lambda: MixtralConfig(**_DEC, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": lambda: OlmoeConfig(**_DEC, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**_DEC, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48),
    "bert": lambda: BertConfig(**_ENC),
    "deberta-v2": lambda: DebertaV2Config(**_ENC, pooler_hidden_size=32),
    "llama": lambda: LlamaConfig(**_DEC),
    "t5": lambda: T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                           num_heads=4, vocab_size=128, decoder_start_token_id=0),
    "bart": lambda: BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128,
                               max_position_embeddings=64),
    "llava": lambda: LlavaConfig(text_config=LlamaConfig(**_TXT),
                                 vision_config=CLIPVisionConfig(**_VIS), image_token_index=127),
    "qwen2_vl": lambda: Qwen2VLConfig(
        text_config=dict(_TXT, model_type="qwen2_vl_text",
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=127, video_token_id=126, vision_start_token_id=125),
    "gemma3": lambda: Gemma3Config(text_config=Gemma3TextConfig(**_TXT, head_dim=8),
                                   vision_config=SiglipVisionConfig(**_VIS), mm_tokens_per_image=4,
                                   image_token_index=127, boi_token_index=126,
                                   eoi_token_index=125),
    "mamba": lambda: MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=128, state_size=4,
                                 expand=2),
}  # fmt: skip

AUTO = {
    "causal-lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
    "image-text-to-text": AutoModelForImageTextToText,
}
TASK_TYPE = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM",
             "image-text-to-text": "CAUSAL_LM"}  # fmt: skip


def _save(arch: str, tmp_path) -> tuple[str, object]:
    cfg = CONFIGS[arch]()
    cfg.save_pretrained(tmp_path / arch)
    return str(tmp_path / arch), cfg


def _real_model(cfg, task: str) -> nn.Module:
    """The model a user would train: real weights on the CPU, from the same config."""
    torch.manual_seed(0)
    if task == "classification":
        cfg = copy.deepcopy(cfg)
        cfg.num_labels = 2
    return AUTO[task].from_config(cfg)


def _peft_counts(cfg, task: str, r: int, **lora: object) -> tuple[int, int, int]:
    """(LoRA params, trainable, total) as peft reports them for LoraConfig(r=r, **lora)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_real_model(cfg, task),
                               LoraConfig(r=r, task_type=TASK_TYPE[task], **lora))  # fmt: skip
    trainable, total = model.get_nb_trainable_parameters()
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return lora_params, trainable, total


def _counts(row: dict) -> tuple[int, int, int]:
    return row["lora_params"], row["trainable_params"], row["total_params"]


def _assert_equals_peft(result, cfg, task: str, **lora: object) -> None:
    assert [row["rank"] for row in result.rows] == RANKS
    for row in result.rows:
        assert _counts(row) == _peft_counts(cfg, task, row["rank"], **lora), row["rank"]
    # plain LoRA: every adapted weight adds r x (in + out), so lora(r) = r x lora(1)
    assert [row["lora_params"] for row in result.rows] == [
        r * result.rows[0]["lora_params"] for r in RANKS
    ]


def _one_line_value_error(path: str, **kwargs: object) -> str:
    """The estimator's refusal: a ValueError (its ModelError subclass included, no other type),
    its message one line."""
    kwargs.setdefault("ranks", [2])
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is what is checked
        estimate(path, **kwargs)
    assert issubclass(info.type, ValueError), f"{info.type.__name__}: {info.value}"
    message = str(info.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# -- mixture of experts --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe"])
def test_mixture_of_experts_counts_equal_peft(tmp_path, arch) -> None:
    path, cfg = _save(arch, tmp_path)
    model = _real_model(cfg, "causal-lm")
    experts = {n: p.shape for n, p in model.named_parameters() if ".experts." in n}
    assert experts and all(len(shape) == 3 for shape in experts.values())

    # peft's own keyword (on mixtral and olmoe peft adds the router and the fused experts as
    # target_parameters; on qwen2_moe, peft 0.21.2 adapts neither: the count still equals peft's)
    result = estimate(path, ranks=RANKS, targets="all-linear")
    assert result.task == "causal-lm"
    _assert_equals_peft(result, cfg, "causal-lm", target_modules="all-linear")
    act = result.rows[0]["activation_bytes"]
    assert isinstance(act, int) and act > 0 and not result.notes

    result = estimate(path, ranks=RANKS, targets="experts")
    assert {"experts.gate_up_proj", "experts.down_proj"} <= set(result.target_parameters)
    assert result.target_modules == []
    assert set(result.adapted_modules) == set(experts)
    assert result.rows[0]["lora_params"] > 0
    _assert_equals_peft(result, cfg, "causal-lm", target_modules=[],
                        target_parameters=result.target_parameters)  # fmt: skip
    # by hand: fused experts (E x out x in) share one adapter of rank r x E
    by_hand = sum(s[0] * (s[1] + s[2]) for s in experts.values())
    assert [row["lora_params"] for row in result.rows] == [r * by_hand for r in RANKS]

    result = estimate(path, ranks=RANKS, targets="mlp")
    assert set(experts) <= set(result.adapted_modules)
    assert not any("attn" in n for n in result.adapted_modules)
    _assert_equals_peft(result, cfg, "causal-lm", target_modules=result.target_modules,
                        target_parameters=result.target_parameters)  # fmt: skip


# -- encoders ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "pooler"), [("bert", "bert.pooler.dense"),
                                              ("deberta-v2", "pooler.dense")])  # fmt: skip
def test_encoder_all_linear_adapts_the_pooler_as_peft_does(tmp_path, arch, pooler) -> None:
    path, cfg = _save(arch, tmp_path)
    assert pooler in _linear_names(_real_model(cfg, "classification"))
    result = estimate(path, ranks=RANKS, targets="all-linear", task="classification")
    assert pooler in result.adapted_modules
    assert not any("classifier" in n for n in result.adapted_modules)
    _assert_equals_peft(result, cfg, "classification", target_modules="all-linear")


# -- rank patterns -------------------------------------------------------------------------------

# target_modules and rank_pattern keys written by hand (peft matches a key k when
# re.match(rf"(.*\.)?({k})$", name), the first matching key winning)
_TARGETS = {
    "bert": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
_PATTERNS = {
    "bert": {"query": 4, "key": 4, "value": 4, r"attention\.output\.dense": 4,
             r"intermediate\.dense": 12, r"\d+\.output\.dense": 12},
    "llama": {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 12,
              "up_proj": 12, "down_proj": 12},
}  # fmt: skip


@pytest.mark.parametrize(("arch", "task"), [("bert", "classification"), ("llama", "causal-lm")])
def test_rank_pattern_equals_peft(tmp_path, arch, task) -> None:
    path, cfg = _save(arch, tmp_path)
    result = estimate(path, ranks=[8], task=task, rank_pattern={"attention": 4, "mlp": 12})
    assert len(result.rows) == 1 and result.rows[0]["rank"] is None
    assert result.rank_pattern == {"attention": 4, "mlp": 12}

    # by hand: r x (in + out) per layer, ranks by where the layer sits in the real model
    by_hand = 0
    for name, module in _real_model(cfg, task).named_modules():
        if not isinstance(module, nn.Linear) or "pooler" in name or "classifier" in name:
            continue
        if name == "lm_head" or name == "score":
            continue
        rank = 4 if "attention" in name or "self_attn" in name else 12
        by_hand += rank * (module.in_features + module.out_features)
    assert result.rows[0]["lora_params"] == by_hand

    keys = _PATTERNS[arch]
    reference = _peft_counts(cfg, task, 8, target_modules=_TARGETS[arch], rank_pattern=keys)
    assert _counts(result.rows[0]) == reference
    assert reference[0] == by_hand  # the hand-written keys hit what the hand count assumes


# a rank pattern names its layers itself: ``targets`` is ignored (olmoe: targets="q_proj" still
# gives all four attention projections), so a model without peft default targets needs none
_NO_DEFAULT = {
    "olmoe": ({"attention": 4}, ["q_proj", "k_proj", "v_proj", "o_proj"],
              {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4}),
    "mamba": ({"x_proj": 4, "dt_proj": 8}, ["x_proj", "dt_proj"], {"x_proj": 4, "dt_proj": 8}),
}  # fmt: skip


def _no_default_reference(tmp_path, arch: str) -> tuple[str, dict, tuple[int, int, int]]:
    path, cfg = _save(arch, tmp_path)
    groups, target_modules, keys = _NO_DEFAULT[arch]
    reference = _peft_counts(cfg, "causal-lm", 8, target_modules=target_modules, rank_pattern=keys)
    return path, groups, reference


@pytest.mark.parametrize("arch", sorted(_NO_DEFAULT))
def test_rank_pattern_needs_no_default_targets(tmp_path, arch) -> None:
    """A rank pattern names its own layers, also on model types peft has no default for; other
    targets beside it are refused rather than silently dropped."""
    path, groups, reference = _no_default_reference(tmp_path, arch)
    result = estimate(path, ranks=[8], rank_pattern=groups)  # targets left at "default"
    assert _counts(result.rows[0]) == reference
    with pytest.raises(ValueError, match="give targets or rank_pattern, not both"):
        estimate(path, ranks=[8], targets="all-linear", rank_pattern=groups)


# -- seq2seq -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_counts_equal_peft(tmp_path, arch) -> None:
    path, cfg = _save(arch, tmp_path)
    result = estimate(path, ranks=RANKS, targets="all-linear")
    assert result.task == "seq2seq"
    _assert_equals_peft(result, cfg, "seq2seq", target_modules="all-linear")
    act = result.rows[0]["activation_bytes"]
    assert isinstance(act, int) and not isinstance(act, bool) and act > 0
    assert all(isinstance(v, bool) for v in result.rows[0]["fits"].values())

    result = estimate(path, ranks=RANKS, targets="default")
    assert result.task == "seq2seq"
    _assert_equals_peft(result, cfg, "seq2seq", target_modules=None)  # peft's own default
    decoder = [n for n in result.adapted_modules if n.startswith(("decoder.", "model.decoder."))]
    assert decoder and len(decoder) < len(result.adapted_modules)  # both halves adapted


# -- vision-language -----------------------------------------------------------------------------

_TOWERS = {  # arch -> (language tower prefixes, vision tower prefixes), by the real module names
    "llava": (("model.language_model.",), ("model.vision_tower.", "model.multi_modal_projector.")),
    "qwen2_vl": (("model.language_model.",), ("model.visual.",)),
    "gemma3": (("model.language_model.",), ("model.vision_tower.", "model.multi_modal_projector.")),
}


@pytest.mark.parametrize("arch", sorted(_TOWERS))
def test_vision_language_towers_equal_peft(tmp_path, arch) -> None:
    path, cfg = _save(arch, tmp_path)
    task = "image-text-to-text"
    language, vision = _TOWERS[arch]
    linear = _linear_names(_real_model(cfg, task))
    lang_layers = {n for n in linear if n.startswith(language)}
    vis_layers = {n for n in linear if n.startswith(vision)}
    assert lang_layers and vis_layers

    result = estimate(path, ranks=RANKS, targets="all-linear")
    assert result.task == task
    assert result.rows[0]["activation_bytes"] > 0
    assert any("image tokens" in note for note in result.notes)
    assert set(result.adapted_modules) == lang_layers | vis_layers
    _assert_equals_peft(result, cfg, task, target_modules="all-linear")

    for group, expected in (("language", lang_layers), ("vision", vis_layers)):
        result = estimate(path, ranks=RANKS, targets=group)
        assert set(result.adapted_modules) == expected, group
        _assert_equals_peft(result, cfg, task, target_modules=result.target_modules)

    if arch == "qwen2_vl":  # peft has no default for qwen2_vl (nor for its text model type)
        message = _one_line_value_error(path, targets="default")
        assert "default" in message and "qwen2_vl" in message
        with pytest.raises(ValueError):  # noqa: PT011 - peft refuses too
            _peft_counts(cfg, task, 4, target_modules=None)
        return
    result = estimate(path, ranks=RANKS, targets="default")
    assert set(result.adapted_modules) == {
        n for n in lang_layers if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")
    }
    _assert_equals_peft(result, cfg, task, target_modules=result.target_modules)


# -- state-space ---------------------------------------------------------------------------------


def test_mamba_counts_equal_peft_and_activations_are_unknown(tmp_path) -> None:
    path, cfg = _save("mamba", tmp_path)
    result = estimate(path, ranks=RANKS, targets="in_proj,x_proj,dt_proj")
    assert result.task == "causal-lm"
    _assert_equals_peft(result, cfg, "causal-lm", target_modules=["in_proj", "x_proj", "dt_proj"])
    assert result.rows[0]["activation_bytes"] is None
    assert all(v is None for row in result.rows for v in row["fits"].values())
    assert any("not modelled" in note for note in result.notes)
    assert "unknown" in result.format_table()

    # peft has no default for mamba, and refuses its all-linear (out_proj is incompatible)
    assert "no default LoRA targets" in _one_line_value_error(path, targets="default")
    assert "peft cannot wrap" in _one_line_value_error(path, targets="all-linear")
    with pytest.raises(ValueError):  # noqa: PT011 - peft on the real model refuses the same
        _peft_counts(cfg, "causal-lm", 4, target_modules="all-linear")


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("mixtral", dict(variant="dora", targets="experts"), "peft cannot wrap"),
        ("mixtral", dict(variant="dora", targets="all-linear"), "peft cannot wrap"),
        ("mixtral", dict(rank_pattern={"experts": 4}), "mixture-of-experts"),
        ("mixtral", dict(task="seq2seq"), "transformers cannot build a seq2seq model"),
        ("mixtral", dict(targets="vision"), "needs a vision-language model"),
        ("llama", dict(targets="experts"), "no fused mixture-of-experts"),
        ("bert", dict(task="image-text-to-text"), "transformers cannot build"),
        ("t5", dict(targets="language"), "needs a vision-language model"),
    ],
)
def test_refusals_are_one_line_value_errors(tmp_path, arch, kwargs, match) -> None:
    path, _ = _save(arch, tmp_path)
    assert match in _one_line_value_error(path, **kwargs)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model_type": "llama", **_DEC, "hidden_act": "no-such-activation"},
         "transformers cannot build a causal-lm model of type 'llama'"),
        ({"model_type": "mixtral", **_DEC, "intermediate_size": -5},
         "transformers cannot build a causal-lm model of type 'mixtral'"),
        ({"model_type": "no-such-model"}, "cannot get the config"),
    ],
)  # fmt: skip
def test_configs_transformers_cannot_build_are_one_line(tmp_path, config, match) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert match in _one_line_value_error(str(tmp_path / "m"))


# -- command line --------------------------------------------------------------------------------


def test_cli_estimate_json_on_mixture_of_experts(tmp_path, capsys) -> None:
    path, _ = _save("mixtral", tmp_path)
    code = main(["estimate", path, "--targets", "experts", "--ranks", "4,8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in data["adapted_modules"]
    assert {"peft", "transformers", "torch"} <= set(data["versions"])
    assert data["assumptions"] and data["margin"] == pytest.approx(0.10)
    assert [row["rank"] for row in data["rows"]] == [4, 8]


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("--gpus", "24,x", "--gpus: 'x'"),
        ("--margin", "150%", "--margin:"),
        ("--dropout", "1", "--dropout:"),
        ("--rank-pattern", "attention=0", "--rank-pattern: 'attention=0'"),
        ("--batch", "-4", "--batch: must be a positive integer, got -4"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(tmp_path, capsys, option, value, match) -> None:
    path, _ = _save("mixtral", tmp_path)
    code = main(["estimate", path, "--ranks", "4", option, value])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorasweep: error: "), err
    assert match in lines[0]
    assert "Traceback" not in err


def test_preflight_refuses_dropout_on_fused_experts(tmp_path) -> None:
    """peft adapts fused expert weights only without dropout: a sweep says so before training,
    also for the default dropout and for peft's all-linear, which reaches them on Mixtral."""
    from lorasweep.run import preflight
    from lorasweep.spec import SweepSpec

    path, _ = _save("mixtral", tmp_path)
    spec = {"name": "moe", "task": "causal-lm", "model": path,
            "dataset": {"source": str(tmp_path / "d.jsonl"), "max_length": 16},
            "lora": {"target_modules": "experts"}, "grid": {"rank": [2]},
            "seeds": [0]}  # fmt: skip
    line = ("lora.dropout: peft adapts fused expert weights (down_proj, gate_up_proj) only "
            "without dropout: set dropout: 0 (got 0.05)")  # fmt: skip
    assert line in preflight.check_model(SweepSpec.model_validate(spec))
    spec["lora"]["target_modules"] = "all-linear"
    errors = preflight.check_model(SweepSpec.model_validate(spec))
    assert any("fused expert weights" in e and "gate.weight" not in e for e in errors) or any(
        "fused expert weights" in e for e in errors
    )
    spec["lora"]["dropout"] = 0.0  # (a config folder alone: the weights/tokenizer lines remain)
    errors = preflight.check_model(SweepSpec.model_validate(spec))
    assert not any("fused expert" in e for e in errors)
    spec["lora"] = {"target_modules": "attention"}  # no expert reached: the default is fine
    errors = preflight.check_model(SweepSpec.model_validate(spec))
    assert not any("fused expert" in e for e in errors)


@pytest.mark.parametrize("arch", ["llava", "gemma3"])
def test_vision_language_activations_are_the_language_towers(tmp_path, arch) -> None:
    """A text-only batch does not run the vision tower: its adapters add no activations, and
    the norms per layer are the language model's (RMSNorm), not the vision encoder's."""
    path, _ = _save(arch, tmp_path)
    kw = dict(ranks=[4], batch=2, seq=16, lora_dropout=0.0)
    both = estimate(path, targets="all-linear", **kw).rows[0]["activation_bytes"]
    language = estimate(path, targets="language", **kw).rows[0]["activation_bytes"]
    assert both == language > 0

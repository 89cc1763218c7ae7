"""Adapter variants end to end on a tiny BERT: LoRA alpha policies, rsLoRA, DoRA, AdaLoRA, rank
patterns, 4-bit QLoRA and bf16, each trained for a few steps with ``train_trial``.

Every trial must finish, store the exact trainable parameter count (worked out here by hand from
the layer shapes), record the scale its alpha policy implies, and save an adapter that peft
reloads into the same model: the reloaded model's eval loss and accuracy equal the stored ones.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from lorasweep.plan import adalora_schedule, plan
from lorasweep.run.preflight import check_spec
from lorasweep.spec import SpecError, parse_spec
from lorasweep.training import models
from lorasweep.training.trial import train_trial

H, FFN, LAYERS, LABELS = 64, 128, 2, 2  # hidden 64: bitsandbytes' CPU 4-bit packs 64-wide blocks
HEAD = H * LABELS + LABELS  # the classifier head peft trains in full (modules_to_save)
QV = 2 * LAYERS  # query and value in each layer
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> dict:
    """A 2-layer BERT with a WordPiece tokenizer built from the data's own words."""
    import pandas as pd
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = tmp_path_factory.mktemp("variant-bert")
    words = pd.read_csv(tiny_csv)["text"].str.lower().str.findall(r"\w+|[^\w\s]").explode()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (out / "vocab.txt").write_text("\n".join(special + sorted(set(words))[:600]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=H, num_hidden_layers=LAYERS,
                     num_attention_heads=2, intermediate_size=FFN, max_position_embeddings=64,
                     num_labels=LABELS)  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return {"model": str(out), "csv": str(tiny_csv)}


def spec_of(tiny: dict, variants: dict, steps: int = 6, **lora: object) -> dict:
    return {
        "name": "variants",
        "task": "classification",
        "model": tiny["model"],
        "dataset": {"source": tiny["csv"], "max_length": 32, "max_eval_examples": 16},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_steps": steps},
        "lora": {"target_modules": ["query", "value"], "dropout": 0.0, **lora},
        "grid": {"rank": [4]},
        "variants": variants,
    }


def run_one(tiny: dict, tmp_path: Path, variant: dict, steps: int = 6, **lora: object):
    spec = parse_spec(spec_of(tiny, {"v": variant}, steps, **lora))
    check_spec(spec, device="cpu")
    (trial,) = plan(spec)
    torch.set_num_threads(1)
    result = train_trial(trial, tmp_path / trial.id, context={"threads": 1})
    assert result.status == "complete", result.error
    return trial, result


def reload_matches(tiny: dict, trial, result) -> None:
    """peft reloads the saved adapter; eval loss and accuracy equal the trained model's."""
    from peft import PeftModel
    from transformers import DataCollatorWithPadding

    from lorasweep.training import data
    from lorasweep.training.evaluate import classification_metrics as _classification_metrics

    ad = trial.config["adapter"]
    tok = models.load_tokenizer(tiny["model"])
    _, eval_ds, _ = data.prepare(
        trial.config["dataset"], "classification", tiny["model"], tok, None
    )
    batch = DataCollatorWithPadding(tok)([eval_ds[i] for i in range(len(eval_ds))])
    labels = batch.pop("labels")
    base = models.load_model(tiny["model"], "classification", quantization=ad["quantization"])
    model = PeftModel.from_pretrained(base, result.artifacts["adapter_dir"]).eval()
    bf16 = ad["precision"] == "bf16"  # the Trainer evaluates under the same autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(**batch).logits.float()
    again = _classification_metrics(logits.numpy(), labels.numpy())
    assert again["accuracy"] == result.metrics["accuracy"]
    assert math.isclose(again["eval_loss"], result.metrics["eval_loss"], rel_tol=1e-5)


def lora_params(r: int, modules: int, fan_in: int = H, fan_out: int = H) -> int:
    return modules * r * (fan_in + fan_out)  # A: r x in, B: out x r


# ------------------------------------------------------------------------------------------
# LoRA: alpha policies, rsLoRA, DoRA


@pytest.mark.parametrize(
    ("alpha", "scale"),
    [(16, 16 / 4), ("rank", 1.0), ("2*rank", 2.0), ("rslora", 16 / math.sqrt(4))],
)
def test_lora_alpha_policies(tiny, tmp_path, alpha, scale):
    trial, result = run_one(tiny, tmp_path, {"alpha": alpha})
    assert result.metrics["trainable_params"] == lora_params(4, QV) + HEAD
    assert math.isclose(result.metrics["lora_scale"], scale, rel_tol=1e-6)
    assert math.isclose(trial.config["adapter"]["scale"], scale, rel_tol=1e-9)
    reload_matches(tiny, trial, result)


def test_dora(tiny, tmp_path):
    trial, result = run_one(tiny, tmp_path, {"method": "dora", "alpha": "2*rank"})
    magnitude = QV * H  # DoRA adds one magnitude per output feature of each module
    assert result.metrics["trainable_params"] == lora_params(4, QV) + magnitude + HEAD
    assert result.metrics["lora_scale"] == 2.0
    reload_matches(tiny, trial, result)


# ------------------------------------------------------------------------------------------
# per-group ranks


def test_rank_pattern_attention_and_mlp(tiny, tmp_path):
    trial, result = run_one(tiny, tmp_path, {"rank_pattern": {"attention": 6, "mlp": 10},
                                             "alpha": "2*rank"})  # fmt: skip
    attention = lora_params(6, 4 * LAYERS)  # query, key, value, attention.output.dense
    mlp = LAYERS * (10 * (H + FFN) + 10 * (FFN + H))  # intermediate.dense, output.dense
    assert result.metrics["trainable_params"] == attention + mlp + HEAD
    assert result.metrics["lora_scale"] == 2.0  # alpha follows each group's rank
    assert set(result.artifacts["lora_scales"]) == {
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense",
    }  # fmt: skip
    reload_matches(tiny, trial, result)


def test_rank_pattern_with_fixed_alpha_records_each_scale(tiny, tmp_path):
    trial, result = run_one(tiny, tmp_path, {"rank_pattern": {"attention": 4, "mlp": 8},
                                             "alpha": 16})  # fmt: skip
    scales = result.artifacts["lora_scales"]
    assert scales["attention.self.query"] == 16 / 4 and scales["intermediate.dense"] == 16 / 8
    assert "lora_scale" not in result.metrics  # no single scale to report
    assert trial.config["adapter"]["scale_pattern"] == {"attention": 4.0, "mlp": 2.0}


# ------------------------------------------------------------------------------------------
# AdaLoRA


def check_adalora(tiny, trial, result, init_r: int, target_r: int) -> None:
    ranks = result.artifacts["adalora_final_ranks"]
    assert len(ranks) == QV
    assert sum(ranks.values()) == target_r * QV  # the final budget, exactly
    assert set(ranks.values()) != {init_r}  # ranks were really pruned
    allocated = sum(k * (H + H + 1) for k in ranks.values())  # A, B and the singular values E
    assert result.metrics["trainable_params"] == allocated + HEAD
    assert result.metrics["initial_trainable_params"] == QV * init_r * (2 * H + 1) + HEAD
    assert math.isclose(result.metrics["lora_scale"], 2.0)  # 2*init_r / init_r
    # the saved adapter holds only the kept singular vectors
    from safetensors.torch import load_file

    saved = load_file(Path(result.artifacts["adapter_dir"]) / "adapter_model.safetensors")
    kept = {k: v.shape[0] for k, v in saved.items() if k.endswith("lora_E")}
    assert sorted(kept.values()) == sorted(ranks.values())
    reload_matches(tiny, trial, result)


def test_adalora(tiny, tmp_path):
    trial, result = run_one(tiny, tmp_path, {"method": "adalora", "init_r": 6, "target_r": 2,
                                             "alpha": "2*rank"}, steps=10)  # fmt: skip
    check_adalora(tiny, trial, result, 6, 2)


def test_adalora_bf16_mixed_precision_on_cpu(tiny, tmp_path):
    variant = {"method": "adalora", "init_r": 6, "target_r": 2, "alpha": "2*rank",
               "precision": "bf16"}  # fmt: skip
    trial, result = run_one(tiny, tmp_path, variant, steps=10)
    assert math.isfinite(result.metrics["train_loss"])
    check_adalora(tiny, trial, result, 6, 2)


@pytest.mark.parametrize("steps", [2, 3, 5, 10, 37, 1000])
def test_adalora_schedule_is_valid_for_short_and_long_runs(steps):
    from peft import AdaLoraConfig

    tinit, tfinal, delta = adalora_schedule(steps, None, None, None)
    assert tfinal >= 1 and 0 <= tinit < steps - tfinal and delta >= 1
    AdaLoraConfig(init_r=4, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta,
                  total_step=steps, target_modules=["query"])  # fmt: skip


# ------------------------------------------------------------------------------------------
# 4-bit QLoRA


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_qlora_4bit(tiny, tmp_path):
    trial, result = run_one(tiny, tmp_path, {"quantization": "4bit", "alpha": "2*rank"})
    assert result.metrics["trainable_params"] == lora_params(4, QV) + HEAD
    assert result.metrics["lora_scale"] == 2.0
    reload_matches(tiny, trial, result)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_qlora_4bit_adalora(tiny, tmp_path):
    trial, result = run_one(tiny, tmp_path, {"method": "adalora", "init_r": 6, "target_r": 2,
                                             "alpha": "2*rank", "quantization": "4bit"},
                            steps=10)  # fmt: skip
    check_adalora(tiny, trial, result, 6, 2)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_4bit_keeps_the_head_out_of_quantization(tiny):
    import bitsandbytes as bnb

    model = models.load_model(tiny["model"], "classification", quantization="4bit")
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # q, k, v, attention out, intermediate, output; the pooler and classifier stay full precision
    assert len(quantized) == LAYERS * 6
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in quantized)


# ------------------------------------------------------------------------------------------
# validation: one clear line each, before anything loads


def errors_of(data: dict, check: bool = False) -> list[str]:
    with pytest.raises(SpecError) as exc:
        spec = parse_spec(data)
        if check:
            check_spec(spec, device="cpu")
    return exc.value.errors


def test_init_r_below_target_r(tiny):
    (err,) = errors_of(spec_of(tiny, {"a": {"method": "adalora", "init_r": 4, "target_r": 8}}))
    assert err.startswith("variants.a.target_r:") and "init_r=4, target_r=8" in err


@pytest.mark.parametrize(
    ("variant", "start", "words"),
    [({"target_r": 4}, "variants.v.target_r:", "AdaLoRA key but method is 'lora'"),
     ({"method": "dora", "tinit": 3}, "variants.v.tinit:", "AdaLoRA key but method is 'dora'"),
     ({"method": "adalora", "rank": 8}, "variants.v.rank:", "cannot be used with method adalora"),
     ({"method": "adalora", "rank_pattern": {"mlp": 4}}, "variants.v.rank_pattern:", "adalora"),
     ({"method": "adalora", "alpha": "rslora"}, "variants.v.alpha:", "rslora"),
     ({"compute_dtype": "bfloat16"}, "variants.v.compute_dtype:", "quantization: 4bit"),
     ({"rank_pattern": {"mlp": 4}, "target_modules": ["query"]}, "variants.v.target_modules:",
      "drop target_modules")],
)  # fmt: skip
def test_a_key_the_method_does_not_know(tiny, variant, start, words):
    (err,) = errors_of(spec_of(tiny, {"v": variant}))
    assert err.startswith(start) and words in err


def test_an_inherited_key_names_where_it_came_from(tiny):
    data = spec_of(tiny, {"ada": {"method": "adalora"}}, rank=8)
    (err,) = errors_of(data)
    assert err.startswith("variants.ada.rank (from lora):")


def test_adalora_run_too_short(tiny):
    (err,) = errors_of(spec_of(tiny, {"a": {"method": "adalora"}}, steps=1))
    assert err == "variants.a: AdaLoRA needs at least 2 training steps, got 1"
    (err,) = errors_of(spec_of(tiny, {"a": {"method": "adalora", "tinit": 5, "tfinal": 5}}))
    assert "tinit + tfinal < the number of training steps" in err


def test_4bit_without_bitsandbytes(tiny, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "bitsandbytes" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    (err,) = errors_of(spec_of(tiny, {"q": {"quantization": "4bit"}}), check=True)
    assert err.startswith("variants.q.quantization: 4bit needs bitsandbytes")
    with pytest.raises(models.ModelError, match="needs bitsandbytes"):
        models.load_model(tiny["model"], "classification", quantization="4bit")


def test_rank_pattern_group_that_matches_nothing(tiny):
    data = spec_of(tiny, {"j": {"rank_pattern": {"attention": 6, "q_proj": 10}}})
    (err,) = errors_of(data, check=True)
    assert err.startswith("variants.j.rank_pattern:") and "'q_proj' matches no linear layer" in err


def test_fp16_refused_on_cpu(tiny):
    (err,) = errors_of(spec_of(tiny, {"h": {"precision": "fp16"}}), check=True)
    assert err == "variants.h.precision: fp16 needs a CUDA GPU; this machine has cpu"


def test_bert_study_example_plans_the_six_configurations():
    spec = parse_spec(Path(__file__).parents[1] / "examples" / "bert-study.yaml")
    rows = [(t.variant, t.rank, t.config["adapter"]["method"]) for t in plan(spec)]
    assert rows == [("B-FP", 8, "lora"), ("B-Q4", 8, "lora"), ("B-Ada", 8, "adalora"),
                    ("Joint-1", 8, "adalora"), ("Joint-2", 8, "adalora"),
                    ("Joint-3", None, "lora")]  # fmt: skip
    assert {t.config["adapter"]["scale"] for t in plan(spec)} == {2.0}

"""Per-example eval outcomes: the compact format, the per-example NLL sums, and what a real tiny
trial stores (outcomes, majority_rate, the trials_frame columns)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from conftest import tiny_classification_spec

from lorasweep.records import Trial, TrialResult, TrialStatus, decode_outcomes, encode_outcomes
from lorasweep.store import open_store


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 500])
def test_correct_round_trip_is_exact_and_compact(n):
    correct = np.random.default_rng(n).random(n) < 0.6
    d = json.loads(json.dumps(encode_outcomes("correct", correct=correct)))
    assert set(d) == {"kind", "n", "correct"} and d["kind"] == "correct" and d["n"] == n
    back = decode_outcomes(d)
    assert set(back) == {"correct"} and back["correct"].dtype == bool
    assert np.array_equal(back["correct"], correct)
    if n == 500:
        assert len(d["correct"]) < 100  # 63 packed bytes, 84 base64 characters


def test_nll_round_trip_is_exact():
    rng = np.random.default_rng(0)
    nll = (rng.random(37) * 50).astype(np.float32)
    tokens = rng.integers(0, 300, 37)
    d = json.loads(json.dumps(encode_outcomes("nll", nll=nll, tokens=tokens)))
    assert set(d) == {"kind", "n", "nll", "tokens"} and d["n"] == 37
    back = decode_outcomes(d)
    assert back["nll"].dtype == np.float64 and back["tokens"].dtype == np.int64
    assert np.array_equal(back["nll"], nll) and np.array_equal(back["tokens"], tokens)
    # explicit little-endian float32 / int32, whatever the machine
    assert np.frombuffer(base64.b64decode(d["tokens"]), "<i4")[0] == tokens[0]


GOOD = encode_outcomes("correct", correct=np.ones(10, bool))
GOOD_NLL = encode_outcomes("nll", nll=np.ones(3), tokens=np.ones(3, int))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({**GOOD, "kind": "accuracy"}, "unknown kind 'accuracy'"),
        ({k: v for k, v in GOOD.items() if k != "kind"}, "unknown kind None"),
        ({**GOOD, "n": 17}, "holds 2 bytes, n=17 needs 3"),
        ({**GOOD, "n": -1}, "n must be an integer"),
        ({**GOOD, "n": True}, "n must be an integer"),
        ({**GOOD, "n": "10"}, "n must be an integer"),
        ({**GOOD, "correct": "not base64!"}, "'correct' is not valid base64"),
        ({**GOOD, "correct": "//8"}, "'correct' is not valid base64"),
        ({**GOOD, "correct": None}, "'correct' must be base64 text"),
        ({**GOOD_NLL, "n": 4}, "'nll' holds 12 bytes, n=4 needs 16"),
        ({k: v for k, v in GOOD_NLL.items() if k != "tokens"}, "'tokens' must be base64 text"),
        ({**GOOD_NLL, "tokens": GOOD["correct"]}, "'tokens' holds 2 bytes"),
        ("correct", "expected a dict"),
    ],
)
def test_malformed_outcomes_raise_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as e:
        decode_outcomes(bad)
    assert "\n" not in str(e.value)


def test_encode_refuses_unknown_kinds_and_unequal_lengths():
    with pytest.raises(ValueError, match="unknown kind 'acc'"):
        encode_outcomes("acc", correct=[True])
    with pytest.raises(ValueError, match="takes"):
        encode_outcomes("nll", nll=[1.0])
    with pytest.raises(ValueError, match="one length"):
        encode_outcomes("nll", nll=[1.0, 2.0], tokens=[1])
    with pytest.raises(ValueError, match="1-D"):
        encode_outcomes("correct", correct=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="token counts"):
        encode_outcomes("nll", nll=[1.0], tokens=[-1])


def test_classification_outcomes_and_majority_rate():
    from lorasweep.training.evaluate import classification_metrics, classification_outcomes

    rng = np.random.default_rng(1)
    labels = np.array([0, 2, 2, 1, 2, 0, 2, 1])
    logits = rng.normal(size=(8, 3)).astype(np.float32)
    m = classification_metrics(logits, labels)
    assert set(m) == {"accuracy", "f1", "eval_loss", "majority_rate"}
    assert m["majority_rate"] == 4 / 8
    correct = classification_outcomes(logits, labels)["correct"]
    assert correct.dtype == bool and len(correct) == 8
    assert float(np.mean(correct)) == m["accuracy"]


def test_causal_per_example_nll_sums_to_the_totals(tiny_llama_dir, tmp_path):
    """Per-example sums over a padded, partly masked eval set equal the whole-set totals (and
    each example scored alone); perplexity is what the total-only computation gives."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from lorasweep.training.evaluate import (
        causal_eval,
        causal_eval_outcomes,
        causal_lm_metrics,
        token_nll_sum,
    )
    from lorasweep.training.formats import CausalCollator, FormatSpec, tokenize_causal

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    words = "the king is dead long live the queen and all her court".split()
    rows = {
        "prompt": [" ".join(words[: 1 + i % 5]) for i in range(7)],
        "completion": [" ".join(words[i % 4 : i % 4 + 2 + i]) for i in range(7)],
    }
    ds, _ = tokenize_causal(Dataset.from_dict(rows), tok, FormatSpec("prompt-completion"), 24)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, use_cpu=True, report_to="none"
    )
    trainer = Trainer(model=model, args=args, data_collator=CausalCollator(tok))
    metrics, out = causal_eval_outcomes(trainer, ds)
    assert len(out["nll"]) == len(out["tokens"]) == len(ds) == 7
    assert int(out["tokens"].sum()) == metrics["eval_tokens"]
    total = metrics["eval_loss"] * metrics["eval_tokens"]
    assert out["nll"].sum() == pytest.approx(total, rel=1e-6)
    # the total-only computation (per batch, as before per-example outcomes existed)
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(ds):
            labels = batch.pop("labels")
            s, k = token_nll_sum(model(**batch).logits, labels)
            nll, n = nll + s, n + k
    before = causal_lm_metrics(nll, n)
    assert metrics["eval_tokens"] == before["eval_tokens"]
    # float32 sums in another order: equal to ~1e-7 of the mean NLL
    assert metrics["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(before["perplexity"], rel=1e-5)
    assert causal_eval(trainer, ds)["perplexity"] == pytest.approx(metrics["perplexity"], 1e-9)
    collate = CausalCollator(tok)  # and each example alone, unpadded
    with torch.no_grad():
        for i in range(len(ds)):
            one = collate([ds[i]])
            labels = one.pop("labels")
            s, k = token_nll_sum(model(**one).logits, labels)
            assert out["tokens"][i] == k
            assert out["nll"][i] == pytest.approx(s, rel=1e-4, abs=1e-4)
    back = decode_outcomes(encode_outcomes("nll", **out))
    assert back["nll"].sum() == pytest.approx(total, rel=1e-5)


def test_tiny_classification_trial_stores_outcomes(tiny_bert_dir, tiny_csv, tmp_path):
    from lorasweep.run.sweep import run_sweep
    from lorasweep.training import data, models

    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, grid={"rank": [2]}, seeds=[0])
    out = run_sweep(spec, tmp_path / "run", backend="inprocess", quiet=True, report=False)
    assert out.statuses == {"complete": 1}
    with open_store(tmp_path / "run") as store:
        df = store.trials_frame()
        (t,) = store.trials()
        curve = store.curves_of(t["id"])["train_loss"]
    row = df.iloc[0]
    assert row["eval_outcomes"] == t["artifacts"]["eval_outcomes"]
    correct = decode_outcomes(row["eval_outcomes"])["correct"]
    assert float(np.mean(correct)) == row["accuracy"]  # exactly
    tokenizer = models.load_tokenizer(str(tiny_bert_dir))
    trial_dataset = t["config"]["dataset"]
    _, eval_ds, _ = data.prepare(
        trial_dataset, "classification", str(tiny_bert_dir), tokenizer, None
    )
    assert row["eval_outcomes"]["n"] == len(correct) == len(eval_ds) > 0
    labels = np.array(eval_ds["labels" if "labels" in eval_ds.column_names else "label"])
    assert row["majority_rate"] == np.unique(labels, return_counts=True)[1].max() / len(labels)
    assert row["train_loss_start"] == curve[0][1] and row["train_loss_end"] == curve[-1][1]
    assert "eval_majority_rate" not in store_curves(tmp_path / "run")


def store_curves(run) -> set[str]:
    with open_store(run) as store:
        return set(store.curves_frame()["curve"])


def test_tiny_causal_trial_stores_nll_outcomes(tiny_llama_dir, tiny_text, tmp_path):
    from lorasweep.run.sweep import run_sweep

    spec = {
        "name": "clm",
        "task": "causal-lm",
        "model": str(tiny_llama_dir),
        "dataset": {"source": str(tiny_text), "max_length": 64},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "max_steps": 2},
        "lora": {"target_modules": "attention", "alpha": "rank", "dropout": 0.0},
        "grid": {"rank": [2]},
        "seeds": [0],
    }
    out = run_sweep(spec, tmp_path / "run", backend="inprocess", quiet=True, report=False)
    assert out.statuses == {"complete": 1}, out
    with open_store(tmp_path / "run") as store:
        row = store.trials_frame().iloc[0]
    back = decode_outcomes(row["eval_outcomes"])
    assert row["eval_outcomes"]["kind"] == "nll" and row["eval_outcomes"]["n"] == len(back["nll"])
    assert int(back["tokens"].sum()) == row["eval_tokens"]
    assert back["nll"].sum() / back["tokens"].sum() == pytest.approx(row["eval_loss"], rel=1e-5)
    assert "majority_rate" not in row or math.isnan(row["majority_rate"])


def test_trials_frame_columns_in_one_query(tmp_path):
    import pandas as pd

    trials = [Trial(config={"x": i}, variant="lora", rank=2, seed=i) for i in range(3)]
    outcomes = encode_outcomes("correct", correct=[True, False, True])
    with open_store(tmp_path, create=True) as store:
        store.add_trials(trials)
        store.save_result(
            TrialResult(
                trials[0].id,
                TrialStatus.COMPLETE,
                metrics={"accuracy": 2 / 3},
                curves={"train_loss": [[3, 0.5], [1, 0.9], [2, 0.7]], "eval_loss": [[3, 0.1]]},
                artifacts={"eval_outcomes": outcomes},
            )
        )
        store.save_result(
            TrialResult(
                trials[1].id,
                TrialStatus.DIVERGED,
                curves={"train_loss": [[1, 0.9], [2, float("nan")]]},
            )
        )
        queries: list[str] = []
        store._db.set_trace_callback(queries.append)
        df = store.trials_frame().set_index("trial_id")
        store._db.set_trace_callback(None)
    assert sum("FROM curves" in q for q in queries) == 1
    a, b, c = (df.loc[t.id] for t in trials)
    assert a["eval_outcomes"] == outcomes and a["accuracy"] == 2 / 3
    assert (a["train_loss_start"], a["train_loss_end"]) == (0.9, 0.5)
    assert b["eval_outcomes"] is None and b["train_loss_start"] == 0.9
    assert pd.isna(b["train_loss_end"])  # a NaN loss is stored as null
    assert c["eval_outcomes"] is None  # no curve: None in the rows, NaN in a float column
    assert pd.isna(c["train_loss_start"]) and pd.isna(c["train_loss_end"])

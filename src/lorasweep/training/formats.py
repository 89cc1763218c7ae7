"""Causal-LM dataset formats: tokenization, loss masking, truncation accounting, collation.

Four formats (``dataset.format`` in the spec):

- ``text``: plain documents, concatenated with EOS between them and cut into blocks of
  ``max_length`` tokens; every token is a target (labels = input_ids).
- ``instruction``: Alpaca-style ``instruction`` / ``input`` / ``output`` columns rendered with a
  prompt template; the output (+ EOS) is the response.
- ``prompt-completion``: two columns, the prompt and the completion (+ EOS) used as they are.
- ``chat``: a list of ``{"role", "content"}`` messages rendered with the tokenizer's chat
  template; the assistant turns (content + end-of-turn marker) are the response.

By default only response tokens carry a label; the rest are labelled -100 and ignored by the
loss (``train_on_prompt=True`` trains on every token). Truncation never drops a response
silently: every example whose prompt or response was cut, or which was removed, is counted in
the stats that :func:`tokenize_causal` returns. The policy is in docs/instruction-data.md.

Only the standard library is imported at module level, so the spec layer can import
:class:`FormatSpec` and :func:`required_columns` cheaply; ``datasets`` and ``torch`` are
imported inside the functions that need them.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    import torch

FORMATS = ("text", "instruction", "prompt-completion", "chat")
IGNORE_INDEX = -100

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# Per-example flags, kept in a temporary column and counted after tokenization.
_PROMPT_CUT, _RESPONSE_CUT, _REMOVED, _NO_RESPONSE = 1, 2, 4, 8


@dataclass
class FormatSpec:
    """How rows of a dataset become causal-LM training examples."""

    format: str = "text"
    """text | instruction | prompt-completion | chat."""
    text_column: str = "text"
    instruction_column: str = "instruction"
    input_column: str | None = "input"
    """None when the data has no input column (the no-input Alpaca template is used)."""
    output_column: str = "output"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    train_on_prompt: bool = False
    """False: prompt tokens are labelled -100 (loss on the response only)."""
    template: str | None = None
    """Instruction prompt template with {instruction} and {input} fields; None: Alpaca."""
    min_prompt_tokens: int | None = None
    """Prompt tokens kept when an example is too long (None: max_length // 2). The prompt is cut
    from the left down to this floor before the response is cut; a value >= max_length never
    cuts the prompt, so examples whose prompt fills max_length are removed (and counted)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"dataset.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.template is not None:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
            unknown = fields - {"instruction", "input"}
            if unknown or "instruction" not in fields:
                raise ValueError(
                    f"dataset.template: {self.template!r} must use {{instruction}} (and may use "
                    f"{{input}}); unknown fields: {sorted(unknown)}"
                )
        if self.min_prompt_tokens is not None and self.min_prompt_tokens < 0:
            raise ValueError(f"dataset.min_prompt_tokens: {self.min_prompt_tokens} is negative")


def required_columns(spec: FormatSpec) -> list[str]:
    """Columns the dataset must have for ``spec`` (checked before any weights load)."""
    if spec.format == "text":
        return [spec.text_column]
    if spec.format == "instruction":
        cols = [spec.instruction_column, spec.input_column, spec.output_column]
        return [c for c in cols if c is not None]
    if spec.format == "prompt-completion":
        return [spec.prompt_column, spec.completion_column]
    return [spec.messages_column]


# ---------------------------------------------------------------- tokenization


def tokenize_causal(
    dataset: datasets.Dataset,
    tokenizer: Any,
    spec: FormatSpec,
    max_length: int,
    *,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenize ``dataset`` for causal-LM training under ``spec``.

    Returns a dataset with ``input_ids``, ``attention_mask`` and ``labels`` (unpadded lists of at
    most ``max_length`` tokens) and stats: ``input_rows``, ``examples`` (rows out),
    ``prompt_truncated``, ``response_truncated``, ``response_removed`` (no response token left
    after truncation), ``no_response`` (rows with nothing to learn, e.g. a chat without an
    assistant turn; removed) and ``target_tokens``: the tokens the loss is computed on, i.e.
    labels != -100 after the one-position shift of causal LM (what :func:`token_nll_sum` counts).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    missing = [c for c in required_columns(spec) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset.format {spec.format!r} needs columns {missing}; the data has "
            f"{dataset.column_names}"
        )
    if spec.format == "text":
        return _tokenize_text(dataset, tokenizer, spec, max_length, num_proc)
    if spec.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("dataset.format 'chat' needs a tokenizer with a chat template")

    floor = max_length // 2 if spec.min_prompt_tokens is None else spec.min_prompt_tokens
    encoded = dataset.map(
        _encode_batch,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "spec": spec,
            "max_length": max_length,
            "min_prompt": floor,
            "prefix": _special_prefix(tokenizer) if spec.format != "chat" else [],
        },
        desc=f"tokenizing ({spec.format})",
    )
    flags = encoded["_flags"]
    keep = [i for i, f in enumerate(flags) if not f & (_REMOVED | _NO_RESPONSE)]
    stats = {
        "input_rows": len(dataset),
        "examples": len(keep),
        "prompt_truncated": sum(1 for f in flags if f & _PROMPT_CUT),
        "response_truncated": sum(1 for f in flags if f & _RESPONSE_CUT),
        "response_removed": sum(1 for f in flags if f & _REMOVED),
        "no_response": sum(1 for f in flags if f & _NO_RESPONSE),
        "target_tokens": int(sum(encoded["_targets"])),
    }
    if len(keep) < len(encoded):
        encoded = encoded.select(keep).flatten_indices()
    return encoded.remove_columns(["_flags", "_targets"]), stats


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens (e.g. BOS) the tokenizer puts before a text, found by comparison."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def _tokenize_text(
    dataset: datasets.Dataset,
    tokenizer: Any,
    spec: FormatSpec,
    max_length: int,
    num_proc: int | None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Concatenate documents with EOS between them and cut into blocks of max_length.

    The HF ``group_texts`` recipe, over the whole dataset rather than per map batch, and the last
    partial block is kept (padded by the collator) instead of dropped.
    """
    from datasets import Dataset

    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[spec.text_column] if t]
        ids = tokenizer(texts)["input_ids"] if texts else []
        if eos is not None:
            ids = [x if x and x[-1] == eos else [*x, eos] for x in ids]
        return {"input_ids": ids}

    docs = dataset.map(
        encode,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc="tokenizing (text)",
    )
    stream = [t for doc in docs["input_ids"] for t in doc]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) >= 2]  # a 1-token block predicts nothing
    out = Dataset.from_dict(
        {
            "input_ids": blocks,
            "attention_mask": [[1] * len(b) for b in blocks],
            "labels": [list(b) for b in blocks],
        }
    )
    stats = {
        "input_rows": len(dataset),
        "examples": len(blocks),
        "prompt_truncated": 0,
        "response_truncated": 0,
        "response_removed": 0,
        "no_response": 0,
        "target_tokens": sum(len(b) - 1 for b in blocks),
    }
    return out, stats


def _segments(spec: FormatSpec, row: dict[str, Any], tokenizer: Any) -> list[tuple[str, bool]]:
    """A row as (text, is_response) pieces in order."""
    if spec.format == "prompt-completion":
        return [
            (row[spec.prompt_column] or "", False),
            (row[spec.completion_column] or "", True),
        ]
    if spec.format == "instruction":
        instruction = row[spec.instruction_column] or ""
        inp = (row[spec.input_column] or "") if spec.input_column else ""
        if spec.template is not None:
            prompt = spec.template.format(instruction=instruction, input=inp)
        elif inp.strip():
            prompt = ALPACA_TEMPLATE.format(instruction=instruction, input=inp)
        else:
            prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)
        return [(prompt, False), (row[spec.output_column] or "", True)]
    return chat_segments(tokenizer, row[spec.messages_column])


def chat_segments(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Render ``messages`` with the chat template, split into (text, is_assistant) pieces.

    Each assistant message is located by rendering the conversation up to it and up to just
    after it (``messages[:i]``, ``messages[:i + 1]``); its target is its content plus the
    end-of-turn marker (the rendered turn minus its header and trailing whitespace). The header
    is found with ``add_generation_prompt=True`` where the template supports it, else by
    searching for the content. Templates that render a prefix differently from the start of the
    full conversation are rejected with an error.
    """
    messages = [dict(m) for m in messages]

    def render(msgs: list[dict[str, Any]], gen: bool = False) -> str:
        if not msgs and not gen:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before, upto = render(messages[:i]), render(messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)) or len(before) < pos:
            raise ValueError(
                "the chat template renders a conversation prefix differently from the start of "
                "the whole conversation; cannot locate assistant turns for loss masking"
            )
        start = -1
        try:
            header = render(messages[:i], gen=True)
        except Exception:  # templates may reject a generation prompt or an empty list
            header = ""
        if len(header) > len(before) and header.startswith(before) and upto.startswith(header):
            start = len(header)
        else:
            content = str(msg.get("content") or "").strip()
            start = upto.find(content, len(before)) if content else len(upto.rstrip())
            if start < 0:
                raise ValueError(f"assistant message {i}: content not found in rendered template")
        end = len(upto.rstrip())
        if end <= start:
            continue
        pieces.append((full[pos:start], False))
        pieces.append((full[start:end], True))
        pos = end
    pieces.append((full[pos:], False))
    return [p for p in pieces if p[0]]


def _encode_batch(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    spec: FormatSpec,
    max_length: int,
    min_prompt: int,
    prefix: list[int],
) -> dict[str, list]:
    n = len(next(iter(batch.values())))
    rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    segs = [_segments(spec, row, tokenizer) for row in rows]
    texts = [text for s in segs for text, _ in s if text]
    # One tokenizer call per batch; pieces are tokenized apart so the prompt/response boundary
    # falls exactly between tokens (no merge across it) and the mask is exact by construction.
    enc = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    eos = tokenizer.eos_token_id
    out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels")}
    out["_flags"], out["_targets"] = [], []
    for s in segs:
        prompt, response, is_target = list(prefix), [], []
        started = False
        for text, target in s:
            ids = list(next(enc)) if text else []
            started = started or target
            if started:
                response += ids
                is_target += [target] * len(ids)
            else:
                prompt += ids
        if spec.format != "chat" and started and eos is not None:
            response.append(eos)
            is_target.append(True)
        ids, mask, flags = fit_example(
            prompt, response, is_target, max_length, min_prompt, len(prefix)
        )
        labels = [t if (m or spec.train_on_prompt) else IGNORE_INDEX for t, m in zip(ids, mask)]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["_flags"].append(flags)
        kept = not flags & (_REMOVED | _NO_RESPONSE)
        out["_targets"].append(sum(1 for x in labels[1:] if x != IGNORE_INDEX) if kept else 0)
    return out


def fit_example(
    prompt: list[int],
    response: list[int],
    is_target: list[bool],
    max_length: int,
    min_prompt: int,
    keep_head: int = 0,
) -> tuple[list[int], list[bool], int]:
    """Apply the truncation policy to one example.

    ``response`` starts at the first target token (later non-target tokens, e.g. a user turn
    between two assistant turns, stay marked False in ``is_target``). If prompt + response is
    longer than ``max_length``, the prompt is cut from the left (its first ``keep_head`` tokens,
    e.g. BOS, are kept) but not below ``min(len(prompt), min_prompt)`` tokens; what still does
    not fit is cut from the end of the response. Returns (ids, target mask, flags).
    """
    if not any(is_target):
        return [], [], _NO_RESPONSE
    if len(prompt) + len(response) <= max_length:
        return prompt + response, [False] * len(prompt) + is_target, 0
    floor = min(len(prompt), min_prompt)
    p_keep = min(len(prompt), max(floor, max_length - len(response)))
    r_keep = max_length - p_keep
    flags = 0
    if r_keep <= 0 or not any(is_target[:r_keep]):
        return [], [], _REMOVED
    if p_keep < len(prompt):
        flags |= _PROMPT_CUT
        head = min(keep_head, p_keep)
        prompt = prompt[:head] + prompt[len(prompt) - (p_keep - head) :]
    if r_keep < len(response) and any(is_target[r_keep:]):
        flags |= _RESPONSE_CUT
    return prompt + response[:r_keep], [False] * len(prompt) + is_target[:r_keep], flags


# ---------------------------------------------------------------- batching and metrics


def ensure_pad_token(tokenizer: Any) -> int:
    """Set ``pad_token = eos_token`` when the tokenizer has none; return the pad id."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


class CausalCollator:
    """Right-pads ``input_ids`` with the pad id, ``attention_mask`` with 0, ``labels`` with -100.

    Holds only integers, so it pickles cheaply into dataloader workers and trial processes.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        pad_token_id: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if pad_token_id is None:
            if tokenizer is None:
                raise ValueError("CausalCollator needs a tokenizer or a pad_token_id")
            pad_token_id = ensure_pad_token(tokenizer)
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(key: str, value: int) -> torch.Tensor:
            rows = [list(f[key]) + [value] * (width - len(f[key])) for f in features]
            return torch.tensor(rows, dtype=torch.long)

        batch = {"input_ids": pad("input_ids", self.pad_token_id)}
        if all("attention_mask" in f for f in features):
            batch["attention_mask"] = pad("attention_mask", 0)
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
            )
        if all("labels" in f for f in features):
            batch["labels"] = pad("labels", IGNORE_INDEX)
        return batch

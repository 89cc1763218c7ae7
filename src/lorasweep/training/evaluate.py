"""A trial's evaluation: metrics from the model's outputs over the whole eval set (and the same
metrics on the test split, named by ``records.test_metric``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from lorasweep.records import test_metric
from lorasweep.training.formats import IGNORE_INDEX


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and the mean cross-entropy, all from the logits.

    The loss is computed here rather than taken from the model: peft's AdaLoRA adds its
    orthogonality penalty to every loss its forward returns, in eval mode too.
    """
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - logits[np.arange(len(labels)), labels]
    pred = logits.argmax(-1)
    f1s = []
    for c in np.unique(np.concatenate([labels, pred])):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "accuracy": float(np.mean(pred == labels)),
        "f1": float(np.mean(f1s)),
        "eval_loss": float(nll.mean()),
        "majority_rate": majority_rate(labels),
    }


def as_test_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics of one evaluation, renamed as measured on the test split: accuracy ->
    test_accuracy, f1 -> test_f1, eval_loss -> test_loss, perplexity -> test_perplexity,
    eval_tokens -> test_tokens (``majority_rate`` stays the eval split's)."""
    return {test_metric(k): v for k, v in metrics.items() if k != "majority_rate"}


def classification_outcomes(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per eval example, in order: ``{"correct": prediction == label}`` (its mean is the
    accuracy of :func:`classification_metrics`, exactly)."""
    return {"correct": np.asarray(logits).argmax(-1) == np.asarray(labels)}


def majority_rate(labels: np.ndarray) -> float:
    """Share of the most frequent label: the accuracy of always predicting it."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return math.nan
    return float(np.unique(labels, return_counts=True)[1].max() / labels.size)


def causal_eval(trainer: Trainer, eval_ds: Any) -> dict[str, float]:
    """Perplexity = exp(total NLL / total target tokens) over the whole eval set."""
    return causal_eval_outcomes(trainer, eval_ds)[0]


@torch.no_grad()
def causal_eval_outcomes(
    trainer: Trainer, eval_ds: Any
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """:func:`causal_eval`'s metrics, and per eval example in loader order ``{"nll": summed
    NLL in nats, "tokens": target tokens}`` (they sum to the totals behind the perplexity)."""
    model = trainer.model
    model.eval()
    nll, tokens = 0.0, 0
    rows_nll, rows_tokens = [], []
    for batch in trainer.get_eval_dataloader(eval_ds):
        batch = trainer._prepare_inputs(batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        s, n = token_nll_rows(logits.float(), labels)
        rows_nll.append(s.cpu().double().numpy())  # totals in float64 (MPS has none)
        rows_tokens.append(n.cpu().numpy())
        nll += float(rows_nll[-1].sum())
        tokens += int(rows_tokens[-1].sum())
    outcomes = {
        "nll": np.concatenate(rows_nll) if rows_nll else np.zeros(0),
        "tokens": np.concatenate(rows_tokens) if rows_tokens else np.zeros(0, dtype=np.int64),
    }
    return causal_lm_metrics(nll, tokens), outcomes


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over labels != -100, shifted like HF (logits[:-1] predict labels[1:]).

    ``logits``: (batch, seq, vocab), any float dtype (computed in float32); ``labels``: (batch,
    seq). Returns (sum of NLL in nats, number of tokens it covers).
    """
    import torch.nn.functional as F

    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    n = int((shift_labels != IGNORE_INDEX).sum())
    if n == 0:
        return 0.0, 0
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(nll), n


def token_nll_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_nll_sum` per row: (summed NLL per row, float32; target tokens per row, int64),
    with the same shift and ignore-index rules."""
    import torch.nn.functional as F

    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return per_token.sum(-1), (shift_labels != IGNORE_INDEX).sum(-1)


def causal_lm_metrics(total_nll: float, total_tokens: int) -> dict[str, float]:
    """Token-weighted metrics over a whole eval set: perplexity = exp(total_nll / total_tokens)."""
    if total_tokens <= 0:
        raise ValueError("no target tokens in the eval set: cannot compute perplexity")
    mean = total_nll / total_tokens
    perplexity = math.exp(mean) if mean < 700 else math.inf
    return {"perplexity": perplexity, "eval_loss": mean, "eval_tokens": int(total_tokens)}

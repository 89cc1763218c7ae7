"""A trial's evaluation: metrics from the model's outputs over the whole eval set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Trainer


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
    }


@torch.no_grad()
def causal_eval(trainer: Trainer, eval_ds: Any) -> dict[str, float]:
    """Perplexity = exp(total NLL / total target tokens) over the whole eval set."""
    from lorasweep.training.formats import causal_lm_metrics, token_nll_sum

    model = trainer.model
    model.eval()
    nll, tokens = 0.0, 0
    for batch in trainer.get_eval_dataloader(eval_ds):
        batch = trainer._prepare_inputs(batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        s, n = token_nll_sum(logits.float(), labels)
        nll += float(s)
        tokens += int(n)
    return causal_lm_metrics(nll, tokens)

"""The eval set's own sampling error: a paired bootstrap over eval examples and seeds.

Each complete trial may store its per-example eval outcomes (``records.encode_outcomes``):
correctness per example for classification, the summed NLL and the token count per example for
causal LM. Example ``i`` is the same example in every trial of a sweep (one eval set, one
order), so two configurations are compared on the same resampled examples (Dror et al. 2018;
Bouthillier et al. 2021): the interval then covers what another eval set of the same size from
the same distribution, and other seeds, would show.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lorasweep.records import decode_outcomes

REPS = 2000


def _statistic(metric: str, kind: str) -> str | None:
    """How the metric is computed from one kind of outcome; None when it cannot be."""
    if kind == "correct" and metric == "accuracy":
        return "mean"
    if kind == "nll" and metric == "perplexity":
        return "perplexity"
    if kind == "nll" and metric == "eval_loss":
        return "loss"
    return None


def _arrays(outcomes: Mapping[Any, Any], seeds: list[Any]) -> tuple[str, list[dict]] | None:
    try:
        decoded = [decode_outcomes(outcomes[s]) for s in seeds]
    except (KeyError, ValueError, TypeError):
        return None
    kinds = {outcomes[s].get("kind") for s in seeds}
    sizes = {len(next(iter(d.values()))) for d in decoded}
    if len(kinds) != 1 or len(sizes) != 1:
        return None
    return kinds.pop(), decoded


def bootstrap_diff(
    metric: str,
    ref: Mapping[Any, Any],
    other: Mapping[Any, Any],
    *,
    reps: int = REPS,
    seed: int = 0,
) -> list[float] | None:
    """95% percentile interval of ``mean(other) - mean(ref)`` over ``reps`` paired resamples of
    the eval examples and of the common seeds; ``ref``/``other``: seed -> stored outcomes. None
    when the metric cannot be recomputed from the outcomes, or they are missing or differ in
    kind or size."""
    seeds = sorted(set(ref) & set(other), key=str)
    if not seeds:
        return None
    a, b = _arrays(ref, seeds), _arrays(other, seeds)
    if a is None or b is None or a[0] != b[0]:
        return None
    stat = _statistic(metric, a[0])
    if stat is None:
        return None
    n = len(next(iter(a[1][0].values())))
    if n == 0 or len(next(iter(b[1][0].values()))) != n:
        return None
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=reps).T.astype(float)  # (n, reps)
    per_seed = [_per_seed(stat, a[1], counts, n), _per_seed(stat, b[1], counts, n)]
    pick = rng.integers(0, len(seeds), size=(reps, len(seeds)))
    cols = np.arange(reps)[:, None]
    diff = (per_seed[1][pick, cols] - per_seed[0][pick, cols]).mean(axis=1)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return [float(lo), float(hi)]


def _per_seed(stat: str, decoded: list[dict], counts: np.ndarray, n: int) -> np.ndarray:
    """(seeds, reps): the metric of every seed on every resample of the examples."""
    if stat == "mean":
        correct = np.array([d["correct"] for d in decoded], float)
        return correct @ counts / n
    nll = np.array([d["nll"] for d in decoded], float) @ counts
    tokens = np.array([d["tokens"] for d in decoded], float) @ counts
    loss = nll / np.maximum(tokens, 1.0)
    return np.exp(loss) if stat == "perplexity" else loss

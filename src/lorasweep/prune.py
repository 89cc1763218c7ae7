"""Successive halving over configurations, dropping only what the seeds show to be worse.

Pure decision logic (no torch, no store): the rung schedule, and at each rung which
configurations to drop given their intermediate evaluations per seed. The orchestration (pausing
trials at rungs, storing dropped ones as ``pruned``) is described in docs/scaling.md, "Pruning".

The rule, at each rung:

1. rank configurations by their mean metric over seeds; the best is the reference;
2. plain successive halving would drop all but the top ``1/eta``; here those are only
   *candidates* for dropping;
3. a candidate is dropped only if it is significantly worse than the best at this rung: a one-sided
   paired t-test on the common seeds (the seed is a blocking factor, as in ``stats``), Welch's
   t-test when fewer than ``stats.MIN_PAIRS`` seeds are shared, Holm-adjusted across the
   candidates of the rung, at level ``alpha``;
4. with a single seed there is no test, so nothing is dropped: pruning needs seeds.

So a rung never drops more than plain successive halving would, and usually less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from lorasweep.stats import ALPHA, MIN_PAIRS


def rung_steps(max_steps: int, *, eta: int = 2, min_steps: int = 10) -> list[int]:
    """Steps at which configurations are compared, before the final one.

    ``max_steps / eta**k`` for k = 1, 2, ... down to ``min_steps``, in increasing order: with 80
    steps and eta 2, ``[10, 20, 40]``.
    """
    if eta < 2:
        raise ValueError(f"prune.eta: must be >= 2, got {eta}")
    rungs = []
    s = max_steps / eta
    while s >= min_steps:
        rungs.append(int(s))
        s /= eta
    return sorted(set(rungs))


@dataclass
class RungDecision:
    step: int
    best: str
    keep: list[str]
    drop: list[str]
    reasons: dict[str, str] = field(default_factory=dict)  # config -> why dropped or kept


def _one_sided_p(
    best: dict[int, float], other: dict[int, float], sign: float
) -> tuple[float | None, str]:
    """p-value of "other is worse than best" (sign +1: higher is better) and the test's name."""
    common = sorted(set(best) & set(other))
    if len(common) >= MIN_PAIRS:
        d = sign * (np.array([best[s] for s in common]) - np.array([other[s] for s in common]))
        if np.allclose(d, d[0]):  # no variance: worse in every seed by the same amount, or equal
            return (0.0 if d[0] > 0 else 1.0), f"paired ({len(common)} seeds, constant gap)"
        t = sps.ttest_1samp(d, 0.0, alternative="greater")
        return float(t.pvalue), f"paired t ({len(common)} seeds)"
    vb, vo = list(best.values()), list(other.values())
    if len(vb) >= 2 and len(vo) >= 2:
        t = sps.ttest_ind(
            sign * np.array(vb), sign * np.array(vo), equal_var=False, alternative="greater"
        )
        p = float(t.pvalue)
        return (None if math.isnan(p) else p), f"Welch t ({len(vb)} vs {len(vo)} seeds)"
    return None, "one seed: no test"


def decide_rung(
    values: dict[str, dict[int, float]],
    step: int,
    *,
    higher_is_better: bool,
    eta: int = 2,
    alpha: float = ALPHA,
) -> RungDecision:
    """Which configurations to drop at a rung.

    Args:
        values: configuration label -> {seed: metric at this rung}. Non-finite values (a diverged
            seed) count as the worst possible value.
        step: the rung's training step (recorded in the decision).
        higher_is_better: direction of the metric.
        eta: successive-halving factor: at most ``n - ceil(n / eta)`` configurations are dropped.
        alpha: family-wise level of the Holm-adjusted tests at this rung.
    """
    sign = 1.0 if higher_is_better else -1.0
    worst = -math.inf if higher_is_better else math.inf
    clean = {
        c: {s: (v if v is not None and math.isfinite(v) else worst) for s, v in seeds.items()}
        for c, seeds in values.items()
        if seeds
    }
    if not clean:
        raise ValueError("decide_rung: no values")

    def mean(c: str) -> float:
        v = np.array(list(clean[c].values()), dtype=float)
        return float(np.mean(v)) if np.all(np.isfinite(v)) else worst

    order = sorted(clean, key=lambda c: sign * mean(c), reverse=True)
    best = order[0]
    n_keep = math.ceil(len(order) / eta)
    candidates = order[n_keep:]
    reasons = {c: "in the top 1/eta" for c in order[:n_keep]}
    reasons[best] = "best at this rung"
    tested, pvals = [], []
    for c in candidates:
        if any(math.isinf(v) for v in clean[c].values()) and not any(
            math.isinf(v) for v in clean[best].values()
        ):
            p, name = 0.0, "non-finite value (diverged seed)"
        else:
            p, name = _one_sided_p(clean[best], clean[c], sign)
        if p is None:
            reasons[c] = f"kept: {name}"
            continue
        tested.append((c, name))
        pvals.append(p)
    drop = []
    if tested:
        reject, adj, _, _ = multipletests(pvals, alpha=alpha, method="holm")
        for (c, name), r, p in zip(tested, reject, adj, strict=True):
            verdict = "dropped" if r else "kept"
            reasons[c] = f"{verdict}: worse than {best}? {name}, Holm p={p:.3g}"
            if r:
                drop.append(c)
    keep = [c for c in order if c not in drop]
    return RungDecision(step=step, best=best, keep=keep, drop=drop, reasons=reasons)

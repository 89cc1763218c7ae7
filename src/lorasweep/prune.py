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

Also here, for the orchestration in ``sweep.py`` (still no torch): ``PruneSettings``,
``planned_steps`` (the Trainer's step count, so rungs are known before any trial runs) and
``merge_segments`` (one trial's result from the segments it ran between rungs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from lorasweep.results import TrialResult
from lorasweep.stats import ALPHA, MIN_PAIRS


@dataclass(frozen=True)
class PruneSettings:
    """``--prune`` options: the halving factor, the first rung's minimum steps, the test level."""

    eta: int = 2
    min_steps: int = 10
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ValueError(f"--prune-eta: must be >= 2, got {self.eta}")
        if self.min_steps < 1:
            raise ValueError(f"--prune-min-steps: must be >= 1, got {self.min_steps}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"--prune-alpha: must be in (0, 1), got {self.alpha}")

    def to_dict(self) -> dict[str, float]:
        return {"eta": self.eta, "min_steps": self.min_steps, "alpha": self.alpha}


def planned_steps(training: dict, n_train: int) -> int:
    """Optimizer steps of a run, counted as the HF Trainer counts them.

    ``training`` holds TrainingArguments names (missing ones take the Trainer's defaults);
    ``n_train`` is the number of training examples.
    """
    max_steps = int(training.get("max_steps") or 0)
    if max_steps > 0:
        return max_steps
    bs = int(training.get("per_device_train_batch_size", 8))
    accum = int(training.get("gradient_accumulation_steps", 1))
    batches = n_train // bs
    if not training.get("dataloader_drop_last", False) and n_train % bs:
        batches += 1
    per_epoch = max(1, math.ceil(batches / accum))
    return int(math.ceil(per_epoch * float(training.get("num_train_epochs", 3.0))))


_SUMMED = ("train_seconds", "load_seconds", "train_examples", "train_tokens",
           "rung_eval_seconds", "train_segments")  # fmt: skip
_MAXED = ("peak_cpu_rss_bytes", "sampled_peak_cpu_rss_bytes", "peak_gpu_allocated_bytes",
          "peak_gpu_reserved_bytes")  # fmt: skip
_TIME_WEIGHTED = ("mean_cpu_rss_bytes", "mean_gpu_allocated_bytes")


def merge_segments(prev: TrialResult | None, new: TrialResult) -> TrialResult:
    """One trial's result from a paused segment ``prev`` (up to a rung) and the next one.

    The new segment's eval metrics and final state win; times, examples and tokens add up;
    peaks take the maximum; mean memory is weighted by training time; the training-loss mean is
    weighted by steps; throughput is recomputed from the sums; curves are joined by step.
    ``prev`` None (or not a paused segment) returns ``new`` unchanged.
    """
    if prev is None or not prev.artifacts.get("paused"):
        return new
    pm, nm = prev.metrics, new.metrics
    m = dict(nm)
    for k in _SUMMED:
        if k in pm or k in nm:
            m[k] = float(pm.get(k) or 0.0) + float(nm.get(k) or 0.0)
    for k in _MAXED:
        vals = [v for v in (pm.get(k), nm.get(k)) if v is not None]
        if vals:
            m[k] = float(max(vals))
    tp, tn = float(pm.get("train_seconds") or 0.0), float(nm.get("train_seconds") or 0.0)
    for k in _TIME_WEIGHTED:
        if pm.get(k) is not None and nm.get(k) is not None and tp + tn > 0:
            m[k] = (pm[k] * tp + nm[k] * tn) / (tp + tn)
        elif k in pm and k not in nm:
            m[k] = pm[k]
    sp = float(prev.artifacts["paused"]["step"])
    sn = float(nm.get("train_steps") or sp) - sp
    if pm.get("train_loss_mean") is not None and nm.get("train_loss_mean") is not None:
        m["train_loss_mean"] = (pm["train_loss_mean"] * sp + nm["train_loss_mean"] * sn) / (sp + sn)
    if m.get("train_seconds"):
        for count, rate in (("train_examples", "examples_per_second"),
                            ("train_tokens", "tokens_per_second")):  # fmt: skip
            if m.get(count) is not None:
                m[rate] = m[count] / m["train_seconds"]
    curves: dict[str, list[list[float]]] = {}
    for name in dict.fromkeys([*prev.curves, *new.curves]):
        pts = {float(s): v for s, v in prev.curves.get(name, [])}
        pts.update({float(s): v for s, v in new.curves.get(name, [])})
        curves[name] = [[s, pts[s]] for s in sorted(pts)]
    artifacts = {k: v for k, v in prev.artifacts.items() if k != "paused"}
    artifacts.update(new.artifacts)
    return TrialResult(
        trial_id=new.trial_id,
        status=new.status,
        metrics=m,
        curves=curves,
        error=new.error,
        environment=new.environment or prev.environment,
        artifacts=artifacts,
    )


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

"""The test of a configuration against a reference, shared by the two places that compare
configurations across seeds:

- ``stats.analyze`` reports a two-sided test of every configuration against the best (its
  decision is made by ``decision.mcb``);
- the pruning rungs (``decide_rung``, here): a candidate against the rung's best, one-sided
  ("worse by more than a margin"), Holm-adjusted across the rung's candidates.

The seed is a blocking factor (same seeds, same data order across configurations): two
configurations that share at least ``MIN_PAIRS`` seeds are compared with a paired t-test on the
common seeds, otherwise with Welch's t-test on all the values of both; with a single value on
either side there is no test.

Zero spread (every paired difference the same, or no variance on either side for Welch) makes t
0/0 or infinite. There are two rules for it, kept apart because recorded outputs depend on each
(the ``analyze`` JSON; the reasons stored in a pruned run's ``meta["prune"]``):

- ``"exact"`` (``analyze``): when the spread is exactly 0 (the standard deviation of the paired
  differences; for Welch the sum of both standard deviations), the difference of the means
  decides: p = 0 when it lies in the tested direction (two-sided: any difference), else 1.
- ``"close"`` (pruning rungs): when the paired differences are equal up to ``np.allclose``, the
  gap decides the same way (the test is then named "constant gap"); for Welch scipy's answer is
  kept (an infinite t gives p 0 or 1) and 0/0 leaves the pair untested (p None).

Also here: ``Group``, the typed record of one configuration in ``analyze`` (its values per seed,
its test against the best, what the recommendation needs), and its JSON form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

# Family-wise significance level of the Holm-adjusted tests (analyze, pruning rungs).
ALPHA = 0.05
# A paired t on 2 seeds has 1 degree of freedom (critical t = 12.7): with fewer common seeds
# than this, Welch on all the values of both configurations is the more powerful test.
MIN_PAIRS = 3

Alternative = Literal["two-sided", "greater"]
ZeroSpread = Literal["exact", "close"]


# ----------------------------------------------------------------------------- the test


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` found; the callers name the test from it in their own words."""

    p_value: float | None
    """None: no test (a single value on a side, or, under "close", Welch with no spread)."""
    design: Literal["paired", "welch", "none"]
    n_common: int
    """seeds both configurations have"""
    n_ref: int
    n_other: int
    constant: bool = False
    """the zero-spread rule decided the p-value, not the t distribution"""


def compare(
    ref: Mapping[Any, float],
    other: Mapping[Any, float],
    *,
    sign: float = 1.0,
    margin: float = 0.0,
    alternative: Alternative = "two-sided",
    zero_spread: ZeroSpread = "exact",
) -> Comparison:
    """Test ``other`` against the reference ``ref`` (each: seed -> metric value).

    Args:
        sign: +1 when higher values are better, -1 when lower are.
        margin: "greater" tests "other is worse than ref by more than ``margin``" (metric
            units); 0 tests plain "worse". A two-sided test is run with margin 0.
        alternative: "two-sided" (the means differ) or "greater" (ref is better).
        zero_spread: the rule for data with no spread: "exact" or "close" (module docstring).
    """
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative: {alternative!r} must be 'two-sided' or 'greater'")
    if zero_spread not in ("exact", "close"):
        raise ValueError(f"zero_spread: {zero_spread!r} must be 'exact' or 'close'")
    common = sorted(set(ref) & set(other))
    counts = {"n_common": len(common), "n_ref": len(ref), "n_other": len(other)}
    if len(common) >= MIN_PAIRS:
        r = np.array([ref[s] for s in common])
        o = np.array([other[s] for s in common])
        # ref ahead of other, in the better direction, beyond the margin
        d = sign * (r - o) - margin
        if zero_spread == "exact":
            constant, gap = bool(np.std(d) == 0), sign * (r.mean() - o.mean()) - margin
        else:
            constant, gap = bool(np.allclose(d, d[0])), d[0]
        if constant:
            return Comparison(_by_gap(gap, alternative), "paired", **counts, constant=True)
        p = float(sps.ttest_1samp(d, 0.0, alternative=alternative).pvalue)
        return Comparison(p, "paired", **counts)  # NaN stays NaN: Holm then keeps the pair
    if len(ref) >= 2 and len(other) >= 2:
        x = sign * np.array(list(ref.values())) - margin
        y = sign * np.array(list(other.values()))
        if zero_spread == "exact" and np.std(x) + np.std(y) == 0:
            gap = x.mean() - y.mean()
            return Comparison(_by_gap(gap, alternative), "welch", **counts, constant=True)
        t = sps.ttest_ind(x, y, equal_var=False, alternative=alternative)
        p = float(t.pvalue)
        return Comparison(None if math.isnan(p) else p, "welch", **counts)
    return Comparison(None, "none", **counts)


def _by_gap(gap: float, alternative: Alternative) -> float:
    """The p-value of data with no spread: 0 when the gap is in the tested direction, else 1."""
    shows = gap != 0 if alternative == "two-sided" else gap > 0
    return 0.0 if shows else 1.0


def holm(p_values: Sequence[float], alpha: float) -> tuple[list[bool], list[float]]:
    """Holm's step-down over one family of tests: (rejected at ``alpha``, adjusted p-values),
    in the order given. A NaN p-value stays NaN, is never rejected and still counts in the
    family size (as statsmodels does). Checked against
    ``statsmodels.stats.multitest.multipletests(method="holm")`` in the tests; written out here
    because that function runs a full garbage collection on every call (160 ms, which the
    decision benchmark's thousands of calls cannot afford)."""
    p = np.asarray(list(p_values), float)
    ok = ~np.isnan(p)
    adjusted = np.full(len(p), np.nan)
    valid = p[ok]
    m = len(valid)
    if m:
        order = np.argsort(valid, kind="mergesort")
        steps = np.maximum.accumulate((len(p) - np.arange(m)) * valid[order])
        adj = np.empty(m)
        adj[order] = np.minimum(steps, 1.0)
        adjusted[ok] = adj
    reject = [bool(a <= alpha) if not math.isnan(a) else False for a in adjusted]
    return reject, [float(a) for a in adjusted]


# ----------------------------------------------------------------------------- analyze's groups


def json_scalar(v: Any) -> Any:
    """A JSON-native scalar: NaN/inf -> None, numpy -> python."""
    if v is None:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def key_scalar(v: Any) -> Any:
    """A configuration key's value: ``json_scalar``, and integral floats (ranks read as
    floats) as ints, so keys print ``r=16``, not ``r=16.0``."""
    v = json_scalar(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# the fields of a group in ``analyze``'s output, in their order there
PUBLIC_FIELDS = ("key", "n", "mean", "std", "ci95", "p_value", "p_adjusted", "test",
                 "significantly_worse", "cost", "reference", "diff", "diff_bound", "diff_ci",
                 "within_margin", "diff_ci_examples", "seeds_diverged", "seeds_failed",
                 "seeds_collapsed", "learned", "eligible", "note")  # fmt: skip


@dataclass(eq=False)
class Group:
    """One configuration in ``stats.analyze``: its complete trials, its comparison with the
    best of the others, and what the recommendation weighs. ``to_dict()`` is its JSON form
    (``PUBLIC_FIELDS``); differences are in the metric's units, this configuration minus its
    reference."""

    key: dict[str, Any]
    """the grouping columns' values, e.g. ``{"variant": "lora", "rank": 16}``"""
    n: int
    mean: float
    std: float | None
    ci95: list[float] | None
    """95% t interval of the mean over seeds on the fixed eval set (clipped to [0, 1] for
    proportions)"""
    cost: float | None
    """mean of the cost column (None when not measured)"""
    seeds: list[Any] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    """the metric per seed, in the order of ``seeds``"""
    costs: list[float] = field(default_factory=list)
    """the cost per trial (finite values only)"""
    mem: float | None = None
    """peak memory in bytes (largest over the trials)"""
    params: float | None = None
    rank: float | None = None
    outcomes: dict[Any, Any] = field(default_factory=dict)
    """seed -> the trial's per-example eval outcomes (``records.encode_outcomes``), if stored"""
    # the test against the best (two-sided, Holm-adjusted across the configurations)
    p_value: float | None = None
    p_adjusted: float | None = None
    test: str | None = None
    significantly_worse: bool = False
    # the comparison with the best of the others (Hsu's MCB)
    reference: dict[str, Any] | None = None
    diff: float | None = None
    diff_bound: float | None = None
    """the worst end of the simultaneous 95% interval of ``diff`` (a lower bound when higher is
    better, an upper bound when lower is better)"""
    diff_ci: list[float] | None = None
    """the simultaneous 95% interval of ``diff`` (Hsu's constrained MCB interval, contains 0)"""
    within_margin: bool = False
    diff_ci_examples: list[float] | None = None
    """95% bootstrap interval of ``diff`` over eval examples and seeds (paired)"""
    # instability and learning
    seeds_diverged: int = 0
    seeds_failed: int = 0
    seeds_collapsed: int = 0
    learned: bool | None = None
    """False: at the majority-class rate, or a training loss that never left its start"""
    # the recommendation
    eligible: bool = False
    """within the margin, replicated, stable, learned and within the memory budget"""
    note: str | None = None
    """why it is not eligible, in words"""
    fits: bool = True
    """within the memory budget (or none given, or memory not measured)"""

    def by_seed(self) -> dict[Any, float]:
        return dict(zip(self.seeds, self.values))

    def instability(self) -> list[str]:
        """Why its seeds cannot be trusted, in words: diverged, collapsed, did not learn."""
        parts = []
        if self.seeds_diverged:
            parts.append(f"{self.seeds_diverged} of {self.n + self.seeds_diverged} seeds diverged")
        if self.seeds_collapsed:
            parts.append(f"{self.seeds_collapsed} of {self.n} seeds collapsed")
        if self.learned is False:
            parts.append("it did not learn")
        return parts

    def to_dict(self) -> dict[str, Any]:
        """The public JSON dict: numbers JSON-native, missing ones None."""
        out: dict[str, Any] = {"key": self.key}
        for name in PUBLIC_FIELDS[1:]:
            v = getattr(self, name)
            if isinstance(v, dict):
                out[name] = {k: json_scalar(x) for k, x in v.items()}
            else:
                out[name] = [json_scalar(x) for x in v] if isinstance(v, list) else json_scalar(v)
        return out


# ----------------------------------------------------------------------------- pruning rungs


@dataclass
class RungDecision:
    step: int
    best: str
    keep: list[str]
    drop: list[str]
    reasons: dict[str, str] = field(default_factory=dict)  # config -> why dropped or kept


def _rung_test_name(c: Comparison) -> str:
    if c.design == "paired":
        if c.constant:
            return f"paired ({c.n_common} seeds, constant gap)"
        return f"paired t ({c.n_common} seeds)"
    if c.design == "welch":
        return f"Welch t ({c.n_ref} vs {c.n_other} seeds)"
    return "one seed: no test"


def decide_rung(
    values: dict[str, dict[int, float]],
    step: int,
    *,
    higher_is_better: bool,
    eta: int = 2,
    alpha: float = ALPHA,
    tolerance: float = 0.0,
) -> RungDecision:
    """Which configurations to drop at a pruning rung.

    The rule: rank the configurations by their mean over seeds (the best is the reference);
    plain successive halving would drop all but the top ``1/eta``, here those are only
    *candidates*; a candidate is dropped only if ``compare`` (one-sided, "close" zero-spread
    rule) finds it worse than the best, Holm-adjusted across the rung's candidates at level
    ``alpha``. With a single seed there is no test, so nothing is dropped. A rung never drops
    more than plain successive halving would, and usually less.

    Args:
        values: configuration label -> {seed: metric at this rung}. Non-finite values (a diverged
            seed) count as the worst possible value.
        step: the rung's training step (recorded in the decision).
        higher_is_better: direction of the metric.
        eta: successive-halving factor: at most ``n - ceil(n / eta)`` configurations are dropped.
        alpha: family-wise level of the Holm-adjusted tests at this rung.
        tolerance: a candidate is dropped only if significantly worse than the best by more
            than this (in the metric's units): the null hypothesis is "worse by at most
            ``tolerance``". 0 tests plain "worse".
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
    reasons = {c: "in the top 1/eta" for c in order[:n_keep]}
    reasons[best] = "best at this rung"
    tested, pvals = [], []
    for c in order[n_keep:]:
        if any(math.isinf(v) for v in clean[c].values()) and not any(
            math.isinf(v) for v in clean[best].values()
        ):
            p, name = 0.0, "a seed diverged"
        else:
            cmp = compare(clean[best], clean[c], sign=sign, margin=tolerance,
                          alternative="greater", zero_spread="close")  # fmt: skip
            p, name = cmp.p_value, _rung_test_name(cmp)
        if p is None:
            reasons[c] = f"kept: {name}"
            continue
        tested.append((c, name))
        pvals.append(p)
    drop = []
    if tested:
        reject, adj = holm(pvals, alpha)
        for (c, name), r, p in zip(tested, reject, adj, strict=True):
            verdict = "dropped: significantly" if r else "kept: not significantly"
            margin = f" by more than {tolerance:g}" if tolerance else ""
            reasons[c] = f"{verdict} worse than {best}{margin} ({name}, Holm p={p:.3g})"
            if r:
                drop.append(c)
    keep = [c for c in order if c not in drop]
    return RungDecision(step=step, best=best, keep=keep, drop=drop, reasons=reasons)

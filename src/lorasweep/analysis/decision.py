"""The decision rule of ``stats.analyze``: which configurations are as good as the best within a
stated margin, on the evidence of the trials.

Pure functions; no torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.optimize import brentq
from statsmodels.regression.linear_model import OLS

from lorasweep.analysis.units import fmt_sig


@dataclass(frozen=True)
class Margin:
    """How much worse than the best a configuration may be and still count as good enough."""

    value: float
    """metric units, or a fraction of the best mean when ``relative``"""
    relative: bool = False
    given: bool = True
    """False: the metric's documented default"""

    def absolute(self, reference_mean: float) -> float:
        """The margin in metric units against a reference mean."""
        return self.value * abs(reference_mean) if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


def parse_margin(value: Any, key: str = "margin") -> Margin | None:
    """A margin from the CLI, the spec or the API: a number >= 0 in metric units, or a
    percentage string like ``"2%"`` (of the best mean). None stays None (the metric's default).

    Raises:
        ValueError: one line naming ``key`` and the value.
    """
    if value is None or isinstance(value, Margin):
        return value
    bad = ValueError(
        f"{key}: {value!r} must be a number >= 0 in the metric's units, or a percentage "
        "like '2%' of the best mean"
    )
    if isinstance(value, bool):
        raise bad
    relative = False
    if isinstance(value, str):
        text = value.strip()
        relative = text.endswith("%")
        try:
            number = float(text[:-1] if relative else text)
        except ValueError:
            raise bad from None
        if relative:
            number /= 100
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise bad
    if not math.isfinite(number) or number < 0 or (relative and number >= 1):
        raise bad
    return Margin(number, relative)


# Metrics that are proportions: a margin of one point (0.01), or 1.0 on a 0-100 scale.
_PROPORTIONS = ("accuracy", "acc", "f1", "precision", "recall", "exact_match", "em", "auc")


def is_proportion(metric: str) -> bool:
    """The metric's name says it is a proportion (accuracy, F1, precision, recall, ...)."""
    name = metric.lower()
    for split in ("eval_", "test_", "val_", "validation_"):
        name = name.removeprefix(split)
    return any(name == p or name.startswith(p + "_") for p in _PROPORTIONS)


def default_margin(metric: str, values: Any) -> Margin:
    """The documented default margin of a metric (docs/report.md): one point for accuracy-like
    proportions (0.01, or 1.0 when the values are percentages), 2% of the best mean for
    perplexity, 0.02 nats for losses (about 2% of perplexity), 1% of the best mean otherwise."""
    name = metric.lower()
    if is_proportion(metric):
        finite = [v for v in values if v is not None and math.isfinite(v)]
        percent = bool(finite) and max(abs(v) for v in finite) > 1.0
        return Margin(1.0 if percent else 0.01, relative=False, given=False)
    if "perplexity" in name or "ppl" in name:
        return Margin(0.02, relative=True, given=False)
    if "loss" in name or "nll" in name:
        return Margin(0.02, relative=False, given=False)
    return Margin(0.01, relative=True, given=False)


# ----------------------------------------------------------------------------- critical values


@lru_cache(maxsize=256)
def dunnett_critical(m: int, df: float, alpha: float = 0.05) -> float:
    """One-sided critical value of Dunnett's many-to-one comparison: ``m`` comparisons with a
    common control, equal sample sizes (correlation 1/2 between comparisons), ``df`` degrees of
    freedom of the variance estimate (``math.inf``: known variance).

    ``P(max_i T_i <= d) = 1 - alpha`` is computed as ``E_S E_W[Phi(sqrt(2) d S - W)^m]`` with
    ``W ~ N(0, 1)`` (the shared part of the comparisons; Gauss-Hermite) and ``S = sqrt(chi2_df /
    df)`` (adaptive quadrature), then solved for ``d``. Checked against ``scipy.stats.dunnett``.
    """
    if m < 1:
        raise ValueError(f"m: {m} comparisons; need at least 1")
    if m == 1:
        return bonferroni_critical(1, df, alpha)
    # W: Gauss-Hermite; S: Gauss-Legendre over its central 1 - 2e-12 (vectorized grid)
    h_nodes, h_weights = np.polynomial.hermite.hermgauss(80)
    w, w_weights = math.sqrt(2) * h_nodes, h_weights / math.sqrt(math.pi)
    if math.isfinite(df):
        chi = sps.chi(df, scale=1 / math.sqrt(df))
        lo, hi = chi.ppf(1e-12), chi.ppf(1 - 1e-12)
        l_nodes, l_weights = np.polynomial.legendre.leggauss(160)
        s = (hi - lo) / 2 * l_nodes + (hi + lo) / 2
        s_weights = (hi - lo) / 2 * l_weights * chi.pdf(s)
    else:
        s, s_weights = np.array([1.0]), np.array([1.0])

    def coverage(d: float) -> float:
        inner = sps.norm.cdf(math.sqrt(2) * d * s[:, None] - w[None, :]) ** m
        return float(s_weights @ (inner @ w_weights))

    return float(brentq(lambda d: coverage(d) - (1 - alpha), 0.0, 50.0, xtol=1e-9))


def bonferroni_critical(m: int, df: float, alpha: float = 0.05) -> float:
    """One-sided t critical value at ``alpha / m`` (valid for any correlation; conservative)."""
    q = 1 - alpha / max(m, 1)
    return float(sps.t.ppf(q, df)) if math.isfinite(df) else float(sps.norm.ppf(q))


# ----------------------------------------------------------------------------- the noise model


@dataclass
class Design:
    """How the differences between configurations and their standard errors are estimated.

    ``two-way``: configurations share seeds; an OLS fit of ``metric ~ configuration + seed``
    (fixed effects) gives every difference (seed-adjusted) and one residual variance pooled over
    all configurations, with ``N - k - s + 1`` degrees of freedom. ``welch``: the seeds are not
    shared (the fit is not identifiable); each pair is compared with Welch's t on its values.
    """

    kind: str
    """"two-way", "welch" or "none" (one configuration, or nothing to estimate noise from)"""
    members: list[int]
    """indices of the groups in the comparison family"""
    effects: np.ndarray
    """per group: the estimate the comparisons use (two-way: seed-adjusted; welch: the mean)"""
    balanced: bool = False
    """two-way with every configuration on the same seeds (Dunnett's constant applies)"""
    sigma: float | None = None
    """two-way: residual standard deviation of one run"""
    df: float | None = None
    """two-way: residual degrees of freedom"""
    cov: np.ndarray | None = None
    values: list[np.ndarray] | None = None

    def pair(self, i: int, j: int) -> tuple[float, float, float]:
        """(estimate of effect_i - effect_j, its standard error, degrees of freedom)."""
        diff = float(self.effects[i] - self.effects[j])
        if self.kind == "two-way":
            c = self.cov
            var = c[i, i] + c[j, j] - 2 * c[i, j]
            return diff, math.sqrt(max(var, 0.0)), float(self.df)
        se, df = welch_se_df(self.values[i], self.values[j])
        return diff, se, df

    def describe(self) -> str:
        if self.kind == "two-way":
            return (
                f"two-way model (configuration + seed), residual sd {fmt_sig(self.sigma)} on "
                f"{self.df:g} degrees of freedom"
            )
        if self.kind == "welch":
            return "Welch t per pair (the configurations do not share seeds)"
        return "no noise estimate"


def welch_se_df(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Welch's standard error of ``mean(a) - mean(b)`` and its Welch-Satterthwaite degrees of
    freedom (``len(a) + len(b) - 2`` when neither side varies); 2 or more values each."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return 0.0, float(len(a) + len(b) - 2)
    return se, float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))


def fit_design(seeds: list[list[Any]], values: list[list[float]]) -> Design:
    """The noise model for groups given as parallel lists of seeds and values per group."""
    k = len(values)
    means = np.array([float(np.mean(v)) if len(v) else math.nan for v in values])
    if k < 2:
        return Design("none", list(range(k)), means)
    two_way = _two_way(seeds, values)
    if two_way is not None:
        return two_way
    members = [i for i in range(k) if len(values[i]) >= 2]
    if len(members) < 2:
        return Design("none", members, means)
    return Design("welch", members, means, values=[np.asarray(v, float) for v in values])


def _two_way(seeds: list[list[Any]], values: list[list[float]]) -> Design | None:
    """OLS of ``value ~ C(config) + C(seed)`` (treatment coding); None when the fit is not
    identifiable, leaves no residual degree of freedom, or no seed is shared."""
    all_seeds = sorted({s for ss in seeds for s in ss}, key=str)
    shared = any(sum(s in set(ss) for ss in seeds) >= 2 for s in all_seeds)
    members = [i for i, v in enumerate(values) if len(v)]
    if not shared or len(members) < 2:
        return None
    col = {s: j for j, s in enumerate(all_seeds)}
    k, n_seeds = len(members), len(all_seeds)
    rows, y = [], []
    for pos, i in enumerate(members):
        for s, v in zip(seeds[i], values[i]):
            x = np.zeros(1 + (k - 1) + (n_seeds - 1))
            x[0] = 1.0
            if pos:
                x[pos] = 1.0
            if col[s]:
                x[k - 1 + col[s]] = 1.0
            rows.append(x)
            y.append(v)
    X, y = np.array(rows), np.array(y, float)
    if len(y) - X.shape[1] < 1 or np.linalg.matrix_rank(X) < X.shape[1]:
        return None
    fit = OLS(y, X).fit()
    effects = np.full(len(values), math.nan)
    cov = np.zeros((len(values), len(values)))
    params, cp = np.asarray(fit.params), np.asarray(fit.cov_params())
    for pos, i in enumerate(members):
        effects[i] = params[pos] if pos else 0.0
        for pos2, j in enumerate(members):
            if pos and pos2:
                cov[i, j] = cp[pos, pos2]
    sets = {frozenset(seeds[i]) for i in members}
    balanced = len(sets) == 1
    return Design(
        "two-way",
        members,
        effects,
        balanced=balanced,
        sigma=math.sqrt(max(float(fit.scale), 0.0)),
        df=float(fit.df_resid),
        cov=cov,
    )


# ----------------------------------------------------------------------------- comparisons


@dataclass
class Bound:
    """One configuration against the best of the others (Hsu's MCB), in the metric's units."""

    reference: int
    """index of the best of the other configurations (by the design's estimates)"""
    diff: float
    """estimate of this configuration minus the reference"""
    lower: float
    """simultaneous 95% bound of (this - the best of the others) in the better direction:
    how much worse it can be (negative) at most"""
    upper: float
    """the other end: how much better it can be at most"""
    critical: float
    """the critical value used (Dunnett's or Bonferroni's)"""


def mcb(design: Design, sign: float, alpha: float) -> dict[int, Bound]:
    """Hsu's multiple comparisons with the best: for every configuration ``i`` of the family,
    simultaneous one-sided bounds of ``mu_i - max_{j != i} mu_j`` (signed so that positive is
    better): ``lower_i = min_j(d_ij - c * se_ij)``, ``upper_i = min_j(d_ij + c * se_ij)``, with
    ``c`` Dunnett's one-sided constant for ``k - 1`` comparisons when every configuration ran the
    same seeds under the two-way model, else the Bonferroni t at ``alpha / (k - 1)``. For a given
    noise estimate, adding a configuration can only lower a bound (one more term in the minimum,
    a larger constant); under the two-way model the added configuration also changes the pooled
    residual variance and its degrees of freedom, which can move the bounds either way."""
    members = design.members
    m = len(members) - 1
    out: dict[int, Bound] = {}
    if m < 1 or design.kind == "none":
        return out
    for i in members:
        lower = upper = math.inf
        crit_used = 0.0
        for j in members:
            if j == i:
                continue
            diff, se, df = design.pair(i, j)
            crit = (
                dunnett_critical(m, df, alpha)
                if design.kind == "two-way" and design.balanced
                else bonferroni_critical(m, df, alpha)
            )
            crit_used = max(crit_used, crit)
            lower = min(lower, sign * diff - crit * se)
            upper = min(upper, sign * diff + crit * se)
        ref = max((j for j in members if j != i), key=lambda j: sign * design.effects[j])
        out[i] = Bound(ref, float(design.effects[i] - design.effects[ref]), lower, upper, crit_used)
    return out


def two_sided_p(design: Design, i: int, j: int) -> tuple[float, float]:
    """(estimate of effect_i - effect_j, two-sided p-value of "no difference") under the design;
    with no spread at all the estimate decides: p = 0 when it is not 0, else 1."""
    diff, se, df = design.pair(i, j)
    if se == 0:
        return diff, (0.0 if diff != 0 else 1.0)
    return diff, float(2 * sps.t.sf(abs(diff) / se, df))


def seeds_needed(
    sd_pair: float, margin: float, m: int, *, two_way: bool, alpha: float = 0.05, power: float = 0.8
) -> int | None:
    """Seeds per configuration for the bound of two truly equal configurations to clear
    ``-margin`` with probability ``power``, when one seed's paired difference has standard
    deviation ``sd_pair`` and ``m + 1`` configurations are compared; None beyond 1000."""
    if margin <= 0 or not math.isfinite(sd_pair):
        return None
    if sd_pair == 0:
        return 2
    for n in range(2, 1001):
        df = float(m * (n - 1)) if two_way else float(2 * n - 2)
        crit = bonferroni_critical(m, df, alpha)  # an "about": slightly above Dunnett's
        if (crit + float(sps.t.ppf(power, df))) * sd_pair / math.sqrt(n) <= margin:
            return n
    return None


def pair_sd(design: Design, i: int, j: int) -> float:
    """Standard deviation of one seed's difference between groups ``i`` and ``j``."""
    if design.kind == "two-way":
        return float(design.sigma) * math.sqrt(2)
    a, b = design.values[i], design.values[j]
    return math.sqrt(np.var(a, ddof=1) + np.var(b, ddof=1))


# ----------------------------------------------------------------------------- costs


def cost_order(
    candidates: list[int],
    costs: list[np.ndarray],
    *,
    tie_keys: list[tuple],
    alpha: float = 0.05,
) -> tuple[int | None, list[int]]:
    """The cheapest candidate, and the candidates tied with it.

    ``costs[i]``: the cost of group ``i`` per trial (empty: not measured). A cost that is the
    same in every trial of every candidate (parameters, rank, adapter bytes) is exact: the lowest
    wins, ties only on equal values. A cost that varies between trials (seconds, measured memory)
    is noisy: the candidates whose difference to the cheapest is within its two-sided 95% Welch
    interval (from the measured spread) count as tied. Ties go to the smallest ``tie_keys[i]``
    (e.g. trainable parameters, rank, minus the metric).
    """
    if not candidates:
        return None, []
    measured = [i for i in candidates if len(costs[i])]
    if not measured:
        best = min(candidates, key=lambda i: tie_keys[i])
        return best, [i for i in candidates if i != best]
    mean = {i: float(np.mean(costs[i])) for i in measured}
    cheapest = min(measured, key=lambda i: (mean[i], tie_keys[i]))
    tied = [cheapest]
    for i in measured:
        if i == cheapest:
            continue
        if _same_cost(costs[cheapest], costs[i], alpha):
            tied.append(i)
    best = min(tied, key=lambda i: tie_keys[i])
    return best, [i for i in tied if i != best]


def _same_cost(a: np.ndarray, b: np.ndarray, alpha: float) -> bool:
    """Equal values; or, for costs with a measured spread, a 95% Welch interval of the
    difference that contains 0."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return bool(a[0] == b[0])
    if len(a) < 2 or len(b) < 2:
        return False
    se, df = welch_se_df(a, b)
    return abs(float(a.mean() - b.mean())) <= float(sps.t.ppf(1 - alpha / 2, df)) * se

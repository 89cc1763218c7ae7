"""Statistics over a table of trials: per-configuration groups, tests against the best
configuration, and the recommendation with its reasons.

Pure functions over a pandas DataFrame (one row per trial, see ``records.py`` for the metric
columns). No torch import. The seed is a blocking factor: configurations that share seeds are
compared with a paired t-test on the common seeds, otherwise with Welch's t-test
(``compare.compare``); p-values are Holm-adjusted across the comparisons with the best
configuration.

Reading the table and the descriptive summaries live in ``tables``, the words (flags, reason,
the plain-text table) in ``explain``; their public names are importable from here as well.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from lorasweep.analysis import explain
from lorasweep.analysis.compare import (  # noqa: F401 - MIN_PAIRS re-exported
    ALPHA,
    MIN_PAIRS,
    MIN_SEEDS_FOR_EQUIVALENCE,
    Comparison,
    Group,
    compare,
    holm,
    json_scalar,
    key_scalar,
)
from lorasweep.analysis.explain import format_analysis, group_label
from lorasweep.analysis.tables import (
    by_columns,
    ci95,
    describe,
    load_trials_table,
    memory_column,
    prepare_trials,
    problem_trials,
    summary_table,
)
from lorasweep.analysis.units import fmt_num  # noqa: F401 - re-exported (stats.fmt_num)
from lorasweep.records import HIGHER_IS_BETTER, default_metric

__all__ = [
    "analyze",
    "ci95",
    "describe",
    "format_analysis",
    "group_label",
    "load_trials_table",
    "memory_column",
    "prepare_trials",
    "problem_trials",
    "resolve_direction",
    "resolve_metric",
    "summary_table",
]

# Measured costs (seconds, bytes) closer than this fraction of the cheapest candidate are a tie:
# wall time on a shared machine jitters by more than the real difference between small ranks.
# Ties go to the configuration with fewer trainable parameters (then the lower rank).
COST_TIE = 0.10
# Below this many pairs a rank test (Wilcoxon signed-rank) cannot reach p < 0.05 two-sided.
MIN_N_RANK_TEST = 6
COST_COLUMNS = (
    "train_seconds",
    "trainable_params",
    "peak_gpu_allocated_bytes",
    "peak_cpu_rss_bytes",
)
_METRIC_ORDER = ("accuracy", "f1", "perplexity", "eval_loss", "train_loss")
_DIRECTIONS = {
    "higher": "higher",
    "max": "higher",
    "maximize": "higher",
    "lower": "lower",
    "min": "lower",
    "minimize": "lower",
}
_LOWER_HINTS = ("loss", "perplexity", "ppl", "error", "seconds", "bytes", "time")


# ----------------------------------------------------------------------------- choices


def _choose_metric(df: pd.DataFrame, metric: str | None) -> str:
    if metric is not None:
        if metric not in df:
            raise ValueError(f"metric: {metric!r} is not a column of the trials table")
        return metric
    task = df["task"].dropna().iloc[0] if "task" in df and df["task"].notna().any() else None
    preferred = default_metric(task)
    for m in ([preferred] if preferred else []) + list(_METRIC_ORDER):
        if m in df and pd.to_numeric(df[m], errors="coerce").notna().any():
            return m
    raise ValueError(f"metric: none given and no known metric column ({', '.join(_METRIC_ORDER)})")


def _choose_direction(metric: str, direction: str | None) -> tuple[str, bool]:
    """Return ("higher"|"lower", assumed?)."""
    if direction is not None:
        d = _DIRECTIONS.get(str(direction).lower())
        if d is None:
            raise ValueError(f"direction: {direction!r} must be 'higher' or 'lower'")
        return d, False
    if metric in HIGHER_IS_BETTER:
        return ("higher" if HIGHER_IS_BETTER[metric] else "lower"), False
    lower = any(h in metric.lower() for h in _LOWER_HINTS)
    return ("lower" if lower else "higher"), True


def resolve_metric(trials: pd.DataFrame, metric: str | None = None) -> str:
    """The metric ``analyze`` would use: ``metric`` if given (checked), else the task's default."""
    return _choose_metric(prepare_trials(trials), metric)


def resolve_direction(metric: str, direction: str | None = None) -> str:
    """ "higher" or "lower": ``direction`` normalised, else the metric's known or guessed one."""
    return _choose_direction(metric, direction)[0]


def _choose_cost(df: pd.DataFrame, cost: str | None) -> str | None:
    if cost is not None:
        if cost not in df:
            raise ValueError(f"cost: {cost!r} is not a column of the trials table")
        return cost
    for c in (*COST_COLUMNS, "rank"):
        if c in df and pd.to_numeric(df[c], errors="coerce").notna().any():
            return c
    return None


# ----------------------------------------------------------------------------- groups


def _groups(
    df: pd.DataFrame, metric: str, cols: list[str], cost: str | None, mem: str | None
) -> list[Group]:
    out = []
    for key, g in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        v = g[metric].to_numpy(float)
        seeds = [json_scalar(s) for s in g["seed"]]
        _refuse_repeated_seeds(seeds, dict(zip(cols, key)), cols)
        ci = ci95(v)
        cost_v = pd.to_numeric(g[cost], errors="coerce").mean() if cost else np.nan
        mem_v = pd.to_numeric(g[mem], errors="coerce").max() if mem else np.nan
        out.append(
            Group(
                key={c: key_scalar(k) for c, k in zip(cols, key)},
                n=len(v),
                mean=float(v.mean()),
                std=float(v.std(ddof=1)) if len(v) > 1 else None,
                ci95=[ci[0], ci[1]] if ci else None,
                cost=json_scalar(cost_v),
                seeds=seeds,
                values=[float(x) for x in v],
                mem=json_scalar(mem_v),
                params=_column_mean(g, "trainable_params"),
                rank=_column_mean(g, "rank"),
            )
        )
    return out


def _column_mean(g: pd.DataFrame, column: str) -> float | None:
    if column not in g:
        return None
    return json_scalar(pd.to_numeric(g.get(column), errors="coerce").mean())


def _refuse_repeated_seeds(seeds: list, key: dict, cols: list[str]) -> None:
    """A seed twice in one configuration means its rows differ in something ``by`` does not
    name (another max_steps, another data file): pooling them would report one configuration
    made of two experiments, and pair seeds wrongly."""
    seen: set = set()
    for s in seeds:
        if s in seen:
            raise ValueError(
                f"by: configuration {group_label(key)} has seed {s} more than once, so its rows "
                f"differ in a setting that the grouping ({','.join(cols)}) does not name; add "
                "that column to --by, or analyze the experiments apart"
            )
        seen.add(s)


def _test_name(c: Comparison) -> str:
    """How ``analyze`` names the test of a group against the best."""
    if c.design == "paired":
        name = f"paired t ({c.n_common} seeds)"
        if c.n_common < MIN_N_RANK_TEST:
            name += f"; n<{MIN_N_RANK_TEST}, too few for Wilcoxon"
        return name
    if c.design == "welch":
        common = f"only {c.n_common} common seeds" if c.n_common else "seeds differ"
        return f"Welch t ({common})"
    return "none (single seed)"


def _test_against_best(groups: list[Group], best: Group, sign: float, alpha: float) -> None:
    """Two-sided test of every other group against the best, Holm-adjusted across them."""
    best.test = "best"
    tested = []
    for g in groups:
        if g is best:
            continue
        c = compare(best.by_seed(), g.by_seed())
        g.p_value, g.test = c.p_value, _test_name(c)
        if g.p_value is not None:
            tested.append(g)
    if tested:
        adj = holm([g.p_value for g in tested], alpha)[1]
        for g, p in zip(tested, adj):
            g.p_adjusted = p
            g.significantly_worse = bool(p < alpha and sign * (g.mean - best.mean) < 0)


def _pooled_std(a: Group, b: Group) -> float:
    """sqrt of the mean of the two variances; 0 when either has a single seed."""
    if a.std is None or b.std is None:
        return 0.0
    return math.sqrt((a.std**2 + b.std**2) / 2)


def _accept(
    groups: list[Group], best: Group, sign: float, tolerance: float | None, budget_gb: float | None
) -> None:
    """Mark each group acceptable (``ok``), held back on too few seeds (``underpowered``) and
    within the memory budget (``fits``)."""
    for g in groups:
        within = tolerance is not None and sign * (best.mean - g.mean) <= tolerance
        powered = min(g.n, best.n) >= MIN_SEEDS_FOR_EQUIVALENCE
        measured_worse = sign * (best.mean - g.mean) > _pooled_std(g, best)
        not_worse = g is best or (
            g.p_adjusted is not None
            and not g.significantly_worse
            and (powered or not measured_worse)
        )
        g.ok = bool(within or not_worse)
        g.underpowered = bool(
            g is not best and not powered and g.p_adjusted is not None and measured_worse
        )
        g.fits = budget_gb is None or g.mem is None or g.mem <= budget_gb * 1024**3


def _cheapest(candidates: list[Group], sign: float) -> Group | None:
    """The cheapest candidate; costs within COST_TIE of the cheapest count as equal, and
    equal costs go to fewer trainable parameters, then the lower rank, then the better mean."""
    if not candidates:
        return None
    costs = [g.cost for g in candidates if g.cost is not None]
    floor = min(costs) if costs else None

    def key(g: Group) -> tuple:
        c = g.cost if g.cost is not None else math.inf
        tied = floor is not None and c <= floor * (1 + COST_TIE) + 1e-12
        nan_last = lambda v: v if v is not None and v == v else math.inf  # noqa: E731
        return (floor if tied else c, nan_last(g.params), nan_last(g.rank), -sign * g.mean)

    return min(candidates, key=key)


# ----------------------------------------------------------------------------- analyze


def _check_options(tolerance: float | None, memory_budget_gb: float | None) -> None:
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance: {tolerance!r} must be a non-negative number")
    if memory_budget_gb is not None and not (
        isinstance(memory_budget_gb, (int, float)) and memory_budget_gb > 0
    ):
        raise ValueError(f"memory_budget_gb: {memory_budget_gb!r} must be a positive number")


def analyze(
    trials: pd.DataFrame,
    *,
    metric: str | None = None,
    direction: str | None = None,
    by: str | list[str] | None = None,
    cost: str | None = None,
    tolerance: float | None = None,
    memory_budget_gb: float | None = None,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Compare configurations and recommend one.

    Args:
        trials: one row per trial (see module docstring of ``records.py`` for metric columns).
        metric: column to compare; default the task's (``records.default_metric``: accuracy for
            classification, perplexity for causal-lm).
        direction: "higher" or "lower" is better; default from the metric's name.
        by: grouping columns; default ``["variant", "rank"]``.
        cost: column to minimise; default ``train_seconds`` (then params, memory, rank).
        tolerance: a configuration within this absolute distance of the best mean (metric
            units) is acceptable even if significantly worse.
        memory_budget_gb: exclude configurations whose peak memory (GPU allocated if measured,
            else CPU RSS) exceeds this many GiB.
        alpha: significance level of the Holm-adjusted tests.

    Returns:
        ``{"metric", "direction", "groups", "best", "recommended", "reason", "flags"}``,
        JSON-serializable (missing numbers are None).
    """
    _check_options(tolerance, memory_budget_gb)
    df = prepare_trials(trials)
    metric = _choose_metric(df, metric)
    direction, assumed = _choose_direction(metric, direction)
    cols = by_columns(df, by)
    cost = _choose_cost(df, cost)
    mem = memory_column(df)
    df[metric] = pd.to_numeric(df[metric], errors="coerce").astype(float)
    sign = 1.0 if direction == "higher" else -1.0

    flags = explain.trial_flags(df, metric, cols)
    if assumed:
        flags.append(
            f"Direction of {metric!r} assumed {direction!r} is better; pass direction= to override."
        )
    usable = df[(df["status"] == "complete") & np.isfinite(df[metric])]
    groups = _groups(usable, metric, cols, cost, mem)
    if not groups:
        return {
            "metric": metric,
            "direction": direction,
            "groups": [],
            "best": None,
            "recommended": None,
            "reason": f"No complete trial has a finite {metric}.",
            "flags": flags,
        }

    replicated = [g for g in groups if g.n >= 2] or groups
    best = max(replicated, key=lambda g: (sign * g.mean, -(g.cost or math.inf)))
    _test_against_best(groups, best, sign, alpha)
    _accept(groups, best, sign, tolerance, memory_budget_gb)
    candidates = [g for g in groups if g.ok and g.fits]
    recommended = _cheapest(candidates, sign)

    flags += explain.group_flags(groups, best, metric, cols)
    if memory_budget_gb is not None and mem is None:
        flags.append("A memory budget was given but no memory was measured; it was not applied.")
    ctx = explain.Context(metric, direction, cost, mem, tolerance, memory_budget_gb, alpha)
    reason = explain.reason(groups, best, recommended, ctx)
    reason += _more_reasons(groups, recommended, candidates)
    return {
        "metric": metric,
        "direction": direction,
        "groups": [g.to_dict() for g in groups],
        "best": best.to_dict(),
        "recommended": recommended.to_dict() if recommended is not None else None,
        "reason": reason,
        "flags": flags,
    }


def _more_reasons(groups: list[Group], recommended: Group | None, candidates: list[Group]) -> str:
    """The reason's last sentences: who was held back on too few seeds, and a cost tie."""
    out = ""
    held_back = [g for g in groups if g.underpowered and g is not recommended]
    if held_back:
        out += (
            f" Not accepted as equivalent on too few seeds (with fewer than "
            f"{MIN_SEEDS_FOR_EQUIVALENCE} seeds a non-significant test is no evidence of being as "
            "good, and these measured worse by more than one standard deviation): "
            + ", ".join(group_label(g.key) for g in held_back)
            + ". Run more seeds, or pass a tolerance."
        )
    cheapest = min((g.cost for g in candidates if g.cost is not None), default=None)
    if recommended is not None and cheapest is not None and (recommended.cost or 0) > cheapest:
        out += (
            f" Costs within {COST_TIE:.0%} of the cheapest ({cheapest:.4g}) count as equal;"
            " the tie went to fewer trainable parameters."
        )
    return out

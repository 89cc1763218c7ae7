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

import json
import warnings
from typing import Any

import numpy as np
import pandas as pd

from lorasweep.analysis import explain, factors
from lorasweep.analysis import flags as flags_mod
from lorasweep.analysis import recommend as recommend_mod
from lorasweep.analysis import tune as tune_mod
from lorasweep.analysis.compare import (  # noqa: F401 - MIN_PAIRS re-exported
    ALPHA,
    MIN_PAIRS,
    Group,
    holm,
    json_scalar,
    key_scalar,
)
from lorasweep.analysis.decision import Margin, default_margin, is_proportion, parse_margin
from lorasweep.analysis.explain import group_label
from lorasweep.analysis.tables import (
    SEEDS_FROM_ROWS,
    by_columns,
    ci95,
    column_mean,
    column_notes,
    describe,
    load_trials_table,
    memory_column,
    prepare_trials,
    problem_trials,
    summary_table,
)
from lorasweep.analysis.text import format_analysis
from lorasweep.analysis.units import fmt_num  # noqa: F401 - re-exported (stats.fmt_num)
from lorasweep.records import (
    TEST_PREFIX,
    default_metric,
    guess_direction,
    selection_metric,
    test_metric,
)

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


# ----------------------------------------------------------------------------- choices


def _choose_metric(df: pd.DataFrame, metric: str | None) -> str:
    """``metric`` (checked), else the task's default metric, measured on the test split when
    the table has one (``test_accuracy`` with finite values), else on the eval split."""
    if metric is not None:
        if metric not in df:
            raise ValueError(f"metric: {metric!r} is not a column of the trials table")
        return metric
    task = df["task"].dropna().iloc[0] if "task" in df and df["task"].notna().any() else None
    preferred = default_metric(task)
    for m in ([preferred] if preferred else []) + list(_METRIC_ORDER):
        for column in (test_metric(m), m):
            if column in df and pd.to_numeric(df[column], errors="coerce").notna().any():
                return column
    raise ValueError(f"metric: none given and no known metric column ({', '.join(_METRIC_ORDER)})")


def _test_split_sentence(metric: str, given: str | None) -> list[str]:
    """Says that the default metric was taken from the test split."""
    if given is not None or not metric.startswith(TEST_PREFIX):
        return []
    return [
        f"Compared on {metric}, the test split (no metric was named and the trials have one); "
        f"name the metric {selection_metric(metric)!r} to compare on the validation split."
    ]


def _choose_direction(metric: str, direction: str | None) -> tuple[str, bool]:
    """Return ("higher"|"lower", assumed?)."""
    if direction is not None:
        d = _DIRECTIONS.get(str(direction).lower())
        if d is None:
            raise ValueError(f"direction: {direction!r} must be 'higher' or 'lower'")
        return d, False
    return guess_direction(metric)


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
    proportion = _is_proportion(metric, df[metric])
    out = []
    for key, g in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        v = g[metric].to_numpy(float)
        seeds = [json_scalar(s) for s in g["seed"]]
        _refuse_repeated_seeds(seeds, dict(zip(cols, key)), cols)
        ci = _clip(ci95(v), proportion)
        cost_all = pd.to_numeric(g[cost], errors="coerce").to_numpy(float) if cost else []
        cost_v = np.nanmean(cost_all) if len(cost_all) and np.isfinite(cost_all).any() else np.nan
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
                costs=[float(x) for x in cost_all if np.isfinite(x)],
                outcomes=_outcomes(g, seeds, _outcomes_column(metric)),
                mem=json_scalar(mem_v),
                params=column_mean(g, "trainable_params"),
                rank=column_mean(g, "rank"),
            )
        )
    return out


def _is_proportion(metric: str, values: pd.Series) -> bool:
    """A proportion by name (accuracy, F1, ...) with every value in [0, 1]: its intervals are
    clipped to [0, 1]. A loss below 1 is not a proportion."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    return is_proportion(metric) and bool(len(v)) and bool(((v >= 0) & (v <= 1)).all())


def _clip(ci: tuple[float, float] | None, proportion: bool) -> list[float] | None:
    if ci is None:
        return None
    return [max(ci[0], 0.0), min(ci[1], 1.0)] if proportion else [ci[0], ci[1]]


def _outcomes_column(metric: str) -> str:
    """Where the per-example outcomes of the metric's split are: test or eval."""
    return "test_outcomes" if metric.startswith(TEST_PREFIX) else "eval_outcomes"


def _outcomes(g: pd.DataFrame, seeds: list, column: str = "eval_outcomes") -> dict:
    """seed -> stored per-example outcomes (dicts; JSON text from a CSV is parsed)."""
    if column not in g:
        return {}
    out = {}
    for s, o in zip(seeds, g[column]):
        if isinstance(o, str) and o.startswith("{"):
            try:
                o = json.loads(o)
            except ValueError:
                continue
        if isinstance(o, dict):
            out[s] = o
    return out


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


# ----------------------------------------------------------------------------- analyze


def _check_options(memory_budget_gb: float | None) -> None:
    if memory_budget_gb is not None and not (
        isinstance(memory_budget_gb, (int, float)) and memory_budget_gb > 0
    ):
        raise ValueError(f"memory_budget_gb: {memory_budget_gb!r} must be a positive number")


def _margin_option(margin: Any, tolerance: Any) -> Margin | None:
    if tolerance is not None:
        if margin is not None:
            raise ValueError("tolerance: use margin; both were given")
        warnings.warn("tolerance= is deprecated: use margin=", DeprecationWarning, stacklevel=3)
        return parse_margin(tolerance, "tolerance")
    return parse_margin(margin)


def _grouping(
    df: pd.DataFrame, by: Any, tune: Any, select_on: str | None
) -> tuple[list[str], list[str]]:
    """(outer columns, tuned columns): ``by`` (default: variant, rank and the varying
    settings) without the tuned settings, and the tuned ones (checked)."""
    tuned = tune_mod.tune_option(tune)
    tune_mod.check_tuned(df, tuned, None if by is None else by_columns(df, by))
    if select_on is not None and not tuned:
        raise ValueError(f"select_on: {select_on!r} is used only with tune")
    outer = [c for c in by_columns(df, by) if c not in tuned]
    return outer, tuned


def _nested_selection(
    df: pd.DataFrame, metric: str, direction: str, outer: list[str], tuned: list[str],
    select_on: str | None, cost: str | None,
) -> tuple[pd.DataFrame, tune_mod.Tuning]:  # fmt: skip
    """The rows of the tuned values chosen per configuration (``tune.select``)."""
    select_on, same = tune_mod.resolve_select_on(df, metric, select_on)
    sel_dir = tune_mod.select_direction(select_on, metric, direction)
    kept, configs = tune_mod.select(df, outer, tuned, select_on, sel_dir, cost)
    return kept, tune_mod.Tuning(tuned, select_on, sel_dir, same, metric, configs)


def analyze(
    trials: pd.DataFrame,
    *,
    metric: str | None = None,
    direction: str | None = None,
    by: str | list[str] | None = None,
    cost: str | None = None,
    margin: float | str | None = None,
    memory_budget_gb: float | None = None,
    alpha: float = ALPHA,
    tolerance: float | None = None,
    tune: str | list[str] | None = None,
    select_on: str | None = None,
) -> dict[str, Any]:
    """Compare configurations and recommend one (docs/report.md explains the rule).
    # long: one step per line of the rule, in its order; the steps live in ``recommend``

    The recommendation is the cheapest configuration whose simultaneous 95% bound of its
    difference to the best of the others (Hsu's multiple comparisons with the best) is within
    ``margin`` of it, among the replicated, stable configurations that learned and fit the
    memory budget. The noise comes from a two-way model (configuration + seed) when the
    configurations share seeds, else from Welch's t per pair. None when the evidence is too thin.

    Args:
        trials: one row per trial (see ``records.py`` for the metric columns).
        metric: column to compare; default the task's (accuracy; perplexity for causal-lm), on
            the test split when the trials have one (``test_accuracy``).
        direction: "higher" or "lower" is better; default from the metric's name.
        by: grouping columns; default ``variant``, ``rank`` and every setting that varies
            (``settings.setting_columns``).
        cost: column to minimise; default ``train_seconds`` (then params, memory, rank).
        margin: how much worse than the best is still good enough: metric units (``0.01``), or
            a percentage of the best mean (``"2%"``); default per metric (``default_margin``).
        memory_budget_gb: exclude configurations whose peak memory (GPU allocated if measured,
            else CPU RSS) exceeds this many GiB.
        alpha: 1 - the confidence level of the bounds; the level of the Holm-adjusted tests.
        tolerance: deprecated alias of an absolute ``margin``.
        tune: settings chosen per configuration of the others (nested selection, ``tune.py``):
            ``["learning_rate"]`` or ``"learning_rate,warmup_steps"``.
        select_on: the column the tuned value is chosen on; default the validation metric of a
            test metric (``accuracy`` for ``test_accuracy``), else the metric itself (then
            ``tuning.same_data`` is true and a flag warns of the winner's curse).

    Returns:
        ``{"metric", "direction", "margin", "design", "groups", "best", "recommended",
        "criterion", "seeds_needed", "reason", "flags", "tuning", "factors", "interaction"}``,
        JSON-serializable.
    """
    given = _margin_option(margin, tolerance)
    _check_options(memory_budget_gb)
    df = prepare_trials(trials)
    named_metric, metric = metric, _choose_metric(df, metric)
    direction, assumed = _choose_direction(metric, direction)
    outer, tuned = _grouping(df, by, tune, select_on)
    cols = outer + tuned
    cost = _choose_cost(df, cost)
    mem = memory_column(df)
    df[metric] = pd.to_numeric(df[metric], errors="coerce").astype(float)
    sign = 1.0 if direction == "higher" else -1.0

    # a table made elsewhere: say which columns were read under the analysis's names
    flags = [n[0].upper() + n[1:] + "." for n in column_notes(df)]
    flags += flags_mod.trial_flags(df, metric, cols)
    if assumed:
        flags.append(
            f"Direction of {metric!r} assumed {direction!r} is better; pass direction= to override."
        )
    measured = df[(df["status"] == "complete") & np.isfinite(df[metric])]
    tuning = None
    if tuned:
        df, tuning = _nested_selection(df, metric, direction, outer, tuned, select_on, cost)
        if tuning.same_data:
            flags.append(tune_mod.same_data_warning(tuning))
    usable = df[(df["status"] == "complete") & np.isfinite(df[metric])]
    groups = _groups(usable, metric, cols, cost, mem)
    margin_ = given or default_margin(metric, usable[metric].tolist())
    out: dict[str, Any] = {"metric": metric, "direction": direction, "cost": cost}
    extra = {"tuning": tuning.to_dict() if tuning else None,
             "factors": factors.summary(measured, metric, cols, sign)}  # fmt: skip
    if not groups:
        return {**out, "margin": None, "design": None, "groups": [], "best": None,
                "recommended": None, "criterion": None, "seeds_needed": None,
                "reason": f"No complete trial has a finite {metric}.", "flags": flags,
                **extra, "interaction": None}  # fmt: skip

    paired = not df.attrs.get(SEEDS_FROM_ROWS)
    if not paired:
        flags.append(
            "No seed column: the rows of a configuration are not matched across configurations, "
            "so each pair is compared with Welch's t (add a seed column to use the blocking)."
        )
    design = recommend_mod.fit_noise(groups, margin_, sign, paired=paired)
    best = recommend_mod.fill_comparisons(groups, design, sign, alpha)
    margin_abs = margin_.absolute(best.mean)
    recommend_mod.assess_stability(groups, df, metric, cols)
    recommend_mod.mark_eligibility(groups, margin_abs, sign, memory_budget_gb)
    recommend_mod.eval_bootstrap(groups, selection_metric(metric))
    decision = recommend_mod.recommend(groups, design, sign, margin_abs, alpha)

    flags += flags_mod.group_flags(groups, best, metric, cols)
    if memory_budget_gb is not None and mem is None:
        flags.append("A memory budget was given but no memory was measured; it was not applied.")
    ctx = explain.Context(metric, direction, cost, mem, margin_, margin_abs, memory_budget_gb,
                          alpha, design, tuned=tuple(tuned))  # fmt: skip
    rec = decision.recommended
    answer = rec or best
    after = _test_split_sentence(metric, named_metric)
    after += tune_mod.sentences(tuning, rec.key if rec else None) if tuning else []
    return {
        **out,
        "margin": {
            "value": margin_.value,
            "relative": margin_.relative,
            "absolute": margin_abs,
            "default": not margin_.given,
        },  # fmt: skip
        "design": {
            "model": design.kind,
            "sigma": json_scalar(design.sigma),
            "df": json_scalar(design.df),
            "balanced": design.balanced,
            "outliers_left_out": sum(g.seeds_collapsed for g in groups),
        },  # fmt: skip
        "groups": [g.to_dict() for g in groups],
        "best": best.to_dict(),
        "recommended": rec.to_dict() if rec is not None else None,
        "criterion": decision.criterion,
        "seeds_needed": decision.seeds_needed,
        "reason": explain.reason(groups, best, decision, ctx, after),
        "flags": flags,
        **extra,
        "interaction": factors.interaction(measured, metric, cols, sign, tuned=tuned,
                                           answer=answer.key, recommended=rec is not None,
                                           threshold=margin_abs),
    }  # fmt: skip

"""Statistics over a table of trials: per-configuration summaries, tests against the best
configuration, and the recommendation with its reasons.

Pure functions over a pandas DataFrame (one row per trial, see ``results.py`` for the metric
columns). No torch import. The seed is a blocking factor: configurations that share seeds are
compared with a paired t-test on the common seeds, otherwise with Welch's t-test; p-values are
Holm-adjusted across the comparisons with the best configuration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from lorasweep.analysis import explain as advice
from lorasweep.analysis.explain import _key_value, _py, fmt_num, group_label
from lorasweep.records import HIGHER_IS_BETTER

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

ALPHA = 0.05
# Measured costs (seconds, bytes) closer than this fraction of the cheapest candidate are a tie:
# wall time on a shared machine jitters by more than the real difference between small ranks.
# Ties go to the configuration with fewer trainable parameters (then the lower rank).
COST_TIE = 0.10
# "Not significantly worse" is evidence of being as good only when the test could have found a
# difference: with fewer seeds than this on either side, a configuration that measured worse by
# more than one pooled standard deviation is not accepted on a non-significant test alone (a
# tolerance can still accept it).
MIN_SEEDS_FOR_EQUIVALENCE = 3
# Below this many pairs a rank test (Wilcoxon signed-rank) cannot reach p < 0.05 two-sided.
MIN_N_RANK_TEST = 6
# A paired t on 2 seeds has 1 degree of freedom (critical t = 12.7): with fewer common seeds
# than this, Welch on all the values of both configurations is the more powerful test.
MIN_PAIRS = 3
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
_ID_COLUMNS = (
    "trial_id",
    "status",
    "variant",
    "rank",
    "seed",
    "method",
    "alpha_policy",
    "alpha",
    "quantization",
    "task",
    "model",
    "error",
)


# ----------------------------------------------------------------------------- input


def prepare_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with the id columns the analysis needs, filling sensible defaults.

    Missing ``status`` -> "complete", ``variant`` -> "lora", ``rank`` -> NaN, ``seed`` -> the
    row order within its (variant, rank) configuration, ``trial_id`` -> "row<i>".
    """
    df = trials.copy().reset_index(drop=True)
    if "status" not in df:
        df["status"] = "complete"
    df["status"] = df["status"].fillna("complete").astype(str).str.lower()
    if "variant" not in df:
        df["variant"] = "lora"
    df["variant"] = df["variant"].fillna("lora").astype(str)
    df["rank"] = pd.to_numeric(df["rank"], errors="coerce") if "rank" in df else np.nan
    if "seed" not in df:
        df["seed"] = df.groupby(["variant", "rank"], dropna=False).cumcount()
    if "trial_id" not in df:
        df["trial_id"] = [f"row{i}" for i in range(len(df))]
    if "error" not in df:
        df["error"] = None
    return df


def load_trials_table(path: str | Path) -> pd.DataFrame:
    """Read per-trial rows made elsewhere (CSV, or JSON) into a trials DataFrame.

    JSON may be a list of row objects, or ``{"trials": [{..., "metrics": {...}}]}`` as printed
    by ``lorasweep status --json`` (the ``metrics`` dict is flattened into columns).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"path: {str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        rows = data.get("trials") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(
                f"path: {str(path)!r} is neither a list of rows nor {{'trials': [...]}}"
            )
        flat = []
        for row in rows:
            row = dict(row)
            metrics = row.pop("metrics", None) or {}
            flat.append({**row, **metrics})
        df = pd.DataFrame(flat)
    else:
        df = pd.read_csv(path)
    return prepare_trials(df)


# ----------------------------------------------------------------------------- helpers


def _by_columns(df: pd.DataFrame, by: str | list[str] | None) -> list[str]:
    if by is None:
        return [c for c in ("variant", "rank") if c in df]
    cols = [by] if isinstance(by, str) else list(by)
    for c in cols:
        if c not in df:
            raise ValueError(f"by: {c!r} is not a column of the trials table")
    return cols


def _choose_metric(df: pd.DataFrame, metric: str | None) -> str:
    if metric is not None:
        if metric not in df:
            raise ValueError(f"metric: {metric!r} is not a column of the trials table")
        return metric
    task = df["task"].dropna().iloc[0] if "task" in df and df["task"].notna().any() else None
    preferred = {"classification": "accuracy", "causal-lm": "perplexity"}.get(task)
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


def memory_column(df: pd.DataFrame) -> str | None:
    """Peak GPU allocated bytes when measured, else peak CPU RSS, else None."""
    for c in ("peak_gpu_allocated_bytes", "peak_cpu_rss_bytes"):
        if c in df and pd.to_numeric(df[c], errors="coerce").notna().any():
            return c
    return None


def ci95(values: np.ndarray) -> tuple[float, float] | None:
    """Two-sided 95% t confidence interval of the mean; None below two values."""
    n = len(values)
    if n < 2:
        return None
    m, s = float(np.mean(values)), float(np.std(values, ddof=1))
    h = float(sps.t.ppf(0.975, n - 1)) * s / math.sqrt(n)
    return m - h, m + h


def describe(
    trials: pd.DataFrame,
    column: str,
    by: str | list[str] | None = None,
) -> pd.DataFrame:
    """n, mean, std and 95% CI of ``column`` per configuration over complete, finite rows.

    Returns one row per configuration with the ``by`` columns and ``n, mean, std, ci_lo, ci_hi``.
    """
    df = prepare_trials(trials)
    cols = _by_columns(df, by)
    vals = pd.to_numeric(df[column], errors="coerce") if column in df else np.nan
    ok = df.assign(_v=vals)
    ok = ok[(ok["status"] == "complete") & np.isfinite(ok["_v"].astype(float))]
    rows = []
    for key, g in ok.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        v = g["_v"].to_numpy(float)
        ci = ci95(v)
        rows.append(
            {
                **dict(zip(cols, key)),
                "n": len(v),
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
                "ci_lo": ci[0] if ci else np.nan,
                "ci_hi": ci[1] if ci else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=[*cols, "n", "mean", "std", "ci_lo", "ci_hi"])


def summary_table(
    trials: pd.DataFrame,
    metrics: list[str],
    by: str | list[str] | None = None,
) -> pd.DataFrame:
    """Mean and std of several metrics per configuration (complete trials only).

    Columns: the ``by`` columns, ``n`` (complete trials), ``n_total``, and ``<m>_mean``,
    ``<m>_std`` for every metric in ``metrics`` that is a column of ``trials``.
    """
    df = prepare_trials(trials)
    cols = _by_columns(df, by)
    rows = []
    for key, g in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        done = g[g["status"] == "complete"]
        row: dict[str, Any] = {**dict(zip(cols, key)), "n": len(done), "n_total": len(g)}
        for m in metrics:
            if m not in df:
                continue
            v = pd.to_numeric(done[m], errors="coerce").to_numpy(float)
            v = v[np.isfinite(v)]
            row[f"{m}_mean"] = float(v.mean()) if len(v) else np.nan
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def problem_trials(trials: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Trials that failed, ran out of memory, diverged or were pruned (and, given ``metric``,
    complete trials whose metric is NaN), with ``trial_id, variant, rank, seed, status, error``.
    """
    df = prepare_trials(trials)
    bad = df["status"].isin(["failed", "oom", "diverged", "pruned"])
    if metric and metric in df:
        nan_metric = (df["status"] == "complete") & ~np.isfinite(
            pd.to_numeric(df[metric], errors="coerce").astype(float)
        )
        df.loc[nan_metric, "status"] = f"complete ({metric} NaN)"
        bad |= nan_metric
    return df.loc[bad, ["trial_id", "variant", "rank", "seed", "status", "error"]]


# ----------------------------------------------------------------------------- tests


def _compare(best: dict, other: dict) -> tuple[float | None, str]:
    """Two-sided p-value of ``other`` vs ``best`` and the name of the test used."""
    sb, so = best["_seeds"], other["_seeds"]
    unique = len(set(sb)) == len(sb) and len(set(so)) == len(so)
    common = sorted(set(sb) & set(so)) if unique else []
    if len(common) >= MIN_PAIRS:
        b, o = dict(zip(sb, best["_values"])), dict(zip(so, other["_values"]))
        vo, vb = np.array([o[s] for s in common]), np.array([b[s] for s in common])
        name = f"paired t ({len(common)} seeds)"
        if len(common) < MIN_N_RANK_TEST:
            name += f"; n<{MIN_N_RANK_TEST}, too few for Wilcoxon"
    elif len(sb) >= 2 and len(so) >= 2:
        vo, vb = np.asarray(other["_values"]), np.asarray(best["_values"])
        name = (
            "Welch t (" + (f"only {len(common)} common seeds" if common else "seeds differ") + ")"
        )
    else:
        return None, "none (single seed)"
    spread = np.std(vo - vb) if name.startswith("paired") else np.std(vo) + np.std(vb)
    if spread == 0:  # t is 0/0 or +-inf: decide by the mean difference itself
        return (1.0 if vo.mean() == vb.mean() else 0.0), name
    if name.startswith("paired"):
        return float(sps.ttest_rel(vo, vb).pvalue), name
    return float(sps.ttest_ind(vo, vb, equal_var=False).pvalue), name


def _groups(
    df: pd.DataFrame, metric: str, cols: list[str], cost: str | None, mem: str | None
) -> list[dict]:
    out = []
    for key, g in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        v = g[metric].to_numpy(float)
        seeds = [_py(s) for s in g["seed"]]
        _refuse_repeated_seeds(seeds, dict(zip(cols, key)), cols)
        ci = ci95(v)
        cost_v = pd.to_numeric(g[cost], errors="coerce").mean() if cost else np.nan
        mem_v = pd.to_numeric(g[mem], errors="coerce").max() if mem else np.nan
        out.append(
            {
                "key": {c: _key_value(k) for c, k in zip(cols, key)},
                "n": len(v),
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else None,
                "ci95": [ci[0], ci[1]] if ci else None,
                "p_value": None,
                "p_adjusted": None,
                "test": None,
                "significantly_worse": False,
                "cost": _py(cost_v),
                "_seeds": seeds,
                "_values": [float(x) for x in v],
                "_mem": _py(mem_v),
                "_params": _py(pd.to_numeric(g.get("trainable_params"), errors="coerce").mean())
                if "trainable_params" in g
                else None,
                "_rank": _py(pd.to_numeric(g.get("rank"), errors="coerce").mean())
                if "rank" in g
                else None,
            }
        )
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


def _pooled_std(a: dict, b: dict) -> float:
    """sqrt of the mean of the two variances; 0 when either has a single seed."""
    if a["std"] is None or b["std"] is None:
        return 0.0
    return math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)


def _cheapest(candidates: list[dict], sign: float) -> dict | None:
    """The cheapest candidate; costs within COST_TIE of the cheapest count as equal, and
    equal costs go to fewer trainable parameters, then the lower rank, then the better mean."""
    if not candidates:
        return None
    costs = [g["cost"] for g in candidates if g["cost"] is not None]
    floor = min(costs) if costs else None

    def key(g: dict) -> tuple:
        c = g["cost"] if g["cost"] is not None else math.inf
        tied = floor is not None and c <= floor * (1 + COST_TIE) + 1e-12
        nan_last = lambda v: v if v is not None and v == v else math.inf  # noqa: E731
        return (
            floor if tied else c,
            nan_last(g["_params"]),
            nan_last(g["_rank"]),
            -sign * g["mean"],
        )

    return min(candidates, key=key)


def _public(g: dict | None) -> dict | None:
    if g is None:
        return None
    return {
        k: ([_py(x) for x in v] if isinstance(v, list) else _py(v)) if k != "key" else v
        for k, v in g.items()
        if not k.startswith("_")
    }


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
        trials: one row per trial (see module docstring of ``results.py`` for metric columns).
        metric: column to compare; default accuracy (classification), perplexity (causal-lm).
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
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance: {tolerance!r} must be a non-negative number")
    if memory_budget_gb is not None and not (
        isinstance(memory_budget_gb, (int, float)) and memory_budget_gb > 0
    ):
        raise ValueError(f"memory_budget_gb: {memory_budget_gb!r} must be a positive number")
    df = prepare_trials(trials)
    metric = _choose_metric(df, metric)
    direction, assumed = _choose_direction(metric, direction)
    cols = _by_columns(df, by)
    cost = _choose_cost(df, cost)
    mem = memory_column(df)
    df[metric] = pd.to_numeric(df[metric], errors="coerce").astype(float)
    sign = 1.0 if direction == "higher" else -1.0

    flags = advice.trial_flags(df, metric, cols)
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

    replicated = [g for g in groups if g["n"] >= 2] or groups
    best = max(replicated, key=lambda g: (sign * g["mean"], -(g["cost"] or math.inf)))
    best["test"] = "best"
    tested = []
    for g in groups:
        if g is best:
            continue
        g["p_value"], g["test"] = _compare(best, g)
        if g["p_value"] is not None:
            tested.append(g)
    if tested:
        adj = multipletests([g["p_value"] for g in tested], alpha=alpha, method="holm")[1]
        for g, p in zip(tested, adj):
            g["p_adjusted"] = float(p)
            g["significantly_worse"] = bool(p < alpha and sign * (g["mean"] - best["mean"]) < 0)

    for g in groups:
        within = tolerance is not None and sign * (best["mean"] - g["mean"]) <= tolerance
        powered = min(g["n"], best["n"]) >= MIN_SEEDS_FOR_EQUIVALENCE
        measured_worse = sign * (best["mean"] - g["mean"]) > _pooled_std(g, best)
        not_worse = g is best or (
            g["p_adjusted"] is not None
            and not g["significantly_worse"]
            and (powered or not measured_worse)
        )
        g["_ok"] = bool(within or not_worse)
        g["_underpowered"] = bool(
            g is not best and not powered and g["p_adjusted"] is not None and measured_worse
        )
        g["_fits"] = (
            memory_budget_gb is None or g["_mem"] is None or g["_mem"] <= memory_budget_gb * 1024**3
        )
    candidates = [g for g in groups if g["_ok"] and g["_fits"]]
    recommended = _cheapest(candidates, sign)

    flags += advice.group_flags(groups, best, metric, cols)
    if memory_budget_gb is not None and mem is None:
        flags.append("A memory budget was given but no memory was measured; it was not applied.")
    ctx = advice.Context(metric, direction, cost, mem, tolerance, memory_budget_gb, alpha)
    reason = advice.reason(groups, best, recommended, ctx)
    held_back = [g for g in groups if g.get("_underpowered") and g is not recommended]
    if held_back:
        reason += (
            f" Not accepted as equivalent on too few seeds (with fewer than "
            f"{MIN_SEEDS_FOR_EQUIVALENCE} seeds a non-significant test is no evidence of being as "
            "good, and these measured worse by more than one standard deviation): "
            + ", ".join(advice.group_label(g["key"]) for g in held_back)
            + ". Run more seeds, or pass a tolerance."
        )
    cheapest = min((g["cost"] for g in candidates if g["cost"] is not None), default=None)
    if recommended is not None and cheapest is not None and (recommended["cost"] or 0) > cheapest:
        reason += (
            f" Costs within {COST_TIE:.0%} of the cheapest ({cheapest:.4g}) count as equal;"
            " the tie went to fewer trainable parameters."
        )
    return {
        "metric": metric,
        "direction": direction,
        "groups": [_public(g) for g in groups],
        "best": _public(best),
        "recommended": _public(recommended),
        "reason": reason,
        "flags": flags,
    }


def format_analysis(result: dict[str, Any]) -> str:
    """Plain-text table of mean ± std per configuration, the recommendation and the flags."""
    metric, direction = result["metric"], result["direction"]
    best_key = (result.get("best") or {}).get("key")
    rec_key = (result.get("recommended") or {}).get("key")
    head = f"{metric} ({direction} is better); tests vs best, Holm-adjusted"
    rows = [("config", "n", "mean ± std", "95% CI", "p_adj", "cost", "")]
    for g in result["groups"]:
        ci = g["ci95"]
        mark = []
        if g["key"] == best_key:
            mark.append("best")
        if g["key"] == rec_key:
            mark.append("recommended")
        if g["significantly_worse"]:
            mark.append("worse")
        rows.append(
            (
                group_label(g["key"]),
                str(g["n"]),
                f"{fmt_num(g['mean'])} ± {fmt_num(g['std'])}",
                f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]" if ci else "-",
                fmt_num(g["p_adjusted"]),
                fmt_num(g["cost"]),
                ", ".join(mark),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [
        "",
        "Recommendation: " + (group_label(rec_key) if rec_key else "none"),
        result["reason"],
    ]
    if result["flags"]:
        lines += ["", "Flags:"] + [f"  - {f}" for f in result["flags"]]
    return "\n".join(lines)

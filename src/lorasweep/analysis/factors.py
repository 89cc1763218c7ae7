"""Marginal means of the factors a sweep varies, and their interaction in words.

A *factor* is a grouping column with more than one level among the complete trials (rank,
learning rate, variant, ...). The marginal mean of a level is the mean of the configuration
means at that level: each configuration's mean over its seeds first, then averaged over the
other factors' levels (an unweighted marginal mean, so a configuration with more seeds does not
weigh more). On a full grid with the same seeds everywhere this is the plain mean of the trials
at that level; on an unbalanced grid levels are averaged over different sets of the other
factors, and the summary says so.

The interaction is stated only where it changes the answer: with a tuned setting, when the
best configuration at the single best value of it differs from the tuned recommendation; without
one, when the best level of the first factor (rank) changes with another factor. Means only,
not tests: the decision itself is ``stats.analyze``'s. Pure pandas; no torch import.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lorasweep.analysis.compare import json_scalar, key_scalar
from lorasweep.analysis.explain import group_label
from lorasweep.analysis.settings import level_label, readable
from lorasweep.analysis.tune import config_phrase, per_phrase, tuned_phrase


def cell_means(usable: pd.DataFrame, metric: str, by: list[str]) -> pd.DataFrame:
    """One row per configuration (the ``by`` columns): ``mean`` and ``n`` of ``metric``."""
    if not by:
        return pd.DataFrame({"mean": [usable[metric].mean()], "n": [len(usable)]})
    g = usable.groupby(by, dropna=False, sort=True)[metric]
    return g.agg(mean="mean", n="count").reset_index()


def _levels(cells: pd.DataFrame, factor: str, sign: float) -> list[dict[str, Any]]:
    g = cells.groupby(factor, dropna=False, sort=True)
    rows = [
        {"level": key_scalar(level), "mean": float(part["mean"].mean()),
         "n": int(part["n"].sum()), "configs": len(part)}
        for level, part in g
    ]  # fmt: skip
    best = max(rows, key=lambda r: sign * r["mean"])
    for r in rows:
        r["best"] = r is best
    return rows


def summary(usable: pd.DataFrame, metric: str, by: list[str], sign: float) -> dict[str, Any]:
    """The marginal means of every factor that varies among ``usable`` (complete trials with a
    finite ``metric``), as ``{"by", "names", "balanced", "note", "marginal": {factor: [{"level",
    "mean", "n", "configs", "best"}]}}``; JSON-serializable."""
    out: dict[str, Any] = {"metric": metric, "by": list(by), "names": [], "balanced": True,
                           "note": None, "marginal": {}}  # fmt: skip
    if usable.empty:
        return out
    cells = cell_means(usable, metric, by)
    names = [c for c in by if cells[c].nunique(dropna=False) > 1]
    out["names"] = names
    if not names:
        return out
    full = math.prod(cells[c].nunique(dropna=False) for c in names)
    seeds_equal = cells["n"].nunique() == 1
    out["balanced"] = bool(len(cells) == full and seeds_equal)
    if not out["balanced"]:
        parts = []
        if len(cells) < full:
            parts.append(f"{len(cells)} of the {full} combinations of levels were measured")
        if not seeds_equal:
            parts.append(f"{cells['n'].min()} to {cells['n'].max()} seeds per configuration")
        out["note"] = (
            "The grid is unbalanced (" + ", ".join(parts) + "): a marginal mean averages the "
            "configurations measured at that level, so levels are compared over different sets "
            "of the other factors."
        )
    out["marginal"] = {f: _levels(cells, f, sign) for f in names}
    for rows in out["marginal"].values():
        for r in rows:
            r["mean"] = json_scalar(r["mean"])
    return out


def _best(cells: pd.DataFrame, sign: float) -> pd.Series:
    return cells.loc[(sign * cells["mean"]).idxmax()]


def _key(row: pd.Series, cols: list[str]) -> dict[str, Any]:
    return {c: key_scalar(row[c]) for c in cols}


def interaction(
    usable: pd.DataFrame,
    metric: str,
    by: list[str],
    sign: float,
    *,
    tuned: list[str] | None = None,
    answer: dict[str, Any] | None = None,
    recommended: bool = False,
    threshold: float = 0.0,
) -> str | None:
    """The interaction in words where it changes the answer, else None.

    With ``tuned``: the single value of the tuned setting(s) with the best marginal mean; if
    the best configuration at that value (among all trials, not only the chosen ones) differs
    from ``answer`` (the recommended tuned configuration, else the best) and beats it there by
    more than ``threshold`` (the margin), say both. Without: whether the best level of the
    first factor (rank when it varies) changes with another, where taking the best level of
    one column at another would cost more than ``threshold``.
    """
    if usable.empty:
        return None
    cells = cell_means(usable, metric, by)
    names = [c for c in by if cells[c].nunique(dropna=False) > 1]
    if tuned:
        return _tuned_interaction(cells, by, names, sign, tuned, answer, recommended, threshold)
    if len(names) < 2:
        return None
    first = "rank" if "rank" in names else names[0]
    out = []
    for other in (n for n in names if n != first):
        table = cells.groupby([first, other], dropna=False)["mean"].mean().reset_index()
        bests, means = [], {}
        for level, part in table.groupby(other, dropna=False, sort=True):
            top = _best(part, sign)
            means[level] = dict(zip(part[first], part["mean"]))
            bests.append((top[first], level))
        material = any(
            sign * (means[o][b] - means[o][b2]) > threshold
            for b, o in bests
            for b2, _ in bests
            if b2 in means[o]
        )
        if len({key_scalar(b) for b, _ in bests}) > 1 and material:
            bests = [(level_label(first, key_scalar(b)), level_label(other, key_scalar(o)))
                     for b, o in bests]  # fmt: skip
            out.append(
                f"The best {readable(first)} depends on the {readable(other)}: "
                + ", ".join(f"{b} at {o}" for b, o in bests)
                + " (means over seeds)."
            )
    return " ".join(out) or None


def _tuned_interaction(
    cells: pd.DataFrame,
    by: list[str],
    names: list[str],
    sign: float,
    tuned: list[str],
    answer: dict[str, Any] | None,
    recommended: bool,
    threshold: float,
) -> str | None:
    varying = [t for t in tuned if t in names]
    outer = [c for c in by if c not in tuned]
    if not varying or answer is None:
        return None
    per_value = cells.groupby(tuned, dropna=False, sort=True)["mean"].mean().reset_index()
    single = _key(_best(per_value, sign), tuned)
    at = cells
    for t in tuned:
        at = at[at[t].map(key_scalar) == single[t]]
    if at.empty:
        return None
    best_row = _best(at, sign)
    top = _key(best_row, outer)
    mine = {c: answer.get(c) for c in outer}
    if top == mine:
        return None
    same = at[[_key(r, outer) == mine for _, r in at.iterrows()]]
    if not same.empty and sign * (best_row["mean"] - same["mean"].iloc[0]) <= threshold:
        return None  # at that value the answer is as good: fixing it would not change it
    what = "single value" if len(tuned) == 1 else "single combination"
    per = per_phrase([_key(r, outer) for _, r in cells.iterrows()])
    verdict = "is as good (recommended)" if recommended else "measured best (no recommendation)"
    return (
        f"At {tuned_phrase(tuned, single)} (the best {what}) {group_label(top)} looks best; "
        f"tuned per {per}, {config_phrase(answer, tuned)} {verdict}."
    )

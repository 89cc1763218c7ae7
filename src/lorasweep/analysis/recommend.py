"""How ``stats.analyze`` decides: the comparisons with the best (from ``decision``), the
instability of each configuration (``stability``), the eval set's own sampling error
(``resample``), who is eligible and which one is recommended.

Works on the ``compare.Group`` records that ``stats`` builds; no torch import.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from lorasweep.analysis import stability
from lorasweep.analysis.compare import Group, holm, key_scalar
from lorasweep.analysis.decision import (
    Design,
    Margin,
    cost_order,
    fit_design,
    mcb,
    pair_sd,
    seeds_needed,
    two_sided_p,
)
from lorasweep.analysis.explain import Decision
from lorasweep.analysis.resample import bootstrap_diff
from lorasweep.analysis.tables import column_mean


def fit_noise(groups: list[Group], margin: Margin, sign: float, *, paired: bool = True) -> Design:
    """The noise model of the groups, with collapsed seeds (``stability.outlier_seeds``, beyond
    the margin of the best replicated mean) marked on each group and left out of the fit: one
    collapsed seed must not widen every configuration's interval. The group's mean, std and
    seeds stay as measured. ``paired=False`` (a table without a seed column, whose "seeds" are
    only row numbers): no seed is shared, so each pair is compared with Welch's t."""
    replicated = [g for g in groups if g.n >= 2] or groups
    margin_abs = margin.absolute(max(replicated, key=lambda g: sign * g.mean).mean)
    floor = stability.sweep_scale([g.values for g in groups])
    seeds, values = [], []
    for g in groups:
        out = stability.outlier_seeds(g.values, floor, margin_abs)
        g.seeds_collapsed = sum(out)
        seeds.append([s if paired else (id(g), s) for s, o in zip(g.seeds, out) if not o])
        values.append([v for v, o in zip(g.values, out) if not o])
    return fit_design(seeds, values)


def fill_comparisons(groups: list[Group], design: Design, sign: float, alpha: float) -> Group:
    """The best configuration; every group's MCB comparison with the best of the others and its
    two-sided test against the best (Holm-adjusted), all from the same estimates."""
    members = design.members
    replicated = [i for i in members if groups[i].n >= 2] or members or [0]
    b = max(replicated, key=lambda i: (sign * design.effects[i], -(groups[i].cost or math.inf)))
    best = groups[b]
    best.test = "best"
    bounds = mcb(design, sign, alpha)
    for i, bound in bounds.items():
        g = groups[i]
        g.reference = groups[bound.reference].key
        g.diff = bound.diff
        g.diff_bound = sign * bound.lower
        lo, hi = min(0.0, bound.lower), max(0.0, bound.upper)
        g.diff_ci = [lo, hi] if sign > 0 else [-hi, -lo]
    tested = []
    for i in members:
        g = groups[i]
        if g is best:
            continue
        g.test = _test_name(design, groups)
        diff, g.p_value = two_sided_p(design, i, b)
        tested.append((g, diff))
    if tested:
        adj = holm([g.p_value for g, _ in tested], alpha)[1]
        for (g, diff), p in zip(tested, adj):
            g.p_adjusted = p
            # the direction comes from the same estimate the test used
            g.significantly_worse = bool(p < alpha and sign * diff < 0)
    for g in groups:
        if g.test is None:
            g.test = "none (single seed)" if g.n < 2 else "none"
    return best


def _test_name(design: Design, groups: list[Group]) -> str:
    if design.kind == "two-way":
        seeds = len({s for i in design.members for s in groups[i].seeds})
        return f"two-way t ({len(design.members)} configs x {seeds} seeds, {design.df:g} df)"
    return "Welch t"


def assess_stability(groups: list[Group], df: pd.DataFrame, metric: str, cols: list[str]) -> None:
    """Per group: seeds that diverged, failed or collapsed, and whether it learned."""
    by_key = {_key_id(g.key): g for g in groups}
    for key, rows in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        g = by_key.get(_key_id({c: key_scalar(v) for c, v in zip(cols, key)}))
        if g is None:
            continue
        value = pd.to_numeric(rows[metric], errors="coerce")
        g.seeds_diverged = int(
            ((rows["status"] == "diverged") | ((rows["status"] == "complete") & value.isna())).sum()
        )
        g.seeds_failed = int(rows["status"].isin(["failed", "oom"]).sum())
        done = rows[(rows["status"] == "complete") & value.notna()]
        majority = column_mean(done, "majority_rate")
        acc = (
            pd.to_numeric(done.get("accuracy"), errors="coerce").dropna().to_numpy(float)
            if "accuracy" in done
            else []
        )
        flat = stability.flat_loss(
            _floats(done, "train_loss_start"), _floats(done, "train_loss_end")
        )
        g.learned = not (stability.at_majority_rate(acc, majority) or flat)


def _floats(df: pd.DataFrame, column: str) -> list[float]:
    if column not in df:
        return []
    return [float(x) for x in pd.to_numeric(df[column], errors="coerce")]


def mark_eligibility(groups: list[Group], margin_abs: float, sign: float, budget_gb: float | None):
    """Mark who may be recommended, and why not in words. A single configuration needs no
    bound (there is nothing to choose between), only replication and stability."""
    for g in groups:
        g.within_margin = g.diff_bound is not None and sign * g.diff_bound > -margin_abs
        g.fits = budget_gb is None or g.mem is None or g.mem <= budget_gb * 1024**3
        why = ["a single seed"] if g.n < 2 else []
        why += g.instability()
        if not g.fits:
            why.append("over the memory budget")
        if g.diff_bound is not None and not g.within_margin:
            why.append("not shown to be within the margin")
        elif g.diff_bound is None and g.n >= 2 and len(groups) > 1:
            why.append("no bound (no other replicated configuration shares its design)")
        g.eligible = not why
        g.note = "; ".join(why) or None


def eval_bootstrap(groups: list[Group], metric: str) -> None:
    by_key = {_key_id(g.key): g for g in groups}
    for g in groups:
        ref = by_key.get(_key_id(g.reference))
        if ref is not None and g.outcomes and ref.outcomes:
            g.diff_ci_examples = bootstrap_diff(metric, ref.outcomes, g.outcomes)


def recommend(
    groups: list[Group], design: Design, sign: float, margin_abs: float, alpha: float
) -> Decision:
    """The cheapest eligible configuration (cost ties from the measured spread go to fewer
    trainable parameters, then the lower rank, then the better mean), unless a cheaper one
    measured better but lacks the evidence; with the power hint when nothing qualifies."""
    idx = list(range(len(groups)))
    eligible = [i for i in idx if groups[i].eligible]
    nan_last = lambda v: v if v is not None and v == v else math.inf  # noqa: E731
    keys = [(nan_last(g.params), nan_last(g.rank), -sign * g.mean) for g in groups]
    costs = [np.asarray(g.costs, float) for g in groups]
    rec_i, tied = cost_order(eligible, costs, tie_keys=keys, alpha=alpha)
    needed = seeds_needed_for(groups, design, margin_abs, alpha)
    if rec_i is None:
        return Decision(None, None, [], needed, None)
    rec = groups[rec_i]
    # a configuration cheaper (beyond the noise) and better measured, held back only by thin
    # evidence, makes the recommendation a guess: say so instead
    for g in groups:
        thin = g.n < 2 or (g.diff_bound is not None and not g.within_margin)
        cheaper = g.cost is not None and rec.cost is not None and g.cost < rec.cost
        if (g is not rec and thin and cheaper and g.fits and g.learned is not False
                and not g.seeds_diverged and not g.seeds_collapsed
                and sign * (g.mean - rec.mean) > 0
                and not cost_order([rec_i, groups.index(g)], costs, tie_keys=keys)[1]):  # fmt: skip
            return Decision(None, None, [], needed, g)
    criterion = "cost" if not tied else "cost tie"
    return Decision(rec, criterion, [groups[i] for i in tied], needed, None)


def seeds_needed_for(
    groups: list[Group], design: Design, margin_abs: float, alpha: float
) -> int | None:
    """Seeds per configuration to show the margin at the observed noise (equal configs)."""
    members = design.members
    if design.kind == "none" or len(members) < 2:
        return None
    best = max(members, key=lambda i: groups[i].n)
    sds = [pair_sd(design, i, best) for i in members if i != best]
    sd = float(np.median(sds)) if sds else math.nan
    return seeds_needed(sd, margin_abs, len(members) - 1, two_way=design.kind == "two-way",
                        alpha=alpha)  # fmt: skip


def _key_id(key: dict | None) -> str:
    """A configuration key as a hashable, order-independent id."""
    return json.dumps(key, sort_keys=True, default=str)

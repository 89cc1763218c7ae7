"""Plain words for ``stats.analyze``: configuration labels, number formatting, the flags
(unstable, failed, single-seed, noisy, fixed-alpha runs), the recommendation's reason and the
plain-text table of a result (``format_analysis``).

It reads the group records (``compare.Group``) that ``stats`` builds and never computes a test.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from lorasweep.analysis.compare import Group
from lorasweep.analysis.decision import Design, Margin
from lorasweep.analysis.units import (
    decimals_for,
    fmt_count,
    fmt_fixed,
    fmt_gib,
    fmt_mean_std,
    fmt_num,
    fmt_p,
    fmt_seconds_whole,
)
from lorasweep.records import setting_label


def group_label(key: dict[str, Any]) -> str:
    """Human name of a configuration key: ``lora r=64``, ``B-Q4``, ``lora r=16 lr=0.0004``
    (other settings as ``records.setting_label`` writes them)."""
    parts = []
    if "variant" in key:
        parts.append(str(key["variant"]))
    if key.get("rank") is not None:
        parts.append(f"r={key['rank']}")
    parts += [setting_label(k, v) for k, v in key.items() if k not in ("variant", "rank")]
    return " ".join(parts) or "all"


class Context(NamedTuple):
    metric: str
    direction: str
    cost: str | None
    mem: str | None
    margin: Margin
    margin_abs: float
    budget_gb: float | None
    alpha: float
    design: Design
    tuned: tuple[str, ...] = ()
    """settings chosen per configuration (``tune``): not a line of their own in a rank ablation"""


class Decision(NamedTuple):
    """What the rule decided: the recommendation (None when there is none) and how."""

    recommended: Group | None
    criterion: str | None
    """"cost" (the cheapest eligible) or "cost tie" (tied within the measured spread)"""
    tied: list[Group]
    """the eligible configurations whose cost was tied with the recommended one"""
    seeds_needed: int | None
    """seeds per configuration to show the margin at the observed noise"""
    blocked_by: Group | None
    """a cheaper configuration that measured better but lacks the evidence (no recommendation)"""


def fmt_cost(v: float | None, cost: str | None) -> str:
    """A cost in its unit: GiB for bytes, seconds (minutes from 600 s), a count of params."""
    if v is None or cost is None:
        return "-"
    if cost.endswith("bytes"):
        return fmt_gib(v)
    if cost.endswith("seconds"):
        return fmt_seconds_whole(v)
    if cost.endswith("params"):
        return f"{fmt_count(v)} params"
    return f"{cost} {fmt_num(v)}"


def gain_per_doubling(a: Group, b: Group, sign: float) -> float:
    """Change of the metric from group ``a`` to the larger-rank group ``b`` per doubling of
    rank, signed so that positive is an improvement."""
    return sign * (b.mean - a.mean) / math.log2(b.key["rank"] / a.key["rank"])


def reason(
    groups: list[Group], best: Group, d: Decision, c: Context, after_verdict: list[str] = ()
) -> str:
    """The recommendation and why, the margin, the noise model, who is within the margin, who
    is worse, who is unstable, the eval set's own sampling error, the gain per doubling of rank,
    the next larger rank and what is over the memory budget, in sentences. ``after_verdict``:
    sentences that follow the first one (how the metric was chosen, the tuning)."""
    rec = d.recommended
    out = [_verdict(groups, best, d, c), *after_verdict, _margin_sentence(c)]
    out += _comparison_sentences(groups, best, c)
    if d.criterion == "cost tie" and rec is not None:
        exact = all(g.cost == rec.cost for g in d.tied)
        how = (
            "exactly"
            if exact
            else f"within the measured spread of {c.cost} (a 95% interval of the difference "
            "that contains 0)"
        )
        out.append(
            f"{group_label(rec.key)} cost the same as "
            + ", ".join(group_label(g.key) for g in d.tied)
            + f" {how}; the tie went to fewer trainable parameters, then the lower rank."
        )
    unstable = [g for g in groups if g.seeds_diverged or g.seeds_collapsed or g.learned is False]
    if unstable:
        out.append(
            "Not recommended whatever their mean: "
            + "; ".join(f"{group_label(g.key)} ({', '.join(g.instability())})" for g in unstable)
            + "."
        )
    if rec is not None and rec.diff_ci_examples is not None and rec is not best:
        lo, hi = rec.diff_ci_examples
        places = decimals_for(c.design.sigma) or 4
        out.append(
            f"Over eval examples as well as seeds (paired bootstrap), the difference of "
            f"{group_label(rec.key)} to {group_label(rec.reference or {})} is "
            f"[{fmt_fixed(lo, places, signed=True)}, {fmt_fixed(hi, places, signed=True)}]"
            + (
                ": another eval set of this size could move it by more than the margin."
                if hi - lo > 2 * c.margin_abs
                else "."
            )
        )
    out += _rank_sentences(groups, rec, c)
    over = [g for g in groups if not g.fits]
    if over:
        out.append(
            f"Over the {c.budget_gb:g} GiB memory budget ({c.mem}): "
            + ", ".join(f"{group_label(g.key)} ({fmt_gib(g.mem, 1)})" for g in over)
            + "."
        )
    return " ".join(out)


def _ratio(new: float, old: float) -> str:
    """'+4%' for small changes, '2.3x' from 1.5x on; never '1x'."""
    r = new / old
    return f"{r:.2g}x" if r >= 1.5 or r <= 0.5 else f"{(r - 1) * 100:+.0f}%"


def _desc(g: Group, metric: str) -> str:
    return f"{metric} {fmt_mean_std(g.mean, g.std)} (n={g.n})"


def _diff_text(g: Group, c: Context) -> str:
    """'-0.012 (bound -0.031)': the difference to its reference and its worst 95% end."""
    places = decimals_for(c.design.sigma) or decimals_for(c.margin_abs)
    return (
        f"{fmt_fixed(g.diff, places, signed=True)} "
        f"(bound {fmt_fixed(g.diff_bound, places, signed=True)})"
    )


def _verdict(groups: list[Group], best: Group, d: Decision, c: Context) -> str:
    """What is recommended and why: the reason's first sentence."""
    rec = d.recommended
    m = c.margin.describe() if c.margin.relative else f"{c.margin_abs:g}"
    if rec is None:
        return _no_recommendation(groups, best, d, c)
    by = f"by {c.cost}" if c.cost else "by trainable parameters, then rank"
    if d.criterion == "cost tie":
        by += ", a tie broken by fewer trainable parameters"
    if len(groups) == 1:
        return f"Recommended {group_label(rec.key)}: the only one, {_desc(rec, c.metric)}."
    head = f"Recommended {group_label(rec.key)}: the cheapest ({by}) of the configurations "
    head += f"shown to be within the {m} margin of the best; {_desc(rec, c.metric)}"
    if rec is best:
        return head + ", the best measured."
    ref = f"{group_label(rec.key)} - {group_label(rec.reference or {})}"
    costs = ""
    mine, theirs = fmt_cost(rec.cost, c.cost), fmt_cost(best.cost, c.cost)
    if c.cost and mine != theirs:
        costs = f"; {mine} instead of {theirs}"
    return (
        head + f". Difference {ref}: {_diff_text(rec, c)}; the best is {group_label(best.key)} "
        f"at {_desc(best, c.metric)}" + costs + "."
    )


def _no_recommendation(groups: list[Group], best: Group, d: Decision, c: Context) -> str:
    m = c.margin.describe() if c.margin.relative else f"{c.margin_abs:g}"
    need = (
        f" To show a {m} margin at this noise you need about {d.seeds_needed} seeds per "
        "configuration (if the configurations are truly equal)."
        if d.seeds_needed
        else ""
    )
    if d.blocked_by is not None:
        g = d.blocked_by
        return (
            f"No recommendation: {group_label(g.key)} is cheaper and measured better than every "
            f"configuration shown to be within the margin, but {g.note or 'lacks evidence'}; "
            "run more seeds of it." + need
        )
    if all(g.learned is False for g in groups):
        return (
            "No recommendation: no configuration learned (accuracy at the majority-class rate "
            "of the eval set, or a training loss that never left its start)."
        )
    if all(g.n < 2 for g in groups):
        return (
            "No recommendation: one seed per configuration gives no estimate of the noise, so "
            "no difference can be bounded; run at least 3 seeds per configuration."
        )
    within = [g for g in groups if g.within_margin]
    if within and all(not g.fits for g in within):
        return (
            f"No recommendation: no configuration within the margin fits the {c.budget_gb:g} "
            "GiB memory budget."
        )
    if within:
        return (
            "No recommendation: every configuration shown to be within the margin is unstable, "
            "single-seed or did not learn (below)." + need
        )
    return (
        f"No recommendation: at this noise no configuration, not even the best measured "
        f"{group_label(best.key)} ({_desc(best, c.metric)}), is shown to be within the {m} "
        "margin of the best of the others." + need
    )


def _margin_sentence(c: Context) -> str:
    how = "default for this metric; set with --margin" if not c.margin.given else "given"
    if c.margin.relative:
        amount = f"{c.margin.describe()} of the best mean = {c.margin_abs:.3g}"
    else:
        amount = f"{c.margin_abs:g}"
    return (
        f"Margin: {amount} {c.metric} ({how}). Bounds are simultaneous 95% (Hsu's comparisons "
        f"with the best), over seeds on the fixed {_split_name(c.metric)} set; noise from a "
        f"{c.design.describe()}."
    )


def _split_name(metric: str) -> str:
    return "test" if metric.startswith("test_") else "eval"


def _comparison_sentences(groups: list[Group], best: Group, c: Context) -> list[str]:
    """Who is within the margin, who is not shown to be, and who is significantly worse."""
    others = [g for g in groups if g is not best and g.diff_bound is not None]
    within = [f"{group_label(g.key)} {_diff_text(g, c)}" for g in others if g.within_margin]
    outside = [
        f"{group_label(g.key)} {_diff_text(g, c)}"
        for g in others
        if not g.within_margin and not g.significantly_worse
    ]
    worse = [
        f"{group_label(g.key)} (p={fmt_p(g.p_adjusted)})" for g in groups if g.significantly_worse
    ]
    out = []
    if within:
        out.append("Within the margin of the best: " + ", ".join(within) + ".")
    if outside:
        out.append("Not shown to be within the margin: " + ", ".join(outside) + ".")
    if worse:
        out.append(
            f"Significantly worse than the best {group_label(best.key)} (two-sided, Holm, "
            f"alpha={c.alpha:g}): " + ", ".join(worse) + "."
        )
    return out


def _series(key: dict[str, Any], tuned: tuple[str, ...] = ()) -> dict[str, Any]:
    """A configuration key without its rank (and its tuned settings, which follow the rank):
    the line it lies on in a rank ablation."""
    return {k: v for k, v in key.items() if k != "rank" and k not in tuned}


def _rank_sentences(groups: list[Group], rec: Group | None, c: Context) -> list[str]:
    """The gain per doubling of rank along each line of configurations that differ only in
    rank (a variant, at one value of each other setting), and what the next larger rank than
    the recommended one would cost and change."""
    m, out = c.metric, []
    sign = 1.0 if c.direction == "higher" else -1.0
    series: dict[str, list[Group]] = {}
    for g in groups:
        if g.key.get("rank") is not None:
            series.setdefault(group_label(_series(g.key, c.tuned)), []).append(g)
    for name in sorted(series):
        ranked = sorted(series[name], key=lambda g: g.key["rank"])
        steps = [
            f"{a.key['rank']}->{b.key['rank']}: {gain_per_doubling(a, b, sign):+.3g}"
            for a, b in zip(ranked, ranked[1:])
            if a.key["rank"] > 0
        ]
        if steps:
            where = "" if name == "all" else f"{name}; "
            out.append(
                f"Gain in {m} per doubling of rank ({where}positive is better): "
                + ", ".join(steps)
                + "."
            )
    if rec is None or rec.key.get("rank") is None:
        return out
    bigger = sorted(
        (
            g
            for g in groups
            if _series(g.key, c.tuned) == _series(rec.key, c.tuned)
            and g.key.get("rank") is not None
            and g.key["rank"] > rec.key["rank"]
        ),
        key=lambda g: g.key["rank"],
    )
    if bigger:
        nx = bigger[0]
        new, old = fmt_cost(nx.cost, c.cost), fmt_cost(rec.cost, c.cost)
        ratio = f" ({_ratio(nx.cost, rec.cost)})" if nx.cost and rec.cost else ""
        if not c.cost:
            cost_txt = "cost more"
        elif new == old:
            same = f"{new}, {_ratio(nx.cost, rec.cost)}" if ratio else new
            cost_txt = f"cost about the same ({same})"
        else:
            cost_txt = f"cost {new} instead of {old}{ratio}"
        out.append(
            f"The next larger rank, r={nx.key['rank']}, would {cost_txt} and change "
            f"{m} by {nx.mean - rec.mean:+.3g}."
        )
    return out

"""Plain words for ``stats.analyze``: configuration labels, number formatting, the flags
(unstable, failed, single-seed, noisy, fixed-alpha runs), the recommendation's reason and the
plain-text table of a result (``format_analysis``).

It reads the group records (``compare.Group``) that ``stats`` builds and never computes a test.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from lorasweep.analysis.compare import (
    MIN_SEEDS_FOR_EQUIVALENCE,
    Group,
    json_scalar,
    key_scalar,
)
from lorasweep.analysis.units import fmt_count, fmt_gib, fmt_num, fmt_seconds_whole


def group_label(key: dict[str, Any]) -> str:
    """Human name of a configuration key: ``lora r=64``, ``B-Q4``, ``dora r=8 method=dora``."""
    parts = []
    if "variant" in key:
        parts.append(str(key["variant"]))
    if key.get("rank") is not None:
        parts.append(f"r={key['rank']}")
    parts += [f"{k}={v}" for k, v in key.items() if k not in ("variant", "rank")]
    return " ".join(parts) or "all"


class Context(NamedTuple):
    metric: str
    direction: str
    cost: str | None
    mem: str | None
    tolerance: float | None
    budget_gb: float | None
    alpha: float


def _fmt_cost(v: float | None, cost: str | None) -> str:
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


def _row_label(row: pd.Series, cols: list[str]) -> str:
    return f"{group_label({c: key_scalar(row[c]) for c in cols})} seed {json_scalar(row['seed'])}"


def trial_flags(df: pd.DataFrame, metric: str, cols: list[str]) -> list[str]:
    flags = []
    nan_metric = (df["status"] == "complete") & ~np.isfinite(df[metric])
    unstable = [
        f"{_row_label(r, cols)} ({'diverged' if r['status'] == 'diverged' else metric + ' is NaN'})"
        for _, r in df[(df["status"] == "diverged") | nan_metric].iterrows()
    ]
    if unstable:
        flags.append(
            "Unstable runs, excluded from the means (not counted as worse): "
            + "; ".join(unstable)
            + "."
        )
    for statuses, what in (
        (("failed", "oom"), "Failed or out-of-memory trials"),
        (("pruned",), "Pruned trials"),
    ):
        rows = df[df["status"].isin(statuses)]
        if len(rows):
            items = []
            for _, r in rows.iterrows():
                err = str(r["error"]).strip().splitlines()[0][:80] if r["error"] else ""
                items.append(f"{_row_label(r, cols)} ({r['status']}{': ' + err if err else ''})")
            flags.append(f"{what}, not included: " + "; ".join(items) + ".")
    pending = int(df["status"].isin(["pending", "running"]).sum())
    if pending:
        flags.append(f"{pending} trial(s) still pending or running: the results are incomplete.")
    for variant, g in df.groupby("variant"):
        ranks = sorted(g["rank"].dropna().unique())
        if len(ranks) < 2:
            continue
        policies = set(g["alpha_policy"].dropna().astype(str)) if "alpha_policy" in g else set()
        alphas = set(pd.to_numeric(g["alpha"], errors="coerce").dropna()) if "alpha" in g else set()
        fixed = any(p.startswith("fixed") for p in policies) or (not policies and len(alphas) == 1)
        if fixed and len(alphas) == 1:
            a = alphas.pop()
            flags.append(
                f"Fixed alpha={a:g} across ranks {ranks[0]:g}-{ranks[-1]:g} of {variant}: the "
                f"scale alpha/r changes from {a / ranks[0]:.3g} to {a / ranks[-1]:.3g}, so rank "
                "and scale are confounded (use alpha_policy rank, 2*rank or rslora)."
            )
        elif fixed:
            flags.append(
                f"Fixed alpha across the ranks of {variant}: the scale alpha/r changes "
                "with rank, so rank and scale are confounded."
            )
    return flags


def group_flags(groups: list[Group], best: Group, metric: str, cols: list[str]) -> list[str]:
    flags = []
    single = [group_label(g.key) for g in groups if g.n == 1]
    if single:
        flags.append(
            "Single seed (no variance estimate, not tested against the best): "
            + ", ".join(single)
            + "."
        )
    means = np.array([g.mean for g in groups])
    spread = float(means.max() - means.min()) if len(groups) > 1 else 0.0
    noisy = []
    for g in groups:
        if g.std is None:
            continue
        cv = g.std / abs(g.mean) if g.mean else math.inf
        if cv > 0.10 or (spread > 0 and g.std > spread):
            noisy.append(f"{group_label(g.key)} (std {fmt_num(g.std)}, CV {cv:.0%})")
    if noisy:
        flags.append(
            f"High variance across seeds (CV > 10% or std above the {fmt_num(spread)} "
            "spread between configurations): " + "; ".join(noisy) + "."
        )
    var = [g.std**2 for g in groups if g.std is not None]
    if len(groups) > 2 and var and math.sqrt(np.mean(var)) > np.std(means, ddof=1):
        flags.append(
            f"Seed noise (pooled std {fmt_num(math.sqrt(np.mean(var)))}) exceeds the "
            f"spread of the configuration means (std {fmt_num(np.std(means, ddof=1))}): "
            f"the {metric} differences are mostly noise."
        )
    return flags


def gain_per_doubling(a: Group, b: Group, sign: float) -> float:
    """Change of the metric from group ``a`` to the larger-rank group ``b`` per doubling of
    rank, signed so that positive is an improvement."""
    return sign * (b.mean - a.mean) / math.log2(b.key["rank"] / a.key["rank"])


def reason(groups: list[Group], best: Group, rec: Group | None, c: Context) -> str:
    """The recommendation and why, the tests' verdicts, the gain per doubling of rank, the next
    larger rank and what is over the memory budget, in sentences."""
    out = [_verdict(best, rec, c)]
    out += _test_sentences(groups, best, c)
    out += _rank_sentences(groups, rec, c)
    over = [g for g in groups if not g.fits]
    if over:
        out.append(
            f"Over the {c.budget_gb:g} GiB memory budget ({c.mem}): "
            + ", ".join(f"{group_label(g.key)} ({fmt_gib(g.mem, 1)})" for g in over)
            + "."
        )
    return " ".join(out)


def _desc(g: Group, metric: str) -> str:
    sd = f" ± {fmt_num(g.std)}" if g.std is not None else ""
    return f"{metric} {fmt_num(g.mean)}{sd} (n={g.n})"


def _verdict(best: Group, rec: Group | None, c: Context) -> str:
    """What is recommended and why: the reason's first sentences."""
    if rec is None:
        return (
            f"No configuration is both acceptable and within the {c.budget_gb:g} GiB memory budget."
        )
    if rec is best:
        return (
            f"Recommended {group_label(rec.key)}: the best configuration, {_desc(rec, c.metric)}"
            + (f", at {_fmt_cost(rec.cost, c.cost)}." if c.cost else ".")
        )
    diff = rec.mean - best.mean
    if rec.p_adjusted is not None and not rec.significantly_worse:
        why = f"not significantly worse ({rec.test}, Holm-adjusted p={rec.p_adjusted:.3g})"
    else:
        why = f"within the tolerance of {c.tolerance:g}"
    ratio = f" ({best.cost / rec.cost:.2g}x cheaper)" if rec.cost and best.cost else ""
    out = (
        f"Recommended {group_label(rec.key)}: the cheapest configuration by {c.cost} that is "
        f"{why} than the best. It reaches {_desc(rec, c.metric)}, {diff:+.4g} vs the best "
        f"{group_label(best.key)} at {_desc(best, c.metric)}, for {_fmt_cost(rec.cost, c.cost)} "
        f"instead of {_fmt_cost(best.cost, c.cost)}{ratio}."
    )
    pairs = min(rec.n, best.n)
    if not rec.significantly_worse and pairs < MIN_SEEDS_FOR_EQUIVALENCE:
        out += f" With {pairs} seeds the test has little power: run more seeds to confirm."
    return out


def _test_sentences(groups: list[Group], best: Group, c: Context) -> list[str]:
    """Which configurations the tests could not tell from the best, and which are worse."""
    same = [
        f"{group_label(g.key)} (p={g.p_adjusted:.2g})"
        for g in groups
        if g is not best and g.p_adjusted is not None and not g.significantly_worse
    ]
    worse = [
        f"{group_label(g.key)} ({g.mean - best.mean:+.3g}, p={g.p_adjusted:.2g})"
        for g in groups
        if g.significantly_worse
    ]
    out = [
        f"Indistinguishable from the best {group_label(best.key)} at alpha={c.alpha:g} "
        "after Holm: " + (", ".join(same) if same else "none") + "."
    ]
    if worse:
        out.append("Significantly worse: " + ", ".join(worse) + ".")
    return out


def _rank_sentences(groups: list[Group], rec: Group | None, c: Context) -> list[str]:
    """The gain per doubling of rank in each variant, and what the next larger rank than the
    recommended one would cost and change."""
    m, out = c.metric, []
    sign = 1.0 if c.direction == "higher" else -1.0
    for variant in sorted({g.key.get("variant") for g in groups}, key=str):
        ranked = sorted(
            (
                g
                for g in groups
                if g.key.get("variant") == variant and g.key.get("rank") is not None
            ),
            key=lambda g: g.key["rank"],
        )
        steps = [
            f"{a.key['rank']}->{b.key['rank']}: {gain_per_doubling(a, b, sign):+.3g}"
            for a, b in zip(ranked, ranked[1:])
            if a.key["rank"] > 0
        ]
        if steps:
            out.append(
                f"Gain in {m} per doubling of rank ({variant}; positive is better): "
                + ", ".join(steps)
                + "."
            )
    if rec is None or rec.key.get("rank") is None:
        return out
    bigger = sorted(
        (
            g
            for g in groups
            if g.key.get("variant") == rec.key.get("variant")
            and g.key.get("rank") is not None
            and g.key["rank"] > rec.key["rank"]
        ),
        key=lambda g: g.key["rank"],
    )
    if bigger:
        nx = bigger[0]
        cost_txt = (
            (
                f"cost {_fmt_cost(nx.cost, c.cost)} instead of {_fmt_cost(rec.cost, c.cost)}"
                + (f" ({nx.cost / rec.cost:.2g}x)" if nx.cost and rec.cost else "")
            )
            if c.cost
            else "cost more"
        )
        out.append(
            f"The next larger rank, r={nx.key['rank']}, would {cost_txt} and change "
            f"{m} by {nx.mean - rec.mean:+.3g}."
        )
    return out


# ----------------------------------------------------------------------------- the table


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

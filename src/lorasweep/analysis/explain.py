"""Plain words for ``stats.analyze``: configuration labels, number formatting, the flags
(unstable, failed, single-seed, noisy, fixed-alpha runs) and the recommendation's reason.

A leaf module: it reads the group records that ``stats`` builds and never computes a test.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pandas as pd


def _py(v: Any) -> Any:
    """A JSON-native scalar: NaN/inf -> None, numpy -> python, integral floats of ranks kept."""
    if v is None:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _key_value(v: Any) -> Any:
    v = _py(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def group_label(key: dict[str, Any]) -> str:
    """Human name of a configuration key: ``lora r=64``, ``B-Q4``, ``dora r=8 method=dora``."""
    parts = []
    if "variant" in key:
        parts.append(str(key["variant"]))
    if key.get("rank") is not None:
        parts.append(f"r={key['rank']}")
    parts += [f"{k}={v}" for k, v in key.items() if k not in ("variant", "rank")]
    return " ".join(parts) or "all"


def fmt_num(x: float | None) -> str:
    """Compact number for metric values: 4 significant digits, '-' for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


class Context(NamedTuple):
    metric: str
    direction: str
    cost: str | None
    mem: str | None
    tolerance: float | None
    budget_gb: float | None
    alpha: float


def _fmt_cost(v: float | None, cost: str | None) -> str:
    if v is None or cost is None:
        return "-"
    if cost.endswith("bytes"):
        return f"{v / 1024**3:.2f} GiB"
    if cost.endswith("seconds"):
        if v < 10:  # tiny runs (tests, smoke sweeps): "0 s" would hide the difference
            return f"{v:.2g} s"
        return f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"
    if cost.endswith("params"):
        return f"{v:,.0f} params"
    return f"{cost} {fmt_num(v)}"


def _row_label(row: pd.Series, cols: list[str]) -> str:
    return f"{group_label({c: _key_value(row[c]) for c in cols})} seed {_py(row['seed'])}"


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


def group_flags(groups: list[dict], best: dict, metric: str, cols: list[str]) -> list[str]:
    flags = []
    single = [group_label(g["key"]) for g in groups if g["n"] == 1]
    if single:
        flags.append(
            "Single seed (no variance estimate, not tested against the best): "
            + ", ".join(single)
            + "."
        )
    means = np.array([g["mean"] for g in groups])
    spread = float(means.max() - means.min()) if len(groups) > 1 else 0.0
    noisy = []
    for g in groups:
        if g["std"] is None:
            continue
        cv = g["std"] / abs(g["mean"]) if g["mean"] else math.inf
        if cv > 0.10 or (spread > 0 and g["std"] > spread):
            noisy.append(f"{group_label(g['key'])} (std {fmt_num(g['std'])}, CV {cv:.0%})")
    if noisy:
        flags.append(
            f"High variance across seeds (CV > 10% or std above the {fmt_num(spread)} "
            "spread between configurations): " + "; ".join(noisy) + "."
        )
    var = [g["std"] ** 2 for g in groups if g["std"] is not None]
    if len(groups) > 2 and var and math.sqrt(np.mean(var)) > np.std(means, ddof=1):
        flags.append(
            f"Seed noise (pooled std {fmt_num(math.sqrt(np.mean(var)))}) exceeds the "
            f"spread of the configuration means (std {fmt_num(np.std(means, ddof=1))}): "
            f"the {metric} differences are mostly noise."
        )
    return flags


def gain_per_doubling(a: dict, b: dict, sign: float) -> float:
    """Change of the metric from group ``a`` to the larger-rank group ``b`` per doubling of
    rank, signed so that positive is an improvement."""
    return sign * (b["mean"] - a["mean"]) / math.log2(b["key"]["rank"] / a["key"]["rank"])


def reason(groups: list[dict], best: dict, rec: dict | None, c: Context) -> str:
    m, lbl = c.metric, group_label
    sign = 1.0 if c.direction == "higher" else -1.0

    def desc(g: dict) -> str:
        sd = f" ± {fmt_num(g['std'])}" if g["std"] is not None else ""
        return f"{m} {fmt_num(g['mean'])}{sd} (n={g['n']})"

    out = []
    over = [g for g in groups if not g["_fits"]]
    if rec is None:
        out.append(
            f"No configuration is both acceptable and within the {c.budget_gb:g} GiB memory budget."
        )
    elif rec is best:
        out.append(
            f"Recommended {lbl(rec['key'])}: the best configuration, {desc(rec)}"
            + (f", at {_fmt_cost(rec['cost'], c.cost)}." if c.cost else ".")
        )
    else:
        diff = rec["mean"] - best["mean"]
        if rec["p_adjusted"] is not None and not rec["significantly_worse"]:
            why = (
                f"not significantly worse ({rec['test']}, Holm-adjusted p={rec['p_adjusted']:.3g})"
            )
        else:
            why = f"within the tolerance of {c.tolerance:g}"
        ratio = (
            f" ({best['cost'] / rec['cost']:.2g}x cheaper)" if rec["cost"] and best["cost"] else ""
        )
        out.append(
            f"Recommended {lbl(rec['key'])}: the cheapest configuration by {c.cost} that is "
            f"{why} than the best. It reaches {desc(rec)}, {diff:+.4g} vs the best "
            f"{lbl(best['key'])} at {desc(best)}, for {_fmt_cost(rec['cost'], c.cost)} instead "
            f"of {_fmt_cost(best['cost'], c.cost)}{ratio}."
        )
        pairs = min(rec["n"], best["n"])
        if not rec["significantly_worse"] and pairs < 3:
            out.append(f"With {pairs} seeds the test has little power: run more seeds to confirm.")
    same = [
        f"{lbl(g['key'])} (p={g['p_adjusted']:.2g})"
        for g in groups
        if g is not best and g["p_adjusted"] is not None and not g["significantly_worse"]
    ]
    worse = [
        f"{lbl(g['key'])} ({g['mean'] - best['mean']:+.3g}, p={g['p_adjusted']:.2g})"
        for g in groups
        if g["significantly_worse"]
    ]
    out.append(
        f"Indistinguishable from the best {lbl(best['key'])} at alpha={c.alpha:g} "
        "after Holm: " + (", ".join(same) if same else "none") + "."
    )
    if worse:
        out.append("Significantly worse: " + ", ".join(worse) + ".")
    for variant in sorted({g["key"].get("variant") for g in groups}, key=str):
        ranked = sorted(
            (
                g
                for g in groups
                if g["key"].get("variant") == variant and g["key"].get("rank") is not None
            ),
            key=lambda g: g["key"]["rank"],
        )
        steps = [
            f"{a['key']['rank']}->{b['key']['rank']}: {gain_per_doubling(a, b, sign):+.3g}"
            for a, b in zip(ranked, ranked[1:])
            if a["key"]["rank"] > 0
        ]
        if steps:
            out.append(
                f"Gain in {m} per doubling of rank ({variant}; positive is better): "
                + ", ".join(steps)
                + "."
            )
    if rec is not None and rec["key"].get("rank") is not None:
        bigger = sorted(
            (
                g
                for g in groups
                if g["key"].get("variant") == rec["key"].get("variant")
                and g["key"].get("rank") is not None
                and g["key"]["rank"] > rec["key"]["rank"]
            ),
            key=lambda g: g["key"]["rank"],
        )
        if bigger:
            nx = bigger[0]
            cost_txt = (
                (
                    f"cost {_fmt_cost(nx['cost'], c.cost)} instead of "
                    f"{_fmt_cost(rec['cost'], c.cost)}"
                    + (f" ({nx['cost'] / rec['cost']:.2g}x)" if nx["cost"] and rec["cost"] else "")
                )
                if c.cost
                else "cost more"
            )
            out.append(
                f"The next larger rank, r={nx['key']['rank']}, would {cost_txt} and change "
                f"{m} by {nx['mean'] - rec['mean']:+.3g}."
            )
    if over:
        out.append(
            f"Over the {c.budget_gb:g} GiB memory budget ({c.mem}): "
            + ", ".join(f"{lbl(g['key'])} ({g['_mem'] / 1024**3:.1f} GiB)" for g in over)
            + "."
        )
    return " ".join(out)

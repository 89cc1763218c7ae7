"""The flags of an analysis: trials that diverged, failed or were pruned, single-seed and noisy
configurations, seed noise above the spread of the means, rank and scale confounded by a fixed
alpha. Plain words over the trials table and the ``compare.Group`` records; no test computed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lorasweep.analysis.compare import Group, json_scalar, key_scalar
from lorasweep.analysis.explain import group_label
from lorasweep.analysis.units import fmt_sig


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
            "Unstable runs, excluded from the means; their configurations are not recommended: "
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
            "Single seed (its own spread is unknown, so it is not recommended): "
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
            noisy.append(f"{group_label(g.key)} (std {fmt_sig(g.std)}, CV {cv:.0%})")
    if noisy:
        flags.append(
            f"High variance across seeds (CV > 10% or std above the {fmt_sig(spread)} "
            "spread between configurations): " + "; ".join(noisy) + "."
        )
    var = [g.std**2 for g in groups if g.std is not None]
    if len(groups) > 2 and var and math.sqrt(np.mean(var)) > np.std(means, ddof=1):
        flags.append(
            f"Seed noise (pooled std {fmt_sig(math.sqrt(np.mean(var)))}) exceeds the "
            f"spread of the configuration means (std {fmt_sig(np.std(means, ddof=1))}): "
            f"the {metric} differences are mostly noise."
        )
    return flags

"""The report's views of the settings a sweep varies: the setting columns of its tables, the
"Tuning" section (nested selection) and the "Factors" section (marginal means, the
interaction sentence, the heatmap). Formatting only: the numbers come from ``stats.analyze``
(its ``tuning``, ``factors`` and ``interaction``), the figure from ``heatmap``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pandas as pd

from lorasweep.analysis.compare import key_scalar
from lorasweep.analysis.explain import group_label
from lorasweep.analysis.heatmap import heatmap_axes, write_heatmap
from lorasweep.analysis.settings import level_label, readable, short_name, value_text
from lorasweep.analysis.tables import prepare_trials
from lorasweep.analysis.tune import per_phrase, tuned_phrase
from lorasweep.analysis.units import fmt_num
from lorasweep.records import TEST_PREFIX

ID_KEYS = ("variant", "rank")


def setting_keys(analysis: dict[str, Any]) -> list[str]:
    """The key columns of the configurations other than variant and rank (learning_rate, ...):
    one column each in the report's tables."""
    by = (analysis.get("factors") or {}).get("by")
    if by is None:
        by = list((analysis.get("groups") or [{}])[0].get("key") or {})
    return [c for c in by if c not in ID_KEYS]


def setting_headers(keys: list[str]) -> list[str]:
    return [short_name(k) for k in keys]


def row_label(key: dict[str, Any], keys: list[str]) -> str:
    """The configuration column of a table row: variant and rank when the settings have
    columns of their own, else the whole label."""
    if not keys:
        return group_label(key)
    base = {k: v for k, v in key.items() if k in ID_KEYS}
    return group_label(base) if base else ""


def setting_cells(key: dict[str, Any], keys: list[str]) -> list[str]:
    return ["-" if key.get(k) is None else value_text(key.get(k)) for k in keys]


def _split(column: str) -> str:
    return "test split" if column.startswith(TEST_PREFIX) else "validation split"


def tuning_view(analysis: dict[str, Any]) -> dict[str, Any] | None:
    """The "Tuning" section: what was tuned, on what, per configuration the values tried with
    their mean, and whether selection and comparison used different data."""
    t = analysis.get("tuning")
    if not t:
        return None
    tuned = t["tuned"]
    rows = []
    for c in t["configs"]:
        chosen = c.get("chosen")
        rows.append(
            {
                "label": group_label(c["key"]),
                "tried": c["tried"],
                "chosen": tuned_phrase(tuned, chosen) if chosen else "none (no complete trial)",
                "scores": "; ".join(
                    f"{' '.join(level_label(k, v['setting'][k]) for k in tuned)}: "
                    f"{fmt_num(v['mean'])} (n={v['n']}"
                    + (f", {v['diverged']} diverged" if v.get("diverged") else "")
                    + ")"
                    for v in c["values"]
                ),
            }
        )
    metric = analysis["metric"]
    names = " and ".join(readable(x) for x in tuned)
    if t["same_data"]:
        data = (
            f"Selection ({t['select_on']}) and comparison ({metric}) used the same data: the "
            "tuned configurations look better than they are (the winner's curse: the best of "
            "several noisy means is biased upwards, the more so the more values were tried). "
            "Add a test split (dataset.test_fraction) so that the comparison uses data the "
            "choice never saw."
        )
    else:
        data = (
            f"Selection on {t['select_on']} ({_split(t['select_on'])}) and comparison on "
            f"{metric} ({_split(metric)}) used different data, so the comparison is not biased "
            "by the choice."
        )
    return {
        "what": names,
        "per": per_phrase([c["key"] for c in t["configs"]]),
        "select_on": t["select_on"],
        "direction": t["direction"],
        "same_data": t["same_data"],
        "data_note": data,
        "rows": rows,
    }


def factors_view(
    analysis: dict[str, Any], trials: pd.DataFrame, out_dir: Path
) -> dict[str, Any] | None:
    """The "Factors" section when two or more factors vary: the interaction sentence, the
    marginal means per factor, the unbalanced-grid note and the heatmap (written as
    ``out_dir/heatmap.png`` and embedded)."""
    f = analysis.get("factors") or {}
    if len(f.get("names") or []) < 2:
        return None
    tables = []
    for name in f["names"]:
        tables.append(
            {
                "name": readable(name),
                "rows": [
                    {
                        "level": level_label(name, r["level"]),
                        "mean": fmt_num(r["mean"]),
                        "n": r["n"],
                        "configs": r["configs"],
                        "best": r["best"],
                    }
                    for r in f["marginal"][name]
                ],
            }
        )
    png = write_heatmap(trials, analysis, out_dir)
    axes = heatmap_axes(analysis)
    return {
        "metric": f["metric"],
        "interaction": analysis.get("interaction"),
        "note": f.get("note"),
        "tables": tables,
        "heatmap": base64.b64encode(png.read_bytes()).decode("ascii") if png else None,
        "heatmap_axes": f"{readable(axes[0])} (rows) by {readable(axes[1])} (columns)"
        if axes
        else "",
    }


def plot_frame(trials: pd.DataFrame, analysis: dict[str, Any]) -> pd.DataFrame:
    """The trials as the rank plots should draw them: with a tuned setting, only the trials of
    the chosen values (one line per variant, the tuned value following the rank); with other
    varying settings, one line per variant and value (``variant`` relabelled ``lora lr=0.001``).
    """
    df = prepare_trials(trials)
    by = (analysis.get("factors") or {}).get("by") or ["variant", "rank"]
    tuned = (analysis.get("tuning") or {}).get("tuned") or []
    if tuned:
        chosen = [g["key"] for g in analysis["groups"]]
        keys = [{c: key_scalar(r[c]) for c in by} for _, r in df[by].iterrows()]
        df = df[[k in chosen for k in keys]]
    lines = [c for c in by if c not in (*ID_KEYS, *tuned)]
    if lines and not df.empty:
        df = df.assign(
            variant=[
                group_label({"variant": r["variant"], **{c: key_scalar(r[c]) for c in lines}})
                for _, r in df.iterrows()
            ]
        )
    return df

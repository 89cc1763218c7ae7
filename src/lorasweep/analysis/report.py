"""The HTML report and the trial exports.

Computes nothing beyond formatting: the numbers come from ``stats``, the figures from ``plots``.
The report is one self-contained file (PNGs embedded as base64); the PNGs are also written
beside it so they can be reused in slides and papers.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from lorasweep.analysis import plots, stats

# Columns of the "all metrics" table, in order, with their kind of unit.
SUMMARY_METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("accuracy", "metric"),
    "f1": ("F1", "metric"),
    "perplexity": ("perplexity", "metric"),
    "eval_loss": ("eval loss", "metric"),
    "train_loss": ("final train loss", "metric"),
    "trainable_params": ("trainable params", "count"),
    "trainable_percent": ("trainable %", "percent"),
    "adapter_bytes": ("adapter size", "bytes"),
    "peak_gpu_allocated_bytes": ("peak GPU alloc.", "bytes"),
    "peak_cpu_rss_bytes": ("peak CPU RSS", "bytes"),
    "train_seconds": ("train time", "seconds"),
    "tokens_per_second": ("tokens/s", "rate"),
    "effective_rank": ("effective rank", "metric"),
}
PLOT_CAPTIONS = {
    "metric_vs_rank": "Mean over seeds with 95% t confidence intervals. Variants without a rank "
    "of their own are dashed lines with a shaded CI band.",
    "time_vs_rank": "Wall seconds of the training loop alone (loading and eval timed apart).",
    "memory_vs_rank": "Peak memory per trial; dotted lines mark common GPU sizes.",
    "efficiency": "Metric per hour of training: where extra rank stops paying for itself.",
    "pareto": "Configurations that no other beats on both metric and cost form the front.",
    "loss_curves": "Training loss averaged over seeds, one line per configuration.",
    "memory_estimate": "Estimator's predicted peak vs the measured peak; points on y = x are "
    "exact.",
}


# ----------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.number)) and math.isfinite(x)


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB', 3.2e9 -> '2.98 GiB'; '-' when missing."""
    if not _finite(n):
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float | None) -> str:
    """42.3 -> '42.3 s', 300 -> '5.0 min', 7200 -> '2.00 h'; '-' when missing."""
    if not _finite(s):
        return "-"
    if abs(s) < 120:
        return f"{s:.1f} s"
    if abs(s) < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_count(n: float | None) -> str:
    """1234567 -> '1,234,567'; '-' when missing."""
    return f"{n:,.0f}" if _finite(n) else "-"


def fmt_value(x: float | None, kind: str = "metric") -> str:
    """Format one number by its kind: metric, count, percent, bytes, seconds, rate."""
    if not _finite(x):
        return "-"
    if kind == "bytes":
        return fmt_bytes(x)
    if kind == "seconds":
        return fmt_seconds(x)
    if kind == "count":
        return fmt_count(x)
    if kind == "percent":
        return f"{x:.3g}%"
    if kind == "rate":
        return f"{x:,.1f}"
    return stats.fmt_num(x)


def fmt_mean_std(mean: float | None, std: float | None, kind: str = "metric") -> str:
    """'0.8612 ± 0.0041', '1.50 GiB ± 12.00 MiB'; the std is omitted when unknown."""
    if not _finite(mean):
        return "-"
    if not _finite(std):
        return fmt_value(mean, kind)
    if abs(std) <= 1e-9 * abs(mean) and kind != "metric":  # constant up to rounding
        return fmt_value(mean, kind)
    return f"{fmt_value(mean, kind)} ± {fmt_value(std, kind)}"


# ----------------------------------------------------------------------------- tables


def _summary_rows(trials: pd.DataFrame, analysis: dict, by: Any) -> tuple[list, list[dict]]:
    """Header names and formatted rows of the all-metrics table."""
    table = stats.summary_table(trials, list(SUMMARY_METRICS), by=by)
    shown = [
        m for m in SUMMARY_METRICS if f"{m}_mean" in table and table[f"{m}_mean"].notna().any()
    ]
    best = stats.group_label((analysis.get("best") or {}).get("key") or {})
    rec = stats.group_label((analysis.get("recommended") or {}).get("key") or {})
    key_cols = [
        c for c in table.columns if c not in ("n", "n_total") and not c.endswith(("_mean", "_std"))
    ]
    rows = []
    for _, r in table.iterrows():
        key = {
            c: (None if pd.isna(r[c]) else (int(r[c]) if c == "rank" else r[c])) for c in key_cols
        }
        label = stats.group_label(key)
        cells = [fmt_mean_std(r[f"{m}_mean"], r[f"{m}_std"], SUMMARY_METRICS[m][1]) for m in shown]
        rows.append(
            {
                "label": label,
                "n": f"{int(r['n'])}/{int(r['n_total'])}",
                "cells": cells,
                "best": label == best,
                "recommended": label == rec,
            }
        )
    return [SUMMARY_METRICS[m][0] for m in shown], rows


def _comparison_rows(analysis: dict) -> list[dict]:
    best = (analysis.get("best") or {}).get("key")
    rec = (analysis.get("recommended") or {}).get("key")
    rows = []
    for g in analysis["groups"]:
        ci = g["ci95"]
        badges = []
        if g["key"] == best:
            badges.append(("best", "best"))
        if g["key"] == rec:
            badges.append(("recommended", "rec"))
        if g["significantly_worse"]:
            badges.append(("significantly worse", "worse"))
        if g["n"] == 1:
            badges.append(("single seed", "warn"))
        rows.append(
            {
                "label": stats.group_label(g["key"]),
                "n": g["n"],
                "mean": fmt_mean_std(g["mean"], g["std"]),
                "ci": f"[{stats.fmt_num(ci[0])}, {stats.fmt_num(ci[1])}]" if ci else "-",
                "test": g["test"] or "-",
                "p": stats.fmt_num(g["p_value"]),
                "p_adj": stats.fmt_num(g["p_adjusted"]),
                "cost": stats.fmt_num(g["cost"]),
                "badges": badges,
                "worse": g["significantly_worse"],
            }
        )
    return rows


def _problem_rows(trials: pd.DataFrame, metric: str) -> list[dict]:
    probs = stats.problem_trials(trials, metric)
    rows = []
    for _, r in probs.iterrows():
        rank = None if pd.isna(r["rank"]) else int(r["rank"])
        err = r["error"] if isinstance(r["error"], str) else ""
        rows.append(
            {
                "trial_id": r["trial_id"],
                "config": stats.group_label({"variant": r["variant"], "rank": rank}),
                "seed": r["seed"],
                "status": r["status"],
                "error": err.strip()[:600],
            }
        )
    return rows


# ----------------------------------------------------------------------------- public


def build_report(
    trials: pd.DataFrame,
    curves: pd.DataFrame | None,
    meta: dict[str, Any],
    out_dir: str | Path,
    *,
    analysis_kwargs: dict[str, Any] | None = None,
    gpu_limits_gb: Sequence[float] = (24, 40, 80),
    extra_sections: list[dict[str, str]] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and the plot PNGs beside it.

    Args:
        trials: one row per trial (the store's ``trials_frame()`` or a loaded table).
        curves: ``trial_id, curve, step, value`` rows, or None.
        meta: ``{"name", "task", "spec", "spec_yaml", "environment": {...}}``; all optional.
        out_dir: folder to write into (created).
        analysis_kwargs: passed to ``stats.analyze`` (metric, direction, by, cost, ...).
        gpu_limits_gb: GPU sizes drawn on the memory plot.
        extra_sections: ``[{"title", "html"}]`` appended before the provenance (trusted HTML).

    Returns:
        The path of report.html.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(analysis_kwargs or {})
    analysis = stats.analyze(trials, **kwargs)
    metric = analysis["metric"]
    pngs = plots.render_all(
        trials,
        curves,
        out,
        metric=metric,
        gpu_limits_gb=gpu_limits_gb,
        direction=analysis["direction"],
        cost=kwargs.get("cost") or "train_seconds",
    )
    images = [
        {
            "name": name,
            "title": name.replace("_", " ").capitalize(),
            "caption": PLOT_CAPTIONS.get(name, ""),
            "data": base64.b64encode(path.read_bytes()).decode("ascii"),
        }
        for name, path in pngs.items()
    ]
    headers, summary = _summary_rows(trials, analysis, kwargs.get("by"))
    meta = dict(meta or {})
    env = dict(meta.get("environment") or {})
    rec = analysis.get("recommended")
    status_counts = stats.prepare_trials(trials)["status"].value_counts().to_dict()
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
        files("lorasweep").joinpath("templates/report.html.j2").read_text(encoding="utf-8")
    )
    html = template.render(
        name=meta.get("name") or "LoRA sweep",
        task=meta.get("task") or "",
        model=_first(trials, "model"),
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        analysis=analysis,
        metric=metric,
        direction=analysis["direction"],
        recommended=stats.group_label(rec["key"]) if rec else None,
        recommended_value=fmt_mean_std(rec["mean"], rec["std"]) if rec else "",
        reason=re.split(r"(?<=\.)\s+(?=[A-Z])", analysis["reason"]),
        best=stats.group_label(analysis["best"]["key"]) if analysis.get("best") else None,
        comparison=_comparison_rows(analysis),
        summary_headers=headers,
        summary=summary,
        problems=_problem_rows(trials, metric),
        images=images,
        extra_sections=extra_sections or [],
        environment=env,
        spec_yaml=meta.get("spec_yaml") or "",
        status_counts=status_counts,
        n_trials=len(trials),
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def _first(df: pd.DataFrame, col: str) -> str:
    if col in df and df[col].notna().any():
        return str(df[col].dropna().iloc[0])
    return ""


def export_trials(trials: pd.DataFrame, path: str | Path, fmt: str = "csv") -> Path:
    """Write the trials table as CSV or as JSON (a list of row objects, NaN as null)."""
    path = Path(path)
    if fmt not in ("csv", "json"):
        raise ValueError(f"fmt: {fmt!r} must be 'csv' or 'json'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        trials.to_csv(path, index=False)
    else:
        clean = trials.replace([np.inf, -np.inf], np.nan)
        rows = clean.astype(object).where(clean.notna(), None).to_dict(orient="records")
        path.write_text(json.dumps(rows, indent=1, default=_json_default, allow_nan=False))
    return path


def _json_default(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.bool_):
        return bool(v)
    return str(v)

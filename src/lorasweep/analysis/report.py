"""The HTML report and the trial exports: the one place that assembles the report.

Computes nothing beyond formatting (``units``): the numbers come from ``stats``, the figures from
``plots``, the optional sections (pruning, adapter spectra) from ``report_sections``, which
renders what ``pruning_summary``, ``tools.spectrum`` and ``verify_summary`` return. The report is
one self-contained file (PNGs embedded as base64); the PNGs are also written beside it so they
can be reused in slides and papers. ``write_run_report`` builds it from a run folder's store.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lorasweep.analysis import plots, report_tuning, stats
from lorasweep.analysis.compare import key_scalar
from lorasweep.analysis.plot_text import axis_label
from lorasweep.analysis.pruning_summary import pruning_summary
from lorasweep.analysis.report_sections import (
    plot_captions,
    pruning_section_html,
    render,
    spectrum_section_html,
    wide_interval,
    wrap_tables,
)
from lorasweep.analysis.units import decimals_for, fmt_fixed, fmt_mean_std, fmt_num, fmt_p, fmt_sig
from lorasweep.analysis.verify_summary import verify_report_info
from lorasweep.spec import analysis_kwargs
from lorasweep.store import open_store

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


# ----------------------------------------------------------------------------- tables


def _summary_rows(trials: pd.DataFrame, analysis: dict, by: Any) -> tuple[list, list[dict]]:
    """Header names and formatted rows of the all-metrics table: every configuration (with a
    tuned setting, every value tried; the chosen ones are marked)."""
    by = (analysis.get("factors") or {}).get("by") or by
    table = stats.summary_table(trials, list(SUMMARY_METRICS), by=by)
    shown = [
        m for m in SUMMARY_METRICS if f"{m}_mean" in table and table[f"{m}_mean"].notna().any()
    ]
    best = (analysis.get("best") or {}).get("key")
    rec = (analysis.get("recommended") or {}).get("key")
    chosen = [g["key"] for g in analysis["groups"]] if analysis.get("tuning") else []
    settings = report_tuning.setting_keys(analysis)
    key_cols = [
        c for c in table.columns if c not in ("n", "n_total") and not c.endswith(("_mean", "_std"))
    ]
    rows = []
    for _, r in table.iterrows():
        key = {c: key_scalar(None if pd.isna(r[c]) else r[c]) for c in key_cols}
        cells = [
            {  # the mean to sort by: "1.14 MiB" and "156.73 KiB" do not sort as text
                "text": fmt_mean_std(r[f"{m}_mean"], r[f"{m}_std"], SUMMARY_METRICS[m][1]),
                "sort": "" if pd.isna(r[f"{m}_mean"]) else f"{r[f'{m}_mean']:.10g}",
            }
            for m in shown
        ]
        rows.append(
            {
                "label": report_tuning.row_label(key, settings),
                "settings": report_tuning.setting_cells(key, settings),
                "n": f"{int(r['n'])}/{int(r['n_total'])}",
                "cells": cells,
                "best": key == best,
                "recommended": key == rec,
                "chosen": key in chosen,
            }
        )
    return [SUMMARY_METRICS[m][0] for m in shown], rows


def _comparison_rows(analysis: dict) -> list[dict]:
    best = (analysis.get("best") or {}).get("key")
    rec = (analysis.get("recommended") or {}).get("key")
    places = decimals_for((analysis.get("design") or {}).get("sigma")) or decimals_for(
        (analysis.get("margin") or {}).get("absolute")
    )

    def interval(ci: list | None) -> str:
        if not ci:
            return "-"
        lo, hi = (fmt_fixed(x, places, signed=True) for x in ci)
        return f"[{lo}, {hi}]"

    settings = report_tuning.setting_keys(analysis)
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
        if g.get("seeds_collapsed") or g.get("seeds_diverged"):
            badges.append(("unstable", "warn"))
        if g.get("learned") is False:
            badges.append(("did not learn", "warn"))
        rows.append(
            {
                "label": report_tuning.row_label(g["key"], settings),
                "settings": report_tuning.setting_cells(g["key"], settings),
                "n": g["n"],
                "mean": fmt_mean_std(g["mean"], g["std"]),
                "ci": f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]" if ci else "-",
                "reference": stats.group_label(g["reference"]) if g.get("reference") else "-",
                "diff": fmt_fixed(g.get("diff"), places, signed=True),
                "bound": fmt_fixed(g.get("diff_bound"), places, signed=True),
                "diff_ci": interval(g.get("diff_ci")),
                "examples": interval(g.get("diff_ci_examples")),
                "within": "yes" if g.get("within_margin") else "no",
                "note": g.get("note") or "",
                "test": g["test"] or "-",
                "p_adj": fmt_p(g["p_adjusted"]),
                "cost": fmt_num(g["cost"]),
                "badges": badges,
                "worse": g["significantly_worse"],
            }
        )
    return rows


def _problem_rows(trials: pd.DataFrame, metric: str) -> list[dict]:
    probs = stats.problem_trials(trials, metric)
    key_cols = [c for c in probs.columns if c not in ("trial_id", "seed", "status", "error")]
    rows = []
    for _, r in probs.iterrows():
        key = {c: key_scalar(None if pd.isna(r[c]) else r[c]) for c in key_cols}
        err = r["error"] if isinstance(r["error"], str) else ""
        rows.append(
            {
                "trial_id": r["trial_id"],
                "config": stats.group_label(key),
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
    # long: one template, one render call naming each of its values

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
        report_tuning.plot_frame(trials, analysis),
        curves,
        out,
        metric=metric,
        gpu_limits_gb=gpu_limits_gb,
        direction=analysis["direction"],
        cost=kwargs.get("cost") or "train_seconds",
    )
    captions = plot_captions(trials, metric, kwargs.get("cost") or "train_seconds")
    images = [
        {
            "name": name,
            "title": name.replace("_", " ").capitalize(),
            "caption": captions.get(name, ""),
            "data": base64.b64encode(path.read_bytes()).decode("ascii"),
        }
        for name, path in pngs.items()
    ]
    headers, summary = _summary_rows(trials, analysis, kwargs.get("by"))
    settings = report_tuning.setting_keys(analysis)
    meta = dict(meta or {})
    env = dict(meta.get("environment") or {})
    rec = analysis.get("recommended")
    status_counts = stats.prepare_trials(trials)["status"].value_counts().to_dict()
    html = render(
        "report.html.j2",
        name=meta.get("name") or "LoRA sweep",
        task=meta.get("task") or "",
        model=_first(trials, "model"),
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        analysis=analysis,
        metric=metric,
        direction=analysis["direction"],
        recommended=stats.group_label(rec["key"]) if rec else None,
        recommended_value=fmt_mean_std(rec["mean"], rec["std"]) if rec else "",
        reason=_reason_lines(analysis["reason"]),
        best=stats.group_label(analysis["best"]["key"]) if analysis.get("best") else None,
        comparison=_comparison_rows(analysis),
        cost_header=f"cost: {axis_label(analysis['cost'])}" if analysis.get("cost") else "cost",
        wide=wide_interval(analysis),
        has_examples=any(g.get("diff_ci_examples") for g in analysis["groups"]),
        margin_note=_margin_note(analysis),
        design_note=_design_note(analysis),
        setting_headers=report_tuning.setting_headers(settings),
        tuning=report_tuning.tuning_view(analysis),
        factors=report_tuning.factors_view(analysis, trials, out),
        summary_headers=headers,
        summary=summary,
        problems=_problem_rows(trials, metric),
        images=images,
        extra_sections=[
            {**s, "html": wrap_tables(s["html"]), "id": re.sub(r"\W+", "-", s["title"].lower())}
            for s in extra_sections or []
        ],
        environment=env,
        spec_yaml=meta.get("spec_yaml") or "",
        status_counts=status_counts,
        n_trials=len(trials),
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def _reason_lines(reason: str) -> list[str]:
    """The reason's sentences for the card; "No recommendation: " is the card's title already."""
    if reason.startswith("No recommendation: "):
        rest = reason.removeprefix("No recommendation: ")
        reason = rest[:1].upper() + rest[1:]
    return re.split(r"(?<=\.)\s+(?=[A-Z])", reason)


def _margin_note(analysis: dict) -> str:
    m = analysis.get("margin")
    if not m:
        return ""
    amount = (
        f"{m['value'] * 100:g}% of the best mean = {m['absolute']:.3g}"
        if m["relative"]
        else (f"{m['absolute']:g}")
    )
    how = (
        "the default for this metric (set with --margin or analysis.margin)"
        if m["default"]
        else "given"
    )
    return f"Margin: {amount} {analysis['metric']}, {how}."


def _design_note(analysis: dict) -> str:
    d = analysis.get("design") or {}
    if d.get("model") == "two-way":
        return (
            f"a two-way model (configuration + seed; residual sd {fmt_sig(d['sigma'])} on "
            f"{d['df']:g} degrees of freedom)"
        )
    if d.get("model") == "welch":
        return "Welch t per pair (the configurations do not share seeds)"
    return "no noise model (too few seeds)"


def _first(df: pd.DataFrame, col: str) -> str:
    if col in df and df[col].notna().any():
        return str(df[col].dropna().iloc[0])
    return ""


# ----------------------------------------------------------------------------- a run folder


def adapter_path(run_dir: Path, stored: str) -> Path:
    """Adapters are stored relative to the run folder (older runs: to the working directory)."""
    inside = run_dir / stored
    return inside if inside.exists() or not Path(stored).exists() else Path(stored)


def write_run_report(run_dir: str | Path, **kwargs: Any) -> Path | None:
    """Build ``run_dir/report.html`` from the run's store: statistics, plots, and the pruning
    and adapter-spectra sections when the run has them. None when no trial is complete.

    ``kwargs`` go to :func:`build_report` (``analysis_kwargs``, ``gpu_limits_gb``). The
    analysis follows the ``analysis:`` section of the run's spec (its ``margin``); the
    ``analysis_kwargs`` given override it (``{"margin": "2%"}``, as ``lorasweep report
    --margin``).
    """
    run_dir = Path(run_dir)
    with open_store(run_dir) as store:
        rows = store.trials()
        trials, curves, meta = store.trials_frame(rows), store.curves_frame(), store.meta()
    kwargs["analysis_kwargs"] = analysis_kwargs(meta.get("spec"), kwargs.get("analysis_kwargs"))
    meta["environment"] = next((t["environment"] for t in rows if t["environment"]), {})
    if trials.empty or trials["status"].ne("complete").all():
        return None  # nothing measured yet: `lorasweep status` shows the failures
    adapters = {
        t["label"]: adapter_path(run_dir, t["artifacts"]["adapter_dir"])
        for t in rows
        if t["status"] == "complete" and t["artifacts"].get("adapter_dir")
    }
    sections = []
    if meta.get("prune"):
        sections.append(_pruning_section(meta, trials, kwargs["analysis_kwargs"]))
    if adapters:
        sections += spectrum_sections(adapters, meta, trials)
    return build_report(trials, curves, meta, run_dir, extra_sections=sections, **kwargs)


def _pruning_section(meta: dict, trials: pd.DataFrame, analysis_kwargs: dict) -> dict[str, str]:
    rec = stats.analyze(trials, **analysis_kwargs).get("recommended")
    summary = pruning_summary(meta["prune"], trials)
    html = pruning_section_html(summary, stats.group_label(rec["key"]) if rec else None)
    return {"title": "Pruning", "html": html}


def spectrum_sections(
    adapters: dict[str, Path], meta: dict, trials: pd.DataFrame
) -> list[dict[str, str]]:
    """The report's "Adapter spectra" section (its one heading is the title; the HTML has none)
    of the adapters still on disk; a section that fails says why instead of blocking the
    report."""
    try:
        existing = {k: v for k, v in adapters.items() if v.exists()}
        if not existing:
            return []
        verify = verify_report_info(meta, trials)  # `spectrum --verify` variants marked
        html = spectrum_section_html(existing, verify=verify)
    except Exception as e:  # noqa: BLE001 - an extra section never blocks the report
        html = f"<p>not available: {escape(str(e))}</p>"
    return [{"title": "Adapter spectra: the rank actually used", "html": html}]


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

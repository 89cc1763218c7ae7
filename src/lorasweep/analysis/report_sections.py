"""The report's templates, the words around its figures and tables, and the HTML of its optional
sections: "Pruning" and "Adapter spectra".

Each section is rendered from data that another module returns (``pruning_summary``, the
spectra of ``tools.spectrum.report_spectra``, the ``--verify`` records of ``verify_summary``)
through a jinja template in ``lorasweep/templates``; nothing here computes a statistic. The
sections go into ``report.build_report`` as ``extra_sections``; every table of the page sits in
a horizontal scroll box (``wrap_tables``), so a wide table never widens the page on a phone.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup, escape
from matplotlib.figure import Figure

from lorasweep.analysis.explain import group_label
from lorasweep.analysis.plot_text import quantity
from lorasweep.analysis.pruning_summary import cheaper_dropped
from lorasweep.analysis.tables import memory_column
from lorasweep.analysis.tool_plots import rank_use_data, rank_use_figure
from lorasweep.analysis.units import fmt_num, fmt_seconds, fmt_sig
from lorasweep.tools.spectrum import report_spectra  # numpy + safetensors only


@functools.cache
def _environment() -> jinja2.Environment:
    def load(name: str) -> str:
        return files("lorasweep").joinpath("templates", name).read_text(encoding="utf-8")

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(load), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["pm"] = mean_std_html
    return env


def mean_std_html(text: str) -> Markup:
    """``0.7320 ± 0.0098`` (``units.fmt_mean_std``) that a narrow table cell may break only
    before the ``±``, into the mean and its spread."""
    mean, sep, std = (escape(t) for t in str(text).partition(" ± "))
    if not sep:
        return Markup(mean)
    return Markup(f'<span class="nw">{mean}</span> <span class="nw">± {std}</span>')


def render(template: str, **context: Any) -> str:
    """Render ``lorasweep/templates/<template>`` (autoescaped: data is never trusted HTML)."""
    return _environment().get_template(template).render(**context)


def png_base64(fig: Figure, dpi: int = 100) -> str:
    """A figure as base64 PNG, for an ``<img src="data:image/png;base64,...">``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def wrap_tables(html: str) -> str:
    """Every ``<table>`` of ``html`` inside a ``<div class="table-wrap">`` (the report's
    horizontal scroll box) unless it is in one already."""

    def wrap(m: re.Match) -> str:
        return m.group(0) if m.group(1) else f'<div class="table-wrap">{m.group(2)}</div>'

    return re.sub(r'(<div class="table-wrap">\s*)?(<table\b.*?</table>)', wrap, html, flags=re.S)


# ----------------------------------------------------------------------------- words


PLOT_CAPTIONS = {
    "metric_vs_rank": "Mean over seeds with 95% t confidence intervals. Variants without a rank "
    "of their own are dashed lines with a shaded CI band. Other settings that vary get a line "
    "per value; a tuned setting shows its chosen value at each rank.",
    "time_vs_rank": "Wall seconds of the training loop alone (loading and eval timed apart).",
    "memory_vs_rank": "Peak GPU memory allocated per trial; dotted lines mark common GPU sizes.",
    "efficiency": "Metric per hour of training: where extra rank stops paying for itself.",
    "pareto": "Configurations that no other beats on both {metric} and {cost} form the front "
    "(the blue line).",
    "loss_curves": "Training loss averaged over seeds, one line per configuration.",
    "memory_estimate": "Estimator's predicted peak vs the measured peak; points on y = x are "
    "exact.",
}
# without a GPU measurement the memory plot shows the CPU's peak and draws no GPU sizes
CPU_MEMORY_CAPTION = (
    "Peak CPU memory (resident set size) per trial. No GPU memory was measured, so no GPU sizes "
    "are drawn: CPU memory does not say what fits on a GPU."
)


def plot_captions(trials: pd.DataFrame, metric: str, cost: str) -> dict[str, str]:
    """The plots' captions; the memory plot's says what was measured (GPU lines only with a
    GPU measurement)."""
    out = {
        k: v.format(metric=quantity(metric), cost=quantity(cost)) for k, v in PLOT_CAPTIONS.items()
    }
    if memory_column(trials) != "peak_gpu_allocated_bytes":
        out["memory_vs_rank"] = CPU_MEMORY_CAPTION
    return out


def wide_interval(analysis: dict) -> dict[str, str] | None:
    """The widest 95% CI of a configuration's mean when it is too wide to read much into: its
    half-width above twice the margin (above 10% of the mean without a margin). "No flags"
    then is no reassurance, and the report says so."""
    margin = (analysis.get("margin") or {}).get("absolute")
    widest, half = None, 0.0
    for g in analysis["groups"]:
        ci = g.get("ci95")
        if ci and all(isinstance(v, float | int) and math.isfinite(v) for v in ci):
            if (ci[1] - ci[0]) / 2 > half * (1 + 1e-9):  # ties: the first
                widest, half = g, (ci[1] - ci[0]) / 2
    if widest is None:
        return None
    limit = 2 * margin if margin else 0.1 * abs(widest["mean"])
    if not half > limit:
        return None
    lo, hi = widest["ci95"]
    return {
        "label": group_label(widest["key"]),
        "ci": f"[{fmt_num(lo)}, {fmt_num(hi)}]",
        "half": fmt_sig(half),
        "than": f"more than twice the {fmt_sig(margin)} margin"
        if margin
        else "more than 10% of its mean",
        "n": str(widest["n"]),
    }


# ----------------------------------------------------------------------------- pruning


def _why(reason: str) -> str:
    """A rung reason without its verdict prefix (the table has a decision column)."""
    for prefix in ("dropped: ", "kept: "):
        reason = reason.removeprefix(prefix)
    return reason


def _secs(x: float) -> str:
    return fmt_seconds(x, minutes_from=100, hours_from=math.inf)


def pruning_section_html(summary: Mapping[str, Any], recommended: str | None) -> str:
    """The report's "Pruning" section from ``pruning_summary.pruning_summary``: the rule, what
    each rung decided, what it saved, and what it means for the recommendation."""
    s = summary
    st = s["settings"]
    rows = []
    for d in s["decisions"]:
        for c in sorted(d["means"], key=lambda c: d["keep"].index(c) if c in d["keep"] else 99):
            rows.append(
                {
                    "step": d["step"],
                    "config": c,
                    "seeds": d["seeds"].get(c, ""),
                    "mean": f"{d['means'][c]:.4g}",
                    "verdict": "dropped" if c in d["drop"] else "kept",
                    "why": _why(d["reasons"].get(c, "")),
                }
            )
    return render(
        "pruning.html.j2",
        s=s,
        rungs=", ".join(map(str, s["rungs"])),
        alpha=f"{st['alpha']:g}",
        tolerance=f"{st['tolerance']:g}" if st.get("tolerance") else "",
        eval_examples=st.get("eval_examples"),
        run_steps=f"{s['run_trial_steps']:.0f}",
        saved=f"{100 * s['saved_fraction']:.0f}",
        train_time=_secs(s["train_seconds"]),
        full_time=_secs(s["full_train_seconds_estimate"]),
        rung_time=_secs(s["rung_eval_seconds"]),
        rows=rows,
        recommended=recommended,
        cheaper=cheaper_dropped(s, recommended),
    )


# ----------------------------------------------------------------------------- spectra


def spectrum_section_html(
    adapter_dirs: Mapping[str, str | Path],
    energy: float = 0.9,
    verify: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The "Adapter spectra" section: effective vs nominal rank per trained adapter, a plot,
    and the rank suggested by the highest-rank adapter. Unreadable adapters get a row saying why.

    ``verify``: the ``lorasweep spectrum --verify`` records of the run
    (``verify_summary.verify_report_info``): the trials of the suggested variants are marked in
    the table, and each record gets a paragraph and a table comparing the suggested variants
    with the pilot's variant.
    """
    data = report_spectra(adapter_dirs, energy)
    suggested = {v: rec for rec in (verify or []) for v in rec.get("variants", {})}
    rows = []
    for a in data["adapters"]:
        sp, notes = a["spectrum"], a["notes"]
        rec = suggested.get(str(sp["label"]).split("/")[0])
        if rec is not None:
            notes = [f"verifies the suggestion of {rec.get('pilot')}", *notes]
        rows.append(
            [sp["label"], sp["variant"], sp["nominal_rank"], f"{sp['mean_effective_rank']:.2f}",
             *a["energy_ranks"], a["suggestion"]["suggested_rank"], "; ".join(notes)]
        )  # fmt: skip
    pilot = data["pilot"]
    figure = rank_use_figure(rank_use_data(data["adapters"], energy)) if rows else None
    return render(
        "spectrum.html.j2",
        empty=not data["adapters"] and not data["failed"],
        percent=f"{energy:.0%}",
        rows=rows,
        failed=data["failed"],
        png=png_base64(figure) if figure else None,
        pilot=pilot["label"] if pilot else None,
        suggestion=pilot["suggestion"] if pilot else None,
        group_json=json.dumps(pilot["suggestion"]["group_ranks"]) if pilot else "",
        variant_json=json.dumps(pilot["suggestion"]["pattern_variant"]) if pilot else "",
        verify=[_verify_view(rec) for rec in verify or []],
    )


def _verify_view(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One ``--verify`` record as the template shows it."""
    compare = [
        {
            "cells": [
                r["variant"],
                "pattern" if r["rank"] is None else r["rank"],
                r["trials"],
                "-" if r["mean"] is None else f"{r['mean']:.4g}",
                "suggested" if r["suggested"] else "pilot's variant",
            ],
            "suggested": r["suggested"],
        }
        for r in rec.get("compare") or []
    ]
    rows = rec.get("compare") or []
    return {
        "pilot": str(rec.get("pilot")),
        "percent": f"{float(rec.get('energy', 0.9)):.0%}",
        "suggested_rank": str(rec.get("suggested_rank")),
        "group_json": json.dumps(rec.get("group_ranks", {})),
        "added": [(n, json.dumps(v)) for n, v in (rec.get("variants") or {}).items()],
        "notes": rec.get("notes") or [],
        "metric": rows[0]["metric"] if rows else "",
        "compare": compare,
    }

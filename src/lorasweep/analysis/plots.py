"""Plots of a sweep: ``*_data()`` pure functions returning DataFrames, and matplotlib renderers
(Agg, no pyplot state) returning a ``Figure``.

Rank is drawn on a log2 axis. Variants without a rank of their own (rank NaN) are drawn as a
horizontal dashed line with their 95% CI band on rank plots, and as ordinary points where the
x-axis is a cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from lorasweep.analysis import stats  # noqa: E402
from lorasweep.analysis.plot_text import (  # noqa: E402
    DPI,
    LABEL,
    LEGEND,
    SMALL,
    axis_label,
    new_figure,
    place_labels,
    quantity,
)

GIB = 1024**3
DEFAULT_GPU_LIMITS_GB = (24, 40, 80)
_COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"]


# ----------------------------------------------------------------------------- data


def metric_vs_rank_data(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """n, mean, std and 95% CI of ``metric`` per (variant, rank), complete finite trials."""
    return stats.describe(trials, metric, by=["variant", "rank"])


def time_vs_rank_data(trials: pd.DataFrame, column: str = "train_seconds") -> pd.DataFrame:
    """Training time per (variant, rank): same columns as ``metric_vs_rank_data``."""
    return stats.describe(trials, column, by=["variant", "rank"])


def memory_vs_rank_data(trials: pd.DataFrame) -> pd.DataFrame:
    """Peak memory per (variant, rank), in GiB. ``attrs["column"]`` names the source column
    (peak GPU allocated when measured, else peak CPU RSS; None when neither)."""
    col = stats.memory_column(trials)
    if col is None:
        out = stats.describe(trials.iloc[:0].assign(_m=np.nan), "_m", by=["variant", "rank"])
    else:
        gib = trials.assign(_m=pd.to_numeric(trials[col], errors="coerce") / GIB)
        out = stats.describe(gib, "_m", by=["variant", "rank"])
    out.attrs["column"] = col
    return out


def efficiency_data(
    trials: pd.DataFrame, metric: str, direction: str | None = None
) -> pd.DataFrame:
    """Metric per training hour per (variant, rank). For a lower-is-better metric the
    reciprocal is used (1/perplexity per hour); ``attrs["label"]`` says which."""
    higher = stats.resolve_direction(metric, direction) == "higher"
    df = stats.prepare_trials(trials)
    m = pd.to_numeric(df[metric], errors="coerce") if metric in df else np.nan
    hours = pd.to_numeric(df.get("train_seconds", np.nan), errors="coerce") / 3600
    value = m if higher else 1.0 / m
    df["_eff"] = (value / hours.where(hours > 0)).replace([np.inf, -np.inf], np.nan)
    out = stats.describe(df, "_eff", by=["variant", "rank"])
    out.attrs["label"] = f"{'' if higher else '1/'}{quantity(metric)} per training hour"
    return out


def pareto_data(
    trials: pd.DataFrame, metric: str, cost: str = "train_seconds", direction: str | None = None
) -> pd.DataFrame:
    """Mean metric and mean cost per (variant, rank), with ``on_front`` True for the
    configurations no other configuration beats on both (cheaper-or-equal and better-or-equal,
    one strictly)."""
    sign = 1.0 if stats.resolve_direction(metric, direction) == "higher" else -1.0
    m = stats.describe(trials, metric, by=["variant", "rank"])
    c = stats.describe(trials, cost, by=["variant", "rank"]) if cost in trials else None
    if c is None or m.empty:
        return pd.DataFrame(columns=["variant", "rank", "metric", "cost", "on_front"])
    df = m[["variant", "rank", "mean"]].rename(columns={"mean": "metric"})
    df = df.merge(
        c[["variant", "rank", "mean"]].rename(columns={"mean": "cost"}),
        on=["variant", "rank"],
        how="inner",
    )
    front = []
    for _, p in df.iterrows():
        dominated = (
            (df["cost"] <= p["cost"])
            & (sign * df["metric"] >= sign * p["metric"])
            & ((df["cost"] < p["cost"]) | (sign * df["metric"] > sign * p["metric"]))
        ).any()
        front.append(not dominated)
    return df.assign(on_front=front).sort_values("cost").reset_index(drop=True)


def loss_curves_data(
    trials: pd.DataFrame, curves: pd.DataFrame, curve: str = "train_loss"
) -> pd.DataFrame:
    """Mean of ``curve`` over seeds per (variant, rank, step), complete trials only, with the
    number of seeds ``n`` contributing at each step."""
    cols = ["variant", "rank", "step", "value", "n"]
    if curves is None or curves.empty:
        return pd.DataFrame(columns=cols)
    df = stats.prepare_trials(trials)
    done = df.loc[df["status"] == "complete", ["trial_id", "variant", "rank"]]
    c = curves[curves["curve"] == curve].merge(done, on="trial_id")
    if c.empty:
        return pd.DataFrame(columns=cols)
    g = c.groupby(["variant", "rank", "step"], dropna=False)["value"]
    return g.agg(value="mean", n="count").reset_index()[cols]


def memory_estimate_data(trials: pd.DataFrame) -> pd.DataFrame:
    """Estimated vs measured peak memory (GiB) per (variant, rank) where both are known;
    ``attrs["column"]`` names the measured column."""
    col = stats.memory_column(trials)
    out = pd.DataFrame(columns=["variant", "rank", "estimated", "measured"])
    out.attrs["column"] = col
    if col is None or "estimated_peak_bytes" not in trials:
        return out
    df = stats.prepare_trials(trials)
    df = (
        df[df["status"] == "complete"]
        .assign(
            estimated=pd.to_numeric(df["estimated_peak_bytes"], errors="coerce") / GIB,
            measured=pd.to_numeric(df[col], errors="coerce") / GIB,
        )
        .dropna(subset=["estimated", "measured"])
    )
    if df.empty:
        return out
    res = df.groupby(["variant", "rank"], dropna=False)[["estimated", "measured"]].mean()
    res = res.reset_index()
    res.attrs["column"] = col
    return res


# ----------------------------------------------------------------------------- drawing


def _figure(title: str) -> tuple[Figure, object]:
    fig, ax = new_figure(title)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _note(ax: object, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#6b7280")


def _log2_rank_axis(ax: object, ranks: Sequence[float]) -> None:
    ranks = sorted({float(r) for r in ranks if r is not None and np.isfinite(r) and r > 0})
    if not ranks:
        return
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ranks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{r:g}" for r in ranks])
    lo, hi = ranks[0], ranks[-1]
    ax.set_xlim(lo / 2**0.4, hi * 2**0.4)
    ax.set_xlabel("rank r (log2 axis)", fontsize=LABEL)


def _rank_lines(ax: object, data: pd.DataFrame, ylabel: str) -> list[str]:
    """Error-bar line per variant over rank; rankless variants as dashed line + CI band.
    Returns the names of variants drawn without a rank."""
    rankless = []
    if data.empty:
        _note(ax, "no complete trials")
        return rankless
    for i, (variant, g) in enumerate(data.groupby("variant", sort=True)):
        color = _COLORS[i % len(_COLORS)]
        ranked = g[g["rank"].notna()].sort_values("rank")
        for _, row in g[g["rank"].isna()].iterrows():
            rankless.append(str(variant))
            ax.axhline(row["mean"], ls="--", color=color, lw=1.5, label=f"{variant} (no rank)")
            if np.isfinite(row["ci_lo"]):
                ax.axhspan(row["ci_lo"], row["ci_hi"], color=color, alpha=0.12, lw=0)
        if ranked.empty:
            continue
        lo = (ranked["mean"] - ranked["ci_lo"]).fillna(0).clip(lower=0)
        hi = (ranked["ci_hi"] - ranked["mean"]).fillna(0).clip(lower=0)
        ax.errorbar(
            ranked["rank"],
            ranked["mean"],
            yerr=[lo, hi],
            marker="o",
            capsize=4,
            color=color,
            lw=1.8,
            label=str(variant),
        )
    _log2_rank_axis(ax, data["rank"].dropna().tolist())
    ax.set_ylabel(ylabel, fontsize=LABEL)
    _legend(ax)
    return rankless


def _legend(ax: object, **kwargs: object) -> None:
    """The legend, smaller and in two columns when it has many entries."""
    n = len(ax.get_legend_handles_labels()[1])
    if n:
        ax.legend(fontsize=LEGEND if n <= 4 else SMALL, ncol=1 if n <= 6 else 2, frameon=False,
                  **kwargs)  # fmt: skip


def plot_metric_vs_rank(data: pd.DataFrame, metric: str, direction: str | None = None) -> Figure:
    """Mean metric per rank with 95% CI error bars, one line per variant."""
    d = stats.resolve_direction(metric, direction)
    fig, ax = _figure(f"{quantity(metric)} vs rank (mean, 95% CI; {d} is better)")
    _rank_lines(ax, data, axis_label(metric))
    return fig


def plot_time_vs_rank(data: pd.DataFrame) -> Figure:
    """Training-loop wall time per rank (mean, 95% CI)."""
    fig, ax = _figure("Training time vs rank (mean, 95% CI)")
    _rank_lines(ax, data, axis_label("train_seconds"))
    return fig


def plot_memory_vs_rank(
    data: pd.DataFrame, gpu_limits_gb: Sequence[float] = DEFAULT_GPU_LIMITS_GB
) -> Figure:
    """Peak memory per rank (GiB) with horizontal lines at common GPU memory sizes."""
    col = data.attrs.get("column")
    gpu = col == "peak_gpu_allocated_bytes"
    what = quantity(col) if col else "peak memory"
    # CPU RSS is not comparable to GPU memory sizes: no limit lines, the title says so instead.
    how = "mean, 95% CI" if gpu else "no GPU measured"
    fig, ax = _figure(f"{what[:1].upper()}{what[1:]} vs rank ({how})")
    if col is None:
        _note(ax, "no memory measurements")
        return fig
    _rank_lines(ax, data, axis_label(col))
    if not gpu:
        return fig
    top = float(np.nanmax(data["ci_hi"].fillna(data["mean"]))) if not data.empty else 0.0
    for lim in sorted(gpu_limits_gb):
        # Draw limits up to the first one above the data, so small runs stay readable.
        ax.axhline(lim, color="#9ca3af", ls=":", lw=1.2)
        ax.text(ax.get_xlim()[0], lim, f" {lim:g} GB GPU", va="bottom", fontsize=SMALL,
                color="#6b7280")  # fmt: skip
        if lim >= top:
            break
    ax.set_ylim(bottom=0)
    return fig


def plot_efficiency(data: pd.DataFrame) -> Figure:
    """Metric per training hour per rank."""
    label = data.attrs.get("label", "metric per training hour")
    fig, ax = _figure(f"Efficiency: {label}")
    _rank_lines(ax, data, label)
    return fig


def plot_pareto(data: pd.DataFrame, metric: str, cost: str = "train_seconds") -> Figure:
    """Mean metric vs mean cost per configuration; the Pareto front highlighted and joined."""
    fig, ax = _figure(f"Pareto front: {quantity(metric)} vs {quantity(cost)}")
    if data.empty:
        _note(ax, f"needs {quantity(metric)} and {quantity(cost)}")
        return fig
    scale = GIB if cost.endswith("bytes") else 1.0
    x = data["cost"] / scale
    off = ~data["on_front"].astype(bool)
    if off.any():  # no legend entry for points that are not there
        ax.scatter(x[off], data["metric"][off], color="#9ca3af", s=36, label="dominated", zorder=2)
    front = data[data["on_front"].astype(bool)].sort_values("cost")
    ax.plot(
        front["cost"] / scale,
        front["metric"],
        "-o",
        color="#2563eb",
        ms=7,
        zorder=3,
        label="Pareto front",
    )
    ax.set_xlabel(axis_label(cost), fontsize=LABEL)
    ax.set_ylabel(axis_label(metric), fontsize=LABEL)
    _margins(ax, x, data["metric"])
    _legend(ax)
    place_labels(ax, list(x), list(data["metric"]), _point_labels(data))
    return fig


def _margins(ax: object, x: pd.Series, y: pd.Series) -> None:
    """Room around the points for their labels."""
    for lo, hi, set_lim in ((x.min(), x.max(), ax.set_xlim), (y.min(), y.max(), ax.set_ylim)):
        pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
        set_lim(lo - pad, hi + pad)


def _point_labels(data: pd.DataFrame) -> list[str]:
    return [
        stats.group_label({"variant": v, "rank": _int(r)})
        for v, r in zip(data["variant"], data["rank"])
    ]


def plot_loss_curves(data: pd.DataFrame, curve: str = "train_loss") -> Figure:
    """One line per (variant, rank): the curve averaged over seeds."""
    what = quantity(curve)
    fig, ax = _figure(f"{what[:1].upper()}{what[1:]} per configuration (mean over seeds)")
    if data.empty:
        _note(ax, f"no {quantity(curve)} curves")
        return fig
    keys = data[["variant", "rank"]].drop_duplicates().sort_values(["variant", "rank"])
    cmap = matplotlib.colormaps["viridis"]
    for i, (_, k) in enumerate(keys.iterrows()):
        sel = (data["variant"] == k["variant"]) & (
            data["rank"].isna() if pd.isna(k["rank"]) else data["rank"] == k["rank"]
        )
        g = data[sel].sort_values("step")
        color = cmap(i / max(len(keys) - 1, 1) * 0.9)
        ax.plot(
            g["step"],
            g["value"],
            color=color,
            lw=1.5,
            label=stats.group_label({"variant": k["variant"], "rank": _int(k["rank"])}),
        )
    ax.set_xlabel("step", fontsize=LABEL)
    ax.set_ylabel(axis_label(curve), fontsize=LABEL)
    _legend(ax)
    return fig


def plot_memory_estimate(data: pd.DataFrame) -> Figure:
    """Estimated vs measured peak memory per configuration, with the y = x line."""
    col = data.attrs.get("column")
    fig, ax = _figure("Estimated vs measured peak memory (GiB)")
    if data.empty:
        _note(ax, "no estimates")
        return fig
    ax.scatter(data["estimated"], data["measured"], color="#2563eb", alpha=0.8, zorder=3)
    hi = float(max(data["estimated"].max(), data["measured"].max())) * 1.15
    ax.plot([0, hi], [0, hi], ls="--", color="#9ca3af", label="y = x")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel(axis_label("estimated_peak_bytes"), fontsize=LABEL)
    ax.set_ylabel(f"measured {axis_label(col)}" if col else "measured (GiB)", fontsize=LABEL)
    _legend(ax, loc="upper left")
    place_labels(ax, list(data["estimated"]), list(data["measured"]), _point_labels(data))
    return fig


def _int(v: float) -> int | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)


# ----------------------------------------------------------------------------- all


def render_all(
    trials: pd.DataFrame,
    curves: pd.DataFrame | None,
    out_dir: str | Path,
    metric: str | None = None,
    gpu_limits_gb: Sequence[float] = DEFAULT_GPU_LIMITS_GB,
    *,
    direction: str | None = None,
    cost: str = "train_seconds",
) -> dict[str, Path]:
    """Write every plot that has data as ``out_dir/<name>.png``; returns {name: path}.

    Names: metric_vs_rank, time_vs_rank, memory_vs_rank, efficiency, pareto, loss_curves,
    memory_estimate. Plots without data (no times, no curves, no estimates) are skipped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = stats.prepare_trials(trials)
    metric = stats.resolve_metric(trials, metric)
    has = {c for c in trials.columns if pd.to_numeric(trials[c], errors="coerce").notna().any()}
    figs: dict[str, Figure] = {
        "metric_vs_rank": plot_metric_vs_rank(
            metric_vs_rank_data(trials, metric), metric, direction
        ),
    }
    if "train_seconds" in has:
        figs["time_vs_rank"] = plot_time_vs_rank(time_vs_rank_data(trials))
        figs["efficiency"] = plot_efficiency(efficiency_data(trials, metric, direction))
    if stats.memory_column(trials):
        figs["memory_vs_rank"] = plot_memory_vs_rank(memory_vs_rank_data(trials), gpu_limits_gb)
    if cost in has:
        figs["pareto"] = plot_pareto(pareto_data(trials, metric, cost, direction), metric, cost)
    loss = loss_curves_data(trials, curves) if curves is not None else pd.DataFrame()
    if not loss.empty:
        figs["loss_curves"] = plot_loss_curves(loss)
    est = memory_estimate_data(trials)
    if not est.empty:
        figs["memory_estimate"] = plot_memory_estimate(est)
    paths = {}
    for name, fig in figs.items():
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=DPI)
    return paths

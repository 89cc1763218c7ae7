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

GIB = 1024**3
DEFAULT_GPU_LIMITS_GB = (24, 40, 80)
_COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"]
_LABELS = {
    "train_seconds": "training time (s)",
    "trainable_params": "trainable parameters",
    "peak_gpu_allocated_bytes": "peak GPU allocated (GiB)",
    "peak_cpu_rss_bytes": "peak CPU RSS (GiB)",
}


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
    out.attrs["label"] = f"{metric if higher else '1/' + metric} per training hour"
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
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11, loc="left")
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
    ax.set_xlabel("rank r (log2)")


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
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, frameon=False)
    return rankless


def plot_metric_vs_rank(data: pd.DataFrame, metric: str, direction: str | None = None) -> Figure:
    """Mean metric per rank with 95% CI error bars, one line per variant."""
    d = stats.resolve_direction(metric, direction)
    fig, ax = _figure(f"{metric} vs rank (mean, 95% CI; {d} is better)")
    _rank_lines(ax, data, metric)
    return fig


def plot_time_vs_rank(data: pd.DataFrame) -> Figure:
    """Training-loop wall time per rank (mean, 95% CI)."""
    fig, ax = _figure("Training time vs rank (mean, 95% CI)")
    _rank_lines(ax, data, "training time (s)")
    return fig


def plot_memory_vs_rank(
    data: pd.DataFrame, gpu_limits_gb: Sequence[float] = DEFAULT_GPU_LIMITS_GB
) -> Figure:
    """Peak memory per rank (GiB) with horizontal lines at common GPU memory sizes."""
    col = data.attrs.get("column")
    label = _LABELS.get(col, "peak memory (GiB)")
    fig, ax = _figure(f"Peak memory vs rank: {label}")
    if col is None:
        _note(ax, "no memory measurements")
        return fig
    _rank_lines(ax, data, label)
    if col != "peak_gpu_allocated_bytes":
        # CPU RSS is not comparable to GPU memory sizes: no limit lines, say so instead.
        ax.set_title(f"Peak memory vs rank: {label} (no GPU measured)", fontsize=11, loc="left")
        return fig
    top = float(np.nanmax(data["ci_hi"].fillna(data["mean"]))) if not data.empty else 0.0
    for lim in sorted(gpu_limits_gb):
        # Draw limits up to the first one above the data, so small runs stay readable.
        ax.axhline(lim, color="#9ca3af", ls=":", lw=1.2)
        ax.text(ax.get_xlim()[0], lim, f" {lim:g} GB GPU", va="bottom", fontsize=8, color="#6b7280")
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
    fig, ax = _figure(f"Pareto front: {metric} vs {cost}")
    if data.empty:
        _note(ax, f"needs {metric} and {cost}")
        return fig
    scale = GIB if cost.endswith("bytes") else 1.0
    x = data["cost"] / scale
    off = ~data["on_front"].astype(bool)
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
    for _, r in data.iterrows():
        ax.annotate(
            stats.group_label({"variant": r["variant"], "rank": _int(r["rank"])}),
            (r["cost"] / scale, r["metric"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
            color="#374151",
        )
    ax.set_xlabel(_LABELS.get(cost, cost))
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, frameon=False)
    return fig


def plot_loss_curves(data: pd.DataFrame, curve: str = "train_loss") -> Figure:
    """One line per (variant, rank): the curve averaged over seeds."""
    fig, ax = _figure(f"{curve} per rank (mean over seeds)")
    if data.empty:
        _note(ax, f"no {curve} curves")
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
    ax.set_xlabel("step")
    ax.set_ylabel(curve)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    return fig


def plot_memory_estimate(data: pd.DataFrame) -> Figure:
    """Estimated vs measured peak memory per configuration, with the y = x line."""
    col = data.attrs.get("column")
    fig, ax = _figure("Estimated vs measured peak memory (GiB)")
    if data.empty:
        _note(ax, "no estimates")
        return fig
    ax.scatter(data["estimated"], data["measured"], color="#2563eb", zorder=3)
    for _, r in data.iterrows():
        ax.annotate(
            stats.group_label({"variant": r["variant"], "rank": _int(r["rank"])}),
            (r["estimated"], r["measured"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    hi = float(max(data["estimated"].max(), data["measured"].max())) * 1.1
    ax.plot([0, hi], [0, hi], ls="--", color="#9ca3af", label="y = x")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("estimated peak (GiB)")
    ax.set_ylabel(f"measured: {_LABELS.get(col, col)}")
    ax.legend(fontsize=8, frameon=False)
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
        fig.savefig(paths[name], dpi=100)
    return paths

"""The heatmap of a sweep over two factors: the mean metric per (row level, column level).

Rows are the rank (or the first factor that is not tuned), columns the tuned setting (or the
second factor). Each cell is the mean over seeds of the configurations at that pair of levels,
averaged over any other factor that varies (the configuration means first, as the marginal
means of ``factors``). The best cell of each row is outlined with a dashed line; with a tuned
setting, the value the nested selection chose for each row gets a solid box, so the picture
shows at once whether the best column moves from row to row (an interaction).

Agg renderer, no pyplot state; no torch import.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from lorasweep.analysis.compare import key_scalar  # noqa: E402
from lorasweep.analysis.factors import cell_means  # noqa: E402
from lorasweep.analysis.plot_text import (  # noqa: E402
    DPI,
    FIG_SIZE,
    LABEL,
    TICK,
    axis_label,
    quantity,
)
from lorasweep.analysis.settings import readable, value_text  # noqa: E402
from lorasweep.analysis.tables import prepare_trials  # noqa: E402
from lorasweep.analysis.units import fmt_num  # noqa: E402


def heatmap_axes(analysis: dict[str, Any]) -> tuple[str, str] | None:
    """(row factor, column factor) of ``stats.analyze``'s result, or None when fewer than two
    factors vary. Columns: the first tuned setting that varies, else the second factor; rows:
    the rank when it varies, else the first other factor."""
    names = list((analysis.get("factors") or {}).get("names") or [])
    if len(names) < 2:
        return None
    tuned = [t for t in (analysis.get("tuning") or {}).get("tuned") or [] if t in names]
    rest = [n for n in names if n not in tuned]
    row = "rank" if "rank" in rest else (rest or names)[0]
    column = tuned[0] if tuned else next(n for n in names if n != row)
    if column == row:
        column = next(n for n in names if n != row)
    return row, column


def heatmap_data(
    trials: pd.DataFrame, metric: str, rows: str, columns: str, by: list[str]
) -> pd.DataFrame:
    """``row, column, mean, n``: the mean of the configuration means (over seeds, complete
    trials with a finite ``metric``; configurations by ``by``) at each pair of levels, and
    the number of trials behind it."""
    df = prepare_trials(trials)
    df[metric] = pd.to_numeric(df[metric], errors="coerce").astype(float)
    usable = df[(df["status"] == "complete") & np.isfinite(df[metric])]
    cols = list(dict.fromkeys([*by, rows, columns]))
    cells = cell_means(usable, metric, cols)
    if cells.empty:
        return pd.DataFrame(columns=["row", "column", "mean", "n"])
    g = cells.groupby([rows, columns], dropna=False, sort=True)
    out = g.agg(mean=("mean", "mean"), n=("n", "sum")).reset_index()
    out = out.rename(columns={rows: "row", columns: "column"})
    out["row"] = out["row"].map(key_scalar)
    out["column"] = out["column"].map(key_scalar)
    return out[["row", "column", "mean", "n"]]


def plot_heatmap(
    data: pd.DataFrame,
    metric: str,
    rows: str,
    columns: str,
    *,
    direction: str = "higher",
    chosen: Iterable[tuple[Any, Any]] = (),
) -> Figure:
    """Cells coloured and labelled by the mean (brighter is better); the best cell of each row
    outlined (dashed), the ``chosen`` (row level, column level) cells boxed (solid)."""
    sign = 1.0 if direction == "higher" else -1.0
    rlev = sorted(data["row"].unique(), key=_order)
    clev = sorted(data["column"].unique(), key=_order)
    grid = np.full((len(rlev), len(clev)), np.nan)
    for _, r in data.iterrows():
        grid[rlev.index(r["row"]), clev.index(r["column"])] = r["mean"]
    fig = Figure(figsize=(max(FIG_SIZE[0], 2.0 + 1.1 * len(clev)), 1.8 + 0.5 * max(len(rlev), 3)),
                 dpi=DPI, layout="constrained")  # fmt: skip
    ax = fig.add_subplot()
    ax.tick_params(labelsize=TICK)
    cmap = matplotlib.colormaps["viridis" if sign > 0 else "viridis_r"]
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    bar = fig.colorbar(im, ax=ax, shrink=0.85)
    bar.set_label(axis_label(metric), fontsize=LABEL)
    bar.ax.tick_params(labelsize=TICK)
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    picked = {(key_scalar(a), key_scalar(b)) for a, b in chosen}
    for i, rv in enumerate(rlev):
        row = grid[i]
        best = int(np.nanargmax(sign * row)) if np.isfinite(row).any() else None
        for j, cv in enumerate(clev):
            if not np.isfinite(row[j]):
                continue
            light = (row[j] - lo) / (hi - lo) if hi > lo else 0.5
            bright = light > 0.6 if sign > 0 else light < 0.4
            ax.text(j, i, fmt_num(row[j]), ha="center", va="center", fontsize=TICK,
                    color="black" if bright else "white",
                    fontweight="bold" if j == best else "normal")  # fmt: skip
            if j == best:
                ax.add_patch(Rectangle((j - 0.46, i - 0.42), 0.92, 0.84, fill=False, lw=1.5,
                                       ls="--", ec="#f59e0b"))  # fmt: skip
            if (rv, cv) in picked:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="#dc2626"))
    ax.set_xticks(range(len(clev)), [value_text(v) for v in clev])
    ax.set_yticks(range(len(rlev)), [value_text(v) for v in rlev])
    ax.set_xlabel(readable(columns), fontsize=LABEL)
    ax.set_ylabel(readable(rows), fontsize=LABEL)
    marks = "dashed: best in its row" + ("; red box: chosen by tuning" if picked else "")
    ax.set_title(f"{quantity(metric)} by {readable(rows)} and {readable(columns)}, mean over "
                 f"seeds\n{marks}", fontsize=LABEL, loc="left")  # fmt: skip
    return fig


def _order(v: Any) -> tuple:
    """Numbers in numeric order before words (a mixed column stays sortable)."""
    if isinstance(v, numbers.Number) and not isinstance(v, bool) and v == v:
        return (0, float(v), "")
    return (1, 0.0, str(v))


def crossed(data: pd.DataFrame) -> bool:
    """Whether the two factors are crossed at all: some row level measured at two or more
    column levels (variants that each have their own rank make no grid to draw)."""
    return bool((data.groupby("row")["column"].nunique() > 1).any())


def chosen_cells(analysis: dict[str, Any], rows: str, columns: str) -> list[tuple[Any, Any]]:
    """The (row level, column level) the nested selection chose, per configuration."""
    out = []
    for c in (analysis.get("tuning") or {}).get("configs") or []:
        if c.get("chosen") and rows in c["key"] and columns in c["chosen"]:
            out.append((c["key"][rows], c["chosen"][columns]))
    return out


def heatmap_figure(trials: pd.DataFrame, analysis: dict[str, Any]) -> Figure | None:
    """The heatmap of an ``analyze`` result over its trials, or None when no two factors vary
    crossed (``heatmap_axes``, ``crossed``)."""
    axes = heatmap_axes(analysis)
    if axes is None:
        return None
    rows, columns = axes
    metric = analysis["metric"]
    data = heatmap_data(trials, metric, rows, columns, analysis["factors"]["by"])
    data = data[data["row"].notna() & data["column"].notna()]  # a variant with no rank of its own
    if data.empty or not crossed(data):
        return None
    return plot_heatmap(data, metric, rows, columns, direction=analysis["direction"],
                        chosen=chosen_cells(analysis, rows, columns))  # fmt: skip


def write_heatmap(
    trials: pd.DataFrame, analysis: dict[str, Any], out_dir: str | Path
) -> Path | None:
    """``out_dir/heatmap.png`` when two factors vary crossed (``heatmap_figure``), else None."""
    fig = heatmap_figure(trials, analysis)
    if fig is None:
        return None
    path = Path(out_dir) / "heatmap.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path

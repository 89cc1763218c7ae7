"""The trials table: one row per trial, read from a run's store or from rows made elsewhere
(CSV, JSON), with the id columns the analysis needs; and per-configuration descriptive summaries
(n, mean, std, 95% CI) that ``stats``, ``plots`` and ``report`` share.

Pure functions over pandas DataFrames; no torch import. Metric columns: see ``records.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from lorasweep.analysis.decision import is_proportion
from lorasweep.analysis.settings import setting_columns, standard_name

__all__ = [
    "by_columns",
    "column_mean",
    "column_notes",
    "ci95",
    "describe",
    "load_trials_table",
    "memory_column",
    "prepare_trials",
    "problem_trials",
    "summary_table",
]


# ``DataFrame.attrs`` key: the seed column was made from the row order (the table had none)
SEEDS_FROM_ROWS = "lorasweep_seeds_from_rows"
# ``DataFrame.attrs`` keys: {column as made elsewhere: the name it is read as} (``lora_r``:
# ``rank``), and the id columns ``prepare_trials`` filled in because the table had none
READ_AS = "lorasweep_read_as"
FILLED = "lorasweep_filled"
OWN_COLUMNS = "lorasweep_own_columns"  # the columns of the table as given (renamed)
_LISTED = 40  # columns named in a message, at most


def _standard_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns made elsewhere renamed to the analysis's names (``settings.standard_name``),
    where the table has no column of that name yet; recorded in ``attrs[READ_AS]``."""
    renames: dict[str, str] = {}
    for c in df.columns:
        target = standard_name(c) if isinstance(c, str) else None
        if target and target not in df.columns and target not in renames.values():
            renames[c] = target
    if not renames:
        return df
    read_as = {**df.attrs.get(READ_AS, {}), **renames}
    df = df.rename(columns=renames)
    df.attrs[READ_AS] = read_as
    return df


def prepare_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with the id columns the analysis needs, filling sensible defaults.

    Columns made elsewhere are read by the analysis's names (``lora_r``, ``config.r`` ->
    ``rank``, ``config.learning_rate`` -> ``learning_rate``; ``column_notes`` says which).
    Missing ``status`` -> "complete", ``variant`` -> "lora", ``rank`` -> NaN, ``seed`` -> the
    row order within its (variant, rank) configuration (marked in ``attrs[SEEDS_FROM_ROWS]``:
    such "seeds" are not matched across configurations), ``trial_id`` -> "row<i>"; the filled
    id columns are named in ``attrs[FILLED]``.
    """
    df = _standard_columns(trials.copy().reset_index(drop=True))
    df.attrs.setdefault(OWN_COLUMNS, list(df.columns))
    filled = [c for c in ("variant", "rank") if c not in df]
    if filled:
        df.attrs[FILLED] = [*df.attrs.get(FILLED, []), *filled]
    if "status" not in df:
        df["status"] = "complete"
    df["status"] = df["status"].fillna("complete").astype(str).str.lower()
    if "variant" not in df:
        df["variant"] = "lora"
    df["variant"] = df["variant"].fillna("lora").astype(str)
    df["rank"] = pd.to_numeric(df["rank"], errors="coerce") if "rank" in df else np.nan
    if "seed" not in df:
        df["seed"] = df.groupby(["variant", "rank"], dropna=False).cumcount()
        df.attrs[SEEDS_FROM_ROWS] = True  # row numbers, not seeds: nothing to pair on
    if "trial_id" not in df:
        df["trial_id"] = [f"row{i}" for i in range(len(df))]
    if "error" not in df:
        df["error"] = None
    return df


def column_mean(df: pd.DataFrame, column: str) -> float | None:
    """The mean of a numeric column over ``df``'s rows; None when absent or nothing numeric."""
    if column not in df:
        return None
    v = pd.to_numeric(df[column], errors="coerce").dropna()
    return float(v.mean()) if len(v) else None


def load_trials_table(path: str | Path) -> pd.DataFrame:
    """Read per-trial rows made elsewhere (CSV, or JSON) into a trials DataFrame.

    JSON may be a list of row objects, or ``{"trials": [{..., "metrics": {...}}]}`` as printed
    by ``lorasweep status --json`` (the ``metrics`` dict is flattened into columns).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"path: {str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        rows = data.get("trials") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(
                f"path: {str(path)!r} is neither a list of rows nor {{'trials': [...]}}"
            )
        flat = []
        for row in rows:
            row = dict(row)
            metrics = row.pop("metrics", None) or {}
            flat.append({**row, **metrics})
        df = pd.DataFrame(flat)
    else:
        df = pd.read_csv(path)
    return prepare_trials(df)


def column_notes(df: pd.DataFrame) -> list[str]:
    """What ``prepare_trials`` read under another name: ``column 'lora_r' read as rank``."""
    return [f"column {c!r} read as {name}" for c, name in df.attrs.get(READ_AS, {}).items()]


def _columns_text(df: pd.DataFrame) -> str:
    """The table's own columns (``attrs[OWN_COLUMNS]``: none that ``prepare_trials`` filled
    in), for a message."""
    cols = [str(c) for c in df.attrs.get(OWN_COLUMNS, df.columns)]
    more = f", ... ({len(cols) - _LISTED} more)" if len(cols) > _LISTED else ""
    return ", ".join(cols[:_LISTED]) + more if cols else "none"


def by_columns(df: pd.DataFrame, by: str | list[str] | None) -> list[str]:
    """The grouping columns: ``by`` (checked; a name read as another, like ``lora_r``, stands
    for it), else ``variant`` and ``rank`` where present and every setting that varies
    (``settings.setting_columns``: learning_rate, dropout, ...).

    Raises:
        ValueError: one line listing the table's columns, where a ``by`` column is missing or
            the default finds no configuration column at all (no variant, rank or varying
            setting: every row would be pooled into one configuration).
    """
    if by is None:
        settings = setting_columns(df)
        filled = df.attrs.get(FILLED, [])
        ranked = "rank" in df and pd.to_numeric(df["rank"], errors="coerce").notna().any()
        if "variant" in filled and ("rank" in filled or not ranked) and not settings:
            raise ValueError(
                "by: no configuration column (rank, variant or a setting) in the table; "
                f"columns: {_columns_text(df)}; name one with --by"
            )
        return [c for c in ("variant", "rank") if c in df] + settings
    read_as = df.attrs.get(READ_AS, {})
    cols = [read_as.get(c, c) for c in ([by] if isinstance(by, str) else list(by))]
    for c in cols:
        if c not in df:
            meant = standard_name(c)
            hint = f" (did you mean {meant}?)" if meant in df else ""
            raise ValueError(
                f"by: {c!r} is not a column of the trials table{hint}; columns: {_columns_text(df)}"
            )
    return cols


def memory_column(df: pd.DataFrame) -> str | None:
    """Peak GPU allocated bytes when measured, else peak CPU RSS, else None."""
    for c in ("peak_gpu_allocated_bytes", "peak_cpu_rss_bytes"):
        if c in df and pd.to_numeric(df[c], errors="coerce").notna().any():
            return c
    return None


def ci95(values: np.ndarray) -> tuple[float, float] | None:
    """Two-sided 95% t confidence interval of the mean; None below two values."""
    n = len(values)
    if n < 2:
        return None
    m, s = float(np.mean(values)), float(np.std(values, ddof=1))
    h = float(sps.t.ppf(0.975, n - 1)) * s / math.sqrt(n)
    return m - h, m + h


def describe(
    trials: pd.DataFrame,
    column: str,
    by: str | list[str] | None = None,
) -> pd.DataFrame:
    """n, mean, std and 95% CI of ``column`` per configuration over complete, finite rows; the
    CI of a proportion (accuracy, F1: ``decision.is_proportion``) is clipped to [0, 1].

    Returns one row per configuration with the ``by`` columns and ``n, mean, std, ci_lo, ci_hi``.
    """
    df = prepare_trials(trials)
    cols = by_columns(df, by)
    vals = pd.to_numeric(df[column], errors="coerce") if column in df else np.nan
    ok = df.assign(_v=vals)
    ok = ok[(ok["status"] == "complete") & np.isfinite(ok["_v"].astype(float))]
    proportion = is_proportion(column) and bool(ok["_v"].between(0, 1).all())
    rows = []
    for key, g in ok.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        v = g["_v"].to_numpy(float)
        ci = ci95(v)
        if ci and proportion:
            ci = (max(ci[0], 0.0), min(ci[1], 1.0))
        rows.append(
            {
                **dict(zip(cols, key)),
                "n": len(v),
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
                "ci_lo": ci[0] if ci else np.nan,
                "ci_hi": ci[1] if ci else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=[*cols, "n", "mean", "std", "ci_lo", "ci_hi"])


def summary_table(
    trials: pd.DataFrame,
    metrics: list[str],
    by: str | list[str] | None = None,
) -> pd.DataFrame:
    """Mean and std of several metrics per configuration (complete trials only).

    Columns: the ``by`` columns, ``n`` (complete trials), ``n_total``, and ``<m>_mean``,
    ``<m>_std`` for every metric in ``metrics`` that is a column of ``trials``.
    """
    df = prepare_trials(trials)
    cols = by_columns(df, by)
    rows = []
    for key, g in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        done = g[g["status"] == "complete"]
        row: dict[str, Any] = {**dict(zip(cols, key)), "n": len(done), "n_total": len(g)}
        for m in metrics:
            if m not in df:
                continue
            v = pd.to_numeric(done[m], errors="coerce").to_numpy(float)
            v = v[np.isfinite(v)]
            row[f"{m}_mean"] = float(v.mean()) if len(v) else np.nan
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def problem_trials(trials: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Trials that failed, ran out of memory, diverged or were pruned (and, given ``metric``,
    complete trials whose metric is NaN), with ``trial_id, variant, rank``, the varying settings
    (``settings.setting_columns``), ``seed, status, error``.
    """
    df = prepare_trials(trials)
    bad = df["status"].isin(["failed", "oom", "diverged", "pruned"])
    if metric and metric in df:
        nan_metric = (df["status"] == "complete") & ~np.isfinite(
            pd.to_numeric(df[metric], errors="coerce").astype(float)
        )
        df.loc[nan_metric, "status"] = f"complete ({metric} NaN)"
        bad |= nan_metric
    cols = ["trial_id", "variant", "rank", *setting_columns(df), "seed", "status", "error"]
    return df.loc[bad, cols]

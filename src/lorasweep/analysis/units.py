"""Number formatting: the one set of formatters for bytes, counts, durations and metric values.

Every function returns ``"-"`` for a missing value (None, NaN, infinity, not a number). Where
two places print the same quantity differently on purpose (the report's "1.50 GiB" next to the
estimate table's compact "1.50G"), both styles are here under their own names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KIB = 1024
MIB = 1024**2
GIB = 1024**3
MISSING = "-"


def is_number(x: Any) -> bool:
    """A finite int, float or numpy number (not None, NaN, infinity or a string)."""
    return x is not None and isinstance(x, (int, float, np.number)) and math.isfinite(x)


def fmt_num(x: float | None) -> str:
    """Compact metric value: 4 significant digits, scientific from 1e5: '0.8612', '1.235e+05'."""
    if not is_number(x):
        return MISSING
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


# ----------------------------------------------------------------------------- counts


def fmt_count(n: float | None) -> str:
    """Thousands separators: 1234567 -> '1,234,567'."""
    return f"{n:,.0f}" if is_number(n) else MISSING


def fmt_count_short(n: float | None) -> str:
    """Decimal units for wide tables: 1234567 -> '1.23M', 7.2e9 -> '7.20B', 512 -> '512'."""
    if not is_number(n):
        return MISSING
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# ----------------------------------------------------------------------------- bytes


def fmt_bytes(n: float | None) -> str:
    """Binary units, two decimals: 1536 -> '1.50 KiB', 3.2e9 -> '2.98 GiB', 100 -> '100 B'."""
    if not is_number(n):
        return MISSING
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_bytes_short(n: float | None) -> str:
    """Compact binary units for wide tables: GiB from 1 GiB ('1.50G'), else MiB ('12.0M')."""
    if not is_number(n):
        return MISSING
    return f"{n / GIB:.2f}G" if n >= GIB else f"{n / MIB:.1f}M"


def fmt_gib(n: float | None, digits: int = 2) -> str:
    """Always in GiB, for comparing with GPU sizes: 3.2e9 -> '2.98 GiB'."""
    return f"{n / GIB:.{digits}f} GiB" if is_number(n) else MISSING


# ----------------------------------------------------------------------------- durations


def fmt_seconds(s: float | None, *, minutes_from: float = 120, hours_from: float = 7200) -> str:
    """One decimal of the largest fitting unit: 42.26 -> '42.3 s', 300 -> '5.0 min',
    7200 -> '2.00 h'. ``minutes_from`` / ``hours_from`` move the switches (the pruning
    section switches to minutes at 100 s and never to hours: ``hours_from=math.inf``)."""
    if not is_number(s):
        return MISSING
    if abs(s) < minutes_from:
        return f"{s:.1f} s"
    if abs(s) < hours_from:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_seconds_whole(s: float | None) -> str:
    """Whole seconds, minutes from 600 s; two significant digits under 10 s, where '0 s' would
    hide a difference: 3.14 -> '3.1 s', 42.6 -> '43 s', 900 -> '15.0 min'."""
    if not is_number(s):
        return MISSING
    if s < 10:
        return f"{s:.2g} s"
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def fmt_clock(s: float | None) -> str:
    """A running clock, whole seconds: 42.4 -> '42s', 65 -> '1m05s'."""
    if not is_number(s):
        return MISSING
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ----------------------------------------------------------------------------- by kind


def fmt_value(x: float | None, kind: str = "metric") -> str:
    """Format one number by its kind: metric, count, percent, bytes, seconds, rate."""
    if not is_number(x):
        return MISSING
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
    return fmt_num(x)


def decimals_for(spread: float | None) -> int | None:
    """Decimal places that show ``spread`` to 2 significant digits (None when it is missing or
    0): 0.0123 -> 3, 0.5 -> 2, 12 -> 0."""
    if not is_number(spread) or spread == 0:
        return None
    return max(0, 1 - math.floor(math.log10(abs(spread))))


def fmt_fixed(x: float | None, decimals: int | None, *, signed: bool = False) -> str:
    """``x`` at ``decimals`` places (4 significant digits when None); '+' on request."""
    if not is_number(x):
        return MISSING
    sign = "+" if signed else ""
    return f"{x:{sign}.{decimals}f}" if decimals is not None else f"{x:{sign}.4g}"


def fmt_sig(x: float | None, digits: int = 2) -> str:
    """``x`` to ``digits`` significant digits ('0.0061', '12', '1.3e-05'); '-' when missing."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def fmt_p(p: float | None) -> str:
    """A p-value to 2 significant digits: '0.38', '0.0012', '3.1e-07'."""
    return f"{p:.2g}" if is_number(p) else MISSING


def fmt_mean_std(mean: float | None, std: float | None, kind: str = "metric") -> str:
    """'0.861 ± 0.012' (a metric: the std to 2 significant digits, the mean to the same
    decimals), '1.50 GiB ± 12.00 MiB'; the std is left out when unknown, and for non-metric kinds
    when it is zero up to rounding (a constant column)."""
    if not is_number(mean):
        return MISSING
    if kind == "metric" and is_number(std):
        places = decimals_for(std)
        if places is not None:
            return f"{mean:.{places}f} ± {std:.{places}f}"
    if not is_number(std):
        return fmt_value(mean, kind)
    if abs(std) <= 1e-9 * abs(mean) and kind != "metric":
        return fmt_value(mean, kind)
    return f"{fmt_value(mean, kind)} ± {fmt_value(std, kind)}"

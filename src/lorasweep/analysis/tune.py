"""Nested selection: a setting (the learning rate) tuned per configuration of the others.

A rank ablation at one learning rate answers "which rank, at this learning rate?"; the best
learning rate often moves with the rank. With ``tune=["learning_rate"]``, ``stats.analyze``
first chooses, for every configuration of the other settings (variant, rank, ...), the value
of the tuned setting with the best mean of ``select_on`` over its seeds, keeps only those
trials, then runs its decision on the comparison metric. The recommendation then names a rank
*and* its learning rate.

Choosing on the same numbers that are then compared makes the chosen configurations look
better than they are (the winner's curse: the maximum of several noisy means is biased
upwards, the more so the more values were tried). Selecting on the validation split and
comparing on a test split keeps the two apart; ``same_data`` says when they were not.

Pure functions over the trials table; no torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lorasweep.analysis.compare import json_scalar, key_scalar
from lorasweep.analysis.explain import group_label
from lorasweep.analysis.settings import readable, value_text
from lorasweep.records import TEST_PREFIX, guess_direction, selection_metric


def tune_option(tune: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``tune`` as a list of column names: ``"learning_rate,warmup_steps"`` or a list; None or
    ``"none"`` is no tuning."""
    if tune is None:
        return []
    items = tune.split(",") if isinstance(tune, str) else list(tune)
    out = [str(t).strip() for t in items if str(t).strip()]
    return [] if out == ["none"] else list(dict.fromkeys(out))


def check_tuned(df: pd.DataFrame, tuned: list[str], by: list[str] | None) -> None:
    """Refuse, in one line naming the option and the value, a tuned column that is not in the
    table, that is the seed, or that ``by`` names too."""
    for t in tuned:
        if t not in df:
            raise ValueError(f"tune: {t!r} is not a column of the trials table")
        if t == "seed":
            raise ValueError("tune: 'seed' is the blocking factor, not a setting to choose")
        if by is not None and t in by:
            raise ValueError(
                f"tune: {t!r} is also in by; a tuned setting is chosen per configuration of the "
                "others, so leave it out of by"
            )


def resolve_select_on(df: pd.DataFrame, metric: str, select_on: str | None) -> tuple[str, bool]:
    """(the column the tuned value is chosen on, whether selection and comparison used the same
    data). Default: the validation metric of a test metric (``test_accuracy`` -> ``accuracy``),
    else the metric itself. The data count as different only when exactly one of the two is a
    test-split column (``test_...``): two other columns are taken to be the same split."""
    if select_on is None:
        select_on = selection_metric(metric)
        if select_on not in df:
            raise ValueError(
                f"select_on: {select_on!r} (the validation metric of {metric!r}) is not a column "
                "of the trials table; name the column to choose the tuned value on"
            )
    elif select_on not in df:
        raise ValueError(f"select_on: {select_on!r} is not a column of the trials table")
    same = select_on == metric or select_on.startswith(TEST_PREFIX) == metric.startswith(
        TEST_PREFIX
    )
    return select_on, same


def select_direction(select_on: str, metric: str, direction: str) -> str:
    """The direction of ``select_on``: its own when known (``HIGHER_IS_BETTER``), "lower" for a
    loss-like name, else the metric's (``val_accuracy`` for ``test_accuracy``)."""
    guessed, assumed = guess_direction(select_on)
    if not assumed or (select_on != metric and guessed == "lower"):
        return guessed
    return direction


@dataclass
class Tuning:
    """What the nested selection chose, per configuration of the other settings."""

    tuned: list[str]
    select_on: str
    direction: str
    """of ``select_on``: "higher" or "lower" is better"""
    same_data: bool
    metric: str
    configs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tuned": list(self.tuned),
            "select_on": self.select_on,
            "direction": self.direction,
            "same_data": self.same_data,
            "configs": self.configs,
        }


def select(
    df: pd.DataFrame,
    outer: list[str],
    tuned: list[str],
    select_on: str,
    direction: str,
    cost: str | None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The rows of the chosen value of ``tuned`` in every configuration of ``outer``, and what
    was chosen (``Tuning.configs``).

    Per configuration, each value tried is scored by the mean of ``select_on`` over its
    complete trials with a finite value; values with a diverged seed (status diverged, or a
    complete trial whose ``select_on`` is NaN) come after the stable ones (instability is a
    result, not noise to average away). Ties go to the lower mean cost, then to the first value
    in sorted order. A configuration with nothing to choose on keeps no rows.
    """
    sign = 1.0 if direction == "higher" else -1.0
    value = pd.to_numeric(df[select_on], errors="coerce").astype(float)
    cost_v = pd.to_numeric(df[cost], errors="coerce") if cost else None
    keep: list[Any] = []
    configs = []
    outer_groups = df.groupby(outer, dropna=False, sort=True) if outer else [((), df)]
    for okey, rows in outer_groups:
        okey = okey if isinstance(okey, tuple) else (okey,)
        values, scored = [], []
        for i, (tkey, trows) in enumerate(rows.groupby(tuned, dropna=False, sort=True)):
            tkey = tkey if isinstance(tkey, tuple) else (tkey,)
            v = value[trows.index]
            done = (trows["status"] == "complete") & np.isfinite(v)
            bad = (trows["status"] == "diverged") | ((trows["status"] == "complete") & v.isna())
            diverged = int(bad.sum())
            n = int(done.sum())
            mean = float(v[done].mean()) if n else math.nan
            setting = {c: key_scalar(x) for c, x in zip(tuned, tkey)}
            values.append({"setting": setting, "mean": json_scalar(mean), "n": n,
                           "diverged": diverged})  # fmt: skip
            if n:
                c = float(cost_v[trows.index][done].mean()) if cost_v is not None else math.nan
                order = (diverged > 0, -sign * mean, c if math.isfinite(c) else math.inf, i)
                scored.append((order, setting, trows.index))
        chosen = None
        if scored:
            _, chosen, index = min(scored, key=lambda s: s[0])
            keep += list(index)
        configs.append(
            {
                "key": {c: key_scalar(x) for c, x in zip(outer, okey)},
                "chosen": chosen,
                "tried": len(values),
                "values": values,
            }
        )
    return df.loc[sorted(keep)], configs


# ----------------------------------------------------------------------------- words


def per_phrase(keys: list[dict[str, Any]]) -> str:
    """What the tuning was done per: "rank" when only the rank varies among the
    configurations of the other settings, else "configuration"."""
    names = {k for key in keys for k in key}
    varying = [k for k in sorted(names) if len({str(key.get(k)) for key in keys}) > 1]
    return readable(varying[0]) if len(varying) == 1 else "configuration"


def tuned_phrase(tuned: list[str], setting: dict[str, Any]) -> str:
    """``learning rate 0.001``, ``learning rate 0.001 and warmup steps 10``."""
    return " and ".join(f"{readable(k)} {value_text(setting[k])}" for k in tuned if k in setting)


def config_phrase(key: dict[str, Any], tuned: list[str]) -> str:
    """A tuned configuration in words: ``lora r=8 at learning rate 0.001``."""
    outer = {k: v for k, v in key.items() if k not in tuned}
    return f"{group_label(outer)} at {tuned_phrase(tuned, key)}"


def sentences(t: Tuning, recommended: dict[str, Any] | None) -> list[str]:
    """How the tuned values were chosen, what the recommendation is in those words, and
    whether selection and comparison used different data."""
    names = " and ".join(readable(x) for x in t.tuned)
    tried = sorted({c["tried"] for c in t.configs})
    how_many = str(tried[0]) if len(tried) == 1 else f"{tried[0]} to {tried[-1]}"
    what = "values" if len(t.tuned) == 1 else "combinations"
    chosen = [
        f"{group_label(c['key'])}: "
        + (
            value_text(c["chosen"][t.tuned[0]])
            if len(t.tuned) == 1
            else tuned_phrase(t.tuned, c["chosen"])
        )
        for c in t.configs
        if c["chosen"] is not None
    ]
    out = [
        f"{names[:1].upper() + names[1:]} tuned per {per_phrase([c['key'] for c in t.configs])}"
        f": of {how_many} {what} tried "
        f"for each, the one with the best mean {t.select_on} over seeds was kept "
        f"({'; '.join(chosen)})."
    ]
    if recommended is not None:
        out.append(f"The recommendation is {config_phrase(recommended, t.tuned)}.")
    if t.same_data:
        on = t.select_on if t.select_on == t.metric else f"{t.select_on} and {t.metric}"
        out.append(
            f"The {names} was chosen and compared on the same data ({on}), so the tuned "
            "configurations look better than they are (winner's curse; see the flags)."
        )
    else:
        out.append(
            f"The {names} was chosen on {t.select_on} and the configurations compared on "
            f"{t.metric}, other data, so the comparison is not biased by the choice."
        )
    return out


def same_data_warning(t: Tuning) -> str:
    """The winner's-curse flag: selection and comparison on the same data."""
    on = t.select_on if t.select_on == t.metric else f"{t.select_on} and {t.metric}"
    return (
        f"Tuned values were chosen and compared on the same data ({on}): the tuned "
        "configurations look better than they are (winner's curse), "
        "the more so the more values were tried; add a test split (dataset.test_fraction) and "
        "compare on its metric (test_accuracy, test_perplexity)."
    )

"""Instability and learning as results: seeds that collapsed (robust outliers within their
configuration), and configurations that learned nothing (classification at the majority-class
rate of the eval set; a training loss that never left its start).

Pure functions over the per-configuration values; no torch import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A seed is an outlier of its configuration when it lies more than this many robust standard
# deviations (1.4826 x MAD) from the configuration's median.
OUTLIER_MADS = 5.0
MAD_TO_SD = 1.4826
# Accuracy within this of the majority-class rate: the classifier learned nothing usable.
MAJORITY_SLACK = 0.01
# A final training loss above this fraction of the first logged one: the loss never moved.
FLAT_LOSS = 0.99


def robust_scale(values: Sequence[float]) -> float | None:
    """1.4826 x MAD for 3 or more values; the sample standard deviation for 2; None for 1."""
    v = np.asarray(values, float)
    if len(v) >= 3:
        return float(MAD_TO_SD * np.median(np.abs(v - np.median(v))))
    if len(v) == 2:
        return float(abs(v[0] - v[1]) / math.sqrt(2))
    return None


def sweep_scale(groups_values: Sequence[Sequence[float]]) -> float:
    """The typical spread of a seed within a configuration, a floor for ``outlier_seeds``: the
    median over the configurations of their mean absolute deviation from their median (x 1.2533,
    the normal-theory factor to a standard deviation). Not the MAD: a metric in steps (accuracy
    on a finite eval set) often ties two of three seeds, which makes every MAD 0. One collapsed
    configuration does not move the median over configurations."""
    spreads = [
        1.2533 * float(np.mean(np.abs(np.asarray(v, float) - np.median(v))))
        for v in groups_values
        if len(v) >= 2
    ]
    return float(np.median(spreads)) if spreads else 0.0


def outlier_seeds(values: Sequence[float], floor: float, min_gap: float = 0.0) -> list[bool]:
    """Which values lie more than ``OUTLIER_MADS`` robust standard deviations from the median of
    ``values`` (the scale: the larger of the configuration's own, from 3 or more values, and
    ``floor``) and more than ``min_gap`` from it (a deviation within the margin is no collapse
    that matters)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return [False] * len(v)
    own = robust_scale(v) if len(v) >= 3 else 0.0
    scale = max(own or 0.0, floor, 1e-9 * max(1.0, float(np.max(np.abs(v)))))
    limit = max(OUTLIER_MADS * scale, min_gap)
    med = float(np.median(v))
    return [bool(abs(x - med) > limit) for x in v]


def at_majority_rate(accuracies: Sequence[float], majority_rate: float | None) -> bool:
    """The mean accuracy is no better than always predicting the most frequent class."""
    if majority_rate is None or not math.isfinite(majority_rate) or not len(accuracies):
        return False
    return float(np.mean(accuracies)) <= majority_rate + MAJORITY_SLACK


def flat_loss(starts: Sequence[float], ends: Sequence[float]) -> bool:
    """The training loss never left its start: the median ratio of the last to the first
    logged training loss over the seeds is above ``FLAT_LOSS`` (False when not logged)."""
    ratios = [
        e / s
        for s, e in zip(starts, ends)
        if s is not None and e is not None and math.isfinite(s) and math.isfinite(e) and s > 0
    ]
    return bool(ratios) and float(np.median(ratios)) > FLAT_LOSS

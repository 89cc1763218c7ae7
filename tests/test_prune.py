"""Pruning decisions: successive halving that drops only what the seeds show to be worse."""

from __future__ import annotations

import math

import pytest

from lorasweep.prune import decide_rung, rung_steps


def test_rung_schedule():
    assert rung_steps(80, eta=2, min_steps=10) == [10, 20, 40]
    assert rung_steps(90, eta=3, min_steps=10) == [10, 30]
    assert rung_steps(10, eta=2, min_steps=10) == []
    with pytest.raises(ValueError, match="eta"):
        rung_steps(80, eta=1)


def test_drops_only_the_clearly_worse_half():
    vals = {
        "r=2": {0: 0.60, 1: 0.61, 2: 0.59, 3: 0.60},  # clearly worse in every seed
        "r=4": {0: 0.79, 1: 0.81, 2: 0.80, 3: 0.80},  # close to the best: kept
        "r=8": {0: 0.81, 1: 0.80, 2: 0.82, 3: 0.81},
        "r=16": {0: 0.70, 1: 0.85, 2: 0.62, 3: 0.90},  # worse on average, too noisy to drop
    }
    d = decide_rung(vals, 20, higher_is_better=True, eta=2)
    assert d.best == "r=8"
    assert d.drop == ["r=2"]
    assert set(d.keep) == {"r=4", "r=8", "r=16"}
    assert "kept" in d.reasons["r=16"] and "dropped" in d.reasons["r=2"]


def test_never_more_than_successive_halving_and_direction():
    vals = {f"c{i}": {s: 1.0 + i + 0.01 * s for s in range(4)} for i in range(4)}
    d = decide_rung(vals, 10, higher_is_better=False, eta=2)  # lower is better: c0 best
    assert d.best == "c0"
    assert sorted(d.drop) == ["c2", "c3"]  # n - ceil(n/2) = 2 at most, though c1 is worse too


def test_one_seed_drops_nothing_and_diverged_seed_is_worst():
    d = decide_rung({"a": {0: 0.9}, "b": {0: 0.1}}, 10, higher_is_better=True)
    assert d.drop == [] and "no test" in d.reasons["b"]
    d = decide_rung(
        {"a": {0: 0.8, 1: 0.81}, "b": {0: 0.79, 1: math.nan}}, 10, higher_is_better=True
    )
    assert d.drop == ["b"]

"""The settings a sweep varies: ``grid:`` axes and ``search:`` samples -> points.

A *point* is one value per varying setting other than the rank (``{"learning_rate": 4e-4,
"alpha": "2*rank"}``); ``plan`` crosses points with variants, ranks and seeds. A setting is a
LoRA key (the names of ``lora:``) or a transformers TrainingArguments name; ``axis_of`` says
which. Search samples are a pure function of ``(method, n, seed, space)``: a re-run plans the
same trials, and a larger ``n`` keeps the first samples (resume stays exact).

No torch, no pydantic models imported at run time: ``spec`` validates with these helpers.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# LoRA keys that cannot be grid or search axes, and why
NOT_AXES = {
    "training": "put TrainingArguments names on the grid directly (learning_rate, ...)",
    "rank_pattern": "a rank pattern is a variant of its own; use variants:",
    "alpha_pattern": "an alpha pattern goes with a rank-pattern variant; use variants:",
}
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform")
SEARCH_METHODS = ("random", "sobol")
SIGNIFICANT_DIGITS = 3  # sampled floats are rounded: 0.000347 not 0.00034728831...


def lora_axes(adapter_model: Any) -> list[str]:
    """The keys of ``lora:`` (the pydantic model ``adapter_model``) that can be grid or search
    axes; rank has its own grid entry."""
    return [k for k in adapter_model.model_fields if k not in NOT_AXES and k != "rank"]


def axis_of(key: str, lora_keys: Iterable[str]) -> str:
    """``"lora"`` for a key of ``lora:``, else ``"training"`` (a TrainingArguments name,
    checked against transformers by ``run.preflight`` before anything loads)."""
    return "lora" if key in set(lora_keys) else "training"


def split_point(point: Mapping[str, Any], lora_keys: Iterable[str]) -> tuple[dict, dict]:
    """(lora settings, training settings) of a point."""
    lora = set(lora_keys)
    return (
        {k: v for k, v in point.items() if k in lora},
        {k: v for k, v in point.items() if k not in lora},
    )


def grid_points(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis slowest; ``[{}]`` without axes."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def distribution_of(value: Any) -> tuple[str, float, float] | None:
    """``{"log_uniform": [1e-5, 1e-2]}`` -> ("log_uniform", 1e-5, 1e-2); a list -> None (a
    choice among its values).

    Raises:
        ValueError: anything else, or bounds that are not numbers with low < high (log: > 0).
    """
    if isinstance(value, list):
        if not value:
            raise ValueError("needs at least one value")
        return None
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ValueError(
            "must be a list of values or one of {log_uniform: [low, high]}, "
            "{uniform: [low, high]}, {int_uniform: [low, high]}"
        )
    ((kind, bounds),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {kind!r}; choose from {', '.join(DISTRIBUTIONS)}")
    ok = (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        and all(math.isfinite(b) for b in bounds)
    )
    if not ok or not bounds[0] < bounds[1]:
        raise ValueError(f"{kind} needs [low, high] with low < high, got {bounds!r}")
    if kind == "log_uniform" and bounds[0] <= 0:
        raise ValueError(f"log_uniform needs low > 0, got {bounds!r}")
    if kind == "int_uniform" and not all(float(b).is_integer() for b in bounds):
        raise ValueError(f"int_uniform needs integer bounds, got {bounds!r}")
    return kind, float(bounds[0]), float(bounds[1])


def representative_values(value: Any) -> list[Any]:
    """The values a search dimension can take that validation checks: a list's values, a
    distribution's two bounds (ints for int_uniform)."""
    dist = distribution_of(value)
    if dist is None:
        return list(value)
    kind, lo, hi = dist
    return [int(lo), int(hi)] if kind == "int_uniform" else [lo, hi]


def _round(x: float) -> float:
    if x == 0:
        return 0.0
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def _value(dim: Any, u: float) -> Any:
    """The value of a dimension at the unit-interval coordinate ``u`` in [0, 1)."""
    dist = distribution_of(dim)
    if dist is None:
        return dim[min(int(u * len(dim)), len(dim) - 1)]
    kind, lo, hi = dist
    if kind == "log_uniform":
        return _round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
    if kind == "uniform":
        return _round(lo + u * (hi - lo))
    return int(min(math.floor(lo + u * (hi - lo + 1)), hi))


def unit_samples(method: str, n: int, d: int, seed: int) -> list[list[float]]:
    """``n`` points in [0, 1)^d: numpy's PCG64 (``random``) or scrambled Sobol (``sobol``,
    scipy.stats.qmc), both seeded. Sample i is the same for every n > i."""
    import numpy as np

    if d == 0:
        return [[] for _ in range(n)]
    if method == "random":
        return np.random.default_rng(seed).random((n, d)).tolist()
    if method == "sobol":
        from scipy.stats import qmc

        with warnings.catch_warnings():  # balance properties want n = 2^m; any n is valid
            warnings.simplefilter("ignore", UserWarning)
            return qmc.Sobol(d, scramble=True, seed=seed).random(n).tolist()
    raise ValueError(f"unknown search method {method!r}; choose from {', '.join(SEARCH_METHODS)}")


def search_points(method: str, n: int, seed: int, space: Mapping[str, Any]) -> list[dict]:
    """``n`` sampled points of ``space`` (keys in sorted order, so reordering the YAML plans the
    same trials), duplicates dropped (a choice dimension repeats values)."""
    keys = sorted(space)
    out, seen = [], set()
    for u in unit_samples(method, n, len(keys), seed):
        point = {k: _value(space[k], x) for k, x in zip(keys, u)}
        marker = repr(sorted(point.items()))
        if marker not in seen:
            seen.add(marker)
            out.append(point)
    return out


def varying_keys(points: Iterable[Mapping[str, Any]]) -> list[str]:
    """The keys that take more than one value across ``points``, in first-seen order."""
    values: dict[str, set[str]] = {}
    for p in points:
        for k, v in p.items():
            values.setdefault(k, set()).add(repr(v))
    return [k for k, vs in values.items() if len(vs) > 1]


def describe_size(
    variants: int,
    ranks: int | None,
    axes: Mapping[str, int],
    samples: int | None,
    seeds: int,
    total: int,
) -> str:
    """``2 variants x 4 ranks x 3 learning_rate x 3 seeds = 72 trials`` (the factors shown are
    those of the grid; variants that stand alone make the product an upper bound, so the total
    is the count of planned trials; ``ranks`` None when the search samples the rank)."""
    parts = []
    if variants > 1:
        parts.append(f"{variants} variants")
    if ranks is not None:
        parts.append(f"{ranks} rank{'s' if ranks != 1 else ''}")
    parts += [f"{n} {k}" for k, n in axes.items()]
    if samples is not None:
        parts.append(f"{samples} sampled points")
    parts.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
    return " x ".join(parts) + f" -> {total} trials"

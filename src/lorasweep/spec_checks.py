"""Checks of a parsed spec that need no outside world: which settings can be swept and with
which values (``space_errors``), which keys each adapter method understands
(``variant_errors``). Called by ``spec.parse_spec``; the world checks (TrainingArguments, data,
model) are ``run.preflight``'s.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lorasweep.plan import adalora_schedule, merge_adapter
from lorasweep.records import canonical_json
from lorasweep.space import NOT_AXES, grid_points, lora_axes, representative_values

if TYPE_CHECKING:
    from lorasweep.spec import AdapterSpec, SweepSpec

# Keys of TrainingArguments that lorasweep sets itself for every trial.
RESERVED_TRAINING_KEYS = {
    "output_dir": "set by lorasweep per trial",
    "seed": "use the spec's top-level seeds list",
    "data_seed": "use the spec's top-level seeds list",
    "report_to": "use the spec's top-level report_to",
    "do_eval": "evaluation is always done by lorasweep",
}


def lora_keys(spec: SweepSpec) -> list[str]:
    """The keys of ``lora:`` that can be grid or search axes (rank has its own grid entry)."""
    return lora_axes(type(spec.lora))


def _check_value(model: type[AdapterSpec], key: str, value: Any, where: str) -> str | None:
    """One line when ``value`` is not valid for the lora key ``key`` (as if set in lora:)."""
    if key == "method" and value == "adalora":
        return (
            f"{where}: adalora cannot be a grid value (AdaLoRA sets its own ranks); add it as a "
            "variant"
        )
    try:
        model.model_validate({key: value})
    except ValidationError as exc:
        e = exc.errors()[0]
        msg = e["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" + ("" if repr(value) in msg else f" (got {value!r})")
    return None


def space_dims(spec: SweepSpec, errors: list[str] | None = None) -> dict[str, tuple[str, list]]:
    """Every setting the grid (other than rank) and the search vary: key -> (where it is set,
    the values validation checks). Malformed entries are left out, with a line in ``errors``."""
    errors = [] if errors is None else errors
    dims: dict[str, tuple[str, list[Any]]] = {}
    for key, values in spec.grid.axes().items():
        if not isinstance(values, list) or not values:
            errors.append(f"grid.{key}: must be a non-empty list of values, got {values!r}")
            continue
        if len({canonical_json(v) for v in values}) != len(values):
            errors.append(f"grid.{key}: values must be distinct, got {values!r}")
        dims[key] = (f"grid.{key}", values)
    for key, dim in (spec.search.space if spec.search else {}).items():
        where = f"search.space.{key}"
        if key in dims or (key == "rank" and "rank" in spec.grid.model_fields_set):
            errors.append(f"{where}: also on the grid; keep one")
            continue
        try:
            values = representative_values(dim)
        except ValueError as e:
            errors.append(f"{where}: {e} (got {dim!r})")
            continue
        if key == "rank" and any(not isinstance(r, int) or r <= 0 for r in values):
            errors.append(f"{where}: ranks must be integers > 0, got {dim!r}")
            continue
        dims[key] = (where, values)
    return dims


def space_errors(spec: SweepSpec) -> list[str]:
    """One line per grid or search setting that cannot be an axis, a value that its lora: key
    refuses, or a setting also fixed elsewhere (training:, lora:, both grid and search).
    TrainingArguments values are checked by ``run.preflight`` (it needs transformers)."""
    errors: list[str] = []
    lora = set(lora_keys(spec))
    fixed_lora = spec.lora.model_fields_set
    dims = space_dims(spec, errors)
    for key, (where, values) in dims.items():
        if key in NOT_AXES:
            errors.append(f"{where}: cannot be swept ({NOT_AXES[key]})")
        elif key in RESERVED_TRAINING_KEYS:
            errors.append(f"{where}: cannot be swept ({RESERVED_TRAINING_KEYS[key]})")
        elif key in lora and key in fixed_lora:
            errors.append(f"{where}: also set in lora.{key}; keep one")
        elif key in spec.training:
            errors.append(f"{where}: also set in training.{key}; keep one")
        elif key in lora:
            errors += [
                line
                for i, v in enumerate(values)
                if (line := _check_value(type(spec.lora), key, v, f"{where}[{i}]")) is not None
            ]
    errors += [
        f"tune: {t!r} is not a setting the grid or the search varies"
        for t in spec.tune
        if t not in dims or t == "rank"
    ]
    return errors


# --------------------------------------------------------------------------------------------
# Variants: which keys each method understands, checked on the merged settings

ADALORA_KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "orth_reg_weight")
NOT_ADALORA_KEYS = {
    "rank": "AdaLoRA sets ranks with init_r and target_r",
    "rank_pattern": "AdaLoRA allocates the ranks itself",
    "alpha_pattern": "AdaLoRA has one alpha",
}


def variant_errors(spec: SweepSpec) -> list[str]:
    """One line per variant setting that its method does not understand or cannot run.

    Checked on each variant merged over ``lora:``, so a default that a variant inherits is
    checked against the variant's method; the line names where the key was set.
    """
    errors = []
    variants = spec.variants or {"lora": type(spec.lora)()}
    points = lora_points(spec)
    for (vname, vspec), point in itertools.product(variants.items(), points):
        ad = merge_adapter(spec.lora, vspec)
        point = {k: v for k, v in point.items() if k not in vspec.model_fields_set}
        ad.update(point)
        method = ad.get("method", "lora")

        def where(
            k: str, vname: str = vname, vspec: AdapterSpec = vspec, point: dict = point
        ) -> str:
            if k in point:
                return f"grid.{k}" if k in spec.grid.axes() else f"search.space.{k}"
            if spec.variants is None or k not in vspec.model_fields_set:
                return f"lora.{k}" if spec.variants is None else f"variants.{vname}.{k} (from lora)"
            return f"variants.{vname}.{k}"

        if method != "adalora":
            errors += [
                f"{where(k)}: {k}={ad[k]} is an AdaLoRA key but method is {method!r}"
                for k in ADALORA_KEYS
                if k in ad
            ]
        else:
            errors += [
                f"{where(k)}: {k}={ad[k]!r} cannot be used with method adalora ({why})"
                for k, why in NOT_ADALORA_KEYS.items()
                if k in ad
            ]
            if str(ad.get("alpha", "")).startswith("rslora"):
                errors.append(
                    f"{where('alpha')}: alpha={ad['alpha']!r} cannot be used with method "
                    "adalora (peft's AdaLoRA scales by alpha/r only); use a number, rank or 2*rank"
                )
            init_r, target_r = ad.get("init_r", 12), ad.get("target_r", 8)
            if target_r > init_r:
                errors.append(
                    f"{where('target_r')}: AdaLoRA needs target_r <= init_r, got "
                    f"init_r={init_r}, target_r={target_r}"
                )
            training = {**spec.training, **(ad.get("training") or {})}
            steps = training.get("max_steps")
            if isinstance(steps, int) and steps > 0:
                try:
                    adalora_schedule(steps, ad.get("tinit"), ad.get("tfinal"), ad.get("deltaT"))
                except ValueError as e:
                    errors.append(f"variants.{vname}: {e}" if spec.variants else f"lora: {e}")
        if "compute_dtype" in ad and ad.get("quantization") is None:
            errors.append(
                f"{where('compute_dtype')}: compute_dtype={ad['compute_dtype']!r} only applies "
                "to quantization: 4bit"
            )
        if "rank" in ad and "rank_pattern" in ad:
            errors.append(
                f"{where('rank')}: rank={ad['rank']} and a rank_pattern cannot both be set "
                "(the pattern gives every targeted module its rank)"
            )
        if "rank_pattern" in ad and "target_modules" in vspec.model_fields_set:
            errors.append(
                f"{where('target_modules')}: a rank_pattern variant targets the groups or "
                "suffixes its pattern names; drop target_modules"
            )
        if "alpha_pattern" in ad and "rank_pattern" not in ad:
            errors.append(
                f"{where('alpha_pattern')}: alpha_pattern needs a rank_pattern naming the same "
                "groups"
            )
    return list(dict.fromkeys(errors))


def lora_points(spec: SweepSpec, limit: int = 64) -> list[dict[str, Any]]:
    """Combinations of the lora: settings the grid and the search vary (a search dimension by
    its representative values), at most ``limit``: what ``variant_errors`` checks."""
    keys = set(lora_keys(spec))
    axes = {k: v for k, v in spec.grid.axes().items() if k in keys and isinstance(v, list)}
    for k, dim in spec.search.space.items() if spec.search else []:
        if k in keys:
            axes[k] = representative_values(dim)
    return list(itertools.islice(grid_points(axes), limit))

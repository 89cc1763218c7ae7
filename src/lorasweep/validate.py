"""Check a parsed spec against the world before anything trains or loads weights.

Each problem is one line naming the key and the bad value; all are collected and raised together
as a SpecError. The model's module names are checked on the meta device from its config alone.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from lorasweep.spec import RESERVED_TRAINING_KEYS, SpecError, SweepSpec, merge_adapter


def _training_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def check_training(training: dict[str, Any], key: str, fields: set[str]) -> list[str]:
    errors = []
    for k, v in training.items():
        if k in RESERVED_TRAINING_KEYS:
            errors.append(f"{key}.{k}: cannot be set here ({RESERVED_TRAINING_KEYS[k]}), got {v!r}")
        elif k not in fields:
            errors.append(f"{key}.{k}: not a transformers TrainingArguments field (value {v!r})")
    steps = training.get("max_steps")
    if steps is not None and (not isinstance(steps, int) or steps == 0 or steps < -1):
        errors.append(f"{key}.max_steps: must be a positive integer, got {steps!r}")
    lr = training.get("learning_rate")
    if lr is not None and (not isinstance(lr, int | float) or lr <= 0):
        errors.append(f"{key}.learning_rate: must be a positive number, got {lr!r}")
    return errors


def check_dataset(spec: SweepSpec) -> list[str]:
    from lorasweep import data

    d = spec.dataset
    src = d.source
    if src.startswith("builtin:"):
        if src not in data.BUILTIN_DATASETS:
            return [
                f"dataset.source: unknown builtin {src!r}; choose from "
                f"{', '.join(data.BUILTIN_DATASETS)}"
            ]
    elif data.is_local(src) or src.startswith((".", "/", "~")):
        path = Path(src).expanduser()
        if not path.exists():
            return [f"dataset.source: file not found: {src!r}"]
        if path.suffix.lower() not in data.LOCAL_SUFFIXES:
            return [
                f"dataset.source: unsupported file type {path.suffix!r} "
                f"(use {', '.join(data.LOCAL_SUFFIXES)})"
            ]
    try:
        columns = data.source_columns(src)
    except data.DataError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - a malformed file: one line, not a traceback
        return [f"dataset.source: cannot read {src!r}: {e}"]
    if columns is None:  # a hub dataset: columns are known only after download
        return []
    if spec.task == "classification":
        needed = {"dataset.text_column": d.text_column, "dataset.label_column": d.label_column}
    else:
        from lorasweep.data import format_spec
        from lorasweep.formats import required_columns

        req = required_columns(format_spec(d.model_dump()))
        needed = {f"dataset.columns ({d.format})": c for c in req}
        if d.format == "text":
            needed = {"dataset.text_column": d.text_column}
    return [
        f"{key}: column {col!r} not in {src} (columns: {', '.join(map(str, columns))})"
        for key, col in needed.items()
        if col not in columns
    ]


def check_model(spec: SweepSpec) -> list[str]:
    """Model reference, and every variant's target modules / rank pattern on the meta device."""
    from lorasweep import models

    try:
        config = models.load_config(spec.model)
    except (models.ModelError, ValueError, OSError) as e:
        return [str(e).splitlines()[0]]
    from lorasweep.targets import build_meta_model, rank_pattern_for_groups, resolve_targets

    try:
        meta = build_meta_model(config, spec.task, num_labels=2)
    except Exception as e:  # noqa: BLE001 - an architecture transformers cannot build
        return [f"model: cannot build {spec.model!r} from its config: {e}"]
    errors = []
    variants = spec.variants or {"lora": spec.lora}
    for name, v in variants.items():
        ad = merge_adapter(spec.lora, v)
        key = f"variants.{name}" if spec.variants else "lora"
        tm = ad.get("target_modules")
        if tm is not None:
            own = not spec.variants or "target_modules" in v.model_fields_set
            where = f"{key}.target_modules" if own else "lora.target_modules"
            try:
                resolve_targets(meta, tm)
            except ValueError as e:
                errors.append(f"{where}: {e}")
        if ad.get("rank_pattern"):
            try:
                rank_pattern_for_groups(meta, ad["rank_pattern"], ad.get("alpha_pattern"))
            except ValueError as e:
                errors.append(f"{key}.rank_pattern: {e}")
    return list(dict.fromkeys(errors))


def check_variants(spec: SweepSpec, device: str) -> list[str]:
    errors = []
    variants = spec.variants or {"lora": spec.lora}
    fields = _training_fields()
    for name, v in variants.items():
        key = f"variants.{name}" if spec.variants else "lora"
        ad = merge_adapter(spec.lora, v)
        if ad.get("quantization") == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
            errors.append(
                f"{key}.quantization: 4bit needs bitsandbytes, which is not installed "
                "(pip install 'lorasweep[quant]')"
            )
        precision = ad.get("precision")
        if precision == "fp16" and device != "cuda":
            errors.append(f"{key}.precision: fp16 needs a CUDA GPU; this machine has {device}")
        if v.training:
            errors += check_training(v.training, f"{key}.training", fields)
    return errors


def check_spec(spec: SweepSpec, *, device: str | None = None) -> None:
    """Raise SpecError with every problem found; return None when the spec can run."""
    if device is None:
        from lorasweep.models import pick_device

        device = pick_device()
    errors = check_training(spec.training, "training", _training_fields())
    errors += check_dataset(spec)
    errors += check_variants(spec, device)
    errors += check_model(spec)
    from lorasweep.tracking import check_tracking

    errors += check_tracking(spec.report_to)
    if errors:
        raise SpecError(errors)

"""Check a parsed spec against the world before anything trains or loads weights.

Each problem is one line naming the key and the bad value; all are collected and raised together
as a SpecError. The model's module names are checked on the meta device from its config alone.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import math
import types
import typing
from pathlib import Path
from typing import Any

from lorasweep.plan import merge_adapter
from lorasweep.spec import RESERVED_TRAINING_KEYS, SpecError, SweepSpec, lora_keys
from lorasweep.spec_checks import space_dims


def _training_fields() -> dict[str, Any]:
    """TrainingArguments field name -> its annotated type."""
    from transformers import TrainingArguments

    return {f.name: f.type for f in dataclasses.fields(TrainingArguments)}


# Ranges the Trainer needs but does not check before the first step (a batch size of 0 fails
# inside every trial; num_train_epochs 0 "completes" a trial that never trained).
_AT_LEAST_ONE = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
)
_POSITIVE = ("learning_rate", "num_train_epochs", "adam_epsilon", "logging_steps")
_NON_NEGATIVE = ("weight_decay", "warmup_steps", "max_grad_norm", "label_smoothing_factor")
_UNIT = ("warmup_ratio", "adam_beta1", "adam_beta2")  # in [0, 1]


def _type_error(value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit a TrainingArguments annotation (None when it fits).

    Checks the plain types (int, float, bool, str) and enum choices; other annotations
    (dicts, lists, callables) are left to transformers.
    """
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = set(typing.get_args(annotation)) if union else {annotation}
    if value is None:
        return None if type(None) in options else "must not be empty"
    enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
    if enums and isinstance(value, str):
        choices = [str(e.value) for e in enums[0]]
        shown = ", ".join(choices[:8]) + (", ..." if len(choices) > 8 else "")
        return None if value in choices else f"must be one of {shown}"
    if bool in options and isinstance(value, bool):
        return None
    if float in options:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return None if math.isfinite(value) else "must be a finite number"
        return "must be a number"
    if int in options:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer"
    if bool in options and options <= {bool, type(None)}:
        return "must be true or false"
    return None


def _numeric_text(v: Any) -> bool:
    try:
        return isinstance(v, str) and math.isfinite(float(v))
    except ValueError:
        return False


def _range_error(k: str, v: Any, training: dict[str, Any]) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if k in _AT_LEAST_ONE and v < 1:
        return "must be at least 1"
    if k == "num_train_epochs" and int(training.get("max_steps") or -1) > 0:
        return None  # max_steps wins over epochs
    if k in _POSITIVE and not v > 0:
        return "must be > 0"
    if k in _NON_NEGATIVE and v < 0:
        return "must be >= 0"
    if k in _UNIT and not 0 <= v <= 1:
        return "must be in [0, 1]"
    return None


def check_training(training: dict[str, Any], key: str, fields: dict[str, Any]) -> list[str]:
    """One line per TrainingArguments value that is unknown, reserved, of the wrong type or out
    of range (NaN and infinities included), so it fails here and not inside every trial."""
    errors = []
    for k, v in training.items():
        if k in RESERVED_TRAINING_KEYS:
            errors.append(f"{key}.{k}: cannot be set here ({RESERVED_TRAINING_KEYS[k]}), got {v!r}")
        elif k not in fields:
            errors.append(f"{key}.{k}: not a transformers TrainingArguments field (value {v!r})")
        elif (why := _type_error(v, fields[k]) or _range_error(k, v, training)) is not None:
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if _numeric_text(v) else ""
            errors.append(f"{key}.{k}: {why}, got {v!r}{hint}")
    steps = training.get("max_steps")
    if steps is not None and (not isinstance(steps, int) or steps == 0 or steps < -1):
        errors.append(f"{key}.max_steps: must be a positive integer, got {steps!r}")
    return list(dict.fromkeys(errors))


def check_dataset(spec: SweepSpec) -> list[str]:
    """The source, its eval and test files, their columns and every row of a local file: one
    line per problem, before any weights load."""
    from lorasweep.run import datacheck
    from lorasweep.training import sources

    d = spec.dataset
    src = d.source
    if src.startswith("builtin:") and src not in sources.BUILTIN_DATASETS:
        return [
            f"dataset.source: unknown builtin {src!r}; choose from "
            f"{', '.join(sources.BUILTIN_DATASETS)}"
        ]
    local = not src.startswith("builtin:") and (
        sources.is_local(src) or src.startswith((".", "/", "~"))
    )
    files = {"source": src} | {k: v for k in ("eval_file", "test_file") if (v := getattr(d, k))}
    columns: dict[str, list[str] | None] = {}
    errors = []
    for role, ref in files.items():
        path = Path(ref).expanduser()
        if role != "source" or local:
            if not path.exists():
                errors.append(f"dataset.{role}: file not found: {ref!r}")
                continue
            if path.suffix.lower() not in sources.LOCAL_SUFFIXES:
                errors.append(f"dataset.{role}: unsupported file type {path.suffix!r} "
                              f"(use {', '.join(sources.LOCAL_SUFFIXES)})")  # fmt: skip
                continue
        try:
            columns[role] = sources.source_columns(ref)
        except sources.DataError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - a malformed file: one line, not a traceback
            errors.append(f"dataset.{role}: cannot read {ref!r}: {e}")
    if errors or columns["source"] is None:  # a hub dataset: columns are known after download
        return errors
    if spec.task == "classification":
        needed = {"dataset.text_column": d.text_column, "dataset.label_column": d.label_column}
    else:
        from lorasweep.training.data import format_spec
        from lorasweep.training.formats import required_columns

        req = required_columns(format_spec(d.model_dump()))
        needed = {f"dataset.columns ({d.format})": c for c in req}
        if d.format == "text":
            needed = {"dataset.text_column": d.text_column}
    missing = [
        f"{key}: column {col!r} not in {files[role]}"
        + ("" if role == "source" else f" (dataset.{role})")
        + f" (columns: {', '.join(map(str, have))})"
        for role, have in columns.items()
        for key, col in needed.items()
        if have is not None and col not in have
    ]
    # every row of a local file, before any weights load (a bad row 300 fails here, not in
    # the middle of tokenizing)
    return missing or datacheck.check_rows(d.model_dump(), spec.task)


def head_notes(spec: SweepSpec, config: Any) -> list[str]:
    """A classification checkpoint whose head has another number of classes than the data:
    the head is re-initialized (not an error, but the user should know)."""
    from lorasweep.run import datacheck

    archs = getattr(config, "architectures", None) or []
    if spec.task != "classification" or not any("SequenceClassification" in a for a in archs):
        return []
    n = datacheck.class_count(spec.dataset.model_dump())
    if n is None or n == config.num_labels:
        return []
    return [
        f"model: the checkpoint's classification head has {config.num_labels} classes, the data "
        f"{n}: the head is re-initialized and trained with the adapter"
    ]


def check_model(spec: SweepSpec, device: str = "cpu") -> list[str]:
    """Model reference, its files, and every variant's target modules / rank pattern /
    quantization on the meta device."""
    from lorasweep.training import models

    try:
        config = models.load_config(spec.model)
    except (models.ModelError, ValueError, OSError) as e:
        return [str(e).splitlines()[0]]
    from lorasweep.training.targets import (
        build_meta_model,
        rank_pattern_for_groups,
        resolve_targets,
    )

    try:
        meta = build_meta_model(config, spec.task, num_labels=2)
    except Exception as e:  # noqa: BLE001 - an architecture transformers cannot build
        return [f"model: cannot build {spec.model!r} from its config: {e}"]
    errors = check_model_files(spec.model) + check_positions(spec, config)
    variants = spec.variants or {"lora": spec.lora}
    for name, v in variants.items():
        ad = merge_adapter(spec.lora, v)
        key = f"variants.{name}" if spec.variants else "lora"
        if ad.get("quantization") == "4bit" and device == "cpu":
            errors += check_cpu_4bit(meta, spec, f"{key}.quantization")
        tm = ad.get("target_modules")
        if tm is not None:
            own = not spec.variants or "target_modules" in v.model_fields_set
            where = f"{key}.target_modules" if own else "lora.target_modules"
            try:
                resolve_targets(meta, tm)
            except ValueError as e:
                errors.append(f"{where}: {e}")
            else:
                errors += check_expert_dropout(config, meta, spec.task, tm, ad, key)
        if ad.get("rank_pattern"):
            try:
                rank_pattern_for_groups(meta, ad["rank_pattern"], ad.get("alpha_pattern"))
            except ValueError as e:
                errors.append(f"{key}.rank_pattern: {e}")
    where, values = space_dims(spec).get("target_modules", ("", []))
    for i, tm in enumerate(values):
        try:
            resolve_targets(meta, tm)
        except ValueError as e:
            errors.append(f"{where}[{i}]: {e}")
        else:
            errors += check_expert_dropout(config, meta, spec.task, tm, spec.lora.model_dump(
                exclude_unset=True), "lora")  # fmt: skip
    return list(dict.fromkeys(errors))


def check_expert_dropout(config: Any, meta: Any, task: str, targets: Any, ad: dict[str, Any],
                         key: str) -> list[str]:  # fmt: skip
    """peft adapts fused mixture-of-experts weights only without dropout: a line when these
    targets reach them (asked by name, by ``mlp``/``experts``, or through peft's ``all-linear``)
    and the trial's dropout (0.05 unless set, ``plan.adapter_config``) is not 0."""
    from lorasweep.training.targets import expert_parameters

    dropout = ad.get("dropout", 0.05)
    if not dropout or not expert_parameters(meta):
        return []
    from lorasweep.tools.estimate_model import count

    try:
        adapted = count(config, task, targets)
    except ValueError:
        return []  # the target's own error is reported where it is resolved
    params = [x.name.split(".")[-1] for x in adapted.layers if x.parameter]
    if not params:
        return []
    return [f"{key}.dropout: peft adapts fused expert weights ({', '.join(dict.fromkeys(params))}) "
            f"only without dropout: set dropout: 0 (got {dropout})"]  # fmt: skip


# a local model folder needs one of each to be fine-tuned (a config alone builds random weights)
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model")  # fmt: skip
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx")


def check_model_files(ref: str) -> list[str]:
    """A local model folder without weights or without a tokenizer, named before any load."""
    path = Path(ref).expanduser()
    if ref.startswith("builtin:") or not path.is_dir():
        return []  # builtins ship complete; a hub id is checked by transformers on load
    errors = []
    if not any(next(path.glob(p), None) for p in _WEIGHT_FILES):
        errors.append(
            f"model: no weights in {ref!r} (no .safetensors or .bin file); a config alone "
            "would train from random weights"
        )
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        errors.append(f"model: no tokenizer in {ref!r} (no tokenizer.json, vocab or "
                      "tokenizer_config.json)")  # fmt: skip
    return errors


def model_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (None when unbounded)."""
    for cfg in (config, getattr(config, "text_config", None)):
        for k in _POSITION_KEYS:
            v = getattr(cfg, k, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def check_positions(spec: SweepSpec, config: Any) -> list[str]:
    limit = model_positions(config)
    n = spec.dataset.max_length
    if limit is None or n <= limit:
        return []
    return [f"dataset.max_length: {n} is beyond the model's {limit} positions; use at most {limit}"]


def check_cpu_4bit(meta: Any, spec: SweepSpec, key: str) -> list[str]:
    """bitsandbytes' CPU 4-bit kernel needs every quantized layer's input width to be a multiple
    of its block (64); found on the meta model instead of deep inside every trial's forward."""
    import torch

    from lorasweep.training.models import QUANT_BLOCK, quant_skip_modules

    skip = quant_skip_modules(spec.task)
    for name, module in meta.named_modules():
        if not isinstance(module, torch.nn.Linear) or any(
            name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip
        ):
            continue
        if module.in_features % QUANT_BLOCK:
            return [
                f"{key}: 4bit on CPU needs layer input widths that are multiples of "
                f"{QUANT_BLOCK}; {name} of {spec.model!r} has {module.in_features}"
            ]
    return []


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


def check_space_training(spec: SweepSpec, fields: dict[str, Any]) -> list[str]:
    """Each TrainingArguments value of the grid and the search, checked as if it were in
    ``training:`` (with the other training settings, for the ranges that depend on them)."""
    lora = set(lora_keys(spec))
    errors = []
    for key, (where, values) in space_dims(spec).items():
        if key in lora or key == "rank":
            continue
        if key not in fields:
            errors.append(
                f"{where}: neither a lora: key nor a transformers TrainingArguments field "
                f"(values {values!r})"
            )
            continue
        for i, v in enumerate(values):
            for line in check_training({**spec.training, key: v}, "training", fields):
                if line.startswith(f"training.{key}:"):
                    errors.append(f"{where}[{i}]" + line.removeprefix(f"training.{key}"))
    return list(dict.fromkeys(errors))


def check_spec(spec: SweepSpec, *, device: str | None = None) -> list[str]:
    """Raise SpecError with every problem found; when the spec can run, return the notes the
    user should read before it does (one line each)."""
    if device is None:
        from lorasweep.training.models import pick_device

        device = pick_device()
    fields = _training_fields()
    errors = check_training(spec.training, "training", fields)
    errors += check_space_training(spec, fields)
    errors += check_dataset(spec)
    errors += check_variants(spec, device)
    errors += check_model(spec, device)
    from lorasweep.training.tracking import check_tracking

    errors += check_tracking(spec.report_to)
    if errors:
        raise SpecError(errors)
    from lorasweep.training import models

    return head_notes(spec, models.load_config(spec.model))

"""Other tools' names for spec keys: the "did you mean" of an unknown key.

Axolotl, LLaMA-Factory, peft and transformers call lorasweep's keys by other names (``lora_r``,
``r``, ``load_in_4bit``, ``micro_batch_size``, ``cutoff_len``) or set them at another level (a
top-level ``learning_rate``). ``suggest`` names the lorasweep key for an unknown one (an alias,
else a close spelling of a key of its section); ``free_form_hints`` finds those names among the
keys of the sections pydantic does not check (``training:``, ``grid:``, ``search.space:``) and
the target group ``all``. Pure functions over names: the spec's field names come as arguments.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

# transformers TrainingArguments fields that belong under training: (a test checks each is a
# field of the installed transformers); at the top level or in lora: they are misplaced
TRAINING_NAMES = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "lr_scheduler_type",
    "optim",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "label_smoothing_factor",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "eval_strategy",
    "save_strategy",
    "bf16",
    "fp16",
    "neftune_noise_alpha",
)
# other tools' names of a lora: key (peft, axolotl, LLaMA-Factory) -> the key, or "key: value"
# where lorasweep says it with a value
ADAPTER = {
    "r": "rank",
    "lora_r": "rank",
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "lora_target": "target_modules",
    "load_in_4bit": "quantization: 4bit",
    "use_dora": "method: dora",
    "use_rslora": "alpha: rslora",
    "bnb_4bit_compute_dtype": "compute_dtype",
}
# other tools' names of a dataset: key
DATASET = {
    "sequence_len": "max_length",
    "cutoff_len": "max_length",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "seq_len": "max_length",
    "val_set_size": "eval_fraction",
}
# other tools' names of a TrainingArguments field; none is a field itself (a test checks)
TRAINING = {
    "micro_batch_size": "per_device_train_batch_size",
    "batch_size": "per_device_train_batch_size",
    "num_epochs": "num_train_epochs",
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "lr_scheduler": "lr_scheduler_type",
    "optimizer": "optim",
}
# top-level names of other tools that no table above covers
TOP = {
    "base_model": "model",
    "model_name_or_path": "model",
    "datasets": "dataset.source",
    "seed": "seeds",
    "rank": "grid.rank",
    "ranks": "grid.rank",
}
ANALYSIS = {"tolerance": "margin"}  # the deprecated --tolerance of analyze
ALL_LINEAR = ("all", "all_linear", "all linear", "alllinear")  # peft says "all-linear"


def _adapter_target(name: str, prefix: str, training_at: str) -> str | None:
    """Where an adapter section's (``lora``, ``variants.x``) unknown key ``name`` belongs."""
    if name in ADAPTER:
        return f"{prefix}.{ADAPTER[name]}"
    if name in DATASET:
        return f"dataset.{DATASET[name]}"
    if name in TRAINING:
        return f"{training_at}.{TRAINING[name]}"
    if name in TRAINING_NAMES:
        return f"{training_at}.{name}"
    return "seeds" if name == "seed" else None


def _alias(parent: tuple[str, ...], name: str, fields: Mapping[str, Sequence[str]]) -> str | None:
    if not parent:
        if name in TOP:
            return TOP[name]
        if name in ADAPTER:
            target = ADAPTER[name]
            return "grid.rank" if target == "rank" else f"lora.{target}"
        if name in fields.get("adapter", ()):
            return f"lora.{name}"
        if name in DATASET or name in fields.get("dataset", ()):
            return f"dataset.{DATASET.get(name, name)}"
        if name in TRAINING or name in TRAINING_NAMES:
            return f"training.{TRAINING.get(name, name)}"
        return None
    if parent == ("lora",):
        return _adapter_target(name, "lora", "training")
    if parent[0] == "variants" and len(parent) == 2:
        prefix = f"variants.{parent[1]}"
        return _adapter_target(name, prefix, f"{prefix}.training")
    if parent == ("dataset",):
        if name in DATASET:
            return f"dataset.{DATASET[name]}"
        if name in TRAINING or name in TRAINING_NAMES:
            return f"training.{TRAINING.get(name, name)}"
        return f"lora.{ADAPTER[name]}" if name in ADAPTER else None
    if parent == ("analysis",) and name in ANALYSIS:
        return f"analysis.{ANALYSIS[name]}"
    return None


def section_of(parent: tuple[str, ...]) -> str | None:
    """The kind of spec section at ``parent``: top, adapter, dataset, search, analysis."""
    if not parent:
        return "top"
    if parent == ("lora",) or (parent[0] == "variants" and len(parent) == 2):
        return "adapter"
    if len(parent) == 1 and parent[0] in ("dataset", "search", "analysis"):
        return parent[0]
    return None


def suggest(parent: tuple[str, ...], name: str, fields: Mapping[str, Sequence[str]]) -> str | None:
    """The lorasweep key meant by the unknown key ``name`` of the section at ``parent`` (a
    location as pydantic gives it: ``()``, ``("lora",)``, ``("variants", "dora")``), as a path
    (``lora.rank``, ``training.learning_rate``, ``lora.quantization: 4bit``); None without one.

    ``fields`` holds each section's keys (``section_of``): an alias of another tool first, else
    the closest spelling of a key of the same section."""
    found = _alias(parent, name, fields)
    if found:
        return found
    close = difflib.get_close_matches(name, fields.get(section_of(parent) or "", ()), 1, 0.75)
    return ".".join([*parent, close[0]]) if close else None


def _free_key_target(where: str, name: str) -> str | None:
    """Where a key of a free-form section (``training``, ``grid``, ``search.space``, a variant's
    ``training``) belongs when it is another tool's name; None for a name it may take."""
    if where.endswith("training"):
        if name in TRAINING:
            return f"{where}.{TRAINING[name]}"
        if name in DATASET and DATASET[name] == "max_length":
            return "dataset.max_length"
        if name in ADAPTER:
            owner, target = where.rpartition(".")[0], ADAPTER[name]
            if owner.startswith("variants."):
                return f"{owner}.{target}"
            return "grid.rank" if target == "rank" else f"lora.{target}"
        return None
    if name in ADAPTER:  # grid, search.space: the key alone, the values stay a list
        return f"{where}.{ADAPTER[name].split(':')[0]}"
    return f"{where}.{TRAINING[name]}" if name in TRAINING else None


def _all_linear(where: str, value: Any) -> list[str]:
    """A line per ``all`` among target_modules values (a string, or a list of names)."""
    items = value if isinstance(value, list) else [value]
    return [
        f"{where}: {v!r} is not a module name or a target group (attention, mlp, experts, "
        "all-linear); "
        "did you mean all-linear?"
        for v in items
        if isinstance(v, str) and v.strip().lower() in ALL_LINEAR
    ]


def free_form_hints(data: Mapping[str, Any]) -> list[str]:
    """One line per key of a free-form section that is another tool's name for a lorasweep key
    (``training.micro_batch_size``, ``grid.lora_r``), and per target_modules value ``all``:
    ``grid.lora_r: unknown key (value [8, 16]); did you mean grid.rank?``. ``data`` is the
    spec as read from YAML; sections of the wrong shape are left to the spec's own checks."""
    lines: list[str] = []
    sections: list[tuple[str, Any]] = [("training", data.get("training"))]
    sections.append(("grid", data.get("grid")))
    search = data.get("search")
    if isinstance(search, Mapping):
        sections.append(("search.space", search.get("space")))
    adapters: list[tuple[str, Any]] = [("lora", data.get("lora"))]
    variants = data.get("variants")
    if isinstance(variants, Mapping):
        adapters += [(f"variants.{k}", v) for k, v in variants.items()]
    for where, ad in adapters:
        if isinstance(ad, Mapping):
            sections.append((f"{where}.training", ad.get("training")))
            lines += _all_linear(f"{where}.target_modules", ad.get("target_modules"))
    for where, section in sections:
        if not isinstance(section, Mapping):
            continue
        for name, value in section.items():
            target = _free_key_target(where, str(name))
            if target:
                line = f"{where}.{name}: unknown key (value {value!r})"
                lines.append(f"{line}; did you mean {target}?")
        values = section.get("target_modules") if where in ("grid", "search.space") else None
        if isinstance(values, list):
            for i, v in enumerate(values):
                lines += _all_linear(f"{where}.target_modules[{i}]", v)
    return lines

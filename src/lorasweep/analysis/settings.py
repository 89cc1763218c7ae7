"""The settings a sweep can vary, as columns of the trials table: which of them group the trials
by default, and how they read in sentences.

The one vocabulary of setting names the analysis knows. A run folder's table names its varying
settings itself (``df.attrs["settings"]``, from the store); a table read from CSV has lost that,
so the analysis looks for these names among its columns. Pure functions; no torch import.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from lorasweep.records import SHORT_NAMES, setting_label

# ``DataFrame.attrs`` key: the columns of the settings that vary across the run's trials
SETTINGS_ATTR = "settings"

# keys of ``lora:`` (``spec.AdapterSpec``) as trials-table columns
LORA_SETTINGS = (
    "method",
    "alpha_policy",
    "dropout",
    "target_modules",
    "bias",
    "quantization",
    "compute_dtype",
    "precision",
    "init_r",
    "target_r",
)
# transformers ``TrainingArguments`` fields that a sweep commonly varies (a test checks that
# each is a field of the installed transformers)
TRAINING_SETTINGS = (
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "label_smoothing_factor",
    "optim",
)
# TrainingArguments fields of older transformers (before 5.x), still found in tables made
# elsewhere; transformers 5 folded ``warmup_ratio`` into ``warmup_steps`` (a float below 1)
LEGACY_TRAINING_SETTINGS = ("warmup_ratio",)
SETTING_NAMES = (*LORA_SETTINGS, *TRAINING_SETTINGS, *LEGACY_TRAINING_SETTINGS)

# settings whose values are words: a numeric column of that name is something else (the
# ``precision`` of a classifier, a metric)
WORD_SETTINGS = ("method", "target_modules", "bias", "quantization", "compute_dtype", "precision")
# columns that follow the rank under an alpha policy (alpha = r, 2r): a group of their own only
# where they vary at a fixed rank
RANK_DEPENDENT = ("alpha", "lora_alpha", "scale", "scaling")
# never settings: the configuration's id columns and the blocking factor
ID_COLUMNS = ("variant", "rank", "seed")

# other tools' names of the rank column (peft, axolotl, LLaMA-Factory)
RANK_ALIASES = ("r", "lora_r", "lora_rank")
# other tools' names of a setting column
COLUMN_ALIASES = {"lora_dropout": "dropout", "lora_target_modules": "target_modules"}
# prefixes of a run's configuration in trackers' exports: W&B (``config.lora_r``, flattened by
# ``pandas.json_normalize``), MLflow (``params.learning_rate``); peft's own config nested in a
# W&B config as ``peft_config.<adapter>.r``
CONFIG_PREFIXES = ("config.", "params.")

# how settings read in sentences ("rank 8 at learning rate 0.001")
READABLE = {
    "rank": "rank",
    "learning_rate": "learning rate",
    "per_device_train_batch_size": "batch size",
    "gradient_accumulation_steps": "gradient accumulation steps",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "learning-rate schedule",
    "target_modules": "target modules",
    "alpha_policy": "alpha policy",
}


def readable(name: str) -> str:
    """A setting's name in a sentence: ``learning_rate`` -> "learning rate"."""
    return READABLE.get(name, name.replace("_", " "))


def value_text(value: Any) -> str:
    """A setting's value in a sentence: ``0.0001``, ``2*rank``, ``query,value``."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def level_label(name: str, value: Any) -> str:
    """One factor level in a label: ``r=8``, ``lora``, ``lr=0.0001`` (``records.setting_label``)."""
    if name == "variant":
        return str(value)
    if name == "rank":
        return "r=-" if value is None else f"r={value}"
    return setting_label(name, value)


def short_name(name: str) -> str:
    """A setting's short name in a table header (``lr``); others keep their own name."""
    return SHORT_NAMES.get(name, name)


def standard_name(column: str) -> str | None:
    """The analysis's name of a column made elsewhere (None: the column keeps its name):
    ``lora_r``, ``r``, ``config.lora_r``, ``config.peft_config.default.r`` -> ``rank``;
    ``config.learning_rate`` -> ``learning_rate`` (a known setting, an id column or an
    alpha-like one behind a tracker's prefix); ``lora_dropout`` -> ``dropout``."""
    name = column
    for prefix in CONFIG_PREFIXES:
        name = name.removeprefix(prefix)
    if name.startswith("peft_config."):
        name = name.rpartition(".")[2]
    prefixed = name != column
    known = (*SETTING_NAMES, *ID_COLUMNS, *RANK_DEPENDENT)
    if name in RANK_ALIASES:
        found = "rank"
    elif name in COLUMN_ALIASES:
        found = COLUMN_ALIASES[name]
    else:
        found = name if prefixed and name in known else None
    return found if found != column else None


def setting_columns(df: pd.DataFrame) -> list[str]:
    """The setting columns that group the trials by default, besides variant and rank: those
    named in ``df.attrs["settings"]``, then the columns of ``SETTING_NAMES`` with more than one
    value (a numeric ``precision`` column is a metric, not the training precision). Left out:
    a setting that is constant within every variant (a variant's own method or
    quantization adds nothing to its name), and alpha-like columns that follow the rank."""
    named = [c for c in df.attrs.get(SETTINGS_ATTR) or [] if c in df]
    found = [c for c in SETTING_NAMES if c in df and not (c in WORD_SETTINGS and _numeric(df[c]))]
    candidates = dict.fromkeys([*named, *found])
    out: list[str] = []
    for c in candidates:
        if c in ID_COLUMNS or _constant_within(df, c, []):
            continue
        if _constant_within(df, c, [x for x in ("variant",) if x in df]):
            continue
        by_rank = [x for x in ("variant", "rank") if x in df]
        if c in RANK_DEPENDENT and _constant_within(df, c, by_rank):
            continue
        out.append(c)
    return out


def _constant_within(df: pd.DataFrame, column: str, by: list[str]) -> bool:
    """``column`` takes one value (missing ones aside) in every group of ``by`` (no ``by``: in
    the whole table)."""
    values = df[column].map(_hashable)
    if not by:
        return bool(values.nunique(dropna=True) < 2)
    return bool((values.groupby([df[b] for b in by], dropna=False).nunique() < 2).all())


def _numeric(values: pd.Series) -> bool:
    present = values.dropna()
    return bool(len(present)) and bool(pd.to_numeric(present, errors="coerce").notna().all())


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v

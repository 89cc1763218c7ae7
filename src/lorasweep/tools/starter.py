"""``lorasweep init``: a commented starter spec for a model and a task.

The task comes from the model's config when not given (``training.models.infer_task``:
``architectures``, then ``model_type``); the target modules are peft's defaults for the model
type (BERT: query, value; Llama: q_proj, v_proj), or the ``attention`` group when peft has none
or the config cannot be read.
"""

from __future__ import annotations

from typing import Any

from lorasweep.training.models import BUILTIN_MODELS, ModelError, infer_task, load_config
from lorasweep.training.sources import BUILTIN_DATASETS

TASKS = ("classification", "causal-lm")
# the task of every builtin model and data source (a test checks that none is missing)
BUILTIN_TASKS = {
    "builtin:minilm-l6": "classification",
    "builtin:smollm2-135m": "causal-lm",
    "builtin:rotten-tomatoes": "classification",
    "builtin:imdb": "classification",
    "builtin:shakespeare": "causal-lm",
    "builtin:shakespeare-instruct": "causal-lm",
}


def builtins_lines() -> list[str]:
    """The builtin models and data by task, for ``init``'s help and its starter spec:
    ``builtin models: builtin:minilm-l6 (classification), builtin:smollm2-135m (causal-lm)``."""
    lines = []
    for what, names in (("models", BUILTIN_MODELS), ("data", BUILTIN_DATASETS)):
        by_task: dict[str, list[str]] = {}
        for name in names:
            by_task.setdefault(BUILTIN_TASKS.get(name, "any task"), []).append(name)
        parts = [f"{', '.join(ns)} ({task})" for task, ns in by_task.items()]
        lines.append(f"builtin {what}: " + "; ".join(parts))
    return lines


class StarterError(ValueError):
    """The task cannot be chosen; the message is one line."""


def _peft_targets(config: Any) -> list[str] | None:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    found = MAP.get(getattr(config, "model_type", None))
    return list(found) if found else None


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def starter_spec(model: str, task: str | None = None) -> str:
    """Commented YAML of a small, sound sweep for ``model`` (a builtin, local folder or hub id).

    Raises:
        StarterError: ``task`` is None and the model's config does not tell the task, or
            ``task`` is not one of classification, causal-lm.
    """
    if task is not None and task not in TASKS:
        raise StarterError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    config, why = None, ""
    try:
        config = load_config(model)
    except (ModelError, OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if task is None:
        if config is None:
            raise StarterError(f"{why}; pass --task classification or --task causal-lm")
        task = infer_task(config)
        if task is None:
            archs = ", ".join(getattr(config, "architectures", None) or []) or "none"
            raise StarterError(
                f"model: cannot tell the task of {model!r} from its config (model_type "
                f"{getattr(config, 'model_type', None)!r}, architectures {archs}); "
                "pass --task classification or --task causal-lm"
            )
        task_note = f"inferred from the model's config: {_arch(config)}"
    else:
        task_note = "chosen with --task"
    targets = _peft_targets(config) if config is not None else None
    if targets:
        target_line = f"target_modules: {_yaml_list(targets)}"
        target_note = f"peft's default for model type {config.model_type}"
    else:
        target_line = "target_modules: attention"
        target_note = "every attention projection (the model type has no peft default)"
        if config is None:
            target_note = f"every attention projection (config not readable: {why})"
    body = _CLASSIFICATION if task == "classification" else _CAUSAL
    builtins = "".join(f"# {line}\n" for line in builtins_lines())
    return _HEADER.format(model=model, task=task, task_note=task_note, builtins=builtins) + (
        body.format(model=model, target_line=target_line, target_note=target_note)
    )


def _arch(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return ", ".join(archs) if archs else f"model_type {getattr(config, 'model_type', '?')}"


_HEADER = """\
# lorasweep sweep spec: which LoRA rank (and variant) should {model} use?
# Run it:        lorasweep run sweep.yaml --out runs/my-sweep
# Every key, its default and its meaning: docs/spec.md. Keys left out take their defaults.
# task: {task}, {task_note}
{builtins}"""

_CLASSIFICATION = """\
name: my-sweep
task: classification
model: {model}

dataset:
  # builtin:rotten-tomatoes or builtin:imdb, a local .csv/.jsonl/.json/.parquet file, or a hub id
  source: builtin:rotten-tomatoes
  text_column: text
  label_column: label               # integer or string labels; classes are counted from the data
  eval_fraction: 0.1                # held-out share when the source has no eval split (stratified)
  max_train_examples: 2000          # subsample for a quick sweep; remove to use all the data
  max_eval_examples: 500
  max_length: 128                   # tokens; longer texts are truncated

training:                           # HF TrainingArguments names, shared by every trial
  learning_rate: 1.0e-3             # LoRA on small encoders likes a larger rate than full tuning
  per_device_train_batch_size: 32
  max_steps: 200                    # or num_train_epochs: 1
  warmup_steps: 10

lora:                               # defaults of every variant
  {target_line}
  # ^ {target_note}; also: attention, mlp, all-linear, or module-name suffixes
  alpha: 2*rank                     # scale alpha/r = 2 at every rank, so ranks compare fairly
  dropout: 0.1

grid:
  rank: [4, 8, 16, 32]

# Variants cross the rank grid unless they set their own rank. Default: one variant "lora".
# variants:
#   lora: {{}}
#   dora: {{method: dora}}
#   rslora: {{alpha: rslora}}

seeds: [0, 1, 2]                    # 3 or more seeds give the paired tests some power
# report_to: [tensorboard]          # also wandb, mlflow: one run per trial, grouped per sweep
"""

_CAUSAL = """\
name: my-sweep
task: causal-lm
model: {model}

dataset:
  # builtin:shakespeare (plain text) or builtin:shakespeare-instruct, a local .txt/.jsonl/.csv/
  # .parquet file, or a hub id
  source: builtin:shakespeare
  format: text                      # text, instruction, prompt-completion or chat
  # columns: {{instruction: question, output: answer}}   # renames for the format's columns
  eval_fraction: 0.1
  max_train_examples: 2000
  max_eval_examples: 200
  max_length: 256                   # tokens per example

training:                           # HF TrainingArguments names, shared by every trial
  learning_rate: 2.0e-4
  per_device_train_batch_size: 8
  gradient_accumulation_steps: 1
  max_steps: 200
  warmup_steps: 10

lora:                               # defaults of every variant
  {target_line}
  # ^ {target_note}; also: attention, mlp, all-linear, or module-name suffixes
  alpha: 2*rank                     # scale alpha/r = 2 at every rank, so ranks compare fairly
  dropout: 0.05
  # precision: bf16                 # on a GPU that supports it
  # quantization: 4bit              # QLoRA (needs bitsandbytes and a CUDA GPU)

grid:
  rank: [4, 8, 16, 32]

# Variants cross the rank grid unless they set their own rank. Default: one variant "lora".
# variants:
#   lora: {{}}
#   dora: {{method: dora}}
#   all-linear: {{target_modules: all-linear}}

seeds: [0, 1, 2]                    # 3 or more seeds give the paired tests some power
# report_to: [tensorboard]          # also wandb, mlflow: one run per trial, grouped per sweep
"""

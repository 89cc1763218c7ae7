"""Trial and TrialResult records, the status enum and the metric vocabulary.

No torch import here: the store, stats, plots and report all read these records.

Metric names (keys of ``TrialResult.metrics`` and columns of ``Store.trials_frame()``):

=============================  ==================================================
``accuracy``, ``f1``           classification: accuracy and macro-F1 on the eval split
``perplexity``                 causal LM: exp(token-weighted mean NLL over the eval set)
``eval_loss``                  mean eval loss (token-weighted for causal LM)
``eval_tokens``                causal LM: number of target tokens scored in eval
``majority_rate``              classification: share of the most frequent label in the eval set
``test_<metric>``              the same metric on the test split, when the dataset has one
                               (``test_accuracy``, ``test_f1``, ``test_loss``, ``test_perplexity``)
``train_loss``                 mean training loss over the last logging window
``train_seconds``              wall seconds of the training loop alone
``load_seconds``               wall seconds of loading data, model and peft wrapping
``eval_seconds``               wall seconds of the final evaluation
``test_seconds``               wall seconds of the evaluation on the test split (when one)
``examples_per_second``        training examples per training-loop second
``tokens_per_second``          non-padding training tokens per training-loop second
``trainable_params``           parameters with requires_grad (peft's own count)
``total_params``               all parameters of the wrapped model
``trainable_percent``          100 * trainable / total
``adapter_bytes``              bytes of the saved adapter folder on disk
``peak_cpu_rss_bytes``         peak resident set size of the trial's process (sampled)
``mean_cpu_rss_bytes``         mean sampled RSS during the training loop
``peak_gpu_allocated_bytes``   torch.cuda.max_memory_allocated (or MPS equivalent)
``peak_gpu_reserved_bytes``    torch.cuda.max_memory_reserved
``mean_gpu_allocated_bytes``   mean sampled allocated GPU memory during training
``lora_scale``                 alpha / r (or alpha / sqrt(r) for rsLoRA) actually used
``estimated_peak_bytes``       the estimator's predicted peak for this trial (if computed)
=============================  ==================================================
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np


class TrialStatus(str, enum.Enum):
    """Life cycle of a trial. ``complete``, ``diverged`` and ``pruned`` are final."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    DIVERGED = "diverged"
    OOM = "oom"
    PRUNED = "pruned"

    @property
    def finished(self) -> bool:
        """A finished trial is immutable and never re-run."""
        return self in (TrialStatus.COMPLETE, TrialStatus.DIVERGED, TrialStatus.PRUNED)

    @property
    def is_active(self) -> bool:
        """Not ended yet: planned, running, interrupted or paused at a pruning rung; a sweep
        runs (or resumes) it."""
        return self in (TrialStatus.PENDING, TrialStatus.RUNNING)

    @property
    def retryable(self) -> bool:
        """Ended without a result; kept, and run again only when asked (``--retry``)."""
        return self in (TrialStatus.FAILED, TrialStatus.OOM)


# Direction of every metric the tool produces: True when larger is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "f1": True,
    "perplexity": False,
    "eval_loss": False,
    "train_loss": False,
}
HIGHER_IS_BETTER.update(test_accuracy=True, test_f1=True, test_perplexity=False, test_loss=False)
# parts of a column name that mean lower is better (a metric the tool does not know)
LOWER_HINTS = ("loss", "perplexity", "ppl", "nll", "error", "seconds", "bytes", "time")


def guess_direction(metric: str) -> tuple[str, bool]:
    """("higher" | "lower", guessed?): the metric's known direction, else one guessed from its
    name (``LOWER_HINTS``)."""
    if metric in HIGHER_IS_BETTER:
        return ("higher" if HIGHER_IS_BETTER[metric] else "lower"), False
    lower = any(h in metric.lower() for h in LOWER_HINTS)
    return ("lower" if lower else "higher"), True


# Eval metrics each task's evaluation produces (each with an eval_<metric> curve). The first is
# the task's default metric: what ``stats.analyze`` compares, the pruning rungs test and the
# report shows when no metric is named.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "eval_loss"),
    "causal-lm": ("perplexity", "eval_loss"),
}
DEFAULT_METRIC: dict[str, str] = {task: metrics[0] for task, metrics in TASK_METRICS.items()}
# The metrics shown on a trial's one-line summary (progress lines, ``lorasweep status``).
HEADLINE_METRICS = ("accuracy", "f1", "perplexity")


def default_metric(task: Any) -> str | None:
    """accuracy for classification, perplexity for causal-lm; None for another or no task."""
    return DEFAULT_METRIC.get(task)


def eval_curve(metric: str) -> str:
    """The stored curve of an eval metric over steps: eval_accuracy, eval_loss, eval_perplexity."""
    return "eval_" + metric.removeprefix("eval_")


TEST_PREFIX = "test_"


def test_metric(metric: str) -> str:
    """The name of an eval metric measured on the test split: ``accuracy`` -> ``test_accuracy``,
    ``eval_loss`` -> ``test_loss``. Selection (pruning, tuning) reads the eval (validation)
    metric; the final comparison reads this one when the run has a test split."""
    return TEST_PREFIX + metric.removeprefix("eval_")


def selection_metric(metric: str) -> str:
    """The validation metric of a test metric (``test_loss`` -> ``eval_loss``); a metric that is
    not a test metric is returned as it is."""
    if not metric.startswith(TEST_PREFIX):
        return metric
    base = metric.removeprefix(TEST_PREFIX)
    return "eval_loss" if base == "loss" else base


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the basis of trial ids."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# --------------------------------------------------------------------------------------------
# Per-example eval outcomes (``TrialResult.artifacts["eval_outcomes"]``), compact JSON. Example i
# is the same eval example in every trial of a sweep (the eval set and its order are fixed).
#   {"kind": "correct", "n": N, "correct": b64(np.packbits(bool[N]))}         classification
#   {"kind": "nll", "n": N, "nll": b64('<f4'[N]), "tokens": b64('<i4'[N])}    causal LM
# nll: summed next-token NLL of the example in nats; tokens: its number of target tokens.

OUTCOME_FIELDS: dict[str, tuple[str, ...]] = {"correct": ("correct",), "nll": ("nll", "tokens")}


def encode_outcomes(kind: str, **arrays: Any) -> dict[str, Any]:
    """``encode_outcomes("correct", correct=bools)`` or ``encode_outcomes("nll", nll=sums,
    tokens=counts)``: one value per eval example, as a JSON-ready dict (nll stored as float32).

    Raises:
        ValueError: one line, for an unknown kind, missing or extra arrays, or unequal lengths.
    """
    fields = OUTCOME_FIELDS.get(kind)
    if fields is None:
        raise ValueError(f"eval outcomes: unknown kind {kind!r} (expected 'correct' or 'nll')")
    if set(arrays) != set(fields):
        raise ValueError(f"eval outcomes: kind {kind!r} takes {fields}, got {tuple(arrays)}")
    arrs = {k: np.asarray(v) for k, v in arrays.items()}
    n = len(arrs[fields[0]]) if arrs[fields[0]].ndim == 1 else -1
    if any(a.ndim != 1 or len(a) != n for a in arrs.values()):
        shapes = {k: a.shape for k, a in arrs.items()}
        raise ValueError(f"eval outcomes: arrays must be 1-D and of one length, got {shapes}")
    out: dict[str, Any] = {"kind": kind, "n": n}
    if kind == "correct":
        out["correct"] = _b64(np.packbits(arrs["correct"].astype(bool)).tobytes())
        return out
    tokens = arrs["tokens"]
    if n and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
        raise ValueError("eval outcomes: token counts must be in 0 .. 2**31-1")
    out["nll"] = _b64(arrs["nll"].astype("<f4").tobytes())
    out["tokens"] = _b64(tokens.astype("<i4").tobytes())
    return out


def decode_outcomes(d: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of :func:`encode_outcomes`: ``{"correct": bool[N]}`` or ``{"nll": float64[N],
    "tokens": int64[N]}``.

    Raises:
        ValueError: one line, for a malformed dict (kind, n, base64 text or lengths).
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"eval outcomes: expected a dict, got {type(d).__name__}")
    kind, n = d.get("kind"), d.get("n")
    fields = OUTCOME_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ValueError(f"eval outcomes: unknown kind {kind!r} (expected 'correct' or 'nll')")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"eval outcomes: n must be an integer >= 0, got {n!r}")
    raw = {}
    for k in fields:
        text = d.get(k)
        if not isinstance(text, str):
            raise ValueError(f"eval outcomes: {k!r} must be base64 text, got {type(text).__name__}")
        try:
            raw[k] = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError(f"eval outcomes: {k!r} is not valid base64") from None
        size = (n + 7) // 8 if kind == "correct" else 4 * n
        if len(raw[k]) != size:
            raise ValueError(f"eval outcomes: {k!r} holds {len(raw[k])} bytes, n={n} needs {size}")
    if kind == "correct":
        bits = np.unpackbits(np.frombuffer(raw["correct"], dtype=np.uint8), count=n)
        return {"correct": bits.astype(bool)}
    return {
        "nll": np.frombuffer(raw["nll"], dtype="<f4").astype(np.float64),
        "tokens": np.frombuffer(raw["tokens"], dtype="<i4").astype(np.int64),
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------------------------
# Typed views of the plain dicts a trial carries. Typing only: at run time they are the same
# dicts (Trial.config is hashed into the trial id, and stored as JSON).


class AdapterConfig(TypedDict, total=False):
    """The resolved ``adapter`` block of a trial config (``plan.adapter_config``)."""

    method: str  # lora, dora, adalora, ... (peft's method)
    target_modules: list[str] | str | None
    dropout: float
    bias: str
    quantization: str | None
    compute_dtype: str | None
    precision: str
    # rank-based methods
    r: int
    rank_pattern: dict[str, int] | None
    alpha_pattern: dict[str, float] | None
    scale_pattern: dict[str, float]
    # AdaLoRA
    init_r: int
    target_r: int
    tinit: int | None
    tfinal: int | None
    deltaT: int | None
    orth_reg_weight: float
    # the alpha policy, resolved for this rank
    alpha_policy: str  # "rank", "2*rank", "fixed:16", "rslora:16"
    alpha: float
    use_rslora: bool
    scale: float | None  # alpha / r (alpha / sqrt(r) for rsLoRA); None when groups differ


class TrialConfig(TypedDict):
    """``Trial.config``: everything that defines a run (``plan.plan``)."""

    task: str  # "classification" or "causal-lm"
    model: str
    dataset: dict[str, Any]  # the spec's dataset block (source, columns, split, ...)
    variant: str
    training: dict[str, Any]  # TrainingArguments names
    adapter: AdapterConfig
    report_to: list[str]


class Paused(TypedDict):
    """``TrialResult.artifacts["paused"]``: a trial stopped at a pruning rung. The checkpoint
    is a path (relative to the run folder once stored) to resume from."""

    step: int
    checkpoint: str


def paused_of(artifacts: Mapping[str, Any]) -> Paused | None:
    """The rung a trial is paused at, from its artifacts; None when it is not paused. The dict
    returned is the one in ``artifacts`` (a change to it changes them)."""
    return artifacts.get("paused") or None


@dataclass(frozen=True)
class Trial:
    """A fully resolved configuration plus a seed.

    ``config`` holds everything that defines the run (model, task, dataset, training
    arguments, adapter settings); ``variant``, ``rank`` and ``seed`` are repeated as
    columns for grouping. The id is a short hash of the canonical JSON of config + seed,
    so the same configuration always gets the same id, across runs and machines.

    ``point`` names the other settings of the grid or search that this trial takes
    (``{"learning_rate": 4e-4}``): it is for labels only (the values are in ``config``), so it
    is not part of the id.
    """

    config: TrialConfig
    variant: str
    rank: int | None
    seed: int
    point: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        payload = canonical_json({"config": self.config, "seed": self.seed})
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """Human name: ``variant/r=8/seed=0``, with the grid's other settings:
        ``lora/r=8/lr=0.0004/seed=0``."""
        r = "r=-" if self.rank is None else f"r={self.rank}"
        extra = "".join(f"/{setting_label(k, v)}" for k, v in self.point.items())
        return f"{self.variant}/{r}{extra}/seed={self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        return cls(
            config=d["config"],
            variant=d["variant"],
            rank=d["rank"],
            seed=d["seed"],
            point=dict(d.get("point") or {}),
        )


# adapter keys that follow the rank under one alpha policy: they differ between the ranks of one
# grid by design, so they are not settings of their own
RANK_DEPENDENT = ("r", "alpha", "scale")
# config keys that say where results are logged, not how they are made
NOT_SETTINGS = ("report_to", "variant")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"max_steps": 5}}`` -> ``{"training.max_steps": 5}`` (empty dicts kept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def settings_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a trial config, flattened (``training.max_steps``): everything except the
    rank and what follows from it, the variant's name and the logging targets."""
    cfg = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    adapter = dict(cfg.get("adapter") or {})
    for k in RANK_DEPENDENT:
        adapter.pop(k, None)
    cfg["adapter"] = adapter
    return flatten(cfg)


def varying_settings(configs: list[Mapping[str, Any]]) -> dict[str, str]:
    """Setting columns for the trials of one table: flattened key -> column name, for every
    setting whose value differs between ``configs``. The column is the key's last part
    (``training.learning_rate`` -> ``learning_rate``), the full key where two would clash."""
    return setting_columns([settings_of(c) for c in configs])


def setting_columns(flat: list[Mapping[str, Any]]) -> dict[str, str]:
    """``varying_settings`` of configs already flattened by ``settings_of``."""
    keys: dict[str, set[str]] = {}
    for f in flat:
        for k, v in f.items():
            keys.setdefault(k, set()).add(canonical_json(v))
    for f in flat:  # a key missing from some configs varies too
        for k in keys:
            if k not in f:
                keys[k].add("<missing>")
    varying = [k for k, vs in keys.items() if len(vs) > 1 and not k.startswith("dataset.")]
    short = [k.rsplit(".", 1)[-1] for k in varying]
    return {k: (s if short.count(s) == 1 else k) for k, s in zip(varying, short)}


# Short names of settings in labels (``lr=0.0004``); other settings keep their own name.
SHORT_NAMES = {
    "learning_rate": "lr",
    "weight_decay": "wd",
    "warmup_ratio": "warmup",
    "per_device_train_batch_size": "bs",
    "gradient_accumulation_steps": "accum",
    "num_train_epochs": "epochs",
    "target_modules": "targets",
}


def setting_label(key: str, value: Any) -> str:
    """``lr=0.0004``, ``alpha=2*rank``, ``targets=query,value``: one setting in a label."""
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    return f"{SHORT_NAMES.get(key, key)}={text}"


@dataclass
class TrialResult:
    """What a finished (or failed) trial produced."""

    trial_id: str
    status: TrialStatus
    metrics: dict[str, float] = field(default_factory=dict)
    # curves[name] = [[step, value], ...]; names: "train_loss", "eval_<metric>"
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    error: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    # extra per-trial facts that are not scalar metrics: adapter path, AdaLoRA final ranks...
    artifacts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialResult:
        return cls(
            trial_id=d["trial_id"],
            status=TrialStatus(d["status"]),
            metrics=dict(d.get("metrics") or {}),
            curves=dict(d.get("curves") or {}),
            error=d.get("error"),
            environment=dict(d.get("environment") or {}),
            artifacts=dict(d.get("artifacts") or {}),
        )

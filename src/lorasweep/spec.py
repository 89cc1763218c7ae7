"""The sweep spec: pydantic models of the YAML, validation, and grid x variants x seeds -> trials.

Validation happens in two stages, both before any weights load:

1. ``parse_spec`` checks the shape of the YAML (unknown keys, types, ranges) with pydantic and
   reports every error at once, one line each, naming the key and the bad value.
2. ``check_spec`` checks the spec against the world: the data file exists and has the named
   columns, the training arguments exist in ``transformers.TrainingArguments``, and every target
   module exists in the model (the model is built from its config on the meta device, no weights).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorasweep import aliases
from lorasweep.analysis.decision import parse_margin
from lorasweep.plan import plan
from lorasweep.records import Trial
from lorasweep.spec_checks import (  # noqa: F401 - re-exported
    ADALORA_KEYS,
    NOT_ADALORA_KEYS,
    RESERVED_TRAINING_KEYS,
    lora_keys,
    space_errors,
    variant_errors,
)


def path_safe(name: str) -> str:
    """A sweep or variant name becomes folder names (tracking runs, TensorBoard events), so it
    must stay one path component: no separators, no ``..``, no leading dot, no control
    characters."""
    if not name or name.strip() != name:
        raise ValueError("must be non-empty, without leading or trailing spaces")
    if any(c in name for c in "/\\") or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise ValueError(
            "must be one folder name (no '/', '\\', leading '.' or control characters), "
            "as it becomes part of paths"
        )
    return name


class SpecError(ValueError):
    """One or more problems with a spec; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


AlphaPolicy = float | str  # number, "rank", "2*rank", "rslora", "rslora:<alpha>"
_ALPHA_RE = re.compile(r"^(rank|2\*rank|rslora(:\d+(\.\d+)?)?)$")


class DatasetSpec(_Strict):
    """Where the data comes from and how it is cut and tokenized."""

    source: str
    """builtin name (builtin:rotten-tomatoes, builtin:imdb, builtin:shakespeare,
    builtin:shakespeare-instruct), a local .csv/.jsonl/.json/.parquet/.txt file, or a hub id."""
    text_column: str = "text"
    label_column: str = "label"
    """classification only."""
    format: Literal["text", "instruction", "prompt-completion", "chat"] = "text"
    """causal LM only: how rows become prompt/response pairs."""
    columns: dict[str, str] = Field(default_factory=dict)
    """causal LM only: renames for the format's columns (instruction, input, output, prompt,
    completion, messages)."""
    train_on_prompt: bool = False
    """causal LM formats with a prompt: also compute the loss on prompt tokens."""
    train_split: str = "train"
    eval_split: str | None = None
    """hub datasets: the eval (validation) split, which the curves, the pruning rungs and the
    main metrics use (default: validation, else test unless a test split is asked for, else
    carved from train)."""
    test_split: str | None = None
    """hub datasets: the split used as the test split (e.g. "test"), scored once at the end of
    every trial for the final comparison (the test_* metrics)."""
    config_name: str | None = None
    """hub datasets: the configuration name passed to datasets.load_dataset."""
    eval_file: str | None = None
    """a local source: a data file (same formats as a local source) used as the eval split
    instead of one carved from the source."""
    test_file: str | None = None
    """a local source: a data file (same formats as a local source) used as the test split."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """used when the source has no eval split (seeded, stratified for classification)."""
    test_fraction: float | None = Field(None, gt=0, lt=1)
    """carve a test split of this share of the rows (after de-duplication, out of what the eval
    split leaves, so the eval examples stay the same; seeded by split_seed, stratified for
    classification). Not with test_split or test_file; without any of the three there is no
    test split."""
    split_seed: int = 0
    """seed of the train/eval/test split and of the example subsampling; the same for every
    trial."""
    max_train_examples: int | None = Field(None, gt=0)
    max_eval_examples: int | None = Field(None, gt=0)
    max_test_examples: int | None = Field(None, gt=0)
    """subsample the test split to this many examples (seeded by split_seed)."""
    max_length: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _splits(self) -> DatasetSpec:
        """One line per split setting the source cannot take or that contradicts another
        (``sources.split_key_problems``), each located at its own key so that the spec's error
        printer shows the line as it is."""
        from pydantic_core import InitErrorDetails, PydanticCustomError

        from lorasweep.training.sources import split_key_problems

        problems = split_key_problems(self.model_dump(), self.model_fields_set)
        if not problems:
            return self
        raise ValidationError.from_exception_data(
            type(self).__name__,
            [
                InitErrorDetails(
                    type=PydanticCustomError("dataset_splits", "{line}", {"line": line}),
                    loc=(key,),
                    input=getattr(self, key),
                )
                for key, line in problems
            ],
        )


class AdapterSpec(_Strict):
    """LoRA settings: the ``lora:`` defaults and every entry of ``variants:``."""

    method: Literal["lora", "dora", "adalora"] | None = None
    rank: int | None = Field(None, gt=0)
    """a variant with its own rank stands alone instead of crossing the rank grid."""
    alpha: AlphaPolicy | None = None
    """a number (fixed alpha), "rank", "2*rank", "rslora" (alpha 16, scale alpha/sqrt(r)) or
    "rslora:<alpha>"."""
    dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | str | None = None
    """module-name suffixes, or a group: attention, mlp, experts, all-linear."""
    rank_pattern: dict[str, int] | None = None
    """per group (attention, mlp) or per module suffix: rank. Standalone variant."""
    alpha_pattern: dict[str, float] | None = None
    bias: Literal["none", "all", "lora_only"] | None = None
    quantization: Literal["4bit"] | None = None
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """QLoRA compute dtype (default float32 on CPU, bfloat16 on CUDA)."""
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    """mixed precision for training (refused where the device cannot do it)."""
    init_r: int | None = Field(None, gt=0)
    """AdaLoRA: initial rank of every module."""
    target_r: int | None = Field(None, gt=0)
    """AdaLoRA: average target rank after pruning."""
    tinit: int | None = Field(None, ge=0)
    """AdaLoRA: warm-up steps at init_r before pruning starts (default: 1/5 of the steps)."""
    tfinal: int | None = Field(None, gt=0)
    """AdaLoRA: final steps at the allocated ranks (default: 1/3 of the steps, at least 1)."""
    deltaT: int | None = Field(None, gt=0)
    """AdaLoRA: steps between two re-allocations during pruning."""
    orth_reg_weight: float | None = Field(None, ge=0)
    """AdaLoRA: weight of the orthogonality penalty added to the training loss (default 0.5)."""
    training: dict[str, Any] | None = None
    """TrainingArguments overrides for this variant (e.g. a learning rate)."""

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: AlphaPolicy | None) -> AlphaPolicy | None:
        if v is None or isinstance(v, int | float):
            if v is not None and v <= 0:
                raise ValueError(f"must be > 0, got {v}")
            return v
        if not _ALPHA_RE.match(str(v)):
            raise ValueError(f'must be a number, "rank", "2*rank" or "rslora", got {v!r}')
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _pattern(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        for k, r in (v or {}).items():
            if r <= 0:
                raise ValueError(f"rank for {k!r} must be > 0, got {r}")
        return v


class GridSpec(BaseModel):
    """any other lora: key (alpha, dropout, target_modules, method, ...) or transformers
    TrainingArguments name (learning_rate, warmup_steps, weight_decay, ...) -> a list of values,
    crossed with the ranks, each other and every variant that does not set that key itself;
    validated like the key's own form."""

    model_config = ConfigDict(extra="allow")

    rank: list[int] = Field(default_factory=lambda: [8])
    """LoRA ranks crossed with every variant that has no rank of its own."""

    @field_validator("rank")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        for i, r in enumerate(v):
            if r <= 0:
                raise ValueError(f"rank[{i}] must be > 0, got {r}")
        if len(set(v)) != len(v):
            raise ValueError(f"ranks must be distinct, got {v}")
        return v

    def axes(self) -> dict[str, list[Any]]:
        """The grid's settings other than rank, in the spec's order: name -> values."""
        return dict(self.model_extra or {})


class SearchSpec(_Strict):
    """Sampled configurations instead of (or crossed with) a grid."""

    method: Literal["random", "sobol"] = "random"
    """random (numpy PCG64) or sobol (scrambled Sobol, quasi-random: covers the space more
    evenly); both seeded, so a re-run plans the same trials and a larger n keeps the first."""
    n: int = Field(gt=0)
    """number of sampled configurations (each crossed with every seed)."""
    seed: int = 0
    """the sampler's seed (not a training seed)."""
    space: dict[str, Any]
    """setting -> a list of values (a choice), or {log_uniform: [low, high]}, {uniform: [low,
    high]}, {int_uniform: [low, high]}; any key a grid takes. Floats are rounded to 3
    significant digits."""


class AnalysisSpec(_Strict):
    """How the results are judged: read by the report and ``lorasweep analyze`` on the run folder,
    never part of a trial's configuration (changing it trains nothing again)."""

    margin: float | str | None = None
    """how much worse than the best a configuration may be and still be recommended: a number
    >= 0 in the metric's units, or a percentage of the best mean like "2%". Default: the
    metric's own (see "Analysis"). ``--margin`` of analyze and report overrides it."""

    @field_validator("margin", mode="before")
    @classmethod
    def _margin(cls, v: Any) -> Any:
        parse_margin(v, key="analysis.margin")  # one line naming the key and the value
        return v.strip() if isinstance(v, str) else v


class SweepSpec(_Strict):
    """A whole sweep: one base model, one task, one dataset, a grid of adapters, seeds."""

    name: str = "sweep"
    task: Literal["classification", "causal-lm"]
    model: str
    """builtin:minilm-l6, builtin:smollm2-135m, a local directory, or a hub id."""
    dataset: DatasetSpec
    training: dict[str, Any] = Field(default_factory=dict)
    """HF TrainingArguments names and values, shared by every trial."""
    lora: AdapterSpec = Field(default_factory=AdapterSpec)
    grid: GridSpec = Field(default_factory=GridSpec)
    """rank and any other lora: key or TrainingArguments name -> a list of values, all crossed:
    ``{rank: [4, 16], learning_rate: [1.0e-4, 1.0e-3]}``."""
    search: SearchSpec | None = None
    """sampled configurations (random or Sobol), crossed with the grid's axes and the seeds."""
    tune: list[str] = Field(default_factory=list)
    """settings chosen per configuration of the others on the validation metric (nested
    selection), e.g. [learning_rate]; the recommendation then compares tuned configurations on
    the test split. Read by the analysis only (changing it trains nothing)."""
    variants: dict[str, AdapterSpec] | None = None
    """named variants; each overrides ``lora:``. Default: one variant named "lora"."""
    seeds: list[int] = Field(default_factory=lambda: [0])
    report_to: list[str] = Field(default_factory=list)
    """tracking integrations passed to the Trainer: wandb, mlflow, tensorboard."""
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    """how the report judges the results (the recommendation's margin); not a trial setting."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return path_safe(v)

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, AdapterSpec] | None) -> dict[str, AdapterSpec] | None:
        for k in v or {}:
            try:
                path_safe(k)
            except ValueError as e:
                raise ValueError(f"variant name {k!r}: {e}") from None
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v: list[str]) -> list[str]:
        allowed = {"wandb", "mlflow", "tensorboard", "none"}
        for x in v:
            if x not in allowed:
                raise ValueError(f"unknown integration {x!r}; choose from {sorted(allowed)}")
        return v

    def trials(self) -> list[Trial]:
        """Expand grid x variants x seeds into fully resolved trials (see ``plan``)."""
        return plan(self)


def analysis_kwargs(
    recorded_spec: dict[str, Any] | None, given: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``stats.analyze`` for a run: the ``analysis:`` section of its
    recorded spec (the store's ``meta["spec"]``), overridden by those ``given`` that are not
    None (the command line, the API). A given ``margin`` or ``tolerance`` replaces the spec's
    margin."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    section = (recorded_spec or {}).get("analysis") or {}
    defaults = {k: v for k, v in section.items() if v is not None}
    if "margin" in given or "tolerance" in given:
        defaults.pop("margin", None)
    if (recorded_spec or {}).get("tune"):
        defaults["tune"] = list(recorded_spec["tune"])
    return {**defaults, **given}


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _section_fields() -> dict[str, list[str]]:
    """Each spec section's keys (``aliases.section_of``), for the "did you mean" of a key."""
    models = {"top": SweepSpec, "adapter": AdapterSpec, "dataset": DatasetSpec,
              "search": SearchSpec, "analysis": AnalysisSpec}  # fmt: skip
    return {name: list(model.model_fields) for name, model in models.items()}


def _unknown_key(loc: tuple[Any, ...], key: str, value: Any) -> str:
    """``lora.lora_r: unknown key (value 16); did you mean lora.rank?`` (another tool's name,
    or a close spelling of a key of the section)."""
    line = f"{key}: unknown key (value {value!r})"
    meant = aliases.suggest(tuple(map(str, loc[:-1])), str(loc[-1]), _section_fields())
    return f"{line}; did you mean {meant}?" if meant else line


def _pydantic_errors(exc: ValidationError) -> list[str]:
    lines = []
    for e in exc.errors():
        # drop pydantic's union-branch names (e.g. "float", "str") from the location
        loc = tuple(p for p in e["loc"] if p not in ("float", "str", "list[str]", "int"))
        key = _fmt_loc(loc) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith(f"{key}: "):  # a validator that names its key and value itself
            lines.append(msg)
        elif e["type"] == "extra_forbidden":
            lines.append(_unknown_key(loc, key, e["input"]))
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {msg} (got {e['input']!r})")
    return list(dict.fromkeys(lines))


def parse_spec(data: dict[str, Any] | str | Path) -> SweepSpec:
    """Parse a spec from a dict, YAML text or a path; raise SpecError listing every problem."""
    if isinstance(data, Path) or (isinstance(data, str) and "\n" not in data):
        path = Path(data)
        if not path.exists():
            raise SpecError([f"spec: file not found: {path}"])
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SpecError([f"spec: {path} is not valid YAML: {str(e).splitlines()[0]}"]) from e
    elif isinstance(data, str):
        data = yaml.safe_load(data)
    if not isinstance(data, dict):
        raise SpecError([f"spec: must be a mapping of keys, got {type(data).__name__}"])
    hints = aliases.free_form_hints(data)  # other tools' names in training:, grid:; "all"
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(list(dict.fromkeys(_pydantic_errors(exc) + hints))) from None
    errors = hints or space_errors(spec) or variant_errors(spec)
    if errors:
        raise SpecError(errors)
    return spec

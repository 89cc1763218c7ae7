"""`lorasweep init`: a commented starter spec that parses, for a chosen or inferred task."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lorasweep.spec import parse_spec
from lorasweep.tools.starter import StarterError, starter_spec
from lorasweep.training.models import infer_task


def test_minilm_starter_is_a_commented_classification_spec_that_checks() -> None:
    from lorasweep.run.preflight import check_spec

    text = starter_spec("builtin:minilm-l6", None)
    assert text.count("\n#") >= 3 and "docs/spec.md" in text
    assert "inferred from the model's config: BertModel" in text
    spec = parse_spec(text)
    assert spec.task == "classification"
    assert spec.model == "builtin:minilm-l6"
    assert spec.lora.target_modules == ["query", "value"]
    assert spec.lora.alpha == "2*rank"
    assert len(spec.seeds) >= 3 and len(spec.grid.rank) >= 3
    check_spec(spec)  # the data source, columns, training arguments and targets exist


def test_causal_lm_inferred_from_a_llama_config(tiny_llama_dir: Path) -> None:
    spec = parse_spec(starter_spec(str(tiny_llama_dir), None))
    assert spec.task == "causal-lm"
    assert spec.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.dataset.format == "text"


def test_explicit_task_without_a_readable_config_targets_attention() -> None:
    text = starter_spec("some-org/not-cached-model", "causal-lm")
    spec = parse_spec(text)
    assert spec.task == "causal-lm" and spec.lora.target_modules == "attention"
    assert "config not readable" in text
    assert parse_spec(starter_spec("some-org/not-cached-model", "classification")).task == (
        "classification"
    )


def test_unknown_task_without_config_fails_with_one_line() -> None:
    with pytest.raises(StarterError) as e:
        starter_spec("some-org/not-cached-model", None)
    msg = str(e.value)
    assert "\n" not in msg and "--task" in msg
    with pytest.raises(StarterError, match="task: 'regression'"):
        starter_spec("builtin:minilm-l6", "regression")


@pytest.mark.parametrize(
    ("config", "task"),
    [
        (SimpleNamespace(architectures=["LlamaForCausalLM"], model_type="llama"), "causal-lm"),
        (SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "causal-lm"),
        (
            SimpleNamespace(architectures=["RobertaForMaskedLM"], model_type="roberta"),
            "classification",
        ),
        (SimpleNamespace(architectures=["BertModel"], model_type="bert"), "classification"),
        (SimpleNamespace(architectures=None, model_type="mistral"), "causal-lm"),
        (SimpleNamespace(architectures=["WhisperForAudioClassification"], model_type="x"), None),
        (SimpleNamespace(architectures=None, model_type=None), None),
    ],
)
def test_infer_task(config: SimpleNamespace, task: str | None) -> None:
    assert infer_task(config) == task


def test_cli_init_writes_refuses_to_overwrite_and_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorasweep.cli import main

    out = tmp_path / "sweep.yaml"
    assert main(["init", "--model", "builtin:minilm-l6", "-o", str(out)]) == 0
    assert parse_spec(out).task == "classification"
    assert main(["init", "--model", "builtin:minilm-l6", "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["init", "--model", "builtin:minilm-l6", "--task", "causal-lm", "-o", "-"]) == 0
    assert parse_spec(capsys.readouterr().out).task == "causal-lm"
    assert main(["init", "--model", "some-org/not-cached-model", "-o", "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorasweep: error: ")

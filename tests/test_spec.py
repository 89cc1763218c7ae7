"""Spec parsing, validation messages and plan expansion (no training)."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_classification_spec

from lorasweep.plan import plan, resolve_alpha
from lorasweep.run.preflight import check_spec
from lorasweep.spec import SpecError, analysis_kwargs, parse_spec

DEMO = {
    "name": "demo",
    "task": "classification",
    "model": "builtin:minilm-l6",
    "dataset": {"source": "builtin:rotten-tomatoes", "max_length": 64},
    "training": {"learning_rate": 2e-3, "max_steps": 80},
    "lora": {"target_modules": ["query", "value"], "alpha": 16, "dropout": 0.1},
    "grid": {"rank": [2, 8, 32]},
    "seeds": [0, 1, 2],
}


def errors_of(data: dict, check: bool = False) -> list[str]:
    with pytest.raises(SpecError) as exc:
        spec = parse_spec(data)
        if check:
            check_spec(spec, device="cpu")
    return exc.value.errors


def test_issue_shape_parses_and_plans_rank_by_seed():
    spec = parse_spec(DEMO)
    trials = plan(spec)
    assert [(t.rank, t.seed) for t in trials] == [(r, s) for r in (2, 8, 32) for s in (0, 1, 2)]
    assert len({t.id for t in trials}) == 9  # ids are unique


def test_trial_ids_are_stable_and_change_with_config():
    a = plan(parse_spec(DEMO))
    b = plan(parse_spec({**DEMO, "name": "renamed"}))
    assert [t.id for t in a] == [t.id for t in b]  # the sweep's name is not part of identity
    c = plan(parse_spec({**DEMO, "training": {"learning_rate": 1e-3, "max_steps": 80}}))
    assert not {t.id for t in a} & {t.id for t in c}


def test_all_errors_reported_at_once_with_key_and_value():
    bad = {
        **DEMO,
        "grid": {"rank": [8, 0]},
        "colour": "red",
        "lora": {"alpha": "triple", "dropout": 0.1},
    }
    errs = errors_of(bad)
    assert len(errs) == 3
    assert any(e.startswith("colour: unknown key") and "'red'" in e for e in errs)
    assert any(e.startswith("grid.rank") and "0" in e for e in errs)
    assert any(e.startswith("lora.alpha") and "triple" in e for e in errs)


def test_missing_required_key():
    data = dict(DEMO)
    del data["model"]
    assert errors_of(data) == ["model: required key is missing"]


@pytest.mark.parametrize(
    ("policy", "r", "alpha", "scale", "rslora"),
    [
        (16, 8, 16.0, 2.0, False),
        ("rank", 8, 8.0, 1.0, False),
        ("2*rank", 4, 8.0, 2.0, False),
        ("rslora", 16, 16.0, 4.0, True),
        ("rslora:8", 4, 8.0, 4.0, True),
    ],
)
def test_alpha_policies(policy, r, alpha, scale, rslora):
    name, a, rs, sc = resolve_alpha(policy, r)
    assert (a, rs) == (alpha, rslora)
    assert math.isclose(sc, scale)


def test_variants_cross_grid_or_stand_alone():
    spec = parse_spec(
        {
            **DEMO,
            "seeds": [0],
            "variants": {
                "B-FP": {},
                "B-Ada": {"method": "adalora", "init_r": 12, "target_r": 8},
                "Joint-3": {"rank_pattern": {"attention": 6, "mlp": 10}},
                "rs": {"alpha": "rslora"},
            },
        }
    )
    rows = [(t.variant, t.rank) for t in plan(spec)]
    assert rows == [
        ("B-FP", 2),
        ("B-FP", 8),
        ("B-FP", 32),
        ("B-Ada", 8),
        ("Joint-3", None),
        ("rs", 2),
        ("rs", 8),
        ("rs", 32),
    ]
    rs = [t for t in plan(spec) if t.variant == "rs"]
    assert rs[0].config["adapter"]["use_rslora"] is True
    assert rs[0].config["adapter"]["alpha_policy"] == "rslora:16"


def test_adalora_validation_lines():
    errs = errors_of({**DEMO, "variants": {"a": {"method": "adalora", "init_r": 4, "target_r": 8}}})
    assert len(errs) == 1 and "variants.a" in errs[0] and "init_r=4" in errs[0]
    errs = errors_of({**DEMO, "variants": {"b": {"init_r": 4}}})
    assert "variants.b" in errs[0] and "init_r=4" in errs[0] and "AdaLoRA" in errs[0]


def test_world_checks_before_weights(tiny_bert_dir, tiny_csv, tmp_path):
    base = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    check_spec(parse_spec(base), device="cpu")  # the good spec passes
    missing = {**base, "dataset": {**base["dataset"], "source": str(tmp_path / "nope.csv")}}
    assert errors_of(missing, check=True) == [
        f"dataset.source: file not found: {str(tmp_path / 'nope.csv')!r}"
    ]
    nolabel = {**base, "dataset": {**base["dataset"], "label_column": "sentiment"}}
    (err,) = errors_of(nolabel, check=True)
    assert err.startswith("dataset.label_column: column 'sentiment' not in")
    badmod = {**base, "lora": {**base["lora"], "target_modules": ["query", "q_proj"]}}
    (err,) = errors_of(badmod, check=True)
    assert err.startswith("lora.target_modules:") and "q_proj" in err
    badarg = {**base, "training": {**base["training"], "learning_rat": 0.1, "seed": 3}}
    errs = errors_of(badarg, check=True)
    assert any("training.learning_rat" in e and "TrainingArguments" in e for e in errs)
    assert any("training.seed" in e and "seeds" in e for e in errs)


# -- the analysis section: how the results are judged, not how trials run


@pytest.mark.parametrize(
    ("given", "stored"), [(0.01, 0.01), (0, 0.0), (2, 2.0), ("2%", "2%"), (" 0.5% ", "0.5%")]
)
def test_analysis_margin_forms(given, stored):
    spec = parse_spec({**DEMO, "analysis": {"margin": given}})
    assert spec.analysis.margin == stored
    assert spec.model_dump(mode="json")["analysis"] == {"margin": stored}
    assert parse_spec(DEMO).analysis.margin is None  # default: the metric's own


@pytest.mark.parametrize("bad", ["abc", -0.5, "150%", "-1%", True, [0.01], float("nan"), ""])
def test_analysis_margin_bad_value_is_one_line_naming_key_and_value(bad):
    errs = errors_of({**DEMO, "analysis": {"margin": bad}})
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"analysis.margin: {bad!r} must be a number >= 0"), errs


def test_analysis_unknown_key_and_errors_alongside_others():
    errs = errors_of({**DEMO, "analysis": {"margn": 0.01}})
    assert errs == ["analysis.margn: unknown key (value 0.01); did you mean analysis.margin?"]
    errs = errors_of({**DEMO, "seeds": [], "analysis": {"margin": "x"}})
    assert len(errs) == 2 and any(e.startswith("analysis.margin: 'x'") for e in errs)


def test_analysis_is_not_part_of_the_trials():
    plain = plan(parse_spec(DEMO))
    judged = plan(parse_spec({**DEMO, "analysis": {"margin": "2%"}}))
    assert [t.id for t in judged] == [t.id for t in plain]
    assert [t.config for t in judged] == [t.config for t in plain]
    assert all("analysis" not in t.config and "margin" not in str(t.config) for t in judged)


def test_analysis_kwargs_of_a_recorded_spec():
    recorded = parse_spec({**DEMO, "analysis": {"margin": "2%"}}).model_dump(mode="json")
    assert analysis_kwargs(recorded) == {"margin": "2%"}
    assert analysis_kwargs(recorded, {"metric": "f1", "margin": None}) == {
        "margin": "2%",
        "metric": "f1",
    }
    assert analysis_kwargs(recorded, {"margin": 0.5}) == {"margin": 0.5}
    assert analysis_kwargs(recorded, {"tolerance": 0.1}) == {"tolerance": 0.1}  # no both-given
    assert analysis_kwargs(parse_spec(DEMO).model_dump(mode="json")) == {}
    assert analysis_kwargs(None, {"cost": None}) == {}
    assert analysis_kwargs({"name": "an older run"}) == {}  # specs recorded before the section

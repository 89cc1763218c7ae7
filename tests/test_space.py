"""Any setting on a grid, random/Sobol search, labels and columns for every varying setting,
and the confirmation of large sweeps (issue 16)."""

from __future__ import annotations

import math

import pytest
import yaml

from lorasweep.cli import main
from lorasweep.plan import describe_plan
from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.rundir import RunFolderError, check_same_settings
from lorasweep.space import search_points, unit_samples
from lorasweep.spec import SpecError, parse_spec
from lorasweep.store import open_store

BASE = {
    "task": "classification",
    "model": "builtin:minilm-l6",
    "dataset": {"source": "builtin:rotten-tomatoes"},
    "training": {"max_steps": 10},
    "seeds": [0, 1],
}


def _spec(**over):
    return parse_spec({**BASE, **over})


def _errors(**over) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, **over})
    return e.value.errors


def test_rank_only_specs_keep_their_trial_ids():
    # ids of runs recorded before grids took other keys must not change (resume stays exact)
    spec = parse_spec("src/lorasweep/specs/demo.yaml")
    ids = [t.id for t in spec.trials()]
    assert ids[:2] == ["149b50754e30", "7792713eb81d"] and len(ids) == 6
    assert all(t.point == {} for t in spec.trials())
    assert spec.trials()[0].label == "lora/r=2/seed=0"


def test_grid_crosses_any_lora_and_training_key_with_variants():
    spec = _spec(
        grid={"rank": [4, 16], "learning_rate": [1e-4, 1e-3], "alpha": ["2*rank", 16]},
        variants={
            "lora": {},
            "dora": {"method": "dora", "alpha": "rank"},
            "ada": {"method": "adalora"},
        },
    )
    trials = spec.trials()
    lora = [t for t in trials if t.variant == "lora"]
    assert len(lora) == 2 * 2 * 2 * 2  # ranks x lr x alpha x seeds
    # dora fixes alpha itself: it does not cross grid.alpha; AdaLoRA does not cross the ranks
    assert len([t for t in trials if t.variant == "dora"]) == 2 * 2 * 2
    assert len([t for t in trials if t.variant == "ada"]) == 2 * 2 * 2
    t = next(t for t in lora if t.rank == 16 and t.point == {"learning_rate": 1e-3, "alpha": 16})
    assert t.config["training"]["learning_rate"] == 1e-3 and t.config["training"]["max_steps"] == 10
    assert t.config["adapter"]["alpha"] == 16.0 and t.config["adapter"]["scale"] == 1.0
    assert t.label == "lora/r=16/lr=0.001/alpha=16/seed=0"
    assert len({t.id for t in trials}) == len(trials)
    size = describe_plan(spec, trials)
    assert size == "3 variants x 2 ranks x 2 learning_rate x 2 alpha x 2 seeds -> 32 trials"


def test_a_variant_that_sets_a_key_does_not_cross_that_axis():
    spec = _spec(
        grid={"learning_rate": [1e-4, 1e-3]},
        variants={"tuned": {}, "fixed": {"training": {"learning_rate": 5e-4}}},
    )
    fixed = [t for t in spec.trials() if t.variant == "fixed"]
    assert [t.config["training"]["learning_rate"] for t in fixed] == [5e-4, 5e-4]  # 2 seeds
    assert {t.config["training"]["learning_rate"] for t in spec.trials()} == {1e-4, 1e-3, 5e-4}


@pytest.mark.parametrize(
    ("over", "line"),
    [
        ({"grid": {"learning_rate": 1e-3}}, "grid.learning_rate: must be a non-empty list"),
        ({"grid": {"dropout": [0.1, 1.5]}}, "grid.dropout[1]: Input should be less than 1"),
        ({"grid": {"alpha": [16, "bogus"]}}, "grid.alpha[1]: must be a number"),
        ({"grid": {"bias": ["none", "some"]}}, "grid.bias[1]: Input should be"),
        ({"grid": {"method": ["lora", "adalora"]}}, "grid.method[1]: adalora cannot be"),
        ({"grid": {"init_r": [4, 8]}}, "grid.init_r: init_r=4 is an AdaLoRA key"),
        ({"grid": {"seed": [1, 2]}}, "grid.seed: cannot be swept"),
        ({"grid": {"training": [{}]}}, "grid.training: cannot be swept"),
        ({"grid": {"rank_pattern": [{"attention": 4}]}}, "grid.rank_pattern: cannot be swept"),
        ({"grid": {"dropout": [0.1, 0.1]}}, "grid.dropout: values must be distinct"),
        (
            {"grid": {"learning_rate": [1e-3]}, "training": {"learning_rate": 1e-3}},
            "grid.learning_rate: also set in training.learning_rate",
        ),
        ({"grid": {"dropout": [0.0, 0.1]}, "lora": {"dropout": 0.1}}, "grid.dropout: also set"),
        ({"tune": ["learning_rate"]}, "tune: 'learning_rate' is not a setting"),
        (
            {"search": {"n": 4, "space": {"learning_rate": {"log_uniform": [1e-2, 1e-5]}}}},
            "search.space.learning_rate: log_uniform needs [low, high] with low < high",
        ),
        (
            {"search": {"n": 4, "space": {"learning_rate": {"normal": [0, 1]}}}},
            "search.space.learning_rate: unknown distribution 'normal'",
        ),
        (
            {"search": {"n": 4, "space": {"rank": [4, 8]}}, "grid": {"rank": [4]}},
            "search.space.rank: also on the grid",
        ),
        ({"search": {"n": 4, "space": {"rank": [4, 0]}}}, "search.space.rank: ranks must be"),
        ({"search": {"n": 0, "space": {}}}, "search.n: Input should be greater than 0"),
        ({"search": {"n": 2, "method": "tpe", "space": {}}}, "search.method: Input should be"),
    ],
)
def test_every_grid_and_search_key_is_validated(over, line):
    errors = _errors(**over)
    assert any(e.startswith(line) for e in errors), errors


def test_training_values_on_the_grid_are_checked_before_anything_loads():
    from lorasweep.run.preflight import check_spec

    spec = _spec(grid={"learning_rate": [1e-3, "1e-4", -1.0], "bogus_key": [1, 2]})
    with pytest.raises(SpecError) as e:
        check_spec(spec, device="cpu")
    errors = e.value.errors
    assert (
        "grid.learning_rate[1]: must be a number, got '1e-4' (YAML reads 1e-3 as text: "
        "write 1.0e-3)" in errors
    )
    assert "grid.learning_rate[2]: must be > 0, got -1.0" in errors
    assert any(e.startswith("grid.bogus_key: neither a lora: key nor") for e in errors)
    spec = _spec(grid={"target_modules": [["query"], ["nope"]]})
    with pytest.raises(SpecError) as e:
        check_spec(spec, device="cpu")
    assert [x for x in e.value.errors if x.startswith("grid.target_modules[1]: LoRA target")]


def test_search_is_deterministic_and_grows_by_prefix():
    space = {
        "learning_rate": {"log_uniform": [1e-5, 1e-2]},
        "rank": [4, 8, 16, 32],
        "dropout": {"uniform": [0.0, 0.3]},
        "warmup_steps": {"int_uniform": [0, 10]},
    }
    for method in ("random", "sobol"):
        a = search_points(method, 8, 3, space)
        assert a == search_points(method, 8, 3, dict(reversed(list(space.items()))))
        assert search_points(method, 16, 3, space)[:8] == a  # a larger n keeps the first samples
        assert a != search_points(method, 8, 4, space)  # the seed matters
        for p in a:
            assert 1e-5 <= p["learning_rate"] <= 1e-2 and p["rank"] in (4, 8, 16, 32)
            assert 0 <= p["dropout"] <= 0.3 and p["warmup_steps"] in range(11)
            assert isinstance(p["warmup_steps"], int)
            assert float(f"{p['learning_rate']:.3g}") == p["learning_rate"]
    # log-uniform: about half the samples below the geometric middle (1e-3.5)
    lrs = [p["learning_rate"] for p in search_points("sobol", 64, 0, space)]
    assert 24 <= sum(math.log10(x) < -3.5 for x in lrs) <= 40
    u = unit_samples("sobol", 32, 2, 0)
    assert len(u) == 32 and all(0 <= x < 1 for row in u for x in row)


def test_search_plans_the_same_trials_on_a_re_run():
    space = {"learning_rate": {"log_uniform": [1e-5, 1e-2]}, "rank": [4, 8]}
    over = {"search": {"method": "sobol", "n": 6, "seed": 3, "space": space}}
    a, b = _spec(**over).trials(), _spec(**over).trials()
    assert [t.id for t in a] == [t.id for t in b] and len(a) == len({t.id for t in a})
    assert all(t.rank in (4, 8) and "learning_rate" in t.point for t in a)
    assert describe_plan(_spec(**over), a).endswith("6 sampled points x 2 seeds -> 12 trials")


def test_more_trials_than_the_threshold_need_yes(tmp_path, capsys):
    spec = {**BASE, "grid": {"rank": list(range(1, 12)), "learning_rate": [1e-4, 2e-4, 1e-3],
                             "dropout": [0.0, 0.1, 0.2]}, "seeds": [0, 1, 2]}  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorasweep: error: --yes: the spec plans 297 new")
    assert "11 ranks x 3 learning_rate x 3 dropout x 3 seeds -> 297 trials" in err[0]
    assert not out.exists()  # nothing made
    from lorasweep.api import Sweep

    with pytest.raises(ValueError, match="--yes: the spec plans 297 new trials"):
        Sweep.from_spec(spec).run(out, quiet=True)
    assert not out.exists()


def _fake_run(tmp_path, spec, accuracy):
    trials = spec.trials()
    with open_store(tmp_path, create=True) as store:
        store.add_trials(trials)
        for t in trials:
            store.mark_running(t.id)
            store.save_result(
                TrialResult(t.id, TrialStatus.COMPLETE, metrics={"accuracy": accuracy(t)})
            )
    return trials


def test_every_varying_setting_has_a_column(tmp_path, capsys):
    spec = _spec(grid={"rank": [4, 8], "learning_rate": [1e-4, 1e-3]})
    _fake_run(tmp_path, spec, lambda t: 0.5 + t.config["training"]["learning_rate"])
    with open_store(tmp_path) as store:
        df = store.trials_frame()
    assert df.attrs["settings"] == ["learning_rate"]
    assert sorted(df["learning_rate"].unique()) == [1e-4, 1e-3]
    assert "max_steps" not in df  # fixed settings are not columns
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:6] == ["id", "status", "variant", "rank", "learning_rate", "seed"]
    assert out[2].split()[4] in ("0.0001", "0.001")
    # hand-named variants with training overrides get the column too (0.1 had none)
    spec = _spec(variants={"a": {"training": {"learning_rate": 1e-4}},
                           "b": {"training": {"learning_rate": 1e-3}}})  # fmt: skip
    _fake_run(tmp_path / "v", spec, lambda t: 0.5)
    with open_store(tmp_path / "v") as store:
        df = store.trials_frame()
    assert sorted(df["learning_rate"].unique()) == [1e-4, 1e-3] and df.attrs["settings"] == []


def test_a_grid_point_added_to_a_run_is_not_a_changed_experiment(tmp_path):
    spec = _spec(training={"max_steps": 10, "learning_rate": 1e-3})
    stored = [{**t.to_dict(), "variant": t.variant} for t in spec.trials()]
    grown = _spec(training={"max_steps": 10}, grid={"learning_rate": [1e-4, 1e-3]}).trials()
    check_same_settings(stored, grown, tmp_path)  # the old trials are one point of the grid
    assert {t.id for t in spec.trials()} <= {t.id for t in grown}
    changed = _spec(training={"max_steps": 10, "learning_rate": 5e-4}).trials()
    with pytest.raises(RunFolderError, match="training.learning_rate 0.001 -> 0.0005"):
        check_same_settings(stored, changed, tmp_path)
    # a run recorded with the grid resumed with one of its values fixed: not a change either
    stored_grid = [{**t.to_dict(), "variant": t.variant} for t in grown]
    check_same_settings(stored_grid, spec.trials(), tmp_path)
    # but a fixed setting changed under a grid is
    steps = _spec(training={"max_steps": 20}, grid={"learning_rate": [1e-4, 1e-3]}).trials()
    with pytest.raises(RunFolderError, match="training.max_steps 10 -> 20"):
        check_same_settings(stored_grid, steps, tmp_path)


def test_point_is_a_label_not_part_of_the_id():
    t = _spec(grid={"learning_rate": [1e-4, 1e-3]}).trials()[0]
    bare = Trial(config=t.config, variant=t.variant, rank=t.rank, seed=t.seed)
    assert bare.id == t.id and bare.label != t.label
    assert Trial.from_dict(t.to_dict()).label == t.label


def test_the_readme_spec_parses():
    from pathlib import Path

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    block = text.split("## The spec", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    spec = parse_spec(yaml.safe_load(block))
    assert spec.tune == ["learning_rate"] and spec.dataset.test_fraction == 0.2
    assert {t.config["training"]["learning_rate"] for t in spec.trials()} == {3e-4, 1e-3}

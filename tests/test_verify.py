"""`lorasweep spectrum --verify`: the suggestion of a trained adapter becomes extra variants of
the sweep, only they train, and the report marks them. Tiny BERT, 4 steps, one seed."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_classification_spec

from lorasweep.cli import main
from lorasweep.run.sweep import run_sweep
from lorasweep.spec import parse_spec
from lorasweep.store import open_store
from lorasweep.tools import spectrum
from lorasweep.tools import spectrum_verify as verify

pytest.importorskip("peft")

LAYERS = (0, 1)
TYPES = {
    "attention.self.query": "attention",
    "attention.self.key": "attention",
    "attention.self.value": "attention",
    "attention.output.dense": "attention",
    "intermediate.dense": "mlp",
    "output.dense": "mlp",
}


def pilot_spec(model_dir, csv, **over):
    return tiny_classification_spec(model_dir, csv, grid={"rank": [8]}, seeds=[0], **over)


def fake_analysis(types, group_ranks, rank):
    """analyze_adapter-shaped output for the tiny BERT modules of ``types``."""
    modules = [
        {"name": f"bert.encoder.layer.{i}.{t}", "type": t, "group": TYPES[t]}
        for i in LAYERS
        for t in types
    ]
    type_ranks = {t: group_ranks[TYPES[t]] for t in types}
    return {
        "modules": modules,
        "suggestion": {
            "group_ranks": group_ranks,
            "type_ranks": type_ranks,
            "variant": {"rank": rank},
            "suggested_rank": rank,
        },
    }


def pattern_ranks(spec_dict, variant, names):
    """module -> rank for ``names`` under the variant's rank_pattern, as a trial builds it
    (targets.rank_pattern_for_groups) and peft matches it (first matching key)."""
    from lorasweep.tools.adapter_files import pattern_key as _pattern_key
    from lorasweep.training.targets import rank_pattern_for_groups

    spec = parse_spec(spec_dict)
    meta = verify._meta_model(spec)
    _, peft_pattern, _ = rank_pattern_for_groups(meta, spec.variants[variant].rank_pattern)
    return {n: peft_pattern[_pattern_key(peft_pattern, n)] for n in names}


# --- the spec, no training ------------------------------------------------------------------


def test_materializing_the_default_variant_keeps_every_trial_id(tiny_bert_dir, tiny_csv):
    raw = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    spec = parse_spec(raw)
    explicit = parse_spec({**raw, "variants": {"lora": {}}})
    assert [t.id for t in explicit.trials()] == [t.id for t in spec.trials()]
    # the store keeps spec_yaml (defaults left out): it plans the same trials
    dumped = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True))
    assert [t.id for t in parse_spec(yaml.safe_load(dumped)).trials()] == [
        t.id for t in spec.trials()
    ]


def test_group_pattern_for_a_pilot_on_all_linear_layers(tiny_bert_dir, tiny_csv):
    from lorasweep.run.preflight import check_spec

    raw = pilot_spec(tiny_bert_dir, tiny_csv)  # the grid targets query, value
    analysis = fake_analysis(list(TYPES), {"attention": 2, "mlp": 5}, 5)
    built = verify.build_verify_spec(raw, analysis, "lora")
    assert built["added"] == {
        "suggested-r5": {"rank": 5, "target_modules": ["attention", "mlp"]},
        "suggested-pattern": {"rank_pattern": {"attention": 2, "mlp": 5}},
    }
    assert list(built["spec"]["variants"]) == ["lora", "suggested-r5", "suggested-pattern"]
    check_spec(parse_spec(built["spec"]), device="cpu")  # spec validation accepts the keys
    want = {m["name"]: 2 if m["group"] == "attention" else 5 for m in analysis["modules"]}
    assert pattern_ranks(built["spec"], "suggested-pattern", list(want)) == want


def test_type_pattern_uses_suffixes_and_falls_back_to_full_names(tiny_bert_dir, tiny_csv):
    raw = pilot_spec(tiny_bert_dir, tiny_csv)
    # query/value at different ranks: the shortest exact suffixes
    analysis = fake_analysis(["attention.self.query", "attention.self.value"], {"attention": 3}, 3)
    analysis["suggestion"]["type_ranks"] = {"attention.self.query": 2, "attention.self.value": 3}
    built = verify.build_verify_spec(raw, analysis, "lora", by="type")
    assert built["added"]["suggested-pattern"] == {"rank_pattern": {"query": 2, "value": 3}}
    assert "target_modules" not in built["added"]["suggested-r3"]  # same modules as the grid
    # mlp output.dense alone: "output.dense" would also hit attention.output.dense
    meta = verify._meta_model(parse_spec(raw))
    want = {f"bert.encoder.layer.{i}.output.dense": 4 for i in LAYERS}
    keys = verify.spec_rank_pattern(meta, want, by="type")
    assert keys == want and verify._selects(meta, keys) == want
    # both dense types at different ranks: the loose suffix first, the exact one overrides it
    want2 = {**want, **{f"bert.encoder.layer.{i}.attention.output.dense": 2 for i in LAYERS}}
    keys2 = verify.spec_rank_pattern(meta, want2, by="type")
    assert keys2 == {"output.dense": 4, "attention.output.dense": 2}
    assert verify._selects(meta, keys2) == want2


def test_nothing_new_when_the_suggestion_is_already_in_the_grid(tiny_bert_dir, tiny_csv):
    raw = pilot_spec(tiny_bert_dir, tiny_csv)
    analysis = fake_analysis(["attention.self.query", "attention.self.value"], {"attention": 8}, 8)
    built = verify.build_verify_spec(raw, analysis, None)
    assert built["added"] == {}
    assert any("already in the grid" in n for n in built["notes"])
    assert any("uniform rank" in n for n in built["notes"])


# --- end to end -----------------------------------------------------------------------------


def _pilot_adapter(run):
    with open_store(run) as store:
        (t,) = store.trials()
    return t


def _adapter_dir(run, trial):
    """The saved adapter (stored relative to the run folder; older runs: to the cwd)."""
    stored = trial["artifacts"]["adapter_dir"]
    return str(run / stored) if (run / stored).exists() else stored


def test_verify_trains_only_the_suggested_variants(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    run = tmp_path / "run"
    out = run_sweep(pilot_spec(tiny_bert_dir, tiny_csv), run, backend="inprocess", quiet=True)
    assert out.ran == 1
    pilot = _pilot_adapter(run)
    adapter = _adapter_dir(run, pilot)

    # energy 0.5 needs at most 4 of the 8 directions: a rank below the grid's 8
    res = verify.verify_suggestion(run, adapter, energy=0.5, backend="inprocess", quiet=True)
    k = res["suggestion"]["suggested_rank"]
    assert 1 <= k <= 4 and f"suggested-r{k}" in res["variants"]
    assert res["reused_trial_ids"] == [pilot["id"]]
    assert res["outcome"]["skipped"] == 1 and res["outcome"]["ran"] == len(res["new_trial_ids"])
    spec_file = run / verify.SPEC_FILE
    new_spec = parse_spec(spec_file)  # the written spec parses
    assert list(new_spec.variants)[0] == "lora" and f"suggested-r{k}" in new_spec.variants
    with open_store(run) as store:
        trials = {t["id"]: t for t in store.trials()}
    assert trials[pilot["id"]]["attempts"] == 1  # the pilot was not re-run
    assert trials[pilot["id"]]["finished"] == pilot["finished"]
    for tid in res["new_trial_ids"]:
        assert trials[tid]["status"] == "complete" and trials[tid]["attempts"] == 1
        assert trials[tid]["variant"] in res["variants"]
    assert {trials[t]["rank"] for t in res["new_trial_ids"] if trials[t]["rank"]} <= {k}

    # a suggestion with different ranks per group becomes a rank_pattern variant as well
    real = spectrum.analyze_adapter

    def with_pattern(*args, **kwargs):
        out = real(*args, **kwargs)
        out["suggestion"]["group_ranks"] = {"attention": 2}
        out["suggestion"]["type_ranks"] = {"attention.self.query": 2, "attention.self.value": 3}
        out["suggestion"]["variant"] = {"rank": 3}
        return out

    monkeypatch.setattr(spectrum, "analyze_adapter", with_pattern)
    res2 = verify.verify_suggestion(run, adapter, by="type", backend="inprocess", quiet=True)
    assert res2["variants"]["suggested-pattern"] == {"rank_pattern": {"query": 2, "value": 3}}
    assert set(res["new_trial_ids"]) <= set(res2["reused_trial_ids"])  # nothing re-run
    with open_store(run) as store:
        df = store.trials_frame()
        meta = store.meta()
    assert (df["attempts"] == 1).all() and (df["status"] == "complete").all()
    assert set(df["variant"]) == {"lora", f"suggested-r{k}", "suggested-r3", "suggested-pattern"}
    assert [r["variants"] == res["variants"] for r in meta["verify"]] == [True, False]

    # the report: the statistics table has the variants, the spectrum section marks them
    html = (run / "report.html").read_text()
    assert "suggested-pattern" in html and f"suggested-r{k}" in html
    assert "Suggestion verified" in html and "verifies the suggestion of lora/r=8/seed=0" in html
    assert 'class="suggested"' in html

    # verifying again trains nothing
    again = verify.verify_suggestion(run, adapter, by="type", backend="inprocess", quiet=True)
    assert again["outcome"]["ran"] == 0 and again["new_trial_ids"] == []


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tiny_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    run_sweep(pilot_spec(tiny_bert_dir, tiny_csv), run, backend="inprocess", quiet=True)
    return run, _adapter_dir(run, _pilot_adapter(run))


def test_cli_spectrum_json_and_table(trained, capsys):
    _, adapter = trained
    assert main(["spectrum", adapter, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"modules", "suggested_rank", "suggested_rank_pattern", "suggestion"} <= set(out)
    assert len(out["modules"]) == 4 and out["nominal_rank"] == 8  # query, value x 2 layers
    assert {"name", "r", "effective_rank", "energy_rank"} <= set(out["modules"][0])
    assert main(["spectrum", adapter, adapter, "--energy", "0.99"]) == 0
    text = capsys.readouterr().out
    assert "bert.encoder.layer.1.attention.self.value" in text and "eff.rank" in text
    assert "Suggestion at 99% of the update energy: rank" in text
    assert "Subspace similarity" in text


def test_cli_verify_no_run_writes_the_spec_only(trained, capsys):
    run, adapter = trained
    code = main(["spectrum", adapter, "--energy", "0.5", "--verify", str(run), "--no-run"])
    assert code == 0
    text = capsys.readouterr().out
    assert "Added to the sweep:" in text and "lorasweep run" in text
    spec = parse_spec(run / verify.SPEC_FILE)
    assert any(v.startswith("suggested-r") for v in spec.variants)
    with open_store(run) as store:
        assert len(store.trials()) == 1  # nothing planned or trained in the store
    assert main(["spectrum", adapter, "--energy", "2"]) == 2
    assert main(["spectrum", adapter, "--verify", str(run / "nope")]) == 2

"""Nested selection (a learning rate tuned per rank), marginal means, the interaction in words,
the heatmap, and the default grouping over every setting that varies."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from lorasweep.analysis import heatmap, report, settings, stats
from lorasweep.analysis.tables import by_columns, prepare_trials
from lorasweep.cli import main

LR_LO, LR_HI = 1e-4, 1e-3
# validation accuracy per (rank, learning rate): at the best single learning rate (1e-4, by its
# mean over the ranks) r=32 is best, but tuned per rank r=8 at 1e-3 is as good and cheaper
VAL = {
    4: {LR_LO: 0.80, LR_HI: 0.83},
    8: {LR_LO: 0.82, LR_HI: 0.86},
    32: {LR_LO: 0.862, LR_HI: 0.78},
}
SEED_EFFECT = [0.003, -0.002, 0.001, -0.002]  # shared by every configuration (blocking)
NOISE = np.random.default_rng(0).normal(0, 0.0015, size=(3, 2, 4, 2))  # config x seed x split


def table(test_shift: dict | None = None) -> pd.DataFrame:
    """3 ranks x 2 learning rates x 4 seeds; ``accuracy`` on the validation split and
    ``test_accuracy`` on the test split (0.005 lower, plus ``test_shift[(rank, lr)]``)."""
    rows = []
    for i, (r, by_lr) in enumerate(VAL.items()):
        for j, (lr, mu) in enumerate(by_lr.items()):
            for s in range(4):
                shift = (test_shift or {}).get((r, lr), 0.0)
                rows.append(
                    {
                        "trial_id": f"r{r}lr{lr:g}s{s}",
                        "status": "complete",
                        "variant": "lora",
                        "rank": r,
                        "learning_rate": lr,
                        "seed": s,
                        "task": "classification",
                        "method": "lora",
                        "alpha_policy": "2*rank",
                        "alpha": 2.0 * r,
                        "accuracy": mu + SEED_EFFECT[s] + NOISE[i, j, s, 0],
                        "test_accuracy": mu - 0.005 + shift + SEED_EFFECT[s] + NOISE[i, j, s, 1],
                        "train_seconds": 100.0 + 1.5 * r,
                    }
                )
    df = pd.DataFrame(rows)
    df.attrs["settings"] = ["learning_rate"]
    return df


def _group(result: dict, rank: int) -> dict:
    return next(g for g in result["groups"] if g["key"]["rank"] == rank)


def test_tuned_per_rank_recommends_rank_and_learning_rate_and_says_why():
    r = stats.analyze(table(), tune=["learning_rate"])
    # the test split is the default metric; the tuned value is chosen on the validation one
    assert r["metric"] == "test_accuracy"
    assert "Compared on test_accuracy, the test split" in r["reason"]
    assert r["recommended"]["key"] == {"variant": "lora", "rank": 8, "learning_rate": LR_HI}
    assert r["best"]["key"] == {"variant": "lora", "rank": 32, "learning_rate": LR_LO}
    assert [g["key"]["learning_rate"] for g in r["groups"]] == [LR_HI, LR_HI, LR_LO]
    t = r["tuning"]
    assert t["tuned"] == ["learning_rate"] and t["select_on"] == "accuracy"
    assert t["same_data"] is False and t["direction"] == "higher"
    c8 = next(c for c in t["configs"] if c["key"] == {"variant": "lora", "rank": 8})
    assert c8["chosen"] == {"learning_rate": LR_HI} and c8["tried"] == 2
    assert [v["n"] for v in c8["values"]] == [4, 4]
    assert c8["values"][1]["mean"] == pytest.approx(
        table().query("rank == 8 and learning_rate == @LR_HI")["accuracy"].mean()
    )
    assert r["interaction"] == (
        "At learning rate 0.0001 (the best single value) lora r=32 looks best; tuned per rank, "
        "lora r=8 at learning rate 0.001 is as good (recommended)."
    )
    assert "Recommended lora r=8 lr=0.001:" in r["reason"]
    assert "The recommendation is lora r=8 at learning rate 0.001." in r["reason"]
    assert "of 2 values tried for each" in r["reason"]
    assert "chosen on accuracy and the configurations compared on test_accuracy" in r["reason"]
    assert not any("winner's curse" in f for f in r["flags"])
    text = stats.format_analysis(r)
    assert "Interaction: At learning rate 0.0001" in text and "Marginal means of" in text
    json.dumps(r, allow_nan=False)


def test_without_tune_the_interaction_says_the_best_rank_depends_on_the_learning_rate():
    r = stats.analyze(table(), metric="accuracy")
    assert len(r["groups"]) == 6 and r["tuning"] is None  # lr is a grouping column by default
    assert r["interaction"] == (
        "The best rank depends on the learning rate: r=32 at lr=0.0001, r=8 at lr=0.001 "
        "(means over seeds)."
    )
    one_lr = stats.analyze(table()[lambda d: d["learning_rate"] == LR_LO], metric="accuracy")
    assert one_lr["interaction"] is None and one_lr["factors"]["names"] == ["rank"]
    # best levels that differ by less than the margin change no answer: nothing to say
    flat = table()
    bump = ((flat["rank"] == 32) & (flat["learning_rate"] == LR_LO)) | (
        (flat["rank"] == 8) & (flat["learning_rate"] == LR_HI)
    )
    flat["accuracy"] = 0.8 + flat["seed"] * 0.001 + 0.002 * bump
    assert stats.analyze(flat, metric="accuracy", margin=0.001)["interaction"].startswith(
        "The best rank depends on the learning rate: r=32 at lr=0.0001, r=8 at lr=0.001"
    )
    for tune in (None, ["learning_rate"]):
        assert stats.analyze(flat, metric="accuracy", tune=tune)["interaction"] is None


def test_selection_reads_the_validation_column_and_the_comparison_the_test_column():
    # on the test split r=8 does better at 1e-4 than at 1e-3: choosing on test would flip it
    df = table(test_shift={(8, LR_LO): 0.05, (8, LR_HI): -0.005})
    on_val = stats.analyze(df, metric="test_accuracy", tune="learning_rate", select_on="accuracy")
    on_test = stats.analyze(df, metric="test_accuracy", tune="learning_rate",
                            select_on="test_accuracy")  # fmt: skip
    assert _group(on_val, 8)["key"]["learning_rate"] == LR_HI
    assert _group(on_test, 8)["key"]["learning_rate"] == LR_LO
    # the compared numbers are the test column of the rows chosen on the validation column
    chosen = df[(df["rank"] == 8) & (df["learning_rate"] == LR_HI)]
    assert _group(on_val, 8)["mean"] == pytest.approx(chosen["test_accuracy"].mean())
    assert _group(on_val, 8)["mean"] != pytest.approx(chosen["accuracy"].mean())
    assert on_val["tuning"]["same_data"] is False and on_test["tuning"]["same_data"] is True


def test_same_data_is_flagged_as_the_winners_curse():
    r = stats.analyze(table(), metric="accuracy", tune=["learning_rate"])
    assert r["tuning"]["select_on"] == "accuracy" and r["tuning"]["same_data"] is True
    assert any("winner's curse" in f and "dataset.test_fraction" in f for f in r["flags"])
    assert "chosen and compared on the same data (accuracy)" in r["reason"]
    # with a test split (the default metric) the flag is gone
    with_test = stats.analyze(table(), tune="learning_rate")
    assert not any("winner's curse" in f for f in with_test["flags"])


def test_refusals_name_the_option_and_the_value():
    df = table()
    cases = [
        ({"tune": ["lr"]}, r"^tune: 'lr' is not a column of the trials table$"),
        ({"tune": ["learning_rate"], "by": ["rank", "learning_rate"]},
         r"^tune: 'learning_rate' is also in by"),
        ({"tune": ["learning_rate"], "select_on": "val"},
         r"^select_on: 'val' is not a column of the trials table$"),
        ({"select_on": "accuracy"}, r"^select_on: 'accuracy' is used only with tune$"),
        ({"tune": ["seed"]}, r"^tune: 'seed' is the blocking factor"),
    ]  # fmt: skip
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            stats.analyze(df, **kwargs)
        assert "\n" not in str(e.value)
    no_val = df.drop(columns=["accuracy"])
    with pytest.raises(ValueError, match=r"^select_on: 'accuracy' \(the validation metric of"):
        stats.analyze(no_val, metric="test_accuracy", tune=["learning_rate"])


def test_marginal_means_match_an_independent_groupby():
    df = table()
    r = stats.analyze(df, tune=["learning_rate"])
    f = r["factors"]
    assert f["names"] == ["rank", "learning_rate"] and f["balanced"] and f["note"] is None
    # balanced: a marginal mean is the plain mean of the trials at that level
    for name in ("rank", "learning_rate"):
        expected = df.groupby(name)["test_accuracy"].agg(["mean", "count"])
        got = {row["level"]: row for row in f["marginal"][name]}
        for level, e in expected.iterrows():
            assert got[level]["mean"] == pytest.approx(e["mean"]) and got[level]["n"] == e["count"]
    assert [x["best"] for x in f["marginal"]["learning_rate"]] == [True, False]
    # unbalanced (one seed fewer, one cell missing): the mean of the configuration means
    missing_seed = (df["rank"] == 4) & (df["seed"] == 3)
    missing_cell = (df["rank"] == 32) & (df["learning_rate"] == LR_HI)
    cut = df[~missing_seed & ~missing_cell]
    f = stats.analyze(cut, metric="accuracy")["factors"]
    assert f["balanced"] is False and "5 of the 6 combinations" in f["note"]
    assert "3 to 4 seeds per configuration" in f["note"]
    cells = cut.groupby(["rank", "learning_rate"])["accuracy"].mean().reset_index()
    for name in ("rank", "learning_rate"):
        expected = cells.groupby(name)["accuracy"].mean()
        got = {row["level"]: row["mean"] for row in f["marginal"][name]}
        assert got == pytest.approx(expected.to_dict())


def test_heatmap_png_and_its_cells(tmp_path):
    df = table()
    r = stats.analyze(df, tune=["learning_rate"])
    assert heatmap.heatmap_axes(r) == ("rank", "learning_rate")
    data = heatmap.heatmap_data(df, r["metric"], "rank", "learning_rate", r["factors"]["by"])
    assert len(data) == 6 and set(data["n"]) == {4}
    cell = data[(data["row"] == 8) & (data["column"] == LR_HI)]["mean"].item()
    assert cell == pytest.approx(_group(r, 8)["mean"])
    assert heatmap.chosen_cells(r, "rank", "learning_rate") == [(4, LR_HI), (8, LR_HI),
                                                                 (32, LR_LO)]  # fmt: skip
    path = heatmap.write_heatmap(df, r, tmp_path)
    assert path == tmp_path / "heatmap.png" and path.read_bytes()[:4] == b"\x89PNG"
    one = stats.analyze(df[df["learning_rate"] == LR_LO])
    assert heatmap.write_heatmap(df, one, tmp_path / "none") is None


def test_report_shows_tuning_factors_heatmap_and_setting_columns(tmp_path):
    path = report.build_report(table(), None, {"name": "lr"}, tmp_path,
                               analysis_kwargs={"tune": ["learning_rate"]})  # fmt: skip
    html = path.read_text()
    assert (tmp_path / "heatmap.png").exists() and 'id="plot-heatmap"' in html
    assert "Tuning: learning rate chosen per rank" in html
    assert "used different data, so the comparison is not biased" in html
    assert "lr=0.0001: " in html and "(n=4)" in html  # every value tried, with its mean
    assert "Factors: marginal means and interaction" in html
    assert "At learning rate 0.0001 (the best single value) lora r=32 looks best" in html
    assert "<th>lr</th>" in html and "chosen by tuning" in html
    assert "Recommended: lora r=8 lr=0.001" in html


def test_csv_cli_contract(tmp_path, capsys):
    """A table made elsewhere: no status, no variant; selection on val, comparison on test."""
    df = table().rename(columns={"accuracy": "val_accuracy"})
    cols = ["rank", "learning_rate", "seed", "val_accuracy", "test_accuracy", "train_seconds"]
    csv = tmp_path / "sweep.csv"
    df[cols].to_csv(csv, index=False)
    argv = ["analyze", str(csv), "--metric", "test_accuracy", "--direction", "max", "--by",
            "rank", "--tune", "learning_rate", "--select-on", "val_accuracy", "--cost",
            "train_seconds", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"]["key"] == {"rank": 8, "learning_rate": LR_HI}
    assert out["tuning"]["select_on"] == "val_accuracy" and out["tuning"]["same_data"] is False
    assert out["tuning"]["direction"] == "higher"
    assert out["cost"] == "train_seconds" and out["direction"] == "higher"
    # one line, exit 2, for a bad option
    assert main(["analyze", str(csv), "--tune", "lr"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "lorasweep: error: tune: 'lr' is not a column of the trials table"


def test_default_grouping_picks_up_varying_settings():
    df = prepare_trials(table())
    assert by_columns(df, None) == ["variant", "rank", "learning_rate"]  # from attrs
    csv_like = df.copy()
    csv_like.attrs.clear()  # a CSV round trip loses attrs: the vocabulary finds it
    csv_like["precision"] = np.linspace(0.7, 0.9, len(df))  # a metric, not the training precision
    csv_like["dropout"] = 0.1  # constant: not a factor
    assert by_columns(csv_like, None) == ["variant", "rank", "learning_rate"]
    # alpha follows the rank (alpha_policy 2*rank): no group of its own; a swept one is
    swept = csv_like.assign(alpha=np.where(csv_like["learning_rate"] == LR_LO, 16.0, 32.0))
    swept.attrs["settings"] = ["alpha"]
    assert by_columns(swept, None) == ["variant", "rank", "alpha", "learning_rate"]
    # a setting that only follows the variant adds nothing to its name
    two = pd.concat([df, df.assign(variant="dora", method="dora", seed=df["seed"])])
    assert "method" not in by_columns(prepare_trials(two), None)
    assert stats.group_label({"variant": "lora", "rank": 16, "learning_rate": 4e-4}) == (
        "lora r=16 lr=0.0004"
    )


def test_the_vocabulary_names_real_training_arguments():
    transformers = pytest.importorskip("transformers")
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    assert set(settings.TRAINING_SETTINGS) <= fields, set(settings.TRAINING_SETTINGS) - fields
    assert not set(settings.LORA_SETTINGS) & fields  # the two vocabularies do not overlap

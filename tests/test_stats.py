"""stats: hand-computed fixtures with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps

from lorasweep.analysis import stats
from lorasweep.analysis.decision import dunnett_critical

# accuracy per seed; r=4 clearly worse, r=8 and r=16 close (0.0067 apart, residual sd 0.0074),
# r=32 a single seed, r=8 seed 3 a NaN run, r=128 out of memory. train_seconds rise with rank.
ACC = {4: [0.70, 0.73, 0.71], 8: [0.845, 0.850, 0.855], 16: [0.850, 0.865, 0.855]}
SECONDS = {4: 100.0, 8: 110.0, 16: 130.0, 32: 150.0, 128: np.nan}


def _row(rank, seed, acc, status="complete", error=None, **kw):
    return {
        "trial_id": f"r{rank}s{seed}",
        "status": status,
        "variant": "lora",
        "rank": rank,
        "seed": seed,
        "method": "lora",
        "alpha_policy": "rank",
        "alpha": float(rank),
        "task": "classification",
        "error": error,
        "accuracy": acc,
        "train_seconds": SECONDS[rank],
        **kw,
    }


@pytest.fixture
def trials() -> pd.DataFrame:
    rows = [_row(r, s, a) for r, vals in ACC.items() for s, a in enumerate(vals)]
    rows.append(_row(8, 3, np.nan))  # a run whose metric is NaN: unstable, not worse
    rows.append(_row(32, 0, 0.87))  # a single seed
    rows.append(_row(128, 0, np.nan, status="oom", error="CUDA out of memory. Tried 2 GiB"))
    return pd.DataFrame(rows)


@pytest.fixture
def clean(trials) -> pd.DataFrame:
    """Only r=4, 8, 16 on seeds 0-2: a balanced two-way table (no NaN run, no single seed)."""
    return trials[trials["rank"].isin([4, 8, 16]) & (trials["trial_id"] != "r8s3")]


def _group(result, rank, variant="lora"):
    return next(g for g in result["groups"] if g["key"] == {"variant": variant, "rank": rank})


def test_group_means_std_and_t_ci_match_hand_values(trials):
    r = stats.analyze(trials)
    g4 = _group(r, 4)
    assert g4["n"] == 3
    assert g4["mean"] == pytest.approx(0.713333, abs=1e-6)
    assert g4["std"] == pytest.approx(0.0152753, abs=1e-6)
    # 0.713333 -+ t(0.975, 2) = 4.302653 * 0.0152753 / sqrt(3)
    assert g4["ci95"] == pytest.approx([0.675388, 0.751279], abs=1e-5)
    g8 = _group(r, 8)
    assert g8["n"] == 3  # the NaN seed 3 is excluded from the mean
    assert g8["mean"] == pytest.approx(0.85) and g8["std"] == pytest.approx(0.005)
    assert _group(r, 32)["std"] is None and _group(r, 32)["ci95"] is None


def test_two_way_p_values_and_holm_match_statsmodels(trials):
    """The configurations share seeds: one OLS fit of accuracy ~ C(rank) + C(seed) over every
    complete finite trial (the single seed of r=32 included) gives each test against the best."""
    r = stats.analyze(trials)
    assert r["best"]["key"] == {"variant": "lora", "rank": 16}  # r=32 has one seed only
    assert r["design"]["model"] == "two-way" and r["design"]["balanced"] is False
    usable = trials[(trials["status"] == "complete") & trials["accuracy"].notna()]
    data = usable.assign(config=usable["rank"].map("r{:03d}".format), s=usable["seed"].astype(str))
    fit = smf.ols("accuracy ~ C(config) + C(s)", data).fit()
    assert r["design"]["df"] == fit.df_resid == 10 - 4 - 3 + 1
    assert r["design"]["sigma"] == pytest.approx(np.sqrt(fit.scale))
    p = {}
    for rank in (4, 8, 32):
        contrast = np.zeros(len(fit.params))
        for level, w in ((rank, 1.0), (16, -1.0)):
            name = f"C(config)[T.r{level:03d}]"
            if name in fit.params.index:  # r=4 is the baseline level
                contrast[list(fit.params.index).index(name)] = w
        t = fit.t_test(contrast)
        p[rank] = float(t.pvalue)
        g = _group(r, rank)
        assert g["p_value"] == pytest.approx(p[rank], rel=1e-7)
        assert g["test"] == "two-way t (4 configs x 3 seeds, 4 df)"
    # Holm over the three tests against the best, by hand
    order = sorted(p, key=p.get)
    adj, running = {}, 0.0
    for i, rank in enumerate(order):
        running = max(running, min(1.0, (3 - i) * p[rank]))
        adj[rank] = running
    for rank in (4, 8, 32):
        assert _group(r, rank)["p_adjusted"] == pytest.approx(adj[rank], rel=1e-7)
    assert _group(r, 4)["significantly_worse"] is True
    assert _group(r, 8)["significantly_worse"] is False
    assert _group(r, 32)["significantly_worse"] is False  # measured better, not worse
    assert r["best"]["p_value"] is None and r["best"]["test"] == "best"


def test_recommends_cheapest_within_the_margin_with_numbers(clean):
    r = stats.analyze(clean, margin=0.03)
    assert r["recommended"]["key"] == {"variant": "lora", "rank": 8}
    assert r["recommended"]["cost"] == pytest.approx(110.0) and r["criterion"] == "cost"
    # balanced two-way: the bound is the difference minus Dunnett's c times sigma * sqrt(2/3)
    g8 = _group(r, 8)
    c = dunnett_critical(2, 4.0)
    se = r["design"]["sigma"] * np.sqrt(2 / 3)
    assert g8["diff"] == pytest.approx(0.85 - 0.856667, abs=1e-6)
    assert g8["diff_bound"] == pytest.approx(g8["diff"] - c * se)
    assert g8["reference"] == {"variant": "lora", "rank": 16}
    reason = r["reason"]
    assert "Recommended lora r=8" in reason and "within the 0.03 margin" in reason
    assert "0.8500 ± 0.0050" in reason and "110 s instead of 130 s" in reason
    assert "-0.0067 (bound -0.0224)" in reason
    assert "Significantly worse than the best lora r=16" in reason and "lora r=4 (p=" in reason
    assert "per doubling of rank" in reason and "4->8: +0.137" in reason
    assert "next larger rank, r=16" in reason
    # at the default margin (0.01 for accuracy) r=8 is not shown to be close enough
    r = stats.analyze(clean)
    assert r["margin"]["default"] is True and r["margin"]["absolute"] == 0.01
    assert _group(r, 8)["within_margin"] is False
    assert r["recommended"]["key"] == {"variant": "lora", "rank": 16}


def test_nan_run_and_single_seed_are_not_recommended(trials):
    r = stats.analyze(trials, margin=0.03)
    assert _group(r, 8)["seeds_diverged"] == 1 and _group(r, 8)["eligible"] is False
    assert _group(r, 32)["note"] == "a single seed"
    # r=32's one seed measured best, so r=16 is not shown to be within 0.03 of it
    assert r["recommended"] is None and r["reason"].startswith("No recommendation")
    json.dumps(r, allow_nan=False)


def test_flags_single_seed_unstable_and_oom(trials):
    flags = " | ".join(stats.analyze(trials)["flags"])
    assert "Single seed" in flags and "lora r=32" in flags
    assert "Unstable" in flags and "lora r=8 seed 3 (accuracy is NaN)" in flags
    assert "lora r=128 seed 0 (oom: CUDA out of memory" in flags
    assert "Fixed alpha" not in flags  # alpha_policy rank keeps alpha/r constant


def test_diverged_run_is_unstable_not_worse(trials):
    df = trials.copy()
    df.loc[df["trial_id"] == "r8s3", "status"] = "diverged"
    r = stats.analyze(df)
    assert _group(r, 8)["n"] == 3 and not _group(r, 8)["significantly_worse"]
    assert any("lora r=8 seed 3 (diverged)" in f for f in r["flags"])


def test_welch_when_seeds_differ(trials):
    df = trials.copy()
    df.loc[(df["rank"] == 8), "seed"] += 10
    r = stats.analyze(df)
    g8 = _group(r, 8)
    assert g8["test"].startswith("Welch")
    assert g8["p_value"] == pytest.approx(sps.ttest_ind(ACC[8], ACC[16], equal_var=False).pvalue)


def test_lower_is_better_for_perplexity():
    df = pd.DataFrame(
        {
            "rank": [4, 4, 4, 8, 8, 8],
            "seed": [0, 1, 2] * 2,
            "perplexity": [20.0, 21.0, 20.5, 12.0, 12.5, 12.2],
            "train_seconds": [10] * 3 + [20] * 3,
            "task": "causal-lm",
        }
    )
    r = stats.analyze(df)
    assert r["metric"] == "perplexity" and r["direction"] == "lower"
    assert r["best"]["key"]["rank"] == 8 and r["recommended"]["key"]["rank"] == 8
    assert _group(r, 4)["significantly_worse"]
    # overriding the direction flips the answer
    assert stats.analyze(df, direction="higher")["best"]["key"]["rank"] == 4


def test_margin_widens_the_choice(clean):
    # r=4's bound is -0.159: a margin of 0.16 accepts it, 0.15 does not
    r = stats.analyze(clean, margin=0.16)
    assert _group(r, 4)["diff_bound"] == pytest.approx(-0.159, abs=5e-4)
    assert r["recommended"]["key"]["rank"] == 4
    assert "Margin: 0.16 accuracy (given)" in r["reason"]
    assert stats.analyze(clean, margin=0.15)["recommended"]["key"]["rank"] == 8
    # tolerance is the old name of an absolute margin
    assert stats.analyze(clean, tolerance=0.16)["recommended"]["key"]["rank"] == 4
    with pytest.raises(ValueError, match="tolerance"):
        stats.analyze(clean, tolerance=0.16, margin=0.16)


def test_memory_budget_excludes_configurations(clean):
    mem = {4: 10, 8: 30, 16: 20}
    df = clean.assign(peak_gpu_allocated_bytes=[mem[r] * 1024**3 for r in clean["rank"]])
    assert stats.analyze(df, margin=0.03)["recommended"]["key"]["rank"] == 8
    r = stats.analyze(df, margin=0.03, memory_budget_gb=24)
    assert r["recommended"]["key"]["rank"] == 16
    assert "Over the 24 GiB memory budget" in r["reason"] and "lora r=8 (30.0 GiB)" in r["reason"]
    assert "over the memory budget" in _group(r, 8)["note"]
    r = stats.analyze(df, margin=0.03, memory_budget_gb=5)
    assert r["recommended"] is None and "fits the 5 GiB memory budget" in r["reason"]


def test_cost_column_selectable(clean):
    params = {4: 5e5, 8: 9e5, 16: 1e5}
    df = clean.assign(trainable_params=[params[r] for r in clean["rank"]])
    assert stats.analyze(df, margin=0.03)["recommended"]["key"]["rank"] == 8  # by seconds
    r = stats.analyze(df, cost="trainable_params", margin=0.03)
    assert r["cost"] == "trainable_params"
    assert r["recommended"]["key"]["rank"] == 16  # now the cheapest acceptable one


def test_fixed_alpha_across_ranks_is_flagged(trials):
    df = trials.assign(alpha_policy="fixed:16", alpha=16.0)
    flags = " ".join(stats.analyze(df)["flags"])
    assert "Fixed alpha=16 across ranks 4-128" in flags and "4 to 0.125" in flags


def test_bad_input_raises_one_line_value_errors(trials):
    with pytest.raises(ValueError, match=r"^metric: 'bleu' is not a column") as e:
        stats.analyze(trials, metric="bleu")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^direction: 'up' must be"):
        stats.analyze(trials, direction="up")
    with pytest.raises(ValueError, match=r"^cost: 'dollars'"):
        stats.analyze(trials, cost="dollars")
    with pytest.raises(ValueError, match=r"^by: 'method_x'"):
        stats.analyze(trials, by="method_x")


def test_result_shape_is_strict_json(trials):
    r = stats.analyze(trials)
    text = json.dumps(r, allow_nan=False)  # raises on NaN
    assert set(r) == {"metric", "direction", "cost", "margin", "design", "groups", "best",
                      "recommended", "criterion", "seeds_needed", "reason", "flags", "tuning",
                      "factors", "interaction"}  # fmt: skip
    assert r["tuning"] is None and r["interaction"] is None  # one factor (rank), nothing tuned
    assert set(r["factors"]) == {"metric", "by", "names", "balanced", "note", "marginal"}
    assert r["factors"]["by"] == ["variant", "rank"] and r["factors"]["names"] == ["rank"]
    assert set(r["margin"]) == {"value", "relative", "absolute", "default"}
    assert set(r["design"]) == {"model", "sigma", "df", "balanced", "outliers_left_out"}
    keys = ["key", "n", "mean", "std", "ci95", "p_value", "p_adjusted", "test",
            "significantly_worse", "cost", "reference", "diff", "diff_bound", "diff_ci",
            "within_margin", "diff_ci_examples", "seeds_diverged", "seeds_failed",
            "seeds_collapsed", "learned", "eligible", "note"]  # fmt: skip
    assert all(list(g) == keys for g in r["groups"]) and list(r["best"]) == keys
    assert '"rank": 16' in text  # ranks are ints, not 16.0
    for g in r["groups"]:
        assert g["diff_ci"][0] <= 0 <= g["diff_ci"][1]
        assert isinstance(g["within_margin"], bool) and isinstance(g["eligible"], bool)
    assert _group(r, 32)["ci95"] is None and _group(r, 4)["ci95"][0] < 0.7133 < 0.7134
    assert _group(r, 8)["seeds_diverged"] == 1 and _group(r, 4)["seeds_failed"] == 0
    # no trial with a finite metric: still strict JSON, nothing recommended
    empty = stats.analyze(trials.assign(accuracy=np.nan), metric="accuracy")
    json.dumps(empty, allow_nan=False)
    assert empty["groups"] == [] and empty["recommended"] is None and set(empty) == set(r)


def test_proportion_intervals_are_clipped(clean):
    df = clean.copy()
    df.loc[df["rank"] == 16, "accuracy"] = [0.99, 1.0, 0.97]
    g = _group(stats.analyze(df), 16)
    assert g["ci95"][1] == 1.0 and g["ci95"][0] < 0.99
    # a metric with a value above 1 somewhere is not a proportion: no clipping at 1
    loss = df.assign(eval_loss=np.where(df["rank"] == 4, 1.5, df["accuracy"]))
    g = _group(stats.analyze(loss, metric="eval_loss"), 16)
    assert g["ci95"][1] > 1.0


def test_unknown_metric_direction_is_assumed_and_flagged():
    df = pd.DataFrame({"rank": [4, 4, 8, 8], "seed": [0, 1, 0, 1], "bleu": [1, 2, 3, 4.0]})
    r = stats.analyze(df, metric="bleu")
    assert r["direction"] == "higher" and any("assumed" in f for f in r["flags"])


def test_load_trials_table_csv_defaults(tmp_path):
    p = tmp_path / "wandb.csv"
    p.write_text("rank,accuracy\n4,0.7\n4,0.72\n8,0.8\n8,0.81\n")
    df = stats.load_trials_table(p)
    assert list(df["status"]) == ["complete"] * 4 and set(df["variant"]) == {"lora"}
    assert list(df["seed"]) == [0, 1, 0, 1]  # row order within configuration
    assert stats.analyze(df)["best"]["key"] == {"variant": "lora", "rank": 8}


def test_load_trials_table_status_json_flattens_metrics(tmp_path):
    p = tmp_path / "status.json"
    rows = [
        {
            "trial_id": "a",
            "status": "complete",
            "variant": "lora",
            "rank": 8,
            "seed": 0,
            "metrics": {"accuracy": 0.9, "train_seconds": 12.5},
        },
        {
            "trial_id": "b",
            "status": "failed",
            "variant": "lora",
            "rank": 16,
            "seed": 0,
            "metrics": {},
            "error": "boom",
        },
    ]
    p.write_text(json.dumps({"trials": rows}))
    df = stats.load_trials_table(p)
    assert df.loc[0, "accuracy"] == 0.9 and df.loc[0, "train_seconds"] == 12.5
    assert math.isnan(df.loc[1, "accuracy"]) and df.loc[1, "error"] == "boom"
    p2 = tmp_path / "rows.json"
    p2.write_text(json.dumps([{"rank": 4, "accuracy": 0.5}]))
    assert stats.load_trials_table(p2).loc[0, "status"] == "complete"


def test_format_analysis_table(clean):
    r = stats.analyze(clean, margin=0.03)
    text = stats.format_analysis(r)
    lines = text.splitlines()
    assert lines[0] == "accuracy (higher is better); margin 0.03"
    header = next(line for line in lines if line.startswith("config"))
    for col in ("mean ± std", "diff (bound)", "in margin", "p_adj", "cost"):
        assert col in header
    row8 = next(line for line in lines if line.startswith("lora r=8 "))
    assert "0.8500 ± 0.0050" in row8 and "-0.0067 (-0.0224)" in row8
    assert " yes " in row8 and row8.endswith("recommended")
    row4 = next(line for line in lines if line.startswith("lora r=4 "))
    assert "0.713 ± 0.015" in row4 and " no " in row4
    assert "worse" in row4 and "not shown to be within the margin" in row4
    assert "best" in next(line for line in lines if line.startswith("lora r=16 "))
    assert "Recommendation: lora r=8" in text and r["reason"] in text
    assert "Flags:" not in text  # nothing to flag in the clean table
    none = stats.format_analysis(stats.analyze(clean, margin=0.001))
    assert "Recommendation: none" in none and "No recommendation" in none


def test_format_analysis_lists_the_flags(trials):
    text = stats.format_analysis(stats.analyze(trials))
    assert "Recommendation: none" in text and "\nFlags:\n  - Unstable runs" in text
    row32 = next(line for line in text.splitlines() if line.startswith("lora r=32 "))
    assert "a single seed" in row32 and " 1 " in row32


def test_summary_table_and_problem_trials(trials):
    t = stats.summary_table(trials, ["accuracy", "train_seconds", "f1"])
    row8 = t[t["rank"] == 8].iloc[0]
    assert row8["n"] == 4 and row8["n_total"] == 4 and row8["accuracy_mean"] == pytest.approx(0.85)
    assert "f1_mean" not in t  # absent metrics are skipped
    probs = stats.problem_trials(trials, "accuracy")
    assert set(probs["trial_id"]) == {"r8s3", "r128s0"}


def test_statistician_decision_on_per_seed_csv(tmp_path):
    """5 seeds per rank with a shared seed effect: the plateau starts at r=16. A careful analyst
    picks r=16: r=32/64 are within a point of it, r=4/8 are clearly worse."""
    base = {4: 0.800, 8: 0.840, 16: 0.860, 32: 0.862, 64: 0.861}
    seed_effect = [0.004, -0.003, 0.000, 0.002, -0.005]
    jitter = [0.001, -0.002, 0.002, 0.0, -0.001]
    lines = ["rank,seed,accuracy,train_seconds"]
    for i, (r, mu) in enumerate(base.items()):
        for s in range(5):
            acc = mu + seed_effect[s] + jitter[(s + i) % 5]
            lines.append(f"{r},{s},{acc:.4f},{60 + 3 * r + s}")
    p = tmp_path / "seeds.csv"
    p.write_text("\n".join(lines) + "\n")
    r = stats.analyze(stats.load_trials_table(p))
    assert r["design"] == {"model": "two-way", "sigma": pytest.approx(0.0017678, abs=1e-6),
                           "df": 16.0, "balanced": True, "outliers_left_out": 0}  # fmt: skip
    assert r["best"]["key"]["rank"] == 32
    assert r["recommended"]["key"] == {"variant": "lora", "rank": 16}
    assert r["criterion"] == "cost"
    worse = {g["key"]["rank"] for g in r["groups"] if g["significantly_worse"]}
    assert worse == {4, 8}
    within = {g["key"]["rank"] for g in r["groups"] if g["within_margin"]}
    assert within == {16, 32, 64}
    assert "two-way model (configuration + seed)" in r["reason"]
    assert "on 16 degrees of freedom" in r["reason"]
    assert "8->16: +0.02" in r["reason"] and "r=32" in r["reason"]
    assert not any("Single seed" in f for f in r["flags"])
    # without the shared seed effect the same values are far noisier: the seed blocks matter
    shuffled = stats.load_trials_table(p)
    shuffled["seed"] = shuffled["seed"] + 10 * shuffled["rank"]
    w = stats.analyze(shuffled)
    assert w["design"]["model"] == "welch"
    assert _group(w, 16)["diff_bound"] < _group(r, 16)["diff_bound"]


def test_time_ties_go_to_fewer_trainable_params():
    """Wall times whose 95% interval of the difference contains 0 are a tie: the smaller adapter
    is recommended, with the reason."""
    seconds = {4: [100.0, 112.0, 91.0], 16: [95.0, 108.0, 97.0]}
    rows = []
    for seed, (a4, a16) in enumerate([(0.80, 0.81), (0.81, 0.80), (0.79, 0.80)]):
        for rank, acc in ((4, a4), (16, a16)):
            rows.append({"rank": rank, "seed": seed, "accuracy": acc,
                         "train_seconds": seconds[rank][seed],
                         "trainable_params": 1000 * rank // 4})  # fmt: skip
    result = stats.analyze(pd.DataFrame(rows), margin=0.05)
    assert result["best"]["key"]["rank"] == 16 and result["best"]["cost"] < 101
    assert result["recommended"]["key"]["rank"] == 4 and result["criterion"] == "cost tie"
    assert "tie went to fewer trainable parameters" in result["reason"]
    # beyond the measured spread the cheaper time wins again
    for r in rows:
        if r["rank"] == 4:
            r["train_seconds"] += 100
    result = stats.analyze(pd.DataFrame(rows), margin=0.05)
    assert result["recommended"]["key"]["rank"] == 16 and result["criterion"] == "cost"


def test_two_seeds_do_not_prove_a_clearly_lower_config_equivalent():
    """The demo's situation: 2 seeds, nothing significant, r=2 measured 5.6 points lower.
    A non-significant test with no power is not evidence: at the default margin nothing is
    shown to be within a point of the best, so nothing is recommended, with the seeds needed."""
    rows = []
    for r, accs in {2: (0.74, 0.772), 8: (0.776, 0.782), 32: (0.79, 0.834)}.items():
        for seed, a in enumerate(accs):
            rows.append({"rank": r, "seed": seed, "accuracy": a, "train_seconds": 50.0,
                         "trainable_params": 1000 * r})  # fmt: skip
    df = pd.DataFrame(rows)
    res = stats.analyze(df)
    assert not any(g["significantly_worse"] for g in res["groups"])
    assert res["recommended"] is None
    assert isinstance(res["seeds_needed"], int) and res["seeds_needed"] > 10
    assert "not even the best measured lora r=32" in res["reason"]
    # a margin the user chose: 6 points is not enough to accept r=2 on this evidence ...
    res = stats.analyze(df, margin=0.06)
    assert _group(res, 2)["within_margin"] is False
    assert res["recommended"]["key"]["rank"] == 32
    # ... 20 points is: then the equal times tie and the fewest parameters win
    res = stats.analyze(df, margin=0.2)
    assert res["recommended"]["key"]["rank"] == 2 and res["criterion"] == "cost tie"

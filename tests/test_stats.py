"""stats: hand-computed fixtures with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from lorasweep.analysis import stats

# accuracy per seed; r=4 clearly worse, r=8 and r=16 indistinguishable, r=32 a single seed,
# r=8 seed 3 a NaN run, r=128 out of memory. train_seconds rise with rank.
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


def test_paired_p_values_and_holm_match_scipy(trials):
    r = stats.analyze(trials)
    assert r["best"]["key"] == {"variant": "lora", "rank": 16}  # r=32 has one seed only
    p4 = sps.ttest_rel(ACC[4], ACC[16]).pvalue
    p8 = sps.ttest_rel(ACC[8], ACC[16]).pvalue
    assert p8 == pytest.approx(0.2697, abs=1e-3)  # hand: t = -1.512 on 2 df
    g4, g8 = _group(r, 4), _group(r, 8)
    assert g4["p_value"] == pytest.approx(p4) and g8["p_value"] == pytest.approx(p8)
    assert g4["test"].startswith("paired t (3 seeds)") and "Wilcoxon" in g4["test"]
    # Holm over the two tested comparisons: smallest p doubled, then max(.., p8 * 1)
    assert g4["p_adjusted"] == pytest.approx(2 * p4)
    assert g8["p_adjusted"] == pytest.approx(max(2 * p4, p8))
    assert g4["significantly_worse"] is True and g8["significantly_worse"] is False
    g32 = _group(r, 32)
    assert g32["p_value"] is None and g32["significantly_worse"] is False


def test_recommends_cheapest_not_significantly_worse_with_numbers(trials):
    r = stats.analyze(trials)
    assert r["recommended"]["key"] == {"variant": "lora", "rank": 8}
    assert r["recommended"]["cost"] == pytest.approx(110.0)
    reason = r["reason"]
    assert "Recommended lora r=8" in reason and "lora r=16" in reason
    assert "0.85" in reason and "110 s" in reason and "130 s" in reason
    assert "Significantly worse: lora r=4" in reason
    assert "per doubling of rank" in reason and "4->8: +0.137" in reason
    assert "next larger rank, r=16" in reason


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


def test_tolerance_widens_the_choice(trials):
    r = stats.analyze(trials, tolerance=0.15)
    assert r["recommended"]["key"]["rank"] == 4
    assert "within the tolerance of 0.15" in r["reason"]
    assert stats.analyze(trials, tolerance=0.1)["recommended"]["key"]["rank"] == 8


def test_memory_budget_excludes_configurations(trials):
    mem = {4: 10, 8: 30, 16: 20, 32: 20, 128: np.nan}
    df = trials.assign(peak_gpu_allocated_bytes=[mem[r] * 1024**3 for r in trials["rank"]])
    r = stats.analyze(df, memory_budget_gb=24)
    assert r["recommended"]["key"]["rank"] == 16
    assert "Over the 24 GiB memory budget" in r["reason"] and "lora r=8 (30.0 GiB)" in r["reason"]
    assert stats.analyze(df, memory_budget_gb=5)["recommended"] is None


def test_cost_column_selectable(trials):
    params = {4: 5e5, 8: 9e5, 16: 1e5, 32: 2e6, 128: 4e6}
    df = trials.assign(trainable_params=[params[r] for r in trials["rank"]])
    r = stats.analyze(df, cost="trainable_params")
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
    assert set(r) == {"metric", "direction", "groups", "best", "recommended", "reason", "flags"}
    keys = {
        "key",
        "n",
        "mean",
        "std",
        "ci95",
        "p_value",
        "p_adjusted",
        "test",
        "significantly_worse",
        "cost",
    }
    assert all(set(g) == keys for g in r["groups"]) and set(r["best"]) == keys
    assert '"rank": 16' in text  # ranks are ints, not 16.0


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


def test_format_analysis_table(trials):
    text = stats.format_analysis(stats.analyze(trials))
    lines = text.splitlines()
    assert lines[0].startswith("accuracy (higher is better)")
    row8 = next(line for line in lines if line.startswith("lora r=8 "))
    assert "0.85 ± 0.005" in row8 and "recommended" in row8
    assert "worse" in next(line for line in lines if line.startswith("lora r=4 "))
    assert "Recommendation: lora r=8" in text and "Flags:" in text


def test_summary_table_and_problem_trials(trials):
    t = stats.summary_table(trials, ["accuracy", "train_seconds", "f1"])
    row8 = t[t["rank"] == 8].iloc[0]
    assert row8["n"] == 4 and row8["n_total"] == 4 and row8["accuracy_mean"] == pytest.approx(0.85)
    assert "f1_mean" not in t  # absent metrics are skipped
    probs = stats.problem_trials(trials, "accuracy")
    assert set(probs["trial_id"]) == {"r8s3", "r128s0"}


def test_statistician_decision_on_per_seed_csv(tmp_path):
    """5 seeds per rank with a shared seed effect: the plateau starts at r=16. A careful analyst
    picks r=16: r=32/64 are not better beyond noise, r=4/8 are clearly worse."""
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
    assert r["best"]["key"]["rank"] == 32
    assert r["recommended"]["key"] == {"variant": "lora", "rank": 16}
    worse = {g["key"]["rank"] for g in r["groups"] if g["significantly_worse"]}
    assert worse == {4, 8}
    assert "not significantly worse" in r["reason"] and "paired t (5 seeds)" in r["reason"]
    assert "8->16: +0.02" in r["reason"] and "r=32" in r["reason"]
    assert not any("Single seed" in f for f in r["flags"])


def test_time_ties_go_to_fewer_trainable_params():
    """Wall times within 10% are noise: the smaller adapter is recommended, with the reason."""
    rows = []
    for seed, (a4, a16) in enumerate([(0.80, 0.81), (0.81, 0.80), (0.79, 0.80)]):
        rows.append(
            {
                "rank": 4,
                "seed": seed,
                "accuracy": a4,
                "train_seconds": 100 + seed,
                "trainable_params": 1000,
            }
        )
        rows.append(
            {
                "rank": 16,
                "seed": seed,
                "accuracy": a16,
                "train_seconds": 95 + seed,
                "trainable_params": 4000,
            }
        )
    result = stats.analyze(pd.DataFrame(rows))
    assert result["best"]["key"]["rank"] == 16
    assert result["recommended"]["key"]["rank"] == 4
    assert "tie went to fewer trainable parameters" in result["reason"]
    # beyond the tie band the cheaper time wins again
    for r in rows:
        if r["rank"] == 4:
            r["train_seconds"] = 200
    assert stats.analyze(pd.DataFrame(rows))["recommended"]["key"]["rank"] == 16


def test_two_seeds_do_not_prove_a_clearly_lower_config_equivalent():
    """The demo's situation: 2 seeds, nothing significant, r=2 measured 5.6 points lower.
    A non-significant test with no power is not evidence: the best is recommended."""
    rows = []
    for r, accs in {2: (0.74, 0.772), 8: (0.776, 0.782), 32: (0.79, 0.834)}.items():
        for seed, a in enumerate(accs):
            rows.append(
                {
                    "rank": r,
                    "seed": seed,
                    "accuracy": a,
                    "train_seconds": 50.0,
                    "trainable_params": 1000 * r,
                }
            )
    res = stats.analyze(pd.DataFrame(rows))
    assert res["recommended"]["key"]["rank"] == 32
    assert "Not accepted as equivalent on too few seeds" in res["reason"]
    # a tolerance the user chose still accepts the cheaper configuration
    res = stats.analyze(pd.DataFrame(rows), tolerance=0.06)
    assert res["recommended"]["key"]["rank"] == 2

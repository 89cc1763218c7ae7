"""The decision rule of ``stats.analyze`` (non-inferiority within a margin, Hsu's multiple
comparisons with the best) checked against independent references: scipy's Dunnett test,
statsmodels' formula OLS, scipy's paired and Welch t-tests, and hand-computed bounds."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps

from lorasweep.analysis import decision, stats, units
from lorasweep.analysis.decision import (
    bonferroni_critical,
    default_margin,
    dunnett_critical,
    fit_design,
    mcb,
    parse_margin,
    two_sided_p,
)

GIB, MIB = 1024**3, 1024**2


def _table(values: dict, *, seeds: dict | None = None, **per_rank) -> pd.DataFrame:
    """One row per (rank, seed): ``values[rank]`` the accuracies per seed (seeds 0.. unless
    ``seeds[rank]`` names them); ``per_rank[col][rank]`` a constant or a per-seed list."""
    rows = []
    for r, vals in values.items():
        ss = seeds[r] if seeds and r in seeds else range(len(vals))
        for pos, (s, v) in enumerate(zip(ss, vals)):
            row = {"rank": r, "seed": s, "accuracy": v}
            for col, by_rank in per_rank.items():
                x = by_rank[r]
                row[col] = x[pos] if isinstance(x, (list, tuple)) else x
            rows.append(row)
    return pd.DataFrame(rows)


def _g(result, rank):
    return next(g for g in result["groups"] if g["key"]["rank"] == rank)


def _residual_sd_by_hand(y: np.ndarray) -> tuple[float, int]:
    """Two-way (config x seed) balanced table ``y[config, seed]``: the interaction residuals
    ``y - row mean - column mean + grand mean``, their sd on (k-1)(s-1) df."""
    k, s = y.shape
    res = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (k - 1) * (s - 1)
    return math.sqrt(float((res**2).sum()) / df), df


# ----------------------------------------------------------------------------- critical values


@pytest.mark.parametrize("m, n", [(2, 11), (3, 6), (5, 4)])
def test_dunnett_critical_matches_scipy_dunnett(m, n):
    """Balanced one-way samples whose first treatment has t exactly at the critical value: its
    one-sided Dunnett p-value from scipy (multivariate t) is then alpha."""
    df = (m + 1) * (n - 1)
    c = dunnett_critical(m, df, 0.05)
    e = np.arange(n) - (n - 1) / 2
    e = e / e.std(ddof=1)  # every group's deviations: pooled sd exactly 1
    treatments = [e + c * math.sqrt(2 / n)] + [e - 1.0 for _ in range(m - 1)]
    res = sps.dunnett(
        *treatments, control=e, alternative="greater", random_state=np.random.default_rng(0)
    )
    assert res.statistic[0] == pytest.approx(c, rel=1e-9)
    assert res.pvalue[0] == pytest.approx(0.05, abs=0.002)
    # a slightly larger t is significant, a slightly smaller one is not
    assert c < bonferroni_critical(m, df) and c > float(sps.t.ppf(0.95, df))


def test_dunnett_one_comparison_is_the_t_quantile_and_known_variance_is_bivariate_normal():
    assert dunnett_critical(1, 7.0) == pytest.approx(float(sps.t.ppf(0.95, 7)), rel=1e-12)
    assert dunnett_critical(1, math.inf) == pytest.approx(float(sps.norm.ppf(0.95)), rel=1e-12)
    d = dunnett_critical(2, math.inf)
    mvn = sps.multivariate_normal(mean=[0, 0], cov=[[1, 0.5], [0.5, 1]])
    assert float(mvn.cdf([d, d])) == pytest.approx(0.95, abs=1e-4)
    # more comparisons, a larger constant; fewer df, a larger constant
    assert dunnett_critical(2, 20) < dunnett_critical(4, 20) < dunnett_critical(4, 8)
    assert bonferroni_critical(4, 20) == pytest.approx(float(sps.t.ppf(1 - 0.05 / 4, 20)))
    with pytest.raises(ValueError, match="m: 0"):
        dunnett_critical(0, 10)


# ----------------------------------------------------------------------------- the noise model


def _random_two_way(k: int, s: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (
        0.8
        + rng.normal(0, 0.02, size=(k, 1))  # configuration effects
        + rng.normal(0, 0.01, size=(1, s))  # seed effects
        + rng.normal(0, 0.004, size=(k, s))
    )


@pytest.mark.parametrize("missing", [None, (2, 1)], ids=["balanced", "one trial missing"])
def test_two_way_fit_matches_statsmodels_formula_ols(missing):
    k, s = 4, 5
    y = _random_two_way(k, s)
    names = "abcd"
    seeds = [list(range(s)) for _ in range(k)]
    values = [list(y[i]) for i in range(k)]
    if missing:
        i, j = missing
        del seeds[i][j], values[i][j]
    d = fit_design(seeds, values)
    data = pd.DataFrame(
        [
            {"y": v, "config": names[i], "seed": f"s{sd}"}
            for i in range(k)
            for sd, v in zip(seeds[i], values[i])
        ]
    )
    fit = smf.ols("y ~ C(config) + C(seed)", data).fit()
    assert d.kind == "two-way" and d.balanced is (missing is None)
    assert d.sigma == pytest.approx(math.sqrt(fit.scale), rel=1e-9)
    assert d.df == fit.df_resid == len(data) - k - s + 1
    cols = list(fit.params.index)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            contrast = np.zeros(len(cols))
            for idx, w in ((i, 1.0), (j, -1.0)):
                if idx:  # "a" is the baseline level
                    contrast[cols.index(f"C(config)[T.{names[idx]}]")] = w
            tt = fit.t_test(contrast)
            diff, se, df = d.pair(i, j)
            assert diff == pytest.approx(float(tt.effect[0]), abs=1e-12)
            assert se == pytest.approx(float(tt.sd[0, 0]), rel=1e-9)
            assert df == fit.df_resid
            _, p = two_sided_p(d, i, j)
            assert p == pytest.approx(float(tt.pvalue), rel=1e-7)
    if missing:
        # the estimate is seed-adjusted, not the raw difference of the means
        raw = np.mean(values[2]) - np.mean(values[0])
        assert abs(d.pair(2, 0)[0] - raw) > 1e-4
    else:
        sigma, df = _residual_sd_by_hand(y)
        assert d.sigma == pytest.approx(sigma, rel=1e-9) and d.df == df


def test_two_configurations_two_way_p_is_exactly_the_paired_t_test():
    a = [0.801, 0.812, 0.795, 0.808]
    b = [0.790, 0.809, 0.781, 0.800]
    d = fit_design([[0, 1, 2, 3]] * 2, [a, b])
    ref = sps.ttest_rel(a, b)
    diff, p = two_sided_p(d, 0, 1)
    assert diff == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9)
    r = stats.analyze(_table({4: b, 8: a}))
    assert r["design"]["model"] == "two-way" and r["design"]["df"] == 3
    assert _g(r, 4)["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-9)


def test_welch_when_seeds_are_not_shared_matches_scipy():
    a = [0.80, 0.82, 0.79, 0.81]
    b = [0.75, 0.78, 0.70]
    d = fit_design([[0, 1, 2, 3], [10, 11, 12]], [a, b])
    assert d.kind == "welch" and d.sigma is None
    ref = sps.ttest_ind(a, b, equal_var=False)
    diff, se, df = d.pair(0, 1)
    assert diff / se == pytest.approx(float(ref.statistic), rel=1e-9)
    assert df == pytest.approx(float(ref.df), rel=1e-9)
    assert two_sided_p(d, 0, 1)[1] == pytest.approx(float(ref.pvalue), rel=1e-9)
    r = stats.analyze(_table({4: b, 8: a}, seeds={4: [10, 11, 12]}))
    assert r["design"]["model"] == "welch"
    assert _g(r, 4)["test"].startswith("Welch") and _g(r, 4)["p_value"] == pytest.approx(
        float(ref.pvalue), rel=1e-9
    )


def test_one_configuration_or_one_seed_each_has_no_noise_model():
    assert fit_design([[0, 1]], [[0.8, 0.81]]).kind == "none"
    assert fit_design([[0], [0], [0]], [[0.8], [0.7], [0.9]]).kind == "none"


# ----------------------------------------------------------------------------- MCB


@pytest.mark.parametrize("direction", ["higher", "lower"])
def test_mcb_bound_by_hand_balanced(direction):
    k, n = 5, 4
    y = _random_two_way(k, n, seed=7)
    sign = 1.0 if direction == "higher" else -1.0
    r = stats.analyze(
        _table({4 * 2**i: list(y[i]) for i in range(k)}), direction=direction, margin=0.0
    )
    sigma, df = _residual_sd_by_hand(y)
    assert r["design"] == {"model": "two-way", "sigma": pytest.approx(sigma), "df": df,
                           "balanced": True, "outliers_left_out": 0}  # fmt: skip
    c = dunnett_critical(k - 1, df, 0.05)
    se = sigma * math.sqrt(2 / n)
    means = y.mean(axis=1)
    order = np.argsort(-sign * means)
    best, second = int(order[0]), int(order[1])
    assert r["best"]["key"]["rank"] == 4 * 2**best
    for i in range(k):
        g = _g(r, 4 * 2**i)
        ref = second if i == best else best
        diff = means[i] - means[ref]
        assert g["reference"]["rank"] == 4 * 2**ref
        assert g["diff"] == pytest.approx(diff, abs=1e-12)
        # the worst 95% end: lower when higher is better, upper when lower is better
        assert g["diff_bound"] == pytest.approx(diff - sign * c * se, abs=1e-9)
        lo, hi = sorted((min(0.0, sign * diff - c * se), max(0.0, sign * diff + c * se)))
        expected_ci = [lo, hi] if sign > 0 else [-hi, -lo]
        assert g["diff_ci"] == pytest.approx(expected_ci, abs=1e-9)
        assert g["diff_ci"][0] <= 0 <= g["diff_ci"][1]


def _bounds(seeds, values):
    return {i: b.lower for i, b in mcb(fit_design(seeds, values), 1.0, 0.05).items()}


@pytest.mark.parametrize("shared_seeds", [True, False], ids=["two-way", "welch"])
def test_adding_a_configuration_never_raises_a_bound(shared_seeds):
    rng = np.random.default_rng(11)
    n = 4
    mu = [0.800, 0.810, 0.805, 0.790, 0.812, 0.808, 0.795]
    seed_effect = rng.normal(0, 0.01, n)
    values = [list(m + seed_effect + rng.normal(0, 0.006, n)) for m in mu]
    seeds = [list(range(n)) if shared_seeds else list(range(10 * i, 10 * i + n)) for i in range(7)]
    six, seven = _bounds(seeds[:6], values[:6]), _bounds(seeds, values)
    assert set(six) == set(range(6)) and set(seven) == set(range(7))
    for i in range(6):
        assert seven[i] <= six[i] + 1e-12, i
    assert any(seven[i] < six[i] - 1e-6 for i in range(6))


# ----------------------------------------------------------------------------- the seed-000 table

RANKS = [8, 16, 32, 64, 128, 256]
PPL = [8.2, 7.3, 6.5, 5.2, 5.3, 5.4]
PPL_STD = [0.3, 0.2, 0.2, 0.15, 0.18, 0.2]
HOURS = [1.8, 2.1, 2.8, 4.1, 7.2, 13.1]


def _seed_000_table() -> pd.DataFrame:
    """Mistral-7B notebook: three seeds per rank, values mean + std * (-1, 0, +1)."""
    rows = [
        {"rank": r, "seed": s, "perplexity": m + sd * z, "train_time_hrs": h}
        for r, m, sd, h in zip(RANKS, PPL, PPL_STD, HOURS)
        for s, z in enumerate((-1, 0, 1))
    ]
    return pd.DataFrame(rows)


def test_seed_000_table_recommends_rank_64():
    r = stats.analyze(
        _seed_000_table(), metric="perplexity", direction="min", cost="train_time_hrs"
    )
    json.dumps(r, allow_nan=False)
    assert r["direction"] == "lower" and r["cost"] == "train_time_hrs"
    assert r["margin"] == {"value": 0.02, "relative": True, "absolute": pytest.approx(0.104),
                           "default": True}  # fmt: skip
    assert r["design"]["model"] == "two-way" and r["design"]["balanced"] is True
    assert r["design"]["df"] == (6 - 1) * (3 - 1)
    for rank, mean, sd in zip(RANKS, PPL, PPL_STD):
        g = _g(r, rank)
        assert g["n"] == 3 and g["mean"] == pytest.approx(mean) and g["std"] == pytest.approx(sd)
    assert r["best"]["key"]["rank"] == 64
    assert r["recommended"]["key"]["rank"] == 64 and r["criterion"] == "cost"
    worse = {rank for rank in RANKS if _g(r, rank)["significantly_worse"]}
    assert {8, 16, 32} <= worse and 64 not in worse
    for rank in (8, 16, 32):
        assert _g(r, rank)["within_margin"] is False and _g(r, rank)["diff"] > 1
    assert "Recommended lora r=64" in r["reason"]


# ----------------------------------------------------------------------------- the margin

# r=4 is truly 0.5 points below r=16 with tiny noise; r=4 is the cheaper one
NEAR = {
    4: [0.7950, 0.7952, 0.7949, 0.7951],
    16: [0.8000, 0.8001, 0.7999, 0.8002],
}
NEAR_PARAMS = {"trainable_params": {4: 1000, 16: 4000}}


def test_margin_decides_whether_the_slightly_worse_cheap_config_is_good_enough():
    df = _table(NEAR, **NEAR_PARAMS)
    wide = stats.analyze(df, margin=0.01)
    assert wide["recommended"]["key"]["rank"] == 4 and wide["criterion"] == "cost"
    assert wide["margin"] == {"value": 0.01, "relative": False, "absolute": 0.01,
                              "default": False}  # fmt: skip
    assert _g(wide, 4)["diff"] == pytest.approx(-0.005, abs=3e-4)
    assert -0.01 < _g(wide, 4)["diff_bound"] < -0.005
    narrow = stats.analyze(df, margin=0.001)
    assert _g(narrow, 4)["within_margin"] is False
    assert narrow["recommended"]["key"]["rank"] == 16
    # the default for accuracy is one point
    assert stats.analyze(df)["recommended"]["key"]["rank"] == 4


def test_relative_margin_and_tolerance_alias():
    df = _table(NEAR, **NEAR_PARAMS)
    r = stats.analyze(df, margin="2%")
    assert r["margin"]["relative"] is True and r["margin"]["value"] == pytest.approx(0.02)
    assert r["margin"]["absolute"] == pytest.approx(0.02 * _g(r, 16)["mean"])
    assert r["recommended"]["key"]["rank"] == 4
    assert stats.analyze(df, margin="0.1%")["recommended"]["key"]["rank"] == 16
    alias = stats.analyze(df, tolerance=0.001)
    assert alias["margin"]["absolute"] == 0.001 and alias["recommended"]["key"]["rank"] == 16
    assert stats.analyze(df, tolerance=0.01)["recommended"]["key"]["rank"] == 4
    with pytest.raises(ValueError, match="both"):
        stats.analyze(df, margin=0.01, tolerance=0.01)


@pytest.mark.parametrize("bad", ["abc", "2 pct", "%", "-1", "-2%", "150%", "nan", "inf", -0.5,
                                 True, [0.01]])  # fmt: skip
def test_bad_margins_raise_one_line_naming_margin(bad):
    with pytest.raises(ValueError, match=r"^margin: ") as e:
        stats.analyze(_table(NEAR), margin=bad)
    assert "\n" not in str(e.value)


def test_parse_margin_and_defaults():
    assert parse_margin(None) is None
    assert parse_margin("2%").relative and parse_margin("2%").value == pytest.approx(0.02)
    assert parse_margin(" 0.5 ") == decision.Margin(0.5, relative=False)
    assert parse_margin(0) == decision.Margin(0.0)
    m = default_margin("accuracy", [0.8, 0.9])
    assert (m.value, m.relative, m.given) == (0.01, False, False)
    assert default_margin("eval_accuracy", [80.0, 90.0]).value == 1.0  # percentages
    assert default_margin("f1", [0.5]).value == 0.01
    ppl = default_margin("perplexity", [5.2, 6.0])
    assert ppl.relative and ppl.value == 0.02 and ppl.absolute(5.2) == pytest.approx(0.104)
    assert default_margin("eval_loss", [1.2]) == decision.Margin(0.02, False, given=False)
    bleu = default_margin("bleu", [30.0])
    assert bleu.relative and bleu.value == 0.01


# ----------------------------------------------------------------------------- thin evidence


def test_one_seed_per_configuration_recommends_nothing():
    r = stats.analyze(_table({4: [0.80], 8: [0.85], 16: [0.83]}))
    assert r["recommended"] is None and r["criterion"] is None
    assert r["design"]["model"] == "none"
    assert "seed" in r["reason"] and r["reason"].startswith("No recommendation")
    assert all(g["note"] == "a single seed" for g in r["groups"])
    json.dumps(r, allow_nan=False)


def test_two_noisy_seeds_recommend_nothing_and_say_how_many_seeds():
    r = stats.analyze(_table({4: [0.74, 0.79], 8: [0.80, 0.76], 16: [0.77, 0.81]}))
    assert r["recommended"] is None
    assert isinstance(r["seeds_needed"], int) and r["seeds_needed"] > 2
    assert f"about {r['seeds_needed']} seeds per configuration" in r["reason"]
    # with the same noise, a far wider margin needs fewer seeds
    wide = stats.analyze(_table({4: [0.74, 0.79], 8: [0.80, 0.76], 16: [0.77, 0.81]}), margin=0.1)
    assert wide["seeds_needed"] < r["seeds_needed"]


def test_seeds_needed_reaches_the_margin_at_the_planned_power():
    """At the returned n, (c + t_power) * sd / sqrt(n) <= margin, and not at n - 1."""
    sd, margin, m = 0.02, 0.01, 3
    n = decision.seeds_needed(sd, margin, m, two_way=True)

    def width(k):
        df = m * (k - 1)
        return (bonferroni_critical(m, df) + sps.t.ppf(0.8, df)) * sd / math.sqrt(k)

    assert n is not None and width(n) <= margin < width(n - 1)
    assert decision.seeds_needed(0.0, margin, m, two_way=True) == 2
    assert decision.seeds_needed(sd, 0.0, m, two_way=True) is None


def test_cheaper_better_config_on_one_seed_blocks_the_recommendation():
    df = _table({4: [0.804], 8: [0.800, 0.802, 0.801], 16: [0.801, 0.803, 0.800]},
                trainable_params={4: 100, 8: 200, 16: 400})  # fmt: skip
    r = stats.analyze(df, margin=0.05)
    assert _g(r, 8)["eligible"] is True  # r=8 alone would be recommended
    assert r["recommended"] is None
    assert "lora r=4 is cheaper and measured better" in r["reason"]
    assert "a single seed" in r["reason"]
    # with r=4 costlier than r=8 it blocks nothing
    df.loc[df["rank"] == 4, "trainable_params"] = 300
    assert stats.analyze(df, margin=0.05)["recommended"]["key"]["rank"] == 8


# ----------------------------------------------------------------------------- instability

STEADY = [0.800, 0.805, 0.795]


def test_collapsed_seed_is_never_recommended_even_if_cheapest():
    df = _table({4: [0.80, 0.81, 0.50], 8: STEADY, 16: [0.801, 0.806, 0.797]},
                trainable_params={4: 100, 8: 200, 16: 400})  # fmt: skip
    # wide enough that r=4 is within the margin, narrower than the collapse (0.3 below median)
    r = stats.analyze(df, margin=0.2)
    g4 = _g(r, 4)
    assert g4["within_margin"] is True
    assert g4["seeds_collapsed"] == 1 and g4["eligible"] is False
    assert "1 of 3 seeds collapsed" in g4["note"]
    assert _g(r, 8)["seeds_collapsed"] == 0 and _g(r, 16)["seeds_collapsed"] == 0
    assert r["recommended"]["key"]["rank"] == 8
    assert "Not recommended whatever their mean: lora r=4 (1 of 3 seeds collapsed)" in r["reason"]


@pytest.mark.parametrize("how", ["diverged", "nan"])
def test_diverged_seed_is_never_recommended_even_if_cheapest(how):
    df = _table({4: [0.80, 0.805, 0.795, 0.80], 8: STEADY + [0.80], 16: STEADY + [0.80]},
                trainable_params={4: 100, 8: 200, 16: 400})  # fmt: skip
    bad = (df["rank"] == 4) & (df["seed"] == 3)
    if how == "diverged":
        df.loc[bad, "status"] = "diverged"
        df["status"] = df["status"].fillna("complete")
    else:
        df.loc[bad, "accuracy"] = np.nan
    r = stats.analyze(df, margin=0.05)
    g4 = _g(r, 4)
    assert g4["n"] == 3 and g4["seeds_diverged"] == 1 and g4["eligible"] is False
    assert r["recommended"]["key"]["rank"] == 8
    json.dumps(r, allow_nan=False)
    # without the bad seed, the cheapest one is recommended
    assert stats.analyze(df[~bad], margin=0.05)["recommended"]["key"]["rank"] == 4


def test_majority_class_rate_means_it_did_not_learn():
    df = _table({4: [0.500, 0.505, 0.502], 8: [0.80, 0.81, 0.805]},
                trainable_params={4: 100, 8: 200}, majority_rate={4: 0.5, 8: 0.5})  # fmt: skip
    r = stats.analyze(df, margin=0.5)
    assert _g(r, 4)["within_margin"] is True and _g(r, 4)["learned"] is False
    assert _g(r, 8)["learned"] is True
    assert r["recommended"]["key"]["rank"] == 8
    everyone = _table(
        {4: [0.500, 0.505, 0.502], 8: [0.501, 0.499, 0.503]},
        trainable_params={4: 100, 8: 200},
        majority_rate={4: 0.5, 8: 0.5},
    )
    r = stats.analyze(everyone, margin=0.5)
    assert r["recommended"] is None and "no configuration learned" in r["reason"]


def test_flat_training_loss_means_it_did_not_learn():
    df = _table({4: STEADY, 8: [0.801, 0.806, 0.797]}, trainable_params={4: 100, 8: 200},
                train_loss_start={4: 0.70, 8: 0.70},
                train_loss_end={4: [0.699, 0.70, 0.695], 8: [0.40, 0.42, 0.41]})  # fmt: skip
    r = stats.analyze(df)
    assert _g(r, 4)["learned"] is False and _g(r, 8)["learned"] is True
    assert r["recommended"]["key"]["rank"] == 8


# ----------------------------------------------------------------------------- costs


def test_measured_seconds_that_overlap_tie_and_fewer_params_win():
    df = _table({4: STEADY, 16: [0.801, 0.806, 0.797]},
                train_seconds={4: [100.0, 112.0, 91.0], 16: [95.0, 108.0, 97.0]},
                trainable_params={4: 1000, 16: 4000})  # fmt: skip
    r = stats.analyze(df, margin=0.05)
    assert r["cost"] == "train_seconds"
    assert r["recommended"]["key"]["rank"] == 4 and r["criterion"] == "cost tie"
    assert _g(r, 16)["cost"] < _g(r, 4)["cost"]  # r=16 was faster on average
    assert "tie went to fewer trainable parameters" in r["reason"]
    # far apart: the faster one wins on cost alone
    df.loc[df["rank"] == 4, "train_seconds"] = [200.0, 212.0, 191.0]
    r = stats.analyze(df, margin=0.05)
    assert r["recommended"]["key"]["rank"] == 16 and r["criterion"] == "cost"


def test_exact_costs_tie_only_when_equal():
    base = {4: STEADY, 8: [0.810, 0.815, 0.805]}  # r=8 measured better
    r = stats.analyze(_table(base, trainable_params={4: 1001, 8: 1000}), margin=0.05)
    assert r["cost"] == "trainable_params"
    assert r["recommended"]["key"]["rank"] == 8 and r["criterion"] == "cost"
    r = stats.analyze(_table(base, trainable_params={4: 1000, 8: 1001}), margin=0.05)
    assert r["recommended"]["key"]["rank"] == 4 and r["criterion"] == "cost"
    # equal: a tie, which goes to the lower rank before the better mean
    r = stats.analyze(_table(base, trainable_params={4: 1000, 8: 1000}), margin=0.05)
    assert r["recommended"]["key"]["rank"] == 4 and r["criterion"] == "cost tie"


def test_cost_order_unit():
    costs = [np.array([10.0, 10.0]), np.array([10.0, 10.0]), np.array([11.0, 11.0])]
    keys = [(5,), (3,), (1,)]
    assert decision.cost_order([0, 1, 2], costs, tie_keys=keys) == (1, [0])
    assert decision.cost_order([0, 2], costs, tie_keys=keys) == (0, [])
    noisy = [np.array([10.0, 12.0, 11.0]), np.array([11.0, 13.0, 10.5]), np.array([40.0, 41.0])]
    assert decision.cost_order([0, 1, 2], noisy, tie_keys=keys) == (1, [0])
    assert decision.cost_order([], noisy, tie_keys=keys) == (None, [])


def test_a_costlier_and_worse_configuration_is_never_recommended():
    rng = np.random.default_rng(5)
    seen = 0
    for trial in range(25):
        k = int(rng.integers(3, 6))
        mus = rng.uniform(0.78, 0.82, k)
        params = rng.permutation(np.arange(1, k + 1) * 1000)
        vals = {2**i: list(mus[i] + rng.normal(0, 0.003, 4)) for i in range(k)}
        df = _table(vals, trainable_params={2**i: int(params[i]) for i in range(k)})
        r = stats.analyze(df, margin=0.03)
        rec = r["recommended"]
        if rec is None:
            continue
        seen += 1
        for g in r["groups"]:
            if g["key"] != rec["key"]:
                assert not (g["cost"] < rec["cost"] and g["mean"] > rec["mean"]), (trial, g)
    assert seen >= 10


# ----------------------------------------------------------------------------- words and digits

_ONE_X = re.compile(r"(?<![\d.])1(\.0*)?x\b")


def _texts():
    results = [
        stats.analyze(_seed_000_table(), metric="perplexity", direction="min",
                      cost="train_time_hrs"),
        stats.analyze(_table(NEAR, **NEAR_PARAMS), margin=0.01),
        stats.analyze(_table({4: [0.74, 0.79], 8: [0.80, 0.76], 16: [0.77, 0.81]})),
        stats.analyze(_table({4: STEADY, 16: [0.801, 0.806, 0.797]},
                             train_seconds={4: [100.0, 112.0, 91.0], 16: [95.0, 108.0, 97.0]},
                             trainable_params={4: 1000, 16: 4000}), margin=0.05),
    ]  # fmt: skip
    return [(r["reason"], stats.format_analysis(r)) for r in results]


def test_reason_and_table_use_the_new_words():
    for reason, table in _texts():
        for text in (reason, table):
            assert "indistinguishable" not in text.lower()
            assert not _ONE_X.search(text), text
        assert "margin" in reason.lower()
        assert "Hsu" in reason


def test_mean_std_printed_with_the_std_to_two_significant_digits():
    vals = {4: [0.767, 0.779, 0.791], 8: [0.80, 0.81, 0.805]}  # r=4: 0.779 +- 0.012
    r = stats.analyze(_table(vals))
    table = stats.format_analysis(r)
    row4 = next(line for line in table.splitlines() if line.startswith("lora r=4 "))
    assert "0.779 ± 0.012" in row4
    assert "0.8050 ± 0.0050" in table


def test_unit_formatters():
    assert units.fmt_mean_std(0.7791, 0.0123) == "0.779 ± 0.012"
    assert units.fmt_mean_std(5.2, 0.15) == "5.20 ± 0.15"
    assert units.fmt_mean_std(123.4, 12.0) == "123 ± 12"
    assert units.fmt_mean_std(0.5, None) == "0.5"
    assert units.fmt_mean_std(None, 0.1) == "-"
    assert units.fmt_mean_std(1.5 * GIB, 12 * MIB, "bytes") == "1.50 GiB ± 12.00 MiB"
    assert units.fmt_mean_std(100.0, 0.0, "seconds") == "100.0 s"
    assert [units.decimals_for(x) for x in (0.0123, 0.5, 0.099, 0.1, 12, 99, 250)] == [
        3, 2, 3, 2, 0, 0, 0,
    ]  # fmt: skip
    assert units.decimals_for(0) is None and units.decimals_for(None) is None
    assert units.decimals_for(float("nan")) is None
    assert units.fmt_p(0.38) == "0.38" and units.fmt_p(0.0012345) == "0.0012"
    assert units.fmt_p(3.14e-7) == "3.1e-07" and units.fmt_p(1.0) == "1"
    assert units.fmt_p(None) == "-" and units.fmt_p(float("nan")) == "-"


# ----------------------------------------------------------------------------- eval bootstrap


@pytest.fixture
def outcomes_codec():
    from lorasweep import records

    if not hasattr(records, "encode_outcomes") or not hasattr(records, "decode_outcomes"):
        pytest.skip("records.encode_outcomes/decode_outcomes not there yet")
    return records


def _correct(n: int, rng: np.random.Generator, p: float = 0.8) -> np.ndarray:
    return rng.random(n) < p


def test_bootstrap_identical_outcomes_is_exactly_zero(outcomes_codec):
    from lorasweep.analysis.resample import bootstrap_diff

    rng = np.random.default_rng(0)
    ref = {
        s: outcomes_codec.encode_outcomes("correct", correct=_correct(500, rng)) for s in range(3)
    }
    assert bootstrap_diff("accuracy", ref, dict(ref)) == [0.0, 0.0]


def test_bootstrap_ten_more_correct_of_500(outcomes_codec):
    from lorasweep.analysis.resample import bootstrap_diff

    rng = np.random.default_rng(1)
    base = _correct(500, rng)
    better = base.copy()
    better[np.flatnonzero(~base)[:10]] = True  # right on 10 more examples
    enc = outcomes_codec.encode_outcomes
    ref = {0: enc("correct", correct=base)}
    other = {0: enc("correct", correct=better)}
    lo, hi = bootstrap_diff("accuracy", ref, other)
    assert lo < 0.02 < hi and -0.05 <= lo and hi <= 0.09
    # the paired difference of the mean is Binomial(500, 10/500) / 500 on a resample
    expected = sps.binom.ppf([0.025, 0.975], 500, 10 / 500) / 500
    assert [lo, hi] == pytest.approx(list(expected), abs=2.5 / 500)
    # no interval when the metric cannot be recomputed, or the seeds do not meet
    assert bootstrap_diff("f1", ref, other) is None
    assert bootstrap_diff("accuracy", ref, {5: other[0]}) is None


def test_bootstrap_in_analyze_and_the_reason(outcomes_codec):
    rng = np.random.default_rng(2)
    enc = outcomes_codec.encode_outcomes
    rows = []
    for seed in range(3):
        good = _correct(500, rng)
        worse = good.copy()
        worse[np.flatnonzero(good)[: 8 + 2 * seed]] = False  # r=4 wrong on 8-12 more
        for rank, c in ((4, worse), (16, good)):
            rows.append({"rank": rank, "seed": seed, "accuracy": float(c.mean()),
                         "trainable_params": 100 * rank,
                         "eval_outcomes": json.dumps(enc("correct", correct=c))})  # fmt: skip
    r = stats.analyze(pd.DataFrame(rows), margin=0.05)
    json.dumps(r, allow_nan=False)
    g4 = _g(r, 4)
    assert r["recommended"]["key"]["rank"] == 4
    lo, hi = g4["diff_ci_examples"]
    assert lo < g4["diff"] < hi < 0  # r=4 is worse on the examples as well
    assert g4["diff"] == pytest.approx(-0.02)
    assert "paired bootstrap" in r["reason"]
    no_outcomes = stats.analyze(pd.DataFrame(rows).drop(columns="eval_outcomes"), margin=0.05)
    assert _g(no_outcomes, 4)["diff_ci_examples"] is None


def test_bootstrap_of_perplexity_from_per_example_nll(outcomes_codec):
    """Causal LM: perplexity = exp(sum NLL / sum tokens) on every resample; a model whose NLL
    is 10% lower on every example has a perplexity lower by the factor exp(-0.1 * mean NLL)."""
    from lorasweep.analysis.resample import bootstrap_diff

    rng = np.random.default_rng(4)
    tokens = rng.integers(5, 40, 300)
    nll = tokens * rng.uniform(1.5, 2.5, 300)  # per-example NLL sums, about 2 nats per token
    enc = outcomes_codec.encode_outcomes
    ref = {s: enc("nll", nll=nll, tokens=tokens) for s in range(2)}
    assert bootstrap_diff("perplexity", ref, dict(ref)) == [0.0, 0.0]
    other = {s: enc("nll", nll=0.9 * nll, tokens=tokens) for s in range(2)}
    lo, hi = bootstrap_diff("perplexity", ref, other)
    loss = nll.sum() / tokens.sum()
    point = math.exp(0.9 * loss) - math.exp(loss)  # the difference on the full eval set
    assert lo < point < hi < 0
    lo_l, hi_l = bootstrap_diff("eval_loss", ref, other)
    assert lo_l < -0.1 * loss < hi_l < 0
    assert bootstrap_diff("accuracy", ref, other) is None  # not from NLL outcomes


# ----------------------------------------------------------------------------- regressions


def test_quantized_ties_are_not_collapsed_seeds():
    # accuracy on a 200-example eval set moves in steps of 0.005
    vals = {4: [0.850, 0.850, 0.855], 8: [0.860, 0.860, 0.865], 16: [0.865, 0.870, 0.865]}
    r = stats.analyze(_table(vals, trainable_params={4: 400, 8: 800, 16: 1600}), margin=0.05)
    assert all(g["seeds_collapsed"] == 0 for g in r["groups"])
    assert r["recommended"] is not None


def test_a_loss_below_one_is_not_clipped_like_a_proportion():
    df = _table({4: [0.95, 0.99, 0.97], 8: [0.40, 0.45, 0.42]})
    df = df.rename(columns={"accuracy": "eval_loss"})
    g = _g(stats.analyze(df, metric="eval_loss"), 4)
    assert g["ci95"][1] == pytest.approx(0.97 + sps.t.ppf(0.975, 2) * 0.02 / math.sqrt(3))


def test_a_table_without_seeds_is_not_paired(tmp_path):
    """Row numbers are not seeds: without a seed column nothing is matched across
    configurations, so the pairs are compared with Welch's t, and the flags say why."""
    vals = {4: [0.80, 0.81, 0.79], 8: [0.805, 0.80, 0.81]}
    with_seeds = _table(vals)
    assert stats.analyze(with_seeds)["design"]["model"] == "two-way"
    without = with_seeds.drop(columns="seed")
    without.to_csv(tmp_path / "t.csv", index=False)
    for table in (without, stats.load_trials_table(tmp_path / "t.csv")):
        r = stats.analyze(table)
        assert r["design"]["model"] == "welch"
        assert any(f.startswith("No seed column") for f in r["flags"])
        t = sps.ttest_ind(vals[4], vals[8], equal_var=False)
        assert _g(r, 4)["p_value"] == pytest.approx(t.pvalue)

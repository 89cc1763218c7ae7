"""Pruning decisions: successive halving that drops only what the seeds show to be worse."""

from __future__ import annotations

import math

import pytest

from lorasweep.analysis.compare import decide_rung
from lorasweep.run.pruning import rung_steps


def test_rung_schedule():
    assert rung_steps(80, eta=2, min_steps=10) == [10, 20, 40]
    assert rung_steps(90, eta=3, min_steps=10) == [10, 30]
    assert rung_steps(10, eta=2, min_steps=10) == []
    with pytest.raises(ValueError, match="eta"):
        rung_steps(80, eta=1)


def test_drops_only_the_clearly_worse_half():
    vals = {
        "r=2": {0: 0.60, 1: 0.61, 2: 0.59, 3: 0.60},  # clearly worse in every seed
        "r=4": {0: 0.79, 1: 0.81, 2: 0.80, 3: 0.80},  # close to the best: kept
        "r=8": {0: 0.81, 1: 0.80, 2: 0.82, 3: 0.81},
        "r=16": {0: 0.70, 1: 0.85, 2: 0.62, 3: 0.90},  # worse on average, too noisy to drop
    }
    d = decide_rung(vals, 20, higher_is_better=True, eta=2)
    assert d.best == "r=8"
    assert d.drop == ["r=2"]
    assert set(d.keep) == {"r=4", "r=8", "r=16"}
    assert "kept" in d.reasons["r=16"] and "dropped" in d.reasons["r=2"]


def test_never_more_than_successive_halving_and_direction():
    vals = {f"c{i}": {s: 1.0 + i + 0.01 * s for s in range(4)} for i in range(4)}
    d = decide_rung(vals, 10, higher_is_better=False, eta=2)  # lower is better: c0 best
    assert d.best == "c0"
    assert sorted(d.drop) == ["c2", "c3"]  # n - ceil(n/2) = 2 at most, though c1 is worse too


def test_one_seed_drops_nothing_and_diverged_seed_is_worst():
    d = decide_rung({"a": {0: 0.9}, "b": {0: 0.1}}, 10, higher_is_better=True)
    assert d.drop == [] and "no test" in d.reasons["b"]
    d = decide_rung(
        {"a": {0: 0.8, 1: 0.81}, "b": {0: 0.79, 1: math.nan}}, 10, higher_is_better=True
    )
    assert d.drop == ["b"]


def test_merge_segments_adds_times_keeps_peaks_and_joins_curves():
    from lorasweep.records import TrialResult, TrialStatus
    from lorasweep.run.pruning import merge_segments

    prev = TrialResult(
        "t", TrialStatus.PENDING,
        metrics={"accuracy": 0.6, "train_seconds": 10.0, "load_seconds": 2.0,
                 "train_examples": 320.0, "train_tokens": 6400.0, "train_steps": 10.0,
                 "train_loss_mean": 0.8, "peak_cpu_rss_bytes": 5e8, "mean_cpu_rss_bytes": 4e8,
                 "rung_eval_seconds": 1.5, "train_segments": 1.0},
        curves={"train_loss": [[5, 0.9], [10, 0.7]], "eval_accuracy": [[10, 0.6]]},
        artifacts={"paused": {"step": 10, "checkpoint": "c"}},
    )  # fmt: skip
    new = TrialResult(
        "t", TrialStatus.COMPLETE,
        metrics={"accuracy": 0.8, "train_seconds": 30.0, "load_seconds": 2.0,
                 "train_examples": 960.0, "train_tokens": 19200.0, "train_steps": 40.0,
                 "train_loss_mean": 0.4, "peak_cpu_rss_bytes": 4e8, "mean_cpu_rss_bytes": 3e8,
                 "eval_seconds": 1.0, "train_segments": 1.0},
        curves={"train_loss": [[20, 0.5], [40, 0.3]], "eval_accuracy": [[40, 0.8]]},
        artifacts={"adapter_dir": "a"},
    )  # fmt: skip
    m = merge_segments(prev, new)
    assert m.status == TrialStatus.COMPLETE and m.metrics["accuracy"] == 0.8
    assert m.metrics["train_seconds"] == 40 and m.metrics["load_seconds"] == 4
    assert m.metrics["train_examples"] == 1280 and m.metrics["examples_per_second"] == 32
    assert m.metrics["tokens_per_second"] == 25600 / 40
    assert m.metrics["peak_cpu_rss_bytes"] == 5e8  # the larger peak
    assert m.metrics["mean_cpu_rss_bytes"] == (4e8 * 10 + 3e8 * 30) / 40  # time-weighted
    assert m.metrics["train_loss_mean"] == (0.8 * 10 + 0.4 * 30) / 40  # step-weighted
    assert m.metrics["rung_eval_seconds"] == 1.5 and m.metrics["eval_seconds"] == 1.0
    assert m.metrics["train_segments"] == 2
    assert m.curves["train_loss"] == [[5, 0.9], [10, 0.7], [20, 0.5], [40, 0.3]]
    assert m.curves["eval_accuracy"] == [[10, 0.6], [40, 0.8]]
    assert "paused" not in m.artifacts and m.artifacts["adapter_dir"] == "a"
    assert merge_segments(None, new) is new  # a first segment is stored as it is


def test_planned_steps_counts_like_the_trainer():
    from lorasweep.run.pruning import planned_steps

    assert planned_steps({"max_steps": 80}, 10_000) == 80
    # 1000 examples, batch 32 -> 32 batches (last one partial), accumulation 4 -> 8 per epoch
    assert planned_steps({"per_device_train_batch_size": 32, "gradient_accumulation_steps": 4,
                          "num_train_epochs": 2}, 1000) == 16  # fmt: skip
    assert planned_steps({"per_device_train_batch_size": 32, "dataloader_drop_last": True,
                          "num_train_epochs": 1}, 1000) == 31  # fmt: skip
    assert planned_steps({}, 100) == 39  # Trainer defaults: batch 8, 3 epochs -> 13 x 3


def test_pruning_summary_and_section_name_the_cheaper_dropped_config():
    import pandas as pd

    from lorasweep.analysis.pruning_summary import format_pruning, pruning_summary
    from lorasweep.analysis.report_sections import pruning_section_html

    state = {
        "settings": {"eta": 2, "min_steps": 10, "alpha": 0.05, "tolerance": 0.0},
        "metric": "accuracy", "direction": "higher", "total_steps": 80, "rungs": [10, 20, 40],
        "decisions": [{"step": 20, "best": "lora r=32", "keep": ["lora r=32"],
                       "drop": ["lora r=2"], "means": {"lora r=32": 0.68, "lora r=2": 0.5},
                       "seeds": {"lora r=32": 2, "lora r=2": 2},
                       "reasons": {"lora r=32": "best at this rung",
                                   "lora r=2": "dropped: significantly worse than lora r=32"}}],
    }  # fmt: skip
    trials = pd.DataFrame(
        {
            "variant": ["lora"] * 4,
            "rank": [2, 2, 32, 32],
            "status": ["pruned", "pruned", "complete", "complete"],
            "train_steps": [20.0, 20.0, 80.0, 80.0],
            "train_seconds": [10.0, 10.0, 40.0, 40.0],
            "rung_eval_seconds": [7.0, 7.0, 10.0, 10.0],
            "trainable_params": [1e3, 1e3, 1.6e4, 1.6e4],
        }
    )
    s = pruning_summary(state, trials)
    assert s["run_trial_steps"] == 200 and s["full_trial_steps"] == 320
    assert s["saved_fraction"] == pytest.approx(0.375)
    assert s["full_train_seconds_estimate"] == pytest.approx(4 * 80 * 0.5)  # 0.5 s per step
    assert s["rung_eval_seconds"] == 34
    assert "trained 200 of 320 trial-steps (38% saved); dropped lora r=2 at step 20" in (
        format_pruning(s)
    )
    html = pruning_section_html(s, "lora r=32")
    assert "Cheaper than the recommendation and dropped" in html and "lora r=2" in html
    # a dropped configuration that costs more than the recommendation is not flagged
    assert "Cheaper than" not in pruning_section_html(s, "lora r=2")

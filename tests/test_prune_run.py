"""Pruning end to end: paused-and-resumed trials equal unpaused ones, and the rung loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import tiny_classification_spec
from lorasweep.results import TrialStatus
from lorasweep.spec import parse_spec


def _segments(trial, workdir: Path, cache: Path, stops: list[int | None]):
    """Run a trial in segments as the sweep does, merging results as the parent does."""
    from lorasweep.prune import merge_segments
    from lorasweep.trial import train_trial

    merged, resume = None, None
    for stop in stops:
        res = train_trial(
            trial,
            workdir,
            cache_root=cache,
            context={"segment": {"stop_at": stop, "resume_from": resume}},
        )
        merged = merge_segments(merged, res)
        if stop is not None:
            assert res.status == TrialStatus.PENDING, res.error
            assert res.artifacts["paused"]["step"] == stop
            resume = res.artifacts["paused"]["checkpoint"]
            assert (Path(resume) / "optimizer.pt").exists()
    return merged


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_paused_and_resumed_trial_equals_unpaused(tiny_bert_dir, tiny_csv, tmp_path, method):
    """A trial paused at rungs 4 and 8 and resumed from its checkpoints ends with the same
    weights-derived numbers as the same trial run straight to step 12 (dropout on, so the RNG
    states must be restored too; AdaLoRA also needs its allocator's importance scores)."""
    from lorasweep.trial import train_trial

    lora = {"target_modules": ["query", "value"], "alpha": 8, "dropout": 0.1}
    if method == "adalora":
        lora = {**lora, "method": "adalora", "init_r": 6, "target_r": 2, "tinit": 2,
                "tfinal": 3, "deltaT": 1}  # fmt: skip
        grid = {"rank": [6]}
    else:
        grid = {"rank": [4]}
    spec = parse_spec(
        tiny_classification_spec(
            tiny_bert_dir,
            tiny_csv,
            training={"learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_steps": 12,
                      "logging_steps": 2},  # fmt: skip
            lora=lora,
            grid=grid,
            seeds=[0],
        )
    )
    trial = spec.trials()[0]
    cache = tmp_path / "cache"
    full = train_trial(trial, tmp_path / "full", cache_root=cache)
    assert full.status == TrialStatus.COMPLETE, full.error
    parts = _segments(trial, tmp_path / "seg", cache, [4, 8, None])
    assert parts.status == TrialStatus.COMPLETE, parts.error
    for k in ("accuracy", "f1", "eval_loss", "train_loss", "train_loss_mean", "train_steps",
              "train_examples", "train_tokens", "trainable_params"):  # fmt: skip
        assert parts.metrics[k] == pytest.approx(full.metrics[k], abs=1e-6, rel=1e-6), k
    assert parts.metrics["train_segments"] == 3
    assert [s for s, _ in parts.curves["train_loss"]] == [s for s, _ in full.curves["train_loss"]]
    for (_, a), (_, b) in zip(parts.curves["train_loss"], full.curves["train_loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    # rung evaluations are kept as eval curve points; the final one is the final metric
    assert [s for s, _ in parts.curves["eval_accuracy"]] == [4, 8, 12]
    assert parts.curves["eval_accuracy"][-1][1] == parts.metrics["accuracy"]
    assert parts.metrics["rung_eval_seconds"] > 0
    if method == "adalora":
        assert parts.artifacts["adalora_final_ranks"] == full.artifacts["adalora_final_ranks"]
    assert math.isfinite(parts.metrics["examples_per_second"])

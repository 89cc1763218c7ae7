"""Pruning end to end: paused-and-resumed trials equal unpaused ones, and the rung loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_classification_spec

from lorasweep.records import TrialStatus
from lorasweep.spec import parse_spec


def _segments(trial, workdir: Path, cache: Path, stops: list[int | None], rung_eval=None):
    """Run a trial in segments as the sweep does, merging results as the parent does."""
    from lorasweep.run.pruning import merge_segments
    from lorasweep.training.trial import train_trial

    merged, resume = None, None
    for stop in stops:
        res = train_trial(
            trial,
            workdir,
            cache_root=cache,
            context={
                "segment": {"stop_at": stop, "resume_from": resume, "eval_examples": rung_eval}
            },
        )
        merged = merge_segments(merged, res)
        if stop is not None:
            assert res.status == TrialStatus.PENDING, res.error
            assert res.artifacts["paused"]["step"] == stop
            resume = res.artifacts["paused"]["checkpoint"]
            assert (Path(resume) / "optimizer.pt").exists()
            if rung_eval:
                assert res.metrics["rung_eval_examples"] == rung_eval
    return merged


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_paused_and_resumed_trial_equals_unpaused(tiny_bert_dir, tiny_csv, tmp_path, method):
    """A trial paused at rungs 4 and 8 and resumed from its checkpoints ends with the same
    weights-derived numbers as the same trial run straight to step 12 (dropout on, so the RNG
    states must be restored too; AdaLoRA also needs its allocator's importance scores)."""
    from lorasweep.training.trial import train_trial

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
            training={
                "learning_rate": 5e-3,
                "per_device_train_batch_size": 8,
                "max_steps": 12,
                "logging_steps": 2,
            },  # fmt: skip
            lora=lora,
            grid=grid,
            seeds=[0],
        )
    )
    trial = spec.trials()[0]
    cache = tmp_path / "cache"
    full = train_trial(trial, tmp_path / "full", cache_root=cache)
    assert full.status == TrialStatus.COMPLETE, full.error
    # rungs scored on 10 eval examples; the final evaluation still uses the whole eval set
    parts = _segments(trial, tmp_path / "seg", cache, [4, 8, None], rung_eval=10)
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


def _run_interrupted(spec: dict, out: Path, *, after: int, prune) -> None:
    """Run a sweep in-process and stop it with Ctrl-C (KeyboardInterrupt) right after its
    ``after``-th result is recorded, as a user would."""
    from lorasweep.run import progress as progress_mod
    from lorasweep.run.sweep import run_sweep

    calls = {"n": 0}
    finish = progress_mod.Progress.finish

    def interrupting_finish(self, result):
        finish(self, result)
        calls["n"] += 1
        if calls["n"] == after:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress_mod.Progress, "finish", interrupting_finish)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(spec, out, backend="inprocess", quiet=True, prune=prune)


def _ruined_spec(model_dir: Path, csv: Path) -> dict:
    """Two configurations, 4 seeds, 8 steps: plain LoRA, and one whose learning rate (1e3)
    wrecks the model without a non-finite loss (eval loss in the thousands at step 2, but
    spread so widely that 3 seeds give a paired p of 0.06: the test is honest about noise)."""
    return tiny_classification_spec(
        model_dir,
        csv,
        training={"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_steps": 8},
        variants={"lora": {}, "ruined": {"rank": 4, "training": {"learning_rate": 1e3}}},
        grid={"rank": [4]},
        seeds=[0, 1, 2, 3],
    )


def _settings():
    from lorasweep.run.pruning import PruneSettings

    return PruneSettings(min_steps=2, metric="eval_loss")  # rungs at steps 2 and 4 of 8


def test_prune_sweep_drops_the_worse_config_and_survivors_match_the_full_grid(
    tiny_bert_dir, tiny_csv, tmp_path
):
    from lorasweep.run.sweep import run_sweep
    from lorasweep.store import open_store

    spec = _ruined_spec(tiny_bert_dir, tiny_csv)
    full = run_sweep(spec, tmp_path / "full", backend="inprocess", quiet=True, report=False)
    assert full.statuses == {"complete": 8}

    # kill the pruned sweep (Ctrl-C) in the middle of rung 2; the resume must go on from the
    # stored rung checkpoints and decisions
    out = tmp_path / "pruned"
    _run_interrupted(spec, out, after=10, prune=_settings())  # rung 1: 8 segments, then 2 more
    with open_store(out) as store:
        mid = {t["label"]: t for t in store.trials()}
    assert {t["status"] for k, t in mid.items() if k.startswith("ruined")} == {"pruned"}
    lora = [t for k, t in mid.items() if k.startswith("lora")]
    # two survivors finished, two still paused at the first rung
    assert sorted(t["status"] for t in lora) == ["complete", "complete", "pending", "pending"]
    assert [t["artifacts"]["paused"]["step"] for t in lora if t["status"] == "pending"] == [2, 2]
    import contextlib
    import io

    from lorasweep.cli import main

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert main(["status", str(out)]) == 0
    assert shown.getvalue().count("paused at step 2") == 2

    outcome = run_sweep(spec, out, backend="inprocess", quiet=True, prune=_settings())
    assert outcome.statuses == {"complete": 4, "pruned": 4}
    with open_store(out) as store:
        meta, trials = store.meta()["prune"], {t["label"]: t for t in store.trials()}
        curves = {t["label"]: store.curves_of(t["id"]) for t in store.trials()}
    # rung 4 was skipped: with one configuration left there is nothing to compare
    assert [d["step"] for d in meta["decisions"]] == [2]
    assert meta["decisions"][0]["drop"] == ["ruined r=4"]
    with open_store(tmp_path / "full") as store:
        reference = {t["label"]: t for t in store.trials()}
    for label, t in trials.items():
        if label.startswith("ruined"):
            assert t["status"] == "pruned"
            assert t["error"].startswith("pruned at step 2: significantly worse than lora r=4")
            assert t["metrics"]["train_steps"] == 2 and t["metrics"]["eval_loss"] > 10
            assert [s for s, _ in curves[label]["eval_loss"]] == [2]
        else:  # survivors: the same numbers as the unpruned sweep, rung evaluations recorded
            assert t["status"] == "complete"
            for k in ("accuracy", "eval_loss", "train_loss", "train_steps"):
                assert t["metrics"][k] == pytest.approx(reference[label]["metrics"][k], abs=1e-6)
            assert [s for s, _ in curves[label]["eval_loss"]] == [2, 8]
        assert not (out / "trials" / t["id"] / "checkpoints").exists()  # no checkpoint left
    # every survivor ran its 2 segments in exactly 2 starts, interrupted or not: nothing twice
    assert {trials[f"lora/r=4/seed={s}"]["attempts"] for s in range(4)} == {2}

    # nothing left to run; a different setting on this folder is refused
    again = run_sweep(spec, out, backend="inprocess", quiet=True, prune=_settings())
    assert again.ran == 0
    from lorasweep.run.pruning import PruneSettings

    with pytest.raises(ValueError, match="--prune: this run folder was pruned with"):
        run_sweep(spec, out, backend="inprocess", quiet=True,
                  prune=PruneSettings(min_steps=2, metric="eval_loss", eta=3, ))  # fmt: skip

    from lorasweep.api import Results

    summary = Results(out).pruning
    assert summary["run_trial_steps"] == 40 and summary["full_trial_steps"] == 64
    assert [d["config"] for d in summary["dropped"]] == ["ruined r=4"]
    # the report says what pruning did and saved: 4 x 8 + 4 x 2 of 64 trial-steps
    html = (out / "report.html").read_text()
    assert "Pruning" in html and "Trained <b>40</b> of 64 trial-steps" in html
    assert "38% saved" in html and "pruned at step 2" in html


def test_prune_bad_inputs_are_one_line_errors(tiny_bert_dir, tiny_csv, tmp_path):
    import yaml

    from lorasweep.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(_ruined_spec(tiny_bert_dir, tiny_csv) | {"seeds": [0]}))
    cases = [
        ([], "--prune: needs at least 2 seeds"),
        (["--prune-metric", "perplexity"], "--prune-metric: 'perplexity' is not measured"),
        (["--prune-eta", "1"], "--prune-eta: must be >= 2, got 1"),
        (["--prune-tolerance", "-1"], "--prune-tolerance: must be >= 0"),
        (["--prune-eval-examples", "0"], "--prune-eval-examples: must be >= 1"),
    ]
    cases.append((["--prune-eta", "3", "NOPRUNE"], "--prune-eta: 3 is used only with --prune"))
    for extra, message in cases:
        if extra:
            spec.write_text(yaml.safe_dump(_ruined_spec(tiny_bert_dir, tiny_csv)))
        out = tmp_path / f"run{len(extra)}{extra[:1]}"
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            flags = [x for x in extra if x != "NOPRUNE"]
            prune = [] if "NOPRUNE" in extra else ["--prune"]
            code = main(["run", str(spec), "--out", str(out), *prune, *flags])
        assert code == 2, extra
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, lines)
        assert not out.exists()  # refused before anything was created


def test_a_paused_trial_resumed_without_prune_runs_from_its_checkpoint_to_the_end(
    tiny_bert_dir, tiny_csv, tmp_path
):
    """A pruned sweep stopped after its first rung, then resumed *without* --prune: the paused
    trials continue from their checkpoints (not from step 0) and end as an unpaused run would."""
    from lorasweep.run.pruning import PruneSettings
    from lorasweep.run.sweep import run_sweep

    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)  # 2 ranks x 2 seeds, 4 steps
    plain = run_sweep(spec, tmp_path / "plain", backend="inprocess", quiet=True, report=False)
    assert plain.statuses == {"complete": 4}
    out = tmp_path / "run"
    _run_interrupted(spec, out, after=4, prune=PruneSettings(min_steps=2))  # all paused at 2
    done = run_sweep(spec, out, backend="inprocess", quiet=True, report=False)
    assert done.statuses == {"complete": 4} and done.ran == 4
    from lorasweep.store import open_store

    with open_store(tmp_path / "plain") as a, open_store(out) as b:
        ref = {t["id"]: t for t in a.trials()}
        for t in b.trials():
            assert t["metrics"]["train_segments"] == 2  # step 0->2, then 2->4 from the checkpoint
            for k in ("accuracy", "eval_loss", "train_loss", "train_tokens"):
                assert t["metrics"][k] == pytest.approx(ref[t["id"]]["metrics"][k], abs=1e-6)


def test_prune_works_over_a_grid_of_any_setting(tiny_bert_dir, tiny_csv, tmp_path):
    """Successive halving over a rank x learning-rate grid: configurations are told apart by
    every setting that varies (the learning-rate 1e3 point is dropped, its rank kept)."""
    from lorasweep.run.sweep import run_sweep
    from lorasweep.store import open_store

    spec = tiny_classification_spec(
        tiny_bert_dir,
        tiny_csv,
        training={"per_device_train_batch_size": 8, "max_steps": 8},
        grid={"rank": [4], "learning_rate": [1e-3, 1e3]},
        seeds=[0, 1, 2, 3],
    )
    outcome = run_sweep(spec, tmp_path, backend="inprocess", quiet=True, report=False,
                        prune=_settings())  # fmt: skip
    assert outcome.statuses == {"complete": 4, "pruned": 4}
    with open_store(tmp_path) as store:
        meta, trials = store.meta()["prune"], store.trials()
        df = store.trials_frame()
    assert meta["decisions"][0]["drop"] == ["lora r=4 lr=1000"]
    pruned = {t["label"] for t in trials if t["status"] == "pruned"}
    assert pruned == {f"lora/r=4/lr=1000/seed={s}" for s in range(4)}
    assert set(df.loc[df["status"] == "pruned", "learning_rate"]) == {1e3}

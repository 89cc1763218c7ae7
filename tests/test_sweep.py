"""End-to-end sweeps on a tiny model through both backends, resume, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tiny_classification_spec

from lorasweep.cli import main
from lorasweep.run.sweep import run_sweep
from lorasweep.store import open_store


@pytest.mark.parametrize("backend", ["inprocess", "local"])
def test_tiny_sweep_end_to_end(backend, tiny_bert_dir, tiny_csv, tmp_path):
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    out = run_sweep(spec, tmp_path / "run", backend=backend, quiet=True)
    assert out.planned == 4 and out.ran == 4 and out.statuses == {"complete": 4}
    with open_store(tmp_path / "run") as store:
        df = store.trials_frame()
        curves = store.curves_frame()
    assert sorted(df["rank"]) == [2, 2, 4, 4]
    for col in (
        "accuracy",
        "f1",
        "train_seconds",
        "load_seconds",
        "eval_seconds",
        "examples_per_second",
        "tokens_per_second",
        "trainable_params",
        "trainable_percent",
        "adapter_bytes",
        "peak_cpu_rss_bytes",
        "mean_cpu_rss_bytes",
        "lora_scale",
    ):
        assert df[col].notna().all(), col
    # LoRA on query+value of 2 layers (hidden 32): r*(32+32) per module, 4 modules, plus the
    # classifier (32*2 weights + 2 biases) that peft trains for sequence classification; the
    # pooler stays frozen
    head = 32 * 2 + 2
    for r, n in zip(df["rank"], df["trainable_params"], strict=True):
        assert n == 4 * r * 64 + head
    assert (df["examples_per_second"] * df["train_seconds"]).round().eq(32).all()  # 4 steps x 8
    assert set(curves["trial_id"]) == set(df["trial_id"])
    assert (tmp_path / "run" / "report.html").exists()
    env = json.loads(json.dumps(store_env(tmp_path / "run")))
    assert {"torch", "transformers", "peft", "device"} <= set(env)


def store_env(run):
    with open_store(run) as store:
        return store.trials()[0]["environment"]


def test_same_seed_same_numbers_and_resume_trains_nothing(tiny_bert_dir, tiny_csv, tmp_path):
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, grid={"rank": [4]}, seeds=[3])
    run_sweep(spec, tmp_path / "a", backend="inprocess", quiet=True)
    run_sweep(spec, tmp_path / "b", backend="local", quiet=True)
    again = run_sweep(spec, tmp_path / "a", backend="inprocess", quiet=True)
    assert again.ran == 0 and again.skipped == 1
    with open_store(tmp_path / "a") as sa, open_store(tmp_path / "b") as sb:
        ma, mb = sa.trials()[0]["metrics"], sb.trials()[0]["metrics"]
        assert sa.trials()[0]["id"] == sb.trials()[0]["id"]
        assert sa.trials()[0]["attempts"] == 1  # not run twice
    for k in ("accuracy", "f1", "eval_loss", "train_loss"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-6), k


def test_cli_status_json_and_export(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, grid={"rank": [2]}, seeds=[0])
    run_sweep(spec, tmp_path / "r", backend="inprocess", quiet=True)
    capsys.readouterr()
    assert main(["status", str(tmp_path / "r"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (t,) = data["trials"]
    assert set(t) == {"id", "status", "seed", "rank", "variant", "metrics", "error", "paused"}
    assert t["paused"] is None  # a complete trial has no rung checkpoint
    assert t["status"] == "complete" and "accuracy" in t["metrics"]
    assert "trainable_params" in t["metrics"] and "f1" in t["metrics"]
    assert (
        main(["export", str(tmp_path / "r"), "--format", "csv", "-o", str(tmp_path / "t.csv")]) == 0
    )
    assert "accuracy" in (tmp_path / "t.csv").read_text().splitlines()[0]


def test_cli_bad_spec_one_line_exit_2(tiny_bert_dir, tiny_csv, tmp_path):
    import yaml

    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    spec["grid"] = {"rank": [0]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "lorasweep", "run", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["lorasweep: error: grid.rank: rank[0] must be > 0, got 0 (got [0])"]
    assert not (tmp_path / "o").exists()  # nothing created before validation passed


def test_dataset_is_tokenized_once_per_sweep(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    from lorasweep.training import data

    calls = []
    real = data.tokenize_classification

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(data, "tokenize_classification", counting)
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)  # 4 trials
    run_sweep(spec, tmp_path / "r", backend="inprocess", quiet=True, report=False)
    assert len(calls) == 1  # the parent tokenizes; every trial loads the cached dataset
    assert len(list((tmp_path / "r" / "cache").glob("data-*/info.json"))) == 1

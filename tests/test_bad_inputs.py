"""Bad inputs and faults of the world: one clear line, the right exit code, nothing trained,
nothing recorded lost, no half-made run folder.

Every case runs the real CLI entry point (``lorasweep.cli.main``) in-process on the tiny BERT
and a real CSV. A case names what it breaks, the command, the exit code, and a piece of the one
line it must print. After each case: no traceback; every stderr line is a ``lorasweep: error:``
line; a new ``--out`` does not exist; an existing run folder holds exactly the trials it held.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import tiny_classification_spec

from lorasweep.cli import main
from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.sweep import run_sweep
from lorasweep.store import open_store

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Env:
    """What a case may touch: a spec dict, the tmp folder, the shared fixtures."""

    tmp: Path
    spec: dict[str, Any]
    model: Path
    csv: Path
    run: Path | None = None  # an existing run folder (cases that need one)
    files: dict[str, Path] = field(default_factory=dict)

    def write_spec(self) -> Path:
        p = self.tmp / "spec.yaml"
        p.write_text(yaml.safe_dump(self.spec))
        return p

    def data(self, name: str, text: str) -> Path:
        """A data file with ``text`` as its content; the spec now reads it."""
        p = self.tmp / name
        p.write_text(textwrap.dedent(text).lstrip())
        self.spec["dataset"]["source"] = str(p)
        return p


def _set(path: str, value: Any) -> Callable[[Env], None]:
    """A change of the spec at a dotted path (``training.max_steps``)."""

    def apply(env: Env) -> None:
        d = env.spec
        *parents, last = path.split(".")
        for k in parents:
            d = d.setdefault(k, {})
        d[last] = value

    return apply


def _drop(path: str) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        d = env.spec
        *parents, last = path.split(".")
        for k in parents:
            d = d[k]
        d.pop(last)

    return apply


def _csv(rows: list[tuple[Any, Any]], header: str = "text,label") -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        body = "\n".join(",".join("" if v is None else str(v) for v in r) for r in rows)
        env.data("bad.csv", header + "\n" + body + "\n")

    return apply


def _good_rows(n: int = 60) -> list[tuple[str, int]]:
    return [(f"a real sentence number {i}", i % 2) for i in range(n)]


def _model_copy(drop: tuple[str, ...]) -> Callable[[Env], None]:
    """A local model folder missing some files (weights, tokenizer)."""

    def apply(env: Env) -> None:
        target = env.tmp / "model"
        shutil.copytree(env.model, target)
        for pattern in drop:
            for p in target.glob(pattern):
                p.unlink()
        env.spec["model"] = str(target)

    return apply


def _model_config(**over: Any) -> Callable[[Env], None]:
    """A local model whose config.json says something else (e.g. its head's class count)."""

    def apply(env: Env) -> None:
        target = env.tmp / "model"
        shutil.copytree(env.model, target)
        cfg = json.loads((target / "config.json").read_text())
        cfg.update(over)
        (target / "config.json").write_text(json.dumps(cfg))
        env.spec["model"] = str(target)

    return apply


@dataclass
class Case:
    id: str
    setup: Callable[[Env], None] | None
    line: str  # a piece of the one line that must be printed
    exit: int = 2
    argv: Callable[[Env, Path], list[str]] | None = None  # default: run SPEC --out OUT
    needs_run: bool = False  # start from a recorded run folder (out = that folder)


def _run_argv(env: Env, out: Path) -> list[str]:
    return ["run", str(env.write_spec()), "--out", str(out), "--backend", "inprocess", "--quiet"]


def _cli(*args: str) -> Callable[[Env, Path], list[str]]:
    """Another command; ``{out}``, ``{spec}``, ``{tmp}`` and ``{run}`` are filled in."""

    def argv(env: Env, out: Path) -> list[str]:
        fill = {"out": str(out), "tmp": str(env.tmp), "run": str(env.run or out)}
        if any("{spec}" in a for a in args):
            fill["spec"] = str(env.write_spec())
        return [a.format(**fill) for a in args]

    return argv


CASES = [
    # -- training arguments: wrong type, out of range, NaN (each failed inside every trial)
    Case(
        "batch-size-0",
        _set("training.per_device_train_batch_size", 0),
        "training.per_device_train_batch_size: must be at least 1, got 0",
    ),
    Case(
        "batch-size-text",
        _set("training.per_device_train_batch_size", "big"),
        "training.per_device_train_batch_size: must be an integer, got 'big'",
    ),
    Case(
        "batch-size-float",
        _set("training.per_device_train_batch_size", 2.5),
        "training.per_device_train_batch_size: must be an integer, got 2.5",
    ),
    Case(
        "lr-nan",
        _set("training.learning_rate", float("nan")),
        "training.learning_rate: must be a finite number, got nan",
    ),
    Case(
        "lr-inf",
        _set("training.learning_rate", float("inf")),
        "training.learning_rate: must be a finite number, got inf",
    ),
    Case(
        "lr-text",
        _set("training.learning_rate", "1e-3"),
        "training.learning_rate: must be a number, got '1e-3' (YAML reads 1e-3 as text",
    ),
    Case(
        "lr-negative",
        _set("training.learning_rate", -0.1),
        "training.learning_rate: must be > 0, got -0.1",
    ),
    Case(
        "lr-bool",
        _set("training.learning_rate", True),
        "training.learning_rate: must be a number, got True",
    ),
    Case(
        "epochs-0",
        lambda e: (_drop("training.max_steps")(e), _set("training.num_train_epochs", 0)(e)),
        "training.num_train_epochs: must be > 0, got 0",
    ),
    Case(
        "max-steps-0",
        _set("training.max_steps", 0),
        "training.max_steps: must be a positive integer, got 0",
    ),
    Case(
        "max-steps-float",
        _set("training.max_steps", 2.5),
        "training.max_steps: must be an integer, got 2.5",
    ),
    Case(
        "scheduler-unknown",
        _set("training.lr_scheduler_type", "linearx"),
        "training.lr_scheduler_type: must be one of linear, cosine",
    ),
    Case("bf16-text", _set("training.bf16", "yes"), "training.bf16: must be true or false"),
    Case(
        "weight-decay-negative",
        _set("training.weight_decay", -0.1),
        "training.weight_decay: must be >= 0, got -0.1",
    ),
    Case(
        "warmup-negative",
        _set("training.warmup_steps", -1),
        "training.warmup_steps: must be >= 0, got -1",
    ),
    Case(
        "grad-accum-0",
        _set("training.gradient_accumulation_steps", 0),
        "training.gradient_accumulation_steps: must be at least 1, got 0",
    ),
    Case(
        "training-typo",
        _set("training.lerning_rate", 1e-3),
        "training.lerning_rate: not a transformers TrainingArguments field",
    ),
    Case("training-reserved", _set("training.seed", 3), "training.seed: cannot be set here"),
    Case(
        "variant-training-nan",
        _set("variants", {"a": {"training": {"learning_rate": float("nan")}}}),
        "variants.a.training.learning_rate: must be a finite number, got nan",
    ),
    # -- spec shape
    Case("rank-0", _set("grid.rank", [8, 0]), "grid.rank: rank[1] must be > 0, got 0"),
    Case("rank-repeated", _set("grid.rank", [4, 4]), "grid.rank: ranks must be distinct"),
    Case("seeds-empty", _set("seeds", []), "seeds: needs at least one seed"),
    Case("seeds-repeated", _set("seeds", [0, 0]), "seeds: seeds must be distinct"),
    Case("dropout-1.5", _set("lora.dropout", 1.5), "lora.dropout: Input should be less than 1"),
    Case("alpha-negative", _set("lora.alpha", -1), "lora.alpha: must be > 0, got -1"),
    Case(
        "alpha-policy-unknown",
        _set("lora.alpha", "3*rank"),
        'lora.alpha: must be a number, "rank", "2*rank" or "rslora"',
    ),
    Case(
        "target-missing",
        _set("lora.target_modules", ["q_proj"]),
        "lora.target_modules: LoRA target 'q_proj' matches no linear layer",
    ),
    Case(
        "unknown-top-key",
        _set("lora_r", 8),
        "lora_r: unknown key (value 8); did you mean grid.rank?",
    ),
    # -- other tools' names for a key: "did you mean" (axolotl, peft, transformers)
    Case(
        "peft-name-in-lora",
        _set("lora.lora_r", 16),
        "lora.lora_r: unknown key (value 16); did you mean lora.rank?",
    ),
    Case(
        "load-in-4bit",
        _set("load_in_4bit", True),
        "load_in_4bit: unknown key (value True); did you mean lora.quantization: 4bit?",
    ),
    Case(
        "grid-r",
        _set("grid.r", [2, 4]),
        "grid.r: unknown key (value [2, 4]); did you mean grid.rank?",
    ),
    Case(
        "top-level-learning-rate",
        _set("learning_rate", 0.001),
        "learning_rate: unknown key (value 0.001); did you mean training.learning_rate?",
    ),
    Case(
        "target-modules-all",
        _set("lora.target_modules", "all"),
        "lora.target_modules: 'all' is not a module name or a target group (attention, mlp, "
        "experts, all-linear); did you mean all-linear?",
    ),
    Case("task-unknown", _set("task", "regression"), "task: Input should be 'classification'"),
    Case(
        "report-to-unknown",
        _set("report_to", ["neptune"]),
        "report_to: unknown integration 'neptune'",
    ),
    Case(
        "adalora-with-rank",
        _set("variants", {"ada": {"method": "adalora", "rank": 4}}),
        "variants.ada.rank: rank=4 cannot be used with method adalora",
    ),
    Case(
        "eval-fraction-1.5",
        _set("dataset.eval_fraction", 1.5),
        "dataset.eval_fraction: Input should be less than 1",
    ),
    # -- names that become paths
    Case("name-dotdot", _set("name", "../evil"), "name: must be one folder name"),
    Case("name-slash", _set("name", "a/b"), "name: must be one folder name"),
    Case("variant-dotdot", _set("variants", {"../x": {}}), "variant name '../x': must be one"),
    # -- the model
    Case("model-missing", _set("model", "./no-such-model"), "model: directory not found"),
    Case("model-builtin-unknown", _set("model", "builtin:gpt5"), "model: unknown builtin"),
    Case("model-no-weights", _model_copy(("*.safetensors", "*.bin")), "model: no weights in"),
    Case(
        "model-no-tokenizer",
        _model_copy(("tokenizer*", "vocab.txt", "special_tokens*")),
        "model: no tokenizer in",
    ),
    Case(
        "max-length-beyond-positions",
        _set("dataset.max_length", 1000),
        "dataset.max_length: 1000 is beyond the model's 128 positions; use at most 128",
    ),
    Case(
        "4bit-cpu-widths",
        _set("lora.quantization", "4bit"),
        "lora.quantization: 4bit on CPU needs layer input widths that are multiples of 64",
    ),
    # -- the data
    Case("data-missing", _set("dataset.source", "./nope.csv"), "dataset.source: file not found"),
    Case(
        "data-suffix",
        lambda e: e.data("d.xlsx", "x"),
        "dataset.source: unsupported file type '.xlsx'",
    ),
    Case(
        "text-column-missing",
        _set("dataset.text_column", "sentence"),
        "dataset.text_column: column 'sentence' not in",
    ),
    Case(
        "label-column-missing",
        _set("dataset.label_column", "y"),
        "dataset.label_column: column 'y' not in",
    ),
    Case(
        "label-equals-text",
        _set("dataset.label_column", "text"),
        "dataset.label_column: is the text column",
    ),
    Case(
        "text-cell-empty",
        _csv(_good_rows()[:10] + [("", 1)] + _good_rows()[11:]),
        "dataset.text_column: 1 empty",
    ),
    Case(
        "label-cell-empty",
        _csv(_good_rows()[:10] + [("a lone sentence", None)] + _good_rows()[11:]),
        "dataset.label_column: 1 empty",
    ),
    Case(
        "single-class",
        _csv([(f"sentence {i}", 1) for i in range(60)]),
        "dataset.label_column: one class",
    ),
    Case("too-few-rows", _csv(_good_rows(3)), "dataset.source: "),
    Case(
        "malformed-row-300", _csv(_good_rows(298) + [("a,b", "c,1")] + _good_rows(10)), "line 300"
    ),
    Case("header-only", lambda e: e.data("empty.csv", "text,label\n"), "dataset.source: "),
    Case(
        "text-not-string-jsonl",
        lambda e: e.data(
            "d.jsonl",
            "\n".join(
                json.dumps({"text": (5 if i == 7 else f"sentence {i}"), "label": i % 2})
                for i in range(60)
            ),
        ),
        "dataset.text_column: ",
    ),
    Case(
        "jsonl-broken",
        lambda e: e.data("d.jsonl", '{"text": "a", "label": 0}\n{"text": \n'),
        "dataset.source: ",
    ),
    # -- the run folder
    Case("out-is-a-file", lambda e: (e.tmp / "out").write_text("mine"), "is a file, not a folder"),
    Case(
        "out-foreign-folder",
        lambda e: ((e.tmp / "out").mkdir(), (e.tmp / "out" / "report.html").write_text("mine")),
        "is not empty and is not a lorasweep run folder (it holds report.html)",
    ),
    Case(
        "spec-changed-max-steps",
        _set("training.max_steps", 3),
        "training.max_steps 2 -> 3; use a new --out",
        needs_run=True,
    ),
    Case(
        "spec-changed-dropout",
        _set("lora.dropout", 0.2),
        "adapter.dropout 0.0 -> 0.2",
        needs_run=True,
    ),
    Case(
        "spec-changed-max-length",
        _set("dataset.max_length", 16),
        "dataset.max_length 32 -> 16",
        needs_run=True,
    ),
    Case("spec-changed-model", _model_config(), "model ", needs_run=True),
    Case(
        "retry-unknown",
        None,
        "--retry: unknown status 'crashed'",
        argv=_cli("run", "{spec}", "--out", "{out}", "--retry", "crashed"),
    ),
    Case(
        "jobs-text",
        None,
        "--jobs: must be a positive integer or auto, got 'many'",
        argv=_cli("run", "{spec}", "--out", "{out}", "--jobs", "many"),
    ),
    Case(
        "per-gpu-on-cpu",
        None,
        "--per-gpu: no GPU is visible",
        argv=_cli("run", "{spec}", "--out", "{out}", "--per-gpu", "2"),
    ),
    Case(
        "prune-one-seed",
        _set("seeds", [0]),
        "--prune: needs at least 2 seeds",
        argv=_cli("run", "{spec}", "--out", "{out}", "--prune"),
    ),
    Case(
        "prune-option-alone",
        None,
        "--prune-eta: 3 is used only with --prune",
        argv=_cli("run", "{spec}", "--out", "{out}", "--prune-eta", "3"),
    ),
    Case(
        "spec-file-missing",
        None,
        "spec: file not found",
        argv=_cli("run", "{tmp}/nope.yaml", "--out", "{out}"),
    ),
    Case(
        "spec-not-yaml",
        lambda e: (e.tmp / "bad.yaml").write_text("a: [1,\n"),
        "is not valid YAML",
        argv=_cli("run", "{tmp}/bad.yaml", "--out", "{out}"),
    ),
    # -- other commands
    Case("status-no-run", None, "no lorasweep run in", argv=_cli("status", "{tmp}/none")),
    Case(
        "estimate-ranks-text",
        None,
        "--ranks: 'a' is not a positive integer (got 'a,b')",
        argv=_cli("estimate", "{tmp}/none", "--ranks", "a,b"),
    ),
    Case(
        "estimate-ranks-0",
        None,
        "--ranks: '0' is not a positive integer",
        argv=_cli("estimate", "{tmp}/none", "--ranks", "8,0"),
    ),
    Case(
        "estimate-batch-negative",
        None,
        "--batch: must be a positive integer, got -4",
        argv=_cli("estimate", "{tmp}/none", "--ranks", "8", "--batch", "-4"),
    ),
    Case(
        "analyze-by-missing",
        None,
        "by: 'lora_r' is not a column of the trials table (did you mean rank?); columns: ",
        argv=_cli("analyze", "{run}", "--by", "lora_r"),
        needs_run=True,
    ),
    Case(
        "analyze-metric-missing",
        None,
        "metric: 'bleu' is not a column",
        argv=_cli("analyze", "{run}", "--metric", "bleu"),
        needs_run=True,
    ),
    Case(
        "analyze-table-without-configuration-column",
        lambda e: (e.tmp / "t.csv").write_text("seed,accuracy\n0,0.7\n1,0.8\n"),
        "by: no configuration column (rank, variant or a setting) in the table; columns: seed, "
        "accuracy; name one with --by",
        argv=_cli("analyze", "{tmp}/t.csv"),
    ),
    Case(
        "analyze-no-source",
        None,
        "SOURCE: not a run folder or a CSV/JSON file",
        argv=_cli("analyze", "{tmp}/none.csv"),
    ),
    # -- the margin of the recommendation: spec, analyze, report (checked before anything loads)
    Case(
        "analysis-margin-text",
        _set("analysis.margin", "abc"),
        "analysis.margin: 'abc' must be a number >= 0 in the metric's units, or a percentage",
    ),
    Case(
        "analysis-margin-negative",
        _set("analysis.margin", -0.5),
        "analysis.margin: -0.5 must be a number >= 0",
    ),
    Case(
        "analysis-margin-100-percent",
        _set("analysis.margin", "100%"),
        "analysis.margin: '100%' must be a number >= 0",
    ),
    Case(
        "analysis-unknown-key",
        _set("analysis.tolerance", 0.1),
        "analysis.tolerance: unknown key (value 0.1)",
    ),
    Case(
        "analyze-margin-text",
        None,
        "--margin: 'abc' must be a number >= 0 in the metric's units, or a percentage",
        argv=_cli("analyze", "{run}", "--margin", "abc"),
        needs_run=True,
    ),
    Case(
        "analyze-margin-negative",
        None,
        "--margin: '-0.1' must be a number >= 0",
        argv=_cli("analyze", "{run}", "--margin=-0.1"),
        needs_run=True,
    ),
    Case(
        "analyze-margin-before-the-source-loads",
        None,
        "--margin: 'two%' must be a number >= 0",
        argv=_cli("analyze", "{tmp}/none.csv", "--margin", "two%"),
    ),
    Case(
        "analyze-margin-and-tolerance",
        None,
        "--tolerance: use --margin; both were given",
        argv=_cli("analyze", "{run}", "--margin", "0.01", "--tolerance", "0.01"),
        needs_run=True,
    ),
    Case(
        "report-margin-percent-too-large",
        None,
        "--margin: '150%' must be a number >= 0",
        argv=_cli("report", "{run}", "--margin", "150%"),
        needs_run=True,
    ),
    Case(
        "init-exists",
        lambda e: (e.tmp / "s.yaml").write_text("mine"),
        "exists (use --force to overwrite)",
        argv=_cli("init", "-o", "{tmp}/s.yaml"),
    ),
    Case(
        "spectrum-energy",
        None,
        "--energy: must be in (0, 1], got 2.0",
        argv=_cli("spectrum", "{tmp}", "--energy", "2"),
    ),
]


@pytest.fixture(scope="session")
def recorded_run(tiny_bert_dir, tiny_csv, tmp_path_factory) -> tuple[Path, dict]:
    """A finished 1-rank x 2-seed run (2 steps each); cases copy it before touching it."""
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, grid={"rank": [2]})
    spec["training"]["max_steps"] = 2
    out = tmp_path_factory.mktemp("recorded") / "run"
    run_sweep(spec, out, backend="inprocess", quiet=True, report=False)
    return out, spec


def _snapshot(run: Path) -> list[tuple]:
    with open_store(run) as store:
        return [(t["id"], t["status"], json.dumps(t["metrics"], sort_keys=True))
                for t in store.trials()]  # fmt: skip


def _check_one_line(err: str, line: str) -> None:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines, "nothing printed"
    assert all(x.startswith("lorasweep: error: ") for x in lines), err
    assert any(line in x for x in lines), f"expected {line!r} in:\n{err}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tiny_bert_dir, tiny_csv, recorded_run, tmp_path, capsys):
    run_dir, run_spec = recorded_run
    spec = copy.deepcopy(run_spec) if case.needs_run else tiny_classification_spec(
        tiny_bert_dir, tiny_csv)  # fmt: skip
    env = Env(tmp=tmp_path, spec=spec, model=tiny_bert_dir, csv=tiny_csv)
    out = tmp_path / "out"
    if case.needs_run:
        shutil.copytree(run_dir, out)
        env.run = out
        before = _snapshot(out)
        listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    if case.setup:
        case.setup(env)
    existed = out.exists()
    argv = (case.argv or _run_argv)(env, out)
    code = main(argv)
    err = capsys.readouterr().err
    _check_one_line(err, case.line)
    assert code == case.exit, err
    if case.needs_run:  # nothing recorded lost, nothing trained
        assert _snapshot(out) == before
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing
    elif not existed:
        assert not out.exists(), "a half-made run folder was left behind"


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


# ------------------------------------------------------------------------------------------
# cases that need more than a table row


def test_foreign_files_are_never_overwritten(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my own report")
    (out / "pareto.png").write_bytes(b"my own plot")
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet"]) == 2
    assert (out / "report.html").read_text() == "my own report"
    assert (out / "pareto.png").read_bytes() == b"my own plot"
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "report.html"]


def test_tensorboard_stays_inside_out(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    spec = tiny_classification_spec(
        tiny_bert_dir, tiny_csv, name="sub/../..", grid={"rank": [2]}, seeds=[0],
        report_to=["tensorboard"],
    )  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    work = tmp_path / "work"
    work.mkdir()
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(work / "out"), "--quiet",
                 "--backend", "inprocess"])  # fmt: skip
    assert code == 2
    assert "name: must be one folder name" in capsys.readouterr().err
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "s.yaml", "work"]  # fmt: skip


def test_a_second_run_on_the_same_folder_is_refused(recorded_run, tmp_path, capsys):
    run_dir, spec = recorded_run
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = _snapshot(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from lorasweep.run.rundir import claim
            with claim(Path({str(out)!r})):
                print("held", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
        code = main(["run", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet",
                     "--backend", "inprocess", "--retry", "failed"])  # fmt: skip
        err = capsys.readouterr().err
        _check_one_line(err, f"is in use by another lorasweep run (pid {holder.pid} on ")
        assert code == 2
    finally:
        holder.communicate("", timeout=30)
    assert _snapshot(out) == before
    # once the other run has ended, the folder can be used again (nothing left to run)
    assert main(["run", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet",
                 "--backend", "inprocess"]) == 0  # fmt: skip
    assert _snapshot(out) == before


def test_adding_a_rank_or_a_seed_keeps_working(recorded_run, tmp_path):
    run_dir, spec = recorded_run
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = {t[0] for t in _snapshot(out)}
    spec = copy.deepcopy(spec)
    spec["grid"]["rank"] = [2, 4]
    spec["seeds"] = [0, 1, 2]
    outcome = run_sweep(spec, out, backend="inprocess", quiet=True, report=False)
    assert outcome.ran == 4 and outcome.skipped == 2
    after = {t[0] for t in _snapshot(out)}
    assert before < after and len(after) == 6


def _new_analyze() -> bool:
    """The non-inferiority ``analyze`` that takes ``margin`` has landed."""
    from lorasweep.analysis.stats import analyze

    return "margin" in inspect.signature(analyze).parameters


def _spy_analyze(monkeypatch) -> list[dict]:
    """Record the keyword arguments every ``stats.analyze`` call gets (``margin`` is dropped
    before the real call while ``analyze`` does not take it yet)."""
    from lorasweep.analysis import stats

    real, seen = stats.analyze, []

    def spy(trials, **kwargs):
        seen.append(dict(kwargs))
        if not _new_analyze():
            kwargs.pop("margin", None)
        return real(trials, **kwargs)

    monkeypatch.setattr(stats, "analyze", spy)
    return seen


def test_changing_the_margin_between_runs_is_not_a_changed_spec(
    recorded_run, tmp_path, monkeypatch, capsys
):
    run_dir, spec = recorded_run
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = _snapshot(out)
    spec = copy.deepcopy(spec)
    spec["analysis"] = {"margin": "2%"}
    outcome = run_sweep(spec, out, backend="inprocess", quiet=True, report=False)
    assert outcome.ran == 0 and outcome.skipped == 2 and _snapshot(out) == before
    with open_store(out) as store:
        assert store.meta()["spec"]["analysis"] == {"margin": "2%"}
    # the CLI: the run's analysis, `report` and `analyze` use it; --margin overrides it
    seen = _spy_analyze(monkeypatch)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    argv = ["run", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet", "--backend",
            "inprocess"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert seen and all(kw.get("margin") == "2%" for kw in seen)
    assert _snapshot(out) == before
    spec["analysis"] = {"margin": 0.5}  # changed again: still the same experiment
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    seen.clear()
    assert main(argv) == 0, capsys.readouterr().err
    assert seen and all(kw.get("margin") == 0.5 for kw in seen)
    seen.clear()
    assert main(["report", str(out)]) == 0, capsys.readouterr().err
    assert seen and all(kw.get("margin") == 0.5 for kw in seen)
    seen.clear()
    assert main(["report", str(out), "--margin", "3%"]) == 0, capsys.readouterr().err
    assert seen and all(kw.get("margin") == "3%" for kw in seen)
    seen.clear()
    assert main(["analyze", str(out)]) == 0 and seen[-1]["margin"] == 0.5
    assert main(["analyze", str(out), "--margin", "0.02"]) == 0 and seen[-1]["margin"] == "0.02"
    assert main(["analyze", str(out), "--tolerance", "0.1"]) == 0
    assert seen[-1]["tolerance"] == 0.1 and "margin" not in seen[-1]  # the deprecated alias
    assert _snapshot(out) == before


@pytest.mark.skipif(not _new_analyze(), reason="needs the analyze that takes margin")
def test_the_margin_reaches_the_recommendation(recorded_run, tmp_path, capsys):
    run_dir, spec = recorded_run
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    spec = copy.deepcopy(spec)
    spec["analysis"] = {"margin": "2%"}
    run_sweep(spec, out, backend="inprocess", quiet=True, report=False)
    for argv in (["analyze", str(out)], ["analyze", str(out), "--margin", "0.5"],
                 ["report", str(out)], ["report", str(out), "--margin", "0"]):  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
    assert (out / "report.html").exists()
    capsys.readouterr()
    for argv, value, relative in ((["--margin", "0.5"], 0.5, False), ([], 0.02, True)):
        assert main(["analyze", str(out), "--json", *argv]) == 0
        margin = json.loads(capsys.readouterr().out)["margin"]
        assert margin["value"] == pytest.approx(value) and margin["relative"] is relative


def test_edited_data_is_refused_and_never_trained_on(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    csv = tmp_path / "reviews.csv"
    shutil.copy(tiny_csv, csv)
    spec = tiny_classification_spec(tiny_bert_dir, csv, grid={"rank": [2]}, seeds=[0])
    spec["training"]["max_steps"] = 2
    out = tmp_path / "run"
    run_sweep(spec, out, backend="inprocess", quiet=True, report=False)
    before = _snapshot(out)
    df = pd.read_csv(csv)
    df.loc[0, "text"] = "an edited sentence"
    df.to_csv(csv, index=False)
    spec["seeds"] = [0, 1]  # a new seed would train on the edited file
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet",
                 "--backend", "inprocess"])  # fmt: skip
    _check_one_line(capsys.readouterr().err, "changed since trials were recorded in")
    assert code == 2 and _snapshot(out) == before


def test_the_fingerprint_is_recorded_with_each_trial(recorded_run):
    run_dir, _ = recorded_run
    with open_store(run_dir) as store:
        fps = {t["environment"].get("data_fingerprint") for t in store.trials()}
        meta = store.meta()
    assert fps == {meta["data_fingerprint"]} and meta["data_fingerprint"]


def test_a_classification_head_of_another_size_is_reinitialized_with_a_note(
    tiny_bert_dir, tiny_csv, tmp_path, capsys
):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    m.save_pretrained(model)
    spec = tiny_classification_spec(model, tiny_csv, grid={"rank": [2]}, seeds=[0])
    spec["training"]["max_steps"] = 1
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"),
                 "--backend", "inprocess"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "the checkpoint's classification head has 3 classes, the data 2" in err
    with open_store(tmp_path / "out") as store:
        assert [t["status"] for t in store.trials()] == ["complete"]


# ------------------------------------------------------------------------------------------
# exit status


def _fail_trials(monkeypatch, ranks: set[int]) -> None:
    import lorasweep.training.trial as trial_mod

    real = trial_mod._run

    def flaky(trial, *a, **kw):
        if trial.rank in ranks:
            raise RuntimeError(f"boom at rank {trial.rank}")
        return real(trial, *a, **kw)

    monkeypatch.setattr(trial_mod, "_run", flaky)


def test_every_trial_failed_exits_non_zero(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    _fail_trials(monkeypatch, {2, 4})
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, seeds=[0])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"),
                 "--backend", "inprocess", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip().splitlines()[-1] == (
        f"lorasweep: error: every trial failed (2 failed); `lorasweep status {tmp_path / 'out'}`"
        " shows why"
    )
    # the report says what is true: no trial to report, and why
    assert main(["report", str(tmp_path / "out")]) == 2
    _check_one_line(capsys.readouterr().err, "no complete trial to report in")


def test_some_failures_are_counted_in_the_last_line(
    tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, capsys
):
    _fail_trials(monkeypatch, {4})
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, seeds=[0])
    spec["training"]["max_steps"] = 1
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"),
                 "--backend", "inprocess", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("1 of 2 trials failed (1 failed)")


# ------------------------------------------------------------------------------------------
# faults of the world: one line, exit 1, never a traceback


def _copy_run(recorded_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(recorded_run[0], out)
    return out


def test_corrupt_store(recorded_run, tmp_path, capsys):
    out = _copy_run(recorded_run, tmp_path)
    (out / "lorasweep.db").write_bytes(b"this is not a database" * 100)
    for p in out.glob("lorasweep.db-*"):
        p.unlink()
    assert main(["status", str(out)]) == 1
    _check_one_line(capsys.readouterr().err, "lorasweep.db is corrupt (file is not a database)")


def test_truncated_store(recorded_run, tmp_path, capsys):
    out = _copy_run(recorded_run, tmp_path)
    with open_store(out) as store:  # fold the WAL into the file, then cut the file
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db = out / "lorasweep.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    assert main(["status", str(out)]) == 1
    _check_one_line(capsys.readouterr().err, "is corrupt")


def test_read_only_out(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    target = tmp_path / "ro" / "out"

    def refuse(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # as on a read-only file system (root ignores
    # chmod, so a real read-only folder is tried below when not root)
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(target), "--quiet",
                 "--backend", "inprocess"])  # fmt: skip
    _check_one_line(capsys.readouterr().err, f"Permission denied: {target}")
    assert code == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_for_real(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code = main(["run", str(tmp_path / "s.yaml"), "--out", str(ro / "out"), "--quiet",
                     "--backend", "inprocess"])  # fmt: skip
    finally:
        ro.chmod(0o755)
    _check_one_line(capsys.readouterr().err, "Permission denied")
    assert code == 1


def test_disk_full_while_recording(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    from lorasweep import store as store_mod

    def full(self, result):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store_mod.Store, "save_result", full)
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, grid={"rank": [2]}, seeds=[0])
    spec["training"]["max_steps"] = 1
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--quiet",
                 "--backend", "inprocess"])  # fmt: skip
    _check_one_line(capsys.readouterr().err, "database or disk is full")
    assert code == 1


def test_no_space_left_while_writing(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    import lorasweep.analysis.report as report_mod

    def full(*a, **kw):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "report.html"))

    monkeypatch.setattr(report_mod, "build_report", full)
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, grid={"rank": [2]}, seeds=[0])
    spec["training"]["max_steps"] = 1
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--quiet",
                 "--backend", "inprocess"])  # fmt: skip
    _check_one_line(capsys.readouterr().err, "No space left on device: ")
    assert code == 1
    with open_store(tmp_path / "out") as store:  # the trial itself is kept
        assert [t["status"] for t in store.trials()] == ["complete"]


def test_status_into_a_closed_pipe(recorded_run, tmp_path):
    out = _copy_run(recorded_run, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for cmd in (["status", str(out)], ["export", str(out)]):
        argv = [sys.executable, "-m", "lorasweep", *cmd]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdout.close()  # as `| head -0` does: the reader is gone before the first write
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert proc.returncode == 141


def test_broken_pipe_in_process(recorded_run, tmp_path, monkeypatch):
    out = _copy_run(recorded_run, tmp_path)

    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return os.open(os.devnull, os.O_WRONLY)

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["status", str(out)]) == 141


def test_failed_trials_written_by_hand_are_reported_truthfully(tmp_path, capsys):
    """`report` on a store whose trials all failed names the failures (no "nothing recorded")."""
    out = tmp_path / "run"
    trial = Trial(config={"task": "classification"}, variant="lora", rank=2, seed=0)
    with open_store(out, create=True) as store:
        store.add_trials([trial])
        store.save_result(TrialResult(trial.id, TrialStatus.FAILED, error="RuntimeError: x"))
    assert main(["report", str(out)]) == 2
    _check_one_line(capsys.readouterr().err, "(trials: 1 failed)")

"""The command line's conventions: --version, help (with defaults) for every option, the builtins
in `init`, a closed pipe ends quietly; other tools' spec keys and table columns are understood
("did you mean", columns read as rank), a table with nothing to group by is refused."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lorasweep import aliases
from lorasweep.analysis import stats
from lorasweep.analysis.tables import column_notes
from lorasweep.cli import main
from lorasweep.cli_args import build_parser, package_version
from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.spec import SpecError, parse_spec
from lorasweep.store import open_store
from lorasweep.tools.starter import BUILTIN_TASKS, builtins_lines
from lorasweep.training.models import BUILTIN_MODELS
from lorasweep.training.sources import BUILTIN_DATASETS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# ----------------------------------------------------------------------------- --version, help


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorasweep {package_version()}"
    assert package_version().count(".") >= 2


def test_every_option_of_every_command_has_help():
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in _subcommands().items()
        for a in p._actions
        if not (a.help or "").strip() or a.help == argparse.SUPPRESS
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("export", ["(default: csv)", "(default: stdout)"]),
        ("estimate", ["(default: 4,8,16,32,64,128,256)", "peft's default for the model type",
                      "(default: 512)", "(default: adamw)"]),
        ("init", ["(default: builtin:minilm-l6)", "(default: sweep.yaml)"]),
        ("run", ["(default: local", "(default: 1)", "(default: 2)"]),
        ("demo", ["(default: lorasweep-demo)"]),
        ("spectrum", ["(default: 0.9)", "(default: group)"]),
        ("analyze", ["--by", "--tune", "--select-on", "(default: train_seconds)"]),
        ("report", ["--margin", "--tune", "--select-on"]),
    ],
)  # fmt: skip
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for piece in shown:
        assert piece in text, (piece, text)


def test_status_help_names_the_json_option(capsys):
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    out = capsys.readouterr().out
    assert "--json" in out and "a run folder" in out


# ----------------------------------------------------------------------------- init


def test_every_builtin_has_a_task():
    assert set(BUILTIN_TASKS) == {*BUILTIN_MODELS, *BUILTIN_DATASETS}


def test_init_lists_the_builtins_in_its_help_and_output(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    help_text = capsys.readouterr().out
    for name in (*BUILTIN_MODELS, *BUILTIN_DATASETS):
        assert name in help_text
    assert builtins_lines()[0] in help_text  # one line, not re-wrapped
    out = tmp_path / "s.yaml"
    assert main(["init", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in BUILTIN_MODELS), printed
    assert "builtin:smollm2-135m (causal-lm)" in out.read_text()  # the spec's header comments
    parse_spec(out)


# ----------------------------------------------------------------------------- pipes


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """A store of 3000 complete trials written by hand: `status` prints more than a pipe holds."""
    out = tmp_path_factory.mktemp("pipe") / "run"
    trials = [Trial(config={"task": "classification"}, variant="lora", rank=8, seed=i)
              for i in range(3000)]  # fmt: skip
    with open_store(out, create=True) as store:
        store.add_trials(trials)
        for t in trials:
            store.save_result(TrialResult(t.id, TrialStatus.COMPLETE, metrics={"accuracy": 0.5}))
    return out


@pytest.mark.parametrize("command", ["status", "export", "analyze"])
def test_a_real_pipe_to_head_ends_quietly(big_run, command, tmp_path):
    code = tmp_path / "code"
    cli = f"{sys.executable} -m lorasweep {command} {big_run}"
    line = f"{cli} | head -1; echo ${{PIPESTATUS[0]}} >{code}"
    proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=ENV,
                          timeout=300)  # fmt: skip
    assert proc.stderr == "", proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    # the command's own status: 0, or 141 (SIGPIPE's) when the reader went away before the end
    assert code.read_text().strip() in ("0", "141")


def test_help_into_a_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "lorasweep", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# ----------------------------------------------------------------------------- other tools' keys

BASE = {"task": "classification", "model": "builtin:minilm-l6",
        "dataset": {"source": "builtin:rotten-tomatoes"}}  # fmt: skip


def _errors(**sections) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, **sections})
    return e.value.errors


@pytest.mark.parametrize(
    ("sections", "line"),
    [
        ({"lora": {"lora_r": 16}}, "lora.lora_r: unknown key (value 16); did you mean lora.rank?"),
        ({"lora": {"r": 16}}, "lora.r: unknown key (value 16); did you mean lora.rank?"),
        ({"lora": {"lora_alpha": 32}},
         "lora.lora_alpha: unknown key (value 32); did you mean lora.alpha?"),
        ({"lora": {"lora_dropout": 0.1}},
         "lora.lora_dropout: unknown key (value 0.1); did you mean lora.dropout?"),
        ({"lora": {"lora_target_modules": ["q"]}},
         "lora.lora_target_modules: unknown key (value ['q']); did you mean lora.target_modules?"),
        ({"lora": {"lora_target": "all"}},
         "lora.lora_target: unknown key (value 'all'); did you mean lora.target_modules?"),
        ({"load_in_4bit": True},
         "load_in_4bit: unknown key (value True); did you mean lora.quantization: 4bit?"),
        ({"lora": {"load_in_4bit": True}},
         "lora.load_in_4bit: unknown key (value True); did you mean lora.quantization: 4bit?"),
        ({"variants": {"q": {"r": 4}}},
         "variants.q.r: unknown key (value 4); did you mean variants.q.rank?"),
        ({"variants": {"d": {"use_dora": True}}},
         "variants.d.use_dora: unknown key (value True); did you mean variants.d.method: dora?"),
        ({"grid": {"lora_r": [8, 16]}},
         "grid.lora_r: unknown key (value [8, 16]); did you mean grid.rank?"),
        ({"grid": {"r": [8, 16]}}, "grid.r: unknown key (value [8, 16]); did you mean grid.rank?"),
        ({"lora_r": 8}, "lora_r: unknown key (value 8); did you mean grid.rank?"),
        ({"sequence_len": 512},
         "sequence_len: unknown key (value 512); did you mean dataset.max_length?"),
        ({"dataset": {"source": "builtin:imdb", "cutoff_len": 256}},
         "dataset.cutoff_len: unknown key (value 256); did you mean dataset.max_length?"),
        ({"micro_batch_size": 4},
         "micro_batch_size: unknown key (value 4); "
         "did you mean training.per_device_train_batch_size?"),
        ({"training": {"micro_batch_size": 4}}, "training.micro_batch_size: unknown key (value 4); "
         "did you mean training.per_device_train_batch_size?"),
        ({"learning_rate": 1e-4},
         "learning_rate: unknown key (value 0.0001); did you mean training.learning_rate?"),
        ({"num_epochs": 3},
         "num_epochs: unknown key (value 3); did you mean training.num_train_epochs?"),
        ({"max_steps": 10}, "max_steps: unknown key (value 10); did you mean training.max_steps?"),
        ({"lora": {"learning_rate": 1e-3}},
         "lora.learning_rate: unknown key (value 0.001); did you mean training.learning_rate?"),
        ({"seed": 1}, "seed: unknown key (value 1); did you mean seeds?"),
        # a plain typo: the closest key of the same section
        ({"analysis": {"margn": 0.01}},
         "analysis.margn: unknown key (value 0.01); did you mean analysis.margin?"),
        ({"modle": "x"}, "modle: unknown key (value 'x'); did you mean model?"),
        ({"dataset": {"source": "builtin:imdb", "text_col": "t"}},
         "dataset.text_col: unknown key (value 't'); did you mean dataset.text_column?"),
    ],
)  # fmt: skip
def test_other_tools_names_get_a_did_you_mean(sections, line):
    assert _errors(**sections) == [line]


def test_a_key_unlike_any_gets_no_guess():
    assert _errors(colour="red") == ["colour: unknown key (value 'red')"]


@pytest.mark.parametrize(
    ("sections", "where"),
    [
        ({"lora": {"target_modules": "all"}}, "lora.target_modules"),
        ({"lora": {"target_modules": ["all"]}}, "lora.target_modules"),
        ({"variants": {"a": {"target_modules": "ALL"}}}, "variants.a.target_modules"),
        ({"grid": {"target_modules": ["attention", "all"]}}, "grid.target_modules[1]"),
    ],
)
def test_all_as_target_modules_means_all_linear(sections, where):
    (line,) = _errors(**sections)
    assert line.startswith(f"{where}: ") and line.endswith("did you mean all-linear?"), line


def test_alias_hints_come_with_the_other_errors():
    errs = _errors(lora={"lora_r": 8}, seeds=[], training={"num_epochs": 1})
    assert "lora.lora_r: unknown key (value 8); did you mean lora.rank?" in errs
    assert any(e.startswith("seeds: needs at least one seed") for e in errs)
    assert any(e.startswith("training.num_epochs: unknown key") for e in errs)


def test_training_aliases_are_not_training_arguments():
    """A training: or grid: key is refused at parse time only when transformers would refuse
    it too; the names that belong under training: are real fields."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert not fields & {*aliases.TRAINING, *aliases.ADAPTER, *aliases.DATASET}
    assert set(aliases.TRAINING.values()) <= fields
    assert set(aliases.TRAINING_NAMES) <= fields


def test_the_cli_prints_the_hint(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("task: classification\nmodel: builtin:minilm-l6\n"
                    "dataset: {source: builtin:rotten-tomatoes}\nlora: {lora_r: 16}\n")  # fmt: skip
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorasweep: error: lora.lora_r: unknown key (value 16); did you mean lora.rank?"]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- analyze: columns


def _csv(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


LORA_R = "lora_r,seed,accuracy\n8,0,0.70\n8,1,0.71\n8,2,0.72\n32,0,0.80\n32,1,0.82\n32,2,0.81\n"


def test_a_lora_r_column_is_read_as_rank(tmp_path, capsys):
    p = _csv(tmp_path, LORA_R)
    df = stats.load_trials_table(p)
    assert "rank" in df and "lora_r" not in df and list(df["rank"]) == [8, 8, 8, 32, 32, 32]
    r = stats.analyze(df)
    assert sorted(g["key"]["rank"] for g in r["groups"]) == [8, 32]
    assert r["best"]["key"] == {"variant": "lora", "rank": 32}
    assert main(["analyze", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flags"][0] == "Column 'lora_r' read as rank."
    assert len(out["groups"]) == 2
    assert main(["analyze", str(p)]) == 0
    assert "Column 'lora_r' read as rank." in capsys.readouterr().out
    # --by takes the table's own name too
    assert main(["analyze", str(p), "--by", "lora_r", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["groups"]) == 2


@pytest.mark.parametrize("name", ["r", "lora_rank", "config.lora_r", "config.r", "config.rank",
                                  "config.peft_config.default.r", "config.peft_config.r",
                                  "params.lora_r"])  # fmt: skip
def test_rank_column_names_of_other_tools(tmp_path, name):
    df = stats.load_trials_table(_csv(tmp_path, LORA_R.replace("lora_r", name, 1)))
    assert list(df["rank"]) == [8, 8, 8, 32, 32, 32]
    assert column_notes(df) == [f"column {name!r} read as rank"]


def test_a_wandb_export_reads_config_columns(tmp_path, capsys):
    p = _csv(tmp_path, "Name,config.lora_r,config.learning_rate,config.seed,config.warmup_steps,"
             "summary.x,accuracy\n"
             "a,8,1e-4,0,10,1,0.70\nb,8,1e-4,1,10,1,0.72\nc,16,1e-4,0,10,1,0.80\n"
             "d,16,1e-4,1,10,1,0.82\ne,8,1e-3,0,10,1,0.75\nf,8,1e-3,1,10,1,0.76\n")  # fmt: skip
    df = stats.load_trials_table(p)
    assert {"rank", "learning_rate", "seed", "warmup_steps"} <= set(df.columns)
    assert "summary.x" in df and "Name" in df  # other columns keep their names
    r = stats.analyze(df)
    keys = {(g["key"]["rank"], g["key"]["learning_rate"]) for g in r["groups"]}
    assert keys == {(8, 1e-4), (16, 1e-4), (8, 1e-3)}
    assert not df.attrs.get("lorasweep_seeds_from_rows")
    assert main(["analyze", str(p), "--json"]) == 0
    flags = json.loads(capsys.readouterr().out)["flags"]
    assert "Column 'config.lora_r' read as rank." in flags
    assert "Column 'config.learning_rate' read as learning_rate." in flags


def test_a_table_without_a_configuration_column_is_refused(tmp_path, capsys):
    p = _csv(tmp_path, "seed,accuracy,train_seconds\n0,0.7,3\n1,0.8,4\n0,0.75,3\n")
    with pytest.raises(ValueError, match="no configuration column"):
        stats.analyze(stats.load_trials_table(p))
    assert main(["analyze", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "lorasweep: error: by: no configuration column (rank, variant or a setting) in the "
        "table; columns: seed, accuracy, train_seconds; name one with --by"
    ]


def test_a_missing_by_column_lists_the_columns(tmp_path, capsys):
    p = _csv(tmp_path, LORA_R)
    assert main(["analyze", str(p), "--by", "lr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "lorasweep: error: by: 'lr' is not a column of the trials table; "
        "columns: rank, seed, accuracy"
    ]


def test_one_configuration_on_purpose_is_fine(tmp_path):
    p = _csv(tmp_path, "rank,accuracy\n8,0.7\n8,0.72\n8,0.71\n")
    r = stats.analyze(stats.load_trials_table(p))
    assert [g["key"] for g in r["groups"]] == [{"variant": "lora", "rank": 8}]
    # a variant column alone, or a setting that varies, is a configuration column too
    p = _csv(tmp_path, "learning_rate,accuracy\n0.1,0.7\n0.1,0.72\n0.01,0.6\n0.01,0.61\n")
    assert len(stats.analyze(stats.load_trials_table(p))["groups"]) == 2


def test_a_named_by_column_still_works_without_configuration_columns(tmp_path):
    p = _csv(tmp_path, "arm,accuracy\na,0.7\na,0.72\nb,0.6\nb,0.61\n")
    assert len(stats.analyze(stats.load_trials_table(p), by="arm")["groups"]) == 2


def test_a_frame_with_rank_keeps_its_own_columns():
    df = pd.DataFrame({"rank": [4, 4, 8, 8], "lora_r": [1, 1, 1, 1], "seed": [0, 1, 0, 1],
                       "accuracy": [0.7, 0.71, 0.8, 0.81]})  # fmt: skip
    prepared = stats.prepare_trials(df)
    assert list(prepared["rank"]) == [4, 4, 8, 8] and "lora_r" in prepared
    assert column_notes(prepared) == []

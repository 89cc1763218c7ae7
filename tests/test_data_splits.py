"""Three-way data: train, eval (validation: curves, rungs, selection) and test (the final
comparison). Carved splits are sized, disjoint, stratified and the same on every call; eval and
test files are used as given (minus rows already in train); every contradictory key is refused
with one line; a trial scores the test split once, after the final eval."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import _minilm_tokenizer_dir, tiny_classification_spec

from lorasweep import records
from lorasweep.cli import main
from lorasweep.plan import dataset_config
from lorasweep.run import datacheck, preflight
from lorasweep.spec import DatasetSpec, SpecError, parse_spec
from lorasweep.training import data, sources


def dspec(source: str | Path, **over: object) -> dict:
    return DatasetSpec(source=str(source), **over).model_dump()


def texts(ds) -> set[str]:
    return set(ds["text"])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_tokenizer_dir())


@pytest.fixture
def reviews(tiny_csv: Path) -> pd.DataFrame:
    return pd.read_csv(tiny_csv)  # 240 distinct texts, 120 of each label


@pytest.fixture
def three_files(tmp_path: Path, reviews: pd.DataFrame) -> dict[str, Path]:
    """train: rows 0-199; eval: rows 190-219 (10 also in train); test: rows 210-239 (10 also
    in eval): as JSON lines, with string labels."""
    df = reviews.sample(frac=1, random_state=0).reset_index(drop=True)
    df["label"] = df["label"].map({0: "neg", 1: "pos"})
    files = {"train": (0, 200), "eval": (190, 220), "test": (210, 240)}
    out = {}
    for name, (a, b) in files.items():
        out[name] = tmp_path / f"{name}.jsonl"
        df.iloc[a:b].to_json(out[name], orient="records", lines=True)
    return out


# ---------------------------------------------------------------- the spec's keys and refusals


REFUSED = [
    ({"eval_split": "validation"}, "dataset.eval_split: 'validation': a local file has no "
     "splits; use dataset.eval_file"),
    ({"test_split": "test"}, "dataset.test_split: 'test': a local file has no splits; use "
     "dataset.test_file"),
    ({"source": "builtin:rotten-tomatoes", "eval_split": "validation"}, "dataset.eval_split: "
     "'validation': builtin:rotten-tomatoes has no splits; use dataset.eval_fraction"),
    ({"source": "builtin:imdb", "test_split": "test"}, "dataset.test_split: 'test': "
     "builtin:imdb has no splits; use dataset.test_fraction"),
    ({"source": "someone/data", "eval_file": "e.csv"}, "dataset.eval_file: 'e.csv' needs a "
     "local data file as dataset.source (got 'someone/data')"),
    ({"source": "builtin:imdb", "test_file": "t.csv"}, "dataset.test_file: 't.csv' needs a "
     "local data file as dataset.source (got 'builtin:imdb')"),
    ({"test_fraction": 0.2, "test_file": "t.csv"}, "dataset.test_fraction: 0.2 cannot be used "
     "with dataset.test_file"),
    ({"source": "someone/data", "test_fraction": 0.2, "test_split": "test"},
     "dataset.test_fraction: 0.2 cannot be used with dataset.test_split"),
    ({"eval_file": "e.csv", "eval_fraction": 0.2}, "dataset.eval_fraction: 0.2 cannot be used "
     "with dataset.eval_file 'e.csv'"),
    ({"eval_fraction": 0.5, "test_fraction": 0.5}, "dataset.test_fraction: 0.5 with "
     "dataset.eval_fraction 0.5 leaves no training rows (sum 1); the sum must be < 1"),
    ({"test_fraction": 0.95}, "dataset.test_fraction: 0.95 with dataset.eval_fraction 0.1 "
     "leaves no training rows"),
    ({"max_test_examples": 5}, "dataset.max_test_examples: 5 needs a test split"),
    ({"source": "someone/data", "test_split": "train"}, "dataset.test_split: 'train' is also "
     "the train or eval split"),
    ({"source": "someone/data", "eval_split": "x", "test_split": "x"}, "dataset.test_split: "
     "'x' is also the train or eval split"),
    ({"eval_file": "e.csv", "test_file": "e.csv"}, "dataset.test_file: 'e.csv' is also the "
     "source or the eval file"),
    ({"test_fraction": 0}, "dataset.test_fraction: Input should be greater than 0 (got 0)"),
    ({"max_test_examples": 0, "test_fraction": 0.1}, "dataset.max_test_examples: Input should "
     "be greater than 0 (got 0)"),
]  # fmt: skip


@pytest.mark.parametrize("over,line", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_contradictory_split_keys_are_refused_with_one_line(over, line):
    ds = {"source": "reviews.csv", **over}
    with pytest.raises(SpecError) as e:
        parse_spec({"task": "classification", "model": "m", "dataset": ds})
    assert len(e.value.errors) == 1, e.value.errors
    assert e.value.errors[0].startswith(line), e.value.errors


def test_two_refusals_give_two_lines():
    ds = {"source": "r.csv", "eval_split": "v", "test_fraction": 0.2, "test_file": "t.csv"}
    with pytest.raises(SpecError) as e:
        parse_spec({"task": "classification", "model": "m", "dataset": ds})
    keys = sorted(line.split(":")[0] for line in e.value.errors)
    assert keys == ["dataset.eval_split", "dataset.test_fraction"]


@pytest.mark.parametrize(
    "ds",
    [
        {"source": "r.csv", "test_fraction": 0.2, "max_test_examples": 10},
        {"source": "r.csv", "eval_file": "e.csv", "test_file": "t.csv"},
        {"source": "r.csv", "eval_file": "e.csv", "test_fraction": 0.95},  # eval is not carved
        {"source": "someone/data", "eval_split": "validation", "test_split": "test"},
        {"source": "builtin:rotten-tomatoes", "test_fraction": 0.1},
    ],
)
def test_consistent_split_keys_parse(ds):
    parse_spec({"task": "classification", "model": "m", "dataset": ds})


def test_unset_keys_stay_out_of_trial_configs_and_ids():
    spec = {"task": "classification", "model": "m", "dataset": {"source": "r.csv"}}
    plain = parse_spec(spec).trials()[0]
    assert not {"test_fraction", "eval_file", "test_file"} & set(plain.config["dataset"])
    spec["dataset"]["test_fraction"] = 0.2
    with_test = parse_spec(spec).trials()[0]
    assert with_test.config["dataset"]["test_fraction"] == 0.2 and with_test.id != plain.id


def test_the_cli_prints_one_line_and_exits_2(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv)
    for over, line in [
        ({"eval_split": "validation"}, "dataset.eval_split: 'validation': a local file"),
        ({"test_fraction": 0.1, "test_file": "t.csv"}, "dataset.test_fraction: 0.1 cannot"),
        ({"eval_file": str(tmp_path / "nope.csv")}, "dataset.eval_file: file not found: "),
    ]:
        s = copy.deepcopy(spec)
        s["dataset"].update(over)
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(s))
        out = tmp_path / "out"
        code = main(["run", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet",
                     "--backend", "inprocess"])  # fmt: skip
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("lorasweep: error: "), err
        assert line in err[0] and not out.exists()


# ---------------------------------------------------------------- carved splits


def test_three_way_split_sizes_disjoint_stratified_and_deterministic(tiny_csv: Path):
    d = dspec(tiny_csv, test_fraction=0.2)
    train, evalset, test, dedup = data.split_three(d, "classification")
    assert (len(train), len(evalset), len(test)) == (168, 24, 48)  # 240 - ceil(24) - ceil(48)
    assert not texts(train) & texts(evalset) and not texts(train) & texts(test)
    assert not texts(evalset) & texts(test)
    assert Counter(test["label"]) == {0: 24, 1: 24} and Counter(evalset["label"]) == {0: 12, 1: 12}
    assert test.features["label"] == train.features["label"]
    again = data.split_three(d, "classification")
    assert [ds["text"] for ds in again[:3]] == [ds["text"] for ds in (train, evalset, test)]
    # adding a test split keeps the eval examples: the test rows come out of train
    tr2, ev2, te2, _ = data.split_three(dspec(tiny_csv), "classification")
    assert te2 is None and list(ev2["text"]) == list(evalset["text"])
    assert texts(train) | texts(test) == texts(tr2)
    assert dedup == {"train_duplicates_dropped": 0, "eval_in_train_dropped": 0}


def test_max_test_examples_is_a_seeded_subsample(tiny_csv: Path):
    full = data.split_three(dspec(tiny_csv, test_fraction=0.2), "classification")[2]
    small = data.split_three(dspec(tiny_csv, test_fraction=0.2, max_test_examples=10),
                             "classification")[2]  # fmt: skip
    again = data.split_three(dspec(tiny_csv, test_fraction=0.2, max_test_examples=10),
                             "classification")[2]  # fmt: skip
    assert len(small) == 10 and texts(small) <= texts(full) and small["text"] == again["text"]
    other = data.split_three(dspec(tiny_csv, test_fraction=0.2, max_test_examples=10,
                                   split_seed=1), "classification")[2]  # fmt: skip
    assert other["text"] != small["text"]


def test_duplicates_are_dropped_before_the_three_way_split(tmp_path: Path, reviews):
    csv = tmp_path / "x3.csv"
    pd.concat([reviews] * 3).to_csv(csv, index=False)
    train, evalset, test, dedup = data.split_three(dspec(csv, test_fraction=0.2), "classification")
    assert (len(train), len(evalset), len(test)) == (168, 24, 48)
    assert not (texts(train) & texts(test)) and not (texts(evalset) & texts(test))
    assert dedup["train_duplicates_dropped"] == 480


def test_plain_text_carves_eval_and_test_from_the_tail(tiny_text: Path, tmp_path: Path):
    train, evalset, test, _ = data.split_three(dspec(tiny_text, test_fraction=0.2), "causal-lm")
    whole = tiny_text.read_text()
    parts = [train["text"][0], test["text"][0], evalset["text"][0]]
    assert "".join(parts) == whole  # train | test | eval, in order, nothing lost or shared
    assert abs(len(parts[1]) - 0.2 * len(whole)) <= 2 and abs(len(parts[2]) - 0.1 * len(whole)) <= 2
    no_test = data.split_three(dspec(tiny_text), "causal-lm")
    assert no_test[2] is None and no_test[1]["text"] == evalset["text"]
    other = tmp_path / "other.txt"  # an eval file: the test split is the tail of the source
    other.write_text("some other text entirely")
    d = dspec(tiny_text, eval_file=str(other), test_fraction=0.2)
    train, evalset, test, _ = data.split_three(d, "causal-lm")
    assert list(evalset["text"]) == ["some other text entirely"]
    assert train["text"][0] + test["text"][0] == whole
    assert abs(len(test["text"][0]) - 0.2 * len(whole)) <= 2


def test_real_rotten_tomatoes_with_a_test_fraction():
    d = dspec("builtin:rotten-tomatoes", test_fraction=0.1)
    train, evalset, test, dedup = data.split_three(d, "classification")
    n = len(train) + len(evalset) + len(test)
    assert len(evalset) == len(test) == data.carved_rows(0.1, n) and len(train) == n - 2 * 853
    assert not texts(train) & texts(evalset) and not texts(train) & texts(test)
    assert not texts(evalset) & texts(test)
    assert abs(sum(test["label"]) / len(test) - sum(train["label"]) / len(train)) < 0.01
    assert datacheck.check_rows(d, "classification") == []


def test_shakespeare_instruct_builds_a_test_split():
    d = dspec("builtin:shakespeare-instruct", format="instruction", max_train_examples=20,
              max_eval_examples=5, test_fraction=0.1, max_test_examples=6)  # fmt: skip
    train, evalset, test, _ = data.split_three(d, "causal-lm")
    assert (len(train), len(evalset), len(test)) == (20, 5, 6)
    outs = [set(ds["output"]) for ds in (train, evalset, test)]
    assert not (outs[0] & outs[2]) and not (outs[1] & outs[2])


def test_a_hub_dataset_takes_its_named_test_split(monkeypatch):
    import datasets

    def split(name: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": [f"{name} {i}" for i in range(20)],
                                           "label": [i % 2 for i in range(20)]})  # fmt: skip

    dd = datasets.DatasetDict({n: split(n) for n in ("train", "validation", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    _, ev, te, _ = data.split_three(dspec("someone/data", test_split="test"), "classification")
    assert ev["text"][0].startswith("validation") and te["text"][0].startswith("test")
    # no validation split: eval is carved from train when "test" is the test split
    del dd["validation"]
    tr, ev, te, _ = data.split_three(dspec("someone/data", test_split="test"), "classification")
    assert (len(tr), len(ev), len(te)) == (18, 2, 20) and ev["text"][0].startswith("train")
    # without any test split the published test split stays the eval split (as before)
    _, ev, te, _ = data.split_three(dspec("someone/data"), "classification")
    assert te is None and ev["text"][0].startswith("test")
    with pytest.raises(data.DataError, match="dataset.test_split: no split 'tst' in"):
        data.split_three(dspec("someone/data", test_split="tst"), "classification")


# ---------------------------------------------------------------- eval and test files


def test_eval_and_test_files_are_used_as_given(three_files, tmp_path: Path):
    d = dspec(three_files["train"], eval_file=str(three_files["eval"]),
              test_file=str(three_files["test"]))  # fmt: skip
    train, evalset, test, dedup = data.split_three(d, "classification")
    given = {k: pd.read_json(p, lines=True) for k, p in three_files.items()}
    assert texts(train) == set(given["train"]["text"])
    assert texts(evalset) == set(given["eval"]["text"]) - texts(train)  # 10 also in train
    assert texts(test) == set(given["test"]["text"]) - texts(train) - texts(evalset)
    assert (len(train), len(evalset), len(test)) == (200, 20, 20)
    assert dedup == {"train_duplicates_dropped": 0, "eval_in_train_dropped": 10,
                     "test_in_train_or_eval_dropped": 10}  # fmt: skip
    names = train.features["label"].names
    for ds, df in ((evalset, given["eval"]), (test, given["test"])):  # labels matched by name
        want = dict(zip(df["text"], df["label"]))
        assert all(names[y] == want[t] for t, y in zip(ds["text"], ds["label"]))
    assert datacheck.check_rows(d, "classification") == []


def test_integer_labels_of_an_eval_file_map_to_the_training_labels(tmp_path: Path, reviews):
    df = reviews.sample(frac=1, random_state=0).assign(label=lambda f: f["label"].map({0: 3, 1: 7}))
    df.iloc[:200].to_csv(tmp_path / "tr.csv", index=False)
    df.iloc[200:].to_csv(tmp_path / "ev.csv", index=False)
    d = dspec(tmp_path / "tr.csv", eval_file=str(tmp_path / "ev.csv"))
    train, evalset, _, _ = data.split_three(d, "classification")
    names = train.features["label"].names
    assert names == ["3", "7"] and set(evalset["label"]) == {0, 1}
    want = dict(zip(df["text"], df["label"]))
    assert all(names[y] == str(want[t]) for t, y in zip(evalset["text"], evalset["label"]))
    df.iloc[200:].assign(label=9).to_csv(tmp_path / "ev.csv", index=False)
    with pytest.raises(data.DataError, match="dataset.eval_file: label '9' of the eval split"):
        data.split_three(d, "classification")
    line = "dataset.eval_file: label '9' of "
    assert any(x.startswith(line) for x in datacheck.check_rows(d, "classification"))


def test_fingerprint_covers_the_eval_and_test_files(three_files, tmp_path: Path):
    src = three_files["train"]
    alone = sources.source_fingerprint(dspec(src))
    assert alone == hashlib.sha256(src.read_bytes()).hexdigest()[:16]  # as before the keys
    d = dspec(src, eval_file=str(three_files["eval"]), test_file=str(three_files["test"]))
    fp = sources.source_fingerprint(d)
    assert fp != alone
    swapped = dspec(src, eval_file=str(three_files["test"]), test_file=str(three_files["eval"]))
    assert sources.source_fingerprint(swapped) != fp  # the role counts
    three_files["test"].write_text(three_files["test"].read_text().replace("neg", "pos", 1))
    assert sources.source_fingerprint(d) != fp


def test_cache_holds_the_test_split_under_one_key(tiny_csv: Path, tmp_path: Path, tokenizer):
    d = dspec(tiny_csv, test_fraction=0.2, max_length=16)
    key = data.prepared_cache_key(d, "classification", "m", "f")
    assert key == data.prepared_cache_key(dataset_config(d), "classification", "m", "f")
    assert key != data.prepared_cache_key(dspec(tiny_csv, max_length=16), "classification",
                                          "m", "f")  # fmt: skip
    plain = dspec(tiny_csv, max_length=16)  # no new keys: the key of earlier versions
    old = {"dataset": {k: v for k, v in plain.items() if v is not None or k not in
                       ("test_fraction", "test_split", "eval_file", "test_file",
                        "max_test_examples")}, "task": "classification", "model": "m",
           "v": 2, "fingerprint": "f"}  # fmt: skip
    assert data.prepared_cache_key(plain, "classification", "m", "f") == hashlib.sha256(
        records.canonical_json(old).encode()).hexdigest()[:16]  # fmt: skip
    cache = tmp_path / "cache"
    tr, ev, te, info = data.prepare_splits(d, "classification", "m", tokenizer, cache)
    assert (len(tr), len(ev), len(te)) == (168, 24, 48) and info["num_labels"] == 2
    assert (next(cache.glob("data-*")) / "test").is_dir()
    tr2, ev2, te2, _ = data.prepare_splits(dataset_config(d), "classification", "m", tokenizer,
                                           cache)  # fmt: skip
    assert te2["input_ids"] == te["input_ids"] and len(list(cache.glob("data-*"))) == 1
    assert len(data.prepare(d, "classification", "m", tokenizer, cache)) == 3  # (train, eval, info)


# ---------------------------------------------------------------- pre-flight checks


def _spec(source: Path, **over: object):
    return parse_spec({"task": "classification", "model": "m",
                       "dataset": {"source": str(source), **over}})  # fmt: skip


def test_preflight_checks_the_eval_and_test_files(three_files, tmp_path: Path, reviews):
    src, ev, te = three_files["train"], three_files["eval"], three_files["test"]
    assert preflight.check_dataset(_spec(src, eval_file=str(ev), test_file=str(te))) == []
    missing = preflight.check_dataset(_spec(src, test_file=str(tmp_path / "t.jsonl")))
    assert missing == [f"dataset.test_file: file not found: {str(tmp_path / 't.jsonl')!r}"]
    (tmp_path / "e.txt.gz").write_text("x")
    assert preflight.check_dataset(_spec(src, eval_file=str(tmp_path / "e.txt.gz"))) == [
        "dataset.eval_file: unsupported file type '.gz' (use .csv, .jsonl, .json, .parquet, .txt)"
    ]
    reviews.rename(columns={"text": "sentence"}).to_csv(tmp_path / "e.csv", index=False)
    lines = preflight.check_dataset(_spec(src, eval_file=str(tmp_path / "e.csv")))
    assert lines == [f"dataset.text_column: column 'text' not in {tmp_path / 'e.csv'} "
                     "(dataset.eval_file) (columns: sentence, label)"]  # fmt: skip


def test_datacheck_finds_files_with_nothing_left_and_empty_cells(three_files, tmp_path: Path):
    src = three_files["train"]
    inside = tmp_path / "inside.jsonl"  # every row also in train
    inside.write_text("".join(src.read_text().splitlines(keepends=True)[:5]))
    lines = datacheck.check_rows(dspec(src, test_file=str(inside)), "classification")
    assert lines == [f"dataset.test_file: every row of {str(inside)!r} is also in dataset.source "
                     "or dataset.eval_file; none is left to score (rows in train are dropped "
                     "from the eval and test splits)"]  # fmt: skip
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "", "label": "pos"}) + "\n"
                     + json.dumps({"text": "fine words", "label": "neg"}) + "\n")  # fmt: skip
    lines = datacheck.check_rows(dspec(src, eval_file=str(blank)), "classification")
    assert lines == [f"dataset.text_column: 1 empty or missing cell in column 'text' of "
                     f"{str(blank)!r}; first: line 1"]  # fmt: skip


def test_datacheck_sizes_the_carved_test_split(tmp_path: Path, reviews):
    # 20 rows, 4 classes of 5: eval 2 rows and test 4 rows cannot hold one row per class
    small = reviews.head(20).assign(label=[0, 1, 2, 3] * 5)
    small.to_csv(tmp_path / "s.csv", index=False)
    assert datacheck.check_rows(dspec(tmp_path / "s.csv"), "classification") == [
        f"dataset.source: {str(tmp_path / 's.csv')!r} has 20 rows, too few for a stratified "
        "split with dataset.eval_fraction 0.1: eval gets ceil(20 x 0.1) = 2 and train 18 rows, "
        "and each needs at least one row per class (4 classes)"
    ]
    small.assign(label=[0, 1] * 10).head(20).to_csv(tmp_path / "t.csv", index=False)
    line = datacheck.check_rows(dspec(tmp_path / "t.csv", test_fraction=0.1), "classification")
    assert line == []
    small.assign(label=[0] * 18 + [1] * 2).to_csv(tmp_path / "u.csv", index=False)
    (line,) = datacheck.check_rows(dspec(tmp_path / "u.csv", test_fraction=0.2), "classification")
    assert "dataset.eval_fraction 0.1 and dataset.test_fraction 0.2: " in line
    assert line.endswith("every class needs at least 3 rows (class 1 has 2)")
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = dspec(tmp_path / "p.jsonl", format="prompt-completion", eval_fraction=0.4,
              test_fraction=0.5)  # fmt: skip
    (line,) = datacheck.check_rows(d, "causal-lm")
    assert line.endswith("eval gets ceil(5 x 0.4) = 2, test ceil(5 x 0.5) = 3, leaving no "
                         "training rows")  # fmt: skip


# ---------------------------------------------------------------- a trial scores the test split


def test_a_trial_records_test_metrics_and_outcomes(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    from lorasweep.records import TrialStatus, decode_outcomes
    from lorasweep.run.sweep import run_sweep
    from lorasweep.store import open_store
    from lorasweep.training.trial import train_trial

    spec = tiny_classification_spec(tiny_bert_dir, tiny_csv, grid={"rank": [2]}, seeds=[0])
    spec["dataset"].update(test_fraction=0.2, max_test_examples=30)
    spec["training"]["max_steps"] = 2
    run_sweep(spec, tmp_path / "r", backend="inprocess", quiet=True, report=False)
    assert "168 train, 24 eval (validation: curves, pruning, selection) and 30 test" in (
        capsys.readouterr().err
    )
    with open_store(tmp_path / "r") as store:
        (row,) = store.trials()
    assert row["status"] == "complete" and 0 <= row["metrics"]["test_accuracy"] <= 1
    trial = parse_spec(spec).trials()[0]
    res = train_trial(trial, tmp_path / "w", cache_root=tmp_path / "r" / "cache")
    assert res.status == TrialStatus.COMPLETE, res.error
    m = res.metrics
    assert {"test_accuracy", "test_f1", "test_loss", "test_seconds", "eval_seconds"} <= set(m)
    assert "test_majority_rate" not in m and m["test_accuracy"] == row["metrics"]["test_accuracy"]
    correct = decode_outcomes(res.artifacts["test_outcomes"])["correct"]
    assert len(correct) == 30 and correct.mean() == pytest.approx(m["test_accuracy"])
    assert len(decode_outcomes(res.artifacts["eval_outcomes"])["correct"]) == 24
    assert not any(k.startswith("test") for k in res.curves)  # curves stay on validation


def test_a_causal_lm_trial_records_test_perplexity(tiny_llama_dir, tiny_text, tmp_path):
    from lorasweep.records import decode_outcomes
    from lorasweep.training.trial import train_trial

    spec = parse_spec({
        "task": "causal-lm", "model": str(tiny_llama_dir),
        "dataset": {"source": str(tiny_text), "max_length": 32, "test_fraction": 0.2},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4},
        "lora": {"target_modules": ["q_proj", "v_proj"]}, "grid": {"rank": [2]},
    })  # fmt: skip
    res = train_trial(spec.trials()[0], tmp_path / "w", cache_root=tmp_path / "cache")
    assert res.error is None, res.error
    m = res.metrics
    assert m["test_perplexity"] > 1 and m["test_tokens"] > 0 and "test_loss" in m
    out = decode_outcomes(res.artifacts["test_outcomes"])
    assert int(out["tokens"].sum()) == m["test_tokens"]


def test_an_edited_test_file_is_refused(tiny_bert_dir, three_files, tmp_path, capsys):
    from lorasweep.run.sweep import run_sweep

    spec = tiny_classification_spec(tiny_bert_dir, three_files["train"], grid={"rank": [2]},
                                    seeds=[0])  # fmt: skip
    spec["dataset"].update(eval_file=str(three_files["eval"]), test_file=str(three_files["test"]))
    spec["training"]["max_steps"] = 1
    run_sweep(spec, tmp_path / "r", backend="inprocess", quiet=True, report=False)
    assert "dropped 10 eval rows also in train and 10 test rows also in train or eval" in (
        capsys.readouterr().err
    )
    three_files["test"].write_text(three_files["test"].read_text().replace("neg", "pos", 1))
    spec["seeds"] = [0, 1]  # a new seed would be scored on the edited test file
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "r"), "--quiet",
                 "--backend", "inprocess"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "changed since trials were recorded in" in err, err

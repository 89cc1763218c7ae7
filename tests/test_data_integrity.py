"""Data integrity: content fingerprints key the tokenized cache, rows are de-duplicated before the
split, and check_rows finds every bad row of a local file before any weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import _minilm_tokenizer_dir

from lorasweep.run import datacheck
from lorasweep.spec import DatasetSpec
from lorasweep.training import data, sources


def dspec(source: str | Path, **over: object) -> dict:
    return DatasetSpec(source=str(source), **over).model_dump()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_tokenizer_dir())


@pytest.fixture
def reviews(tiny_csv: Path) -> pd.DataFrame:
    return pd.read_csv(tiny_csv)


# ---------------------------------------------------------------- fingerprint and cache key


def test_fingerprint_follows_bytes_not_path(tmp_path: Path):
    big = tmp_path / "a.csv"
    body = b"text,label\n" + b"some words here,1\n" * 100_000  # 1.8 MB: more than one chunk
    big.write_bytes(body)
    fp = sources.source_fingerprint(dspec(big))
    assert fp is not None and len(fp) == 16 and int(fp, 16) >= 0
    copy = tmp_path / "elsewhere" / "b.csv"
    copy.parent.mkdir()
    shutil.copy(big, copy)
    assert sources.source_fingerprint(dspec(copy)) == fp
    big.write_bytes(body[:-2] + b"0\n")  # one byte of the last row, in the second MiB
    assert sources.source_fingerprint(dspec(big)) != fp


def test_fingerprint_of_builtins_and_hub_ids():
    rt = sources.source_fingerprint(dspec("builtin:rotten-tomatoes"))
    assert rt is not None and rt == sources.source_fingerprint(dspec("builtin:imdb"))  # one CSV
    plain = sources.source_fingerprint(dspec("builtin:shakespeare"))
    instruct = sources.source_fingerprint(dspec("builtin:shakespeare-instruct"))
    assert None not in (plain, instruct) and plain != instruct  # the generator version counts
    assert sources.source_fingerprint(dspec("someone/some-dataset")) is None
    with pytest.raises(data.DataError, match="dataset.source: unknown builtin 'builtin:nope'"):
        sources.source_fingerprint(dspec("builtin:nope"))


def test_cache_key_keeps_hub_keys_and_follows_the_fingerprint():
    d = dspec("someone/some-dataset")
    assert data.prepared_cache_key(d, "classification", "m") == data.prepared_cache_key(
        d, "classification", "m", None
    )
    keys = {data.prepared_cache_key(d, "classification", "m", fp) for fp in (None, "a", "b")}
    assert len(keys) == 3


def test_edited_csv_is_tokenized_again(tmp_path: Path, tiny_csv: Path, tokenizer):
    """The cache is keyed by content: an edit re-tokenizes, an unchanged file reuses the cache."""
    csv = tmp_path / "reviews.csv"
    shutil.copy(tiny_csv, csv)
    cache = tmp_path / "cache"
    d = dspec(csv, max_length=16)
    train, _, info = data.prepare(d, "classification", "m", tokenizer, cache)
    assert info["fingerprint"] == sources.source_fingerprint(d)
    assert json.loads(next(cache.glob("data-*/info.json")).read_text())["fingerprint"]
    _, _, again = data.prepare(d, "classification", "m", tokenizer, cache)
    assert again == info and len(list(cache.glob("data-*"))) == 1

    df = pd.read_csv(csv)
    df["text"] = "zebra " + df["text"]
    df.to_csv(csv, index=False)
    train2, eval2, info2 = data.prepare(d, "classification", "m", tokenizer, cache)
    assert info2["fingerprint"] != info["fingerprint"]
    assert len(list(cache.glob("data-*"))) == 2
    zebra = tokenizer.convert_tokens_to_ids("zebra")
    assert all(ids[1] == zebra for ids in [*train2["input_ids"], *eval2["input_ids"]])
    assert not any(ids[1] == zebra for ids in train["input_ids"])


def test_a_fingerprint_from_before_an_edit_is_refused(tmp_path: Path, tiny_csv: Path, tokenizer):
    """A trial given the parent's fingerprint never tokenizes other content under its key."""
    d = dspec(tiny_csv, max_length=16)
    with pytest.raises(data.DataError, match=r"dataset.source: .* changed since the sweep"):
        data.prepare(d, "classification", "m", tokenizer, tmp_path, fingerprint="0" * 16)
    assert not list(tmp_path.glob("data-*"))


# ---------------------------------------------------------------- de-duplication


def test_rows_repeated_three_times_stay_out_of_eval(tmp_path: Path, reviews, tokenizer):
    csv = tmp_path / "x3.csv"
    pd.concat([reviews] * 3).to_csv(csv, index=False)
    d = dspec(csv, max_length=16)
    train, evalset = data.split_and_subsample(d, "classification")
    assert (len(train), len(evalset)) == (216, 24)
    assert not set(train["text"]) & set(evalset["text"])
    _, _, info = data.prepare(d, "classification", "m", tokenizer, None)
    assert info["dedup"] == {"train_duplicates_dropped": 480, "eval_in_train_dropped": 0}


def test_a_source_eval_split_loses_rows_that_are_in_train():
    from datasets import Dataset

    train = Dataset.from_dict({"text": ["a", "b", "a", "c"], "label": [0, 1, 0, 1]})
    evalset = Dataset.from_dict({"text": ["b", "d", "c", "e"], "label": [1, 0, 1, 0]})
    tr, ev, stats = sources.deduplicate(train, evalset, ["text"])
    assert tr["text"] == ["a", "b", "c"] and ev["text"] == ["d", "e"]
    assert (stats["train_duplicates_dropped"], stats["eval_in_train_dropped"]) == (1, 2)


def test_format_rows_are_duplicates_only_when_equal_in_every_format_column(tmp_path: Path):
    rows = [{"instruction": "i", "input": "", "output": f"o{i % 5}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = dspec(tmp_path / "d.jsonl", format="instruction", eval_fraction=0.2)
    assert data.dedup_columns(d, "causal-lm") == ["instruction", "input", "output"]
    train, evalset, stats = data._split_and_subsample(d, "causal-lm")
    assert stats["train_duplicates_dropped"] == 35 and (len(train), len(evalset)) == (4, 1)
    assert not set(train["output"]) & set(evalset["output"])


def test_builtin_reviews_are_deduplicated_by_the_common_step():
    raw, _ = data.load_raw(dspec("builtin:imdb"), "classification")
    train, _, stats = sources.deduplicate(raw, None, ["text"])
    assert stats["train_duplicates_dropped"] == 96  # IMDB texts that occur twice in the package
    assert len(set(train["text"])) == len(train) == 25_000 - 96


# ---------------------------------------------------------------- check_rows


def one_line(d: dict, task: str = "classification", **kw: object) -> str:
    lines = datacheck.check_rows(d, task, **kw)
    assert len(lines) == 1, lines
    return lines[0]


def test_good_files_builtins_and_hub_ids_pass(tiny_csv: Path, tiny_text: Path):
    assert datacheck.check_rows(dspec(tiny_csv), "classification") == []
    assert datacheck.check_rows(dspec(tiny_text), "causal-lm") == []
    assert datacheck.check_rows(dspec("builtin:rotten-tomatoes"), "classification") == []
    assert datacheck.check_rows(dspec("someone/some-dataset"), "classification") == []


def test_label_column_equal_to_text_column(tiny_csv: Path):
    line = one_line(dspec(tiny_csv, label_column="text"))
    assert line.startswith("dataset.label_column: is the text column ('text'")


def test_missing_column_lists_the_columns(tiny_csv: Path):
    line = one_line(dspec(tiny_csv, text_column="review"))
    assert line == f"dataset.text_column: column 'review' not in {str(tiny_csv)!r} " + (
        "(columns: text, label)"
    )


def test_empty_text_cells_are_counted_with_the_first_row(tmp_path: Path, reviews, monkeypatch):
    reviews.loc[[4, 9, 200], "text"] = ""
    reviews.loc[10, "text"] = "   "
    reviews.to_csv(tmp_path / "e.csv", index=False)
    line = one_line(dspec(tmp_path / "e.csv"))
    assert line.startswith("dataset.text_column: 4 empty or missing cells in column 'text'")
    assert line.endswith("first: data row 5 (1-based, header not counted)")
    monkeypatch.setattr(datacheck, "_CHECK_BATCH_ROWS", 3)  # read in small pieces: the same answer
    datacheck._scan_cached.cache_clear()
    assert one_line(dspec(tmp_path / "e.csv")) == line


def test_non_text_cells_name_the_value(tmp_path: Path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(40)]
    rows[2]["text"], rows[30]["text"] = 5, ["a list"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line(dspec(tmp_path / "t.jsonl"))
    assert line.startswith("dataset.text_column: 2 cells that are not text in column 'text'")
    assert line.endswith("first: line 3, value 5")


def test_empty_label_cells(tmp_path: Path, reviews):
    reviews["label"] = reviews["label"].astype(object)
    reviews.loc[[7, 8], "label"] = None
    reviews.to_csv(tmp_path / "l.csv", index=False)
    line = one_line(dspec(tmp_path / "l.csv"))
    assert line.startswith("dataset.label_column: 2 empty or missing cells in column 'label'")
    assert "first: data row 8 " in line


def test_a_single_class(tmp_path: Path, reviews):
    reviews.assign(label="pos").to_csv(tmp_path / "s.csv", index=False)
    line = one_line(dspec(tmp_path / "s.csv"))
    assert line.startswith("dataset.label_column: one class only ('pos') in column 'label'")


def test_too_few_rows_for_a_stratified_split_counts_after_dedup(tmp_path: Path, reviews):
    # 8 distinct rows, each three times: 24 rows, but the split sees 8 with 4 classes, 2 each:
    # eval gets ceil(8 x 0.1) = 1 row, fewer than the 4 classes
    small = reviews.head(8).assign(label=[0, 0, 1, 1, 2, 2, 3, 3])
    pd.concat([small] * 3).to_csv(tmp_path / "f.csv", index=False)
    line = one_line(dspec(tmp_path / "f.csv"))
    assert line.startswith(f"dataset.source: {str(tmp_path / 'f.csv')!r} has 8 rows after ")
    assert "dropping 16 duplicates" in line and "dataset.eval_fraction 0.1" in line
    assert "eval gets ceil(8 x 0.1) = 1 and train 7 rows" in line
    # the split itself fails, as predicted
    with pytest.raises(ValueError, match="test_size = 1 should be greater or equal"):
        data.split_and_subsample(dspec(tmp_path / "f.csv"), "classification")
    # enough rows, but a class seen once cannot be on both sides
    reviews.head(40).assign(label=[0] * 20 + [1] * 19 + [2]).to_csv(tmp_path / "r.csv", index=False)
    line = one_line(dspec(tmp_path / "r.csv"))
    assert line.endswith("every class needs at least 2 rows (class 2 has 1)")


def test_format_columns_must_be_present_and_filled(tmp_path: Path):
    rows = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(20)]
    rows[6]["output"] = ""
    path = tmp_path / "i.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line(dspec(path, format="instruction"), "causal-lm")
    assert line.startswith("dataset.columns.output: 1 empty or missing cell in column 'output'")
    assert line.endswith("first: line 7")  # an empty input is fine (the no-input template)

    d = dspec(path, format="instruction", columns={"output": "response"})
    line = one_line(d, "causal-lm")
    assert line.startswith("dataset.columns.output: column 'response' not in ")

    chats = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(20)]
    chats[2]["messages"] = "hello"
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chats))
    line = one_line(dspec(path, format="chat"), "causal-lm")
    assert line.startswith("dataset.columns.messages: 1 cell that is not a non-empty list")
    assert line.endswith("first: line 3, value 'hello'")


def test_empty_files_give_one_line(tmp_path: Path):
    (tmp_path / "e.txt").write_text(" \n\n")
    assert one_line(dspec(tmp_path / "e.txt"), "causal-lm").endswith("e.txt' is empty (no text)")
    (tmp_path / "zero.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    (tmp_path / "e.jsonl").write_text("\n")
    for name in ("zero.csv", "header.csv", "e.jsonl"):
        path = tmp_path / name
        assert one_line(dspec(path)) == f"dataset.source: {str(path)!r} has no rows"


def test_unreadable_files_give_one_line(tmp_path: Path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,1\ncaf\xe9,0\n".encode("latin-1"))
    assert one_line(dspec(path)) == (
        f"dataset.source: cannot read {str(path)!r}: not valid UTF-8 (byte 0xe9 at line 3, "
        "byte offset 21); save it as UTF-8"
    )
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    line = one_line(dspec(path))
    assert line.startswith(f"dataset.source: cannot read {str(path)!r}: line 2 is not valid JSON")


def test_a_malformed_csv_row_300_is_found(tmp_path: Path):
    rows = [f"text {i},{i % 2}" for i in range(1, 501)]
    rows[298] = "text 299,1,extra"  # file line 300 (line 1 is the header)
    path = tmp_path / "x.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    want = (
        f"dataset.source: cannot read {str(path)!r}: Error tokenizing data. "
        "C error: Expected 2 fields in line 300, saw 3"
    )
    assert one_line(dspec(path)) == want
    assert datacheck.class_count(dspec(path)) is None


def test_class_count(tiny_csv: Path, tmp_path: Path, reviews):
    assert datacheck.class_count(dspec(tiny_csv)) == 2
    assert datacheck.class_count(dspec("builtin:rotten-tomatoes")) == 2
    assert datacheck.class_count(dspec("someone/some-dataset")) is None
    path = tmp_path / "three.csv"
    reviews.assign(label=[0, 1, 2] * 80).to_csv(path, index=False)
    assert datacheck.class_count(dspec(path)) == 3
    reviews.assign(label=[0, 1, 2, 3] * 60).to_csv(path, index=False)  # an edit is seen
    assert datacheck.class_count(dspec(path)) == 4

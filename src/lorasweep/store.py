"""The only SQL in lorasweep: one SQLite file per run folder.

Contracts:
- WAL mode; every write is one transaction, done by the parent process only.
- A finished trial (complete, diverged, pruned) is immutable: a trigger refuses any update or
  delete of its row, so no code path can lose or overwrite a recorded result.
- A trial left ``running`` by a killed sweep is re-run on resume; ``failed`` and ``oom`` trials
  are kept and re-run only when asked (``--retry``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorasweep.records import Trial, TrialResult, TrialStatus, setting_columns, settings_of

DB_NAME = "lorasweep.db"
_FINISHED = tuple(s.value for s in TrialStatus if s.finished)
_FINISHED_SQL = ", ".join(f"'{s}'" for s in _FINISHED)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    variant TEXT NOT NULL,
    rank INTEGER,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{{}}',
    error TEXT,
    environment TEXT NOT NULL DEFAULT '{{}}',
    artifacts TEXT NOT NULL DEFAULT '{{}}',
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS curves (
    trial_id TEXT NOT NULL REFERENCES trials(id),
    curve TEXT NOT NULL,
    step REAL NOT NULL,
    value REAL,
    PRIMARY KEY (trial_id, curve, step)
);
CREATE TRIGGER IF NOT EXISTS finished_trials_are_immutable
BEFORE UPDATE ON trials WHEN OLD.status IN ({_FINISHED_SQL})
BEGIN SELECT RAISE(ABORT, 'finished trials are immutable'); END;
CREATE TRIGGER IF NOT EXISTS finished_trials_are_kept
BEFORE DELETE ON trials WHEN OLD.status IN ({_FINISHED_SQL})
BEGIN SELECT RAISE(ABORT, 'finished trials are immutable'); END;
"""

# Columns of trials_frame() taken from the trial config (see stats/plots contract)
CONFIG_COLUMNS = ("method", "alpha_policy", "alpha", "quantization", "target_modules")


class StoreError(sqlite3.DatabaseError):
    """A store that cannot be used (corrupt, truncated, unwritable); the message is one line."""

    @classmethod
    def of(cls, path: Path, e: sqlite3.DatabaseError) -> StoreError:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, sqlite3.OperationalError) and ("readonly" in why or "open" in why):
            return cls(f"cannot write the run store {path}: {why}")
        return cls(
            f"the run store {path} is corrupt ({why}); move it away and run again into a new "
            "--out (its finished trials cannot be read back)"
        )


class Store:
    """A run folder's SQLite store. Use ``open_store(dir)``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            # a truncated or overwritten file is found here, once, not by a later query
            check = self._db.execute("PRAGMA quick_check").fetchone()[0] if existed else "ok"
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError.of(self.path, e) from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- meta
    def set_meta(self, **values: Any) -> None:
        with _transaction(self._db):
            for k, v in values.items():
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (k, json.dumps(v, default=str)),
                )

    def meta(self) -> dict[str, Any]:
        rows = self._db.execute("SELECT key, value FROM meta").fetchall()
        return {r["key"]: json.loads(r["value"]) for r in rows}

    # -- trials
    def add_trials(self, trials: Iterable[Trial]) -> int:
        """Register planned trials (existing ones are kept as they are); returns the new count."""
        now = time.time()
        n = 0
        with _transaction(self._db):
            for t in trials:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO trials(id, label, variant, rank, seed, config, status,"
                    " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        t.id,
                        t.label,
                        t.variant,
                        t.rank,
                        t.seed,
                        json.dumps(t.config),
                        TrialStatus.PENDING.value,
                        now,
                    ),
                )
                n += cur.rowcount
        return n

    def status_of(self, trial_id: str) -> TrialStatus | None:
        row = self._db.execute("SELECT status FROM trials WHERE id = ?", (trial_id,)).fetchone()
        return TrialStatus(row["status"]) if row else None

    def mark_running(self, trial_id: str) -> None:
        with _transaction(self._db):
            self._db.execute(
                "UPDATE trials SET status = ?, started = ?, attempts = attempts + 1 WHERE id = ?",
                (TrialStatus.RUNNING.value, time.time(), trial_id),
            )

    def mark_interrupted(self, trial_id: str, error: str) -> None:
        """Back to ``pending`` with the reason; metrics, curves and artifacts already recorded
        (a pruning rung's checkpoint, for one) are kept."""
        with _transaction(self._db):
            self._db.execute(
                "UPDATE trials SET status = ?, error = ? WHERE id = ?",
                (TrialStatus.PENDING.value, error, trial_id),
            )

    def mark_pruned(self, trial_id: str, reason: str) -> None:
        """Final state of a trial dropped at a rung: its rung metrics and curves stay as saved."""
        with _transaction(self._db):
            self._db.execute(
                "UPDATE trials SET status = ?, error = ?, finished = ? WHERE id = ?",
                (TrialStatus.PRUNED.value, reason, time.time(), trial_id),
            )

    def save_result(self, result: TrialResult) -> None:
        """Record a trial's outcome and curves in one transaction."""
        with _transaction(self._db):
            self._db.execute(
                "UPDATE trials SET status = ?, metrics = ?, error = ?, environment = ?,"
                " artifacts = ?, finished = ? WHERE id = ?",
                (
                    result.status.value,
                    json.dumps(_finite(result.metrics)),
                    result.error,
                    json.dumps(result.environment, default=str),
                    json.dumps(result.artifacts, default=str),
                    time.time(),
                    result.trial_id,
                ),
            )
            self._db.execute("DELETE FROM curves WHERE trial_id = ?", (result.trial_id,))
            self._db.executemany(
                "INSERT INTO curves(trial_id, curve, step, value) VALUES (?, ?, ?, ?)",
                [
                    (result.trial_id, name, float(s), _num(v))
                    for name, pts in result.curves.items()
                    for s, v in pts
                ],
            )

    def trials(self) -> list[dict[str, Any]]:
        """Every stored trial as a dict (config, metrics etc. decoded), in creation order."""
        rows = self._db.execute("SELECT * FROM trials ORDER BY created, variant, rank, seed")
        return [_decode(r) for r in rows.fetchall()]

    def trial(self, trial_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM trials WHERE id = ?", (trial_id,)).fetchone()
        return _decode(row) if row else None

    def result(self, trial_id: str) -> TrialResult | None:
        t = self.trial(trial_id)
        if t is None:
            return None
        return TrialResult(
            trial_id=t["id"],
            status=TrialStatus(t["status"]),
            metrics=t["metrics"],
            curves=self.curves_of(trial_id),
            error=t["error"],
            environment=t["environment"],
            artifacts=t["artifacts"],
        )

    def curves_of(self, trial_id: str) -> dict[str, list[list[float]]]:
        out: dict[str, list[list[float]]] = {}
        for r in self._db.execute(
            "SELECT curve, step, value FROM curves WHERE trial_id = ? ORDER BY curve, step",
            (trial_id,),
        ):
            out.setdefault(r["curve"], []).append([r["step"], r["value"]])
        return out

    # -- frames for stats / plots / report (pandas imported lazily)
    def trials_frame(self, trials: list[dict[str, Any]] | None = None) -> Any:
        """One row per trial, one column per metric; ``trials`` reuses rows already read.

        One column per setting that varies between the trials (``learning_rate``, ``dropout``:
        ``records.varying_settings``); ``frame.attrs["settings"]`` names those that a variant's
        grid or search varies. Also ``eval_outcomes`` and ``test_outcomes`` (the artifacts as
        stored, or None; ``records.decode_outcomes`` reads them) and ``train_loss_start`` /
        ``train_loss_end``: the train_loss curve at its first and last step (None without one).
        """
        import pandas as pd

        ends: dict[str, dict[str, Any]] = {}
        for r in self._db.execute(
            "SELECT c.trial_id, c.step = m.lo AS first, c.step = m.hi AS last, c.value"
            " FROM curves c JOIN (SELECT trial_id, MIN(step) AS lo, MAX(step) AS hi FROM curves"
            " WHERE curve = 'train_loss' GROUP BY trial_id) m ON c.trial_id = m.trial_id"
            " WHERE c.curve = 'train_loss' AND (c.step = m.lo OR c.step = m.hi)"
        ):
            end = ends.setdefault(r["trial_id"], {})
            if r["first"]:
                end["train_loss_start"] = r["value"]
            if r["last"]:
                end["train_loss_end"] = r["value"]
        rows = []
        trials = self.trials() if trials is None else trials
        flats = [settings_of(t["config"]) for t in trials]  # flattened once per trial
        settings = setting_columns(flats)
        for t, flat in zip(trials, flats):
            ad = t["config"].get("adapter", {})
            row = {
                "trial_id": t["id"],
                "label": t["label"],
                "status": t["status"],
                "variant": t["variant"],
                "rank": t["rank"],
                "seed": t["seed"],
                "task": t["config"].get("task"),
                "model": t["config"].get("model"),
                "error": t["error"],
                "attempts": t["attempts"],
            }
            for c in CONFIG_COLUMNS:
                v = ad.get(c)
                row[c] = ",".join(v) if isinstance(v, list) else v
            for key, column in settings.items():
                if column not in row:  # rank, method, alpha_policy... are columns already
                    v = flat.get(key)
                    row[column] = ",".join(map(str, v)) if isinstance(v, list) else v
            row.update(t["metrics"])
            row["eval_outcomes"] = (t.get("artifacts") or {}).get("eval_outcomes")
            row["test_outcomes"] = (t.get("artifacts") or {}).get("test_outcomes")
            end = ends.get(t["id"], {})
            row["train_loss_start"] = end.get("train_loss_start")
            row["train_loss_end"] = end.get("train_loss_end")
            rows.append(row)
        frame = pd.DataFrame(rows)
        by_variant: dict[str, list[dict[str, Any]]] = {}
        for t, flat in zip(trials, flats):
            by_variant.setdefault(t["variant"], []).append(flat)
        swept = {k for fs in by_variant.values() for k in setting_columns(fs)}  # grid axes
        frame.attrs["settings"] = list(dict.fromkeys(c for k, c in settings.items() if k in swept))
        return frame

    def curves_frame(self) -> Any:
        import pandas as pd

        rows = self._db.execute("SELECT trial_id, curve, step, value FROM curves").fetchall()
        return pd.DataFrame([dict(r) for r in rows], columns=["trial_id", "curve", "step", "value"])

    def integrity_check(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for k in ("config", "metrics", "environment", "artifacts"):
        d[k] = json.loads(d[k])
    return d


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: store them as null (a diverged trial's loss, for instance)."""
    out = {}
    for k, v in metrics.items():
        f = _num(v)
        out[k] = f if f is not None and f == f and abs(f) != float("inf") else None
    return out


def open_store(run_dir: str | Path, *, create: bool = False) -> Store:
    """The store of a run folder; ``create=False`` refuses a folder that has none."""
    path = Path(run_dir) / DB_NAME
    if not create and not path.exists():
        raise FileNotFoundError(f"no lorasweep run in {run_dir} ({DB_NAME} not found)")
    return Store(path)

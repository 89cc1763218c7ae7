"""Store round-trip, immutability of finished trials, resume selection."""

from __future__ import annotations

import sqlite3

import pytest

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run.sweep import select_trials
from lorasweep.store import open_store


def _trials(n: int = 3) -> list[Trial]:
    return [Trial(config={"x": i}, variant="lora", rank=2 ** (i + 1), seed=0) for i in range(n)]


def test_round_trip_and_frames(tmp_path):
    t = _trials(1)[0]
    with open_store(tmp_path, create=True) as store:
        assert store.add_trials([t]) == 1
        assert store.add_trials([t]) == 0  # registering twice keeps one row
        store.mark_running(t.id)
        res = TrialResult(
            t.id,
            TrialStatus.COMPLETE,
            metrics={"accuracy": 0.8, "nan": float("nan")},
            curves={"train_loss": [[1, 0.7], [2, 0.5]]},
            environment={"torch": "x"},
            artifacts={"adapter_dir": "a"},
        )
        store.save_result(res)
    with open_store(tmp_path) as store:
        back = store.result(t.id)
        assert back.status is TrialStatus.COMPLETE
        assert back.metrics == {"accuracy": 0.8, "nan": None}  # NaN stored as null, never lost
        assert back.curves == {"train_loss": [[1.0, 0.7], [2.0, 0.5]]}
        df = store.trials_frame()
        assert (
            df.loc[0, "accuracy"] == 0.8 and df.loc[0, "rank"] == 2 and df.loc[0, "attempts"] == 1
        )
        assert list(store.curves_frame()["value"]) == [0.7, 0.5]
        assert store.integrity_check() == "ok"


def test_finished_trials_are_immutable(tmp_path):
    t = _trials(1)[0]
    with open_store(tmp_path, create=True) as store:
        store.add_trials([t])
        store.save_result(TrialResult(t.id, TrialStatus.COMPLETE, metrics={"accuracy": 0.8}))
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            store.save_result(TrialResult(t.id, TrialStatus.FAILED, error="overwrite"))
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            store._db.execute("DELETE FROM trials")
        assert store.result(t.id).metrics == {"accuracy": 0.8}


def test_resume_selects_unfinished_and_retries_on_request(tmp_path):
    a, b, c = _trials(3)
    with open_store(tmp_path, create=True) as store:
        store.add_trials([a, b, c])
        store.save_result(TrialResult(a.id, TrialStatus.COMPLETE))
        store.save_result(TrialResult(b.id, TrialStatus.FAILED, error="boom"))
        store.mark_running(c.id)  # a sweep killed while c ran
        todo, skipped = select_trials(store, [a, b, c], retry=set())
        assert [t.id for t in todo] == [c.id] and skipped == 2
        todo, _ = select_trials(store, [a, b, c], retry={"failed"})
        assert {t.id for t in todo} == {b.id, c.id}


def test_open_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lorasweep run"):
        open_store(tmp_path / "none")

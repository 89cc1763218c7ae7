"""The run folder (``--out``): one sweep at a time, never a stranger's folder, never half-made,
never a silent mix of two experiments.

- ``check_out_path`` refuses, before anything loads, a path that is a file or a non-empty folder
  that is not a lorasweep run (its files are not ours to overwrite).
- ``claim`` takes the folder's lock (a second ``lorasweep run`` on it is refused at once, naming
  the process that holds it) and, when the sweep fails before any trial started, removes the
  folder it created.
- ``check_same_settings`` refuses a spec whose settings, or whose data, changed under trials
  already recorded in the folder: their results would otherwise be pooled into one
  configuration as if they were the same experiment. Adding a rank, a seed or a variant with
  the same fixed settings keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorasweep.records import Trial, settings_of
from lorasweep.store import DB_NAME

LOCK_NAME = ".lorasweep.lock"
OWNER_NAME = ".lorasweep.owner"
# files a claimed folder can hold before its store exists (a sweep killed at that moment)
_OWN_BEFORE_STORE = {LOCK_NAME, OWNER_NAME}
_COMMON = ("task", "model", "dataset")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message is one line."""


def check_out_path(out: Path) -> None:
    """Refuse a file, or a non-empty folder that is not a lorasweep run folder."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out: {out} is a file, not a folder")
    if not out.is_dir() or (out / DB_NAME).exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_BEFORE_STORE)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise RunFolderError(
            f"--out: {out} is not empty and is not a lorasweep run folder (it holds {shown}); "
            "choose a new or empty folder"
        )


class Claim:
    """A held run folder; ``started()`` marks the point after which it is never removed."""

    def __init__(self, out: Path, created: bool):
        self.out, self.created, self._started = out, created, False

    def started(self) -> None:
        self._started = True


@contextmanager
def claim(out: Path) -> Iterator[Claim]:
    """Hold ``out`` for one sweep: create it if needed and take its lock.

    Raises:
        RunFolderError: another process holds the folder (named in the message).
    """
    from filelock import FileLock, Timeout

    check_out_path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderError(
            f"--out: {out} is in use by another lorasweep run ({_owner(out)}); wait for it to "
            "end or choose another --out"
        ) from None
    held = Claim(out, created)
    try:
        (out / OWNER_NAME).write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        )
        yield held
    except BaseException:
        if held.created and not held._started:
            lock.release()
            shutil.rmtree(out, ignore_errors=True)  # nothing was recorded: leave no half folder
            raise
        raise
    finally:
        if lock.is_locked:
            (out / OWNER_NAME).unlink(missing_ok=True)
            lock.release()


def _owner(out: Path) -> str:
    try:
        o = json.loads((out / OWNER_NAME).read_text())
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(o["since"]))
        return f"pid {o['pid']} on {o['host']}, since {since}"
    except (OSError, ValueError, KeyError):
        return "a process that holds its lock"


# --------------------------------------------------------------------------------------------
# same settings


def _without(settings: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in keys}


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """``training.max_steps 150 -> 5, ...``: the keys that differ, at most ``limit`` named."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "-") != new.get(k, "-"))
    parts = [f"{k} {_show(old.get(k, '-'))} -> {_show(new.get(k, '-'))}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(parts) + more


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def check_same_settings(
    stored: list[dict[str, Any]],
    planned: list[Trial],
    out: Path,
    *,
    stored_fingerprint: str | None = None,
    fingerprint: str | None = None,
    source: str = "",
) -> None:
    """Refuse a spec that would pool trials of a different experiment with those in ``out``.

    ``stored`` are the store's trial rows. The model, task and data must be those of every
    stored trial; a variant that exists in both must have the same fixed settings. The data's
    content fingerprint, when both are known, must not have changed.

    Raises:
        RunFolderError: one line naming what changed and suggesting a new ``--out``.
    """
    advice = "use a new --out for the changed experiment, or restore the settings"
    if stored_fingerprint and fingerprint and stored_fingerprint != fingerprint:
        raise RunFolderError(
            f"dataset.source: the data of {source!r} changed since trials were recorded in "
            f"{out} (content {stored_fingerprint} -> {fingerprint}); its trials would mix two "
            "data sets: use a new --out, or restore the file"
        )
    if not stored or not planned:
        return
    old_by_variant: dict[str, dict[str, Any]] = {}
    new_by_variant: dict[str, dict[str, Any]] = {}
    swept: dict[str, set[str]] = {}  # per variant: the keys a grid or search varies, then or now
    pairs = [(row["variant"], row["config"], old_by_variant) for row in stored]
    for variant, config, firsts in pairs + [(t.variant, t.config, new_by_variant) for t in planned]:
        settings = settings_of(config)
        first = firsts.setdefault(variant, settings)
        swept.setdefault(variant, set()).update(
            k for k in first.keys() | settings.keys() if first.get(k, "-") != settings.get(k, "-")
        )
    for variant, keys in swept.items():  # a swept key's values are points of a grid
        for firsts in (old_by_variant, new_by_variant):
            if variant in firsts:
                firsts[variant] = _without(firsts[variant], keys)
    new_any = next(iter(new_by_variant.values()))
    old_any = next(iter(old_by_variant.values()))
    common_old = {k: v for k, v in old_any.items() if k.split(".")[0] in _COMMON}
    common_new = {k: v for k, v in new_any.items() if k.split(".")[0] in _COMMON}
    if common_old != common_new:
        raise RunFolderError(
            f"spec: changed since trials were recorded in {out}: "
            f"{describe_changes(common_old, common_new)}; {advice}"
        )
    for variant, new in new_by_variant.items():
        old = old_by_variant.get(variant)
        if old is not None and old != new:
            where = "" if variant == "lora" else f" (variant {variant})"
            raise RunFolderError(
                f"spec: changed since trials were recorded in {out}{where}: "
                f"{describe_changes(old, new)}; {advice}"
            )

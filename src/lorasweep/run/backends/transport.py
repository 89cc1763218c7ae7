"""Files of Ray tasks without a shared folder: tars in memory, the node's data cache, and
the trial's files installed into the run folder. Plain Python (no Ray): the Ray side, the task
bodies and ``RayBackend``, is in ``ray.py``, which calls these; bytes that went through Ray's
object store are fetched there and handed in.

By default (``shared_folder=False``) files travel through Ray's object store and no node but the
parent's needs the run folder:

- the parent packs the tokenized data cache the trials read (``<run>/cache/data-<key>``, one
  uncompressed tar: ``data_folders``, ``pack``) once per ``run`` call (per rung in a pruned
  sweep) and puts it in the object store; each node fetches and extracts it once into its temp
  folder (``<tmp>/lorasweep-ray/data/<content hash>``, shared by that node's tasks and later
  rungs, removed by a later task after a day unused: ``node_data``);
- a resumed pruning segment gets its checkpoint folder's bytes (``file_task_args``) and unpacks
  them locally;
- a task trains in a fresh temp folder laid out like a run folder and returns its result with a
  tar of what it wrote there (``pack_dir``: the adapter, a rung's checkpoint, TensorBoard
  events), then deletes the folder; the parent unpacks the tar into ``<run>/trials/<id>`` (and
  ``<run>/tensorboard``), replacing the entries the trial wrote (a checkpoint folder by step) and
  nothing else (``install``), and rewrites the result's paths from the worker's folder to the
  run folder before yielding it (``receive``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorasweep.records import Trial, TrialResult
from lorasweep.run.backends.base import RunContext

NODE_DIR = "lorasweep-ray"  # under each node's temp folder: the extracted data caches
STALE_AFTER = 24 * 3600.0  # seconds an extracted data cache is kept unused on a node
_COMPLETE = ".complete"  # marks a fully extracted data cache


def pack(paths: dict[str, Path]) -> bytes:
    """An uncompressed tar of files and folders, each under its name (tokenized data, adapters
    and checkpoints are dense binary: compression would cost time for little)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in sorted(paths.items()):
            tar.add(str(path), arcname=name)
    return buf.getvalue()


def pack_dir(root: Path) -> bytes:
    """A tar of what is in ``root`` (empty when it does not exist)."""
    return pack({p.name: p for p in root.iterdir()} if root.is_dir() else {})


def unpack(data: bytes, dest: Path) -> None:
    """Extract a tar into ``dest``; no absolute paths, no ``..``, no links out of it."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - older patch releases
            for m in tar.getmembers():
                if m.name.startswith("/") or ".." in Path(m.name).parts or m.islnk() or m.issym():
                    raise ValueError(f"unsafe path in a trial's files: {m.name!r}")
            tar.extractall(dest)


def node_data(digest: str, fetch: Callable[[], bytes]) -> Path:
    """The data cache on this node: extracted once per node (by content hash), shared by the
    node's tasks; other caches there unused for a day are removed. ``fetch`` returns the cache's
    tar and is called only when this node has not extracted it yet."""
    root = Path(tempfile.gettempdir()) / NODE_DIR / "data"
    dest = root / digest
    if not (dest / _COMPLETE).exists():
        root.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f"{digest}.", suffix=".part", dir=root))
        try:
            unpack(fetch(), part)
            (part / _COMPLETE).touch()
            try:
                os.rename(part, dest)
            except OSError:  # another task on this node finished first: use its copy
                pass
        finally:
            shutil.rmtree(part, ignore_errors=True)
    os.utime(dest)
    _drop_stale(root, keep=digest)
    return dest


def _drop_stale(root: Path, keep: str, age: float = STALE_AFTER) -> None:
    now = time.time()
    for p in root.iterdir():
        try:
            if p.name != keep and now - p.stat().st_mtime > age:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:  # removed by another task meanwhile
            pass


def _rewrite(obj: Any, old: str, new: str) -> Any:
    """``obj`` with every string path under ``old`` moved to ``new`` (dicts and lists walked)."""
    if isinstance(obj, str):
        if obj == old or obj.startswith(old.rstrip("/") + "/"):
            return new + obj[len(old) :]
        return obj
    if isinstance(obj, dict):
        return {k: _rewrite(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rewrite(v, old, new) for v in obj]
    return obj


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def install(files: bytes, trial: Trial, ctx: RunContext) -> None:
    """Put a trial's files (a tar of the worker's temp run folder) into the run folder.

    ``trials/<id>/<entry>`` replaces that entry of this trial's folder (``checkpoints`` by step:
    an older rung's checkpoint stays until the sweep has stored the result that replaces it);
    other top-level folders (``tensorboard``) are merged file by file. Other trials' folders are
    never touched, whatever the tar holds.
    """
    target = ctx.trial_dir(trial)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target))
    try:
        unpack(files, staging)
        got = staging / "trials" / trial.id
        for entry in sorted(got.iterdir()) if got.is_dir() else []:
            if entry.name == "checkpoints" and entry.is_dir():
                for ckpt in sorted(entry.iterdir()):
                    _replace(ckpt, target / "checkpoints" / ckpt.name)
            else:
                _replace(entry, target / entry.name)
        for top in sorted(staging.iterdir()):
            if top.name == "trials":
                continue
            found = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
            for f in found:
                _replace(f, Path(ctx.out_dir) / f.relative_to(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def receive(payload: dict[str, Any], trial: Trial, ctx: RunContext) -> TrialResult:
    """A file-transport task's answer as the parent stores it: files in the run folder, paths
    pointing there."""
    install(payload["files"], trial, ctx)
    result = _rewrite(payload["result"], payload["root"], str(ctx.out_dir))
    return TrialResult.from_dict(result)


def _fingerprint(dspec: dict[str, Any]) -> str | None:
    from lorasweep.training.sources import source_fingerprint

    try:
        return source_fingerprint(dspec)
    except Exception:  # noqa: BLE001 - the trial reports an unreadable source itself
        return None


def data_fingerprints(trials: list[Trial], ctx: RunContext) -> dict[str, str | None]:
    """trial id -> the data fingerprint its trial uses: the parent's, else (a direct call
    without one) what the trial would compute from the source, so it need not read it."""
    given = ctx.extra.get("data_fingerprint")
    out: dict[str, str | None] = {}
    seen: dict[str, str | None] = {}
    for t in trials:
        dspec = t.config.get("dataset")
        if given is not None or not isinstance(dspec, dict):
            out[t.id] = given
            continue
        key = json.dumps(dspec, sort_keys=True, default=str)
        if key not in seen:
            seen[key] = _fingerprint(dspec)
        out[t.id] = seen[key]
    return out


def data_folders(
    trials: list[Trial], ctx: RunContext, prints: dict[str, str | None]
) -> dict[str, Path]:
    """The tokenized data caches (``data-<key>`` under ``ctx.cache_root``) these trials read."""
    from lorasweep.training.data import prepared_cache_key

    folders: dict[str, Path] = {}
    for t in trials:
        cfg = t.config
        try:
            key = prepared_cache_key(cfg["dataset"], cfg["task"], cfg["model"], prints[t.id])
        except (KeyError, TypeError, ValueError):  # not a trial that reads a data cache
            continue
        folder = Path(ctx.cache_root) / f"data-{key}"
        if (folder / "info.json").exists():
            folders[folder.name] = folder
    return folders


def file_task_args(
    trial: Trial,
    ctx: RunContext,
    threads: int | None,
    env: dict[str, str],
    data: tuple[str, list[Any]] | None,
    fingerprint: str | None,
) -> tuple[Any, ...]:
    """The arguments of the Ray task (``_ray_trial_files`` in ``ray.py``): no path into the run
    folder among them."""
    context = ctx.trial_context(trial, threads)
    context.pop("out_dir", None)  # the task sets its own temp run folder
    if fingerprint is not None:
        context["data_fingerprint"] = fingerprint
    resume = None
    segment = context.get("segment")
    if segment and segment.get("resume_from"):
        ckpt = Path(segment["resume_from"])
        if ckpt.is_dir():  # a missing one fails the trial in the task, as with a shared folder
            resume = (ckpt.name, pack({ckpt.name: ckpt}))
            context["segment"] = {**segment, "resume_from": None}
    return trial.to_dict(), context, env, data, resume

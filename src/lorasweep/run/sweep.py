"""run_sweep: validate, plan, store, run what is not finished, record every result, report.

The parent process is the only writer of the store. Each result is written the moment its trial
ends, in one transaction, so killing the sweep at any point loses only the trials that were
running; they are re-run on resume, and finished trials are never run twice.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorasweep.plan import describe_plan
from lorasweep.records import Trial, TrialResult, TrialStatus, paused_of
from lorasweep.run.backends import RunContext, get_backend
from lorasweep.run.estimates import estimate_peaks
from lorasweep.run.progress import Progress
from lorasweep.run.pruning import PruneSettings, check_prune_settings, merge_segments, run_pruned
from lorasweep.run.rundir import check_out_path, check_same_settings, claim
from lorasweep.spec import SweepSpec, parse_spec
from lorasweep.store import open_store
from lorasweep.training.data import prepare_for_sweep
from lorasweep.training.sources import source_fingerprint

RETRYABLE = {s.value: s for s in TrialStatus if s.retryable}  # failed, oom
# a sweep that would start more new trials than this asks for --yes (a typo in a grid can plan
# ten thousand trials; they should not start training without a word)
CONFIRM_ABOVE = 200


@dataclass
class SweepOutcome:
    out_dir: Path
    planned: int
    ran: int
    skipped: int
    statuses: dict[str, int] = field(default_factory=dict)
    report: Path | None = None


def load_spec(source: str | Path | dict[str, Any]) -> SweepSpec:
    """Parse a spec (path, YAML text or dict) and check it against the world; SpecError if bad."""
    from lorasweep.run.preflight import check_spec

    spec = parse_spec(source)
    check_spec(spec)
    return spec


def select_trials(store: Any, trials: list[Trial], retry: set[str]) -> tuple[list[Trial], int]:
    """The trials to run now: new, interrupted (running/pending), and retried statuses."""
    todo, skipped = [], 0
    for t in trials:
        status = store.status_of(t.id)
        if status is None or status.is_active:
            todo.append(t)
        elif status.value in retry:
            todo.append(t)
        else:
            skipped += 1
    return todo, skipped


def run_sweep(
    spec: SweepSpec | str | Path | dict[str, Any],
    out_dir: str | Path,
    *,
    backend: str = "local",
    jobs: int | str = 1,
    per_gpu: int | None = None,
    shared_folder: bool = False,
    retry: tuple[str, ...] | set[str] = (),
    address: str | None = None,
    report: bool = True,
    quiet: bool = False,
    validated: bool = False,
    prune: PruneSettings | bool | None = None,
    yes: bool = False,
) -> SweepOutcome:
    """Run (or resume) a sweep into ``out_dir`` and return what happened.

    ``prune`` (True or a PruneSettings) runs successive halving over the configurations: every
    surviving trial is paused at each rung, and a configuration significantly worse than the
    best across seeds is stored ``pruned`` (see ``lorasweep.run.pruning`` and docs/scaling.md).
    More than ``CONFIRM_ABOVE`` trials not yet in ``out_dir`` need ``yes=True`` (``--yes``).
    ``jobs="auto"`` or ``per_gpu`` pack several trials onto each GPU (``run.packing``).
    """
    bad = set(retry) - set(RETRYABLE)
    if bad:
        raise ValueError(f"--retry: unknown status {sorted(bad)[0]!r}; choose from failed, oom")
    settings = PruneSettings() if prune is True else (prune or None)
    if not isinstance(spec, SweepSpec):
        spec = parse_spec(spec)
    if settings and len(spec.seeds) < 2:
        raise ValueError(
            f"--prune: needs at least 2 seeds to test a configuration against the best "
            f"(seeds: {spec.seeds}); with one seed nothing could ever be dropped"
        )
    if settings:
        settings.metric_for(spec.task)  # a metric the task does not measure: fail before work
    out = Path(out_dir)
    check_out_path(out)  # a file, or a stranger's folder: refused before anything loads
    be = get_backend(backend, jobs=jobs, address=address, per_gpu=per_gpu,
                     shared_folder=shared_folder)  # options first  # fmt: skip
    trials = spec.trials()
    _confirm_size(spec, trials, out, yes, quiet)
    try:
        if _has_work(out, trials, set(retry)):
            be.warm_up()  # worker imports overlap the checks below
        if not validated:
            from lorasweep.run.preflight import check_spec

            for note in check_spec(spec):
                if not quiet:
                    print(f"lorasweep: note: {note}", file=sys.stderr)
        fingerprint = source_fingerprint(spec.dataset.model_dump())
        with claim(out) as held:
            ran, skipped, statuses = _run_claimed(
                held, spec, trials, be, fingerprint, settings, set(retry), jobs, quiet
            )
    finally:
        be.close()
    outcome = SweepOutcome(out, len(trials), ran, skipped, statuses)
    if report and (ran or not (out / "report.html").exists()):
        from lorasweep.analysis.report import write_run_report  # matplotlib, jinja: when needed

        outcome.report = write_run_report(out)
    elif report:
        outcome.report = out / "report.html"
    return outcome


def _run_claimed(
    held: Any,
    spec: SweepSpec,
    trials: list[Trial],
    be: Any,
    fingerprint: str | None,
    settings: PruneSettings | None,
    retry: set[str],
    jobs: int | str,
    quiet: bool,
) -> tuple[int, int, dict[str, int]]:
    """The sweep inside its claimed run folder: refuse a changed experiment, record the plan,
    run what is not finished. Returns (trials run now, trials already recorded, status counts
    of the planned trials)."""
    out = held.out
    with open_store(out, create=True) as store:
        meta = store.meta()
        check_same_settings(
            store.trials(),
            trials,
            out,
            stored_fingerprint=meta.get("data_fingerprint"),
            fingerprint=fingerprint,
            source=spec.dataset.source,
        )
        if settings:
            check_prune_settings(meta.get("prune"), settings)
        store.set_meta(
            name=spec.name,
            task=spec.task,
            spec=spec.model_dump(mode="json"),
            spec_yaml=yaml.safe_dump(
                spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False
            ),
            data_fingerprint=fingerprint or meta.get("data_fingerprint"),
        )
        store.add_trials(trials)
        todo, skipped = select_trials(store, trials, retry)
        ran = 0
        if todo:
            n_train, dedup = prepare_for_sweep(spec, out, fingerprint)
            store.set_meta(data_dedup=dedup)  # rows dropped before the split, for the record
            held.started()  # from here on the folder holds a sweep's work: never removed
            runner = _Runner(store, be, out, spec.name, jobs, quiet, estimate_peaks(todo),
                             fingerprint)  # fmt: skip
            if settings:
                ran = run_pruned(runner, trials, settings, n_train, spec.task, retry)
            else:
                rows = {r["id"]: r for r in store.trials()}
                resume = {t.id: {"resume_from": runner.paused(rows[t.id])[1]} for t in todo}
                ran = runner.run(todo, resume)
        statuses: dict[str, int] = {}
        planned_ids = {t.id for t in trials}
        for t in store.trials():
            if t["id"] in planned_ids:
                statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    return ran, skipped, statuses


class _Runner:
    """Runs trials (or segments of trials, between pruning rungs) through a backend and records
    each result the moment it arrives. The parent is the only writer of the store."""

    def __init__(self, store: Any, backend: Any, out: Path, name: str, jobs: int | str,
                 quiet: bool, estimates: dict[str, float],
                 fingerprint: str | None = None):  # fmt: skip
        self.store, self.backend, self.out, self.name = store, backend, out, name
        self.jobs, self.quiet, self.estimates = jobs, quiet, estimates
        self.fingerprint = fingerprint

    def paused(self, row: dict[str, Any]) -> tuple[int, str | None]:
        """(step, checkpoint path) of a stored trial paused at a rung; (0, None) when it is not
        paused, or its checkpoint folder has gone (the trial then starts again from step 0)."""
        paused = paused_of(row["artifacts"])
        if not paused or not (self.out / paused["checkpoint"]).exists():
            return 0, None
        return int(paused["step"]), str(self.out / paused["checkpoint"])

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def run(self, trials: list[Trial], segments: dict[str, dict[str, Any]]) -> int:
        stops = {k: v["stop_at"] for k, v in segments.items() if v.get("stop_at")}
        width = getattr(self.backend, "width", None)
        jobs = width(trials, self.estimates) if width else self.jobs
        jobs = jobs if isinstance(jobs, int) else 1  # Ray with jobs="auto": Ray decides
        # a context: the live display ends however the loop does (Ctrl-C, an error)
        with Progress(len(trials), jobs, quiet=self.quiet, stops=stops) as progress:

            def on_start(t: Trial) -> None:
                self.store.mark_running(t.id)
                progress.start(t)

            ctx = RunContext(
                out_dir=self.out,
                cache_root=self.out / "cache",
                name=self.name,
                on_start=on_start,
                on_progress=progress.progress,
                segments={k: v for k, v in segments.items() if any(v.values())},
                extra={"data_fingerprint": self.fingerprint} if self.fingerprint else {},
                estimates=self.estimates,
                # recorded as pending with the reason: a sweep stopped before the retry re-runs it
                on_requeue=lambda r: self.store.mark_interrupted(r.trial_id, r.error or "oom"),
            )
            n = 0
            for result in self.backend.run(trials, ctx):
                self.record(result, resumed=bool(ctx.segments.get(result.trial_id, {}).get(
                    "resume_from")))  # fmt: skip
                progress.finish(result)
                n += 1
        return n

    def record(self, result: TrialResult, resumed: bool) -> None:
        """Store one result: a paused segment is merged with the segments before it; an
        interrupted trial keeps what was recorded (its last rung and checkpoint)."""
        tid = result.trial_id
        if result.status == TrialStatus.PENDING and not paused_of(result.artifacts):
            self.store.mark_interrupted(tid, result.error or "interrupted")
            return
        before = self.store.result(tid) if resumed else None
        result = merge_segments(before, result)
        art = result.artifacts
        if art.get("adapter_dir"):  # relative to the run folder, so the folder can be moved
            art["adapter_dir"] = os.path.relpath(art["adapter_dir"], self.out)
        paused = paused_of(art)
        if paused:
            paused["checkpoint"] = os.path.relpath(paused["checkpoint"], self.out)
        if tid in self.estimates:
            result.metrics["estimated_peak_bytes"] = self.estimates[tid]
        self.store.save_result(result)
        # checkpoints go only after the result that replaces them is stored
        before_paused = paused_of(before.artifacts) if before else None
        old = before_paused.get("checkpoint") if before_paused else None
        if paused:
            if old and old != paused["checkpoint"]:
                shutil.rmtree(self.out / old, ignore_errors=True)
        else:
            shutil.rmtree(self.out / "trials" / tid / "checkpoints", ignore_errors=True)


def _confirm_size(spec: SweepSpec, trials: list[Trial], out: Path, yes: bool, quiet: bool) -> None:
    """Print the size of the plan; refuse more than CONFIRM_ABOVE new trials without ``yes``."""
    known: set[str] = set()
    if (out / "lorasweep.db").exists():
        with open_store(out) as store:
            known = {row["id"] for row in store.trials()}
    new = sum(t.id not in known for t in trials)
    size = describe_plan(spec, trials)
    if not quiet:
        more = f", {new} not yet in {out}" if known else ""
        print(f"lorasweep: plan: {size}{more}", file=sys.stderr)
    if new > CONFIRM_ABOVE and not yes:
        raise ValueError(
            f"--yes: the spec plans {new} new trials ({size}), more than {CONFIRM_ABOVE}; check "
            "the grid, then pass --yes to start them"
        )


def _has_work(out: Path, trials: list[Trial], retry: set[str]) -> bool:
    if not (out / "lorasweep.db").exists():
        return True
    with open_store(out) as store:
        return bool(select_trials(store, trials, retry)[0])

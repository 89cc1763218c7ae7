"""run_sweep: validate, plan, store, run what is not finished, record every result, report.

The parent process is the only writer of the store. Each result is written the moment its trial
ends, in one transaction, so killing the sweep at any point loses only the trials that were
running; they are re-run on resume, and finished trials are never run twice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from lorasweep.analysis.explain import group_label
from lorasweep.records import HIGHER_IS_BETTER, Trial, TrialResult, TrialStatus, eval_curve
from lorasweep.run.backends import RunContext, get_backend
from lorasweep.run.pruning import PruneSettings, decide_rung, merge_segments, rung_steps
from lorasweep.run.rundir import check_out_path, check_same_settings, claim
from lorasweep.spec import SweepSpec, parse_spec, planned_steps
from lorasweep.store import open_store
from lorasweep.training.data import source_fingerprint

RETRYABLE = {"failed": TrialStatus.FAILED, "oom": TrialStatus.OOM}


@dataclass
class SweepOutcome:
    out_dir: Path
    planned: int
    ran: int
    skipped: int
    statuses: dict[str, int] = field(default_factory=dict)
    report: Path | None = None


class Progress:
    """A live one-line display on a terminal; one line per trial event otherwise."""

    def __init__(self, total: int, jobs: int, stream: TextIO | None = None, quiet: bool = False):
        self.total, self.jobs = total, max(1, jobs)
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.done = 0
        self.durations: list[float] = []
        self.running: dict[str, tuple[Trial, float, int, int]] = {}
        self.t0 = time.monotonic()

    def _eta(self) -> str:
        if not self.durations:
            return "ETA -"
        mean = sum(self.durations) / len(self.durations)
        left = self.total - self.done
        elapsed_running = sum(time.monotonic() - t0 for _, t0, _, _ in self.running.values())
        secs = max(0.0, (left * mean - elapsed_running) / self.jobs)
        return f"ETA {_fmt_secs(secs)}"

    def _line(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, trial: Trial) -> None:
        self.running[trial.id] = (trial, time.monotonic(), 0, 0)
        if not self.tty:
            self._line(f"[{self.done + 1}/{self.total}] start {trial.label} ({trial.id})", True)

    def progress(self, trial_id: str, step: int, total: int) -> None:
        if trial_id not in self.running:
            return
        trial, t0, _, _ = self.running[trial_id]
        self.running[trial_id] = (trial, t0, step, total)
        parts = [f"{t.label} step {s}/{n}" for t, _, s, n in self.running.values()]
        self._line(f"[{self.done}/{self.total} done] " + " | ".join(parts) + f" | {self._eta()}")

    def finish(self, result: TrialResult) -> None:
        trial, t0, _, _ = self.running.pop(result.trial_id, (None, time.monotonic(), 0, 0))
        self.done += 1
        self.durations.append(time.monotonic() - t0)
        m = result.metrics
        shown = ", ".join(f"{k}={m[k]:.4g}" for k in ("accuracy", "f1", "perplexity") if k in m)
        label = trial.label if trial else result.trial_id
        err = f" ({(result.error or '').splitlines()[-1][:120]})" if result.error else ""
        paused = result.artifacts.get("paused")
        status = f"paused@{paused['step']}" if paused else result.status.value
        if result.status == TrialStatus.PENDING and not paused:
            status = "interrupted"
        self._line(
            f"[{self.done}/{self.total}] {status:8s} {label} "
            f"{shown}{err} in {_fmt_secs(self.durations[-1])} | {self._eta()}",
            True,
        )


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


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
        if status in (None, TrialStatus.PENDING, TrialStatus.RUNNING):
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
    jobs: int = 1,
    retry: tuple[str, ...] | set[str] = (),
    address: str | None = None,
    report: bool = True,
    quiet: bool = False,
    validated: bool = False,
    prune: PruneSettings | bool | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep into ``out_dir`` and return what happened.

    ``prune`` (True or a PruneSettings) runs successive halving over the configurations: every
    surviving trial is paused at each rung, and a configuration significantly worse than the
    best across seeds is stored ``pruned`` (see ``lorasweep.run.pruning`` and docs/scaling.md).
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
    trials = spec.trials()
    be = get_backend(backend, jobs=jobs, address=address)
    try:
        if hasattr(be, "warm_up") and _has_work(out, trials, set(retry)):
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
        if hasattr(be, "close"):
            be.close()
    outcome = SweepOutcome(out, len(trials), ran, skipped, statuses)
    if report and (ran or not (out / "report.html").exists()):
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
    jobs: int,
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
            _check_prune_settings(meta.get("prune"), settings)
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
            n_train, dedup = _prepare_data(spec, out, fingerprint)
            store.set_meta(data_dedup=dedup)  # rows dropped before the split, for the record
            held.started()  # from here on the folder holds a sweep's work: never removed
            runner = _Runner(store, be, out, spec.name, jobs, quiet, estimate_peaks(todo),
                             fingerprint)  # fmt: skip
            if settings:
                ran = _run_pruned(runner, trials, settings, n_train, spec.task, retry)
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

    def __init__(self, store: Any, backend: Any, out: Path, name: str, jobs: int, quiet: bool,
                 estimates: dict[str, float], fingerprint: str | None = None):  # fmt: skip
        self.store, self.backend, self.out, self.name = store, backend, out, name
        self.jobs, self.quiet, self.estimates = jobs, quiet, estimates
        self.fingerprint = fingerprint

    def paused(self, row: dict[str, Any]) -> tuple[int, str | None]:
        """(step, checkpoint path) of a stored trial paused at a rung; (0, None) when it is not
        paused, or its checkpoint folder has gone (the trial then starts again from step 0)."""
        paused = row["artifacts"].get("paused") or {}
        if not paused or not (self.out / paused["checkpoint"]).exists():
            return 0, None
        return int(paused["step"]), str(self.out / paused["checkpoint"])

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def run(self, trials: list[Trial], segments: dict[str, dict[str, Any]]) -> int:
        progress = Progress(len(trials), self.jobs, quiet=self.quiet)

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
        if result.status == TrialStatus.PENDING and not result.artifacts.get("paused"):
            self.store.mark_interrupted(tid, result.error or "interrupted")
            return
        before = self.store.result(tid) if resumed else None
        result = merge_segments(before, result)
        art = result.artifacts
        if art.get("adapter_dir"):  # relative to the run folder, so the folder can be moved
            art["adapter_dir"] = os.path.relpath(art["adapter_dir"], self.out)
        if art.get("paused"):
            art["paused"]["checkpoint"] = os.path.relpath(art["paused"]["checkpoint"], self.out)
        if tid in self.estimates:
            result.metrics["estimated_peak_bytes"] = self.estimates[tid]
        self.store.save_result(result)
        # checkpoints go only after the result that replaces them is stored
        old = ((before.artifacts.get("paused") or {}) if before else {}).get("checkpoint")
        if art.get("paused"):
            if old and old != art["paused"]["checkpoint"]:
                shutil.rmtree(self.out / old, ignore_errors=True)
        else:
            shutil.rmtree(self.out / "trials" / tid / "checkpoints", ignore_errors=True)


def _check_prune_settings(
    state: dict[str, Any] | None, settings: PruneSettings, total: int | None = None
) -> None:
    """A pruned run folder resumes only with the settings its decisions were made with."""
    if state and (
        state["settings"] != settings.to_dict()
        or (total is not None and state["total_steps"] != total)
    ):
        raise ValueError(
            f"--prune: this run folder was pruned with {state['settings']} over "
            f"{state['total_steps']} steps; resume it with the same settings"
        )


def _run_pruned(
    runner: _Runner,
    trials: list[Trial],
    settings: PruneSettings,
    n_train: int,
    task: str,
    retry: set[str],
) -> int:
    """Successive halving: run every surviving trial to each rung, decide, drop, go on.

    Decisions are stored in ``meta["prune"]`` as they are made, so a resumed sweep applies
    them again and never decides a rung twice (or differently).
    """
    store = runner.store
    steps = {planned_steps(t.config.get("training") or {}, n_train) for t in trials}
    if len(steps) > 1:
        raise ValueError(
            f"--prune: the trials plan different numbers of steps ({sorted(steps)}); "
            "rungs compare configurations at the same step, so give every variant the same "
            "max_steps"
        )
    total = steps.pop()
    rungs = rung_steps(total, eta=settings.eta, min_steps=settings.min_steps)
    metric = settings.metric_for(task)
    state = store.meta().get("prune")
    _check_prune_settings(state, settings, total)
    if not state:
        state = {
            "settings": settings.to_dict(),
            "metric": metric,
            "direction": "higher" if HIGHER_IS_BETTER[metric] else "lower",
            "total_steps": total,
            "rungs": rungs,
            "decisions": [],
        }
        store.set_meta(prune=state)
    config = {t.id: group_label({"variant": t.variant, "rank": t.rank}) for t in trials}
    if len(set(config.values())) < 2:
        runner.note("--prune: one configuration, nothing to compare; its trials run to the end")
    elif not rungs:
        runner.note(f"--prune: {total} steps leave no rung of >= {settings.min_steps} steps "
                    f"(eta {settings.eta}); every trial runs to the end")  # fmt: skip
    ran = 0
    for i, step in enumerate([*rungs, total]):
        dropped = {c: d for d in state["decisions"] if d["step"] < step for c in d["drop"]}
        rows = {t["id"]: t for t in store.trials()}

        def runnable(t: Trial, rows: dict = rows) -> bool:
            st = rows[t.id]["status"]
            return st in ("pending", "running") or st in retry

        for t in trials:
            if config[t.id] in dropped and runnable(t):
                d = dropped[config[t.id]]
                why = d["reasons"][config[t.id]].removeprefix("dropped: ")
                store.mark_pruned(t.id, f"pruned at step {d['step']}: {why}")
                shutil.rmtree(runner.out / "trials" / t.id / "checkpoints", ignore_errors=True)
        alive = [t for t in trials if config[t.id] not in dropped and runnable(t)]
        if step < total and len(set(config.values()) - set(dropped)) < 2:
            continue  # one configuration left: nothing to compare, so no more rungs to pay for
        need = [t for t in alive if runner.paused(rows[t.id])[0] < step]
        if need:
            where = f"rung {i + 1}/{len(rungs)}: to step {step}" if step < total else (
                f"final: to step {total}")  # fmt: skip
            runner.note(f"-- {where}, {len(need)} trial(s)")
            segments = {
                t.id: {
                    "stop_at": step if step < total else None,
                    "resume_from": runner.paused(rows[t.id])[1],
                    "eval_examples": settings.eval_examples,
                }
                for t in need
            }
            ran += runner.run(need, segments)
        if step == total or any(d["step"] == step for d in state["decisions"]):
            continue
        values: dict[str, dict[int, float]] = {}
        waiting = 0
        rows = {t["id"]: t for t in store.trials()}
        for t in trials:
            if config[t.id] in dropped:
                continue
            st = rows[t.id]["status"]
            if st in ("pending", "running"):
                if runner.paused(rows[t.id])[0] != step:
                    waiting += 1
                    continue
                curve = dict(map(tuple, store.curves_of(t.id).get(eval_curve(metric), [])))
                values.setdefault(config[t.id], {})[t.seed] = float(curve[float(step)])
            elif st == "diverged":  # counts as the worst value (see decide_rung)
                values.setdefault(config[t.id], {})[t.seed] = math.nan
        if waiting:
            runner.note(f"--prune: {waiting} trial(s) did not reach step {step} (interrupted); "
                        "run again to resume and decide this rung")  # fmt: skip
            return ran
        if not values:
            continue
        dec = decide_rung(values, step, higher_is_better=HIGHER_IS_BETTER[metric],
                          eta=settings.eta, alpha=settings.alpha,
                          tolerance=settings.tolerance)  # fmt: skip
        means = {c: float(sum(v.values()) / len(v)) for c, v in values.items()}
        state["decisions"].append({**asdict(dec), "means": means,
                                   "seeds": {c: len(v) for c, v in values.items()}})  # fmt: skip
        store.set_meta(prune=state)
        runner.note(
            f"-- rung at step {step}: best {dec.best} ({metric} {means[dec.best]:.4g}); "
            + (f"dropped {', '.join(dec.drop)}" if dec.drop else "nothing dropped")
        )
    return ran


def estimate_peaks(trials: list[Trial]) -> dict[str, float]:
    """The estimator's predicted peak memory of each trial (meta device, no weights), so the
    report can set it against the measured peak. One estimate call per configuration group
    (all ranks at once); variants the estimator does not model (AdaLoRA, rank patterns) and any
    failure are skipped: an estimate is extra information, never a reason to stop."""
    from lorasweep.tools.estimate import estimate
    from lorasweep.training.models import pick_device

    device = pick_device()
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        ad = t.config["adapter"]
        if ad["method"] == "adalora" or ad.get("rank_pattern"):
            continue
        key = json.dumps({**t.config, "adapter": {**ad, "r": None}}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(t)
    out: dict[str, float] = {}
    for members in groups.values():
        cfg, ad = members[0].config, members[0].config["adapter"]
        training = cfg.get("training") or {}
        precision = ad.get("precision", "fp32")
        try:
            res = estimate(
                cfg["model"],
                ranks=sorted({t.config["adapter"]["r"] for t in members}),
                targets=ad.get("target_modules") or "default",
                variant="qlora" if ad.get("quantization") == "4bit" else ad["method"],
                task=cfg["task"],
                batch=int(training.get("per_device_train_batch_size", 8)),
                seq=int(cfg["dataset"]["max_length"]),
                dtype={"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[precision],
                weights_dtype="fp32",
                optimizer="adamw",
                gradient_checkpointing=bool(training.get("gradient_checkpointing", False)),
                device="cpu" if device != "cuda" else "cuda",
                lora_dropout=float(ad.get("dropout") or 0.0),
            )
        except Exception:  # noqa: BLE001 - see docstring
            continue
        by_rank = {row["rank"]: float(row["total_bytes"]) for row in res.rows}
        for t in members:
            if t.config["adapter"]["r"] in by_rank:
                out[t.id] = by_rank[t.config["adapter"]["r"]]
    return out


def _has_work(out: Path, trials: list[Trial], retry: set[str]) -> bool:
    if not (out / "lorasweep.db").exists():
        return True
    with open_store(out) as store:
        return bool(select_trials(store, trials, retry)[0])


def _prepare_data(
    spec: SweepSpec, out: Path, fingerprint: str | None = None
) -> tuple[int, dict[str, int]]:
    """Tokenize once in the parent, so trials (in any worker) only load the cached dataset.
    Returns the number of training examples (rows of the tokenized train split) and the rows
    de-duplication dropped before the split."""
    import datasets

    from lorasweep.training import data, models

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # "Map: 100%" bars would fill a CI log
    tok = models.load_tokenizer(spec.model)
    train, _, info = data.prepare(
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


def _adapter_path(run_dir: Path, stored: str) -> Path:
    """Adapters are stored relative to the run folder (older runs: to the working directory)."""
    inside = run_dir / stored
    return inside if inside.exists() or not Path(stored).exists() else Path(stored)


def write_run_report(run_dir: str | Path, **kwargs: Any) -> Path | None:
    """Build run_dir/report.html from the store (stats, plots, spectra)."""
    from lorasweep.analysis.report import build_report

    run_dir = Path(run_dir)
    with open_store(run_dir) as store:
        rows = store.trials()
        trials, curves, meta = store.trials_frame(rows), store.curves_frame(), store.meta()
    meta["environment"] = next((t["environment"] for t in rows if t["environment"]), {})
    adapters = {
        t["label"]: _adapter_path(run_dir, t["artifacts"]["adapter_dir"])
        for t in rows
        if t["status"] == "complete" and t["artifacts"].get("adapter_dir")
    }
    if trials.empty or trials["status"].ne("complete").all():
        return None  # nothing measured yet: `lorasweep status` shows the failures
    sections = []
    if meta.get("prune"):
        from lorasweep.analysis.stats import analyze, group_label
        from lorasweep.run.pruning import pruning_section_html, pruning_summary

        rec = analyze(trials, **kwargs.get("analysis_kwargs", {}) or {}).get("recommended")
        html = pruning_section_html(
            pruning_summary(meta["prune"], trials), group_label(rec["key"]) if rec else None
        )
        sections.append({"title": "Pruning", "html": html})
    if adapters:
        try:
            from lorasweep.tools.spectrum import spectrum_section_html
            from lorasweep.tools.spectrum_verify import verify_report_info

            existing = {k: v for k, v in adapters.items() if v.exists()}
            if existing:
                verify = verify_report_info(meta, trials)  # `spectrum --verify` variants marked
                html = spectrum_section_html(existing, verify=verify)
                sections.append({"title": "Adapter spectra", "html": html})
        except Exception as e:  # noqa: BLE001 - an extra section never blocks the report
            sections.append({"title": "Adapter spectra", "html": f"<p>not available: {e}</p>"})
    return build_report(trials, curves, meta, run_dir, extra_sections=sections, **kwargs)

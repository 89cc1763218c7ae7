"""run_sweep: validate, plan, store, run what is not finished, record every result, report.

The parent process is the only writer of the store. Each result is written the moment its trial
ends, in one transaction, so killing the sweep at any point loses only the trials that were
running; they are re-run on resume, and finished trials are never run twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from lorasweep.backends import RunContext, get_backend
from lorasweep.results import Trial, TrialResult, TrialStatus
from lorasweep.spec import SweepSpec, parse_spec
from lorasweep.store import open_store

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
        self._line(
            f"[{self.done}/{self.total}] {result.status.value:8s} {label} "
            f"{shown}{err} in {_fmt_secs(self.durations[-1])} | {self._eta()}",
            True,
        )


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def load_spec(source: str | Path | dict[str, Any]) -> SweepSpec:
    """Parse a spec (path, YAML text or dict) and check it against the world; SpecError if bad."""
    from lorasweep.validate import check_spec

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
) -> SweepOutcome:
    """Run (or resume) a sweep into ``out_dir`` and return what happened."""
    bad = set(retry) - set(RETRYABLE)
    if bad:
        raise ValueError(f"--retry: unknown status {sorted(bad)[0]!r}; choose from failed, oom")
    if not isinstance(spec, SweepSpec):
        spec = parse_spec(spec)
    out = Path(out_dir)
    be = get_backend(backend, jobs=jobs, address=address)
    trials = spec.trials()
    if hasattr(be, "warm_up") and _has_work(out, trials, set(retry)):
        be.warm_up()  # worker imports overlap the checks below
    if not validated:
        from lorasweep.validate import check_spec

        check_spec(spec)
    with open_store(out, create=True) as store:
        store.set_meta(
            name=spec.name,
            task=spec.task,
            spec=spec.model_dump(mode="json"),
            spec_yaml=yaml.safe_dump(
                spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False
            ),
        )
        store.add_trials(trials)
        todo, skipped = select_trials(store, trials, set(retry))
        ran = 0
        if todo:
            _prepare_data(spec, out)
            progress = Progress(len(todo), jobs, quiet=quiet)

            def on_start(t: Trial) -> None:
                store.mark_running(t.id)
                progress.start(t)

            ctx = RunContext(
                out_dir=out,
                cache_root=out / "cache",
                name=spec.name,
                on_start=on_start,
                on_progress=progress.progress,
            )
            estimates = estimate_peaks(todo)
            for result in be.run(todo, ctx):
                adapter = result.artifacts.get("adapter_dir")
                if adapter:  # relative to the run folder, so the folder can be moved
                    result.artifacts["adapter_dir"] = os.path.relpath(adapter, out)
                if result.trial_id in estimates:
                    result.metrics["estimated_peak_bytes"] = estimates[result.trial_id]
                store.save_result(result)
                progress.finish(result)
                ran += 1
        statuses: dict[str, int] = {}
        planned_ids = {t.id for t in trials}
        for t in store.trials():
            if t["id"] in planned_ids:
                statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    outcome = SweepOutcome(out, len(trials), ran, skipped, statuses)
    if report and (ran or not (out / "report.html").exists()):
        outcome.report = write_run_report(out)
    elif report:
        outcome.report = out / "report.html"
    return outcome


def estimate_peaks(trials: list[Trial]) -> dict[str, float]:
    """The estimator's predicted peak memory of each trial (meta device, no weights), so the
    report can set it against the measured peak. One estimate call per configuration group
    (all ranks at once); variants the estimator does not model (AdaLoRA, rank patterns) and any
    failure are skipped: an estimate is extra information, never a reason to stop."""
    from lorasweep.estimate import estimate
    from lorasweep.models import pick_device

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


def _prepare_data(spec: SweepSpec, out: Path) -> None:
    """Tokenize once in the parent, so trials (in any worker) only load the cached dataset."""
    import datasets

    from lorasweep import data, models

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # "Map: 100%" bars would fill a CI log
    tok = models.load_tokenizer(spec.model)
    data.prepare(spec.dataset.model_dump(), spec.task, spec.model, tok, out / "cache")


def _adapter_path(run_dir: Path, stored: str) -> Path:
    """Adapters are stored relative to the run folder (older runs: to the working directory)."""
    inside = run_dir / stored
    return inside if inside.exists() or not Path(stored).exists() else Path(stored)


def write_run_report(run_dir: str | Path, **kwargs: Any) -> Path | None:
    """Build run_dir/report.html from the store (stats, plots, spectra)."""
    from lorasweep.report import build_report

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
    if adapters:
        try:
            from lorasweep.spectrum import spectrum_section_html
            from lorasweep.verify import verify_report_info

            existing = {k: v for k, v in adapters.items() if v.exists()}
            if existing:
                verify = verify_report_info(meta, trials)  # `spectrum --verify` variants marked
                html = spectrum_section_html(existing, verify=verify)
                sections.append({"title": "Adapter spectra", "html": html})
        except Exception as e:  # noqa: BLE001 - an extra section never blocks the report
            sections.append({"title": "Adapter spectra", "html": f"<p>not available: {e}</p>"})
    return build_report(trials, curves, meta, run_dir, extra_sections=sections, **kwargs)

"""The live display of a sweep: one line on a terminal, one line per trial event otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from lorasweep.analysis.units import fmt_clock
from lorasweep.records import HEADLINE_METRICS, Trial, TrialResult, TrialStatus, paused_of


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
        return f"ETA {fmt_clock(secs)}"

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
        shown = ", ".join(f"{k}={m[k]:.4g}" for k in HEADLINE_METRICS if k in m)
        label = trial.label if trial else result.trial_id
        err = f" ({(result.error or '').splitlines()[-1][:120]})" if result.error else ""
        paused = paused_of(result.artifacts)
        status = f"paused@{paused['step']}" if paused else result.status.value
        if result.status == TrialStatus.PENDING and not paused:
            status = "interrupted"
        self._line(
            f"[{self.done}/{self.total}] {status:8s} {label} "
            f"{shown}{err} in {fmt_clock(self.durations[-1])} | {self._eta()}",
            True,
        )

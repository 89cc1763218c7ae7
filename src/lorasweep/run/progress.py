"""The live display of a sweep, picked by where it is shown:

- a terminal: ``rich.progress`` rows, one per running trial (step/total and a bar) under a sweep
  row (trials done, ETA); each finished trial's line is printed above the rows;
- Jupyter: ``tqdm.auto`` bars (widgets with ipywidgets, text bars without, and no TqdmWarning);
- anything else (CI logs, pipes): plain lines, a start and an end line per trial and a status
  line at most every ``PLAIN_EVERY`` seconds, no control characters;
- ``quiet``: nothing.

Behind all four is one count of the work (``StepCount``): the steps each trial reports, from
which the sweep's ETA is computed while trials run, not only when one ends.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from lorasweep.analysis.units import fmt_clock
from lorasweep.records import HEADLINE_METRICS, Trial, TrialResult, TrialStatus, paused_of

PLAIN_EVERY = 30.0  # seconds between status lines in a log (a CI job, a pipe)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (notebook, lab, VS Code, Colab), where output is not a
    terminal but bars are drawn (tqdm.auto's test, without importing IPython)."""
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)


def notebook_tqdm() -> type:
    """``tqdm.auto.tqdm``, imported without its warning. In a kernel without ipywidgets the
    first import of ``tqdm.autonotebook`` warns "IProgress not found" (a TqdmWarning) and falls
    back to text bars; transformers, datasets and huggingface_hub all import ``tqdm.auto``, so
    the warning used to surface in the cell that first loaded them. Imported here first, under
    a filter, the module is cached and nobody's later import warns."""
    from tqdm.std import TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm

    return tqdm


if in_notebook():  # before a sweep imports transformers (whose import of tqdm.auto would warn)
    notebook_tqdm()


@dataclass
class Running:
    """A trial in flight, as far as its step reports tell."""

    trial: Trial
    t0: float
    step: int = 0
    target: int = 0  # the step this run ends at: max_steps, or the rung it pauses at
    base: int | None = None  # the step it started from (> 0: a resumed segment); None: no report


class StepCount:
    """Trials and steps: done, running, left; and the ETA from the steps run so far.

    The ETA is the steps left (the running trials' remainders, plus the trials not yet started
    at the mean size of those that reported) over the sweep's throughput (steps run, finished
    trials' and running ones', per second since the first step was reported: the first model
    load, which would weigh on the early estimates, is left out; later loads and evaluations are
    in the rate). Without step reports (the Ray backend) the ETA comes from the durations of
    finished trials."""

    def __init__(self, total: int, jobs: int, clock: Callable[[], float],
                 stops: dict[str, int] | None = None):  # fmt: skip
        self.total, self.jobs, self.clock = total, max(1, jobs), clock
        self.stops = stops or {}
        self.done = 0
        self.running: dict[str, Running] = {}
        self.durations: list[float] = []
        self.steps_ended = 0  # steps run in this sweep by trials that have ended
        self.sizes: list[int] = []  # steps planned for the ended trials that reported steps
        self.first: tuple[float, int] | None = None  # (time, steps done) at the first report

    def start(self, trial: Trial) -> Running:
        self.running[trial.id] = run = Running(trial, self.clock())
        return run

    def step(self, trial_id: str, step: int, total: int) -> Running | None:
        run = self.running.get(trial_id)
        if run is None:
            return None
        stop = self.stops.get(trial_id)
        run.target = min(total, stop) if stop else total
        if run.base is None:  # the first report comes after the first step of this run
            run.base = max(0, min(step - 1, run.target - 1))
        run.step = step
        if self.first is None:
            self.first = (self.clock(), self.steps()[0])
        return run

    def end(self, trial_id: str) -> tuple[Running | None, float]:
        """The trial's run (None if it never started) and its duration."""
        run = self.running.pop(trial_id, None)
        self.done += 1
        secs = self.clock() - run.t0 if run else 0.0
        self.durations.append(secs)
        if run is not None and run.base is not None:
            self.steps_ended += run.step - run.base
            self.sizes.append(run.target - run.base)
        return run, secs

    def steps(self) -> tuple[int, int | None]:
        """(steps run in this sweep, steps it takes in all); the total is None until a trial
        reports, and an estimate while some have not."""
        reported = [r for r in self.running.values() if r.base is not None]
        done = self.steps_ended + sum(r.step - r.base for r in reported)
        sizes = self.sizes + [r.target - r.base for r in reported]
        if not sizes:
            return done, None
        unreported = max(0, self.total - self.done - len(reported))
        left = sum(max(0, r.target - r.step) for r in reported)
        return done, done + left + round(unreported * sum(sizes) / len(sizes))

    def eta_seconds(self) -> float | None:
        done, planned = self.steps()
        now = self.clock()
        t, then = self.first or (now, done)
        if planned is not None and done > then and now > t:
            return (planned - done) * (now - t) / (done - then)
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        running = sum(now - r.t0 for r in self.running.values())
        return max(0.0, ((self.total - self.done) * mean - running) / self.jobs)

    def eta(self) -> str:
        secs = self.eta_seconds()
        return "ETA -" if secs is None else f"ETA {fmt_clock(secs)}"

    def status(self) -> str:
        """The running trials and the ETA: ``[2/6 done] lora/r=8/seed=0 step 40/80 | ETA 4m40s``."""
        parts = [f"{r.trial.label} step {r.step}/{r.target or '?'}" for r in self.running.values()]
        return f"[{self.done}/{self.total} done] " + " | ".join([*parts, self.eta()])


class Progress:
    """The sweep's display; ``mode`` (default: picked from the stream) is "rich", "notebook",
    "plain" or "quiet". Used as a context manager so a live display always ends (Ctrl-C too).

    ``stops`` maps a trial id to the step its segment pauses at (a pruning rung), so its bar and
    the ETA count to there. ``clock`` and ``every`` (seconds between plain status lines) are for
    tests."""

    def __init__(
        self,
        total: int,
        jobs: int,
        stream: TextIO | None = None,
        quiet: bool = False,
        *,
        stops: dict[str, int] | None = None,
        mode: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float = PLAIN_EVERY,
    ):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.count = StepCount(total, jobs, clock, stops)
        self.mode = mode or pick_mode(self.stream, quiet)
        self.tty = self.mode == "rich"
        self.view: Any = {
            "rich": lambda: RichView(self.count, self.stream),
            "notebook": lambda: TqdmView(self.count, self.stream),
            "plain": lambda: PlainView(self.count, self.stream, every),
            "quiet": NullView,
        }[self.mode]()

    @property
    def total(self) -> int:
        return self.count.total

    @property
    def done(self) -> int:
        return self.count.done

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the live display (its rows vanish; the finished trials' lines stay)."""
        self.view.close()

    def start(self, trial: Trial) -> None:
        run = self.count.start(trial)
        eta = self.count.eta()
        line = f"[{self.done + 1}/{self.total}] start {trial.label} ({trial.id})"
        self.view.start(run, line + (f" | {eta}" if eta != "ETA -" else ""))

    def progress(self, trial_id: str, step: int, total: int) -> None:
        run = self.count.step(trial_id, step, total)
        if run is not None:
            self.view.step(run)

    def finish(self, result: TrialResult) -> None:
        run, secs = self.count.end(result.trial_id)
        m = result.metrics
        shown = ", ".join(f"{k}={m[k]:.4g}" for k in HEADLINE_METRICS if k in m)
        label = run.trial.label if run else result.trial_id
        err = f" ({(result.error or '').splitlines()[-1][:120]})" if result.error else ""
        paused = paused_of(result.artifacts)
        status = f"paused@{paused['step']}" if paused else result.status.value
        if result.status == TrialStatus.PENDING and not paused:
            status = "interrupted"
        line = (
            f"[{self.done}/{self.total}] {status:8s} {label} "
            f"{shown}{err} in {fmt_clock(secs)} | {self.count.eta()}"
        )
        self.view.finish(run, line)


def pick_mode(stream: TextIO, quiet: bool) -> str:
    if quiet:
        return "quiet"
    if in_notebook():
        return "notebook"
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty() and importlib.util.find_spec("rich") is not None:
        return "rich"
    return "plain"


class NullView:
    """``quiet``: nothing at all."""

    def start(self, run: Running, line: str) -> None:
        pass

    def step(self, run: Running) -> None:
        pass

    def finish(self, run: Running | None, line: str) -> None:
        pass

    def close(self) -> None:
        pass


class PlainView(NullView):
    """Whole lines only, for a log: start and end lines, and a status line (running trials'
    steps and the ETA) when a step is reported ``every`` seconds or more after the last line."""

    def __init__(self, count: StepCount, stream: TextIO, every: float):
        self.count, self.stream, self.every = count, stream, every
        self.last = count.clock()

    def write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last = self.count.clock()

    def start(self, run: Running, line: str) -> None:
        self.write(line)

    def step(self, run: Running) -> None:
        if self.count.clock() - self.last >= self.every:
            self.write(self.count.status())

    def finish(self, run: Running | None, line: str) -> None:
        self.write(line)


class RichView(NullView):
    """``rich.progress`` rows on a terminal: the sweep (trials done, steps bar, ETA) and one
    transient row per running trial; finished trials' lines are printed above the rows."""

    def __init__(self, count: StepCount, stream: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self.count = count
        # force_terminal: this view is picked for a terminal, or asked for (tests, a pager)
        console = Console(file=stream, force_terminal=True, highlight=False)
        out_isatty = getattr(sys.stdout, "isatty", None)
        self.live = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[eta]}"),
            console=console,
            transient=True,
            # stderr (the console's stream) is printed above the rows; stdout only when it is
            # this terminal too (``lorasweep run > file`` keeps its stdout in the file)
            redirect_stdout=bool(callable(out_isatty) and out_isatty()),
            redirect_stderr=True,
        )
        self.sweep = self.live.add_task("sweep", total=None, count="", eta="")
        self.rows: dict[str, Any] = {}
        self.live.start()
        self.update_sweep()

    def update_sweep(self) -> None:
        done, planned = self.count.steps()
        count = f"{self.count.done}/{self.count.total} trials"
        self.live.update(self.sweep, completed=done, total=planned, count=count,
                         eta=self.count.eta())  # fmt: skip

    def start(self, run: Running, line: str) -> None:
        self.rows[run.trial.id] = self.live.add_task(f"  {run.trial.label}", total=None,
                                                     count="starting", eta="")  # fmt: skip
        self.update_sweep()
        self.live.refresh()

    def step(self, run: Running) -> None:
        row = self.rows.get(run.trial.id)
        if row is not None:
            self.live.update(row, completed=run.step, total=run.target or None,
                             count=f"{run.step}/{run.target}")  # fmt: skip
        self.update_sweep()

    def finish(self, run: Running | None, line: str) -> None:
        row = self.rows.pop(run.trial.id, None) if run else None
        if row is not None:
            self.live.remove_task(row)
        self.update_sweep()
        self.live.refresh()  # the rows redrawn under the line are the rows now
        self.live.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.live.stop()


class TqdmView(NullView):
    """``tqdm.auto`` in Jupyter: a sweep bar over steps (trials done and the ETA beside it);
    with ipywidgets a bar per running trial too, without them (text bars, where stacked bars
    would need cursor moves a notebook does not draw) the running trials' steps beside the
    sweep bar. Start and end lines of each trial are written above the bars."""

    FORMAT = "{desc} {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} steps{postfix}"

    def __init__(self, count: StepCount, stream: TextIO):
        self.count, self.stream = count, stream
        self.tqdm = notebook_tqdm()
        self.widgets = any(c.__module__ == "tqdm.notebook" for c in self.tqdm.__mro__)
        # a widget draws "{bar}" itself (a sized "{bar:20}" would be drawn as text beside it)
        fmt = self.FORMAT.replace("{bar:20}", "{bar}") if self.widgets else self.FORMAT
        self.bar = self.tqdm(total=None, desc="sweep", file=stream, bar_format=fmt)
        self.rows: dict[str, Any] = {}
        self.update_sweep(refresh=True)

    def write(self, line: str) -> None:
        self.tqdm.write(line, file=self.stream)

    def update_sweep(self, refresh: bool = False) -> None:
        done, planned = self.count.steps()
        parts = [f"{self.count.done}/{self.count.total} trials", self.count.eta()]
        if not self.widgets:
            parts += [f"{r.trial.label} {r.step}/{r.target or '?'}"
                      for r in self.count.running.values()]  # fmt: skip
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        advance(self.bar, done, planned)
        if refresh:
            self.bar.refresh()

    def start(self, run: Running, line: str) -> None:
        if self.widgets:
            self.rows[run.trial.id] = self.tqdm(total=None, desc=run.trial.label, leave=False)
        else:
            self.write(line)
        self.update_sweep(refresh=True)

    def step(self, run: Running) -> None:
        row = self.rows.get(run.trial.id)
        if row is not None:
            advance(row, run.step, run.target)
        self.update_sweep()

    def finish(self, run: Running | None, line: str) -> None:
        row = self.rows.pop(run.trial.id, None) if run else None
        if row is not None:
            row.close()
        self.write(line)
        self.update_sweep(refresh=True)

    def close(self) -> None:
        for row in self.rows.values():
            row.close()
        self.bar.close()


def advance(bar: Any, n: int, total: int | None) -> None:
    """Move a tqdm bar to ``n`` of ``total``. A new total goes through ``reset`` (a widget's
    bar only learns its maximum there); otherwise ``update`` redraws at most every 0.1 s."""
    if total is not None and total != bar.total:
        bar.reset(total=total)
    bar.update(n - bar.n)

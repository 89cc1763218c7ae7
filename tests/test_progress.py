"""The sweep's live display, driven with fake trials, step reports and a fake clock: plain lines
in a log, rich rows on a terminal, tqdm bars in Jupyter (without tqdm's warning), nothing when
quiet; the ETA comes from steps, so it is there before any trial ends."""

from __future__ import annotations

import importlib
import importlib.util
import io
import re
import sys
import types
import warnings

import pytest

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.run import progress as progress_mod
from lorasweep.run.progress import Progress, StepCount, pick_mode

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
IN_NOTEBOOK = progress_mod.in_notebook  # the real detector (an autouse fixture replaces it)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _trials(n: int = 3) -> list[Trial]:
    ranks = [2, 8, 32, 64][:n]
    return [Trial(config={"r": r}, variant="lora", rank=r, seed=0) for r in ranks]


def _drive(p: Progress, clock: Clock, trials: list[Trial], upto: int = 10) -> None:
    """Two trials at once, 10 steps each, one step a second; the first ends, the third starts."""
    p.start(trials[0])
    p.start(trials[1])
    for k in range(1, upto + 1):
        clock.now += 1
        p.progress(trials[0].id, k, 10)
        p.progress(trials[1].id, k, 10)
    if upto == 10:
        p.finish(TrialResult(trials[0].id, TrialStatus.COMPLETE, metrics={"accuracy": 0.8}))
        p.start(trials[2])


@pytest.fixture(autouse=True)
def not_a_notebook(monkeypatch):
    monkeypatch.setattr(progress_mod, "in_notebook", lambda: False)


# ------------------------------------------------------------------------------ the step count


def test_eta_comes_from_steps_of_running_and_finished_trials():
    clock, trials = Clock(), _trials()
    count = StepCount(3, 2, clock)
    for t in trials[:2]:
        count.start(t)
    assert count.eta() == "ETA -"  # nothing reported, nothing ended
    clock.now += 1
    count.step(trials[0].id, 1, 10)
    assert count.eta() == "ETA -"  # one report: no rate yet (the time to it is the model load)
    count.step(trials[1].id, 1, 10)
    for k in range(2, 6):
        clock.now += 1
        count.step(trials[0].id, k, 10)
        count.step(trials[1].id, k, 10)
    # 10 steps of 30: 10 left to the running two, 10 for the third (their mean size); the rate
    # is from the first report: 9 steps in 4 s
    assert count.steps() == (10, 30) and count.eta_seconds() == pytest.approx(20 * 4 / 9)
    assert count.eta() == "ETA 9s"
    for k in range(6, 11):
        clock.now += 1
        count.step(trials[0].id, k, 10)
    count.end(trials[0].id)
    assert count.steps() == (15, 30)  # the ended trial's steps still count as done
    assert count.eta_seconds() == pytest.approx(15 * 9 / 14)


def test_a_resumed_segment_counts_from_its_checkpoint_to_its_rung():
    clock, (t,) = Clock(), _trials(1)
    count = StepCount(1, 1, clock, stops={t.id: 40})
    count.start(t)
    clock.now += 2
    run = count.step(t.id, 21, 80)  # resumed from step 20, pauses at the rung at 40
    assert run is not None and (run.base, run.target) == (20, 40)
    clock.now += 2
    count.step(t.id, 22, 80)
    assert count.steps() == (2, 20) and count.eta() == "ETA 36s"  # 18 steps left at 2 s each


def test_without_step_reports_the_eta_comes_from_trial_durations():
    clock, trials = Clock(), _trials()
    out = io.StringIO()
    p = Progress(3, 1, stream=out, clock=clock)
    p.start(trials[0])
    clock.now += 10
    p.finish(TrialResult(trials[0].id, TrialStatus.COMPLETE))  # the Ray backend: no steps
    assert out.getvalue().splitlines()[-1].endswith("in 10s | ETA 20s")


# ------------------------------------------------------------------------- plain lines (a log)


def test_a_log_gets_plain_lines_and_an_eta_before_any_trial_ends():
    clock, trials = Clock(), _trials()
    out = io.StringIO()
    p = Progress(3, 2, stream=out, clock=clock, every=5)
    assert p.mode == "plain"
    with p:
        _drive(p, clock, trials)
        p.finish(TrialResult(trials[1].id, TrialStatus.FAILED, error="Traceback\nValueError: x"))
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert lines[:2] == [f"[1/3] start {t.label} ({t.id})" for t in trials[:2]]
    first_end = next(i for i, x in enumerate(lines) if "complete" in x)
    status = [x for x in lines[:first_end] if x.startswith("[0/3 done]")]
    # a status line 5 s after the last line: 9 steps done, 8 of them in the 4 s since the first
    # report, 21 left (11 + 10 for the third trial, the mean size of the two that reported)
    assert status == [
        "[0/3 done] lora/r=2/seed=0 step 5/10 | lora/r=8/seed=0 step 4/10 | ETA 10s",
        "[0/3 done] lora/r=2/seed=0 step 10/10 | lora/r=8/seed=0 step 9/10 | ETA 6s",
    ]
    assert lines[first_end] == "[1/3] complete lora/r=2/seed=0 accuracy=0.8 in 10s | ETA 5s"
    assert lines[first_end + 1] == f"[2/3] start lora/r=32/seed=0 ({trials[2].id}) | ETA 5s"
    assert lines[-1] == "[2/3] failed   lora/r=8/seed=0  (ValueError: x) in 10s | ETA 5s"


def test_quiet_writes_nothing():
    clock, trials = Clock(), _trials()
    out = io.StringIO()
    with Progress(3, 2, stream=out, quiet=True, clock=clock) as p:
        _drive(p, clock, trials)
    assert p.mode == "quiet" and out.getvalue() == ""


def test_the_mode_follows_the_stream(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert pick_mode(io.StringIO(), quiet=False) == "plain"
    assert pick_mode(Tty(), quiet=False) == "rich"
    assert pick_mode(Tty(), quiet=True) == "quiet"
    monkeypatch.setattr(progress_mod, "in_notebook", lambda: True)
    assert pick_mode(io.StringIO(), quiet=False) == "notebook"


# ---------------------------------------------------------------------------- rich (a terminal)


def test_a_terminal_gets_a_row_per_running_trial_and_the_sweep_eta():
    clock, trials = Clock(), _trials()
    out = io.StringIO()
    stderr = sys.stderr
    with Progress(3, 2, stream=out, mode="rich", clock=clock) as p:
        _drive(p, clock, trials, upto=5)
        p.view.live.refresh()
        frame = ANSI.sub("", out.getvalue()).rsplit("sweep", 1)[1]
        assert "0/3 trials ETA 9s" in frame
        assert re.search(r"lora/r=2/seed=0 +[━╺]+ 5/10", frame)
        assert re.search(r"lora/r=8/seed=0 +[━╺]+ 5/10", frame)
        assert sys.stderr is not stderr  # stderr is printed above the rows while they are live
        for k in range(6, 11):
            clock.now += 1
            p.progress(trials[0].id, k, 10)
        p.finish(TrialResult(trials[0].id, TrialStatus.COMPLETE, metrics={"accuracy": 0.8}))
    assert sys.stderr is stderr
    text = ANSI.sub("", out.getvalue())
    line = "[1/3] complete lora/r=2/seed=0 accuracy=0.8 in 10s | ETA 10s"
    assert line + "\n" in text  # one whole line, printed above the rows
    after = text.rsplit(line, 1)[1]
    assert "lora/r=8/seed=0" in after and "lora/r=2/seed=0" not in after  # its row went
    assert "1/3 trials ETA 10s" in after
    assert out.getvalue().endswith("\x1b[2K") and "\x1b[?25h" in out.getvalue()  # rows erased


def test_the_rows_end_on_ctrl_c():
    clock, trials = Clock(), _trials()
    out, stderr = io.StringIO(), sys.stderr
    with (
        pytest.raises(KeyboardInterrupt),
        Progress(3, 2, stream=out, mode="rich", clock=clock) as p,
    ):
        _drive(p, clock, trials, upto=3)
        raise KeyboardInterrupt
    assert sys.stderr is stderr and "\x1b[?25h" in out.getvalue()  # the cursor is back


# ----------------------------------------------------------------------------- Jupyter (tqdm)

TQDM_MODULES = ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook")


class ZMQInteractiveShell:
    """What ``get_ipython()`` returns in a Jupyter kernel, as far as the detectors look."""


@pytest.fixture
def fake_kernel(monkeypatch):
    """A Jupyter kernel as tqdm and ``in_notebook`` see it (no IPython is installed here), with
    tqdm.auto not imported yet; sys.modules and the tqdm package are put back afterwards."""
    import tqdm

    monkeypatch.setattr(progress_mod, "in_notebook", IN_NOTEBOOK)  # the real one, fooled
    names = (*TQDM_MODULES, "IPython", "ipykernel", "ipykernel.zmqshell")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    attrs = {n: getattr(tqdm, n) for n in ("auto", "autonotebook", "notebook") if hasattr(tqdm, n)}
    for n in TQDM_MODULES:
        sys.modules.pop(n, None)
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    sys.modules.update({"IPython": ipython, "ipykernel": types.ModuleType("ipykernel"),
                        "ipykernel.zmqshell": types.ModuleType("ipykernel.zmqshell")})  # fmt: skip
    yield
    for n in names:
        sys.modules.pop(n, None)
    sys.modules.update(saved)
    for n in ("auto", "autonotebook", "notebook"):
        if n in attrs:
            setattr(tqdm, n, attrs[n])
        elif hasattr(tqdm, n):
            delattr(tqdm, n)


def test_the_fake_kernel_reproduces_the_tqdm_warning(fake_kernel):
    from tqdm.std import TqdmWarning

    assert progress_mod.in_notebook()
    with pytest.warns(TqdmWarning, match="IProgress not found"):
        importlib.import_module("tqdm.auto")  # as transformers or datasets import it


def test_a_notebook_gets_tqdm_bars_and_no_tqdm_warning(fake_kernel):
    from tqdm.std import TqdmWarning
    from tqdm.std import tqdm as std_tqdm

    clock, trials = Clock(), _trials()
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Progress(3, 2, stream=out, clock=clock) as p:
            assert p.mode == "notebook"
            _drive(p, clock, trials)
            importlib.import_module("tqdm.auto")  # transformers' import, later: no warning
        assert isinstance(p.view.bar, std_tqdm) and not p.view.widgets  # no ipywidgets here
    assert not [w for w in caught if issubclass(w.category, TqdmWarning)], caught
    text = out.getvalue()
    assert "\x1b" not in text  # text bars redraw with \r only, which a notebook draws
    assert f"[1/3] start lora/r=2/seed=0 ({trials[0].id})\n" in text
    assert "[1/3] complete lora/r=2/seed=0 accuracy=0.8 in 10s | ETA 5s\n" in text
    last = text.rsplit("\r", 1)[1]  # the sweep bar as it was left
    assert last.startswith("sweep  67%") and "20/30 steps, 1/3 trials, ETA 5s" in last


def test_importing_progress_in_a_kernel_keeps_later_tqdm_imports_quiet(fake_kernel, monkeypatch):
    """The sweep imports this module before transformers: tqdm.auto is then imported already,
    quietly, and transformers' or datasets' import of it gives no warning."""
    copy = importlib.util.spec_from_file_location("progress_copy", progress_mod.__file__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.util.module_from_spec(copy)
        monkeypatch.setitem(sys.modules, copy.name, module)  # a copy: Progress stays the same
        copy.loader.exec_module(module)  # the module's import
        assert "tqdm.autonotebook" in sys.modules
        importlib.import_module("tqdm.auto")

"""Successive halving over configurations, dropping only what the seeds show to be worse.

The rung schedule (``rung_steps``) and the orchestration, in the parent process (no torch):
``PruneSettings``, ``merge_segments`` (one trial's result from the segments it ran between
rungs) and ``run_pruned``, the rung loop that ``run.sweep`` calls with its runner: it pauses
trials at rungs and stores dropped ones as ``pruned`` (docs/scaling.md, "Pruning").

Which configurations a rung drops is decided by ``analysis.compare.decide_rung``:

1. rank configurations by their mean metric over seeds; the best is the reference;
2. plain successive halving would drop all but the top ``1/eta``; here those are only
   *candidates* for dropping;
3. a candidate is dropped only if it is significantly worse than the best at this rung: a one-sided
   paired t-test on the common seeds (the seed is a blocking factor, as in ``stats``), Welch's
   t-test when fewer than ``compare.MIN_PAIRS`` seeds are shared, Holm-adjusted across the
   candidates of the rung, at level ``alpha``;
4. with a single seed there is no test, so nothing is dropped: pruning needs seeds.

So a rung never drops more than plain successive halving would, and usually less.

The two helpers
a trial needs, ``plan.planned_steps`` and ``records.eval_curve``, live in import-light modules so
that a worker does not import scipy/statsmodels for them.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from lorasweep.analysis.compare import ALPHA, RungDecision, decide_rung
from lorasweep.analysis.explain import group_label
from lorasweep.plan import planned_steps
from lorasweep.records import (
    HIGHER_IS_BETTER,
    TASK_METRICS,
    Trial,
    TrialResult,
    TrialStatus,
    eval_curve,
    paused_of,
)

__all__ = [
    "RUNG_METRICS",
    "PruneSettings",
    "RungDecision",
    "check_prune_settings",
    "decide_rung",
    "merge_segments",
    "planned_steps",
    "rung_steps",
    "run_pruned",
]


@dataclass(frozen=True)
class PruneSettings:
    """``--prune`` options: the halving factor, the first rung's minimum steps, the test level."""

    eta: int = 2
    min_steps: int = 10
    alpha: float = ALPHA
    metric: str | None = None
    """the eval metric compared at rungs; default the task's (accuracy, perplexity)."""
    tolerance: float = 0.0
    """drop only configurations worse than the best by more than this (metric units)."""
    eval_examples: int | None = None
    """rung evaluations on the first N eval examples (None: all); the final one uses all."""

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ValueError(f"--prune-eta: must be >= 2, got {self.eta}")
        if self.min_steps < 1:
            raise ValueError(f"--prune-min-steps: must be >= 1, got {self.min_steps}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"--prune-alpha: must be in (0, 1), got {self.alpha}")
        if self.tolerance < 0:
            raise ValueError(f"--prune-tolerance: must be >= 0, got {self.tolerance}")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise ValueError(f"--prune-eval-examples: must be >= 1, got {self.eval_examples}")

    def metric_for(self, task: str) -> str:
        """The rung metric for a task, checked against what the task's evaluation produces."""
        choices = RUNG_METRICS[task]
        if self.metric is None:
            return choices[0]
        if self.metric not in choices:
            raise ValueError(
                f"--prune-metric: {self.metric!r} is not measured for {task}; "
                f"choose from {', '.join(choices)}"
            )
        return self.metric

    def to_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "min_steps": self.min_steps, "alpha": self.alpha,
                "metric": self.metric, "tolerance": self.tolerance,
                "eval_examples": self.eval_examples}  # fmt: skip


# eval metrics a rung can compare, per task; the first is the default (records.default_metric)
RUNG_METRICS = TASK_METRICS


_SUMMED = ("train_seconds", "load_seconds", "train_examples", "train_tokens",
           "rung_eval_seconds", "train_segments")  # fmt: skip
_MAXED = ("peak_cpu_rss_bytes", "sampled_peak_cpu_rss_bytes", "peak_gpu_allocated_bytes",
          "peak_gpu_reserved_bytes")  # fmt: skip
_TIME_WEIGHTED = ("mean_cpu_rss_bytes", "mean_gpu_allocated_bytes")


def merge_segments(prev: TrialResult | None, new: TrialResult) -> TrialResult:
    """One trial's result from a paused segment ``prev`` (up to a rung) and the next one.

    The new segment's eval metrics and final state win; times, examples and tokens add up;
    peaks take the maximum; mean memory is weighted by training time; the training-loss mean is
    weighted by steps; throughput is recomputed from the sums; curves are joined by step.
    ``prev`` None (or not a paused segment) returns ``new`` unchanged.
    """
    paused = paused_of(prev.artifacts) if prev is not None else None
    if prev is None or not paused:
        return new
    pm, nm = prev.metrics, new.metrics
    m = dict(nm)
    for k in _SUMMED:
        if k in pm or k in nm:
            m[k] = float(pm.get(k) or 0.0) + float(nm.get(k) or 0.0)
    for k in _MAXED:
        vals = [v for v in (pm.get(k), nm.get(k)) if v is not None]
        if vals:
            m[k] = float(max(vals))
    tp, tn = float(pm.get("train_seconds") or 0.0), float(nm.get("train_seconds") or 0.0)
    for k in _TIME_WEIGHTED:
        if pm.get(k) is not None and nm.get(k) is not None and tp + tn > 0:
            m[k] = (pm[k] * tp + nm[k] * tn) / (tp + tn)
        elif k in pm and k not in nm:
            m[k] = pm[k]
    sp = float(paused["step"])
    sn = float(nm.get("train_steps") or sp) - sp
    if pm.get("train_loss_mean") is not None and nm.get("train_loss_mean") is not None:
        m["train_loss_mean"] = (pm["train_loss_mean"] * sp + nm["train_loss_mean"] * sn) / (sp + sn)
    if m.get("train_seconds"):
        for count, rate in (("train_examples", "examples_per_second"),
                            ("train_tokens", "tokens_per_second")):  # fmt: skip
            if m.get(count) is not None:
                m[rate] = m[count] / m["train_seconds"]
    curves: dict[str, list[list[float]]] = {}
    for name in dict.fromkeys([*prev.curves, *new.curves]):
        pts = {float(s): v for s, v in prev.curves.get(name, [])}
        pts.update({float(s): v for s, v in new.curves.get(name, [])})
        curves[name] = [[s, pts[s]] for s in sorted(pts)]
    artifacts = {k: v for k, v in prev.artifacts.items() if k != "paused"}
    artifacts.update(new.artifacts)
    return TrialResult(
        trial_id=new.trial_id,
        status=new.status,
        metrics=m,
        curves=curves,
        error=new.error,
        environment=new.environment or prev.environment,
        artifacts=artifacts,
    )


def rung_steps(max_steps: int, *, eta: int = 2, min_steps: int = 10) -> list[int]:
    """Steps at which configurations are compared, before the final one.

    ``max_steps / eta**k`` for k = 1, 2, ... down to ``min_steps``, in increasing order: with 80
    steps and eta 2, ``[10, 20, 40]``.
    """
    if eta < 2:
        raise ValueError(f"prune.eta: must be >= 2, got {eta}")
    rungs = []
    s = max_steps / eta
    while s >= min_steps:
        rungs.append(int(s))
        s /= eta
    return sorted(set(rungs))


# ------------------------------------------------------------------------------------------
# the rung loop (parent process): run every surviving trial to each rung, decide, drop


def check_prune_settings(
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


def run_pruned(
    runner: Any,
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
    total = _total_steps(trials, n_train)
    rungs = rung_steps(total, eta=settings.eta, min_steps=settings.min_steps)
    metric = settings.metric_for(task)
    state = _prune_state(runner.store, settings, metric, total, rungs)
    config = {t.id: group_label({"variant": t.variant, "rank": t.rank, **t.point}) for t in trials}
    if len(set(config.values())) < 2:
        runner.note("--prune: one configuration, nothing to compare; its trials run to the end")
    elif not rungs:
        runner.note(f"--prune: {total} steps leave no rung of >= {settings.min_steps} steps "
                    f"(eta {settings.eta}); every trial runs to the end")  # fmt: skip
    ran = 0
    for i, step in enumerate([*rungs, total]):
        dropped = {c: d for d in state["decisions"] if d["step"] < step for c in d["drop"]}
        rows = {t["id"]: t for t in runner.store.trials()}
        _prune_dropped(runner, trials, config, dropped, rows, retry)
        alive = [t for t in trials if config[t.id] not in dropped and _runnable(rows[t.id], retry)]
        if step < total and len(set(config.values()) - set(dropped)) < 2:
            continue  # one configuration left: nothing to compare, so no more rungs to pay for
        where = f"rung {i + 1}/{len(rungs)}: to step {step}" if step < total else (
            f"final: to step {total}")  # fmt: skip
        ran += _run_to(runner, alive, rows, step, total, where, settings.eval_examples)
        if step == total or any(d["step"] == step for d in state["decisions"]):
            continue
        values, waiting = _rung_values(runner, trials, config, dropped, step, metric)
        if waiting:
            runner.note(f"--prune: {waiting} trial(s) did not reach step {step} (interrupted); "
                        "run again to resume and decide this rung")  # fmt: skip
            return ran
        if values:
            _decide(runner, state, values, step, metric, settings)
    return ran


def _total_steps(trials: list[Trial], n_train: int) -> int:
    """The steps every trial plans; rungs compare configurations at the same step."""
    steps = {planned_steps(t.config.get("training") or {}, n_train) for t in trials}
    if len(steps) > 1:
        raise ValueError(
            f"--prune: the trials plan different numbers of steps ({sorted(steps)}); "
            "rungs compare configurations at the same step, so give every variant the same "
            "max_steps"
        )
    return steps.pop()


def _prune_state(
    store: Any, settings: PruneSettings, metric: str, total: int, rungs: list[int]
) -> dict[str, Any]:
    """The run's ``meta["prune"]``: the stored one (checked against ``settings``), or a new one."""
    state = store.meta().get("prune")
    check_prune_settings(state, settings, total)
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
    return state


def _runnable(row: dict[str, Any], retry: set[str]) -> bool:
    """Not ended yet (pending, running, paused), or ended in a status the sweep retries."""
    st = row["status"]
    return TrialStatus(st).is_active or st in retry


def _prune_dropped(
    runner: Any,
    trials: list[Trial],
    config: dict[str, str],
    dropped: dict[str, dict[str, Any]],
    rows: dict[str, dict[str, Any]],
    retry: set[str],
) -> None:
    """Store as ``pruned`` the runnable trials of the configurations an earlier rung dropped."""
    for t in trials:
        if config[t.id] in dropped and _runnable(rows[t.id], retry):
            d = dropped[config[t.id]]
            why = d["reasons"][config[t.id]].removeprefix("dropped: ")
            runner.store.mark_pruned(t.id, f"pruned at step {d['step']}: {why}")
            shutil.rmtree(runner.out / "trials" / t.id / "checkpoints", ignore_errors=True)


def _run_to(
    runner: Any,
    alive: list[Trial],
    rows: dict[str, dict[str, Any]],
    step: int,
    total: int,
    where: str,
    eval_examples: int | None,
) -> int:
    """Run the surviving trials that are not yet at ``step`` up to it (the last: to the end)."""
    need = [t for t in alive if runner.paused(rows[t.id])[0] < step]
    if not need:
        return 0
    runner.note(f"-- {where}, {len(need)} trial(s)")
    segments = {
        t.id: {
            "stop_at": step if step < total else None,
            "resume_from": runner.paused(rows[t.id])[1],
            "eval_examples": eval_examples,
        }
        for t in need
    }
    return runner.run(need, segments)


def _rung_values(
    runner: Any,
    trials: list[Trial],
    config: dict[str, str],
    dropped: dict[str, dict[str, Any]],
    step: int,
    metric: str,
) -> tuple[dict[str, dict[int, float]], int]:
    """The rung metric per configuration and seed at ``step`` (NaN for a diverged trial), and
    how many surviving trials did not reach the rung (an interrupted sweep)."""
    store = runner.store
    values: dict[str, dict[int, float]] = {}
    waiting = 0
    rows = {t["id"]: t for t in store.trials()}
    for t in trials:
        if config[t.id] in dropped:
            continue
        st = TrialStatus(rows[t.id]["status"])
        if st.is_active:
            if runner.paused(rows[t.id])[0] != step:
                waiting += 1
                continue
            curve = dict(map(tuple, store.curves_of(t.id).get(eval_curve(metric), [])))
            values.setdefault(config[t.id], {})[t.seed] = float(curve[float(step)])
        elif st is TrialStatus.DIVERGED:  # counts as the worst value (see decide_rung)
            values.setdefault(config[t.id], {})[t.seed] = math.nan
    return values, waiting


def _decide(
    runner: Any,
    state: dict[str, Any],
    values: dict[str, dict[int, float]],
    step: int,
    metric: str,
    settings: PruneSettings,
) -> None:
    """Decide the rung, store the decision in ``meta["prune"]`` and say what it dropped."""
    dec = decide_rung(values, step, higher_is_better=HIGHER_IS_BETTER[metric],
                      eta=settings.eta, alpha=settings.alpha,
                      tolerance=settings.tolerance)  # fmt: skip
    means = {c: float(sum(v.values()) / len(v)) for c, v in values.items()}
    state["decisions"].append({**asdict(dec), "means": means,
                               "seeds": {c: len(v) for c, v in values.items()}})  # fmt: skip
    runner.store.set_meta(prune=state)
    runner.note(
        f"-- rung at step {step}: best {dec.best} ({metric} {means[dec.best]:.4g}); "
        + (f"dropped {', '.join(dec.drop)}" if dec.drop else "nothing dropped")
    )

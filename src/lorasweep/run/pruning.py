"""Successive halving over configurations, dropping only what the seeds show to be worse.

Pure decision logic (no torch, no store): the rung schedule, and at each rung which
configurations to drop given their intermediate evaluations per seed. The orchestration (pausing
trials at rungs, storing dropped ones as ``pruned``) is described in docs/scaling.md, "Pruning".

The rule, at each rung:

1. rank configurations by their mean metric over seeds; the best is the reference;
2. plain successive halving would drop all but the top ``1/eta``; here those are only
   *candidates* for dropping;
3. a candidate is dropped only if it is significantly worse than the best at this rung: a one-sided
   paired t-test on the common seeds (the seed is a blocking factor, as in ``stats``), Welch's
   t-test when fewer than ``stats.MIN_PAIRS`` seeds are shared, Holm-adjusted across the
   candidates of the rung, at level ``alpha``;
4. with a single seed there is no test, so nothing is dropped: pruning needs seeds.

So a rung never drops more than plain successive halving would, and usually less.

Also here, the orchestration (still no torch): ``PruneSettings``, ``merge_segments`` (one
trial's result from the segments it ran between rungs) and ``run_pruned``, the rung loop that
``run.sweep`` calls with its runner. The two helpers
a trial needs, ``spec.planned_steps`` and ``results.eval_curve``, live in import-light modules so
that a worker does not import scipy/statsmodels for them.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from lorasweep.analysis.explain import group_label
from lorasweep.analysis.stats import ALPHA, MIN_PAIRS
from lorasweep.records import HIGHER_IS_BETTER, Trial, TrialResult, eval_curve
from lorasweep.spec import planned_steps  # noqa: F401 - re-exported


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


# eval metrics a rung can compare, per task; the first is the default
RUNG_METRICS = {"classification": ("accuracy", "f1", "eval_loss"),
                "causal-lm": ("perplexity", "eval_loss")}  # fmt: skip


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
    if prev is None or not prev.artifacts.get("paused"):
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
    sp = float(prev.artifacts["paused"]["step"])
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


@dataclass
class RungDecision:
    step: int
    best: str
    keep: list[str]
    drop: list[str]
    reasons: dict[str, str] = field(default_factory=dict)  # config -> why dropped or kept


def _one_sided_p(
    best: dict[int, float], other: dict[int, float], sign: float, tolerance: float = 0.0
) -> tuple[float | None, str]:
    """p-value of "other is worse than best by more than ``tolerance``" (sign +1: higher is
    better) and the test's name."""
    common = sorted(set(best) & set(other))
    if len(common) >= MIN_PAIRS:
        d = sign * (np.array([best[s] for s in common]) - np.array([other[s] for s in common]))
        d = d - tolerance
        if np.allclose(d, d[0]):  # no variance: worse in every seed by the same amount, or equal
            return (0.0 if d[0] > 0 else 1.0), f"paired ({len(common)} seeds, constant gap)"
        t = sps.ttest_1samp(d, 0.0, alternative="greater")
        return float(t.pvalue), f"paired t ({len(common)} seeds)"
    vb, vo = list(best.values()), list(other.values())
    if len(vb) >= 2 and len(vo) >= 2:
        t = sps.ttest_ind(
            sign * np.array(vb) - tolerance,
            sign * np.array(vo),
            equal_var=False,
            alternative="greater",
        )
        p = float(t.pvalue)
        return (None if math.isnan(p) else p), f"Welch t ({len(vb)} vs {len(vo)} seeds)"
    return None, "one seed: no test"


def decide_rung(
    values: dict[str, dict[int, float]],
    step: int,
    *,
    higher_is_better: bool,
    eta: int = 2,
    alpha: float = ALPHA,
    tolerance: float = 0.0,
) -> RungDecision:
    """Which configurations to drop at a rung.

    Args:
        values: configuration label -> {seed: metric at this rung}. Non-finite values (a diverged
            seed) count as the worst possible value.
        step: the rung's training step (recorded in the decision).
        higher_is_better: direction of the metric.
        eta: successive-halving factor: at most ``n - ceil(n / eta)`` configurations are dropped.
        alpha: family-wise level of the Holm-adjusted tests at this rung.
        tolerance: a candidate is dropped only if significantly worse than the best by more
            than this (in the metric's units): the null hypothesis is "worse by at most
            ``tolerance``". 0 tests plain "worse".
    """
    sign = 1.0 if higher_is_better else -1.0
    worst = -math.inf if higher_is_better else math.inf
    clean = {
        c: {s: (v if v is not None and math.isfinite(v) else worst) for s, v in seeds.items()}
        for c, seeds in values.items()
        if seeds
    }
    if not clean:
        raise ValueError("decide_rung: no values")

    def mean(c: str) -> float:
        v = np.array(list(clean[c].values()), dtype=float)
        return float(np.mean(v)) if np.all(np.isfinite(v)) else worst

    order = sorted(clean, key=lambda c: sign * mean(c), reverse=True)
    best = order[0]
    n_keep = math.ceil(len(order) / eta)
    candidates = order[n_keep:]
    reasons = {c: "in the top 1/eta" for c in order[:n_keep]}
    reasons[best] = "best at this rung"
    tested, pvals = [], []
    for c in candidates:
        if any(math.isinf(v) for v in clean[c].values()) and not any(
            math.isinf(v) for v in clean[best].values()
        ):
            p, name = 0.0, "a seed diverged"
        else:
            p, name = _one_sided_p(clean[best], clean[c], sign, tolerance)
        if p is None:
            reasons[c] = f"kept: {name}"
            continue
        tested.append((c, name))
        pvals.append(p)
    drop = []
    if tested:
        reject, adj, _, _ = multipletests(pvals, alpha=alpha, method="holm")
        for (c, name), r, p in zip(tested, reject, adj, strict=True):
            verdict = "dropped: significantly" if r else "kept: not significantly"
            margin = f" by more than {tolerance:g}" if tolerance else ""
            reasons[c] = f"{verdict} worse than {best}{margin} ({name}, Holm p={p:.3g})"
            if r:
                drop.append(c)
    keep = [c for c in order if c not in drop]
    return RungDecision(step=step, best=best, keep=keep, drop=drop, reasons=reasons)


# ------------------------------------------------------------------------------------------
# what pruning saved: numbers for the report and the command line


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


def pruning_summary(state: dict[str, Any], trials: Any) -> dict[str, Any]:
    """Trial-steps and training seconds of a pruned sweep against the full grid.

    ``state`` is the run's ``meta["prune"]``; ``trials`` the store's trials frame. Seconds the
    full grid would have taken are estimated per configuration from its own measured seconds
    per step (pruned trials ran the first steps, which cost what later steps cost).
    """
    import pandas as pd

    total = int(state["total_steps"])
    df = trials.copy()
    steps = pd.to_numeric(df.get("train_steps"), errors="coerce")
    done = df["status"].eq("complete")
    df["_steps"] = steps.where(steps.notna(), done * total).fillna(0.0)
    secs = pd.to_numeric(df.get("train_seconds"), errors="coerce").fillna(0.0)
    df["_secs"] = secs
    full_steps = total * len(df)
    run_steps = float(df["_steps"].sum())
    # seconds per step of each configuration, from all its trials' steps (pruned ones included)
    key = df["variant"].astype(str) + "/" + df["rank"].astype(str)
    sums = df.groupby(key)[["_secs", "_steps"]].sum()
    per_step = (sums["_secs"] / sums["_steps"].where(sums["_steps"] > 0)).to_dict()
    full_secs = float(sum(per_step[k] * total for k in key if math.isfinite(per_step[k])))
    rung_eval = pd.to_numeric(df.get("rung_eval_seconds"), errors="coerce").fillna(0.0).sum()
    params = pd.to_numeric(df.get("trainable_params"), errors="coerce")
    labels = [
        group_label({"variant": v, "rank": None if pd.isna(r) else int(r)})
        for v, r in zip(df["variant"], df["rank"], strict=True)
    ]
    cost = params.groupby(labels).mean().dropna().to_dict() if params is not None else {}
    dropped = [
        {
            "config": c,
            "step": d["step"],
            "reason": d["reasons"][c],
            "mean": d["means"].get(c),
            "best": d["best"],
            "best_mean": d["means"].get(d["best"]),
        }  # fmt: skip
        for d in state["decisions"]
        for c in d["drop"]
    ]
    return {
        "metric": state["metric"],
        "direction": state["direction"],
        "settings": state["settings"],
        "rungs": state["rungs"],
        "total_steps": total,
        "trials": len(df),
        "pruned_trials": int(df["status"].eq("pruned").sum()),
        "full_trial_steps": full_steps,
        "run_trial_steps": run_steps,
        "saved_fraction": 1.0 - run_steps / full_steps if full_steps else 0.0,
        "train_seconds": float(df["_secs"].sum()),
        "full_train_seconds_estimate": full_secs,
        "rung_eval_seconds": float(rung_eval),
        "decisions": state["decisions"],
        "dropped": dropped,
        "trainable_params": cost,
    }


def format_pruning(summary: dict[str, Any]) -> str:
    """One line for the command line."""
    s = summary
    dropped = "; ".join(f"{d['config']} at step {d['step']}" for d in s["dropped"]) or "nothing"
    return (
        f"Pruning ({s['metric']} at steps {', '.join(map(str, s['rungs'])) or '-'}): trained "
        f"{s['run_trial_steps']:.0f} of {s['full_trial_steps']} trial-steps "
        f"({100 * s['saved_fraction']:.0f}% saved); dropped {dropped}."
    )


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 100 else f"{x / 60:.1f} min"


def _why(reason: str) -> str:
    """A rung reason without its verdict prefix (the table has a decision column)."""
    for prefix in ("dropped: ", "kept: "):
        reason = reason.removeprefix(prefix)
    return reason


def pruning_section_html(summary: dict[str, Any], recommended: str | None) -> str:
    """The report's "Pruning" section: the rule, what each rung decided, what it saved, and
    what it means for the recommendation."""
    from html import escape

    s = summary
    st = s["settings"]
    rule = (
        f"Successive halving (eta {st['eta']}) on <b>{escape(s['metric'])}</b> "
        f"({escape(s['direction'])} is better) at steps {escape(', '.join(map(str, s['rungs'])))}"
        f" of {s['total_steps']}. At each rung only configurations outside the top 1/eta were "
        f"candidates, and a candidate was dropped only if a one-sided test across seeds (paired "
        f"on common seeds, Welch otherwise, Holm-adjusted at {st['alpha']:g}"
        + (f", worse by more than {st['tolerance']:g}" if st.get("tolerance") else "")
        + ") showed it worse than the rung's best."
        + (
            f" Rung evaluations used the first {st['eval_examples']} eval examples; final "
            "metrics use the whole eval set."
            if st.get("eval_examples")
            else ""
        )
    )
    saved = (
        f"Trained <b>{s['run_trial_steps']:.0f}</b> of {s['full_trial_steps']} trial-steps: "
        f"<b>{100 * s['saved_fraction']:.0f}% saved</b> ({s['pruned_trials']} of {s['trials']} "
        f"trials pruned). Training time {_secs(s['train_seconds'])} against about "
        f"{_secs(s['full_train_seconds_estimate'])} for the full grid (estimated from each "
        f"configuration's measured seconds per step); the rung evaluations cost "
        f"{_secs(s['rung_eval_seconds'])}."
    )
    rows = []
    for d in s["decisions"]:
        for c in sorted(d["means"], key=lambda c: d["keep"].index(c) if c in d["keep"] else 99):
            verdict = "dropped" if c in d["drop"] else "kept"
            rows.append(
                f"<tr class='{verdict}'><td>{d['step']}</td><td class='left'>{escape(c)}</td>"
                f"<td>{d['seeds'].get(c, '')}</td><td>{d['means'][c]:.4g}</td>"
                f"<td class='left'>{'<b>dropped</b>' if verdict == 'dropped' else verdict}</td>"
                f"<td class='left'>{escape(_why(d['reasons'].get(c, '')))}</td></tr>"
            )
    table = (
        "<table><thead><tr><th>step</th><th class='left'>configuration</th><th>seeds</th>"
        f"<th>mean {escape(s['metric'])}</th><th class='left'>decision</th>"
        "<th class='left'>why</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No rung was decided.</p>"
    )
    if s["dropped"]:
        names = ", ".join(f"{escape(d['config'])} (step {d['step']})" for d in s["dropped"])
        effect = (
            f"The recommendation{' (' + escape(recommended) + ')' if recommended else ''} is "
            f"chosen among the configurations trained to the end. The full grid could recommend "
            f"differently only if a dropped configuration ({names}) would have caught up after "
            "it was dropped; run the sweep without <code>--prune</code> to check a doubt."
        )
        cost = s.get("trainable_params") or {}
        cheaper = [
            d["config"]
            for d in s["dropped"]
            if recommended in cost and cost.get(d["config"], math.inf) < cost[recommended]
        ]
        if cheaper:
            effect += (
                f" <b>Cheaper than the recommendation and dropped</b> (fewer trainable "
                f"parameters): {escape(', '.join(cheaper))}. Early rungs favour configurations "
                "that learn faster, which need not be the ones that end best; if a cheaper "
                "configuration matters, re-run it without pruning or use later rungs "
                "(<code>--prune-min-steps</code>) or <code>--prune-tolerance</code>."
            )
    else:
        effect = "Nothing was dropped, so the recommendation is the one the full grid gives."
    return f"<p>{rule}</p><p>{saved}</p>{table}<p>{effect}</p>"

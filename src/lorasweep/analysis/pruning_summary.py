"""What pruning did in a run: the rung decisions, the trial-steps and seconds saved against the
full grid, and the configurations dropped. Data for the report's "Pruning" section
(``report_sections.pruning_section_html``) and one line for the command line.

Reads the run's ``meta["prune"]`` (written by ``run.pruning.run_pruned``) and the trials frame;
no torch, no store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from lorasweep.analysis.explain import group_label


def pruning_summary(state: dict[str, Any], trials: Any) -> dict[str, Any]:
    """Trial-steps and training seconds of a pruned sweep against the full grid.

    ``state`` is the run's ``meta["prune"]``; ``trials`` the store's trials frame. Seconds the
    full grid would have taken are estimated per configuration from its own measured seconds
    per step (pruned trials ran the first steps, which cost what later steps cost).
    """
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


def cheaper_dropped(summary: Mapping[str, Any], recommended: str | None) -> list[str]:
    """Dropped configurations with fewer trainable parameters than ``recommended``: the ones a
    pruned sweep may have wrongly ruled out (early rungs favour configurations that learn fast)."""
    cost = summary.get("trainable_params") or {}
    if recommended not in cost:
        return []
    return [
        d["config"]
        for d in summary["dropped"]
        if cost.get(d["config"], math.inf) < cost[recommended]
    ]

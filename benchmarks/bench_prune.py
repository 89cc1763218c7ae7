"""Pruning vs the full grid on the demo: trial-steps, wall time, and both recommendations.

Runs ``lorasweep demo`` twice into fresh folders, one after the other, each a fresh process
timed from the outside: once as is (the full grid) and once with ``--prune`` (default settings:
eta 2, rungs from 10 steps, accuracy, Holm at 0.05). Prints one JSON object: per run the wall
seconds, the trial-steps trained, the summed training seconds, the per-configuration mean
accuracy, and the recommendation; plus whether the two recommendations agree. The load average
is recorded before and after each run: figures from a busy machine are not comparable.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/bench_prune.py \
        --out /tmp/bench-prune \
        --prune-args "" --prune-args "--prune-min-steps 20 --prune-eval-examples 100"

Each ``--prune-args`` is one pruned run (its extra ``--prune-*`` options; "" for the defaults).
``--keep-full`` reuses an existing ``OUT/full`` run instead of training the full grid again.
Extra arguments after ``--`` go to every run (e.g. ``-- --jobs 2``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(folder: Path, extra: list[str]) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "lorasweep", "demo", "--out", str(folder), "--quiet", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    after = os.getloadavg()[0]
    return summarize(folder, " ".join(cmd[1:]), wall, load, after, proc.stdout.splitlines())


def summarize(
    folder: Path,
    command: str,
    wall: float | None,
    load: float | None,
    after: float | None,
    stdout: list[str],
) -> dict:
    from lorasweep.analysis.stats import analyze, group_label
    from lorasweep.store import open_store

    with open_store(folder) as store:
        df, prune = store.trials_frame(), store.meta().get("prune")
    a = analyze(df)
    out = {
        "command": command,
        "wall_seconds": round(wall, 1) if wall is not None else None,
        "load_before": round(load, 2) if load is not None else None,
        "load_after": round(after, 2) if after is not None else None,
        "statuses": df["status"].value_counts().to_dict(),
        "trial_steps": float(df["train_steps"].fillna(0).sum()),
        "train_seconds": round(float(df["train_seconds"].fillna(0).sum()), 1),
        "means": {group_label(g["key"]): round(g["mean"], 4) for g in a["groups"]},
        "best": group_label(a["best"]["key"]) if a.get("best") else None,
        "recommended": group_label(a["recommended"]["key"]) if a.get("recommended") else None,
        "reason": a["reason"],
        "stdout_tail": stdout[-2:],
    }
    if prune:
        from lorasweep.analysis.pruning_summary import pruning_summary

        s = pruning_summary(prune, df)
        out["pruning"] = {
            "rungs": s["rungs"],
            "full_trial_steps": s["full_trial_steps"],
            "saved_fraction": round(s["saved_fraction"], 3),
            "rung_eval_seconds": round(s["rung_eval_seconds"], 1),
            "decisions": [
                {
                    "step": d["step"],
                    "best": d["best"],
                    "drop": d["drop"],
                    "means": {k: round(v, 4) for k, v in d["means"].items()},
                    "reasons": d["reasons"],
                }  # fmt: skip
                for d in s["decisions"]
            ],
        }
    return out


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/bench-prune", help="parent folder of the runs")
    p.add_argument("--prune-args", action="append", default=None, help="one pruned run's options")
    p.add_argument("--keep-full", action="store_true", help="reuse OUT/full if it exists")
    args = p.parse_args(argv)
    root = Path(args.out)
    if args.keep_full and (root / "full" / "lorasweep.db").exists():
        full = summarize(root / "full", "(kept from an earlier run)", None, None, None, [])
    else:
        full = run(root / "full", extra)
    result: dict = {"full": full, "pruned": [], "cpu_count": os.cpu_count()}
    for i, options in enumerate(args.prune_args or [""]):
        pruned = run(root / f"pruned-{i}", [*extra, "--prune", *options.split()])
        pruned["same_recommendation"] = full["recommended"] == pruned["recommended"]
        pruned["trial_steps_saved"] = round(1 - pruned["trial_steps"] / full["trial_steps"], 3)
        if full["wall_seconds"]:
            pruned["wall_ratio"] = round(pruned["wall_seconds"] / full["wall_seconds"], 3)
        result["pruned"].append(pruned)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

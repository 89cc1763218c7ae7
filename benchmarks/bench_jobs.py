"""Sweep wall time with the local backend at --jobs 1 vs --jobs 2 (or any list) on this machine.

A small real sweep: MiniLM-L6 (builtin) on Rotten Tomatoes, ranks x seeds, a few steps each.
Every measurement is a fresh ``python -m lorasweep run`` into a fresh run folder, timed from the
outside, so it includes what a user waits for: imports, validation, tokenizing, the forkserver,
every trial. The order of configurations alternates between repeats (1,2 then 2,1) so a drift in
the machine's load does not favour one. The load average is printed before and after each run:
figures taken on a busy machine are not comparable with quiet ones.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/bench_jobs.py \
        --jobs 1 2 --ranks 4 16 --seeds 0 1 --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def sweep_spec(ranks: list[int], seeds: list[int], steps: int, batch: int) -> dict:
    return {
        "name": "bench-jobs",
        "task": "classification",
        "model": "builtin:minilm-l6",
        "dataset": {
            "source": "builtin:rotten-tomatoes",
            "max_train_examples": 1000,
            "max_eval_examples": 200,
            "max_length": 64,
        },
        "training": {
            "learning_rate": 2e-3,
            "per_device_train_batch_size": batch,
            "max_steps": steps,
        },
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.1},
        "grid": {"rank": ranks},
        "seeds": seeds,
    }


def run_once(spec_path: Path, out: Path, jobs: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lorasweep",
        "run",
        str(spec_path),
        "--out",
        str(out),
        "--backend",
        "local",
        "--jobs",
        str(jobs),
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed (jobs={jobs}):\n{proc.stderr[-3000:]}")
    from lorasweep.store import open_store

    with open_store(out) as store:
        trials = store.trials()
    statuses = sorted({t["status"] for t in trials})
    train = [t["metrics"].get("train_seconds") or 0.0 for t in trials]
    return {
        "jobs": jobs,
        "wall_seconds": round(wall, 1),
        "trials": len(trials),
        "statuses": statuses,
        "sum_train_seconds": round(sum(train), 1),
        "mean_train_seconds": round(sum(train) / max(1, len(train)), 2),
        "torch_threads": sorted({t["environment"].get("torch_threads") for t in trials}),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        spec_path = Path(tmp) / "spec.yaml"
        spec_path.write_text(
            yaml.safe_dump(sweep_spec(args.ranks, args.seeds, args.steps, args.batch))
        )
        for rep in range(args.repeats):
            order = args.jobs if rep % 2 == 0 else list(reversed(args.jobs))
            for jobs in order:
                row = run_once(spec_path, Path(tmp) / f"run-{rep}-j{jobs}", jobs)
                row["repeat"] = rep
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(
        f"\ncpu_count={os.cpu_count()} trials={rows[0]['trials']} steps={args.steps} "
        f"batch={args.batch}"
    )
    print(
        "| jobs | wall s (each repeat) | mean wall s | trial train s (mean) | threads/trial |"
        " load avg 1 min (before -> after) |"
    )
    print("|---|---|---|---|---|---|")
    base = None
    for jobs in args.jobs:
        rs = [r for r in rows if r["jobs"] == jobs]
        mean = sum(r["wall_seconds"] for r in rs) / len(rs)
        base = base or mean
        walls = ", ".join(f"{r['wall_seconds']:.1f}" for r in rs)
        train = sum(r["mean_train_seconds"] for r in rs) / len(rs)
        loads = ", ".join(f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}" for r in rs)
        print(
            f"| {jobs} | {walls} | {mean:.1f} ({base / mean:.2f}x) | {train:.1f} | "
            f"{rs[0]['torch_threads']} | {loads} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

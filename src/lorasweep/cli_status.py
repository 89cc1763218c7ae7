"""The commands that read a run folder as it is: ``status`` (every trial, its status and
metrics) and ``export`` (the per-trial rows as CSV or JSON). Thin calls into the store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorasweep.records import HEADLINE_METRICS, TrialStatus, paused_of


def cmd_status(args: argparse.Namespace) -> int:
    from lorasweep.records import settings_of, varying_settings
    from lorasweep.store import open_store

    with open_store(args.dir) as store:
        trials = store.trials()
    columns = varying_settings([t["config"] for t in trials])  # one per setting that varies
    rows = []
    for t in trials:
        flat = settings_of(t["config"])
        row = {"id": t["id"], "status": t["status"], "seed": t["seed"], "rank": t["rank"],
               "variant": t["variant"]}  # fmt: skip
        row.update({c: flat.get(k) for k, c in columns.items() if c not in row})
        row.update(metrics=t["metrics"], error=t["error"], paused=paused_of(t["artifacts"]))
        rows.append(row)
    if args.json:
        print(json.dumps({"trials": rows}, indent=2))
        return 0
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    extra = [c for c in columns.values() if c not in ("variant", "rank", "seed")]
    widths = {c: max([len(c), *(len(_cell(r.get(c))) for r in rows)]) for c in extra}
    head = "".join(f" {c:>{widths[c]}}" for c in extra)
    print(f"{'id':12}  {'status':9} {'variant':12} {'rank':>5}{head} {'seed':>4}  metric")
    for r in rows:
        m = r["metrics"]
        shown = " ".join(f"{k}={m[k]:.4g}" for k in HEADLINE_METRICS if m.get(k) is not None)
        if TrialStatus(r["status"]).is_active and r["paused"]:
            shown = f"paused at step {r['paused']['step']}: {shown}"
        if r["error"]:
            shown += " " + r["error"].splitlines()[-1][:80]
        rank = "-" if r["rank"] is None else r["rank"]
        cells = "".join(f" {_cell(r.get(c)):>{widths[c]}}" for c in extra)
        print(
            f"{r['id']:12}  {r['status']:9} {r['variant']:12} {rank:>5}{cells} {r['seed']:>4}"
            f"  {shown}"
        )
    return 0


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def cmd_export(args: argparse.Namespace) -> int:
    from lorasweep.analysis.report import export_trials
    from lorasweep.store import open_store

    with open_store(args.dir) as store:
        df = store.trials_frame()
    if args.output:
        export_trials(df, Path(args.output), fmt=args.format)
        print(f"wrote {len(df)} trials to {args.output}")
    elif args.format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    else:
        sys.stdout.write(df.to_json(orient="records", indent=2) + "\n")
    return 0

"""The ``lorasweep spectrum --verify`` records of a run, for the report's spectrum section.

``tools.spectrum_verify.verify_suggestion`` stores one record per verified suggestion in the
run's ``meta["verify"]`` (the pilot adapter, the variants it added, notes). Here each record gets
``compare``: the complete trials and mean primary metric of the pilot's variant and of the added
ones. Pure pandas over the run's meta and trials frame: the report reads the records here rather
than from the verify tool, which runs sweeps (no report -> verify -> sweep import cycle).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorasweep.records import default_metric


def verify_report_info(meta: Mapping[str, Any], trials: Any) -> list[dict[str, Any]]:
    """Verify records of a run for the report's spectrum section, each with ``compare``: per
    variant (the pilot's and the added ones) the complete trials and the mean primary metric."""
    records = meta.get("verify") or []
    if not records or trials is None or getattr(trials, "empty", True):
        return []
    metric = default_metric(meta.get("task")) or "perplexity"
    done = trials[trials["status"] == "complete"]
    out = []
    for rec in records:
        rec = dict(rec)
        rows = []
        for v in [rec.get("base_variant"), *rec.get("variants", {})]:
            sel = done[done["variant"] == v]
            if v is None or metric not in sel:
                continue
            for rank, grp in sel.groupby(sel["rank"].fillna(-1), sort=True):
                vals = grp[metric].dropna()
                rows.append(
                    {
                        "variant": v,
                        "rank": None if rank == -1 else int(rank),
                        "trials": int(len(grp)),
                        "metric": metric,
                        "mean": float(vals.mean()) if len(vals) else None,
                        "suggested": v in rec.get("variants", {}),
                    }
                )
        rec["compare"] = rows
        out.append(rec)
    return out

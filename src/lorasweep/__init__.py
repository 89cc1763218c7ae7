"""lorasweep: which LoRA configuration (rank first) should I use? Answered with evidence.

Public API (the CLI is a thin layer over these)::

    from lorasweep import load_spec, run_sweep, open_store, analyze
    spec = load_spec("sweep.yaml")           # parse + check, SpecError lists every problem
    outcome = run_sweep(spec, "runs/demo")   # resumable; finished trials are never re-run
    with open_store("runs/demo") as store:
        df = store.trials_frame()            # one row per trial, one column per metric
    result = analyze(df)                     # statistics and the recommendation
"""

from __future__ import annotations

import logging
from typing import Any

from lorasweep.records import Trial, TrialResult, TrialStatus
from lorasweep.spec import SpecError, parse_spec

# bitsandbytes logs a warning on import on CPU about an optional `kernels` package that fetches
# from a hub; it is harmless and would be printed before every command.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

__all__ = [
    "Results",
    "SpecError",
    "Sweep",
    "Trial",
    "TrialResult",
    "TrialStatus",
    "analyze",
    "estimate",
    "load_spec",
    "open_store",
    "parse_spec",
    "run_sweep",
]


def __getattr__(name: str) -> Any:
    # heavy modules load on first use so `import lorasweep` stays fast
    if name in ("load_spec", "run_sweep"):
        from lorasweep.run import sweep

        return getattr(sweep, name)
    if name in ("Sweep", "Results"):
        from lorasweep import api

        return getattr(api, name)
    if name == "open_store":
        from lorasweep.store import open_store

        return open_store
    if name == "analyze":
        from lorasweep.analysis.stats import analyze

        return analyze
    if name == "estimate":
        from lorasweep.tools.estimate import estimate

        return estimate
    raise AttributeError(f"module 'lorasweep' has no attribute {name!r}")

"""Command line: one function per subcommand, each a thin call into the public API (those
that read a run folder as it is: ``cli_status``; those that need no sweep: ``cli_tools``).

A user error prints one line per problem (``lorasweep: error: ...``) and exits 2; ``--debug``
shows the traceback instead. A reader that goes away (``lorasweep status DIR | head -1``) ends
the command quietly, exit 141 as after SIGPIPE. Heavy imports (torch, transformers) happen only
in the commands that train or build models.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from lorasweep.cli_args import UserError, parse_jobs
from lorasweep.cli_status import cmd_export, cmd_status
from lorasweep.cli_tools import cmd_estimate, cmd_init, cmd_spectrum
from lorasweep.records import TrialStatus

__all__ = ["EXIT_USAGE", "EXIT_WORLD", "UserError", "main"]

EXIT_USAGE = 2  # bad input: a spec key, an option, a column
EXIT_WORLD = 1  # a fault of the world: disk, permissions, a corrupt store
EXIT_PIPE = 141  # the reader went away: 128 + SIGPIPE, as a shell reports `cat | head`
PRUNE_OPTIONS = ("eta", "min_steps", "alpha", "metric", "tolerance", "eval_examples")


def _demo_spec_path() -> Path:
    return Path(str(resources.files("lorasweep") / "specs" / "demo.yaml"))


# ------------------------------------------------------------------------------------------
# commands


def cmd_run(args: argparse.Namespace) -> int:
    from lorasweep.run.sweep import run_sweep

    retry = tuple(x for x in (args.retry or "").split(",") if x)
    # the --prune-* options default to None, so "given" is visible; PruneSettings holds the
    # real defaults
    given = {k: getattr(args, f"prune_{k}") for k in PRUNE_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    prune = None
    if args.prune:
        from lorasweep.run.pruning import PruneSettings

        prune = PruneSettings(**given)
    elif given:
        key, value = next(iter(given.items()))
        flag = "--prune-" + key.replace("_", "-")
        raise UserError(f"{flag}: {value!r} is used only with --prune")
    outcome = run_sweep(
        args.spec,
        args.out,
        backend=args.backend,
        jobs=parse_jobs(str(args.jobs)),
        per_gpu=getattr(args, "per_gpu", None),
        shared_folder=getattr(args, "shared_folder", False),
        retry=retry,
        address=getattr(args, "address", None),
        quiet=args.quiet,
        prune=prune,
        yes=getattr(args, "yes", False),
    )
    _print_outcome(outcome)
    return _failure_summary(outcome)


def _failure_summary(outcome: Any) -> int:
    """The last line says how many planned trials failed; exit 1 when none produced a result."""
    failed = {s: n for s, n in outcome.statuses.items() if TrialStatus(s).retryable}
    n_failed = sum(failed.values())
    if not n_failed:
        return 0
    what = ", ".join(f"{n} {s}" for s, n in sorted(failed.items()))
    see = f"`lorasweep status {outcome.out_dir}` shows why"
    if not any(n for s, n in outcome.statuses.items() if TrialStatus(s).finished):
        print(f"lorasweep: error: every trial failed ({what}); {see}", file=sys.stderr)
        return 1
    print(f"{n_failed} of {outcome.planned} trials failed ({what}); {see}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.spec = str(_demo_spec_path())
    return cmd_run(args)


def _print_outcome(outcome: Any) -> None:
    from lorasweep.analysis.stats import analyze, format_analysis
    from lorasweep.spec import analysis_kwargs
    from lorasweep.store import open_store

    st = ", ".join(f"{n} {s}" for s, n in sorted(outcome.statuses.items()))
    print(
        f"\n{outcome.planned} trials planned: ran {outcome.ran} now, "
        f"{outcome.skipped} already recorded ({st}). Results in {outcome.out_dir}"
    )
    with open_store(outcome.out_dir) as store:
        df, meta = store.trials_frame(), store.meta()
    prune_state = meta.get("prune")
    try:
        print(format_analysis(analyze(df, **analysis_kwargs(meta.get("spec")))))
    except ValueError as e:
        print(f"(no analysis: {e})")
    if prune_state:
        from lorasweep.analysis.pruning_summary import format_pruning, pruning_summary

        print(format_pruning(pruning_summary(prune_state, df)))
    if outcome.report:
        print(f"Report: {outcome.report}")


def _margin_option(args: argparse.Namespace) -> str | None:
    """``--margin`` checked before anything loads: one line naming it and the value."""
    from lorasweep.analysis.decision import parse_margin

    try:
        parse_margin(args.margin, key="--margin")
    except ValueError as e:
        raise UserError(str(e)) from None
    return args.margin


def _tune_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--tune a,b`` (``none``: no tuning, whatever the spec says) and ``--select-on COL``;
    None where not given, so the spec's ``tune:`` stays."""
    tune = None
    if args.tune is not None:
        tune = [t.strip() for t in args.tune.split(",") if t.strip()]
        if not tune:
            raise UserError(f"--tune: {args.tune!r} names no setting; use e.g. learning_rate")
        tune = [] if tune == ["none"] else tune
    return {"tune": tune, "select_on": args.select_on}


def cmd_analyze(args: argparse.Namespace) -> int:
    margin = _margin_option(args)  # before anything loads
    if margin is not None and args.tolerance is not None:
        raise UserError("--tolerance: use --margin; both were given")
    from lorasweep.analysis.stats import analyze, format_analysis, load_trials_table
    from lorasweep.spec import analysis_kwargs

    src = Path(args.source)
    recorded = None  # a run folder's spec: its analysis section gives the defaults
    if src.is_dir():
        from lorasweep.store import open_store

        with open_store(src) as store:
            df, recorded = store.trials_frame(), store.meta().get("spec")
    elif src.exists():
        df = load_trials_table(src)
    else:
        raise UserError(f"SOURCE: not a run folder or a CSV/JSON file: {args.source}")
    by = [c for c in args.by.split(",") if c] if args.by else None
    given = {
        "metric": args.metric,
        "direction": args.direction,
        "by": by,
        "cost": args.cost,
        "margin": margin,
        "tolerance": args.tolerance,  # deprecated alias of an absolute margin
        "memory_budget_gb": args.memory_budget,
        **_tune_options(args),
    }
    result = analyze(df, **analysis_kwargs(recorded, given))
    print(json.dumps(result, indent=2) if args.json else format_analysis(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    margin = _margin_option(args)  # before anything loads; None: the spec's analysis.margin
    from lorasweep.analysis.report import write_run_report
    from lorasweep.store import open_store

    with open_store(args.dir) as store:
        rows = store.trials()
    path = write_run_report(args.dir, analysis_kwargs={"margin": margin, **_tune_options(args)})
    if path is None:
        counts: dict[str, int] = {}
        for t in rows:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        found = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none recorded"
        raise UserError(
            f"DIR: no complete trial to report in {args.dir} (trials: {found}); "
            f"`lorasweep status {args.dir}` shows why"
        )
    print(f"Report: {path}")
    return 0


COMMANDS = {  # status, export: cli_status; estimate, spectrum, init: cli_tools
    "run": cmd_run,
    "demo": cmd_demo,
    "status": cmd_status,
    "export": cmd_export,
    "analyze": cmd_analyze,
    "report": cmd_report,
    "estimate": cmd_estimate,
    "spectrum": cmd_spectrum,
    "init": cmd_init,
}


def main(argv: list[str] | None = None) -> int:
    """The ``lorasweep`` command: the exit status (0 ok, 1 the world, 2 the input, 141 the
    reader of stdout went away)."""
    from lorasweep.cli_args import build_parser

    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help, --version, a usage error: argparse has printed
            sys.stdout.flush()
            raise
        code = _dispatch(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # the reader went away (`lorasweep status DIR | head -1`): stop quietly, as `cat` does
        # (the Python docs' recipe: stdout to /dev/null, so the final flush cannot fail)
        _silence_stdout()
        return EXIT_PIPE


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; every error a user or the world can cause becomes one line."""
    import sqlite3

    from lorasweep.spec import SpecError

    try:
        return int(COMMANDS[args.command](args) or 0)
    except SpecError as e:
        if args.debug:
            raise
        for line in e.errors:
            print(f"lorasweep: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except (UserError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"lorasweep: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.DatabaseError as e:  # a corrupt, truncated or unwritable lorasweep.db
        if args.debug:
            raise
        print(f"lorasweep: error: {_store_problem(e)}", file=sys.stderr)
        return EXIT_WORLD
    except OSError as e:  # disk full, permissions, a read-only folder: the world, not the input
        if args.debug or isinstance(e, BrokenPipeError):
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"lorasweep: error: {e.strerror or _first_line(e)}{where}", file=sys.stderr)
        return EXIT_WORLD
    except KeyboardInterrupt:
        print(
            "lorasweep: interrupted; finished trials are stored, run again to resume",
            file=sys.stderr,
        )
        return 130


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _store_problem(e: Exception) -> str:
    from lorasweep.store import StoreError

    if isinstance(e, StoreError):
        return str(e)
    return f"the run store cannot be used: {_first_line(e)}"


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

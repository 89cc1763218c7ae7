"""Command line: one function per subcommand, each a thin call into the public API.

A user error prints one line per problem (``lorasweep: error: ...``) and exits 2; ``--debug``
shows the traceback instead. Heavy imports (torch, transformers) happen only in the commands
that train or build models.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from lorasweep.records import HEADLINE_METRICS, TrialStatus, paused_of

EXIT_USAGE = 2  # bad input: a spec key, an option, a column
EXIT_WORLD = 1  # a fault of the world: disk, permissions, a corrupt store
PRUNE_OPTIONS = ("eta", "min_steps", "alpha", "metric", "tolerance", "eval_examples")


class UserError(Exception):
    """Printed as one line per problem, exit code 2."""


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
        jobs=args.jobs,
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


def cmd_estimate(args: argparse.Namespace) -> int:
    from lorasweep.analysis.tool_plots import plot_estimate
    from lorasweep.tools.estimate import estimate

    ranks = _positive_ints("--ranks", args.ranks)
    for flag, v in (("--batch", args.batch), ("--seq", args.seq)):
        if v < 1:
            raise UserError(f"{flag}: must be a positive integer, got {v}")
    targets: Any = args.targets
    if targets and targets not in ("attention", "mlp", "all-linear", "default"):
        targets = [t for t in targets.split(",") if t]
    result = estimate(
        args.model,
        ranks=ranks,
        targets=targets or "default",
        variant=args.variant,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        optimizer=args.optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        task=args.task,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_table())
    if args.plot:
        plot_estimate(result, args.plot)
        if not args.json:
            print(f"Plot: {args.plot}")
    return 0


def _positive_ints(flag: str, text: str) -> list[int]:
    """``8,16,32`` -> [8, 16, 32]; one line naming the option and the bad item otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = next((x for x in items if not x.isdigit() or int(x) < 1), None)
    if bad is not None or not items:
        raise UserError(f"{flag}: {bad!r} is not a positive integer (got {text!r})" if bad
                        else f"{flag}: needs at least one value (got {text!r})")  # fmt: skip
    return [int(x) for x in items]


def cmd_spectrum(args: argparse.Namespace) -> int:
    from lorasweep.tools import spectrum

    if not 0 < args.energy <= 1:
        raise UserError(f"--energy: must be in (0, 1], got {args.energy}")
    if args.verify and not Path(args.verify).is_dir():
        raise UserError(f"--verify: not a run folder: {args.verify}")
    out = spectrum.analyze_adapter(args.adapter, other=args.other, energy=args.energy, by=args.by)
    if args.plot:
        spectra = [out]
        if args.other:
            spectra.append(spectrum.adapter_spectrum(args.other))
        from lorasweep.analysis.tool_plots import plot_spectra

        plot_spectra(spectra, args.plot)
    if args.verify:
        import contextlib

        from lorasweep.tools.spectrum_verify import format_verify, verify_suggestion

        # --json: stdout carries the JSON alone; anything training prints goes to stderr
        quiet_out = (
            contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
        )
        with quiet_out:
            out["verify"] = verify_suggestion(
                args.verify,
                args.adapter,
                energy=args.energy,
                by=args.by,
                run=not args.no_run,
                backend=args.backend,
                quiet=args.quiet,
            )
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    print(spectrum.format_spectrum(out))
    if args.plot:
        print(f"Plot: {args.plot}")
    if args.verify:
        print()
        print(format_verify(out["verify"]))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from lorasweep.tools.starter import starter_spec

    text = starter_spec(args.model, args.task)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    if path.exists() and not args.force:
        raise UserError(f"--output: {path} exists (use --force to overwrite)")
    path.write_text(text)
    print(f"wrote {path}")
    return 0


COMMANDS = {
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
    from lorasweep.cli_args import build_parser

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # the reader went away (`lorasweep status DIR | head`): stop quietly, as `cat` does
        _silence_stdout()
        return 141


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

"""The command line's options: one function per subcommand, each option with its help and
its default; ``UserError``, the one-line error of a bad option or input."""

from __future__ import annotations

import argparse
from typing import Any


class UserError(Exception):
    """Printed as one line per problem, exit code 2."""


def package_version() -> str:
    """The installed package's version (``importlib.metadata``), else the source's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorasweep")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        from lorasweep import __version__

        return __version__


def _run_args(p: argparse.ArgumentParser) -> None:
    # long: one add_argument per option of run and demo, each with its help and default
    p.add_argument(
        "--backend",
        choices=["inprocess", "local", "ray"],
        default="local",
        help="where trials run (default: local, a fresh process per trial)",
    )
    p.add_argument(
        "--jobs",
        default="1",
        help="trials at once, one GPU each; auto: as many per GPU as fit by the estimator, "
        "one at a time on CPU (default: %(default)s)",
    )
    p.add_argument(
        "--shared-folder",
        action="store_true",
        help="with --backend ray: the run folder is on a filesystem every node sees at the same "
        "path; trials read and write it directly instead of moving data and files through "
        "Ray's object store",
    )
    p.add_argument(
        "--per-gpu",
        type=int,
        default=None,
        metavar="N",
        help="N trials on each GPU at once, whatever the estimate (default: by memory with "
        "--jobs auto)",
    )
    p.add_argument(
        "--retry",
        default="",
        help="re-run trials with these statuses, e.g. failed,oom (default: none)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address: auto or HOST:PORT (default: a local Ray)",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress display")
    p.add_argument(
        "--yes",
        action="store_true",
        help="start a sweep of more trials than the confirmation threshold without asking",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="successive halving: drop configurations significantly worse than the best at "
        "intermediate rungs (needs >= 2 seeds)",
    )
    p.add_argument("--prune-eta", type=int, default=None, help="halving factor (default: 2)")
    p.add_argument(
        "--prune-min-steps",
        type=int,
        default=None,
        help="steps of the first rung, at least (default: 10)",
    )
    p.add_argument(
        "--prune-alpha",
        type=float,
        default=None,
        help="level of the Holm-adjusted tests (default: 0.05)",
    )
    p.add_argument(
        "--prune-metric",
        default=None,
        help="eval metric compared at rungs (default: accuracy, or perplexity for causal-lm)",
    )
    p.add_argument(
        "--prune-tolerance",
        type=float,
        default=None,
        help="drop only configurations worse than the best by more than this, in metric units "
        "(default: 0)",
    )
    p.add_argument(
        "--prune-eval-examples",
        type=int,
        default=None,
        help="evaluate rungs on the first N eval examples (default: all; final eval uses all)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorasweep", description="Which LoRA configuration should I use? Evidence."
    )
    p.add_argument("--version", action="version", version=f"lorasweep {package_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    _run_command(sub)
    _demo_command(sub)
    _status_command(sub)
    _export_command(sub)
    _analyze_command(sub)
    _report_command(sub)
    _estimate_command(sub)
    _spectrum_command(sub)
    _init_command(sub)
    return p


def _run_command(sub: Any) -> None:
    s = sub.add_parser("run", help="run or resume a sweep from a YAML spec")
    s.add_argument("spec", help="the sweep's YAML spec (`lorasweep init` writes a starter)")
    s.add_argument("--out", required=True, help="run folder (store, report, adapters)")
    _run_args(s)


def _demo_command(sub: Any) -> None:
    s = sub.add_parser("demo", help="MiniLM + Rotten Tomatoes, 3 ranks x 2 seeds, on CPU")
    s.add_argument("--out", default="lorasweep-demo", help="run folder (default: %(default)s)")
    _run_args(s)


def _status_command(sub: Any) -> None:
    s = sub.add_parser("status", help="the trials of a run folder")
    s.add_argument("dir", help="a run folder (lorasweep run --out)")
    s.add_argument("--json", action="store_true", help="one JSON object instead of a table")


def _export_command(sub: Any) -> None:
    s = sub.add_parser("export", help="per-trial rows as CSV or JSON")
    s.add_argument("dir", help="a run folder (lorasweep run --out)")
    s.add_argument(
        "--format",
        choices=["csv", "json"],
        default="csv",
        help="CSV or JSON rows (default: %(default)s)",
    )
    s.add_argument("-o", "--output", default=None, help="write this file (default: stdout)")


def _analyze_command(sub: Any) -> None:
    s = sub.add_parser("analyze", help="statistics and a recommendation")
    s.add_argument("source", help="a run folder, or a CSV/JSON of per-trial rows")
    s.add_argument(
        "--metric",
        help="the column compared (default: the task's, test_accuracy or accuracy; "
        "test_perplexity or perplexity for causal-lm)",
    )
    s.add_argument(
        "--direction",
        choices=["min", "max"],
        help="which is better (default: from the metric's name, e.g. max for accuracy)",
    )
    s.add_argument(
        "--by",
        help="grouping columns, comma separated (default: variant,rank and every setting that "
        "varies, such as learning_rate; lora_r, r and config.* columns are read as rank and "
        "settings)",
    )
    s.add_argument("--cost", help="cost column (default: train_seconds)")
    _margin_arg(s)
    s.add_argument(
        "--tolerance",
        type=float,
        help="deprecated: use --margin (the same, in metric units)",
    )
    s.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="leave out configurations whose peak memory exceeds this (default: no budget)",
    )
    _tune_args(s)
    s.add_argument("--json", action="store_true", help="the analysis as JSON")


def _tune_args(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--tune",
        default=None,
        metavar="SETTING[,SETTING]",
        help="choose these settings (e.g. learning_rate) per configuration of the others on "
        "--select-on, then compare the tuned configurations (default: the spec's tune:; "
        "'none' turns it off)",
    )
    s.add_argument(
        "--select-on",
        default=None,
        metavar="COLUMN",
        help="the column the tuned value is chosen on (default: the validation metric of a "
        "test metric, e.g. accuracy for test_accuracy; else the compared metric itself)",
    )


def _margin_arg(s: argparse.ArgumentParser) -> None:
    # kept as text here: the command checks it first, one `lorasweep: error:` line when bad
    s.add_argument(
        "--margin",
        default=None,
        help="recommend a cheaper configuration no worse than the best by more than this: a "
        "number in the metric's units, or a percentage of the best mean like 2%% (default: "
        "the spec's analysis.margin, else the metric's default)",
    )


def _report_command(sub: Any) -> None:
    s = sub.add_parser("report", help="write DIR/report.html")
    s.add_argument("dir", help="a run folder (lorasweep run --out)")
    _margin_arg(s)
    _tune_args(s)


def _estimate_command(sub: Any) -> None:
    s = sub.add_parser("estimate", help="params, adapter size and memory per rank, no weights")
    from lorasweep.training.models import SHIPPED

    s.add_argument(
        "model",
        help=f"a model with a shipped config ({', '.join(SHIPPED)}), a folder or a hub id",
    )
    s.add_argument(
        "--ranks", default="4,8,16,32,64,128,256", help="comma separated (default: %(default)s)"
    )
    s.add_argument(
        "--targets",
        default=None,
        help="attention, mlp, experts, language, vision, all-linear, or module-name suffixes, "
        "comma separated (default: peft's default for the model type)",
    )
    s.add_argument(
        "--rank-pattern",
        default=None,
        metavar="GROUP=RANK,...",
        help="per-group ranks instead of --ranks, e.g. attention=8,mlp=16",
    )
    s.add_argument(
        "--variant",
        choices=["lora", "dora", "qlora"],
        default="lora",
        help="the adapter, qlora a 4-bit base (default: %(default)s)",
    )
    s.add_argument(
        "--task",
        choices=["causal-lm", "classification", "seq2seq", "image-text-to-text"],
        default=None,
        help="the model class (default: from the model's config)",
    )
    s.add_argument("--batch", type=int, default=1, help="sequences per step (default: %(default)s)")
    s.add_argument(
        "--seq", type=int, default=512, help="tokens per sequence (default: %(default)s)"
    )
    s.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="weights and activations (default: %(default)s)",
    )
    s.add_argument(
        "--optimizer",
        choices=["adamw", "adamw-8bit", "sgd"],
        default="adamw",
        help="whose state is counted (default: %(default)s)",
    )
    s.add_argument(
        "--gradient-checkpointing", action="store_true", help="activations recomputed, not kept"
    )
    s.add_argument(
        "--dropout", default="0.05", help="lora_dropout, its masks count (default: %(default)s)"
    )
    s.add_argument(
        "--double-quant", action="store_true", help="qlora: double quantization of the constants"
    )
    s.add_argument(
        "--gpus",
        default=None,
        metavar="GiB,... or NAME=GiB,...",
        help="the cards of the fits column, memory in GiB as torch reports it (default: 16, 24, "
        "40, 48, 80 and 141 GB cards at 15.6, 23.6, 39.4, 47.5, 79.2 and 139.8 GiB)",
    )
    s.add_argument(
        "--margin",
        default="10%",
        help="a card fits when the estimate plus this share of it fits (default: %(default)s)",
    )
    s.add_argument("--plot", default=None, help="write the memory-vs-rank PNG here")
    s.add_argument("--json", action="store_true", help="the estimate as JSON")


def _spectrum_command(sub: Any) -> None:
    s = sub.add_parser(
        "spectrum", help="effective rank of a trained adapter, a rank suggestion, --verify it"
    )
    s.add_argument("adapter", help="a saved peft adapter folder")
    s.add_argument("other", nargs="?", default=None, help="a second adapter to compare")
    s.add_argument(
        "--energy", type=float, default=0.9, help="share of Σσ² to keep (default: %(default)s)"
    )
    s.add_argument(
        "--by",
        choices=["group", "type"],
        default="group",
        help="rank_pattern per group or type (default: %(default)s)",
    )
    s.add_argument("--plot", default=None, help="write the singular-value PNG here")
    s.add_argument("--json", action="store_true", help="the spectrum as JSON")
    s.add_argument(
        "--verify",
        default=None,
        metavar="RUN_DIR",
        help="add the suggestion to this sweep as extra variants and train them",
    )
    s.add_argument(
        "--no-run", action="store_true", help="with --verify: write RUN_DIR/spec.verify.yaml only"
    )
    s.add_argument(
        "--backend",
        choices=["inprocess", "local"],
        default="local",
        help="with --verify: where the new trials run (default: local)",
    )
    s.add_argument("--quiet", action="store_true", help="with --verify: no live progress")


def _init_command(sub: Any) -> None:
    from lorasweep.tools.starter import builtins_lines

    s = sub.add_parser(
        "init",
        help="write a commented starter spec",
        description="Write a commented starter spec for a model.",
        epilog="\n".join(builtins_lines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--model",
        default="builtin:minilm-l6",
        help="a builtin (listed below), a local model folder or a hub id (default: %(default)s)",
    )
    s.add_argument(
        "--task",
        choices=["classification", "causal-lm"],
        default=None,
        help="the task (default: from the model's config)",
    )
    s.add_argument(
        "-o", "--output", default="sweep.yaml", help="'-' for stdout (default: %(default)s)"
    )
    s.add_argument("--force", action="store_true", help="overwrite an existing --output")


def parse_jobs(text: str) -> int | str:
    """``--jobs``: a positive integer or ``auto``; one line naming the option otherwise."""
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"--jobs: must be a positive integer or auto, got {text!r}")
    return int(text)

"""The commands that need no sweep: ``estimate`` (memory and size per rank, no weights),
``spectrum`` (a trained adapter's effective rank, ``--verify`` trains the suggestion) and
``init`` (a commented starter spec). Thin calls into ``lorasweep.tools``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorasweep.cli_args import UserError


def cmd_estimate(args: argparse.Namespace) -> int:
    from lorasweep.analysis.tool_plots import plot_estimate
    from lorasweep.tools.estimate import estimate

    ranks = _positive_ints("--ranks", args.ranks)
    for flag, v in (("--batch", args.batch), ("--seq", args.seq)):
        if v < 1:
            raise UserError(f"{flag}: must be a positive integer, got {v}")
    if args.rank_pattern and args.targets:
        raise UserError("--targets: --rank-pattern names its own layers; give one of them")
    targets: Any = args.targets
    if targets and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
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
        lora_dropout=_fraction("--dropout", args.dropout, upper=1.0),
        double_quant=args.double_quant,
        gpus=_gpus(args.gpus) if args.gpus else None,
        margin=_fraction("--margin", args.margin, upper=1.0),
        rank_pattern=_rank_pattern(args.rank_pattern),
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_table())
    if args.plot:
        plot_estimate(result, args.plot)
        if not args.json:
            print(f"Plot: {args.plot}")
    return 0


def _fraction(flag: str, text: str, upper: float) -> float:
    """``0.1`` or ``10%`` -> 0.1, in [0, upper); one line naming the option otherwise."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        value = float("nan")
    if not 0 <= value < upper:  # also NaN
        raise UserError(f"{flag}: must be a number in [0, {upper:g}) or a percentage, got {text!r}")
    return value


def _gpus(text: str) -> dict[str, float]:
    """``16,24`` or ``A10G=22.5,H100=80`` -> name -> GiB."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        name, _, gib = item.rpartition("=")
        try:
            value = float(gib)
        except ValueError:
            value = float("nan")
        if not item or not value > 0 or value == float("inf"):
            raise UserError(f"--gpus: {item!r} is not a memory in GiB or NAME=GiB (got {text!r})")
        out[name.strip() or f"{value:g} GB"] = value
    return out


def _rank_pattern(text: str | None) -> dict[str, int] | None:
    """``attention=8,mlp=16`` -> {"attention": 8, "mlp": 16}."""
    if text is None:
        return None
    out: dict[str, int] = {}
    for item in (x.strip() for x in text.split(",")):
        key, _, rank = item.partition("=")
        if not key.strip() or not rank.strip().isdigit() or int(rank) < 1:
            raise UserError(
                f"--rank-pattern: {item!r} is not GROUP=RANK with a positive rank (got {text!r})"
            )
        out[key.strip()] = int(rank)
    return out


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
    """Write the starter spec (``-o -``: to stdout); after a file, the builtins, one line each
    (the spec's header comments list them too)."""
    from lorasweep.tools.starter import builtins_lines, starter_spec

    text = starter_spec(args.model, args.task)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    if path.exists() and not args.force:
        raise UserError(f"--output: {path} exists (use --force to overwrite)")
    path.write_text(text)
    print(f"wrote {path}; run it with: lorasweep run {path} --out runs/my-sweep")
    print("\n".join(builtins_lines()))
    return 0

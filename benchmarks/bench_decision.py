"""Monte Carlo of the recommendation rule: how often it picks a configuration that is truly worse.

Simulates per-seed trials tables (one variant "lora", ranks 4, 8, 16, 32, 64, 128; seeds shared
by every configuration, the blocking design), feeds each to ``lorasweep.analysis.stats.analyze``
and checks the recommendation against the true means the table was drawn from.

    nice -n 10 .venv/bin/python benchmarks/bench_decision.py --reps 200

Generator. Accuracy (higher is better) of a run = the configuration's true mean + a seed effect
N(0, 0.01) shared by every configuration at that seed + run noise N(0, 0.008), three times wider
for an "unstable" configuration, clipped to [0, 1]. A "collapsed" run is exactly 0.5 (the
majority-class rate). Costs: ``trainable_params`` = 1000 * rank (exact); ``train_seconds`` =
60 * (1 + rank / 256) * lognormal(0, 0.05), i.e. 61-90 s, so ranks 4, 8 and 16 (sometimes 32) lie
within analyze's 10 % cost tie of one another and measurement noise can reorder them (a steeper
curve such as 10 * sqrt(rank) never ties adjacent ranks). ``--cost`` picks the one analyze uses.

Scenarios (best true mean 0.80; MARGIN is ``--margin``, default 0.01 = 1 point):

    all-equal       all six at 0.80
    cheap-worse     ranks 4 and 8 at 0.77 (3 points worse), the rest 0.80
    at-margin       ranks 4 and 8 at 0.80 - MARGIN, the rest 0.80
    unstable-cheap  rank 4 at 0.80 with 3x run noise, the rest 0.80
    unstable-worse  rank 4 at 0.785 with 3x run noise, the rest 0.80
    collapse        all 0.80, but in every table one rank-4 run (a random seed) collapses to
                    0.5: rank 4 is unstable, and recommending it counts as an error even though
                    its other seeds are as good as the rest
    diminishing     0.70, 0.76, 0.785, 0.795, 0.80, 0.80

Truth. A configuration is "worse" when it is the collapsing one, or its true mean (clipping
ignored) is below the best true mean by MORE than MARGIN (gap > MARGIN + 1e-9),
except in at-margin, where a gap of at least MARGIN counts as worse (gap >= MARGIN - 1e-9): there
ranks 4 and 8 are the configurations a non-inferiority rule must not accept. The "target" is the
cheapest configuration (lowest rank; both costs rise with rank) that is not worse.

Per (scenario, seeds) and ``--reps`` tables it prints P(recommend a worse configuration) with its
Monte Carlo standard error sqrt(p (1 - p) / reps), P(recommend the target), P(no recommendation)
and how often each rank was recommended. Each cell draws from its own generator seeded by
(``--seed``, scenario, seeds), so a cell's figures do not depend on which other cells run.

``recommend`` passes ``margin=`` to analyze when analyze accepts it (the non-inferiority rule);
otherwise it calls analyze without it and the output says that the old rule was measured.
About 5,600 analyze calls at --reps 200 (seven scenarios, four seed counts).
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lorasweep.analysis.stats import analyze

RANKS = np.array([4, 8, 16, 32, 64, 128])
SEED_COUNTS = (2, 3, 5, 10)
BEST = 0.80
SEED_SD = 0.01
RUN_SD = 0.008
UNSTABLE = 3.0
COLLAPSE_VALUE = 0.5
EPS = 1e-9

_ACCEPTS_MARGIN = any(
    name == "margin" or p.kind is inspect.Parameter.VAR_KEYWORD
    for name, p in inspect.signature(analyze).parameters.items()
)
COST = "trainable_params"  # set from --cost in main()


@dataclass
class Scenario:
    name: str
    means: np.ndarray  # per rank, before collapses
    noise: np.ndarray = field(default_factory=lambda: np.ones(len(RANKS)))  # run-noise factor
    collapse: np.ndarray = field(default_factory=lambda: np.zeros(len(RANKS)))  # one seed, 0/1
    at_margin: bool = False

    def true_means(self) -> np.ndarray:
        return self.means

    def worse(self, margin: float) -> np.ndarray:
        gap = self.true_means().max() - self.true_means()
        worse = gap >= margin - EPS if self.at_margin else gap > margin + EPS
        return worse | (self.collapse > 0)

    def target(self, margin: float) -> int | None:
        ok = RANKS[~self.worse(margin)]
        return int(ok.min()) if len(ok) else None


def scenarios(margin: float) -> list[Scenario]:
    def means(*first: float) -> np.ndarray:
        return np.array([*first, *[BEST] * (len(RANKS) - len(first))])

    def rank4(value: float) -> np.ndarray:
        return np.array([value, *np.zeros(len(RANKS) - 1)])

    return [
        Scenario("all-equal", means()),
        Scenario("cheap-worse", means(0.77, 0.77)),
        Scenario("at-margin", means(BEST - margin, BEST - margin), at_margin=True),
        Scenario("unstable-cheap", means(), noise=1 + rank4(UNSTABLE - 1)),
        Scenario("unstable-worse", means(0.785), noise=1 + rank4(UNSTABLE - 1)),
        Scenario("collapse", means(), collapse=rank4(1.0)),
        Scenario("diminishing", np.array([0.70, 0.76, 0.785, 0.795, 0.80, 0.80])),
    ]


def table(sc: Scenario, n_seeds: int, rng: np.random.Generator) -> pd.DataFrame:
    """One simulated trials table: len(RANKS) * n_seeds rows."""
    k = len(RANKS)
    seed_effect = rng.normal(0.0, SEED_SD, n_seeds)[None, :]
    run = rng.normal(0.0, RUN_SD, (k, n_seeds)) * sc.noise[:, None]
    acc = np.clip(sc.means[:, None] + seed_effect + run, 0.0, 1.0)
    hit = rng.integers(0, n_seeds)  # the seed that collapses, in the configurations that do
    acc[sc.collapse > 0, hit] = COLLAPSE_VALUE
    seconds = 60.0 * (1 + RANKS / 256)[:, None] * rng.lognormal(0.0, 0.05, (k, n_seeds))
    return pd.DataFrame(
        {
            "variant": "lora",
            "rank": np.repeat(RANKS, n_seeds),
            "seed": np.tile(np.arange(n_seeds), k),
            "status": "complete",
            "accuracy": acc.ravel(),
            "trainable_params": np.repeat(1000 * RANKS, n_seeds),
            "train_seconds": seconds.ravel(),
        }
    )


def recommend(df: pd.DataFrame, margin: float) -> int | None:
    """The rank analyze recommends, or None."""
    if _ACCEPTS_MARGIN:
        a = analyze(df, metric="accuracy", direction="higher", cost=COST, margin=margin)
    else:
        a = analyze(df, metric="accuracy", direction="higher", cost=COST)
    rec = a["recommended"]
    return None if rec is None else int(rec["key"]["rank"])


def cell(sc: Scenario, n_seeds: int, reps: int, margin: float, seed: int, index: int) -> dict:
    rng = np.random.default_rng([seed, index, n_seeds])
    worse = dict(zip(RANKS.tolist(), sc.worse(margin).tolist()))
    target = sc.target(margin)
    picks = [recommend(table(sc, n_seeds, rng), margin) for _ in range(reps)]
    p_bad = sum(r is not None and worse[r] for r in picks) / reps
    counts = {r: picks.count(r) for r in [*RANKS.tolist(), None] if picks.count(r)}
    return {
        "seeds": n_seeds,
        "p_worse": p_bad,
        "se": (p_bad * (1 - p_bad) / reps) ** 0.5,
        "p_target": sum(r is not None and r == target for r in picks) / reps,
        "p_none": picks.count(None) / reps,
        "counts": counts,
    }


def describe(sc: Scenario, margin: float) -> str:
    tm = sc.true_means()
    parts = []
    for i, r in enumerate(RANKS):
        s = f"r{r} {tm[i]:.3f}"
        if sc.noise[i] != 1:
            s += f" ({sc.noise[i]:g}x noise)"
        if sc.collapse[i]:
            s += " (one seed collapses)"
        parts.append(s)
    bad = [str(r) for r, w in zip(RANKS, sc.worse(margin)) if w]
    rule = ">=" if sc.at_margin else ">"
    return (
        f"True means: {', '.join(parts)}. Worse (gap {rule} margin): "
        f"{', '.join(bad) or 'none'}; target: rank {sc.target(margin)}."
    )


def main() -> None:
    global COST
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=400, help="tables per (scenario, seeds)")
    p.add_argument("--seed", type=int, default=20240611, help="seed of the generator")
    p.add_argument("--margin", type=float, default=0.01, help="margin in accuracy (0.01 = 1 pt)")
    p.add_argument("--cost", choices=["trainable_params", "train_seconds"], default=COST)
    p.add_argument("--scenarios", default=None, help="comma-separated subset of the scenarios")
    p.add_argument("--seed-counts", default=None, help="comma-separated, default 2,3,5,10")
    args = p.parse_args()
    COST = args.cost
    all_sc = scenarios(args.margin)
    chosen = args.scenarios.split(",") if args.scenarios else [s.name for s in all_sc]
    unknown = set(chosen) - {s.name for s in all_sc}
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    counts = [int(x) for x in args.seed_counts.split(",")] if args.seed_counts else SEED_COUNTS

    print("python " + " ".join(shlex.quote(a) for a in sys.argv))
    print()
    if _ACCEPTS_MARGIN:
        print(f"Rule measured: analyze(..., margin={args.margin:g}) (non-inferiority margin).")
    else:
        print(
            "Rule measured: the OLD rule (analyze does not accept margin=; called without it). "
            f"Truth still uses margin {args.margin:g}."
        )
    print(
        f"reps {args.reps} per cell, generator seed {args.seed}, cost {COST}, "
        f"seed sd {SEED_SD}, run sd {RUN_SD}."
    )
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for index, sc in enumerate(all_sc):
        if sc.name not in chosen:
            continue
        results[sc.name] = []
        for n in counts:
            t = time.perf_counter()
            results[sc.name].append(cell(sc, n, args.reps, args.margin, args.seed, index))
            print(
                f"{sc.name} seeds={n}: {time.perf_counter() - t:.1f} s "
                f"(total {time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    wall = time.perf_counter() - t0

    summaries = (
        ("P(recommend a truly worse configuration) (Monte Carlo SE)",
         lambda r: f"{r['p_worse']:.3f} ({r['se']:.3f})"),
        ("P(recommend the target: cheapest truly within the margin)",
         lambda r: f"{r['p_target']:.3f}"),
    )  # fmt: skip
    for title, fmt in summaries:
        print(f"\n## {title}\n")
        print("| scenario | " + " | ".join(f"{n} seeds" for n in counts) + " |")
        print("|---|" + "---:|" * len(counts))
        for name, rows in results.items():
            print(f"| {name} | " + " | ".join(fmt(r) for r in rows) + " |")
    for sc in all_sc:
        if sc.name not in results:
            continue
        print()
        print(f"## {sc.name}")
        print()
        print(describe(sc, args.margin))
        print()
        print("| seeds | P(worse) | MC SE | P(target) | P(none) | recommended rank: count |")
        print("|---:|---:|---:|---:|---:|---|")
        for r in results[sc.name]:
            picks = ", ".join(f"{'none' if k is None else k}: {v}" for k, v in r["counts"].items())
            print(
                f"| {r['seeds']} | {r['p_worse']:.3f} | {r['se']:.3f} | {r['p_target']:.3f} "
                f"| {r['p_none']:.3f} | {picks} |"
            )
    print()
    print(f"Ran {len(results) * len(counts) * args.reps} tables in {wall:.0f} s.")


if __name__ == "__main__":
    main()

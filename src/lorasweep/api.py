"""The notebook API: load a spec, run it, look at the results, with the CLI's own objects.

::

    from lorasweep.api import Sweep, Results

    sweep = Sweep.from_spec("sweep.yaml")        # a path, YAML text or a dict
    results = sweep.run("runs/demo", jobs=1)      # resumable, like `lorasweep run`
    results.trials                                # pandas DataFrame, one row per trial
    results.analysis()                            # stats.analyze's dict; shows as a table
    results.recommendation                        # Recommendation: .label, .key, .mean, .reason
    print(results.recommendation)                 # one paragraph: the configuration and why
    results.plot_metric()                         # matplotlib Figure, shown inline in Jupyter
    results.plots()                               # every figure, shown together in one cell
    results.report()                              # Path of report.html

    Results("runs/demo")                          # an existing run folder, no training

Nothing here computes anything of its own: the store gives the frames (``store.trials_frame``),
``stats.analyze`` the statistics, ``plots`` the figures and ``report.write_run_report`` the report,
exactly as the command line does.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay out of `import lorasweep.api`
    import pandas as pd
    from matplotlib.figure import Figure

    from lorasweep.analysis.views import Analysis, Figures, Recommendation
    from lorasweep.run.sweep import SweepOutcome
    from lorasweep.spec import SweepSpec

__all__ = ["Results", "Sweep"]


class Sweep:
    """A parsed sweep spec, ready to run. Use ``Sweep.from_spec``."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    @classmethod
    def from_spec(cls, source: str | Path | Mapping[str, Any] | SweepSpec) -> Sweep:
        """Parse a spec from a YAML file path, YAML text, a dict or a ``SweepSpec``.

        Only the shape is checked here (``spec.parse_spec``: every error at once, SpecError);
        files, columns, training arguments and target modules are checked by ``check()`` and
        again by ``run()``, before anything trains.
        """
        from lorasweep.spec import SweepSpec, parse_spec

        if isinstance(source, SweepSpec):
            return cls(source)
        return cls(parse_spec(dict(source) if isinstance(source, Mapping) else source))

    def check(self) -> Sweep:
        """Check the spec against the world (data file, columns, targets); SpecError if bad."""
        import lorasweep.run.progress  # noqa: F401 - first, so a kernel's tqdm.auto stays quiet
        from lorasweep.run.preflight import check_spec

        check_spec(self.spec)
        return self

    @property
    def name(self) -> str:
        return self.spec.name

    def plan(self) -> pd.DataFrame:
        """The trials the sweep will run: id, variant, rank, seed, label (no training)."""
        import pandas as pd

        rows = [
            {
                "trial_id": t.id,
                "variant": t.variant,
                "rank": t.rank,
                "seed": t.seed,
                "label": t.label,
            }
            for t in self.spec.trials()
        ]
        return pd.DataFrame(rows, columns=["trial_id", "variant", "rank", "seed", "label"])

    def to_yaml(self) -> str:
        """The spec as YAML, defaults left out (what the store records as ``spec_yaml``)."""
        import yaml

        return yaml.safe_dump(
            self.spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False
        )

    def run(
        self,
        out_dir: str | Path,
        *,
        backend: str = "local",
        jobs: int | str = 1,
        per_gpu: int | None = None,
        shared_folder: bool = False,
        retry: tuple[str, ...] = (),
        report: bool = True,
        quiet: bool = False,
        prune: bool | Any = False,
        yes: bool = False,
    ) -> Results:
        """Run (or resume) the sweep into ``out_dir``; finished trials are never run again.

        Args:
            out_dir: the run folder (store, adapters, report), as ``lorasweep run --out``.
            backend: "local" (a fresh process per trial: clean memory figures) or "inprocess"
                (trials in this process: fastest start, memory peaks approximate), or "ray".
            jobs: trials at once (local backend; one GPU each), or "auto": as many per GPU as
                fit by the estimator (one at a time on CPU).
            per_gpu: that many trials on each GPU at once, whatever the estimate.
            shared_folder: with backend="ray": the run folder is on a filesystem all nodes
                see; trials read and write it directly (else files move through Ray).
            retry: statuses to run again: "failed", "oom".
            report: write ``out_dir/report.html`` at the end.
            quiet: no progress lines.
            prune: True (or a ``lorasweep.run.pruning.PruneSettings``) for successive halving:
                trials pause at rungs and configurations significantly worse than the best are
                stored ``pruned``, as ``lorasweep run --prune``.
            yes: start more than 200 new trials (``lorasweep run --yes``); without it such a
                sweep is refused before anything runs.
        """
        from lorasweep.run.sweep import run_sweep

        outcome = run_sweep(
            self.spec,
            out_dir,
            backend=backend,
            jobs=jobs,
            per_gpu=per_gpu,
            shared_folder=shared_folder,
            retry=tuple(retry),
            report=report,
            quiet=quiet,
            prune=prune,
            yes=yes,
        )
        return Results(outcome.out_dir, outcome=outcome)

    def _repr_html_(self) -> str:
        n = len(self.spec.trials())
        return (
            f"<p><b>Sweep {html.escape(self.name)}</b>: {html.escape(self.spec.task)} on "
            f"<code>{html.escape(self.spec.model)}</code>, {n} trials</p>"
            + self.plan().to_html(index=False)
        )

    def __repr__(self) -> str:
        return f"Sweep({self.name!r}, task={self.spec.task!r}, trials={len(self.spec.trials())})"


class Results:
    """The results in a run folder: frames, statistics, figures and the report.

    Every property reads the store again, so a ``Results`` of a running sweep stays current.
    """

    def __init__(self, out_dir: str | Path, *, outcome: SweepOutcome | None = None):
        from lorasweep.store import open_store

        self.out_dir = Path(out_dir)
        self.outcome = outcome
        open_store(self.out_dir).close()  # FileNotFoundError now, not at first use

    # -- data
    def _store(self) -> Any:
        from lorasweep.store import open_store

        return open_store(self.out_dir)

    @property
    def trials(self) -> pd.DataFrame:
        """One row per trial: id, label, status, variant, rank, seed, config columns, metrics."""
        with self._store() as store:
            return store.trials_frame()

    @property
    def curves(self) -> pd.DataFrame:
        """``trial_id, curve, step, value`` rows: ``train_loss`` and the eval curves
        (``eval_accuracy``, ``eval_loss``...: one point per pruning rung and the final one)."""
        with self._store() as store:
            return store.curves_frame()

    @property
    def meta(self) -> dict[str, Any]:
        """What the sweep recorded about itself: name, task, spec, spec_yaml."""
        with self._store() as store:
            return store.meta()

    @property
    def pruning(self) -> dict[str, Any] | None:
        """For a sweep run with ``prune``: its rung decisions and what pruning saved (trial-steps
        and training seconds against the full grid), as ``analysis.pruning_summary``; else None."""
        from lorasweep.analysis.pruning_summary import pruning_summary

        with self._store() as store:
            state, trials = store.meta().get("prune"), store.trials_frame()
        return pruning_summary(state, trials) if state else None

    # -- statistics
    def analysis(
        self,
        *,
        tune: str | list[str] | None = None,
        select_on: str | None = None,
        **kwargs: Any,
    ) -> Analysis:
        """``stats.analyze`` of the trials; keyword arguments as there (metric, direction, by,
        cost, margin, memory_budget_gb, alpha; tolerance is a deprecated alias of an absolute
        margin). The dict ``analyze`` returns, as an ``Analysis`` (a dict) that shows itself:
        in Jupyter the comparison table, the recommendation card and the flags, as text
        (``print``, ``repr``) the table ``lorasweep analyze`` prints.

        ``margin``: how much worse than the best a cheaper configuration may be and still be
        recommended, a number in the metric's units (``0.01``) or a percentage of the best mean
        (``"2%"``). Not given (or None): the spec's ``analysis.margin``, else the metric's
        default, as in the report and ``lorasweep analyze DIR``.

        ``tune``: settings chosen per configuration of the others before the comparison
        (``["learning_rate"]``; nested selection, docs/report.md); not given: the spec's
        ``tune:``, ``[]`` turns it off. ``select_on``: the column the tuned value is chosen on
        (default: the validation metric when comparing on a test metric, else the metric).
        The result then has ``tuning`` (what was chosen), and always ``factors`` (marginal
        means) and ``interaction`` (a sentence, or None).
        """
        from lorasweep.analysis.stats import analyze
        from lorasweep.analysis.views import Analysis
        from lorasweep.spec import analysis_kwargs

        with self._store() as store:
            trials, recorded = store.trials_frame(), store.meta().get("spec")
        given = {**kwargs, "tune": tune, "select_on": select_on}
        return Analysis(analyze(trials, **analysis_kwargs(recorded, given)))

    def summary(self, **kwargs: Any) -> pd.DataFrame:
        """One row per configuration: n, mean, std, 95% CI, adjusted p-value and cost of the
        metric, marked best / recommended (the table ``format_analysis`` prints). Keyword
        arguments as ``analysis`` (``margin="2%"``...)."""
        import pandas as pd

        from lorasweep.analysis.stats import group_label

        result = self.analysis(**kwargs)
        best = (result.get("best") or {}).get("key")
        rec = (result.get("recommended") or {}).get("key")
        rows = []
        for g in result["groups"]:
            ci = g.get("ci95") or (None, None)
            rows.append(
                {
                    "config": group_label(g["key"]),
                    **g["key"],
                    "n": g["n"],
                    "mean": g["mean"],
                    "std": g["std"],
                    "ci_lo": ci[0],
                    "ci_hi": ci[1],
                    "reference": group_label(g["reference"]) if g.get("reference") else None,
                    "diff": g.get("diff"),
                    "diff_bound": g.get("diff_bound"),
                    "within_margin": g.get("within_margin"),
                    "p_adjusted": g.get("p_adjusted"),
                    "cost": g.get("cost"),
                    "eligible": g.get("eligible"),
                    "note": g.get("note"),
                    "best": g["key"] == best,
                    "recommended": g["key"] == rec,
                }
            )
        df = pd.DataFrame(rows)
        df.attrs.update(metric=result["metric"], direction=result["direction"],
                        margin=(result.get("margin") or {}).get("absolute"))  # fmt: skip
        return df

    @property
    def recommendation(self) -> Recommendation:
        """The recommended configuration and why, with the spec's analysis settings: ``.found``,
        ``.key``, ``.label``, ``.metric``, ``.mean``, ``.std``, ``.n``, ``.margin``, ``.reason``.
        ``print()`` gives the paragraph of the CLI and the report's card (``"Recommended lora
        r=8: ..."`` or ``"No recommendation: ..."``); Jupyter shows a card. For other settings:
        ``results.analysis(margin=...).recommendation``."""
        from lorasweep.analysis.views import Recommendation

        try:
            return self.analysis().recommendation
        except ValueError as e:
            return Recommendation.none(str(e))

    def format(self, **kwargs: Any) -> str:
        """The plain-text analysis the CLI prints (``stats.format_analysis``)."""
        from lorasweep.analysis.stats import format_analysis

        return format_analysis(self.analysis(**kwargs))

    # -- figures (lorasweep.analysis.plots renderers; each returns a matplotlib Figure)
    def _metric(self, metric: str | None) -> str:
        from lorasweep.analysis.stats import resolve_metric

        return resolve_metric(self.trials, metric)

    def plot_metric(self, metric: str | None = None, direction: str | None = None) -> Figure:
        """Mean metric per rank with 95% CI error bars, one line per variant."""
        from lorasweep.analysis import plots

        trials = self.trials
        metric = self._metric(metric)
        fig = plots.plot_metric_vs_rank(
            plots.metric_vs_rank_data(trials, metric), metric, direction
        )
        return _inline(fig)

    def plot_time(self, column: str = "train_seconds") -> Figure:
        """Training-loop wall time per rank (mean, 95% CI)."""
        from lorasweep.analysis import plots

        return _inline(plots.plot_time_vs_rank(plots.time_vs_rank_data(self.trials, column)))

    def plot_memory(self, gpu_limits_gb: tuple[float, ...] = (24, 40, 80)) -> Figure:
        """Peak memory per rank (GPU allocated when measured, else CPU RSS), in GiB."""
        from lorasweep.analysis import plots

        return _inline(
            plots.plot_memory_vs_rank(plots.memory_vs_rank_data(self.trials), gpu_limits_gb)
        )

    def plot_pareto(
        self, metric: str | None = None, cost: str = "train_seconds", direction: str | None = None
    ) -> Figure:
        """Mean metric vs mean cost per configuration, the Pareto front highlighted."""
        from lorasweep.analysis import plots

        metric = self._metric(metric)
        data = plots.pareto_data(self.trials, metric, cost, direction)
        return _inline(plots.plot_pareto(data, metric, cost))

    def plot_efficiency(self, metric: str | None = None, direction: str | None = None) -> Figure:
        """Metric per training hour per rank."""
        from lorasweep.analysis import plots

        metric = self._metric(metric)
        return _inline(plots.plot_efficiency(plots.efficiency_data(self.trials, metric, direction)))

    def plot_heatmap(self, **kwargs: Any) -> Figure:
        """The mean metric over two factors (rank by learning rate, ...), the best cell of each
        row and the tuned choices marked, as in the report; keyword arguments as
        ``analysis``. ValueError when no two factors vary crossed."""
        from lorasweep.analysis import heatmap

        fig = heatmap.heatmap_figure(self.trials, self.analysis(**kwargs))
        if fig is None:
            raise ValueError(
                "heatmap: needs two factors that vary crossed (e.g. rank and learning_rate)"
            )
        return _inline(fig)

    def plot_loss_curves(self, curve: str = "train_loss") -> Figure:
        """Training loss per step, averaged over seeds, one line per configuration."""
        from lorasweep.analysis import plots

        data = plots.loss_curves_data(self.trials, self.curves, curve)
        return _inline(plots.plot_loss_curves(data, curve))

    def plots(self, *names: str) -> Figures:
        """Several figures shown together in one notebook cell (a cell shows only its last
        value): by default every one that can be drawn, in the order below; or the ones
        named (``"metric", "time", "memory", "efficiency", "pareto", "heatmap",
        "loss_curves"``: the ``plot_*`` methods, with their defaults). A list of Figures;
        ``.skipped`` says which of the defaults could not be drawn and why."""
        from lorasweep.analysis.views import Figures

        known = ("metric", "time", "memory", "efficiency", "pareto", "heatmap", "loss_curves")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"plots: unknown {unknown}; choose from {list(known)}")
        drawn, skipped = [], {}
        for name in names or known:
            try:
                drawn.append((name, getattr(self, f"plot_{name}")()))
            except ValueError as e:
                if names:
                    raise
                skipped[name] = str(e)
        return Figures(drawn, skipped)

    # -- report
    def report(self, **kwargs: Any) -> Path:
        """(Re)write ``out_dir/report.html`` and return its path; keyword arguments go to
        ``report.build_report`` (``analysis_kwargs``, ``gpu_limits_gb``). The analysis uses the
        spec's ``analysis.margin`` unless ``analysis_kwargs={"margin": ...}`` overrides it."""
        from lorasweep.analysis.report import write_run_report

        path = write_run_report(self.out_dir, **kwargs)
        if path is None:
            raise ValueError(f"no trials recorded in {self.out_dir}")
        return path

    # -- display
    def _repr_html_(self) -> str:
        trials = self.trials
        counts = trials["status"].value_counts().to_dict() if not trials.empty else {}
        status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
        name = html.escape(str(self.meta.get("name") or self.out_dir.name))
        where = html.escape(str(self.out_dir))
        head = f"<p><b>lorasweep results {name}</b> ({where}): {status}</p>"
        try:
            return head + self.analysis()._repr_html_()
        except ValueError as e:
            return head + f"<p>No analysis: {html.escape(str(e))}</p>"

    def __repr__(self) -> str:
        return f"Results({str(self.out_dir)!r})"


def _inline(fig: Figure) -> Figure:
    """Make a Figure built without pyplot show itself in Jupyter (as PNG) when it is the last
    expression of a cell, whatever matplotlib backend is active."""

    def _repr_png_() -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()

    fig._repr_png_ = _repr_png_  # type: ignore[attr-defined]
    return fig

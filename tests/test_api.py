"""The notebook API (lorasweep.api): spec in, Results out, with the CLI's own objects; and the
notebook-style example executed end to end on a tiny model."""

from __future__ import annotations

import inspect
import json
import runpy
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure

from lorasweep.analysis.views import Analysis, Figures, Recommendation
from lorasweep.api import Results, Sweep
from lorasweep.spec import SpecError, SweepSpec

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _spec(model: Path, csv: Path) -> dict:
    return {
        "name": "api",
        "task": "classification",
        "model": str(model),
        "dataset": {"source": str(csv), "max_length": 32, "max_eval_examples": 24},
        "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_steps": 3},
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.0},
        "grid": {"rank": [2, 4]},
        "seeds": [0, 1],
    }


@pytest.fixture(scope="module")
def results(
    tiny_bert_dir: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Results:
    out = tmp_path_factory.mktemp("api") / "run"
    return Sweep.from_spec(_spec(tiny_bert_dir, tiny_csv)).run(out, backend="inprocess", quiet=True)


def test_from_spec_accepts_dict_yaml_text_path_and_spec(tmp_path: Path) -> None:
    d = _spec(tmp_path / "model", tmp_path / "d.csv")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    sweeps = [
        Sweep.from_spec(d),
        Sweep.from_spec(yaml.safe_dump(d)),
        Sweep.from_spec(path),
        Sweep.from_spec(str(path)),
    ]
    sweeps.append(Sweep.from_spec(sweeps[0].spec))
    assert all(isinstance(s.spec, SweepSpec) for s in sweeps)
    assert all(s.spec == sweeps[0].spec for s in sweeps)
    assert yaml.safe_load(sweeps[0].to_yaml())["grid"] == {"rank": [2, 4]}
    plan = sweeps[0].plan()
    assert list(plan.columns) == ["trial_id", "variant", "rank", "seed", "label"]
    assert plan["label"].tolist() == [
        "lora/r=2/seed=0",
        "lora/r=2/seed=1",
        "lora/r=4/seed=0",
        "lora/r=4/seed=1",
    ]
    assert "4 trials" in sweeps[0]._repr_html_()


def test_from_spec_reports_every_error_at_once() -> None:
    with pytest.raises(SpecError) as e:
        Sweep.from_spec({"task": "regression", "model": "m", "dataset": {}, "seeds": []})
    keys = {line.split(":")[0] for line in e.value.errors}
    assert {"task", "dataset.source", "seeds"} <= keys


def test_results_frames_are_the_stores(results: Results) -> None:
    from lorasweep.store import open_store

    df = results.trials
    assert isinstance(df, pd.DataFrame) and len(df) == 4
    assert set(df["status"]) == {"complete"}
    assert {"accuracy", "f1", "train_seconds", "trainable_params"} <= set(df.columns)
    with open_store(results.out_dir) as store:
        pd.testing.assert_frame_equal(df, store.trials_frame())
    assert set(results.curves["curve"]) == {"train_loss", "eval_accuracy", "eval_f1", "eval_loss"}
    assert results.meta["name"] == "api"
    assert results.outcome is not None and results.outcome.ran == 4


def test_analysis_and_recommendation_match_the_cli(results: Results) -> None:
    from lorasweep.analysis.stats import analyze, format_analysis, group_label

    a = results.analysis()
    assert a == analyze(results.trials)
    assert results.format() == format_analysis(a)
    assert results.analysis(metric="f1")["metric"] == "f1"
    rec = results.recommendation
    assert isinstance(rec, Recommendation)
    summary = results.summary()
    assert summary["config"].tolist() == [group_label(g["key"]) for g in a["groups"]]
    assert summary["best"].sum() == 1
    # the same words as the CLI's paragraph (and the report's card)
    assert str(rec) == rec.reason == a["reason"] and rec.reason in results.format()
    assert rec == a.recommendation
    if a["recommended"]:
        assert rec.found and rec.label == group_label(a["recommended"]["key"])
        assert rec.reason.startswith(f"Recommended {rec.label}: ")
        assert summary["recommended"].sum() == 1
    else:  # the tiny model may learn nothing in 3 steps: no recommendation, and it says so
        assert not rec.found and rec.key is None
        assert rec.reason.startswith("No recommendation")
        assert summary["recommended"].sum() == 0
    assert {"diff", "diff_bound", "within_margin", "eligible"} <= set(summary.columns)


def _table(acc: dict[int, list[float]]) -> pd.DataFrame:
    """Accuracy per rank and seed; a higher rank costs more seconds."""
    return pd.DataFrame(
        [
            {"trial_id": f"r{r}s{s}", "status": "complete", "variant": "lora", "rank": r,
             "seed": s, "task": "classification", "accuracy": a, "train_seconds": 100.0 + r}
            for r, values in acc.items()
            for s, a in enumerate(values)
        ]
    )  # fmt: skip


def _analysis(acc: dict[int, list[float]], **kwargs) -> Analysis:
    from lorasweep.analysis.stats import analyze

    return Analysis(analyze(_table(acc), **kwargs))


def test_a_recommendation_is_an_object_that_reads_as_its_reason() -> None:
    # r=4 and r=8 within 0.001 on 4 seeds: the cheaper r=4 is recommended
    a = _analysis({4: [0.850, 0.852, 0.849, 0.851], 8: [0.851, 0.852, 0.850, 0.853]})
    rec = a.recommendation
    assert rec.found and bool(rec) and rec.key == {"variant": "lora", "rank": 4}
    assert rec.label == "lora r=4" and rec.metric == "accuracy" and rec.n == 4
    assert rec.mean == pytest.approx(0.8505) and rec.std == pytest.approx(a["recommended"]["std"])
    assert rec.margin == pytest.approx(0.01) and rec.reference == "lora r=8"
    assert rec.cost == pytest.approx(104.0) and rec.cost_name == "train_seconds"
    assert str(rec) == rec.reason == a["reason"] and f"{rec}" == rec.reason
    assert rec.reason.startswith("Recommended lora r=4: ")
    assert not rec.explanation.startswith("Recommended")  # the card's heading says it
    assert repr(rec) == "Recommendation('lora r=4', accuracy=0.8505 ± 0.0013, n=4)"
    card = rec._repr_html_()
    assert "Recommended: lora r=4" in card and "0.8505 ± 0.0013 (n=4)" in card
    assert rec.explanation[:60] in card and "Flags" in card  # the high-variance flag
    md = rec._repr_markdown_()
    assert md.startswith("**Recommended: lora r=4**") and "- margin: 0.01" in md
    d = rec.to_dict()
    assert json.loads(json.dumps(d)) == d and d["key"] == rec.key and d["found"] is True
    assert d["best"]["label"] == "lora r=8" and isinstance(d["flags"], list)


def test_no_recommendation_says_why() -> None:
    # two noisy seeds: nothing is shown within one point, not even the best measured
    rec = _analysis({4: [0.74, 0.79], 8: [0.78, 0.81]}).recommendation
    assert not rec.found and not rec and rec.key is None and rec.label is None
    assert rec.mean is None and rec.best["label"] == "lora r=8"
    assert rec.reason.startswith("No recommendation: ") and rec.seeds_needed == 14
    card = rec._repr_html_()
    assert "No recommendation" in card and "about 14 per configuration" in card
    assert "best measured" in card and "lora r=8" in card
    assert repr(rec).startswith("Recommendation(None, reason='No recommendation: at this")
    # an analysis that could not run, and a reason that does not say it
    failed = Recommendation.none("no trials")
    assert str(failed) == "No recommendation: no trials" and not failed
    assert "No recommendation" in failed._repr_html_()
    empty = Recommendation.from_analysis({"reason": "No complete trial has a finite accuracy."})
    assert str(empty) == "No recommendation: No complete trial has a finite accuracy."


def test_the_analysis_is_the_dict_and_shows_as_table_and_text() -> None:
    from lorasweep.analysis.stats import analyze, format_analysis

    acc = {4: [0.850, 0.852, 0.849, 0.851], 8: [0.851, 0.852, 0.850, 0.853],
           16: [0.86, 0.85, 0.86, 0.85]}  # fmt: skip
    raw = analyze(_table(acc))
    a = Analysis(raw)
    assert isinstance(a, dict) and a == raw and json.dumps(a) == json.dumps(raw)
    rec = a.recommendation
    assert rec.found and rec.key == a["recommended"]["key"]
    assert repr(a) == str(a) == a.text() == format_analysis(raw)
    page = a._repr_html_()
    body = page.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == len(raw["groups"]) == 3
    for label in ("lora r=4", "lora r=8", "lora r=16"):
        assert f">{label}<" in body
    assert "lorasweep-recommendation" in page and f"Recommended: {rec.label}" in page
    # IPython's plain-text display is the text too
    printed = []

    class Printer:
        def text(self, s: str) -> None:
            printed.append(s)

    a._repr_pretty_(Printer(), False)
    assert printed == [format_analysis(raw)]
    assert repr(Analysis({"not": "an analysis"})) == "{'not': 'an analysis'}"


@pytest.mark.parametrize(
    "method",
    [
        "plot_metric",
        "plot_time",
        "plot_memory",
        "plot_pareto",
        "plot_efficiency",
        "plot_loss_curves",
    ],
)
def test_plots_are_figures_that_show_inline(results: Results, method: str) -> None:
    fig = getattr(results, method)()
    assert isinstance(fig, Figure)
    assert fig.axes and fig.axes[0].get_title(loc="left")
    assert fig._repr_png_().startswith(PNG)  # what Jupyter displays


def test_plot_metric_draws_one_point_per_rank(results: Results) -> None:
    fig = results.plot_metric("accuracy")
    line = fig.axes[0].get_lines()[0]  # the mean line (error-bar caps follow)
    assert list(line.get_xdata()) == [2, 4]


def test_report_and_html_summary(results: Results) -> None:
    path = results.report()
    assert path == results.out_dir / "report.html" and path.stat().st_size > 1000
    html = results._repr_html_()
    assert "<table" in html and "4 complete" in html
    assert ">lora r=2<" in html and ">lora r=4<" in html
    assert "lorasweep-recommendation" in html  # the card, found or not
    assert html.count(results.recommendation.explanation[:40].replace("'", "&#x27;")) == 1


def test_plots_shows_several_figures_in_one_cell(results: Results, tmp_path: Path) -> None:
    figs = results.plots()
    assert isinstance(figs, Figures) and all(isinstance(f, Figure) for f in figs)
    assert figs.names == ["metric", "time", "memory", "efficiency", "pareto", "loss_curves"]
    assert "two factors" in figs.skipped["heatmap"]  # only the rank varies
    page = figs._repr_html_()
    assert page.count("<img") == 6 and "heatmap: " in page
    two = results.plots("time", "memory")
    assert two.names == ["time", "memory"] and not two.skipped
    paths = two.save(tmp_path / "figs", prefix="x_")
    assert [p.name for p in paths] == ["x_time.png", "x_memory.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    with pytest.raises(ValueError, match="heatmap: needs two factors"):
        results.plots("heatmap")  # named: its error, not a silent skip
    with pytest.raises(ValueError, match="plots: unknown"):
        results.plots("bogus")


def _new_analyze() -> bool:
    """The non-inferiority ``analyze`` that takes ``margin`` has landed."""
    from lorasweep.analysis.stats import analyze

    return "margin" in inspect.signature(analyze).parameters


@pytest.fixture
def judged(results: Results, tmp_path: Path) -> Results:
    """A copy of the run whose recorded spec says ``analysis: {margin: "2%"}``."""
    from lorasweep.store import open_store

    out = tmp_path / "judged"
    shutil.copytree(results.out_dir, out)
    with open_store(out) as store:
        spec = store.meta()["spec"]
        store.set_meta(spec={**spec, "analysis": {"margin": "2%"}})
    return Results(out)


def test_the_specs_margin_is_the_default_of_analysis_and_report(
    judged: Results, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorasweep.analysis import stats

    real, seen = stats.analyze, []

    def spy(trials, **kwargs):
        seen.append(dict(kwargs))
        if not _new_analyze():  # until analyze takes margin
            kwargs.pop("margin", None)
        return real(trials, **kwargs)

    monkeypatch.setattr(stats, "analyze", spy)
    judged.analysis()
    assert seen[-1] == {"margin": "2%"}
    judged.analysis(margin=0.5, metric="f1")
    assert seen[-1] == {"margin": 0.5, "metric": "f1"}
    judged.analysis(tolerance=0.1)  # the deprecated alias replaces the spec's margin
    assert seen[-1] == {"tolerance": 0.1}
    judged.summary(margin="1%")
    assert seen[-1] == {"margin": "1%"}
    assert judged.recommendation.reason and seen[-1] == {"margin": "2%"}
    seen.clear()
    judged.report()
    assert seen and all(kw.get("margin") == "2%" for kw in seen)
    seen.clear()
    judged.report(analysis_kwargs={"margin": 0.25})
    assert seen and all(kw.get("margin") == 0.25 for kw in seen)


@pytest.mark.skipif(not _new_analyze(), reason="needs the analyze that takes margin")
def test_margin_in_the_api(judged: Results) -> None:
    spec_margin = judged.analysis()["margin"]  # the spec's "2%"
    assert spec_margin["relative"] and spec_margin["value"] == pytest.approx(0.02)
    given = judged.analysis(margin=0.5)["margin"]
    assert not given["relative"] and given["value"] == 0.5
    assert judged.analysis(tolerance=0.1)["margin"]["value"] == 0.1
    assert not judged.summary(margin="1%").empty
    with pytest.raises(ValueError, match="margin"):
        judged.analysis(margin="abc")
    with pytest.raises(ValueError, match="tolerance: use margin; both were given"):
        judged.analysis(margin=0.1, tolerance=0.1)
    assert judged.report(analysis_kwargs={"margin": "1%"}).exists()


def test_results_of_a_missing_run_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no lorasweep run"):
        Results(tmp_path / "nothing")


def test_notebook_example_runs(
    tiny_bert_dir: Path, tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/notebook.py, cell by cell as a script, on the tiny model: a DataFrame and a
    figure come out."""
    monkeypatch.setenv("LORASWEEP_EXAMPLE_MODEL", str(tiny_bert_dir))
    monkeypatch.setenv("LORASWEEP_EXAMPLE_DATA", str(tiny_csv))
    monkeypatch.setenv("LORASWEEP_EXAMPLE_OUT", str(tmp_path / "nb"))
    monkeypatch.setenv("LORASWEEP_EXAMPLE_BACKEND", "inprocess")
    monkeypatch.setenv("LORASWEEP_EXAMPLE_STEPS", "2")
    ns = runpy.run_path(str(ROOT / "examples" / "notebook.py"), run_name="__main__")
    df, fig = ns["df"], ns["fig"]
    assert isinstance(df, pd.DataFrame) and len(df) == 6
    assert set(df["status"]) == {"complete"}
    assert isinstance(fig, Figure)
    assert (tmp_path / "nb" / "metric_vs_rank_notebook.png").read_bytes().startswith(PNG)
    assert (tmp_path / "nb" / "report.html").exists()
    assert isinstance(ns["summary"], pd.DataFrame) and not ns["summary"].empty
    assert isinstance(ns["analysis"], Analysis) and isinstance(ns["rec"], Recommendation)
    assert ns["rec"].reason == ns["analysis"]["reason"]
    assert isinstance(ns["figs"], Figures) and ns["figs"].names == ["loss_curves", "pareto"]
    for name in ("notebook_loss_curves.png", "notebook_pareto.png"):
        assert (tmp_path / "nb" / name).read_bytes().startswith(PNG)


def test_tune_and_select_on_in_the_api(
    judged: Results, results: Results, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tune``/``select_on`` pass through as the CLI's --tune/--select-on; the spec's
    ``tune:`` is the default, ``tune=[]`` turns it off."""
    from lorasweep.analysis import stats
    from lorasweep.store import open_store

    # for real: the rank tuned per variant, chosen and compared on the same data
    a = results.analysis(tune="rank", by="variant")
    assert a["tuning"]["tuned"] == ["rank"] and a["tuning"]["same_data"] is True
    assert len(a["groups"]) == 1 and set(a["groups"][0]["key"]) == {"variant", "rank"}
    assert any("winner's curse" in f for f in a["flags"])
    with pytest.raises(ValueError, match="^select_on: 'f1' is used only with tune"):
        results.analysis(select_on="f1")
    with pytest.raises(ValueError, match="heatmap: needs two factors"):
        results.plot_heatmap()  # only the rank varies

    real, seen = stats.analyze, []

    def spy(trials, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("tune", None), kwargs.pop("select_on", None)
        return real(trials, **kwargs)

    monkeypatch.setattr(stats, "analyze", spy)
    with open_store(judged.out_dir) as store:
        store.set_meta(spec={**store.meta()["spec"], "tune": ["learning_rate"]})
    judged.analysis()
    assert seen[-1] == {"margin": "2%", "tune": ["learning_rate"]}
    judged.analysis(tune=[], select_on=None)
    assert seen[-1] == {"margin": "2%", "tune": []}
    judged.analysis(tune="warmup_steps", select_on="f1")
    assert seen[-1] == {"margin": "2%", "tune": "warmup_steps", "select_on": "f1"}

"""plots: the *_data() numbers, and renderers that never crash (rankless variants included)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lorasweep.analysis import plot_text, plots

GIB = 1024**3


@pytest.fixture
def trials() -> pd.DataFrame:
    rows = []
    for r, accs, secs in ((4, [0.70, 0.72], 3600.0), (8, [0.80, 0.84], 7200.0)):
        for s, a in enumerate(accs):
            rows.append(
                {
                    "trial_id": f"r{r}s{s}",
                    "status": "complete",
                    "variant": "lora",
                    "rank": r,
                    "seed": s,
                    "accuracy": a,
                    "train_seconds": secs,
                    "peak_gpu_allocated_bytes": (r / 4) * GIB,
                    "peak_cpu_rss_bytes": 1e9,
                    "estimated_peak_bytes": (r / 4 + 0.5) * GIB,
                }
            )
    rows.append(
        {
            "trial_id": "q0",
            "status": "complete",
            "variant": "B-Q4",
            "rank": np.nan,
            "seed": 0,
            "accuracy": 0.75,
            "train_seconds": 1800.0,
            "peak_gpu_allocated_bytes": 0.5 * GIB,
        }
    )
    rows.append(
        {
            "trial_id": "x",
            "status": "diverged",
            "variant": "lora",
            "rank": 16,
            "seed": 0,
            "accuracy": np.nan,
            "train_seconds": 100.0,
        }
    )
    return pd.DataFrame(rows)


@pytest.fixture
def curves() -> pd.DataFrame:
    rows = []
    for tid, vals in (
        ("r4s0", [1.0, 0.6]),
        ("r4s1", [0.8, 0.4]),
        ("r8s0", [0.9, 0.3]),
        ("x", [5.0, 9.0]),
    ):
        rows += [
            {"trial_id": tid, "curve": "train_loss", "step": i * 10, "value": v}
            for i, v in enumerate(vals)
        ]
    rows.append({"trial_id": "r4s0", "curve": "eval_accuracy", "step": 10, "value": 0.7})
    return pd.DataFrame(rows)


def test_metric_vs_rank_data_means_and_ci(trials):
    d = plots.metric_vs_rank_data(trials, "accuracy")
    r8 = d[(d["variant"] == "lora") & (d["rank"] == 8)].iloc[0]
    assert r8["n"] == 2 and r8["mean"] == pytest.approx(0.82)
    # t(0.975, 1) = 12.7062; std = 0.028284; half width = 12.7062 * 0.028284 / sqrt(2)
    assert r8["mean"] - r8["ci_lo"] == pytest.approx(0.254124, abs=1e-5)
    assert r8["ci_hi"] == 1.0  # 0.82 + 0.254 clipped: an accuracy interval stays in [0, 1]
    q = d[d["variant"] == "B-Q4"].iloc[0]
    assert np.isnan(q["rank"]) and q["mean"] == 0.75 and np.isnan(q["ci_lo"])
    assert 16 not in set(d["rank"])  # the diverged run is not a point


def test_memory_data_prefers_gpu_and_falls_back_to_cpu(trials):
    d = plots.memory_vs_rank_data(trials)
    assert d.attrs["column"] == "peak_gpu_allocated_bytes"
    assert d[d["rank"] == 8]["mean"].iloc[0] == pytest.approx(2.0)  # GiB
    cpu = plots.memory_vs_rank_data(trials.drop(columns="peak_gpu_allocated_bytes"))
    assert cpu.attrs["column"] == "peak_cpu_rss_bytes"
    assert cpu[cpu["rank"] == 4]["mean"].iloc[0] == pytest.approx(1e9 / GIB)
    fig = plots.plot_memory_vs_rank(cpu)
    ax = fig.axes[0]
    assert ax.get_title(loc="left") == "Peak CPU memory vs rank (no GPU measured)"
    assert ax.get_ylabel() == "peak CPU memory (GiB)"
    assert not [t for t in ax.texts if "GB GPU" in t.get_text()]  # no GPU sizes for CPU memory
    gpu = plots.plot_memory_vs_rank(d, gpu_limits_gb=(4, 8)).axes[0]
    assert gpu.get_ylabel() == "peak GPU memory (GiB)"
    assert [t.get_text() for t in gpu.texts] == [" 4 GB GPU"]  # up to the first above the data


def test_efficiency_per_training_hour(trials):
    d = plots.efficiency_data(trials, "accuracy")
    assert d[d["rank"] == 4]["mean"].iloc[0] == pytest.approx(0.71)  # 0.71 per 1 h
    assert d[d["rank"] == 8]["mean"].iloc[0] == pytest.approx(0.41)  # 0.82 per 2 h
    ppl = trials.assign(perplexity=[10.0, 10.0, 5.0, 5.0, 8.0, np.nan])
    e = plots.efficiency_data(ppl, "perplexity")
    assert e.attrs["label"].startswith("1/perplexity")
    assert e[e["rank"] == 4]["mean"].iloc[0] == pytest.approx(0.1)


def test_pareto_front(trials):
    d = plots.pareto_data(trials, "accuracy", "train_seconds")
    front = {
        (v, None if np.isnan(r) else int(r))
        for v, r, f in zip(d["variant"], d["rank"], d["on_front"])
        if f
    }
    # B-Q4 is cheapest (0.75 at 0.5 h), r=8 the best; r=4 is cheaper than r=8 but worse than
    # the cheaper B-Q4, so it is dominated.
    assert front == {("B-Q4", None), ("lora", 8)}
    low = plots.pareto_data(
        trials.assign(loss=[3, 3, 1, 1, 2, np.nan]), "loss", "train_seconds", direction="lower"
    )
    assert set(low.loc[low["on_front"], "rank"].dropna()) == {8}


def test_loss_curves_mean_over_complete_seeds(trials, curves):
    d = plots.loss_curves_data(trials, curves)
    r4 = d[d["rank"] == 4].sort_values("step")
    assert list(r4["value"]) == pytest.approx([0.9, 0.5]) and list(r4["n"]) == [2, 2]
    assert 16 not in set(d["rank"])  # the diverged trial's curve is left out
    assert plots.loss_curves_data(trials, curves.iloc[:0]).empty


def test_memory_estimate_data(trials):
    d = plots.memory_estimate_data(trials)
    r8 = d[d["rank"] == 8].iloc[0]
    assert r8["estimated"] == pytest.approx(2.5) and r8["measured"] == pytest.approx(2.0)
    assert plots.memory_estimate_data(trials.drop(columns="estimated_peak_bytes")).empty


def test_log2_rank_axis_and_rankless_variant_drawn_as_line(trials):
    fig = plots.plot_metric_vs_rank(plots.metric_vs_rank_data(trials, "accuracy"), "accuracy")
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [4.0, 8.0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "B-Q4 (no rank)" in labels and "lora" in labels


def test_only_rankless_or_empty_data_does_not_crash():
    df = pd.DataFrame(
        {
            "variant": ["B-Q4", "B-Q4"],
            "rank": [np.nan, np.nan],
            "seed": [0, 1],
            "accuracy": [0.5, 0.6],
            "train_seconds": [1.0, 2.0],
        }
    )
    assert isinstance(
        plots.plot_metric_vs_rank(plots.metric_vs_rank_data(df, "accuracy"), "accuracy"), Figure
    )
    empty = plots.metric_vs_rank_data(df.assign(status="failed"), "accuracy")
    assert empty.empty and isinstance(plots.plot_metric_vs_rank(empty, "accuracy"), Figure)


def test_render_all_writes_pngs(tmp_path, trials, curves):
    paths = plots.render_all(trials, curves, tmp_path, metric="accuracy", gpu_limits_gb=(4, 8))
    assert set(paths) == {
        "metric_vs_rank",
        "time_vs_rank",
        "efficiency",
        "memory_vs_rank",
        "pareto",
        "loss_curves",
        "memory_estimate",
    }
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    few = plots.render_all(trials[["rank", "seed", "accuracy"]], None, tmp_path / "few")
    assert set(few) == {"metric_vs_rank"}  # plots without data are skipped


def test_axis_words_and_units():
    assert plot_text.axis_label("train_seconds") == "training time (s)"
    assert plot_text.axis_label("peak_cpu_rss_bytes") == "peak CPU memory (GiB)"
    assert plot_text.axis_label("trainable_params") == "trainable parameters"
    assert plot_text.axis_label("test_accuracy") == "test accuracy"
    assert plot_text.quantity("eval_f1") == "eval F1"
    assert plot_text.quantity("train_seconds") == "training time"


def _texts(fig: Figure) -> list:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_plots_read_in_words_at_sizes_legible_on_a_phone(trials, curves):
    """No raw column name in a title or on an axis, and no text below 9 pt: 600 px figures
    shown about 370 px wide on a 400 px phone keep their smallest text near 8 px."""
    figs = [
        plots.plot_metric_vs_rank(plots.metric_vs_rank_data(trials, "accuracy"), "accuracy"),
        plots.plot_time_vs_rank(plots.time_vs_rank_data(trials)),
        plots.plot_memory_vs_rank(plots.memory_vs_rank_data(trials)),
        plots.plot_efficiency(plots.efficiency_data(trials, "accuracy")),
        plots.plot_pareto(plots.pareto_data(trials, "accuracy"), "accuracy"),
        plots.plot_loss_curves(plots.loss_curves_data(trials, curves)),
        plots.plot_memory_estimate(plots.memory_estimate_data(trials)),
    ]
    for fig in figs:
        assert tuple(fig.get_size_inches()) == plot_text.FIG_SIZE and fig.dpi == plot_text.DPI
        ax = fig.axes[0]
        words = [ax.get_title(loc="left"), ax.get_xlabel(), ax.get_ylabel()]
        assert not [w for w in words if "_" in w], words
        small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < 9]
        assert not small, small
    pareto = figs[4].axes[0]
    assert pareto.get_xlabel() == "training time (s)" and pareto.get_ylabel() == "accuracy"
    assert pareto.get_title(loc="left") == "Pareto front: accuracy vs training time"
    assert figs[5].axes[0].get_ylabel() == "training loss"


def _legend(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_pareto_legend_names_dominated_points_only_when_there_are_some(trials):
    data = plots.pareto_data(trials, "accuracy")
    assert not data["on_front"].all()  # r=4 is dominated
    assert _legend(plots.plot_pareto(data, "accuracy")) == ["dominated", "Pareto front"]
    front = data[data["on_front"]].reset_index(drop=True)
    assert _legend(plots.plot_pareto(front, "accuracy")) == ["Pareto front"]


def _boxes(fig: Figure, texts: list) -> list:
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts]


def test_point_labels_do_not_overlap_and_stay_inside(trials):
    """Estimated vs measured memory: configurations whose points (nearly) coincide still get
    labels that do not overlap each other, or leave the axes."""
    rows = [
        {"variant": "lora", "rank": r, "estimated": 0.92 + d, "measured": 0.93 + d}
        for r, d in ((4, 0.0), (8, 0.002), (16, 0.004), (32, 0.004), (64, 0.5))
    ]
    data = pd.DataFrame(rows)
    data.attrs["column"] = "peak_cpu_rss_bytes"
    fig = plots.plot_memory_estimate(data)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().startswith("lora r=")]
    assert sorted(t.get_text() for t in labels) == sorted(f"lora r={r}" for r in (4, 8, 16, 32, 64))
    boxes = _boxes(fig, labels)
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    for i, a in enumerate(boxes):
        assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1, labels[i].get_text()
        assert frame.y0 - 1 <= a.y0 and a.y1 <= frame.y1 + 1, labels[i].get_text()
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (labels[i].get_text(), a, b)
    assert ax.get_ylabel() == "measured peak CPU memory (GiB)"

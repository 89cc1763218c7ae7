"""report: one self-contained HTML file, formatted numbers, exports, and a real Chromium render."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorasweep.analysis import report, report_sections, stats, units

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


def synthetic() -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    rows, curves = [], []
    acc = {4: [0.70, 0.71, 0.72], 16: [0.85, 0.86, 0.855], 64: [0.852, 0.861, np.nan]}
    for r, vals in acc.items():
        for s, a in enumerate(vals):
            tid = f"r{r}s{s}"
            rows.append(
                {
                    "trial_id": tid,
                    "status": "diverged" if np.isnan(a) else "complete",
                    "variant": "lora",
                    "rank": r,
                    "seed": s,
                    "method": "lora",
                    "alpha_policy": "2*rank",
                    "alpha": 2.0 * r,
                    "task": "classification",
                    "model": "tiny-bert",
                    "error": None,
                    "accuracy": a,
                    "f1": a - 0.01,
                    "train_seconds": 60.0 + r,
                    "trainable_params": 1_000 * r + 1_536,
                    "trainable_percent": 0.1 * r,
                    "peak_gpu_allocated_bytes": (1 + r / 32) * GIB,
                    "estimated_peak_bytes": (1.1 + r / 32) * GIB,
                    "adapter_bytes": 4096 * r,
                }
            )
            curves += [
                {"trial_id": tid, "curve": "train_loss", "step": k, "value": 1.0 / (1 + k * r / 64)}
                for k in range(0, 50, 10)
            ]
    rows.append(
        {
            "trial_id": "r256s0",
            "status": "oom",
            "variant": "lora",
            "rank": 256,
            "seed": 0,
            "task": "classification",
            "error": "CUDA out of memory <tried 8 GiB>",
        }
    )
    meta = {
        "name": "demo <sweep>",
        "task": "classification",
        "spec": {},
        "spec_yaml": "name: demo\nranks: [4, 16, 64]\n",
        "environment": {
            "device": "cpu",
            "torch": "2.13.0",
            "transformers": "4.57.0",
            "peft": "0.17.0",
            "python": "3.11",
        },
    }
    return pd.DataFrame(rows), pd.DataFrame(curves), meta


# r=16 is 0.4 points below r=64 (bound -1.9 points): within a 3-point margin, not within 1
MARGIN = 0.03


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    trials, curves, meta = synthetic()
    extra = [{"title": "Adapter spectrum", "html": "<p id='spectrum'>effective rank 7.5</p>"}]
    return report.build_report(
        trials,
        curves,
        meta,
        tmp_path_factory.mktemp("rep"),
        extra_sections=extra,
        analysis_kwargs={"margin": MARGIN},
    )


def test_formatters():
    assert units.fmt_bytes(1536) == "1.50 KiB" and units.fmt_bytes(3 * GIB) == "3.00 GiB"
    assert units.fmt_bytes(None) == "-" and units.fmt_bytes(float("nan")) == "-"
    assert units.fmt_seconds(42.26) == "42.3 s" and units.fmt_seconds(300) == "5.0 min"
    assert units.fmt_seconds(7200) == "2.00 h"
    assert units.fmt_count(1234567) == "1,234,567"
    assert units.fmt_mean_std(0.85, 0.005) == "0.8500 ± 0.0050"  # std 2 sig. digits
    assert units.fmt_mean_std(2 * GIB, 0.0, "bytes") == "2.00 GiB"


def test_report_is_self_contained_with_all_sections(built):
    html = built.read_text()
    imgs = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(imgs) == 7
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:4] == b"\x89PNG" and len(png) > 5000
    assert not re.search(r'src="(?!data:)', html)  # nothing loaded from elsewhere
    assert sorted(p.name for p in built.parent.glob("*.png")) == sorted(
        [
            "metric_vs_rank.png",
            "time_vs_rank.png",
            "efficiency.png",
            "memory_vs_rank.png",
            "pareto.png",
            "loss_curves.png",
            "memory_estimate.png",
        ]
    )
    # the recommendation of stats.analyze, and its reasons
    assert "Recommended: lora r=16" in html
    assert "Significantly worse than the best lora r=64" in html and "lora r=4 (p=" in html
    assert "Margin: 0.03 accuracy, given." in html
    # flags and the problem table (escaped error text)
    assert "lora r=64 seed 2 (diverged)" in html
    assert "CUDA out of memory &lt;tried 8 GiB&gt;" in html and "r256s0" in html
    # summary table with formatted numbers
    assert "17,536" in html and "1.50 GiB" in html and "76.0 s" in html and "2.1 min" in html
    assert "1.6%</td>" in html  # a constant column shows no '± 2.7e-16'

    # extra section rendered as HTML, provenance, spec, escaped title
    assert "<p id='spectrum'>effective rank 7.5</p>" in html
    assert "4.57.0" in html and "ranks: [4, 16, 64]" in html and "demo &lt;sweep&gt;" in html


def test_report_numbers_come_from_stats(built):
    trials, _, _ = synthetic()
    r = stats.analyze(trials, margin=MARGIN)
    html = built.read_text()
    g16 = next(g for g in r["groups"] if g["key"]["rank"] == 16)
    assert units.fmt_mean_std(g16["mean"], g16["std"]) == "0.8550 ± 0.0050"
    assert "0.8550 ± 0.0050" in html
    assert f"{g16['diff']:+.4f}" == "-0.0040" and "-0.0040" in html  # difference to r=64
    assert r["reason"].split(". ")[0] in html


def test_export_trials_round_trip(tmp_path):
    trials, _, _ = synthetic()
    j = report.export_trials(trials, tmp_path / "t.json", fmt="json")
    rows = json.loads(j.read_text())
    assert len(rows) == len(trials) and rows[-1]["accuracy"] is None
    back = stats.load_trials_table(j)
    assert back["accuracy"].mean() == pytest.approx(trials["accuracy"].mean())
    c = report.export_trials(trials, tmp_path / "t.csv")
    assert len(pd.read_csv(c)) == len(trials)
    with pytest.raises(ValueError, match="^fmt: 'xml'"):
        report.export_trials(trials, tmp_path / "t.xml", fmt="xml")


def test_report_renders_in_headless_chromium(built, tmp_path):
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("chromium not installed")
    png = tmp_path / "shot.png"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "screenshot_report.py"),
        str(built),
        str(png),
        "--height",
        "2400",
    ]
    subprocess.run(cmd, check=True, timeout=90, capture_output=True)
    from PIL import Image

    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape[:2] == (2400, 1280)
    assert im.std() > 20  # not a blank page
    colours = len(np.unique(im.reshape(-1, 3)[::7], axis=0))
    assert colours > 200  # text, tables and anti-aliased plots, not a flat colour


# ----------------------------------------------------------------------------- phone to wide screen


def tiny_adapters(root: Path) -> dict[str, Path]:
    """Two LoRA adapters (r=4, r=8 on query/value of two layers) written with numpy alone."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    out = {}
    for r in (4, 8):
        d = root / f"r{r}"
        d.mkdir(parents=True)
        cfg = {"r": r, "lora_alpha": 2 * r, "peft_type": "LORA", "target_modules": ["query"]}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        tensors = {}
        for layer in range(2):
            for m in ("query", "value"):
                name = f"base_model.model.encoder.layer.{layer}.attention.self.{m}"
                tensors[f"{name}.lora_A.weight"] = rng.normal(size=(r, 32)).astype(np.float32)
                tensors[f"{name}.lora_B.weight"] = rng.normal(size=(32, r)).astype(np.float32)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        out[f"lora/r={r}/seed=0"] = d
    return out


WIDE_TABLE = (
    "<table><thead><tr>"
    + "".join(f"<th>column {i}</th>" for i in range(30))
    + "</tr></thead><tbody><tr>"
    + "".join(f"<td>value_without_spaces_{i}</td>" for i in range(30))
    + "</tr></tbody></table>"
)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A report with every kind of table: the spectra section of two adapters, a wide table of
    an extra section given without a scroll box, a long unbroken error, CPU memory only."""
    trials, curves, meta = synthetic()
    trials = trials.drop(columns="peak_gpu_allocated_bytes").assign(
        peak_cpu_rss_bytes=[(1 + r / 64) * GIB for r in trials["rank"]]
    )
    trials.loc[trials["status"] == "oom", "error"] = "x" * 400 + " OutOfMemoryError"
    root = tmp_path_factory.mktemp("wide")
    sections = report.spectrum_sections(tiny_adapters(root / "adapters"), {}, trials)
    sections.append({"title": "Wide", "html": WIDE_TABLE})
    return report.build_report(
        trials, curves, meta, root / "report", extra_sections=sections,
        analysis_kwargs={"margin": MARGIN},
    )  # fmt: skip


def test_every_table_scrolls_in_its_own_box_and_sorts(built, wide):
    for path in (built, wide):
        html = path.read_text()
        tables = html.count("<table")
        assert tables >= 3
        assert len(re.findall(r'<div class="table-wrap">\s*<table', html)) == tables
        assert ".table-wrap { overflow-x: auto;" in html
        # sortable by a click on a header: an inline script, nothing loaded from elsewhere
        script = re.findall(r"<script>(.*?)</script>", html, re.S)
        assert len(script) == 1 and "aria-sort" in script[0] and "addEventListener" in script[0]
        assert "<script src" not in html and "<link" not in html
        assert "img { max-width: 100%; height: auto; }" in html
    # the all-metrics table sorts sizes by their value, not their text ("1.14 MiB" < "156 KiB")
    assert 'data-sort="65536"' in wide.read_text()  # adapter_bytes of r=16: 4096 * 16


def test_spectra_heading_once(wide):
    html = wide.read_text()
    headings = re.findall(r"<h[1-6][^>]*>([^<]*)</h", html)
    assert [h for h in headings if "Adapter spectra" in h] == [
        "Adapter spectra: the rank actually used"
    ]
    assert "lora/r=8/seed=0" in html and "No saved adapters" not in html
    assert "<h2" not in report_sections.spectrum_section_html({})  # the report gives the heading


def test_memory_caption_says_what_was_measured(built, wide):
    def caption(path: Path) -> str:
        pattern = r'id="plot-memory_vs_rank">.*?<figcaption>(.*?)</figcaption>'
        return re.search(pattern, path.read_text(), re.S).group(1)

    assert "dotted lines mark common GPU sizes" in caption(built)  # GPU memory measured
    cpu = caption(wide)
    assert "No GPU memory was measured" in cpu and "dotted lines" not in cpu
    assert "Peak CPU memory" in cpu


def _flags(html: str) -> str:
    return html[html.index('id="flags"') : html.index('id="comparison"')]


def test_no_flags_is_not_reassuring_when_intervals_are_wide(tmp_path):
    """Two seeds per configuration: a 95% CI of the mean is mean ± 12.7·s/√2. No flag fires
    (several seeds, none failed, the configurations far apart), but the line is amber."""
    rows = [
        {"trial_id": f"r{r}s{s}", "status": "complete", "variant": "lora", "rank": r,
         "seed": s, "alpha_policy": "2*rank", "task": "classification", "accuracy": a + d,
         "train_seconds": 60.0 + r}
        for r, a in ((4, 0.60), (16, 0.81), (64, 0.70))
        for s, d in ((0, -0.022), (1, 0.022))
    ]  # fmt: skip
    trials = pd.DataFrame(rows)
    analysis = stats.analyze(trials)
    assert not analysis["flags"]
    g = analysis["groups"][0]  # every configuration has the same spread: the first is named
    lo, hi = g["ci95"]
    assert hi - lo == pytest.approx(2 * 12.706 * 0.044 / 2**0.5 / 2**0.5, rel=1e-3)
    flags = _flags(report.build_report(trials, None, {}, tmp_path).read_text())
    assert '<p class="warn">No flags were raised, but the intervals are wide' in flags
    ci = f"[{units.fmt_num(lo)}, {units.fmt_num(hi)}]"
    assert f"{stats.group_label(g['key'])} (2 seeds) is {ci}, ± 0.28" in " ".join(flags.split())
    assert "more than twice the 0.01 margin" in flags
    assert 'class="ok"' not in flags  # never green
    # narrow intervals: a plain, neutral line
    calm = trials.assign(accuracy=[0.6, 0.601, 0.81, 0.811, 0.7, 0.701])
    flags = _flags(report.build_report(calm, None, {}, tmp_path / "calm").read_text())
    assert '<p class="neutral">No flags:' in flags and "wide" not in flags


def _check_widths():
    import importlib.util

    spec = importlib.util.spec_from_file_location("shot", ROOT / "scripts" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.find_chromium() is None:
        pytest.skip("chromium not installed")
    return mod.check_widths


def test_report_fits_a_wide_screen_and_a_phone(wide):
    """Rendered in headless Chromium at 1400 and 400 CSS px: nothing makes the page scroll
    sideways (document.documentElement.scrollWidth within the viewport); the wide tables scroll
    in their own boxes."""
    res = _check_widths()(wide, (1400, 400))
    for width, r in res.items():
        assert r["scroll"] <= r["client"] <= width, (width, r)
        assert not r["offenders"] and not r["unwrapped"], (width, r)
        assert r["tables"] >= 4

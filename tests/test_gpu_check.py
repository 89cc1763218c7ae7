"""benchmarks/gpu_check.py --smoke: the GPU check runs end to end on CPU (tiny model) and its
JSON holds every section, each with figures or the reason it has none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("memory", "qlora", "makespan")


def _script(*args: str, timeout: float = 300) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _module():
    """benchmarks/gpu_check.py imported in this process (its --fill-estimates in-process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_writes_every_section_with_figures_or_a_reason(tmp_path):
    out = tmp_path / "x.json"
    # lorasweep's own jobs="auto" run is left to tests/test_packing.py (a real packed sweep)
    _script("--smoke", "--no-lorasweep-backend", "--out", str(out), "--tmp", str(tmp_path))
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["smoke"] is True
    assert "--smoke" in report["command"]
    versions = report["environment"]["versions"]
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(versions)
    for name in SECTIONS:
        sec = report[name]
        assert sec["status"] in ("ok", "partial", "skipped", "error"), (name, sec)
        if sec["status"] != "ok":
            assert sec.get("reason") or sec.get("error"), (name, sec)
        assert "seconds" in sec or sec["status"] == "skipped"

    # memory: one row per rank, all-linear and checkpointing; the estimator's numbers in each
    mem = report["memory"]
    assert mem["status"] == "ok" and not mem["skipped_rows"]
    labels = [r["label"] for r in mem["rows"]]
    assert len(labels) == 4 and any("all-linear" in x for x in labels), labels
    assert any(r["gradient_checkpointing"] for r in mem["rows"])
    for row in mem["rows"]:
        assert "error" not in row, row
        est = row["estimate"]
        assert row["estimate_error"] is None and est["device"] == "cpu"
        assert est["allocator_peak_bytes"] > 0 and est["total_bytes"] >= est["allocator_peak_bytes"]
        # peft's own count on the real model equals the estimator's count from the config
        assert row["trainable_params_measured"] == est["trainable_params"], row
        assert row["peak_reserved_bytes"] is None and "no CUDA peaks" in row["note"]
        assert row["median_step_s"] > 0 and row["tokens_per_s"] > 0
        assert len(row["losses"]) == 3  # 1 warm-up + 2 timed steps

    assert report["qlora"]["status"] == "skipped"

    # makespan: both modes ran both trials; same seed and data give the same losses on CPU
    mk = report["makespan"]
    assert mk["status"] == "ok", mk
    for mode in ("packed", "sequential"):
        assert mk[mode]["trials_ok"] == mk["n_trials"] == 2, mk[mode]
        assert mk[mode]["makespan_s"] > 0
    assert mk["packed_concurrency"]["chosen_by"] == "estimator"
    cmp_ = mk["comparison"]
    assert cmp_["speedup"] > 0 and len(cmp_["losses"]) == 2
    assert cmp_["max_abs_final_loss_diff"] <= 1e-6, cmp_
    assert mk.get("lorasweep_auto", {}).get("status") in (None, "skipped"), mk

    # a GPU machine without lorasweep's dependencies records no estimate: --fill-estimates adds
    # the same numbers afterwards from the recorded configuration (the smoke model is gone)
    originals = [row["estimate"] for row in mem["rows"]]
    for row in mem["rows"]:
        row["estimate"], row["estimate_error"] = None, "ModuleNotFoundError: No module named x"
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(report))
    gpu_check = _module()
    assert gpu_check.fill_estimates(bare) == 0  # its exit code
    filled = json.loads(bare.read_text())
    assert filled["estimates_filled"]["rows"] == 4
    for before, after in zip(originals, filled["memory"]["rows"]):
        assert after["estimate_filled_afterwards"] is True and after["estimate_error"] is None
        for key in ("allocator_peak_bytes", "total_bytes", "trainable_params"):
            assert after["estimate"][key] == before[key], key

"""GPU check: measured peak memory vs the estimator, step time, QLoRA, and packed-sweep makespan.

One prepared script for one short session on a GPU machine (no network, no downloads, lorasweep
need not be installed: ``src/`` is put on ``sys.path`` here). Run from the repository root:

    python benchmarks/gpu_check.py --out gpu_check.json            # one GPU, at most ~8 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.json   # CPU, tiny model, ~1 minute
    python benchmarks/gpu_check.py --fill-estimates gpu_check.json # estimates added afterwards

Every figure goes to one JSON file, rewritten after each section (and after each row), so a run
cut short still leaves what it measured. Sections (each a key of the JSON; each records its
status, its seconds, and its error or skip reason instead of stopping the script):

1. ``memory``: a randomly initialised decoder built from a shipped config (``--model``, default
   llama-3.2-1b; memory and speed do not depend on pretrained weights), bf16, sdpa attention,
   peft LoRA on q_proj,v_proj for each of ``--ranks`` (plus all-linear at one rank and one row
   with gradient checkpointing), a few AdamW steps on random tokens: torch's peak allocated and
   reserved bytes against the estimator's ``allocator_peak_bytes`` and ``total_bytes`` for the
   same configuration, median step time and tokens/s. On CPU (``--smoke``) the rows hold the
   estimate and the step time only: there are no CUDA peaks.
2. ``qlora``: the same with 4-bit NF4 base weights and bf16 compute (the random bf16 model is
   saved to a local temporary folder and loaded back with a BitsAndBytesConfig, then
   ``prepare_model_for_kbit_training``); skipped with a reason without bitsandbytes or CUDA.
3. ``makespan``: a small sweep (``--sweep-ranks`` x ``--sweep-seeds``, 8 trials of a ~0.4B
   Llama built from a config) on synthetic tokens, each trial a fresh process of this script
   (``--trial``): packed (as many trials at once as the estimator says fit in the free GPU
   memory with a 10 % margin, at most 8), one at a time, and through lorasweep's own local
   backend with ``jobs="auto"`` when that exists. Makespans, the speedup, and every trial's
   losses in each mode (same seed, same data: they should agree to kernel noise).

A global time budget (``--budget-s``, default 420 s) is checked between measurements; each
section stops starting new work at its share of it, and child processes are killed at the
budget plus a grace period, so the script ends well inside a 10-minute command limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # lorasweep from this checkout, installed or not

for _k, _v in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_k, _v)

GiB = 1024**3
MARGIN = 0.10  # packing: each trial's estimate grown by this share must fit the free memory
MAX_PACKED = 8
GRACE_S = 45.0  # child processes are killed at the budget plus this
# cumulative shares of the budget after which a section starts no new measurement
SECTION_END = {"memory": 0.30, "qlora": 0.50, "makespan": 1.0}
ESTIMATE_KEYS = (
    "rank",
    "lora_params",
    "trainable_params",
    "total_params",
    "base_weights_bytes",
    "lora_weights_bytes",
    "gradient_bytes",
    "optimizer_bytes",
    "activation_bytes",
    "overhead_bytes",
    "total_bytes",
    "allocator_peak_bytes",
)
# a Llama of about 0.4B parameters for the makespan sweep (no shipped config of that size)
SWEEP_CONFIG = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=2816,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)
SMOKE_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)


# -- bookkeeping -------------------------------------------------------------------------------


class Clock:
    """The global budget: ``left(section)`` is the time before that section's share ends;
    ``hard_left()`` the time before running children are killed."""

    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, section: str | None = None) -> float:
        return self.budget * SECTION_END.get(section or "", 1.0) - self.elapsed()

    def hard_left(self) -> float:
        return self.budget + GRACE_S - self.elapsed()


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and infinities become None, tuples lists, unknown objects strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1) + "\n")
    os.replace(tmp, path)


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "lorasweep"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "versions": versions(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for key, cmd in (
        ("git_commit", ["git", "rev-parse", "HEAD"]),
        ("git_dirty_files", ["git", "status", "--porcelain"]),
    ):
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10)
            env[key] = out.stdout.strip() if key == "git_commit" else len(out.stdout.splitlines())
        except Exception as e:  # noqa: BLE001 - no git there: recorded, not fatal
            env[key] = error_text(e)
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info()
            env["gpu"] = {
                "name": p.name,
                "total_memory_bytes": p.total_memory,
                "total_memory_gib": round(p.total_memory / GiB, 2),
                "capability": f"{p.major}.{p.minor}",
                "count": torch.cuda.device_count(),
                "free_bytes_at_start": free,
                "mem_get_info_total_bytes": total,
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            }
    except Exception as e:  # noqa: BLE001
        env["torch_error"] = error_text(e)
    try:  # the estimator needs lorasweep's dependencies (pydantic, pandas, scipy, ...)
        import lorasweep.tools.estimate  # noqa: F401

        env["lorasweep_estimator"] = "importable"
    except Exception as e:  # noqa: BLE001 - then: --fill-estimates on another machine
        env["lorasweep_estimator"] = error_text(e)
    if shutil.which("nvidia-smi"):
        try:
            q = "name,memory.total,memory.used,driver_version,compute_mode"
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=15,
            )
            env["nvidia_smi"] = out.stdout.strip().splitlines()
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = error_text(e)
    return env


# -- models ------------------------------------------------------------------------------------


def load_config(ref: str) -> Any:
    """The transformers config of a shipped name (lorasweep's model_configs), folder or file."""
    try:
        from lorasweep.tools.estimate import load_model_config

        return load_model_config(ref)
    except ImportError:  # lorasweep's dependencies missing here: read the shipped file directly
        from transformers import AutoConfig

        shipped = ROOT / "src" / "lorasweep" / "tools" / "model_configs" / f"{ref.lower()}.json"
        path = shipped if shipped.exists() else Path(ref)
        if path.is_dir():
            return AutoConfig.from_pretrained(path)
        data = json.loads(path.read_text())
        data.pop("transformers_version", None)
        return AutoConfig.for_model(data.pop("model_type"), **data)


def write_llama_config(folder: Path, fields: dict[str, Any]) -> Path:
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**fields).save_pretrained(folder)
    return folder


def build_model(config: Any, device: str, seed: int = 0) -> Any:
    """A randomly initialised causal LM in bf16 on ``device`` (built there directly)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16, attn_implementation="sdpa"
            )
        except TypeError:  # transformers 4: torch_dtype
            model = AutoModelForCausalLM.from_config(
                config, torch_dtype=torch.bfloat16, attn_implementation="sdpa"
            )
    model.config.use_cache = False
    return model.train()


def enable_checkpointing(model: Any) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def wrap_lora(model: Any, rank: int, targets: str, dropout: float, seed: int = 0) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    tm: Any = targets if targets == "all-linear" else [t for t in targets.split(",") if t]
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=tm, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def batches(vocab: int, batch: int, seq: int, n: int, seed: int, device: str) -> list[dict]:
    """``n`` batches of random token ids (labels = inputs), the same for a seed everywhere."""
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def train_steps(
    model: Any, data: list[dict], device: str, lr: float = 2e-4, max_s: float | None = None
) -> tuple[list[float], list[float]]:
    """AdamW (fused on CUDA, as the Trainer's default) on the trainable parameters; one step per
    batch. Returns (seconds per step, loss per step); stops early past ``max_s`` seconds."""
    import torch

    cuda = device == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=cuda)
    times, losses, t_start = [], [], time.perf_counter()
    for b in data:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach().float().item()))
        if max_s is not None and time.perf_counter() - t_start > max_s:
            break
    del opt
    return times, losses


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_estimate(model_ref: str, **kw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The estimator's row (ESTIMATE_KEYS) for one configuration, or the error."""
    try:
        from lorasweep.tools.estimate import estimate

        res = estimate(model_ref, **kw)
        row = res.rows[0]
        out = {k: row.get(k) for k in ESTIMATE_KEYS}
        out["device"], out["variant"] = res.device, res.variant
        out["assumptions"] = {
            k: res.assumptions.get(k)
            for k in (
                "weights_dtype",
                "qlora_saved_inputs",
                "runtime_bytes",
                "workspace_fraction_of_activations",
                "attention",
            )
        }
        return out, None
    except Exception as e:  # noqa: BLE001 - recorded beside the measurement
        return None, error_text(e)


# -- sections 1 and 2: memory and speed per rank -----------------------------------------------


def measure_row(
    cfg: Any,
    model_ref: str,
    *,
    rank: int,
    targets: str,
    gc_on: bool,
    variant: str,
    a: argparse.Namespace,
    device: str,
    qlora_dir: Path | None,
    clock: Clock,
) -> dict[str, Any]:
    """Build, wrap, train a few steps; peaks against the estimate of the same configuration."""
    import torch

    row: dict[str, Any] = {
        "label": f"{variant} r={rank} {targets}" + (" +checkpointing" if gc_on else ""),
        "variant": variant,
        "rank": rank,
        "targets": targets,
        "gradient_checkpointing": gc_on,
        "batch": a.batch,
        "seq": a.seq,
        "lora_dropout": a.lora_dropout,
        "dtype": "bf16",
        "optimizer": "adamw (torch, fused on cuda)",
        "measured_on": device,
    }
    row["estimate"], row["estimate_error"] = run_estimate(
        model_ref,
        ranks=[rank],
        targets=targets,
        variant=variant,
        batch=a.batch,
        seq=a.seq,
        dtype="bf16",
        optimizer="adamw",
        gradient_checkpointing=gc_on,
        device=device,
        lora_dropout=a.lora_dropout,
    )
    cuda = device == "cuda"
    free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if variant == "qlora":
        model = load_qlora(qlora_dir, gc_on)
    else:
        model = build_model(cfg, device)
        if gc_on:
            enable_checkpointing(model)
    model = wrap_lora(model, rank, targets, a.lora_dropout)
    row["build_s"] = round(time.perf_counter() - t, 3)
    row["trainable_params_measured"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["total_params_measured"] = sum(p.numel() for p in model.parameters())
    data = batches(cfg.vocab_size, a.batch, a.seq, a.warmup + a.steps, seed=0, device=device)
    free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        row["weights_allocated_bytes"] = torch.cuda.memory_allocated()  # model, LoRA and data
    times, losses = train_steps(model, data, device, max_s=max(5.0, clock.hard_left() - 30))
    timed = times[a.warmup :] or times
    row["step_seconds"] = [round(x, 5) for x in times]
    row["warmup_steps"] = min(a.warmup, len(times))
    row["median_step_s"] = statistics.median(timed)
    row["tokens_per_s"] = a.batch * a.seq / row["median_step_s"]
    row["losses"] = [round(x, 5) for x in losses]
    if cuda:
        peak_r, peak_a = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        row.update(
            peak_allocated_bytes=peak_a,
            peak_reserved_bytes=peak_r,
            peak_allocated_gib=round(peak_a / GiB, 3),
            peak_reserved_gib=round(peak_r / GiB, 3),
            device_used_after_bytes=total - free,  # every process on the GPU
            context_bytes_inferred=total - free - torch.cuda.memory_reserved(),
        )
        add_ratios(row)
    else:
        row.update(
            peak_allocated_bytes=None,
            peak_reserved_bytes=None,
            note="CPU run: no CUDA peaks; the estimate (device='cpu') is recorded "
            "alone and step times are CPU times",
        )
    del model, data
    free_memory()
    return row


def add_ratios(row: dict[str, Any]) -> None:
    """The estimate against the measured peaks of a CUDA row."""
    est = row.get("estimate") or {}
    if est.get("base_weights_bytes") is not None:
        row["estimate_weights_bytes"] = est["base_weights_bytes"] + est["lora_weights_bytes"]
    peak_r, peak_a = row.get("peak_reserved_bytes"), row.get("peak_allocated_bytes")
    if est.get("allocator_peak_bytes") and peak_r and peak_a:
        row["estimate_allocator_peak_gib"] = round(est["allocator_peak_bytes"] / GiB, 3)
        row["ratio_estimate_to_reserved"] = est["allocator_peak_bytes"] / peak_r
        row["ratio_estimate_to_allocated"] = est["allocator_peak_bytes"] / peak_a


def memory_plan(a: argparse.Namespace) -> list[tuple[int, str, bool]]:
    """(rank, targets, gradient checkpointing) of every row of the memory section."""
    mid = a.ranks[len(a.ranks) // 2]
    rows = [(r, a.targets, False) for r in a.ranks]
    rows.append((mid, "all-linear", False))
    rows.append((mid, a.targets, True))
    return rows


def section_memory(
    a: argparse.Namespace, ctx: dict[str, Any], clock: Clock, save: Any
) -> dict[str, Any]:
    cfg, device = load_config(a.model_ref), ctx["device"]
    out: dict[str, Any] = {
        "model": a.model,
        "model_ref": a.model_ref,
        "device": device,
        "model_type": cfg.model_type,
        "init": "random (from_config), bf16, sdpa",
        "config": cfg.to_dict(),  # --fill-estimates rebuilds the estimate from it
        "rows": [],
        "skipped_rows": [],
    }
    if device != "cuda":
        out["note"] = "no CUDA: estimates and CPU step times only, no peak memory measured"
    for rank, targets, gc_on in memory_plan(a):
        label = f"lora r={rank} {targets}" + (" +checkpointing" if gc_on else "")
        if clock.left("memory") <= 0:
            out["skipped_rows"].append({"label": label, "reason": "time budget"})
            continue
        try:
            out["rows"].append(
                measure_row(
                    cfg,
                    a.model_ref,
                    rank=rank,
                    targets=targets,
                    gc_on=gc_on,
                    variant="lora",
                    a=a,
                    device=device,
                    qlora_dir=None,
                    clock=clock,
                )
            )
        except Exception as e:  # noqa: BLE001 - one row's failure (an OOM) is a figure too
            out["rows"].append(
                {
                    "label": label,
                    "error": error_text(e),
                    "traceback": traceback.format_exc()[-2000:],
                }
            )
        free_memory()  # after the except block: its traceback no longer holds the model
        save()
    return rows_status(out)


def load_qlora(folder: Path | None, gc_on: bool) -> Any:
    """The saved random bf16 model loaded back as 4-bit NF4 with bf16 compute (transformers 5
    quantizes while loading a checkpoint, not in from_config), prepared for k-bit training."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=bnb,
        dtype=torch.bfloat16,
        device_map={"": 0},
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    kw = {"use_reentrant": False}
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gc_on, gradient_checkpointing_kwargs=kw
    )
    return model.train()


def section_qlora(
    a: argparse.Namespace, ctx: dict[str, Any], clock: Clock, save: Any
) -> dict[str, Any]:
    import importlib.util

    if ctx["device"] != "cuda":
        return {"status": "skipped", "reason": "no CUDA device (QLoRA 4-bit is measured on GPU)"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "reason": "bitsandbytes is not installed"}
    import bitsandbytes  # noqa: F401 - an import error here is the section's error

    cfg = load_config(a.model_ref)
    out: dict[str, Any] = {
        "model": a.model,
        "compute_dtype": "bfloat16",
        "quant_type": "nf4",
        "double_quant": False,
        "rows": [],
        "skipped_rows": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_qlora_", dir=a.tmp))
    try:
        t = time.perf_counter()
        model = build_model(cfg, "cuda")
        model.save_pretrained(tmp)
        del model
        free_memory()
        out["save_s"] = round(time.perf_counter() - t, 2)
        out["method"] = (
            "from_config (bf16, random) -> save_pretrained to a local temporary folder"
            " -> from_pretrained(quantization_config=BitsAndBytesConfig(nf4, bf16 "
            "compute)) -> prepare_model_for_kbit_training -> peft LoRA"
        )
        mid = a.ranks[len(a.ranks) // 2]
        plan = [(r, a.targets, False) for r in a.ranks] + [(mid, a.targets, True)]
        for rank, targets, gc_on in plan:
            label = f"qlora r={rank} {targets}" + (" +checkpointing" if gc_on else "")
            if clock.left("qlora") <= 0:
                out["skipped_rows"].append({"label": label, "reason": "time budget"})
                continue
            try:
                out["rows"].append(
                    measure_row(
                        cfg,
                        a.model_ref,
                        rank=rank,
                        targets=targets,
                        gc_on=gc_on,
                        variant="qlora",
                        a=a,
                        device="cuda",
                        qlora_dir=tmp,
                        clock=clock,
                    )
                )
            except Exception as e:  # noqa: BLE001
                out["rows"].append(
                    {
                        "label": label,
                        "error": error_text(e),
                        "traceback": traceback.format_exc()[-2000:],
                    }
                )
            free_memory()
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows_status(out)


def rows_status(out: dict[str, Any]) -> dict[str, Any]:
    """ok when every planned row was measured; partial (with the reason) otherwise."""
    errors = [r["label"] for r in out["rows"] if "error" in r]
    skipped = [r["label"] for r in out["skipped_rows"]]
    if errors or skipped:
        out["status"] = "partial"
        out["reason"] = "; ".join(
            part
            for part in (
                f"rows failed: {', '.join(errors)}" if errors else "",
                f"rows skipped (time budget): {', '.join(skipped)}" if skipped else "",
            )
            if part
        )
    return out


# -- section 3: makespan of a small sweep, one at a time vs packed -----------------------------


def trial_main(job_path: str) -> int:
    """``--trial JOB.json``: one sweep trial in this fresh process; its result to job's
    ``result`` path."""
    t_start = time.time()
    job = json.loads(Path(job_path).read_text())
    res: dict[str, Any] = {
        "rank": job["rank"],
        "seed": job["seed"],
        "pid": os.getpid(),
        "process_start_ts": t_start,
    }
    try:
        import torch

        if job["device"] == "cpu":
            torch.set_num_threads(job.get("threads") or 1)
        from transformers import AutoConfig

        res["imports_done_ts"] = time.time()
        cfg = AutoConfig.from_pretrained(job["config_dir"])
        model = build_model(cfg, job["device"], seed=job["seed"])
        model = wrap_lora(model, job["rank"], job["targets"], job["dropout"], seed=job["seed"])
        data = batches(
            cfg.vocab_size, job["batch"], job["seq"], job["steps"], job["seed"], job["device"]
        )
        if job["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res["train_start_ts"] = time.time()
        times, losses = train_steps(model, data, job["device"], lr=job["lr"])
        res["train_end_ts"] = time.time()
        res.update(
            train_s=res["train_end_ts"] - res["train_start_ts"],
            losses=losses,
            final_loss=losses[-1],
            step_seconds=times,
            steps=len(losses),
        )
        if job["device"] == "cuda":
            res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            res["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the parent, which records it
        res.update(ok=False, error=error_text(e), traceback=traceback.format_exc()[-2000:])
    res["process_end_ts"] = time.time()
    Path(job["result"]).write_text(json.dumps(_clean(res)))
    return 0 if res["ok"] else 1


class TrialRunner:
    """Launches ``--trial`` processes of this script and collects their results."""

    def __init__(self, work: Path, base_job: dict[str, Any], clock: Clock):
        self.work, self.base, self.clock = work, base_job, clock
        self.env = dict(os.environ)
        if base_job["device"] == "cuda":  # every trial on the parent's GPU
            self.env.setdefault("CUDA_VISIBLE_DEVICES", "0")

    def start(self, mode: str, rank: int, seed: int) -> tuple[subprocess.Popen, Path, float]:
        tag = f"{mode}-r{rank}-s{seed}"
        job = dict(self.base, rank=rank, seed=seed, result=str(self.work / f"{tag}.result.json"))
        path = self.work / f"{tag}.job.json"
        path.write_text(json.dumps(job))
        log = open(self.work / f"{tag}.log", "w")  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--trial", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        log.close()
        return proc, Path(job["result"]), time.time()

    def collect(
        self, proc: subprocess.Popen, result: Path, launched: float, killed: bool
    ) -> dict[str, Any]:
        end = time.time()
        try:
            res = json.loads(result.read_text())
        except (OSError, ValueError):
            log = result.with_name(result.name.replace(".result.json", ".log"))
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            res = {
                "ok": False,
                "error": "killed at the time budget"
                if killed
                else f"no result (exit code {proc.returncode})",
                "log_tail": tail,
            }
        res.update(
            launched_ts=launched, collected_ts=end, wall_s=end - launched, exit_code=proc.returncode
        )
        if "imports_done_ts" in res and "train_start_ts" in res:
            res["startup_s"] = res["train_start_ts"] - launched  # process, imports, build, wrap
        return res

    def run(
        self,
        mode: str,
        trials: list[tuple[int, int]],
        needs: dict[int, float | None],
        capacity: float | None,
        cap: int,
        stop_at: float | None = None,
    ) -> dict[str, Any]:
        """Run ``trials`` with at most ``cap`` at once and, with a capacity, only as many as
        fit by their estimates grown by the margin; a trial that fits nowhere runs alone.
        ``stop_at``: seconds left on the clock below which no new trial starts."""
        queue, running, results = list(trials), [], []
        t0, max_conc, timeline = time.time(), 0, []
        while queue or running:
            for item in list(running):
                proc, res_path, launched, key = item
                if proc.poll() is not None:
                    running.remove(item)
                    results.append(self.collect(proc, res_path, launched, False))
            if self.clock.hard_left() <= 0:
                for proc, res_path, launched, key in running:
                    proc.kill()
                    proc.wait()
                    results.append(self.collect(proc, res_path, launched, True))
                running = []
                break
            while queue and len(running) < cap:
                if stop_at is not None and self.clock.left() < stop_at:
                    break
                rank, seed = queue[0]
                need = needs.get(rank)
                used = sum(needs.get(k[0]) or 0 for *_, k in running)
                if running and capacity is not None and need is not None:
                    if used + need > capacity:
                        break
                queue.pop(0)
                proc, res_path, launched = self.start(mode, rank, seed)
                running.append((proc, res_path, launched, (rank, seed)))
                timeline.append([round(launched - t0, 3), len(running)])
                max_conc = max(max_conc, len(running))
            if queue and not running and stop_at is not None and self.clock.left() < stop_at:
                break
            time.sleep(0.1)
        makespan = time.time() - t0
        ok = [r for r in results if r.get("ok")]
        out = {
            "mode": mode,
            "trials_run": len(results),
            "trials_ok": len(ok),
            "trials_not_started": [list(t) for t in queue],
            "makespan_s": makespan,
            "max_concurrent": max_conc,
            "launch_timeline": timeline,
            "trials": sorted(results, key=lambda r: (r.get("rank", 0), r.get("seed", 0))),
        }
        if ok:
            first = min(r["train_start_ts"] for r in ok)
            last = max(r["train_end_ts"] for r in ok)
            out["training_span_s"] = last - first  # first trial's first step to last's last
            out["sum_train_s"] = sum(r["train_s"] for r in ok)
            out["mean_startup_s"] = statistics.mean(r.get("startup_s", 0) for r in ok)
        if queue:
            out["note"] = f"{len(queue)} trials not started: time budget"
        return out


def write_text_dataset(folder: Path, vocab: int, words: int, seed: int = 0) -> tuple[Path, Path]:
    """A word-level tokenizer over ``w<i>`` (one id per word, inside the model's vocabulary)
    and a text file of random such words: lorasweep's data path with no download."""
    import random

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    table = {t: i for i, t in enumerate(specials)}
    table.update({f"w{i}": i for i in range(len(specials), vocab)})
    tk = Tokenizer(WordLevel(table, unk_token="[UNK]"))
    tk.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(folder)
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, words // 64)):
        lines.append(" ".join(f"w{rng.randrange(len(specials), vocab)}" for _ in range(64)))
    text = folder.parent / "synthetic.txt"
    text.write_text("\n".join(lines) + "\n")
    return folder, text


def lorasweep_backend(job: dict[str, Any]) -> dict[str, Any]:
    """The same sweep through ``run_sweep(..., backend="local", jobs="auto")`` (HF Trainer in
    lorasweep's trial processes, fp32 weights with bf16 autocast on CUDA): makespan and what
    each trial stored. Its losses are not comparable with the plain loop's (other data path).
    Runs in a child process of its own (``--sweep-job``), killed with its workers at the budget.
    """
    from transformers import AutoConfig

    from lorasweep.run.sweep import run_sweep
    from lorasweep.store import open_store

    work = Path(job["work"])
    model_dir = work / "lorasweep-model"
    cfg = AutoConfig.from_pretrained(job["config_dir"])
    build_model(cfg, "cpu").save_pretrained(model_dir)  # this process holds no CUDA context
    words = int((job["steps"] * job["batch"] + 64) * job["seq"] * 1.2)
    write_text_dataset(model_dir, cfg.vocab_size, words)
    ranks = sorted({r for r, _ in job["trials"]})
    seeds = sorted({s for _, s in job["trials"]})
    lora: dict[str, Any] = {
        "target_modules": job["targets"].split(","),
        "alpha": "2*rank",
        "dropout": job["dropout"],
    }
    if job["device"] == "cuda":
        lora["precision"] = "bf16"
    spec = {
        "name": "gpu-check-makespan",
        "task": "causal-lm",
        "model": str(model_dir),
        "dataset": {
            "source": str(model_dir.parent / "synthetic.txt"),
            "max_length": job["seq"],
            "max_eval_examples": 8,
            "eval_fraction": 0.05,
        },
        "training": {
            "learning_rate": 2e-4,
            "per_device_train_batch_size": job["batch"],
            "per_device_eval_batch_size": job["batch"],
            "max_steps": job["steps"],
        },
        "lora": lora,
        "grid": {"rank": ranks},
        "seeds": seeds,
    }
    out_dir = work / "lorasweep-run"
    t, t_wall = time.perf_counter(), time.time()
    outcome = run_sweep(
        spec, out_dir, backend="local", jobs="auto", quiet=True, report=False, yes=True
    )
    wall = time.perf_counter() - t
    cols = [
        "rank",
        "seed",
        "status",
        "train_loss",
        "train_seconds",
        "load_seconds",
        "peak_gpu_allocated_bytes",
        "peak_gpu_reserved_bytes",
        "estimated_peak_bytes",
        "tokens_per_second",
        "error",
    ]
    with open_store(out_dir) as store:
        raw = store.trials()
        df = store.trials_frame(raw)
    spans = {t["id"]: (t.get("started"), t.get("finished")) for t in raw}
    rows = []
    for r in df.to_dict(orient="records"):
        row = {c: r.get(c) for c in cols if c in df.columns}
        started, finished = spans.get(r.get("trial_id"), (None, None))
        if started and finished:  # seconds from the sweep's start
            row["started_s"], row["finished_s"] = started - t_wall, finished - t_wall
        rows.append(row)
    return {
        "status": "ok",
        "makespan_s": wall,
        "max_concurrent": max_overlap(
            [(r["started_s"], r["finished_s"]) for r in rows if "started_s" in r]
        ),
        "statuses": dict(outcome.statuses),
        "trials": rows,
        "spec": spec,
        "note": "run_sweep wall time: validation, tokenizing once, every trial (HF Trainer, "
        "final eval on 8 blocks, adapter save), no report",
    }


def sweep_job_main(job_path: str) -> int:
    """``--sweep-job JOB.json``: (c) of the makespan section in this process."""
    job = json.loads(Path(job_path).read_text())
    try:
        res = lorasweep_backend(job)
    except Exception as e:  # noqa: BLE001 - jobs="auto" not there yet, missing dependencies
        res = {"status": "error", "error": error_text(e), "traceback": traceback.format_exc()}
    Path(job["result"]).write_text(json.dumps(_clean(res)))
    return 0


def run_sweep_child(job: dict[str, Any], work: Path, clock: Clock) -> dict[str, Any]:
    """``lorasweep_backend`` in a child process (its own session), killed with every worker
    it started when the budget's grace period ends."""
    import signal

    path, log_path = work / "lorasweep.job.json", work / "lorasweep.log"
    job = dict(job, result=str(work / "lorasweep.result.json"))
    path.write_text(json.dumps(job))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--sweep-job", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        proc.wait(timeout=max(10.0, clock.hard_left()))
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    try:
        return json.loads(Path(job["result"]).read_text())
    except (OSError, ValueError):
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        why = "killed at the time budget" if killed else f"no result (exit {proc.returncode})"
        return {"status": "error", "error": why, "log_tail": tail}


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one time."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def section_makespan(
    a: argparse.Namespace, ctx: dict[str, Any], clock: Clock, save: Any
) -> dict[str, Any]:
    device = ctx["device"]
    work = Path(tempfile.mkdtemp(prefix="gpu_check_sweep_", dir=a.tmp))
    out: dict[str, Any] = {"device": device}
    try:
        cfg_dir = write_llama_config(work / "config", SMOKE_CONFIG if a.smoke else SWEEP_CONFIG)
        trials = [(r, s) for s in a.sweep_seeds for r in a.sweep_ranks]
        out.update(
            config=dict(SMOKE_CONFIG if a.smoke else SWEEP_CONFIG),
            n_trials=len(trials),
            ranks=a.sweep_ranks,
            seeds=a.sweep_seeds,
            steps=a.sweep_steps,
            batch=a.sweep_batch,
            seq=a.sweep_seq,
            targets=a.targets,
        )
        # the estimator's total (with a CUDA context per process) per rank, and the capacity
        needs: dict[int, float | None] = {}
        for r in a.sweep_ranks:
            est, err = run_estimate(
                str(cfg_dir),
                ranks=[r],
                targets=a.targets,
                batch=a.sweep_batch,
                seq=a.sweep_seq,
                dtype="bf16",
                device=device,
                lora_dropout=a.lora_dropout,
            )
            needs[r] = est["total_bytes"] * (1 + MARGIN) if est else None
            out.setdefault("estimates", {})[str(r)] = est or {"error": err}
            if est:
                out["params"] = est["total_params"]
        capacity = free_capacity(device)
        out["capacity_bytes"] = capacity
        known = [v for v in needs.values() if v]
        if a.packed_jobs:
            cap, how = a.packed_jobs, "--packed-jobs"
        elif known and capacity:
            cap, how = max(1, min(MAX_PACKED, int(capacity // max(known)))), "estimator"
        else:
            # no estimator here (lorasweep's dependencies missing): 8 GiB a trial is ample for
            # the 0.37B sweep at batch 4 x 512
            slots = int((capacity or 0) // (8 * GiB)) if device == "cuda" else 2
            cap, how = max(1, min(MAX_PACKED, slots)), "fallback without the estimator: 8 GiB each"
        cap = min(cap, len(trials))
        out["packed_concurrency"] = {
            "planned": cap,
            "chosen_by": how,
            "margin": MARGIN,
            "max": MAX_PACKED,
        }
        base = {
            "config_dir": str(cfg_dir),
            "targets": a.targets,
            "batch": a.sweep_batch,
            "seq": a.sweep_seq,
            "steps": a.sweep_steps,
            "lr": 2e-4,
            "dropout": a.lora_dropout,
            "device": device,
            "threads": 1,
        }
        runner = TrialRunner(work, base, clock)
        save_part = lambda: save_partial(out, save)  # noqa: E731
        # packed first: it is short; the sequential run may be cut by the budget and is then
        # extrapolated from the trials it finished
        try:
            out["packed"] = runner.run("packed", trials, needs, capacity, cap)
        except Exception as e:  # noqa: BLE001
            out["packed"] = {"error": error_text(e), "traceback": traceback.format_exc()[-2000:]}
        save_part()
        reserve = 0.0
        if a.lorasweep_backend and isinstance(out["packed"].get("makespan_s"), float):
            reserve = 1.5 * out["packed"]["makespan_s"] + 20  # time kept for (c)
        try:
            out["sequential"] = runner.run("sequential", trials, needs, None, 1, stop_at=reserve)
        except Exception as e:  # noqa: BLE001
            out["sequential"] = {
                "error": error_text(e),
                "traceback": traceback.format_exc()[-2000:],
            }
        out["comparison"] = compare(out.get("sequential", {}), out.get("packed", {}), len(trials))
        save_part()
        if not a.lorasweep_backend:
            out["lorasweep_auto"] = {"status": "skipped", "reason": "--no-lorasweep-backend"}
        elif clock.left() <= 10:
            out["lorasweep_auto"] = {"status": "skipped", "reason": "time budget"}
        else:
            out["lorasweep_auto"] = {"status": "running"}
            save_part()
            job = dict(base, work=str(work), trials=[list(t) for t in trials])
            out["lorasweep_auto"] = auto = run_sweep_child(job, work, clock)
            seq = out["comparison"].get("sequential_makespan_s")
            if seq and auto.get("makespan_s"):
                auto["speedup_vs_sequential_loop"] = seq / auto["makespan_s"]
        out["status"] = makespan_status(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def makespan_status(out: dict[str, Any]) -> str:
    """ok when both plain modes ran every trial; partial otherwise (the reason is recorded)."""
    n = out.get("n_trials")
    short = [m for m in ("packed", "sequential") if out.get(m, {}).get("trials_ok") != n]
    if short:
        out["reason"] = f"not every trial completed in: {', '.join(short)}"
        return "partial"
    return "ok"


def save_partial(out: dict[str, Any], save: Any) -> None:
    save(partial=out)


def free_capacity(device: str) -> float | None:
    """Bytes the trials may use: free GPU memory now, or available RAM on CPU."""
    if device == "cuda":
        import torch

        free_memory()
        return float(torch.cuda.mem_get_info()[0])
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def compare(seq: dict[str, Any], packed: dict[str, Any], n: int) -> dict[str, Any]:
    """Speedup and the losses of the same trial in both modes."""
    out: dict[str, Any] = {}
    s_ok = [r for r in seq.get("trials", []) if r.get("ok")]
    p_ok = [r for r in packed.get("trials", []) if r.get("ok")]
    if s_ok:
        ms = seq["makespan_s"]
        if len(s_ok) < n:  # cut by the budget: the missing trials at the mean wall of the others
            ms = ms + (n - len(s_ok)) * statistics.mean(r["wall_s"] for r in s_ok)
            out["sequential_extrapolated_from"] = len(s_ok)
        out["sequential_makespan_s"] = ms
    if p_ok and len(p_ok) == n:
        out["packed_makespan_s"] = packed["makespan_s"]
    if "sequential_makespan_s" in out and "packed_makespan_s" in out:
        out["speedup"] = out["sequential_makespan_s"] / out["packed_makespan_s"]
        if seq.get("sum_train_s") and packed.get("training_span_s") and len(s_ok) == n:
            out["training_only_speedup"] = seq["sum_train_s"] / packed["training_span_s"]
    by_key = {(r["rank"], r["seed"]): r for r in p_ok}
    diffs, rows = [], []
    for r in s_ok:
        p = by_key.get((r["rank"], r["seed"]))
        if p is None:
            continue
        curve = max((abs(x - y) for x, y in zip(r["losses"], p["losses"])), default=None)
        diffs.append(abs(r["final_loss"] - p["final_loss"]))
        rows.append(
            {
                "rank": r["rank"],
                "seed": r["seed"],
                "final_loss_sequential": r["final_loss"],
                "final_loss_packed": p["final_loss"],
                "max_abs_diff_curve": curve,
            }
        )
    out["losses"] = rows
    out["max_abs_final_loss_diff"] = max(diffs) if diffs else None
    out["max_abs_curve_diff"] = max((x["max_abs_diff_curve"] for x in rows), default=None)
    return out


# -- estimates afterwards ----------------------------------------------------------------------


def _saves_inputs(bnb_version: str | None) -> bool:
    """``estimate_memory.qlora_saves_inputs`` for the bitsandbytes of the GPU machine."""
    if not bnb_version or bnb_version == "not installed":
        return False
    parts = bnb_version.split(".")[:3]
    nums = tuple(int("".join(c for c in x if c.isdigit()) or 0) for x in parts)
    return nums < (0, 43, 2)


def fill_estimates(path: Path) -> int:
    """``--fill-estimates FILE``: the estimator's numbers for every measured row of a report
    whose GPU machine could not import lorasweep's estimator (its dependencies: pydantic,
    pandas, scipy, statsmodels...), computed here from the recorded configuration and the GPU
    machine's bitsandbytes version; the file is rewritten with them and the ratios."""
    report = json.loads(path.read_text())
    bnb = report.get("environment", {}).get("versions", {}).get("bitsandbytes")
    mem = report.get("memory", {})
    ref, filled = mem.get("model_ref") or report.get("settings", {}).get("model"), 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_fill_") as tmp:
        shipped = ROOT / "src" / "lorasweep" / "tools" / "model_configs" / f"{ref}.json"
        if ref and not shipped.exists() and not Path(ref).exists() and mem.get("config"):
            from transformers import AutoConfig

            data = dict(mem["config"])
            data.pop("transformers_version", None)
            AutoConfig.for_model(data.pop("model_type"), **data).save_pretrained(tmp)
            ref = tmp
        for name in ("memory", "qlora"):
            for row in (report.get(name) or {}).get("rows", []):
                if row.get("estimate") or "rank" not in row:
                    continue
                row["estimate"], row["estimate_error"] = run_estimate(
                    ref,
                    ranks=[row["rank"]],
                    targets=row["targets"],
                    variant=row["variant"],
                    batch=row["batch"],
                    seq=row["seq"],
                    dtype="bf16",
                    optimizer="adamw",
                    gradient_checkpointing=row["gradient_checkpointing"],
                    device=row["measured_on"],
                    lora_dropout=row["lora_dropout"],
                    qlora_saved_inputs=_saves_inputs(bnb) if row["variant"] == "qlora" else None,
                )
                row["estimate_filled_afterwards"] = row["estimate"] is not None
                filled += row["estimate"] is not None
                if row["measured_on"] == "cuda":
                    add_ratios(row)
    report["estimates_filled"] = {
        "rows": filled,
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    write_json(path, report)
    print(f"gpu_check: {filled} estimates filled into {path}")
    return 0


# -- driver ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="gpu_check.json", help="the JSON file (default %(default)s)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="global time budget in seconds (default %(default)s)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, tiny config, 2 steps, 2 makespan trials: checks the script",
    )
    p.add_argument(
        "--model",
        default="llama-3.2-1b",
        help="shipped config name or config folder (default %(default)s)",
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--sweep-ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sweep-steps", type=int, default=40)
    p.add_argument("--sweep-batch", type=int, default=4)
    p.add_argument("--sweep-seq", type=int, default=512)
    p.add_argument(
        "--packed-jobs",
        type=int,
        default=None,
        help="trials at once when packed (default: from the estimator, at most 8)",
    )
    p.add_argument(
        "--no-lorasweep-backend",
        dest="lorasweep_backend",
        action="store_false",
        help="skip the run through lorasweep's local backend with jobs='auto'",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=["memory", "qlora", "makespan"],
        choices=["memory", "qlora", "makespan"],
    )
    p.add_argument("--tmp", default=None, help="local folder for temporary models")
    p.add_argument("--trial", default=None, help=argparse.SUPPRESS)  # internal: one trial
    p.add_argument("--sweep-job", default=None, help=argparse.SUPPRESS)  # internal: (c)
    p.add_argument(
        "--fill-estimates",
        metavar="FILE",
        default=None,
        help="add the estimator's numbers to a report made where lorasweep could not be imported",
    )
    a = p.parse_args(argv)
    if a.smoke:
        a.ranks, a.batch, a.seq, a.steps, a.warmup = [4, 8], 2, 32, 2, 1
        a.sweep_ranks, a.sweep_seeds, a.sweep_steps = [4], [0, 1], 2
        a.sweep_batch, a.sweep_seq = 2, 32
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.trial:
        return trial_main(a.trial)
    if a.sweep_job:
        return sweep_job_main(a.sweep_job)
    if a.fill_estimates:
        return fill_estimates(Path(a.fill_estimates))
    clock = Clock(a.budget_s)
    out_path = Path(a.out)
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_check.py",
        "command": [sys.executable, *sys.argv],
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_s": a.budget_s,
        "smoke": a.smoke,
        "complete": False,
    }
    write_json(out_path, report)
    report["environment"] = environment()
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    smoke_dir = None
    if a.smoke:
        smoke_dir = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_", dir=a.tmp))
        a.model_ref = str(write_llama_config(smoke_dir / "model", SMOKE_CONFIG))
        a.model = "smoke (tiny Llama: hidden 64, 2 layers, vocab 256)"
    else:
        a.model_ref = a.model
    skip = ("trial", "sweep_job", "fill_estimates")
    report["settings"] = {k: v for k, v in vars(a).items() if k not in skip}
    report["device"] = device
    ctx = {"device": device}
    print(f"gpu_check: device {device}, budget {a.budget_s:.0f} s, writing {out_path}", flush=True)
    sections = {"memory": section_memory, "qlora": section_qlora, "makespan": section_makespan}
    try:
        for name in ("memory", "qlora", "makespan"):
            if name not in a.sections:
                report[name] = {"status": "skipped", "reason": "not in --sections"}
                continue
            if clock.left() <= 0:
                report[name] = {"status": "skipped", "reason": "time budget spent"}
                write_json(out_path, report)
                continue
            t = time.perf_counter()
            start_elapsed = clock.elapsed()

            def save(partial: dict[str, Any] | None = None, _name: str = name) -> None:
                if partial is not None:
                    report[_name] = dict(partial, status="running")
                report["elapsed_s"] = clock.elapsed()
                write_json(out_path, report)

            report[name] = {"status": "running"}
            try:
                res = sections[name](a, ctx, clock, save)
                res.setdefault("status", "ok")
            except Exception as e:  # noqa: BLE001 - the next section still runs
                res = {
                    "status": "error",
                    "error": error_text(e),
                    "traceback": traceback.format_exc()[-3000:],
                }
            res["seconds"] = round(time.perf_counter() - t, 2)
            res["started_at_s"] = round(start_elapsed, 2)
            report[name] = res
            report["elapsed_s"] = clock.elapsed()
            write_json(out_path, report)
            print(f"gpu_check: {name} {res['status']} in {res['seconds']:.1f} s", flush=True)
            free_memory()
    finally:
        if smoke_dir is not None:
            shutil.rmtree(smoke_dir, ignore_errors=True)
        report["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report["elapsed_s"] = clock.elapsed()
        report["complete"] = all(
            isinstance(report.get(s), dict) and report[s].get("status") != "running"
            for s in ("memory", "qlora", "makespan")
        )
        write_json(out_path, report)
    print(f"gpu_check: done in {clock.elapsed():.1f} s -> {out_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

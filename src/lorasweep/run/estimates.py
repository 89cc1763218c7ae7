"""The estimator's predicted peak memory of planned trials, stored beside the measured peak."""

from __future__ import annotations

import json

from lorasweep.records import Trial


def estimate_peaks(trials: list[Trial]) -> dict[str, float]:
    """The estimator's predicted peak memory of each trial (meta device, no weights), so the
    report can set it against the measured peak. One estimate call per configuration group
    (all ranks at once); AdaLoRA, which the estimator does not model, and any failure are
    skipped: an estimate is extra information, never a reason to stop."""
    from lorasweep.tools.estimate import estimate
    from lorasweep.training.models import pick_device

    device = pick_device()
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        ad = t.config["adapter"]
        if ad["method"] == "adalora":
            continue
        key = json.dumps({**t.config, "adapter": {**ad, "r": None}}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(t)
    out: dict[str, float] = {}
    for members in groups.values():
        cfg, ad = members[0].config, members[0].config["adapter"]
        training = cfg.get("training") or {}
        precision = ad.get("precision", "fp32")
        try:
            res = estimate(
                cfg["model"],
                ranks=sorted({t.config["adapter"]["r"] for t in members}),
                # a rank pattern names its own layers (peft_setup ignores target_modules then)
                targets="default"
                if ad.get("rank_pattern")
                else ad.get("target_modules") or "default",
                variant="qlora" if ad.get("quantization") == "4bit" else ad["method"],
                task=cfg["task"],
                batch=int(training.get("per_device_train_batch_size", 8)),
                seq=int(cfg["dataset"]["max_length"]),
                dtype={"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[precision],
                weights_dtype="fp32",
                optimizer="adamw",
                gradient_checkpointing=bool(training.get("gradient_checkpointing", False)),
                device="cpu" if device != "cuda" else "cuda",
                lora_dropout=float(ad.get("dropout") or 0.0),
                rank_pattern=ad.get("rank_pattern") or None,
            )
        except Exception:  # noqa: BLE001 - see docstring
            continue
        by_rank = {row["rank"]: float(row["total_bytes"]) for row in res.rows}
        for t in members:
            if ad.get("rank_pattern"):  # one row: the pattern fixes every layer's rank
                out[t.id] = by_rank[None]
            elif t.config["adapter"]["r"] in by_rank:
                out[t.id] = by_rank[t.config["adapter"]["r"]]
    return out

"""Read a saved peft adapter with numpy: its config and, per module, the LoRA factors and scale.

``adapter_config.json`` + ``adapter_model.safetensors`` of LoRA (rsLoRA, rank and alpha
patterns), DoRA and AdaLoRA adapters. bf16 tensors are widened by hand (numpy has no bfloat16),
so nothing here needs torch; ``spectrum`` builds on it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = "base_model.model."  # what peft puts before the base model's module names


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """All tensors as numpy arrays, plus the widest-error stored dtype (bf16 widened by hand:
    numpy has no bfloat16, so safetensors.numpy cannot load it)."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        metas = {k: v for k, v in header.items() if k != "__metadata__"}
        dtypes = {v["dtype"] for v in metas.values()}
        dtype = next((d for d in ("BF16", "F16", "F32") if d in dtypes), "F64")
        if "BF16" not in dtypes:
            from safetensors.numpy import load_file

            return load_file(str(path)), dtype
        data = f.read()
    np_types = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
    out = {}
    for key, meta in metas.items():
        start, end = meta["data_offsets"]
        raw = data[start:end]
        if meta["dtype"] == "BF16":  # bf16 is the top half of an f32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, np_types[meta["dtype"]])
        out[key] = arr.reshape(meta["shape"])
    return out, dtype


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first pattern key matching module ``name``, as peft's ``get_pattern_key`` does."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def load_factors(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], str, list[str]]:
    """Config, per-module factors ``{"name", "a", "b", "scale"}``, stored dtype and notes."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        subs = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
        hint = f"; adapters in sub-folders: {', '.join(subs)}" if subs else ""
        raise FileNotFoundError(f"no adapter_config.json in {path}{hint}")
    cfg = json.loads(cfg_file.read_text())
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"no adapter_model.safetensors in {path} (only safetensors is read)"
        )
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "ADALORA"):
        raise ValueError(f"spectrum supports LoRA, DoRA and AdaLoRA adapters, not {peft_type}")
    tensors, dtype = _read_safetensors(weights)

    parts: dict[str, dict[str, np.ndarray]] = {}
    pat = re.compile(r"^(.*)\.(lora_A|lora_B|lora_E|lora_embedding_A|lora_embedding_B)(\.weight)?$")
    for key, value in tensors.items():
        m = pat.match(key)
        if m:
            name = m.group(1).removeprefix(PREFIX)
            parts.setdefault(name, {})[m.group(2)[-1]] = value  # "A", "B" or "E"

    notes = (
        ["DoRA: analysed scale·B·A; the magnitude vector is ignored"] if cfg.get("use_dora") else []
    )
    alpha0 = float(cfg.get("lora_alpha") or 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules = []
    for name in sorted(parts, key=_natural_key):
        p = parts[name]
        if "A" not in p or "B" not in p:
            notes.append(f"{name}: missing lora_A or lora_B, skipped")
            continue
        a = p["A"].reshape(p["A"].shape[0], -1)  # conv A: r×in×kh×kw
        b = p["B"].reshape(p["B"].shape[0], -1)  # conv B: out×r×1×1
        r = a.shape[0]
        if peft_type == "ADALORA":  # scaling = alpha / ranknum, ranknum = init_r
            init_r = float(cfg.get("init_r") or cfg.get("r") or r)
            scale = (alpha0 if alpha0 > 0 else init_r) / init_r
            if "E" in p:
                a = a * p["E"].reshape(-1, 1)
        else:
            key = pattern_key(alpha_pattern, name)
            alpha = float(alpha_pattern[key]) if key is not None else alpha0
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules.append({"name": name, "a": a, "b": b, "scale": scale, "r": r})
    if not modules:
        raise ValueError(f"no LoRA modules (lora_A/lora_B pairs) found in {weights}")
    return cfg, modules, dtype, notes


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

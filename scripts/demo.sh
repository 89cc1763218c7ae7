#!/usr/bin/env bash
# Install what the demo needs, then run it: MiniLM-L6 + Rotten Tomatoes, 3 ranks x 2 seeds on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/lorasweep demo "$@"

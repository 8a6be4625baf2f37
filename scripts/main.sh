#!/usr/bin/env bash
# Set up, then reproduce every analysis at the quick scale on the default model (SmolLM2-135M,
# offline): runs/quick/report.html (self-contained, offline) and runs/quick/metrics.json.
# Under 10 minutes on 2 CPU cores; rerunning skips finished stages. Extra arguments go to
# `beyond-top1 reproduce` (e.g. --scale paper --out runs/paper, --set scan_texts=48).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV"/bin/beyond-top1 reproduce --scale quick --out runs/quick "$@"

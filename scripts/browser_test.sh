#!/usr/bin/env bash
# Browser checks: saved views (and, later, the report) opened in headless Chromium, offline.
# Needs Chromium (scripts/setup.sh installs Debian's package when missing and run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV"/bin/python -m pytest -m browser "$@"

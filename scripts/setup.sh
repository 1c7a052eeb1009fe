#!/usr/bin/env bash
# Create .venv and install atomlab into it, torch first and explicitly.
# ATOMLAB_TORCH picks the torch build: the default is the CPU build; a GPU user sets e.g.
#   ATOMLAB_TORCH="torch==2.6.0 --index-url https://download.pytorch.org/whl/cu126"
# ATOMLAB_EXTRAS picks optional extras, e.g. "test" or "parquet,tensorboard".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet --disable-pip-version-check ${ATOMLAB_TORCH:-torch==2.13.0}
extras="${ATOMLAB_EXTRAS:-}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"

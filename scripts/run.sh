#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the default recipe end to end.
# Extra arguments go to `atomlab run`, e.g. scripts/run.sh recipes/tiny.toml train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/atomlab run "${@:-tiny}"

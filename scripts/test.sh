#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv with the test extras, lint, then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k resume
set -euo pipefail
cd "$(dirname "$0")/.."
ATOMLAB_EXTRAS="${ATOMLAB_EXTRAS:-test}" scripts/setup.sh
.venv/bin/ruff check atomlab tests benchmarks
exec .venv/bin/python -m pytest -q "$@"

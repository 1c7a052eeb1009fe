#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv with the test extras, lint, then pytest.
# By default the checks marked slow (multi-process layouts, Ray, whole-bundle reproductions: about 10 more
# minutes on a 2-core CPU) are left out; --all runs them too (CI does). Extra arguments go to pytest,
# e.g. scripts/test.sh -k resume, or scripts/test.sh -m slow for the slow checks alone.
set -euo pipefail
cd "$(dirname "$0")/.."
selection=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  selection=()
  shift
fi
ATOMLAB_EXTRAS="${ATOMLAB_EXTRAS:-test}" scripts/setup.sh
# The web chat is tested in a real headless browser: Debian's chromium and its driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }) ||
      echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "warning: chromium/chromedriver not found; the browser test will be skipped" >&2
  fi
fi
# The code sandbox's mount namespace (read-only minimal root, private /tmp) is tested where bubblewrap runs.
if ! command -v bwrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q bubblewrap >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }) ||
      echo "warning: could not install bubblewrap; the sandbox's mount-namespace tests will be skipped" >&2
  else
    echo "warning: bwrap not found; the sandbox's mount-namespace tests will be skipped" >&2
  fi
fi
# The hub is tested on a real PostgreSQL too: Debian's postgresql, a throwaway server on loopback.
if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q postgresql >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; } ||
    echo "warning: could not install postgresql; the hub's PostgreSQL tests will be skipped" >&2
fi
postgres_dir="$(mktemp -d /tmp/atomlab-postgres.XXXXXX)"
chmod 755 "$postgres_dir"
trap 'scripts/postgres.sh stop "$postgres_dir"; rm -rf "$postgres_dir"' EXIT
if postgres_env="$(scripts/postgres.sh start "$postgres_dir")"; then
  eval "$postgres_env"
else
  echo "warning: PostgreSQL did not start; the hub's PostgreSQL tests will be skipped" >&2
fi
.venv/bin/ruff check atomlab tests benchmarks
.venv/bin/python -m pytest -q ${selection[@]+"${selection[@]}"} "$@"

#!/usr/bin/env bash
# Sets up .venv (with the test extras) and runs the whole test-suite: unit tests, then integration
# tests on real vLLM + Ray + PEFT with the tiny model, and the report pages in headless Chromium
# (`-m ""` lifts the unit-only default of a bare `pytest`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The report pages' browser test opens them in the system's Chromium (Debian's package; Playwright's
# own browser downloads are never used). Installed only when missing, which needs root and apt.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (Debian's package) for the report page's browser test ..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: no chromium on PATH; the report page's browser test will fail (apt-get install chromium)" >&2
  fi
fi
exec .venv/bin/python -m pytest -m "" "${@:-tests}"

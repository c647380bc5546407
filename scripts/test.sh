#!/usr/bin/env bash
# Sets up .venv (with the test extras) and runs the whole test-suite: unit tests, then integration
# tests on real vLLM + Ray + PEFT with the tiny model (`-m ""` lifts the unit-only default of a
# bare `pytest`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -m "" "${@:-tests}"

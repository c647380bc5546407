#!/usr/bin/env bash
# Sets up .venv and runs the generation job on the sample requests. Without an NVIDIA GPU it runs
# on the CPU with the project's tiny model (built on first use); extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=()
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then model=(model=tiny); fi
exec .venv/bin/python -m jobs.generate "${model[@]}" input=data/sample_requests.parquet \
  output.path=outputs/sample output.overwrite=true "$@"

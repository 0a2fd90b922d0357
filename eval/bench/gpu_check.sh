#!/bin/bash
# The GPU check: parity with transformers on the GPU (fp32, bf16), then the benchmark there.
# Run from the repository root on a machine with CUDA:  bash eval/bench/gpu_check.sh
set -euo pipefail
PY=${PYTHON:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
test -f weights/random-70m/config.json || $PY -m minipythia.random_checkpoint 70m weights/random-70m
$PY -m eval.bench.gpu_parity weights/random-70m --device cuda
$PY -m eval bench --model weights/random-70m --device cuda --prompt-lens 128,1024,2048 --new-tokens 64 \
    --out "${OUT:-results/bench-gpu}"

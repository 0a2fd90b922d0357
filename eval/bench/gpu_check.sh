#!/bin/bash
# The GPU check, one short run (under 10 minutes on one GPU) when a CUDA machine is lent:
#   1. parity with transformers on the GPU (fp32, bf16), on a random pythia-70m-shaped checkpoint;
#   2. the CUDA-only tests (tests/test_cuda.py: logits, batched windows, a sweep with tasks, CPU vs GPU);
#   3. a batched sweep on the GPU (the compact grid's PPL, batch_windows 1 vs 16, same NLLs), timed;
#   4. the benchmark there.
# Run from the repository root with the project installed and a CUDA build of torch (`make venv TORCH=torch`,
# then PYTHON=.venv/bin/python):  bash eval/bench/gpu_check.sh
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-results/gpu-check}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
test -f weights/random-70m/config.json || $PY -m minipythia.random_checkpoint 70m weights/random-70m
$PY -m eval.bench.gpu_parity weights/random-70m --device cuda
HF_HUB_OFFLINE=1 $PY -m pytest -q -m cuda tests/test_cuda.py
# Books: DATA (a folder of .txt), else this repository's docs as text (a GPU machine may have neither
# the hub nor PG-19; the check is of batched vs unbatched NLLs, not of the figures).
if [ -z "${DATA:-}" ]; then
  DATA="$OUT/books"; mkdir -p "$DATA"
  for f in README.md docs/*.md; do cp "$f" "$DATA/$(basename "$f" .md).txt"; done
fi
for BW in 1 16; do
  START=$SECONDS
  $PY -m eval sweep eval/configs/compact.yaml --device cuda --batch-windows $BW --data "$DATA" \
      --out "$OUT/sweep-bw$BW" 2>&1 | grep -v "it/s\|win/s\|unit/s\|example/s" | tail -2
  echo "compact sweep on CUDA, batch_windows $BW: $((SECONDS - START)) s"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def nlls(d):
    return {p.parent.name: [json.loads(l)["nll_sum"] for l in p.read_text().splitlines()] for p in (out / d).glob("*/ppl.jsonl")}
a, b = nlls("sweep-bw1"), nlls("sweep-bw16")
worst = max((abs(x - y) / abs(x) for k in a for x, y in zip(a[k], b[k])), default=0.0)
print(f"batched vs unbatched sweep on CUDA: {len(a)} configurations, largest relative NLL difference {worst:.2e}")
PY
$PY -m eval bench --model weights/random-70m --device cuda --prompt-lens 128,1024,2048 --new-tokens 64 \
    --out "$OUT/bench"

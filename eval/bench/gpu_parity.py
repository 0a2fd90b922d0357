"""Parity on a GPU: minipythia vs transformers on the same random pythia-70m-shaped checkpoint, fp32 and bf16.

    python -m eval.bench.gpu_parity weights/random-70m [--device cuda]

fp32: max |logit diff| must be tiny. bf16: our error against the fp32 logits must be about transformers'
own bf16 error (both round the same weights). Exit code 1 on failure.
"""

import argparse
import sys

import torch

from ..speed import load_hf
from minipythia import Pythia, generate


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    ids = torch.randint(0, 50000, (2, 256), generator=torch.Generator().manual_seed(0)).to(args.device)
    ok = True
    with torch.inference_mode():
        reference = load_hf(args.model, torch.float32).to(args.device)(ids).logits.float()
        for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, None)):
            ours = Pythia.from_pretrained(args.model, dtype=dtype, device=args.device).for_inference()
            hf = load_hf(args.model, dtype).to(args.device)
            err_ours = (ours(ids).float() - reference).abs().max().item()
            err_hf = (hf(ids).logits.float() - reference).abs().max().item()
            passed = err_ours < bound if bound else err_ours <= 1.5 * err_hf
            tokens = generate(ours, ids[0, :64], 32).tokens
            hf_tokens = hf.generate(ids[:1, :64], max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 64:].tolist()
            print(f"{dtype}: max |ours - hf fp32| {err_ours:.2e}, |hf {dtype} - hf fp32| {err_hf:.2e}, "
                  f"greedy 32 tokens identical: {tokens == hf_tokens} -> {'ok' if passed else 'FAIL'}")
            ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

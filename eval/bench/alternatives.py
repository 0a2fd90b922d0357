"""Decode speed of the layouts and compilers measured for issue 3 and not adopted, against the shipped code.

    python -m eval.bench.alternatives [--model weights/random-70m] [--prompt-lens 128,1024] [--rounds 5]

Each variant is the shipped model with one change; all run greedy decoding of 32 tokens in one process, the
variants and transformers alternating round by round, and each ratio is the median of the per-round ratios
(this machine drifts 10-15% within minutes). The variants:

- column-major layers: every layer matrix stored as (in, out), as the LM head already is. It moved the
  cached-vs-uncached logits past the 1e-5 the parity tests allow, so it is not shipped.
- oneDNN-packed layers: the layer matrices reordered by oneDNN for one-row inputs (a private PyTorch op,
  `torch.ops.mkldnn._reorder_linear_weight`, which inductor uses); not shipped: private API, opaque tensors.
- torch.compile: the whole model, dynamic shapes, inductor; the cache grows each step and recompiles.

Prints one line per prompt length; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from ..data import random_prompt
from ..speed import load_hf, measure, measure_hf
from minipythia import NoCompression, Pythia


def column_major_layers(model: Pythia) -> Pythia:
    for block in model.layers:
        for linear in block.modules():
            if isinstance(linear, nn.Linear):
                linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
    return model


class OneDNNLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout for one-row inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_layers(model: Pythia) -> Pythia:
    for block in model.layers:
        for parent in [block.attention, block.mlp]:
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, OneDNNLinear(child))
    return model


def tpot_ms(model, prompt) -> float:
    return measure(model, {prompt.numel(): prompt}, [NoCompression()], 32, 1)[0]["tpot_ms"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="weights/random-70m")
    p.add_argument("--prompt-lens", default="128,1024")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)

    def load():
        return Pythia.from_pretrained(args.model).for_inference()

    variants = {"shipped": load(), "column-major layers": column_major_layers(load()),
                "oneDNN-packed layers": onednn_layers(load())}
    eager = load()
    compiled = torch.compile(eager, dynamic=True)
    hf = load_hf(args.model, torch.float32)
    vocab = eager.config.vocab_size
    lengths = [int(x) for x in args.prompt_lens.split(",")]

    start = time.perf_counter()
    for length in lengths:  # compile for the prefill and the decode step at every prompt length first
        measure(compiled, {length: random_prompt(length, vocab, seed=0)}, [NoCompression()], 8, 1)
    variants["torch.compile"] = compiled
    print(f"torch.compile: {time.perf_counter() - start:.0f} s to compile and warm up")

    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = variants["shipped"](ids)
        for name, model in list(variants.items())[1:]:
            print(f"{name}: max |logit - shipped| {(model(ids) - reference).abs().max():.2e}")

    for length in lengths:
        prompt = random_prompt(length, vocab, seed=0)
        times = {name: [] for name in [*variants, "transformers"]}
        for _ in range(args.rounds):
            for name, model in variants.items():
                times[name].append(tpot_ms(model, prompt))
            times["transformers"].append(measure_hf(hf, {length: prompt}, 32, 1)[0]["tpot_ms"])
        parts = []
        for name, ts in times.items():
            vs_shipped = statistics.median(t / s for t, s in zip(ts, times["shipped"]))
            vs_hf = statistics.median(t / h for t, h in zip(ts, times["transformers"]))
            parts.append(f"{name} {statistics.median(ts):.2f} ms ({vs_shipped:.2f}x shipped, {vs_hf:.2f}x HF)")
        print(f"prompt {length}, float32 TPOT: " + "; ".join(parts))


if __name__ == "__main__":
    main()

"""Decode cost of a ragged cache (heads holding different numbers of entries, AdaKV) against a uniform one
holding as many entries in all (SnapKV at the same capacity), measured in one run.

    python -m eval.bench.ragged [--model weights/tiny-pg19] [--prompt-len 768] [--capacity 256] [--steps 32]
                                [--rounds 5]

Each round prefills the same random prompt into both caches and times greedy decode steps through each, the
two alternating; the ratio printed is the median over rounds of the ratio of median step times (this machine
drifts 10-15% within minutes). Prints one line; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ..data import random_prompt
from minipythia import SnapKV
from minipythia.cli import add_model_args, load_for_inference, resolve_model
from minipythia.compressors.adakv import AdaKV
from minipythia.timing import clock


@torch.inference_mode()
def median_step(model, compressor, prompt: torch.Tensor, steps: int) -> float:
    cache = model.new_cache(compressor=compressor)
    token = model(prompt[None].to(model.embed_in.weight.device), cache=cache, last_only=True)[:, -1:].argmax(-1)
    device = model.embed_in.weight.device
    times = []
    for _ in range(steps):
        start = clock(device)
        token = model(token, cache=cache)[:, -1:].argmax(-1)
        times.append(clock(device) - start)
    return statistics.median(times[2:])  # after two warm-up steps


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.bench.ragged", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=768)
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    model = load_for_inference(resolve_model(args.model, args.revision).directory, args.dtype, args.device)
    prompt = random_prompt(args.prompt_len, model.config.vocab_size)
    ratios, ragged_ms, uniform_ms = [], [], []
    for _ in range(args.rounds):
        uniform = median_step(model, SnapKV(max_capacity_prompt=args.capacity), prompt, args.steps)
        ragged = median_step(model, AdaKV(max_capacity_prompt=args.capacity), prompt, args.steps)
        ratios.append(ragged / uniform)
        ragged_ms.append(1000 * ragged)
        uniform_ms.append(1000 * uniform)
    print(f"decode step, {args.prompt_len}-token prompt, {args.capacity} entries per head on average: "
          f"AdaKV (ragged) {statistics.median(ragged_ms):.2f} ms, SnapKV (uniform) {statistics.median(uniform_ms):.2f} "
          f"ms; ratio {statistics.median(ratios):.2f}x (median of {args.rounds} rounds, {torch.get_num_threads()} "
          f"threads)")


if __name__ == "__main__":
    main()

"""Writes a randomly initialised Pythia of a published shape, for benchmarks and runs without the hub:

    python -m minipythia.random_checkpoint 70m weights/random-70m [--tokenizer path/to/tokenizer.json]

Its perplexity is about the vocabulary size whatever the compressor: good for speed and memory, useless
for judging compression quality.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .cli import run_cli
from .config import PYTHIA_SHAPES, config_for_size
from .model import Pythia
from .weights import save_pretrained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minipythia.random_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("size", help=f"one of {', '.join(PYTHIA_SHAPES)} (pythia-70m also works)")
    p.add_argument("out", type=Path, help="the checkpoint directory to write")
    p.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json to copy in (e.g. Pythia's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise ValueError(f"--tokenizer {args.tokenizer} is not a file; give the path of a tokenizer.json")
    model = Pythia(config_for_size(args.size)).init_weights(seed=args.seed)
    save_pretrained(model, args.out)
    if args.tokenizer is not None:
        shutil.copyfile(args.tokenizer, args.out / "tokenizer.json")
    print(f"wrote {args.out} ({model.num_parameters() / 1e6:.1f}M parameters, random, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

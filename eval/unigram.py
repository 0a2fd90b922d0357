"""The floor a language model must beat: a unigram model's perplexity on the tokens the PPL eval scores.

    python -m eval.unigram --model weights/tiny-pg19 --train ../shared/data/gutenberg-train \
        --data ../shared/data/pg19-test

Token frequencies come from the training books (add-one smoothed over the whole vocabulary), and the
scored tokens are those of the sliding-window eval: every token of each book but the first.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from minipythia import Tokenizer
from minipythia.cli import resolve_model, run_cli

from .data import load_books, tokenized_books


def unigram_counts(books, tokenizer, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for _, _, ids in tokenized_books(books, tokenizer):
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
    return counts


def unigram_ppl(counts: torch.Tensor, scored: list[torch.Tensor]) -> tuple[float, int]:
    """PPL of add-one-smoothed unigram probabilities over the scored ids, and how many ids were scored."""
    log_p = ((counts + 1) / (counts.sum() + counts.numel())).log()
    nll = sum(-log_p[ids].sum().item() for ids in scored)
    n = sum(ids.numel() for ids in scored)
    return math.exp(nll / n), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.unigram", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="the checkpoint whose tokenizer and vocabulary to use")
    p.add_argument("--revision", default=None)
    p.add_argument("--train", required=True, help="directory of .txt books the frequencies come from")
    p.add_argument("--data", required=True, nargs="+", help="pg19, a directory of .txt books, or files")
    args = p.parse_args(argv)
    choice = resolve_model(args.model, args.revision)
    directory = choice.directory
    tokenizer = Tokenizer.from_pretrained(directory)
    vocab = max(tokenizer.vocab_size, 1)
    counts = unigram_counts(load_books(args.train), tokenizer, vocab)
    scored = [ids[1:] for _, _, ids in tokenized_books(load_books(args.data), tokenizer)]
    ppl, n = unigram_ppl(counts, scored)
    print(f"unigram PPL {ppl:.2f} over {n} tokens (frequencies from {args.train}, tokenizer of {choice.name})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

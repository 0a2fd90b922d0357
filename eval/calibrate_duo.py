"""python -m eval.calibrate_duo: a DuoAttention head pattern for a checkpoint, from a few books.

    python -m eval.calibrate_duo --model M --data DIR [--books 4] [--prompt-len N] [--out FILE]

For each book, its first prompt-len tokens (default: the model's trained length) are prefilled once; each
(layer, head) gets DuoAttention's on-the-fly score of that prompt (how far back the head's mean query
attends), averaged over the books. The file (default: duo_attention_pattern.json next to the checkpoint)
is read by `DuoAttention(pattern_file=FILE)`, which then ranks heads by it instead of by each prompt's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minipythia import Prefill, Tokenizer
from minipythia.cli import add_model_args, check_tokenizer, load_for_inference, resolve_model, run_cli
from minipythia.compressors.duo_attention import DuoAttention

from .data import load_books, tokenized_books
from .results import write_json


@torch.inference_mode()
def calibrate(model, prompts: list[torch.Tensor], pattern_length: int = 500) -> list[list[float]]:
    """The mean over prompts (1-D ids) of DuoAttention's head scores: [layer][head]."""
    duo = DuoAttention(pattern_length=pattern_length)
    duo.for_model(model.config)
    total = None
    for ids in prompts:
        prefill = Prefill.record(model, ids.view(1, -1).to(model.embed_in.weight.device))
        scores = torch.stack([duo.head_scores(k, q)[0] for k, q in zip(prefill.keys, prefill.queries)]).double()
        total = scores if total is None else total + scores
    return (total / len(prompts)).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.calibrate_duo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--data", nargs="+", required=True, help="a directory of .txt books, or .txt files")
    parser.add_argument("--books", type=int, default=4, help="the first N books (default 4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens per book (default: trained length)")
    parser.add_argument("--pattern-length", type=int, default=500, help="DuoAttention's pattern_length")
    parser.add_argument("--out", default=None, help="default: duo_attention_pattern.json in the checkpoint")
    args = parser.parse_args(argv)
    choice = resolve_model(args.model, args.revision)
    model = load_for_inference(choice.directory, args.dtype, args.device)
    tokenizer = Tokenizer.from_pretrained(choice.directory)
    check_tokenizer(tokenizer, model.config)
    length = args.prompt_len or model.config.max_position_embeddings
    if not 2 <= length <= model.config.max_position_embeddings:
        raise ValueError(f"--prompt-len must be in [2, {model.config.max_position_embeddings}], got {length}")
    books = tokenized_books(load_books(args.data, args.books), tokenizer, length)
    scores = calibrate(model, [ids for _, _, ids in books], args.pattern_length)
    out = Path(args.out) if args.out else choice.directory / "duo_attention_pattern.json"
    write_json(out, dict(model=choice.name, books=[name for name, _, _ in books], prompt_len=length,
                         pattern_length=args.pattern_length, scores=scores))
    print(f"head pattern of {len(scores)} layers x {len(scores[0])} heads from {len(books)} book(s): {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""python -m eval {ppl, speed, suite, report}: the command-line front of the eval package."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from minipythia import NoCompression, Pythia, Tokenizer
from minipythia.cli import (DTYPES, add_compressor_args, add_model_args, compressor_from_args, resolve_model_arg,
                            run_cli)

from .data import check_max_tokens, load_books, speed_prompts, tokenized_books
from .ppl import check_window_args, run_ppl
from .report import ppl_tables, speed_table, write_report
from .speed import check_speed_args, run_speed
from .suite import DEFAULT_MAX_TOKENS, run_suite


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_data_args(parser, required: bool):
    parser.add_argument("--data", nargs="+", required=required, metavar="pg19|DIR|FILE",
                        help="'pg19' ($PG19_DIR, else the HF test split), a directory of .txt books, or .txt files")
    parser.add_argument("--books", type=int, default=None, help="only the first N books")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one in the checkpoint)")


def add_window_args(parser):
    parser.add_argument("--ctx-len", type=int, default=None,
                        help="window length (default: the model's trained length, at most 2048)")
    parser.add_argument("--stride", type=int, default=None, help="targets scored per window (default: ctx_len / 4)")


def add_speed_args(parser):
    parser.add_argument("--prompt-lens", type=int_list, default=[512, 1024, 2048], help="e.g. 512,1024,2048")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated after each prompt")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (prompt, config); medians are reported")
    parser.add_argument("--hf", action="store_true", help="also time transformers' generate on the same checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ppl", help="sliding-window perplexity of one config -> OUT/ppl.jsonl")
    add_model_args(p)
    add_data_args(p, required=True)
    p.add_argument("--max-tokens", type=int, default=None, help="score only each book's first N tokens")
    add_window_args(p)
    add_compressor_args(p)
    p.add_argument("--out", required=True, help="results directory (reruns skip the entries already there)")

    p = sub.add_parser("speed", help="TTFT, TPOT, KV bytes of none vs a compressor -> OUT/speed.jsonl")
    add_model_args(p)
    add_speed_args(p)
    add_compressor_args(p)
    add_data_args(p, required=False)
    p.add_argument("--out", required=True)

    p = sub.add_parser("suite", help="PPL of the standard configs, speed of three, OUT/report.md (make eval)")
    add_model_args(p)
    add_data_args(p, required=True)
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"score each book's first N tokens (default {DEFAULT_MAX_TOKENS}: < 15 min on 2 CPU "
                            f"cores at pythia-70m)")
    limit.add_argument("--full-books", action="store_true", help="score whole books (hours on a CPU)")
    add_window_args(p)
    add_speed_args(p)
    p.add_argument("--redo-speed", action="store_true", help="measure speed even if a complete run is saved")
    p.add_argument("--out", required=True)

    p = sub.add_parser("report", help="regenerate DIR/report.md from the jsonl files")
    p.add_argument("dir")
    return parser


def load_model(args) -> tuple[Pythia, Tokenizer, Path]:
    """The model, its tokenizer and the checkpoint directory (resolved once: a hub id downloads once)."""
    directory = resolve_model_arg(args)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or directory)
    model = Pythia.from_pretrained(directory, dtype=DTYPES[args.dtype])
    if "ctx_len" in args:
        args.ctx_len = args.ctx_len or min(2048, model.config.max_position_embeddings)
        args.stride = args.stride or args.ctx_len // 4  # 2048 / 512 as in the Pythia protocol
        check_window_args(args.ctx_len, args.stride)
    return model, tokenizer, directory


def warn_positions(model, length: int, what: str):
    if length > model.config.max_position_embeddings:
        print(f"warning: {what} {length} > the model's {model.config.max_position_embeddings} trained positions: "
              f"dense-attention PPL degrades sharply beyond them", file=sys.stderr)


def cmd_ppl(args):
    check_window_args(args.ctx_len, args.stride)
    check_max_tokens(args.max_tokens)
    compressor = compressor_from_args(args)
    books = load_books(args.data, args.books)
    model, tokenizer, _ = load_model(args)
    warn_positions(model, args.ctx_len, "--ctx-len")
    tokenized = tokenized_books(books, tokenizer, args.max_tokens)
    meta = dict(model=args.model, revision=args.revision, dtype=args.dtype)
    records = run_ppl(model, tokenized, [compressor], Path(args.out), meta, args.ctx_len, args.stride, args.max_tokens)
    print(ppl_tables(records))
    print(f"results: {Path(args.out) / 'ppl.jsonl'}")


def cmd_speed(args):
    check_speed_args(args.new_tokens, args.repeats)
    compressor = compressor_from_args(args)
    configs = [NoCompression()] + ([compressor] if compressor.name != "none" else [])
    books = load_books(args.data, args.books) if args.data else []
    model, tokenizer, directory = load_model(args)
    warn_positions(model, max(args.prompt_lens), "prompt length")
    prompts, source = speed_prompts(args.prompt_lens, books, tokenizer, model.config.vocab_size)
    rows = run_speed(model, prompts, configs, args.new_tokens, args.repeats, Path(args.out),
                     dict(model=args.model, revision=args.revision, dtype=args.dtype, prompt_source=source),
                     hf_dir=directory if args.hf else None)
    print(speed_table(rows))
    print(f"results: {Path(args.out) / 'speed.jsonl'}")


def cmd_suite(args, command: str):
    check_window_args(args.ctx_len, args.stride)
    check_max_tokens(None if args.full_books else args.max_tokens)
    check_speed_args(args.new_tokens, args.repeats)
    model, tokenizer, directory = load_model(args)
    warn_positions(model, args.ctx_len, "--ctx-len")
    run_suite(args, model, tokenizer, directory, command)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "ppl":
        cmd_ppl(args)
    elif args.command == "speed":
        cmd_speed(args)
    elif args.command == "suite":
        cmd_suite(args, "python -m eval " + shlex.join(argv))
    else:
        print(write_report(args.dir))


if __name__ == "__main__":
    sys.exit(run_cli(main))

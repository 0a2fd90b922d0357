"""python -m eval {ppl, speed, suite, sweep, report}: the command-line front of the eval package."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from minipythia import NoCompression, Pythia, Tokenizer
from minipythia.cli import (DTYPES, add_compressor_args, add_model_args, compressor_from_args, resolve_model_arg,
                            run_cli)

from .bench import bench_table, run_bench
from .data import DataError, check_max_tokens, load_books, speed_prompts, tokenized_books
from .grid import load_spec
from .ppl import check_window_args, default_windows, run_ppl
from .report import ppl_tables, speed_table, write_report
from .speed import check_speed_args, run_speed
from .stream import check_stream_args
from .suite import DEFAULT_MAX_TOKENS, HOW_TO_ADD_PPL, run_suite
from .sweep import run_sweep


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

    p = sub.add_parser("ppl", help="perplexity of one config, sliding windows or --mode stream -> OUT/ppl.jsonl")
    add_model_args(p)
    add_data_args(p, required=True)
    p.add_argument("--max-tokens", type=int, default=None, help="score only each book's first N tokens")
    add_window_args(p)
    p.add_argument("--mode", choices=["window", "stream"], default="window",
                   help="window: sliding windows, each prompt compressed once (default); stream: token by token, "
                        "compressing during decoding every --decode-interval, restarting every --ctx-len tokens")
    add_compressor_args(p, decode_interval=True)
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

    p = sub.add_parser("sweep", help="PPL (and speed) of a grid of policies and settings from a YAML file: a folder "
                                     "per configuration in OUT, and OUT/report.md")
    p.add_argument("config", help="the sweep's YAML file, e.g. eval/configs/compact.yaml (format: eval/grid.py)")
    p.add_argument("--out", default=None, help="results directory (default: results/<config name>); a rerun "
                                               "resumes, skipping the configurations already complete")
    p.add_argument("--model", default=None, help="overrides the config's model")
    p.add_argument("--revision", default=None, help="overrides the config's hub revision")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="overrides the config's dtype")
    add_data_args(p, required=False)

    p = sub.add_parser("bench", help="minipythia vs transformers: TTFT, TPOT, bandwidth, in one run (make bench)")
    add_model_args(p)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, e.g. float32,bfloat16")
    p.add_argument("--prompt-lens", type=int_list, default=[128, 1024, 2048], help="e.g. 128,1024,2048")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated after each prompt")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt; medians are reported")
    p.add_argument("--no-hf", action="store_true", help="skip transformers even when it is installed")
    p.add_argument("--sweep-tokens", type=int, default=4096,
                   help="tokens for the shared-prefill sweep timing (0 skips it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="results/bench")

    p = sub.add_parser("report", help="regenerate DIR/report.md and DIR/plots/ from a suite's or a sweep's results")
    p.add_argument("dir")
    return parser


def load_model(args) -> tuple[Pythia, Tokenizer, Path]:
    """The model, its tokenizer and the checkpoint directory (resolved once: a hub id downloads once)."""
    directory = resolve_model_arg(args)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or directory)
    model = Pythia.from_pretrained(directory, dtype=DTYPES[args.dtype])
    if "ctx_len" in args:
        args.ctx_len, args.stride = default_windows(model, args.ctx_len, args.stride)
    return model, tokenizer, directory


def warn_positions(model, length: int, what: str):
    if length > model.config.max_position_embeddings:
        print(f"warning: {what} {length} > the model's {model.config.max_position_embeddings} trained positions: "
              f"dense-attention PPL degrades sharply beyond them", file=sys.stderr)


def cmd_ppl(args):
    check_window_args(args.ctx_len, args.stride)
    check_max_tokens(args.max_tokens)
    compressor = compressor_from_args(args)
    check_stream_args(args.mode, args.stride, compressor, args.decode_interval)
    books = load_books(args.data, args.books)
    model, tokenizer, _ = load_model(args)
    warn_positions(model, args.ctx_len, "--ctx-len")
    tokenized = tokenized_books(books, tokenizer, args.max_tokens)
    meta = dict(model=args.model, revision=args.revision, dtype=args.dtype)
    records = run_ppl(model, tokenized, [compressor], Path(args.out), meta, args.ctx_len, args.stride, args.max_tokens,
                      mode=args.mode, decode_interval=args.decode_interval)
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


def cmd_sweep(args, command: str):
    spec = load_spec(args.config)  # a bad config fails here, before the model loads
    for key in ("model", "revision", "dtype", "data", "books", "tokenizer"):
        if getattr(args, key) is not None:
            setattr(spec, key, getattr(args, key))
    out = Path(args.out) if args.out else Path("results") / spec.path.stem
    try:
        books, ppl_skipped = load_books(spec.data, spec.books), None
    except DataError as e:  # as in the suite: no data is no reason to skip the speed part
        if not spec.speed:
            raise
        books, ppl_skipped = [], HOW_TO_ADD_PPL.format(reason=str(e).rstrip("."))
        print(ppl_skipped, file=sys.stderr)
    model_args = argparse.Namespace(model=spec.model, revision=spec.revision, dtype=spec.dtype,
                                    tokenizer=spec.tokenizer, ctx_len=spec.ctx_len, stride=spec.stride)
    model, tokenizer, directory = load_model(model_args)
    # What was really used goes into the results: the default model, and windows that depend on the model.
    spec.model, spec.revision = model_args.model, model_args.revision
    spec.ctx_len, spec.stride = model_args.ctx_len, model_args.stride
    warn_positions(model, spec.ctx_len, "ctx_len")
    if spec.speed:
        warn_positions(model, max(spec.speed.prompt_lengths), "speed prompt length")
    run_sweep(spec, books, model, tokenizer, directory, out, command, ppl_skipped)


def cmd_bench(args):
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"--dtypes {args.dtypes!r}: choose among {', '.join(DTYPES)}")
    check_speed_args(args.new_tokens, args.repeats)
    directory = resolve_model_arg(args)
    result = run_bench(directory, dtypes, args.prompt_lens, args.new_tokens, args.repeats, not args.no_hf,
                       Path(args.out), args.sweep_tokens, args.device)
    print(bench_table(result))
    print(f"results: {Path(args.out) / 'bench.md'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "ppl":
        cmd_ppl(args)
    elif args.command == "speed":
        cmd_speed(args)
    elif args.command == "suite":
        cmd_suite(args, "python -m eval " + shlex.join(argv))
    elif args.command == "sweep":
        cmd_sweep(args, "python -m eval " + shlex.join(argv))
    elif args.command == "bench":
        cmd_bench(args)
    else:
        print(write_report(args.dir))


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""What the command-line tools share: compressor options, model loading options, and clean errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .compressors import COMPRESSORS, Compressor
from .config import PythiaConfig
from .weights import DEFAULT_MODEL, EMBEDDED_MODEL, ModelNotFoundError, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=None,
                        help=f"checkpoint directory, registry name (pythia-70m-deduped) or hub id (default: "
                             f"{DEFAULT_MODEL} when cached or reachable, else the embedded weights/{EMBEDDED_MODEL.name})")
    parser.add_argument("--revision", default=None, help="hub revision, e.g. step3000 (training checkpoints)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")


def resolve_model_arg(args: argparse.Namespace) -> Path:
    """The checkpoint directory `--model` names; with no --model, Pythia-70M when it can be had, else the
    small model that ships in weights/. args.model is set to what is really used, for the reports."""
    if args.model is not None:
        return resolve(args.model, args.revision)
    try:
        directory = resolve(DEFAULT_MODEL, args.revision)
        args.model = DEFAULT_MODEL
    except ModelNotFoundError as e:
        if not (EMBEDDED_MODEL / "config.json").is_file():
            raise
        print(f"note: {DEFAULT_MODEL} is neither cached nor reachable ({str(e).split(';')[0]}); using the "
              f"embedded {EMBEDDED_MODEL.parent.name}/{EMBEDDED_MODEL.name} instead", file=sys.stderr)
        directory, args.model, args.revision = EMBEDDED_MODEL, f"weights/{EMBEDDED_MODEL.name}", None
    return directory


def add_compressor_args(parser: argparse.ArgumentParser, decode_interval: bool = False):
    """The compressor options; with decode_interval, also --decode-interval (for the commands that use it)."""
    g = parser.add_argument_group("KV-cache compression")
    g.add_argument("--compressor", choices=list(COMPRESSORS), default="none")
    g.add_argument("--window-size", type=int, default=32, help="SnapKV / PyramidKV observation window W")
    g.add_argument("--max-capacity-prompt", type=int, default=512,
                   help="entries kept per head C (SnapKV, PyramidKV: on average over layers, StreamingLLM, H2O, "
                        "TOVA, random)")
    g.add_argument("--kernel-size", type=int, default=5, help="SnapKV / PyramidKV pooling kernel (odd)")
    g.add_argument("--pooling", choices=["avgpool", "maxpool"], default="avgpool")
    g.add_argument("--compression-ratio", type=float, default=0.5, help="KnormPress fraction evicted, in [0, 1)")
    g.add_argument("--skip-layers", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=(),
                   help="KnormPress: comma-separated layers left whole, e.g. 0,1")
    g.add_argument("--n-sink", type=int, default=4, help="StreamingLLM: first tokens always kept")
    g.add_argument("--recent-ratio", type=float, default=0.5, help="H2O: share of C kept for the most recent tokens")
    g.add_argument("--beta", type=int, default=20, help="PyramidKV: bottom/top budget ratio parameter")
    # Not --seed: generate already has one, for sampling.
    g.add_argument("--compressor-seed", type=int, default=0, help="random eviction: seed of the random scores")
    if decode_interval:
        g.add_argument("--decode-interval", type=int, default=None, metavar="N",
                       help="also compress during decoding: whenever a layer holds more than its budget + N "
                            "entries, compress it back to the budget (streaming_llm, tova, snapkv, h2o, random)")


def compressor_from_args(args: argparse.Namespace) -> Compressor:
    """The compressor the options name; its own validation raises ValueError on bad settings."""
    C = args.max_capacity_prompt
    if args.compressor == "knorm":
        return COMPRESSORS["knorm"](compression_ratio=args.compression_ratio, skip_layers=args.skip_layers)
    if args.compressor == "snapkv":
        return COMPRESSORS["snapkv"](window_size=args.window_size, max_capacity_prompt=C,
                                     kernel_size=args.kernel_size, pooling=args.pooling)
    if args.compressor == "pyramidkv":
        # The per-layer budgets need the model's depth: read it from the checkpoint's config.json (on a
        # copy of args: resolve_model_arg rewrites --model, and the caller resolves it again for itself).
        directory = resolve_model_arg(argparse.Namespace(**vars(args)))
        num_layers = PythiaConfig.from_json(directory / "config.json").num_hidden_layers
        return COMPRESSORS["pyramidkv"](window_size=args.window_size, max_capacity_prompt=C,
                                        kernel_size=args.kernel_size, pooling=args.pooling, beta=args.beta,
                                        num_layers=num_layers)
    if args.compressor == "streaming_llm":
        return COMPRESSORS["streaming_llm"](n_sink=args.n_sink, max_capacity_prompt=C)
    if args.compressor == "h2o":
        return COMPRESSORS["h2o"](max_capacity_prompt=C, recent_ratio=args.recent_ratio)
    if args.compressor == "tova":
        return COMPRESSORS["tova"](max_capacity_prompt=C)
    if args.compressor == "random":
        return COMPRESSORS["random"](max_capacity_prompt=C, seed=args.compressor_seed)
    if args.compressor == "oracle":
        raise ValueError("the oracle needs the tokens that come after the prompt, which the command line does not "
                         "have: use the Python API (Oracle and oracle_future_queries)")
    return COMPRESSORS[args.compressor]()


def run_cli(main, argv=None) -> int:
    """Runs a CLI entry point; bad input (ValueError, missing file) is one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

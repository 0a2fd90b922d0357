"""What the command-line tools share: compressor options, model loading options, and clean errors."""

from __future__ import annotations

import argparse
import sys

import torch

from .compressors import COMPRESSORS, Compressor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = None):
    parser.add_argument("--model", required=default_model is None, default=default_model,
                        help="checkpoint directory, registry name (pythia-70m-deduped) or hub id")
    parser.add_argument("--revision", default=None, help="hub revision, e.g. step3000 (training checkpoints)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")


def add_compressor_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("KV-cache compression")
    g.add_argument("--compressor", choices=list(COMPRESSORS), default="none")
    g.add_argument("--window-size", type=int, default=32, help="SnapKV observation window W")
    g.add_argument("--max-capacity-prompt", type=int, default=512, help="SnapKV entries kept per head C")
    g.add_argument("--kernel-size", type=int, default=5, help="SnapKV pooling kernel (odd)")
    g.add_argument("--pooling", choices=["avgpool", "maxpool"], default="avgpool")
    g.add_argument("--compression-ratio", type=float, default=0.5, help="KnormPress fraction evicted, in [0, 1)")
    g.add_argument("--skip-layers", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=(),
                   help="KnormPress: comma-separated layers left whole, e.g. 0,1")


def compressor_from_args(args: argparse.Namespace) -> Compressor:
    """The compressor the options name; its own validation raises ValueError on bad settings."""
    if args.compressor == "knorm":
        return COMPRESSORS["knorm"](compression_ratio=args.compression_ratio, skip_layers=args.skip_layers)
    if args.compressor == "snapkv":
        return COMPRESSORS["snapkv"](window_size=args.window_size, max_capacity_prompt=args.max_capacity_prompt,
                                     kernel_size=args.kernel_size, pooling=args.pooling)
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

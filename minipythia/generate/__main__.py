"""Generate text from the command line, streaming it as it comes:

    python -m minipythia.generate --model pythia-70m-deduped --prompt "Once upon a time" --stats
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..kv import check_decode_interval
from ..cli import (add_compressor_args, add_model_args, check_tokenizer, compressor_from_args, load_for_inference,
                   resolve_model, run_cli)
from ..compressors import NoCompression
from ..weights import read_config
from ..tokenizer import Tokenizer
from . import check_sampling, generate


class TextStream:
    """Prints generated text as it comes, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: Tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def read_prompt_file(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompt-file {path}: {e.strerror if isinstance(e, OSError) else e}; "
                         f"give a readable UTF-8 text file") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minipythia.generate", description=__doc__.split("\n")[0])
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="a file holding the prompt")
    p.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt before it")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate at most (fewer when <|endoftext|> comes first); default 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only among the K most likely tokens (with --temperature > 0; default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: only among the most likely tokens whose probabilities sum to P, 0 < P <= 1 "
                        "(with --temperature > 0; default: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0); only with --temperature > 0")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--stats", action="store_true", help="print TTFT, TPOT, tokens/s and KV bytes to stderr")
    add_compressor_args(p, argv, decode_interval=True)
    args = p.parse_args(argv)

    text = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    if not text:
        raise ValueError("the prompt is empty: pass some text with --prompt or a non-empty --prompt-file")
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
    seed = None if args.temperature == 0 else (0 if args.seed is None else args.seed)
    compressor = compressor_from_args(args)
    if args.decode_interval is not None and isinstance(compressor, NoCompression):
        raise ValueError("--decode-interval compresses during decoding, which --compressor none never does: choose a "
                         "compressor or leave it out")
    check_decode_interval(compressor, args.decode_interval)
    choice = resolve_model(args.model, args.revision)
    config = read_config(choice.directory)  # what can be checked before the weights load
    compressor.for_model(config)
    tokenizer = Tokenizer.from_pretrained(choice.directory)
    check_tokenizer(tokenizer, config)
    model = load_for_inference(choice.directory, args.dtype, args.device)
    prompt_ids = tokenizer.encode(text)
    if not args.no_echo:
        sys.stdout.write(text)
    # Warnings raised while the text streams are held back and printed after it, not in the middle of it.
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("default")
        result = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          seed, compressor, eos_id=None if args.ignore_eos else tokenizer.eos_id,
                          on_token=TextStream(tokenizer), decode_interval=args.decode_interval)
    sys.stdout.write("\n")
    sys.stdout.flush()
    for w in raised:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.stats:
        kib = 1024
        print(f"prompt {len(prompt_ids)} tokens, generated {len(result.tokens)}, "
              f"compressor {compressor.label}\n"
              f"TTFT {result.ttft_s * 1e3:.1f} ms | TPOT {result.tpot_s * 1e3:.2f} ms | "
              f"{result.tokens_per_s:.1f} tokens/s\n"
              f"KV cache: {result.kv_bytes_prefill / kib:.0f} KiB after prefill, "
              f"{result.kv_bytes_compressed / kib:.0f} KiB after compression, "
              f"{result.kv_bytes_end / kib:.0f} KiB at the end ({result.kept_end} entries per head in layer 0)",
              file=sys.stderr)
    return 0


def cli():
    """The console script (pyproject.toml's [project.scripts])."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()

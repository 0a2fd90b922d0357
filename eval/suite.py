"""The suite behind `make eval`: PPL of the standard configs, speed of three of them, and report.md.

The default truncation (first 8192 tokens of each book: 13 windows of 2048/512) keeps a run well within
15 minutes on a 2-core CPU with a pythia-70m-shaped model and the four local PG-19 test books: measured
there, a window costs about 3.9 s for the six configs together (one shared prefill; about 8 s if each
config prefilled its own), a book about 50 s, the speed part about 50 s: some 4-5 minutes in all, which
leaves room for a shared, noisy machine. --full-books scores everything (9-13x longer for these books).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from minipythia import KnormPress, NoCompression, SnapKV

from .data import DataError, describe_books, load_books, speed_prompts, tokenized_books
from .ppl import run_ppl
from .report import ppl_tables, speed_table, write_report
from .results import read_jsonl
from .speed import run_speed

DEFAULT_MAX_TOKENS = 8192


def _snapkv(capacity: int) -> SnapKV:
    return SnapKV(window_size=32, max_capacity_prompt=capacity, kernel_size=5, pooling="avgpool")


PPL_CONFIGS = [NoCompression(), KnormPress(0.5), KnormPress(0.75), _snapkv(256), _snapkv(512), _snapkv(1024)]
SPEED_CONFIGS = [NoCompression(), _snapkv(512), KnormPress(0.75)]
HOW_TO_ADD_PPL = ("No PPL: {reason}. To add it, rerun with --data DIR (a directory of .txt books, e.g. "
                  "../shared/data/pg19-test) or set PG19_DIR.")


def complete_speed_run(path: Path, key: str, expected_rows: int) -> bool:
    runs: dict[str, int] = {}
    for r in read_jsonl(path):
        if r.get("settings_key") == key:
            runs[r["run"]] = runs.get(r["run"], 0) + 1
    return expected_rows in runs.values()


def run_suite(args, model, tokenizer, directory: Path, command: str) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    meta = dict(model=args.model, revision=args.revision, dtype=args.dtype)
    max_tokens = None if args.full_books else args.max_tokens

    try:
        books = load_books(args.data, args.books)
    except DataError as e:  # no data is no reason to skip the speed part
        books, data = [], "none (PPL skipped)"
        ppl_skipped = HOW_TO_ADD_PPL.format(reason=str(e).rstrip("."))
        print(ppl_skipped, file=sys.stderr)
    else:
        data = describe_books(books, max_tokens)
        ppl_skipped = None

    if books:
        tokenized = tokenized_books(books, tokenizer, max_tokens)
        records = run_ppl(model, tokenized, PPL_CONFIGS, out, meta, args.ctx_len, args.stride, max_tokens)
        print("\n" + ppl_tables(records) + "\n")
    t_ppl = time.perf_counter()

    prompts, source = speed_prompts(args.prompt_lens, books, tokenizer, model.config.vocab_size)
    key = json.dumps([meta, args.prompt_lens, args.new_tokens, args.repeats, [c.label for c in SPEED_CONFIGS],
                      args.hf, source])
    expected = len(prompts) * (len(SPEED_CONFIGS) + (1 if args.hf else 0))
    if complete_speed_run(out / "speed.jsonl", key, expected) and not args.redo_speed:
        print(f"speed: a complete run with these settings is in {out / 'speed.jsonl'}, skipped "
              f"(--redo-speed measures again)", file=sys.stderr)
    else:
        rows = run_speed(model, prompts, SPEED_CONFIGS, args.new_tokens, args.repeats, out,
                         dict(meta, prompt_source=source, settings_key=key),
                         hf_dir=directory if args.hf else None)
        print("\n" + speed_table(rows) + "\n")
    t_end = time.perf_counter()

    # Reruns resume: each run's times are kept, so the report can say what the results really cost.
    previous = json.loads((out / "suite.json").read_text()).get("runs", []) if (out / "suite.json").is_file() else []
    run = dict(command=command, started=started, wall_seconds=round(t_end - t0, 1), ppl_seconds=round(t_ppl - t0, 1),
               speed_seconds=round(t_end - t_ppl, 1))
    (out / "suite.json").write_text(json.dumps(dict(
        model=args.model, revision=args.revision, dtype=args.dtype,
        parameters=model.num_parameters(), data=data, ppl_skipped=ppl_skipped,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                f"({torch.get_num_threads()} threads)", runs=previous + [run]), indent=2))
    path = write_report(out)
    print(f"report: {path} (wall time {t_end - t0:.0f} s)")
    return path

"""Sweep throughput: one small PPL sweep run serially with batch_windows 1 and N, and on a local Ray cluster of
each worker count, in one process, each into a fresh folder:

    python -m eval.bench.scaling --data ../shared/data/pg19-test [--model DIR] [--batch-windows 8] [--workers 1,2]

Throughput is scored tokens x configurations per second of the sweep's own wall time (sweep.json's runs:
planning, the units, the report; not loading the driver's model, nor starting Ray, shown apart). Every run
must leave the same result files (the NLLs do not depend on how the work was split); the bench checks it.
Machines are noisy: only ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from minipythia.cli import run_cli

from ..markdown import table
from ..results import read_jsonl, write_text

GRID = """\
ctx_len: 512
stride: 128
max_tokens: {max_tokens}
tasks: [ppl]
policies:
  - {{compressor: none}}
  - {{compressor: snapkv, window_size: 16, max_capacity_prompt: 128}}
  - {{compressor: knorm, compression_ratio: 0.5}}
  - {{compressor: streaming_llm, max_capacity_prompt: 128}}
"""


def scored(out: Path) -> int:
    """Tokens x configurations a results folder holds."""
    return sum(r["tokens"] for path in out.glob("*/ppl.jsonl") for r in read_jsonl(path))


def result_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/ppl.jsonl"))}


def run_once(spec_path: Path, model: str | None, data: list[str], out: Path, batch_windows: int,
             workers: int | None) -> dict:
    from ..grid import load_spec
    from ..pipeline import LOCAL, run_spec

    spec = load_spec(spec_path)
    spec.model = model
    spec.models = [model]
    spec.data = data
    spec.batch_windows = batch_windows
    t = time.perf_counter()
    run_spec(spec, out, "python -m eval.bench.scaling", LOCAL if workers else None, workers)
    wall = time.perf_counter() - t
    sweep_seconds = sum(r["wall_seconds"] for r in json.loads((out / "sweep.json").read_text())["runs"])
    return dict(run="serial" if workers is None else f"Ray, {workers} worker(s)", batch_windows=batch_windows,
                threads=torch.get_num_threads() if workers is None else 1, seconds=sweep_seconds,
                overhead=wall - sweep_seconds, scored=scored(out), files=result_bytes(out))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: as every command)")
    p.add_argument("--data", nargs="+", default=["pg19"], help="books: a directory of .txt files, or pg19")
    p.add_argument("--max-tokens", type=int, default=4096, help="each book's first N tokens")
    p.add_argument("--batch-windows", type=int, default=8, help="the batched serial run's windows per forward")
    p.add_argument("--workers", default="1,2", help="local Ray worker counts to run, comma-separated ('' for none)")
    p.add_argument("--out", default="results/scaling")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.batch_windows < 2 or any(w < 1 for w in workers):
        raise ValueError("--batch-windows must be >= 2 and --workers positive integers, e.g. --workers 1,2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "scaling.yaml"
        spec_path.write_text(GRID.format(max_tokens=args.max_tokens))
        plan = [(1, None), (args.batch_windows, None)] + [(1, w) for w in workers]
        for i, (batch_windows, w) in enumerate(plan):
            print(f"== run {i + 1} of {len(plan)}: batch_windows {batch_windows}, "
                  f"{'serial' if w is None else f'{w} Ray worker(s)'}", file=sys.stderr)
            rows.append(run_once(spec_path, args.model, args.data, Path(tmp) / f"run{i}", batch_windows, w))
    same = all(r["files"] == rows[0]["files"] for r in rows)
    base = rows[0]["scored"] / rows[0]["seconds"]
    header = ["run", "batch_windows", "threads per worker", "sweep seconds", "not counted (load, Ray start)",
              "tokens x configs / s", "vs serial batch 1"]
    body = [[r["run"], r["batch_windows"], r["threads"], f"{r['seconds']:.1f}", f"{r['overhead']:.1f} s",
             f"{r['scored'] / r['seconds']:.0f}", f"{r['scored'] / r['seconds'] / base:.2f}x"] for r in rows]
    text = "\n".join([table(header, body), "",
                      f"{rows[0]['scored']} tokens x configurations per run; the result files of every run are "
                      f"{'identical' if same else 'NOT identical'}. `python -m eval.bench.scaling "
                      f"{' '.join(argv if argv is not None else sys.argv[1:])}`", ""])
    write_text(out / "scaling.md", text)
    print(text)
    if not same:
        raise ValueError("the runs' result files differ: the NLLs depend on how the work was split (a bug)")


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""The eval package: sliding-window PPL with compressed KV caches, speed and memory, sweeps and reports.

    python -m eval sweep eval/configs/compact.yaml --out results/eval   (what `make eval` runs)
    python -m eval sweep CONFIG.yaml --ray --workers 2 [--batch-windows 8] [--device cuda]   (docs/scale.md)
    python -m eval ppl --model DIR --data DIR --out results/ppl [--compressor snapkv ...]
    python -m eval task recall --model DIR [--data DIR] [--set trials=4] --out results/recall [--compressor ...]
    python -m eval speed --model DIR --prompt-lens 512,1024,2048 --new-tokens 64 --compressor snapkv --out results/speed
    python -m eval report results/eval
    python -m eval bench

`eval.pipeline.run_spec` is the one orchestrator (spec -> inputs -> plan -> execute -> results -> report; the
engine of one sweep is eval.sweep); `ppl`, `task` and `speed` run it on a grid of one compressor.
The tasks beyond PPL (recall, needle, continuation) are in eval.tasks.
"""

from .data import Book, DataError, load_books, tokenized_books
from .grid import ConfigError, SweepSpec, expand, load_spec
from .pipeline import run_spec
from .ppl import sliding_window_nll, sliding_window_nlls, windows
from .report import write_report
from .speed import measure
from .sweep import run_sweep

__all__ = ["Book", "ConfigError", "DataError", "SweepSpec", "expand", "load_books", "load_spec", "measure",
           "run_spec", "run_sweep", "sliding_window_nll", "sliding_window_nlls", "tokenized_books", "windows", "write_report"]

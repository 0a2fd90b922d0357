"""The eval package: sliding-window PPL with compressed KV caches, speed and memory, sweeps and reports.

    python -m eval ppl --model DIR --data DIR --out results/ppl [--compressor snapkv ...]
    python -m eval speed --model DIR --prompt-lens 512,1024,2048 --new-tokens 64 --compressor snapkv --out results/speed
    python -m eval suite --model DIR --data DIR --out results/suite
    python -m eval sweep eval/configs/compact.yaml --out results/eval   (what `make eval` runs)
    python -m eval report results/eval
"""

from .data import Book, DataError, load_books, tokenized_books
from .grid import ConfigError, expand, load_spec
from .ppl import PrefillRecorder, run_ppl, sliding_window_nll, sliding_window_nlls, windows
from .report import write_report
from .speed import measure, run_speed

__all__ = ["Book", "ConfigError", "DataError", "PrefillRecorder", "expand", "load_books", "load_spec", "measure",
           "run_ppl", "run_speed", "sliding_window_nll", "sliding_window_nlls", "tokenized_books", "windows",
           "write_report"]

"""The units a sweep is split into, and how one is run: what a serial run does in turn and a Ray cluster does
in parallel (eval.executors), so that both give the same records.

A unit is one configuration batch's work on one book (its PPL) or on one task example (or a batch of them
of one shape, with batch_windows). It holds everything it needs but the model: the configurations, the book's tokens or the examples (built once by the
driver), and the settings of the windows. Running it returns records; it writes nothing. The driver writes
each unit's records into the configurations' folders in the order the units were planned, whatever order they
finish in, so that a serial, a distributed and a resumed run leave the same files. How long a unit took,
where and on how many threads goes to OUT/units.jsonl, the run's log, never into a result.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import torch

from minipythia import Compressor
from minipythia.timing import clock

from .ppl import book_records
from .tasks import Example, Task, example_records


@dataclass
class Windows:
    """The PPL settings every PPL unit of a sweep shares (eval.ppl.book_records' arguments)."""
    base: dict  # meta (model, revision, dtype) and the windows, in every record and key
    ctx_len: int
    stride: int | None
    mode: str = "window"
    decode_interval: int | None = None
    short_context: int | None = None
    batch_windows: int = 1


@dataclass
class Unit:
    """One configuration batch's PPL on one book, or its scores on task examples still to do: one, or up to
    batch_windows of one shape that the same configurations lack (scored as one batch). `configs`: those of
    the batch that lack the book or the examples."""
    batch: int  # which configuration batch
    configs: list[Compressor]
    book: tuple[str, str, torch.Tensor] | None = None  # (name, source, ids) of a PPL unit
    task: Task | None = None
    examples: list[Example] = field(default_factory=list)

    @property
    def name(self) -> str:
        what = f"ppl {self.book[0]}" if self.book else f"{self.task.name} {self.examples[0].key}" + (
            f" and {len(self.examples) - 1} more" if len(self.examples) > 1 else "")
        return f"batch {self.batch}: {what}, {len(self.configs)} config(s)"


@dataclass
class Done:
    """A unit's records, (label, file name in the label's folder, record) in writing order, and its log line."""
    unit: Unit
    records: list[tuple[str, str, dict]]
    log: dict


def run_unit(unit: Unit, model, windows: Windows, meta: dict) -> Done:
    """Runs one unit on `model` (already loaded where this runs)."""
    device = model.embed_in.weight.device
    t0 = clock(device)
    records = []
    seconds = {}
    if unit.book is not None:
        name, source, ids = unit.book
        rows, secs = book_records(model, name, source, ids, unit.configs, windows.base, windows.ctx_len,
                                  windows.stride, windows.mode, windows.decode_interval, windows.short_context,
                                  windows.batch_windows)
        records += [(c.label, "ppl.jsonl", r) for c, r in zip(unit.configs, rows)]
        seconds = {c.label: round(s, 3) for c, s in zip(unit.configs, secs)}
    else:
        for rows in example_records(unit.task, model, unit.examples, unit.configs, meta):
            records += [(c.label, f"{unit.task.name}.jsonl", r) for c, r in zip(unit.configs, rows)]
    log = dict(unit=unit.name, seconds=round(clock(device) - t0, 3), config_seconds=seconds or None,
               threads=torch.get_num_threads(), device=str(device), host=platform.node(), pid=os.getpid(),
               finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    return Done(unit, records, log)
